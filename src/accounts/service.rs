//! The account service: every change to accounts, sub-accounts, keys and
//! account status goes through here, in the order "check → commit → apply":
//! checked against memory, committed to the store, and only then applied
//! to this replica's memory (registry, billing state, concurrency
//! schedule, limiter).
//!
//! It is also the one place where a replica's memory learns of changes
//! made elsewhere: [`AccountService::follow_changes`] reloads an account
//! from the store whenever the store's change feed names it, and
//! [`AccountService::apply`] replaces what memory holds of it. Applying the
//! same state twice changes nothing, so a replica's own changes arriving
//! back through the feed are harmless.

use std::collections::HashSet;
use std::sync::Arc;

use dashmap::DashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::billing::{self, AccountBilling, PackageKind, ResourcePackage};
use crate::clock::Clock;
use crate::entitlements::schedule::Schedule;
use crate::limiter::Limiter;
use crate::store::{
    AccountRow, AccountSnapshot, Change, KeyRow, Store, StoreError, SubAccountRow, Write, commit,
};

use super::{
    AccountStatus, KeyEntry, Principal, Registry, RootAccount, SubAccount, Tc3Secret,
    generate_api_key, generate_tc3_pair, hash_key, new_key_id, tc3_lookup_hash, validate_id,
};
use crate::auth::sealed::Sealer;

/// Why an admin change was not made. Nothing was changed in any case.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ChangeError {
    pub fn in_use(what: impl std::fmt::Display) -> Self {
        Self::Conflict {
            code: "ResourceInUse",
            message: format!("{what} already exists"),
        }
    }
}

/// A key just issued: the secret is shown this once.
#[derive(Debug)]
pub struct IssuedKey {
    pub key_id: String,
    pub api_key: String,
}

/// A TC3 key pair just issued: the secret key is shown this once.
pub struct IssuedTc3Key {
    pub key_id: String,
    pub secret_id: String,
    pub secret_key: String,
}

/// Taken before reading an account from the store (see
/// [`AccountService::apply_read`]).
#[derive(Debug, Clone, Copy)]
pub struct ReadMark(u64);

pub struct AccountService {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    billing: Arc<billing::Accounts>,
    schedule: Arc<Schedule>,
    limiter: Arc<dyn Limiter>,
    clock: Arc<dyn Clock>,
    /// The store is shared with other replicas: memory may lag it by up
    /// to the change feed's delay, so admin calls read the account first.
    shared: bool,
    /// Account → the mark of the newest read of it applied (see
    /// [`AccountService::apply_read`]).
    applied_reads: DashMap<String, u64>,
    /// Seals new TC3 secrets and opens stored ones.
    sealer: Arc<Sealer>,
    /// Stored TC3 keys whose secret could not be opened (wrong or missing
    /// `auth.secret_encryption_key`); a start refuses to go on with any.
    unopened: AtomicUsize,
}

