//! Wiring: builds the shared state from the config and the store, runs the
//! listeners, and shuts down in order on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jiff::tz::TimeZone;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accounts::{AccountService, ChangeError, Registry, hash_key};
use crate::admin::AdminState;
use crate::billing;
use crate::clock::{Clock, SystemClock};
use crate::cluster::{
    ClusterError, ClusterSettings, Coordinator, RedisLimiter, RedisMarkers, RedisQuota,
};
use crate::config::StorageKind;
use crate::config::{Config, DEMO_API_KEY, LiveConfig};
use crate::entitlements::schedule::Schedule;
use crate::gateway::Gateway;
use crate::gateway::proxy::Backend;
use crate::idempotency::{InProgress, LocalMarkers};
use crate::limiter::{GateReport, Limiter, LocalLimiter};
use crate::metrics::Metrics;
use crate::store::{KeyRow, Store, StoreError};
use crate::usage::UsageRecorder;

/// The composition root: builds the data plane's and the admin API's state
/// (each holds only what it uses, sharing the same services), and keeps
/// what shutdown needs.
pub struct App {
    /// The running config, swapped by [`App::reload`].
    pub config: LiveConfig,
    /// The embedded simulator's URL when it is the backend (a reload keeps
    /// forwarding there).
    simulator_url: Option<String>,
    pub gateway: Arc<Gateway>,
    pub admin: Arc<AdminState>,
    pub accounts: Arc<AccountService>,
    pub schedule: Arc<Schedule>,
    pub limiter: Arc<dyn Limiter>,
    pub store: Arc<dyn Store>,
    pub coordinator: Option<Arc<Coordinator>>,
    /// Cancelled when shutdown begins (readiness turns false).
    pub stopping: CancellationToken,
}

/// The demo key's id in the store.
const DEMO_KEY_ID: &str = "key_demo";

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
    /// Cluster mode: another live replica already runs under this
    /// `server.instance`, or the coordinator cannot be set up.
    #[error("cluster: {0}")]
    Cluster(String),
    #[error(
        "server.instance `{0}` is already used by a live replica; give each replica its own name"
    )]
    InstanceTaken(String),
    /// Another tollgate process holds the data directory.
    #[error(
        "storage.data_dir {0} is in use by another tollgate process; give each instance its own directory"
    )]
    DataDirInUse(String),
    #[error("storage.data_dir {path}: {reason}")]
    DataDir { path: String, reason: String },
    #[error("cannot listen for SIGHUP (config reloads): {0}")]
    Signal(std::io::Error),
    #[error("cannot start the data-plane workers: {0}")]
    Workers(std::io::Error),
}

impl StartError {
    /// 2 for what the operator must fix in the configuration, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::InstanceTaken(_) | Self::DataDirInUse(_) => 2,
            _ => 1,
        }
    }
}

