//! The `ekko` command.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.global.verbose, args.global.quiet);
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            // A closed pipe (`ekko snapshots | head`) is not a failure.
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return ExitCode::SUCCESS;
                }
            }
            eprintln!("ekko: error: {}", error_chain(&e));
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
            }) {
                eprintln!(
                    "ekko: a file system is full. If it is the repository's: a failed backup has deleted the packs it stored that no index file names, and to free more, forget snapshots and prune (`ekko forget --keep-… --prune`). See \"When the repository's disk is full\" in the README"
                );
            }
            let damage = e
                .downcast_ref::<ekko::Error>()
                .is_some_and(ekko::Error::is_damage);
            let usage = e.downcast_ref::<cli::Usage>().is_some();
            ExitCode::from(match (damage, usage) {
                (true, _) => 3,
                (_, true) => 2,
                _ => 1,
            })
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text the
/// message before it already contains (library errors embed their source).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
