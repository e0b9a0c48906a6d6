//! `ekko serve-nbd`: serve one disk of a snapshot over NBD (instant restore).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use ekko::serve_nbd::{Listen, ServeOptions};

use super::Global;

#[derive(Args)]
#[command(group(clap::ArgGroup::new("address").required(true).args(["listen", "socket"])))]
pub struct ServeNbdArgs {
    /// Snapshot id, unique id prefix, or VM@latest.
    snapshot: String,
    /// Disk to serve (default: the snapshot's only disk).
    #[arg(long)]
    disk: Option<String>,
    /// Listen on this TCP address, e.g. 127.0.0.1:10809.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "socket")]
    listen: Option<SocketAddr>,
    /// Listen on this Unix socket.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Accept writes into a temporary copy-on-write overlay, discarded when
    /// the server stops. The repository is never written.
    #[arg(long)]
    writable: bool,
    /// Require TLS, authenticated with this nbdkit PSK file (username:hexkey).
    #[arg(long, value_name = "FILE")]
    tls_psk: Option<PathBuf>,
}

pub fn run(g: &Global, a: ServeNbdArgs) -> Result<ExitCode> {
    let repo = g.repo_path()?;
    let config = ekko::Repository::read_config(g.backend()?.as_ref())?;
    let passphrase = if config.encryption == "none" {
        None
    } else {
        Some(g.passphrase("Passphrase: ")?)
    };
    let listen = match (a.listen, a.socket) {
        (Some(addr), _) => Listen::Tcp(addr),
        (None, Some(p)) => Listen::Unix(p),
        (None, None) => unreachable!("clap requires --listen or --socket"),
    };
    let opts = ServeOptions {
        passphrase,
        disk: a.disk,
        writable: a.writable,
        tls_psk: a.tls_psk,
        ..ServeOptions::new(repo, a.snapshot, listen)
    };
    ekko::serve_nbd::serve(&opts)?;
    Ok(ExitCode::SUCCESS)
}
