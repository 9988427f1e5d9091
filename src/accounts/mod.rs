//! Root accounts, sub-accounts and API keys as the data plane sees them: an
//! in-memory registry kept in step with the store, so authenticating a
//! request never touches the database.

mod keys;
pub mod service;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use dashmap::DashMap;
use jiff::Timestamp;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use keys::{
    KeyHash, MAX_PRESENTED_KEY_LEN, generate_api_key, generate_tc3_pair, hash_key, new_key_id,
    secrets_match,
};
pub use service::{AccountService, ChangeError, IssuedKey, IssuedTc3Key};

/// Ids of accounts and sub-accounts: 1 to 64 characters of `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit (they appear in headers, URLs and labels).
pub fn validate_id(id: &str) -> Result<(), &'static str> {
    let ok_len = (1..=64).contains(&id.len());
    let ok_first = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok_len && ok_first && ok_chars {
        Ok(())
    } else {
        Err(
            "must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-', starting with a letter or digit",
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    Active,
    Deactivated,
    Suspended,
}

impl AccountStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Deactivated => "deactivated",
            Self::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Self::Active),
            "deactivated" => Some(Self::Deactivated),
            "suspended" => Some(Self::Suspended),
            _ => None,
        }
    }

    fn to_u8(self) -> u8 {
        self as u8
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Active,
            1 => Self::Deactivated,
            _ => Self::Suspended,
        }
    }
}

/// A paying customer.
#[derive(Debug)]
pub struct RootAccount {
    pub id: Arc<str>,
    pub created_at: Timestamp,
    // An atomic so the data plane reads the status without a lock; admin
    // calls change it after the store has committed the change.
    status: AtomicU8,
}

impl RootAccount {
    pub fn new(id: &str, status: AccountStatus, created_at: Timestamp) -> Self {
        Self {
            id: Arc::from(id),
            created_at,
            status: AtomicU8::new(status.to_u8()),
        }
    }

