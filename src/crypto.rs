//! Keys, chunk ids, and the one sealing primitive every repository object uses.
//!
//! A repository has one random 64-byte master key. Two keys are derived from
//! it with BLAKE3's key derivation: the chunk-id key (keyed BLAKE3 over
//! plaintext, so ids reveal nothing without the key and are shared by every
//! VM in the repository) and the 64-byte AES-256-SIV key. The master key is
//! stored only wrapped, in key files, one per passphrase.
//!
//! `seal` is deterministic AES-SIV with associated data; the associated data
//! binds each sealed payload to where it belongs (a chunk id, an object name),
//! so a payload moved elsewhere fails to open. In an unencrypted repository
//! `seal` keeps the payload in clear and prefixes a 16-byte keyed BLAKE3 tag,
//! so damage is still detected the same way.

use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::kdf_memory::KdfMemory;
use crate::siv::Aes256Siv;

pub const TAG_LEN: usize = crate::siv::TAG_LEN;
pub const MASTER_KEY_LEN: usize = 64;

/// Fill `buf` from the operating system's CSPRNG.
pub fn random_bytes(buf: &mut [u8]) {
    // The OS CSPRNG failing is not recoverable: there is no safe fallback.
    getrandom::fill(buf).expect("the operating system's random number generator failed");
}

#[derive(Clone)]
enum Mode {
    Siv(Box<Aes256Siv>),
    Clear([u8; 32]),
}

/// The derived keys of an open repository.
#[derive(Clone)]
pub struct Keys {
    id_key: [u8; 32],
    mode: Mode,
}

impl Keys {
    /// Keys of an encrypted repository, derived from its master key.
    pub fn from_master(master: &[u8; MASTER_KEY_LEN]) -> Keys {
        let id_key = blake3::derive_key("ekko 2026-11 chunk id key", master);
        let a = blake3::derive_key("ekko 2026-11 aes-siv key part 1", master);
        let b = blake3::derive_key("ekko 2026-11 aes-siv key part 2", master);
        let mut enc = [0u8; 64];
        enc[..32].copy_from_slice(&a);
        enc[32..].copy_from_slice(&b);
        Keys {
            id_key,
            mode: Mode::Siv(Box::new(Aes256Siv::new(&enc).expect("a 64-byte key"))),
        }
    }

    /// Keys of an unencrypted repository: the id key is stored in the clear
    /// in the config, and tags only detect damage.
    pub fn clear(id_key: [u8; 32]) -> Keys {
        let mac = blake3::derive_key("ekko 2026-11 clear mac key", &id_key);
        Keys {
            id_key,
            mode: Mode::Clear(mac),
        }
    }

    pub fn is_encrypted(&self) -> bool {
        matches!(self.mode, Mode::Siv(_))
    }

    /// The chunk id of a plaintext chunk.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id_key, data).as_bytes())
    }

    /// Seal `plaintext` bound to `ad`: 16-byte tag followed by the payload.
    pub fn seal(&self, ad: &[&[u8]], plaintext: &[u8]) -> Vec<u8> {
        let mut buf = vec![0; TAG_LEN];
        buf.extend_from_slice(plaintext);
        self.seal_in_place(&mut [(ad, &mut buf)]);
        buf
    }

    /// Seal several payloads in place, each bound to its associated data.
    /// Each buffer holds `TAG_LEN` spare bytes, then the payload. With
    /// encryption this is faster than one by one (see `siv`).
    pub fn seal_in_place(&self, items: &mut [(&[&[u8]], &mut [u8])]) {
        match &self.mode {
            Mode::Siv(siv) => siv.seal_in_place(items),
            Mode::Clear(mac) => {
                for (ad, buf) in items {
                    let (tag, body) = buf.split_at_mut(TAG_LEN);
                    tag.copy_from_slice(&clear_tag(mac, ad, body));
                }
            }
        }
    }

    /// Open a sealed payload; `None` when it was damaged or sealed for other
    /// associated data or another key.
    pub fn open(&self, ad: &[&[u8]], sealed: &[u8]) -> Option<Vec<u8>> {
        let mut buf = sealed.to_vec();
        self.open_in_place(&mut [(ad, &mut buf)])[0].then(|| buf.split_off(TAG_LEN))
    }

    /// Open several sealed payloads in place; see `Aes256Siv::open_in_place`.
    /// Each opens or fails on its own.
    pub fn open_in_place(&self, items: &mut [(&[&[u8]], &mut [u8])]) -> Vec<bool> {
        match &self.mode {
            Mode::Siv(siv) => siv.open_in_place(items),
            Mode::Clear(mac) => items
                .iter()
                .map(|(ad, buf)| {
                    buf.split_first_chunk::<TAG_LEN>()
                        // Not secret, so constant time does not matter here.
                        .is_some_and(|(tag, body)| *tag == clear_tag(mac, ad, body))
                })
                .collect(),
        }
    }
}

fn clear_tag(mac: &[u8; 32], ad: &[&[u8]], body: &[u8]) -> [u8; TAG_LEN] {
    let mut h = blake3::Hasher::new_keyed(mac);
    for part in ad {
        // Length-prefix each part so that ("ab","c") and ("a","bc") differ.
        h.update(&u64::try_from(part.len()).unwrap_or(u64::MAX).to_le_bytes());
        h.update(part);
    }
    h.update(body);
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&h.finalize().as_bytes()[..TAG_LEN]);
    out
}

