//! Wiring: builds the shared state from the config and the store, runs the
//! listeners, and shuts down in order on SIGTERM/SIGINT.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accounts::{
    AccountStatus, KeyEntry, Principal, Registry, RootAccount, SubAccount, hash_key,
};
use crate::billing::{self, AccountBilling, PackageKind, ResourcePackage};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, DEMO_API_KEY};
use crate::entitlements::schedule::Schedule;
use crate::gateway::proxy::Backend;
use crate::limiter::{Limiter, LocalLimiter};
use crate::metrics::Metrics;
use crate::store::{AccountRow, KeyRow, Store, StoreError, Write, commit};
use crate::usage::UsageRecorder;

/// Everything a request or an admin call needs, shared behind one `Arc`.
pub struct App {
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub registry: Registry,
    pub limiter: Arc<dyn Limiter>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub recorder: UsageRecorder,
    pub backend: Backend,
    /// Concurrency packages and the timer that applies them to the limiter.
    pub schedule: Arc<Schedule>,
    /// `billing.timezone`: days, months and cut-offs are counted in it.
    pub tz: TimeZone,
    /// Billing state per account (packages, postpaid, balance, arrears);
    /// admission reserves here without touching the store.
    pub billing: billing::Accounts,
    /// Serializes admin changes to balances (top-ups, settlements), which
    /// compute the new balance first and store it second.
    pub billing_admin: tokio::sync::Mutex<()>,
    /// Forwarded tasks, which outlive their client connections; shutdown
    /// waits for them.
    pub tasks: TaskTracker,
    /// Cancelled when shutdown begins (readiness turns false).
    pub stopping: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("backend: {0}")]
    Backend(String),
}