    pub fn status(&self) -> AccountStatus {
        AccountStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    pub fn set_status(&self, status: AccountStatus) {
        self.status.store(status.to_u8(), Ordering::Release);
    }
}

#[derive(Debug)]
pub struct SubAccount {
    pub id: Arc<str>,
    pub root: Arc<str>,
    pub max_concurrency: Option<u32>,
    pub created_at: Timestamp,
}

/// What a valid API key stands for.
#[derive(Debug, Clone)]
pub struct Principal {
    pub root: Arc<RootAccount>,
    pub sub: Option<Arc<SubAccount>>,
}

/// An issued, unrevoked key. An API key's secret is never kept (only its
/// hash); a TC3 key's secret is, in memory only, because verifying a
/// signature needs it (at rest it is sealed, see `auth::sealed`).
#[derive(Debug)]
pub struct KeyEntry {
    pub key_id: String,
    /// API key: SHA-256 of the secret. TC3: [`tc3_lookup_hash`] of the
    /// SecretId.
    pub hash: KeyHash,
    pub principal: Principal,
    pub tc3_secret: Option<Tc3Secret>,
    pub created_at: Timestamp,
    /// The last authentication with it seen by this process.
    pub last_used: LastUsed,
}

/// When a key last authenticated, in whole seconds since the epoch (0:
/// not since this process started). Seconds, so a busy key writes the
/// shared value about once a second, not once a request.
#[derive(Debug, Default)]
pub struct LastUsed(std::sync::atomic::AtomicI64);

impl LastUsed {
    pub fn mark(&self) {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if self.0.load(Ordering::Relaxed) != now {
            self.0.store(now, Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> Option<Timestamp> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            secs => Timestamp::from_second(secs).ok(),
        }
    }

    fn carry_from(&self, earlier: &LastUsed) {
        use std::sync::atomic::Ordering;
        self.0
            .fetch_max(earlier.0.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// A TC3 secret key in memory; `Debug` never shows it.
#[derive(Clone)]
pub struct Tc3Secret(Arc<str>);

impl Tc3Secret {
    pub fn new(secret: String) -> Self {
        Self(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Tc3Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tc3Secret(..)")
    }
}

/// Where a TC3 key sits in the registry: a hash of its SecretId in its own
/// domain (no Bearer value can hash to it: the prefix holds a NUL, which no
/// header value carries).
pub fn tc3_lookup_hash(secret_id: &str) -> KeyHash {
    hash_key(&format!("tc3\0{secret_id}"))
}

#[derive(Default)]
pub struct Registry {
    roots: DashMap<Arc<str>, Arc<RootAccount>>,
    subs: DashMap<Arc<str>, Arc<SubAccount>>,
    keys: DashMap<KeyHash, Arc<KeyEntry>>,
    key_ids: DashMap<String, KeyHash>,
    /// Cancelled when the key is revoked, so tasks admitted with it (queued
    /// or about to be forwarded) learn of it at once. Made on first use: a
    /// key that never sent a task costs nothing here.
    revocations: DashMap<KeyHash, CancellationToken>,
    verified: keys::VerifiedKeys,
}

/// Lookup domains of [`keys::VerifiedKeys`].
const BEARER: u8 = 0;
const TC3_ID: u8 = 1;

/// The credential part of an `Authorization` value whose scheme is
/// `Bearer`, in any case (RFC 9110 §11.1: the scheme is case-insensitive).
/// `None` for any other scheme or an empty credential.
pub fn bearer_token(value: &str) -> Option<&str> {
    let value = value.trim_start();
    let (scheme, rest) = value.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    (!token.is_empty()).then_some(token)
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert_root(&self, root: RootAccount) -> Arc<RootAccount> {
        let root = Arc::new(root);
        self.roots.insert(root.id.clone(), root.clone());
        root
    }

    pub fn root(&self, id: &str) -> Option<Arc<RootAccount>> {
        self.roots.get(id).map(|r| r.clone())
    }

    pub fn root_count(&self) -> usize {
        self.roots.len()
    }

    pub fn insert_sub(&self, sub: SubAccount) -> Arc<SubAccount> {
        let sub = Arc::new(sub);
        self.subs.insert(sub.id.clone(), sub.clone());
        sub
    }

    pub fn sub(&self, id: &str) -> Option<Arc<SubAccount>> {
        self.subs.get(id).map(|s| s.clone())
    }

    /// Up to `limit` root accounts in id order after `after`, and whether
    /// more follow.
    pub fn roots_page(&self, after: Option<&str>, limit: usize) -> (Vec<Arc<RootAccount>>, bool) {
        let mut ids: Vec<Arc<str>> = self
            .roots
            .iter()
            .filter(|r| after.is_none_or(|a| &**r.key() > a))
            .map(|r| r.key().clone())
            .collect();
        ids.sort_unstable();
        let more = ids.len() > limit;
        let page = ids
            .iter()
            .take(limit)
            .filter_map(|id| self.root(id))
            .collect();
        (page, more)
    }

    /// The unrevoked keys of a root account and of its sub-accounts, oldest
    /// first.
    pub fn keys_of(&self, root: &str) -> Vec<Arc<KeyEntry>> {
        let mut keys: Vec<_> = self
            .keys
            .iter()
            .filter(|k| &*k.principal.root.id == root)
            .map(|k| k.clone())
            .collect();
        keys.sort_by(|a, b| (a.created_at, &a.key_id).cmp(&(b.created_at, &b.key_id)));
        keys
    }

    pub fn subs_of(&self, root: &str) -> Vec<Arc<SubAccount>> {
        let mut subs: Vec<_> = self
            .subs
            .iter()
            .filter(|s| &*s.root == root)
            .map(|s| s.clone())
            .collect();
        subs.sort_by(|a, b| a.id.cmp(&b.id));
        subs
    }

    pub fn insert_key(&self, entry: KeyEntry) {
        // Re-read from the store (cluster refresh): keep what was seen.
        if let Some(known) = self.keys.get(&entry.hash) {
            entry.last_used.carry_from(&known.last_used);
        }
        self.key_ids.insert(entry.key_id.clone(), entry.hash);
        self.keys.insert(entry.hash, Arc::new(entry));
    }

    pub fn key(&self, key_id: &str) -> Option<Arc<KeyEntry>> {
        let hash = *self.key_ids.get(key_id)?;
        self.keys.get(&hash).map(|k| k.clone())
    }

    /// Ids of the keys of a root account and of its sub-accounts.
    pub fn key_ids_of(&self, root: &str) -> Vec<String> {
        self.keys
            .iter()
            .filter(|k| &*k.principal.root.id == root)
            .map(|k| k.key_id.clone())
            .collect()
    }

    /// Forgets a key: from this call on it authenticates nothing.
    pub fn revoke_key(&self, key_id: &str) -> Option<Arc<KeyEntry>> {
        let (_, hash) = self.key_ids.remove(key_id)?;
        let entry = self.keys.remove(&hash).map(|(_, k)| k);
        self.verified.forget(&hash);
        // After the removal above: see `authenticate_watched` for the order.
        if let Some((_, revoked)) = self.revocations.remove(&hash) {
            revoked.cancel();
        }
        entry
    }

    /// Like [`Registry::authenticate`], with a token cancelled if the key
    /// is revoked from now on (queued tasks must not outlive their key).
    pub fn authenticate_watched(&self, presented: &str) -> Option<(Principal, CancellationToken)> {
        let (hash, principal) = self.authenticate_hashed(presented)?;
        self.watch(hash, principal)
    }

    /// The TC3 key of a SecretId, if issued and not revoked.
    pub fn tc3_key(&self, secret_id: &str) -> Option<Arc<KeyEntry>> {
        if secret_id.is_empty() || secret_id.len() > MAX_PRESENTED_KEY_LEN {
            return None;
        }
        let tag = self.verified.tag(TC3_ID, secret_id);
        let cached = self.verified.get(tag);
        let hash = cached.unwrap_or_else(|| tc3_lookup_hash(secret_id));
        let entry = self.keys.get(&hash)?.clone();
        entry.tc3_secret.as_ref()?;
        if cached.is_none() {
            self.verified.remember(tag, hash);
        }
        Some(entry)
    }

    /// A token cancelled when the key with `hash` is revoked; `None` if it
    /// is already gone.
    pub fn watch(
        &self,
        hash: KeyHash,
        principal: Principal,
    ) -> Option<(Principal, CancellationToken)> {
        let revoked = self.revocations.entry(hash).or_default().clone();
        // `revoke_key` removes the key before it cancels the token. If the
        // key is still here, any revocation cancels the token taken above;
        // if it is gone, a revocation raced us and may have missed it.
        if self.keys.contains_key(&hash) {
            Some((principal, revoked))
        } else {
            if let Some((_, t)) = self.revocations.remove(&hash) {
                t.cancel();
            }
            None
        }
    }

    /// Finds who a presented key belongs to.
    pub fn authenticate(&self, presented: &str) -> Option<Principal> {
        self.authenticate_hashed(presented).map(|(_, p)| p)
    }

    /// [`Self::authenticate`], with the key's hash (SHA-256 once a request,
    /// not again for the revocation watch).
    fn authenticate_hashed(&self, presented: &str) -> Option<(KeyHash, Principal)> {
        if presented.is_empty() || presented.len() > MAX_PRESENTED_KEY_LEN {
            return None;
        }
        let tag = self.verified.tag(BEARER, presented);
        let cached = self.verified.get(tag);
        let hash = cached.unwrap_or_else(|| hash_key(presented));
        let entry = self.keys.get(&hash)?;
        // The map is keyed by the hash, so a lookup's timing says nothing
        // about the secret; the constant-time check guards the match itself.
        // A TC3 key never authenticates as a Bearer value.
        let valid = entry.tc3_secret.is_none() && keys::hashes_match(&entry.hash, &hash);
        if valid {
            entry.last_used.mark();
            if cached.is_none() {
                self.verified.remember(tag, hash);
            }
        }
        valid.then(|| (hash, entry.principal.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        for ok in ["acme", "acme-dev", "a", "A.b_c-1"] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-acme", "has space", "ü", &"x".repeat(65), "a/b"] {
            assert!(validate_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_authenticate_until_revoked() {
        let reg = Registry::new();
        let root = reg.insert_root(RootAccount::new(
            "acme",
            AccountStatus::Active,
            Timestamp::UNIX_EPOCH,
        ));
        let secret = generate_api_key();
        reg.insert_key(KeyEntry {
            key_id: "k1".into(),
            hash: hash_key(&secret),
            principal: Principal { root, sub: None },
            tc3_secret: None,
            created_at: Timestamp::UNIX_EPOCH,
            last_used: LastUsed::default(),
        });
        assert!(reg.key("k1").unwrap().last_used.get().is_none());
        assert_eq!(&*reg.authenticate(&secret).unwrap().root.id, "acme");
        assert!(
            reg.key("k1").unwrap().last_used.get().is_some(),
            "a use is seen"
        );
        assert!(reg.authenticate("tg_wrong").is_none());
        assert!(reg.authenticate("").is_none());
        assert_eq!(reg.verified.len(), 1, "only the valid key is remembered");
        // From the cache now: the same answer, and a near miss still fails.
        assert_eq!(&*reg.authenticate(&secret).unwrap().root.id, "acme");
        let mut near = secret.clone();
        near.pop();
        assert!(reg.authenticate(&near).is_none());
        let (_, revoked) = reg.authenticate_watched(&secret).unwrap();
        assert!(!revoked.is_cancelled());
        assert!(reg.revoke_key("k1").is_some());
        assert!(revoked.is_cancelled(), "revocation reaches admitted tasks");
        assert_eq!(reg.verified.len(), 0, "a revoked key is forgotten");
        assert!(reg.authenticate(&secret).is_none());
        assert!(reg.authenticate_watched(&secret).is_none());
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for ok in [
            "Bearer abc",
            "bearer abc",
            "BEARER abc",
            "BeArEr   abc ",
            "Bearer\tabc",
        ] {
            assert_eq!(bearer_token(ok), Some("abc"), "{ok:?}");
        }
        for bad in ["Basic abc", "Bearer", "Bearer ", "Bearerabc", "abc", ""] {
            assert_eq!(bearer_token(bad), None, "{bad:?}");
        }
    }
}