impl App {
    /// Builds the state and loads accounts and keys from the store.
    pub async fn build(
        config: Config,
        backend_url: &str,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, StartError> {
        let metrics = Arc::new(Metrics::new(&config.metrics));
        metrics.set_max_queued_tasks(config.limits.max_queued_tasks);
        let coordinator = if config.cluster.enabled() {
            let settings = ClusterSettings::from_config(&config.cluster, &config.server.instance);
            let coord = Coordinator::start(settings).await.map_err(|e| match e {
                ClusterError::InstanceTaken { instance } => StartError::InstanceTaken(instance),
                e => StartError::Cluster(e.to_string()),
            })?;
            tracing::info!(
                instance = %config.server.instance,
                live_replicas = coord.live_replicas(),
                "joined the cluster"
            );
            Some(coord)
        } else {
            None
        };
        // The cluster's value wins over this replica's file (one limit per
        // account whichever replica a task reaches).
        let default_limit = match &coordinator {
            Some(coord) => coord
                .agree_default_limit(config.limits.default_concurrency)
                .await
                .map_err(|e| StartError::Cluster(e.to_string()))?,
            None => config.limits.default_concurrency,
        };
        let (limiter, gates): (Arc<dyn Limiter>, Arc<dyn GateReport>) = match &coordinator {
            Some(coord) => {
                let shared = Arc::new(RedisLimiter::new(
                    coord.clone(),
                    default_limit,
                    config.limits.max_queue_per_account,
                ));
                (shared.clone(), shared)
            }
            None => {
                let local = Arc::new(LocalLimiter::new(
                    default_limit,
                    config.limits.max_queue_per_account,
                ));
                (local.clone(), local)
            }
        };
        let snapshot = Arc::new(config.clone());
        let backend = Backend::new(&snapshot, backend_url).map_err(StartError::Backend)?;
        let simulator_url = config
            .uses_embedded_simulator()
            .then(|| backend_url.to_string());
        let tz = TimeZone::get(&config.billing.timezone).map_err(|e| {
            StartError::Config(crate::config::ConfigError::Invalid {
                key: "billing.timezone".into(),
                reason: e.to_string(),
            })
        })?;
        let schedule = Arc::new(Schedule::new(default_limit, clock.clone(), limiter.clone()));
        let registry = Arc::new(Registry::new());
        let billing = Arc::new(billing::Accounts::new(config.billing.arrears_grace));
        let accounts = Arc::new(
            AccountService::new(
                store.clone(),
                registry.clone(),
                billing.clone(),
                schedule.clone(),
                limiter.clone(),
                clock.clone(),
                config.storage.kind == StorageKind::Postgres,
            )
            .with_sealer(config.auth.sealer()?),
        );
        let billing_service = billing::BillingService::new(
            store.clone(),
            billing.clone(),
            accounts.clone(),
            schedule.clone(),
            clock.clone(),
            tz.clone(),
        );
        let quota: Arc<dyn billing::Quota> = match &coordinator {
            Some(coord) => Arc::new(
                RedisQuota::new(coord.clone(), billing.clone())
                    .reconciling_with(store.clone(), clock.clone()),
            ),
            None => billing.clone(),
        };
        let markers: Arc<dyn InProgress> = match &coordinator {
            Some(coord) => Arc::new(RedisMarkers::new(coord.clone())),
            None => Arc::new(LocalMarkers::default()),
        };
        drop(config);
        let config: LiveConfig = Arc::new(ArcSwap::new(snapshot));
        let backend = Arc::new(ArcSwap::from_pointee(backend));
        let recorder = UsageRecorder::new(store.clone(), metrics.clone());
        let stopping = CancellationToken::new();
        let jobs: Arc<crate::gateway::jobs::JobBook> = Default::default();
        let gateway = Arc::new(Gateway {
            config: config.clone(),
            clock: clock.clone(),
            tz: tz.clone(),
            registry: registry.clone(),
            limiter: limiter.clone(),
            quota,
            recorder: recorder.clone(),
            backend: backend.clone(),
            metrics: metrics.clone(),
            tasks: TaskTracker::new(),
            buffers: Default::default(),
            waiting: Default::default(),
            markers,
            jobs: jobs.clone(),
        });
        let admin = Arc::new(AdminState {
            config: config.clone(),
            clock,
            tz,
            accounts: accounts.clone(),
            billing_service: Arc::new(billing_service),
            registry,
            billing,
            schedule: schedule.clone(),
            limiter: limiter.clone(),
            gates,
            store: store.clone(),
            metrics,
            recorder,
            backend,
            coordinator: coordinator.clone(),
            stopping: stopping.clone(),
            jobs,
        });
        let app = Self {
            config,
            simulator_url,
            gateway,
            admin,
            accounts,
            schedule,
            limiter,
            store,
            coordinator,
            stopping,
        };
        app.accounts.refresh_all().await?;
        let unopened = app.accounts.unopened_tc3_keys();
        if unopened > 0 {
            return Err(StartError::Config(crate::config::ConfigError::Invalid {
                key: "auth.secret_encryption_key".into(),
                reason: format!(
                    "the store holds {unopened} TC3 key(s) whose secret this key cannot decrypt \
                     (missing or wrong key; give the key they were issued under, or list it in \
                     auth.previous_secret_encryption_keys)"
                ),
            }));
        }
        Ok(Arc::new(app))
    }

    /// Applies a re-read config file (SIGHUP) without dropping a task:
    /// what can fail is built first, so a refused reload changes nothing.
    /// Returns the keys that changed in the file but need a restart (kept
    /// at their running values).
    pub fn reload(
        &self,
        next: Config,
        log: Option<&LogReload>,
    ) -> Result<Vec<&'static str>, String> {
        let current = self.config.load_full();
        let (next, kept) = current.reload_into(next);
        if next == *current {
            return Ok(kept);
        }
        let next = Arc::new(next);
        // Always a new backend, built from this snapshot: a task reads its
        // answer rules from the backend it forwards through, so the two
        // never disagree mid-reload. The connection pool is kept when the
        // backend's own keys did not change.
        let url = self.simulator_url.as_deref().unwrap_or(&next.backend.url);
        let fresh = Backend::new(&next, url).map_err(|e| format!("backend: {e}"))?;
        if next.log != current.log
            && let Some(set_filter) = log
        {
            set_filter(&next.log)?;
        }
        if next.metrics != current.metrics {
            self.gateway.metrics.set_buckets(&next.metrics)?;
        }
        let running = self.gateway.backend.load_full();
        let keep_pool = next.backend == current.backend;
        // In-flight tasks keep the backend they started with.
        self.gateway
            .backend
            .store(Arc::new(running.succeeded_by(fresh, keep_pool)));
        self.limiter
            .set_max_queue(next.limits.max_queue_per_account);
        let default_limit = next.limits.default_concurrency;
        if default_limit != current.limits.default_concurrency {
            match &self.coordinator {
                // Every replica applies it when it reaches Redis.
                Some(coord) => coord.publish_default_limit(default_limit),
                None => self.apply_default_limit(default_limit),
            }
        }
        self.gateway
            .metrics
            .set_max_queued_tasks(next.limits.max_queued_tasks);
        self.config.store(next);
        Ok(kept)
    }

