//! TC3 secret keys at rest: sealed with ChaCha20-Poly1305 under
//! `auth.secret_encryption_key`, with the key's id stored beside each
//! ciphertext so a key can be rotated (the old key, listed in
//! `auth.previous_secret_encryption_keys`, still opens old secrets).
//!
//! A verifier needs the secret itself (HMAC), so unlike API keys these
//! cannot be stored as hashes. The key id is the first 8 bytes of SHA-256
//! of the key (hex); the associated data is the key's `key_id`, so a sealed
//! secret copied onto another key's row does not open.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

const FORMAT: &str = "v1";

/// A parsed encryption key. Its `Debug` shows only the id.
#[derive(Clone)]
pub struct SealingKey {
    id: String,
    key: [u8; 32],
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealingKey({})", self.id)
    }
}

impl SealingKey {
    /// From 64 hex digits (`openssl rand -hex 32`). The error never repeats
    /// the value.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut key = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut key).map_err(|_| {
            "must be 64 hex digits (32 random bytes, e.g. `openssl rand -hex 32`)".to_string()
        })?;
        let id = hex::encode(&Sha256::digest(key)[..8]);
        Ok(Self { id, key })
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("no encryption key is configured (auth.secret_encryption_key)")]
    NoKey,
    #[error("the secret was sealed with key {0}, which is not configured")]
    UnknownKey(String),
    #[error("the sealed secret is damaged or does not belong to this key")]
    Damaged,
}

/// The current key (seals and opens) and earlier ones (open only).
#[derive(Debug, Clone, Default)]
pub struct Sealer {
    current: Option<SealingKey>,
    previous: Vec<SealingKey>,
}

impl Sealer {
    pub fn new(current: Option<SealingKey>, previous: Vec<SealingKey>) -> Self {
        Self { current, previous }
    }

    pub fn can_seal(&self) -> bool {
        self.current.is_some()
    }

    /// `v1.<key id>.<hex nonce>.<hex ciphertext>`, bound to `key_id`.
    pub fn seal(&self, key_id: &str, secret: &str) -> Result<String, SealError> {
        let k = self.current.as_ref().ok_or(SealError::NoKey)?;
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let ct = ChaCha20Poly1305::new(Key::from_slice(&k.key))
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.as_bytes(),
                    aad: key_id.as_bytes(),
                },
            )
            .map_err(|_| SealError::Damaged)?;
        Ok(format!(
            "{FORMAT}.{}.{}.{}",
            k.id,
            hex::encode(nonce),
            hex::encode(ct)
        ))
    }

    pub fn open(&self, key_id: &str, sealed: &str) -> Result<String, SealError> {
        let mut parts = sealed.split('.');
        let (Some(FORMAT), Some(kid), Some(nonce), Some(ct), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(SealError::Damaged);
        };
        let k = self
            .current
            .iter()
            .chain(&self.previous)
            .find(|k| k.id == kid)
            .ok_or_else(|| {
                if self.current.is_none() && self.previous.is_empty() {
                    SealError::NoKey
                } else {
                    SealError::UnknownKey(kid.to_string())
                }
            })?;
        let mut n = [0u8; 12];
        hex::decode_to_slice(nonce, &mut n).map_err(|_| SealError::Damaged)?;
        let ct = hex::decode(ct).map_err(|_| SealError::Damaged)?;
        let plain = ChaCha20Poly1305::new(Key::from_slice(&k.key))
            .decrypt(
                Nonce::from_slice(&n),
                Payload {
                    msg: &ct,
                    aad: key_id.as_bytes(),
                },
            )
            .map_err(|_| SealError::Damaged)?;
        String::from_utf8(plain).map_err(|_| SealError::Damaged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const B: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn key(t: &str) -> SealingKey {
        SealingKey::parse(t).unwrap()
    }

    #[test]
    fn seals_and_opens_and_never_shows_the_secret() {
        let s = Sealer::new(Some(key(A)), vec![]);
        let sealed = s.seal("key_1", "my-secret-key").unwrap();
        assert!(!sealed.contains("my-secret-key"));
        assert!(sealed.starts_with(&format!("v1.{}.", key(A).id())));
        assert_eq!(s.open("key_1", &sealed).unwrap(), "my-secret-key");
        // Two seals of one secret differ (random nonce).
        assert_ne!(sealed, s.seal("key_1", "my-secret-key").unwrap());
        assert!(!format!("{:?}", key(A)).contains(A));
    }

    #[test]
    fn another_row_another_key_or_a_flipped_byte_does_not_open() {
        let s = Sealer::new(Some(key(A)), vec![]);
        let sealed = s.seal("key_1", "secret").unwrap();
        assert_eq!(s.open("key_2", &sealed), Err(SealError::Damaged));
        let other = Sealer::new(Some(key(B)), vec![]);
        assert_eq!(
            other.open("key_1", &sealed),
            Err(SealError::UnknownKey(key(A).id().to_string()))
        );
        let mut flipped = sealed.clone();
        let last = flipped.pop().unwrap();
        flipped.push(if last == '0' { '1' } else { '0' });
        assert_eq!(s.open("key_1", &flipped), Err(SealError::Damaged));
        assert_eq!(
            Sealer::default().open("key_1", &sealed),
            Err(SealError::NoKey)
        );
        assert_eq!(Sealer::default().seal("key_1", "x"), Err(SealError::NoKey));
    }

    #[test]
    fn a_rotated_key_still_opens_old_secrets() {
        let old = Sealer::new(Some(key(A)), vec![]);
        let sealed = old.seal("key_1", "secret").unwrap();
        let rotated = Sealer::new(Some(key(B)), vec![key(A)]);
        assert_eq!(rotated.open("key_1", &sealed).unwrap(), "secret");
        assert!(rotated.seal("key_1", "s").unwrap().contains(key(B).id()));
    }

    #[test]
    fn bad_keys_are_refused_without_echo() {
        for bad in ["", "abc", &A[..62], &format!("{A}00"), "zz"] {
            let e = SealingKey::parse(bad).unwrap_err();
            assert!(bad.is_empty() || !e.contains(bad));
        }
    }
}