impl AccountService {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        billing: Arc<billing::Accounts>,
        schedule: Arc<Schedule>,
        limiter: Arc<dyn Limiter>,
        clock: Arc<dyn Clock>,
        shared: bool,
    ) -> Self {
        Self {
            store,
            registry,
            billing,
            schedule,
            limiter,
            clock,
            shared,
            applied_reads: DashMap::new(),
            sealer: Arc::new(Sealer::default()),
            unopened: AtomicUsize::new(0),
        }
    }

    /// With `auth.secret_encryption_key` (and earlier keys): TC3 keys can
    /// be issued and stored ones opened.
    pub fn with_sealer(mut self, sealer: Sealer) -> Self {
        self.sealer = Arc::new(sealer);
        self
    }

    /// How many stored TC3 keys could not be opened so far.
    pub fn unopened_tc3_keys(&self) -> usize {
        self.unopened.load(Ordering::Relaxed)
    }

    /// The account as the store holds it now: with a shared store, a
    /// change made through another replica a moment ago is read before an
    /// admin call checks anything against memory.
    pub async fn root(&self, id: &str) -> Result<Arc<RootAccount>, ChangeError> {
        if self.shared {
            self.refresh(id).await?;
        }
        self.registry
            .root(id)
            .ok_or_else(|| ChangeError::NotFound(format!("account {id}")))
    }

    async fn ensure_new_id(&self, id: &str) -> Result<(), ChangeError> {
        validate_id(id).map_err(|r| ChangeError::Invalid(format!("id: {r}")))?;
        if self.shared {
            self.refresh(id).await?;
        }
        if self.registry.root(id).is_some() || self.registry.sub(id).is_some() {
            return Err(ChangeError::in_use(format!("account {id}")));
        }
        Ok(())
    }

    /// Creates and activates a root account with the free package of its
    /// first activation, durably, then makes it usable.
    pub async fn create_account(
        &self,
        id: &str,
        postpaid: bool,
    ) -> Result<Arc<RootAccount>, ChangeError> {
        self.ensure_new_id(id).await?;
        let now = self.clock.now();
        let free = ResourcePackage::new(
            format!("free_{}", uuid::Uuid::now_v7().simple()),
            id,
            PackageKind::Free,
            billing::FREE_PACKAGE_SIZE,
            rust_decimal::Decimal::ZERO,
            now,
        );
        let account = AccountRow {
            id: id.to_string(),
            status: AccountStatus::Active,
            created_at: now,
            postpaid,
            balance_usd: rust_decimal::Decimal::ZERO,
            arrears_since: None,
        };
        commit(
            &*self.store,
            Write::CreateAccount {
                account: account.clone(),
                free_package: Box::new(free.clone()),
            },
        )
        .await
        .map_err(|e| match e {
            StoreError::Conflict(_) => ChangeError::in_use(format!("account {id}")),
            e => e.into(),
        })?;
        self.apply(AccountSnapshot {
            account,
            sub_accounts: Vec::new(),
            keys: Vec::new(),
            concurrency_packages: Vec::new(),
            resource_packages: vec![free],
        });
        self.registry
            .root(id)
            .ok_or_else(|| ChangeError::NotFound(format!("account {id}")))
    }

    pub async fn create_sub_account(
        &self,
        root_id: &str,
        id: &str,
        max_concurrency: Option<u32>,
    ) -> Result<SubAccountRow, ChangeError> {
        self.root(root_id).await?;
        validate_id(id).map_err(|r| ChangeError::Invalid(format!("id: {r}")))?;
        if let Some(cap) = max_concurrency {
            let limit = self.limiter.stats(root_id).limit;
            if cap == 0 || cap > limit {
                return Err(ChangeError::Invalid(format!(
                    "max_concurrency: must be between 1 and the account's limit ({limit})"
                )));
            }
        }
        self.ensure_new_id(id).await?;
        let row = SubAccountRow {
            id: id.to_string(),
            root: root_id.to_string(),
            max_concurrency,
            created_at: self.clock.now(),
        };
        commit(&*self.store, Write::CreateSubAccount(row.clone()))
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => ChangeError::in_use(format!("account {id}")),
                e => e.into(),
            })?;
        self.insert_sub(&row);
        Ok(row)
    }

    /// Checks that the account exists and `sub`, if given, is one of its
    /// sub-accounts.
    async fn key_owner(&self, root_id: &str, sub: Option<&str>) -> Result<(), ChangeError> {
        self.root(root_id).await?;
        if let Some(sub) = sub {
            match self.registry.sub(sub) {
                Some(s) if *s.root == *root_id => {}
                _ => {
                    return Err(ChangeError::NotFound(format!(
                        "sub-account {sub} of account {root_id}"
                    )));
                }
            }
        }
        Ok(())
    }

    pub async fn issue_key(
        &self,
        root_id: &str,
        sub: Option<&str>,
    ) -> Result<IssuedKey, ChangeError> {
        self.key_owner(root_id, sub).await?;
        let secret = generate_api_key();
        let row = KeyRow {
            key_id: new_key_id(),
            hash: hash_key(&secret),
            root: root_id.to_string(),
            sub: sub.map(str::to_string),
            created_at: self.clock.now(),
            sealed_secret: None,
        };
        commit(&*self.store, Write::CreateKey(row.clone())).await?;
        let key_id = row.key_id.clone();
        self.insert_key(row);
        Ok(IssuedKey {
            key_id,
            api_key: secret,
        })
    }

    /// Issues a TC3 key pair (SPEC §9); refused without an encryption key,
    /// since the secret must be stored sealed.
    pub async fn issue_tc3_key(
        &self,
        root_id: &str,
        sub: Option<&str>,
    ) -> Result<IssuedTc3Key, ChangeError> {
        // An unknown account is a 404 whatever the configuration.
        self.key_owner(root_id, sub).await?;
        if !self.sealer.can_seal() {
            return Err(ChangeError::Conflict {
                code: "FailedOperation.EncryptionKeyMissing",
                message: "TC3 keys need auth.secret_encryption_key (TOLLGATE_AUTH_SECRET_ENCRYPTION_KEY) to store their secret encrypted".into(),
            });
        }
        let (secret_id, secret_key) = generate_tc3_pair();
        let key_id = new_key_id();
        let sealed = self.sealer.seal(&key_id, &secret_key).map_err(|e| {
            ChangeError::Store(StoreError::Internal(format!(
                "sealing the secret failed: {e}"
            )))
        })?;
        let row = KeyRow {
            key_id: key_id.clone(),
            hash: tc3_lookup_hash(&secret_id),
            root: root_id.to_string(),
            sub: sub.map(str::to_string),
            created_at: self.clock.now(),
            sealed_secret: Some(sealed),
        };
        commit(&*self.store, Write::CreateKey(row.clone())).await?;
        self.insert_key(row);
        Ok(IssuedTc3Key {
            key_id,
            secret_id,
            secret_key,
        })
    }

    /// Stores a key whose secret the caller knows (the demo key); a
    /// `Conflict` means it exists or was revoked, and stays so.
    pub async fn add_known_key(&self, row: KeyRow) -> Result<(), StoreError> {
        commit(&*self.store, Write::CreateKey(row.clone())).await?;
        self.insert_key(row);
        Ok(())
    }

    pub async fn revoke_key(&self, key_id: &str) -> Result<(), ChangeError> {
        // With a shared store, a key issued through another replica may not
        // have reached this one's memory yet: the store's update says
        // whether it exists (`NotFound` otherwise).
        if !self.shared && self.registry.key(key_id).is_none() {
            return Err(ChangeError::NotFound(format!("key {key_id}")));
        }
        commit(
            &*self.store,
            Write::RevokeKey {
                key_id: key_id.to_string(),
                at: self.clock.now(),
            },
        )
        .await?;
        self.registry.revoke_key(key_id);
        Ok(())
    }

    /// Deactivates or re-activates an account. Deactivation also refuses
    /// the account's queued tasks; running ones finish.
    pub async fn set_status(&self, id: &str, status: AccountStatus) -> Result<(), ChangeError> {
        let root = self.root(id).await?;
        commit(
            &*self.store,
            Write::SetAccountStatus {
                id: id.to_string(),
                status,
            },
        )
        .await?;
        self.apply_status(&root, status);
        Ok(())
    }

    fn apply_status(&self, root: &RootAccount, status: AccountStatus) {
        let was = root.status();
        root.set_status(status);
        if status == AccountStatus::Deactivated && was != AccountStatus::Deactivated {
            self.limiter.refuse_queued(&root.id);
        }
    }

    fn insert_sub(&self, row: &SubAccountRow) {
        if self.registry.sub(&row.id).is_none() {
            self.registry.insert_sub(SubAccount {
                id: row.id.as_str().into(),
                root: row.root.as_str().into(),
                max_concurrency: row.max_concurrency,
                created_at: row.created_at,
            });
        }
    }

    /// Makes a stored key usable. Keys of unknown accounts are skipped (the
    /// store's foreign keys make that impossible short of manual edits).
    fn insert_key(&self, k: KeyRow) {
        let Some(root) = self.registry.root(&k.root) else {
            tracing::warn!(key_id = %k.key_id, "key of an unknown account skipped");
            return;
        };
        let sub = match &k.sub {
            Some(id) => match self.registry.sub(id) {
                Some(s) => Some(s),
                None => {
                    tracing::warn!(key_id = %k.key_id, "key of an unknown sub-account skipped");
                    return;
                }
            },
            None => None,
        };
        let tc3_secret = match &k.sealed_secret {
            None => None,
            Some(sealed) => match self.sealer.open(&k.key_id, sealed) {
                Ok(secret) => Some(Tc3Secret::new(secret)),
                Err(e) => {
                    self.unopened.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(key_id = %k.key_id, error = %e, "TC3 key skipped: its secret cannot be decrypted");
                    return;
                }
            },
        };
        self.registry.insert_key(KeyEntry {
            key_id: k.key_id,
            hash: k.hash,
            principal: Principal { root, sub },
            tc3_secret,
            created_at: k.created_at,
            last_used: Default::default(),
        });
    }

    /// Makes memory hold what the store holds of one account: status,
    /// billing state, sub-accounts, keys (revoked ones forgotten) and
    /// concurrency packages (the limit follows).
    fn apply(&self, snap: AccountSnapshot) {
        let a = &snap.account;
        match self.registry.root(&a.id) {
            Some(root) => self.apply_status(&root, a.status),
            None => {
                self.registry
                    .insert_root(RootAccount::new(&a.id, a.status, a.created_at));
            }
        }
        self.billing.refresh(
            &a.id,
            AccountBilling {
                postpaid: a.postpaid,
                balance: a.balance_usd,
                arrears_since: a.arrears_since,
                packages: snap.resource_packages,
            },
        );
        for s in &snap.sub_accounts {
            self.insert_sub(s);
        }
        let live: HashSet<&str> = snap.keys.iter().map(|k| k.key_id.as_str()).collect();
        for gone in self
            .registry
            .key_ids_of(&a.id)
            .into_iter()
            .filter(|id| !live.contains(id.as_str()))
        {
            self.registry.revoke_key(&gone);
        }
        for k in snap.keys {
            if self.registry.key(&k.key_id).is_none() {
                self.insert_key(k);
            }
        }
        self.schedule.replace(&a.id, snap.concurrency_packages);
    }

    /// Reloads one account from the store into memory.
    pub async fn refresh(&self, id: &str) -> Result<(), StoreError> {
        let mark = self.read_mark();
        if let Some(snap) = self.store.load_account(id, self.clock.now()).await? {
            self.apply_read(snap, mark);
        }
        Ok(())
    }

    /// Reloads every account (at start, and when changes may have been
    /// missed).
    pub async fn refresh_all(&self) -> Result<usize, StoreError> {
        let mark = self.read_mark();
        let snap = self.store.load(self.clock.now()).await?;
        let accounts = snap.into_accounts();
        let n = accounts.len();
        let mut changed_meanwhile = Vec::new();
        for a in accounts {
            let id = a.account.id.clone();
            // A full reload may stand in for lost feed entries, that of the
            // change it gave way to among them: read those accounts again.
            if !self.apply_read(a, mark) {
                changed_meanwhile.push(id);
            }
        }
        for id in changed_meanwhile {
            self.refresh(&id).await?;
        }
        Ok(n)
    }

    /// Take it before reading an account from the store.
    pub fn read_mark(&self) -> ReadMark {
        ReadMark(self.store.read_mark())
    }

    /// Applies an account read from the store with `mark`, unless memory
    /// already holds something newer of it: this replica's own change
    /// committed after the mark (the read may predate it; applying it
    /// would undo the change in memory, a refunded package counting again,
    /// a new key refused), or a read taken after this one and applied
    /// first. Returns whether it applied. The change's own entry in the
    /// feed brings a fresh read.
    pub fn apply_read(&self, snap: AccountSnapshot, mark: ReadMark) -> bool {
        let id = snap.account.id.clone();
        if self.store.changed_locally_since(&id, mark.0) {
            return false;
        }
        // Held while applying: two reads of one account apply in order.
        let mut newest = self.applied_reads.entry(id).or_insert(0);
        if *newest > mark.0 {
            return false;
        }
        *newest = mark.0;
        self.apply(snap);
        true
    }

    /// Applies every change the store announces, from any replica, until
    /// `stop`. A failed reload is retried by the next full refresh.
    pub async fn follow_changes(self: Arc<Self>, stop: CancellationToken) {
        let mut feed = self.store.changes();
        loop {
            let change = tokio::select! {
                c = feed.recv() => c,
                () = stop.cancelled() => return,
            };
            let result = match change {
                Ok(Change::Account(id)) => self.refresh(&id).await,
                Ok(Change::All) | Err(RecvError::Lagged(_)) => self.refresh_all().await.map(drop),
                Err(RecvError::Closed) => return,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "could not apply a change from the store; retrying with a full reload");
                // Without this the missed change would wait for the next
                // one; a full reload a moment later heals it.
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                    () = stop.cancelled() => return,
                }
                if let Err(e) = self.refresh_all().await {
                    tracing::warn!(error = %e, "full reload failed; waiting for the next change");
                }
            }
        }
    }
}