    /// A new `limits.default_concurrency` in force: every account's limit
    /// is the new default plus its packages at once (queued tasks may
    /// start).
    pub fn apply_default_limit(&self, limit: u32) {
        let mut in_use = Vec::new();
        self.admin
            .gates
            .for_each_gate(&mut |account, _| in_use.push(account.to_string()));
        self.schedule.set_base(limit, in_use);
    }

    /// With the demo off, the public demo key must not authenticate: a data
    /// directory first used by the demo (`tollgate serve`, no config) and
    /// then by a real backend would otherwise forward anyone holding the
    /// README's key. Revoked in the store, so it stays revoked.
    async fn retire_demo_key(&self) -> Result<(), StoreError> {
        let Some(k) = self.admin.registry.key(DEMO_KEY_ID) else {
            return Ok(());
        };
        if k.hash != hash_key(DEMO_API_KEY) {
            return Ok(());
        }
        match self.accounts.revoke_key(DEMO_KEY_ID).await {
            Ok(()) => {
                tracing::warn!(
                    key_id = DEMO_KEY_ID,
                    "the demo is off: the public demo key was revoked and no longer authenticates"
                );
                Ok(())
            }
            Err(ChangeError::Store(e)) => Err(e),
            // Revoked meanwhile by another replica.
            Err(_) => Ok(()),
        }
    }

