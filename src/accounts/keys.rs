//! API key secrets: generation, hashing, and constant-time comparison.
//!
//! Keys are 192-bit random secrets, so a plain SHA-256 is a sound way to store
//! them (a slow password hash would protect nothing more and cost every
//! request).

use std::hash::Hasher;

use dashmap::DashMap;
use rand::RngCore;
use sha2::{Digest, Sha256};
use siphasher::sip128::{Hasher128, SipHasher13};
use subtle::ConstantTimeEq;

pub type KeyHash = [u8; 32];

/// Longer presented keys are refused before hashing.
pub const MAX_PRESENTED_KEY_LEN: usize = 256;

pub fn generate_api_key() -> String {
    let mut secret = [0u8; 24];
    rand::rng().fill_bytes(&mut secret);
    format!("tg_{}", hex::encode(secret))
}

/// A TC3 key pair in the service's shape: a 36-character `AKID…` SecretId
/// and a 32-character SecretKey (128 random bits each part).
pub fn generate_tc3_pair() -> (String, String) {
    let mut id = [0u8; 16];
    let mut key = [0u8; 16];
    rand::rng().fill_bytes(&mut id);
    rand::rng().fill_bytes(&mut key);
    (format!("AKID{}", hex::encode(id)), hex::encode(key))
}

pub fn new_key_id() -> String {
    format!("key_{}", uuid::Uuid::now_v7().simple())
}

pub fn hash_key(secret: &str) -> KeyHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// The SHA-256 of presented keys already found valid, by a 128-bit SipHash
/// of the presented value under a key drawn at start: SHA-256 runs once
/// per key, not once per request (~3,400 instructions each). SipHash is a
/// keyed PRF, so without the process's key nobody can make another value
/// land on a valid key's entry (a 2^-128 chance per try), and the map's
/// timing says nothing about the secret. Only keys that matched a stored
/// hash are remembered, so presented garbage cannot grow it; a revoked key
/// is forgotten, and would find nothing anyway (its stored entry is gone).
pub(super) struct VerifiedKeys {
    key: [u8; 16],
    hashes: DashMap<u128, KeyHash>,
}

/// Past this many remembered keys the cache starts over (each is one
/// SHA-256 away from coming back).
const MAX_VERIFIED: usize = 1 << 20;

impl Default for VerifiedKeys {
    fn default() -> Self {
        let mut key = [0u8; 16];
        rand::rng().fill_bytes(&mut key);
        Self {
            key,
            hashes: DashMap::new(),
        }
    }
}

impl VerifiedKeys {
    /// The cache's name for a presented value in one lookup domain (a
    /// Bearer secret, a TC3 SecretId).
    pub(super) fn tag(&self, domain: u8, presented: &str) -> u128 {
        let mut h = SipHasher13::new_with_key(&self.key);
        h.write_u8(domain);
        h.write(presented.as_bytes());
        h.finish128().as_u128()
    }

    pub(super) fn get(&self, tag: u128) -> Option<KeyHash> {
        self.hashes.get(&tag).map(|h| *h)
    }

    pub(super) fn remember(&self, tag: u128, hash: KeyHash) {
        if self.hashes.len() >= MAX_VERIFIED {
            self.hashes.clear();
        }
        self.hashes.insert(tag, hash);
    }

    pub(super) fn forget(&self, hash: &KeyHash) {
        self.hashes.retain(|_, h| h != hash);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.hashes.len()
    }
}

pub(super) fn hashes_match(a: &KeyHash, b: &KeyHash) -> bool {
    a.ct_eq(b).into()
}

/// Compares two secrets (e.g. the admin token) in time independent of where
/// they differ; hashing first makes the time independent of their lengths too.
pub fn secrets_match(presented: &str, expected: &str) -> bool {
    hashes_match(&hash_key(presented), &hash_key(expected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_distinct_and_prefixed() {
        let a = generate_api_key();
        let b = generate_api_key();
        assert_ne!(a, b);
        assert!(a.starts_with("tg_") && a.len() == 3 + 48);
        assert!(new_key_id().starts_with("key_"));
    }

    #[test]
    fn secrets_compare_by_value() {
        assert!(secrets_match("same-secret", "same-secret"));
        assert!(!secrets_match("same-secret", "same-secreT"));
        assert!(!secrets_match("", "x"));
    }
}