/// The contents of a key file: the master key wrapped under a key derived
/// from a passphrase with Argon2id.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KeyFile {
    pub kdf: String,
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
    pub salt: String,
    pub wrapped: String,
    pub created: String,
    pub host: String,
}

/// Argon2id cost: OWASP's recommended minimum (19 MiB, 2 passes). It keeps
/// the peak memory of every command low; the cost is stored per key file, so
/// it can be raised later without a format change.
const ARGON_M_KIB: u32 = 19 * 1024;
const ARGON_T: u32 = 2;
const ARGON_P: u32 = 1;

fn argon_params(name: &str, m: u32, t: u32, p: u32) -> Result<Params> {
    Params::new(m, t, p, Some(64))
        .map_err(|e| Error::corrupt(name, format!("bad Argon2 parameters: {e}")))
}

fn kek(name: &str, passphrase: &[u8], salt: &[u8], m: u32, t: u32, p: u32) -> Result<[u8; 64]> {
    let params = argon_params(name, m, t, p)?;
    let memory = KdfMemory::new(params.block_count());
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut out = [0u8; 64];
    match memory {
        Some(memory) => argon.hash_password_into_with_memory(passphrase, salt, &mut out, memory),
        None => argon.hash_password_into(passphrase, salt, &mut out),
    }
    .map_err(|e| Error::corrupt(name, format!("Argon2 failed: {e}")))?;
    Ok(out)
}

impl KeyFile {
    pub fn wrap(master: &[u8; MASTER_KEY_LEN], passphrase: &[u8], repo_id: &str) -> Result<Self> {
        let mut salt = [0u8; 16];
        random_bytes(&mut salt);
        let k = kek(
            "new key file",
            passphrase,
            &salt,
            ARGON_M_KIB,
            ARGON_T,
            ARGON_P,
        )?;
        let siv = Aes256Siv::new(&k).expect("a 64-byte key");
        let wrapped = siv.seal(&[b"ekko key file", repo_id.as_bytes()], master);
        Ok(KeyFile {
            kdf: "argon2id".into(),
            m_kib: ARGON_M_KIB,
            t: ARGON_T,
            p: ARGON_P,
            salt: hex::encode(salt),
            wrapped: hex::encode(wrapped),
            created: crate::time::now_rfc3339(),
            host: crate::time::hostname(),
        })
    }

    /// The master key, or `None` if the passphrase does not open this file.
    /// What can be checked without the passphrase: a known KDF with sane
    /// costs, and hex salt and wrapped key. Returns those two, decoded.
    pub fn check(&self, name: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        if self.kdf != "argon2id" {
            return Err(Error::corrupt(name, format!("unknown KDF {:?}", self.kdf)));
        }
        // Refuse absurd costs from a tampered file before allocating them.
        if self.m_kib > 4 * 1024 * 1024 || self.t > 64 || self.p > 64 {
            return Err(Error::corrupt(name, "Argon2 cost out of range"));
        }
        argon_params(name, self.m_kib, self.t, self.p)?;
        let salt = hex::decode(&self.salt).map_err(|_| Error::corrupt(name, "salt is not hex"))?;
        let wrapped = hex::decode(&self.wrapped)
            .map_err(|_| Error::corrupt(name, "wrapped key is not hex"))?;
        Ok((salt, wrapped))
    }

    pub fn unwrap_key(
        &self,
        passphrase: &[u8],
        repo_id: &str,
        name: &str,
    ) -> Result<Option<[u8; MASTER_KEY_LEN]>> {
        let (salt, wrapped) = self.check(name)?;
        let k = kek(name, passphrase, &salt, self.m_kib, self.t, self.p)?;
        let siv = Aes256Siv::new(&k).expect("a 64-byte key");
        let Some(master) = siv.open(&[b"ekko key file", repo_id.as_bytes()], &wrapped) else {
            return Ok(None);
        };
        let master: [u8; MASTER_KEY_LEN] = master
            .try_into()
            .map_err(|_| Error::corrupt(name, "wrapped key has the wrong length"))?;
        Ok(Some(master))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_binds_associated_data() {
        for keys in [Keys::from_master(&[7; 64]), Keys::clear([9; 32])] {
            let s = keys.seal(&[b"a", b"b"], b"hello world");
            assert_eq!(keys.open(&[b"a", b"b"], &s).unwrap(), b"hello world");
            assert!(keys.open(&[b"a", b"c"], &s).is_none());
            assert!(keys.open(&[b"ab"], &s).is_none());
            let mut bad = s.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(keys.open(&[b"a", b"b"], &bad).is_none());
            assert!(keys.open(&[b"a", b"b"], &s[..3]).is_none());
        }
    }

    #[test]
    fn key_file_roundtrip_and_wrong_passphrase() {
        let master = [3u8; 64];
        let kf = KeyFile::wrap(&master, b"secret", "repo1").unwrap();
        assert_eq!(
            kf.unwrap_key(b"secret", "repo1", "k").unwrap(),
            Some(master)
        );
        assert_eq!(kf.unwrap_key(b"wrong", "repo1", "k").unwrap(), None);
        assert_eq!(kf.unwrap_key(b"secret", "repo2", "k").unwrap(), None);
    }
}