    /// Creates the demo account and its public key if they are missing.
    async fn seed_demo(&self) -> Result<(), StoreError> {
        let id = self.config.load().demo.account.clone();
        if self.admin.registry.root(&id).is_none() {
            // Postpaid, so the demo keeps answering past the free package.
            match self.accounts.create_account(&id, true).await {
                Ok(_) => {}
                Err(ChangeError::Store(e)) => return Err(e),
                // Made meanwhile by another replica.
                Err(_) => {}
            }
        }
        if self.admin.registry.authenticate(DEMO_API_KEY).is_none() {
            let row = KeyRow {
                key_id: DEMO_KEY_ID.into(),
                hash: hash_key(DEMO_API_KEY),
                root: id,
                sub: None,
                created_at: self.admin.clock.now(),
                sealed_secret: None,
            };
            match self.accounts.add_known_key(row).await {
                // Revoked earlier by an operator: stay revoked.
                Ok(()) | Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The data plane's listening sockets, one per worker (`server.workers`),
/// all on `addr`: with more than one, each has `SO_REUSEPORT` and the
/// kernel spreads new connections over them.
fn bind_data(addr: SocketAddr, workers: usize) -> Result<Vec<std::net::TcpListener>, StartError> {
    use socket2::{Domain, Socket, Type};
    let failed = |source| StartError::Bind { addr, source };
    let socket = |addr: SocketAddr, reuse_port: bool, listen: bool| {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        if reuse_port {
            s.set_reuse_port(true)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        if listen {
            s.listen(1024)?;
        }
        std::io::Result::Ok(std::net::TcpListener::from(s))
    };
    if workers <= 1 {
        return Ok(vec![socket(addr, false, true).map_err(failed)?]);
    }
    // Another process that sets SO_REUSEPORT too (a second gateway started
    // by mistake) could share the port without a word: a plain bind first
    // fails if anyone listens there.
    if addr.port() != 0 {
        drop(socket(addr, false, false).map_err(failed)?);
    }
    let first = socket(addr, true, true).map_err(failed)?;
    let bound = first.local_addr().map_err(failed)?;
    let mut all = vec![first];
    for _ in 1..workers {
        all.push(socket(bound, true, true).map_err(failed)?);
    }
    Ok(all)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Applies a reloaded `[log]` section's filter (`log.level`, `log.access`).
pub type LogReload = Box<dyn Fn(&crate::config::LogConfig) -> Result<(), String> + Send + Sync>;

/// What SIGHUP re-reads and where it applies the log filter.
pub struct Reloads {
    /// `--config`; `None` re-applies the defaults and the environment.
    pub path: Option<PathBuf>,
    pub log: Option<LogReload>,
}

/// Runs `tollgate serve` until SIGTERM or SIGINT (see [`run`]); SIGHUP
/// reloads the config file.
pub async fn serve(config: Config, reloads: Reloads) -> Result<(), StartError> {
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.cancel();
    });
    // Caught from here on: HUP's default action would end the process.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(StartError::Signal)?;
    run_with(config, shutdown, Some((hangups, reloads))).await
}

/// Re-reads the config on each SIGHUP until `stop`; a file that does not
/// load is refused with its reason and the running config kept.
async fn reload_on_hangup(
    app: Arc<App>,
    mut hangups: tokio::signal::unix::Signal,
    reloads: Reloads,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            got = hangups.recv() => if got.is_none() { return },
        }
        let file = reloads.path.as_ref().map_or_else(
            || "(no file: defaults and environment)".to_string(),
            |p| p.display().to_string(),
        );
        let env: Vec<(String, String)> = std::env::vars().collect();
        let next = match Config::load(reloads.path.as_deref(), env.clone()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(file, error = %e, "reload refused: the running configuration is kept");
                continue;
            }
        };
        match app.reload(next, reloads.log.as_ref()) {
            Ok(kept) => {
                if !kept.is_empty() {
                    tracing::warn!(
                        file,
                        needs_restart = kept.join(", "),
                        "reload: these keys changed but take effect only at restart; their running values are kept"
                    );
                }
                let from_env = set_by_environment(env);
                if from_env.is_empty() {
                    tracing::info!(file, "configuration reloaded");
                } else {
                    tracing::info!(
                        file,
                        set_by_environment = from_env,
                        "configuration reloaded; environment variables win over the file for the keys they set"
                    );
                }
            }
            Err(e) => {
                tracing::error!(file, error = %e, "reload refused: the running configuration is kept");
            }
        }
    }
}

/// The keys the environment sets, for a reload's log line: editing them
/// in the file changes nothing (`limits.max_queue_per_account is set by
/// TOLLGATE_LIMITS_MAX_QUEUE_PER_ACCOUNT; the file's value is not used`).
/// `RUST_LOG` stands in for `log.level`. Names only, never a value.
fn set_by_environment(env: Vec<(String, String)>) -> String {
    let rust_log = env.iter().any(|(k, v)| k == "RUST_LOG" && !v.is_empty());
    let mut keys = crate::config::keys_set_by_env(env);
    if rust_log {
        keys.retain(|(k, _)| k != "log.level");
        keys.push(("log.level".into(), "RUST_LOG".into()));
    }
    keys.iter()
        .map(|(key, var)| format!("{key} is set by {var}; the file's value is not used"))
        .collect::<Vec<_>>()
        .join(". ")
}

/// Runs a whole gateway until `shutdown` is cancelled, then shuts down in
/// order: stop accepting, refuse queued tasks, let in-flight ones finish
/// within the grace period, flush the store. Tests run gateways in process
/// through this.
/// Holds `<data_dir>/tollgate.lock` (an advisory `flock`) for as long as
/// the returned file lives: a second process on the same directory would
/// enforce its own limits and keep its own counters, diverging silently.
/// The kernel lets go of the lock when the process dies, `kill -9` too.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    let failed = |reason: String| StartError::DataDir {
        path: dir.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| failed(format!("cannot create it: {e}")))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("tollgate.lock"))
        .map_err(|e| failed(format!("cannot open its lock file: {e}")))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(StartError::DataDirInUse(dir.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(failed(format!("cannot lock it: {e}"))),
    }
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    run_with(config, shutdown, None).await
}