impl App {
    /// Builds the state and loads accounts and keys from the store.
    pub async fn build(
        config: Config,
        backend_url: &str,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, StartError> {
        let metrics = Arc::new(Metrics::new(config.metrics.per_account_labels));
        let limiter: Arc<dyn Limiter> = Arc::new(LocalLimiter::new(
            config.limits.default_concurrency,
            config.limits.max_queue_per_account,
        ));
        let backend = Backend::new(&config.backend, backend_url, config.limits.max_body_bytes)
            .map_err(StartError::Backend)?;
        let tz = TimeZone::get(&config.billing.timezone).map_err(|e| {
            StartError::Config(crate::config::ConfigError::Invalid {
                key: "billing.timezone".into(),
                reason: e.to_string(),
            })
        })?;
        let schedule = Arc::new(Schedule::new(
            config.limits.default_concurrency,
            clock.clone(),
            limiter.clone(),
        ));
        let app = Self {
            schedule,
            tz,
            billing: billing::Accounts::new(config.billing.arrears_grace),
            billing_admin: tokio::sync::Mutex::new(()),
            recorder: UsageRecorder::new(store.clone(), metrics.clone()),
            registry: Registry::new(),
            config,
            clock,
            limiter,
            store,
            metrics,
            backend,
            tasks: TaskTracker::new(),
            stopping: CancellationToken::new(),
        };
        app.load().await?;
        Ok(Arc::new(app))
    }

    async fn load(&self) -> Result<(), StoreError> {
        let snap = self.store.load(self.clock.now()).await?;
        let mut packages: HashMap<String, Vec<ResourcePackage>> = HashMap::new();
        for p in snap.resource_packages {
            packages.entry(p.account.clone()).or_default().push(p);
        }
        for a in snap.accounts {
            self.billing.insert(
                &a.id,
                AccountBilling {
                    postpaid: a.postpaid,
                    balance: a.balance_usd,
                    arrears_since: a.arrears_since,
                    packages: packages.remove(&a.id).unwrap_or_default(),
                },
            );
            self.add_root(RootAccount::new(&a.id, a.status, a.created_at));
        }
        for s in snap.sub_accounts {
            self.registry.insert_sub(SubAccount {
                id: s.id.as_str().into(),
                root: s.root.as_str().into(),
                max_concurrency: s.max_concurrency,
                created_at: s.created_at,
            });
        }
        for k in snap.keys {
            self.add_key(k);
        }
        for p in snap.concurrency_packages {
            self.schedule.add(p);
        }
        Ok(())
    }

    /// Creates and activates a root account with the free package of its
    /// first activation, durably, then makes it usable.
    pub async fn create_account(
        &self,
        id: &str,
        postpaid: bool,
    ) -> Result<Arc<RootAccount>, StoreError> {
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
                account,
                free_package: Box::new(free.clone()),
            },
        )
        .await?;
        self.billing.insert(
            id,
            AccountBilling {
                postpaid,
                packages: vec![free],
                ..AccountBilling::default()
            },
        );
        Ok(self.add_root(RootAccount::new(id, AccountStatus::Active, now)))
    }

    pub fn add_root(&self, root: RootAccount) -> Arc<RootAccount> {
        let root = self.registry.insert_root(root);
        self.schedule.apply(&root.id);
        root
    }

    /// Makes a stored key usable. Keys of unknown accounts are skipped (the
    /// store's foreign keys make that impossible short of manual edits).
    pub fn add_key(&self, k: KeyRow) {
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
        self.registry.insert_key(KeyEntry {
            key_id: k.key_id,
            hash: k.hash,
            principal: Principal { root, sub },
        });
    }

    /// Creates the demo account and its public key if they are missing.
    async fn seed_demo(&self) -> Result<(), StoreError> {
        let id = self.config.demo.account.clone();
        if self.registry.root(&id).is_none() {
            // Postpaid, so the demo keeps answering past the free package.
            self.create_account(&id, true).await?;
        }
        if self.registry.authenticate(DEMO_API_KEY).is_none() {
            let row = KeyRow {
                key_id: "key_demo".into(),
                hash: hash_key(DEMO_API_KEY),
                root: id,
                sub: None,
                created_at: self.clock.now(),
            };
            match commit(&*self.store, Write::CreateKey(row.clone())).await {
                Ok(_) => self.add_key(row),
                // Revoked earlier by an operator: stay revoked.
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Runs `tollgate serve` until SIGTERM or SIGINT, then shuts down in order:
/// stop accepting, refuse queued tasks, let in-flight ones finish within the
/// grace period, flush the store.
pub async fn serve(config: Config) -> Result<(), StartError> {
    let stop = CancellationToken::new();
    let backend_url = if config.uses_embedded_simulator() {
        let listener = bind(config.simulator.listen).await?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.simulator.listen,
            source,
        })?;
        let sim = Arc::new(crate::simulator::Simulator::new(config.simulator.clone()));
        tokio::spawn(crate::simulator::serve(sim, listener, stop.clone()));
        tracing::info!(%addr, "built-in simulator started as the backend");
        format!("http://{addr}")
    } else {
        config.backend.url.clone()
    };
    let store = crate::store::open(&config.storage, &config.server.instance).await?;
    let app = App::build(
        config.clone(),
        &backend_url,
        store.clone(),
        Arc::new(SystemClock),
    )
    .await?;
    let export =
        crate::usage::export::spawn(store, &config.storage.data_dir, app.recorder.committed());
    if config.demo_enabled() {
        app.seed_demo().await?;
    }
    let data = bind(config.server.listen).await?;
    let admin = bind(config.admin.listen).await?;
    let data_addr = data.local_addr().ok();
    let admin_addr = admin.local_addr().ok();
    // Machine-readable lines on stdout (logs go to stderr), so scripts and
    // tests can find ports chosen by the OS.
    if let (Some(d), Some(a)) = (data_addr, admin_addr) {
        println!("tollgate: data plane listening on http://{d}");
        println!("tollgate: admin listening on http://{a}");
    }
    tracing::info!(
        data = %data_addr.map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin_addr.map(|a| a.to_string()).unwrap_or_default(),
        accounts = app.registry.root_count(),
        "tollgate serving"
    );

    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    let admin_task = tokio::spawn(crate::admin::serve(app.clone(), admin, stop.clone()));
    tokio::spawn(app.schedule.clone().run(stop.clone()));
    let data_task = tokio::spawn(crate::gateway::serve(
        app.clone(),
        data,
        stop.clone(),
        grace,
    ));

    shutdown_signal().await;
    tracing::info!("shutdown: refusing queued tasks, draining in-flight ones");
    app.stopping.cancel();
    app.limiter.shut_down();
    stop.cancel();
    let _ = data_task.await;
    app.tasks.close();
    if tokio::time::timeout(grace, app.tasks.wait()).await.is_err() {
        tracing::warn!("shutdown: tasks still running after the grace period");
    }
    let _ = admin_task.await;
    export.finish().await;
    let store_for_close = app.store.clone();
    let _ = tokio::task::spawn_blocking(move || store_for_close.close()).await;
    tracing::info!("shutdown complete");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the gateway");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