async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    reloads: Option<(tokio::signal::unix::Signal, Reloads)>,
) -> Result<(), StartError> {
    let stop = CancellationToken::new();
    // The directory and the ports first: a start that cannot have them
    // fails before the store is opened (and repaired) at all.
    let _data_dir_lock = lock_data_dir(&config.storage.data_dir)?;
    let data = bind_data(config.server.listen, config.server.worker_count())?;
    let admin = bind(config.admin.listen).await?;
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
    let export = crate::usage::export::spawn(
        store,
        &config.storage.data_dir,
        app.gateway.recorder.committed(),
    );
    if config.demo_enabled() {
        app.seed_demo().await?;
    } else {
        app.retire_demo_key().await?;
    }
    let data_addr = data.first().and_then(|l| l.local_addr().ok());
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
        accounts = app.admin.registry.root_count(),
        "tollgate serving"
    );
    if config.admin.token.is_empty() {
        tracing::warn!(
            "the admin API is disabled: admin.token is empty, so every /v1/ call is refused \
             (metrics and health stay open); set TOLLGATE_ADMIN_TOKEN to enable it"
        );
    }

    if let Some((hangups, reloads)) = reloads {
        tokio::spawn(reload_on_hangup(
            app.clone(),
            hangups,
            reloads,
            stop.clone(),
        ));
    }
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    let admin_task = tokio::spawn(crate::admin::serve(app.admin.clone(), admin, stop.clone()));
    tokio::spawn(app.schedule.clone().run(stop.clone()));
    if let Some(coord) = &app.coordinator {
        tokio::spawn(follow_default_limit(
            app.clone(),
            coord.default_limit_changes(),
            stop.clone(),
        ));
    }
    tokio::spawn(crate::idempotency::purge::run(
        app.store.clone(),
        app.gateway.clock.clone(),
        stop.clone(),
    ));
    // Jobs left unfinished by the last run (or, in cluster mode, by a
    // replica that died: its claims lapse with its lease).
    let rescan = app.coordinator.as_ref().map(|c| {
        let c = c.clone();
        crate::gateway::jobs::Rescan {
            every: Duration::from_millis(c.lease_ms()),
            live_replicas: Box::new(move || c.live_replicas()),
        }
    });
    tokio::spawn(crate::gateway::jobs::resume(
        app.gateway.clone(),
        rescan,
        stop.clone(),
    ));
    if config.events.stream == crate::config::EventStream::Nats {
        let publisher = crate::usage::stream::Publisher {
            config: config.events.clone(),
            store: app.store.clone(),
            metrics: app.gateway.metrics.stream.clone(),
            committed: app.gateway.recorder.streamed(),
            claims: app.gateway.markers.clone(),
        };
        tokio::spawn(publisher.run(stop.clone()));
    }
    tokio::spawn(crate::gateway::jobs::purge(
        app.gateway.clone(),
        stop.clone(),
    ));
    if config.storage.kind == StorageKind::Postgres {
        // Other replicas change the shared store: follow them. A single
        // node's memory is changed by its own admin calls only, after
        // each commit; re-reading its own changes could only race them.
        tokio::spawn(app.accounts.clone().follow_changes(stop.clone()));
    }
    let mut workers = crate::gateway::Workers::spawn(&app.gateway, data, &stop, grace)
        .map_err(StartError::Workers)?;

    shutdown.cancelled().await;
    tracing::info!("shutdown: refusing queued tasks, draining in-flight ones");
    app.stopping.cancel();
    app.limiter.shut_down();
    stop.cancel();
    workers.served().await;
    app.gateway.tasks.close();
    if tokio::time::timeout(grace, app.gateway.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("shutdown: tasks still running after the grace period");
    }
    let _ = admin_task.await;
    if let Some(coord) = &app.coordinator {
        // Gives back what this replica holds and leaves the registry, so a
        // restart under the same name need not wait for the leases.
        coord.close().await;
    }
    export.finish().await;
    let store_for_close = app.store.clone();
    let _ = tokio::task::spawn_blocking(move || store_for_close.close()).await;
    // Last: the workers' runtimes may drive store and Redis connections
    // (opened by a request there) that the steps above used.
    workers.finish().await;
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

/// Applies the cluster's `limits.default_concurrency` whenever it changes
/// (a reload of any replica), until `stop`.
async fn follow_default_limit(
    app: Arc<App>,
    mut changes: tokio::sync::watch::Receiver<u32>,
    stop: CancellationToken,
) {
    let mut applied = *changes.borrow_and_update();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        let limit = *changes.borrow_and_update();
        if limit != applied && limit > 0 {
            app.apply_default_limit(limit);
            applied = limit;
        }
    }
}
