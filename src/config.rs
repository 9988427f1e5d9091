//! Typed configuration: defaults, the TOML file, `TOLLGATE_<SECTION>_<KEY>`
//! environment overrides, and validation that names the offending key.
//!
//! Every key has a default, so `tollgate serve` with no file runs the demo:
//! the built-in simulator as backend and a demo account with a demo key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The demo key seeded when `demo.enabled` is true. Public on purpose: it is
/// in the README so a newcomer can `curl` at once. Turn the demo off in any
/// real deployment.
pub const DEMO_API_KEY: &str = "tg_demo_key_do_not_use_in_production";
pub const DEFAULT_CONCURRENCY: u32 = 3;

/// Config sections, as used in env override names.
const SECTIONS: &[&str] = &[
    "server",
    "admin",
    "backend",
    "limits",
    "storage",
    "billing",
    "metrics",
    "log",
    "simulator",
    "demo",
    "cluster",
    "auth",
    "idempotency",
    "jobs",
    "events",
];

/// The config the running gateway reads, swapped whole by a reload.
pub type LiveConfig = std::sync::Arc<arc_swap::ArcSwap<Config>>;

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub backend: BackendConfig,
    pub limits: LimitsConfig,
    pub storage: StorageConfig,
    pub billing: BillingConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub simulator: SimulatorConfig,
    pub demo: DemoConfig,
    pub cluster: ClusterConfig,
    pub auth: AuthConfig,
    pub idempotency: IdempotencyConfig,
    pub jobs: JobsConfig,
    pub events: EventsConfig,
}

/// Idempotency keys (SPEC §10.1). Both keys change live on a reload (new
/// keys take the new values).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a key's first success is remembered.
    #[serde(deserialize_with = "human_duration")]
    pub ttl: Duration,
    /// Answers larger than this are not kept: a retry then gets `409
    /// FailedOperation.IdempotentAnswerNotStored`.
    pub max_stored_answer_bytes: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 3600),
            max_stored_answer_bytes: 1 << 20,
        }
    }
}

/// Jobs (SPEC §10.2): submit a task, get its id at once, fetch the result
/// later. Every key changes live on a reload (new submits, and queued jobs'
/// expiry, take the new values) but `path_prefix`, which needs a restart.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsConfig {
    /// Bearer front: `POST <path_prefix>/<backend path>` submits,
    /// `GET`/`DELETE <path_prefix>/<job id>` query and cancel. Never
    /// forwarded.
    pub path_prefix: String,
    /// Largest body a submit may carry (kept in the store until it runs).
    pub max_body_bytes: u64,
    /// Unfinished (queued or running) jobs per root account; past it a
    /// submit is `429 RequestLimitExceeded.JobNumExceed`.
    pub max_pending_per_account: u32,
    /// A job still queued this long after its submit ends `expired`,
    /// uncharged.
    #[serde(deserialize_with = "human_duration")]
    pub max_wait: Duration,
    /// How long a finished job (and its result) is kept, then purged.
    #[serde(deserialize_with = "human_duration")]
    pub result_ttl: Duration,
    /// A success's answer larger than this is not kept: the job still
    /// succeeds (and is charged); its query says the result was too large.
    pub max_result_bytes: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            path_prefix: "/tollgate/jobs".into(),
            max_body_bytes: 10 << 20,
            max_pending_per_account: 1000,
            max_wait: Duration::from_secs(24 * 3600),
            result_ttl: Duration::from_secs(24 * 3600),
            max_result_bytes: 10 << 20,
        }
    }
}

/// Where usage events go besides the store and its JSON Lines export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EventStream {
    #[default]
    None,
    Nats,
}

/// Usage events on a stream (NATS JetStream). Restart only.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// `"none"` or `"nats"`.
    pub stream: EventStream,
    /// `nats://host:port` (user and password may be in it: never logged).
    pub nats_url: String,
    /// A NATS credentials (`.creds`) file, if the server wants one.
    pub creds_file: String,
    /// Events are published on `<subject>.<root account>`.
    pub subject: String,
    /// The JetStream stream, created (over `<subject>.>`) if missing.
    pub stream_name: String,
    /// How long the stream keeps an event (when created by tollgate).
    #[serde(deserialize_with = "human_duration")]
    pub max_age: Duration,
    /// JetStream's duplicate window (when created by tollgate): a
    /// re-publish of one event id within it is dropped.
    #[serde(deserialize_with = "human_duration")]
    pub duplicate_window: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            stream: EventStream::None,
            nats_url: "nats://127.0.0.1:4222".into(),
            creds_file: String::new(),
            subject: "tollgate.usage".into(),
            stream_name: "TOLLGATE_USAGE".into(),
            max_age: Duration::from_secs(7 * 86_400),
            duplicate_window: Duration::from_secs(3600),
        }
    }
}

impl std::fmt::Debug for EventsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsConfig")
            .field("stream", &self.stream)
            .field("nats_url", &"<set>")
            .field("creds_file", &self.creds_file)
            .field("subject", &self.subject)
            .field("stream_name", &self.stream_name)
            .finish()
    }
}

/// The API 3.0 (TC3-HMAC-SHA256) front (SPEC §9).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// 64 hex digits (`openssl rand -hex 32`) that seal TC3 secret keys at
    /// rest; best given as `TOLLGATE_AUTH_SECRET_ENCRYPTION_KEY`. Without
    /// it TC3 keys cannot be issued.
    pub secret_encryption_key: String,
    /// Earlier keys, still able to open the secrets they sealed (rotation).
    pub previous_secret_encryption_keys: Vec<String>,
    /// How far `X-TC-Timestamp` may be from the gateway's clock.
    pub max_clock_skew_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            secret_encryption_key: String::new(),
            previous_secret_encryption_keys: Vec::new(),
            max_clock_skew_ms: 300_000,
        }
    }
}

// Never prints the keys.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "secret_encryption_key",
                &(!self.secret_encryption_key.is_empty()).then_some("<set>"),
            )
            .field(
                "previous_secret_encryption_keys",
                &self.previous_secret_encryption_keys.len(),
            )
            .field("max_clock_skew_ms", &self.max_clock_skew_ms)
            .finish()
    }
}

impl AuthConfig {
    /// The sealer the keys make (validated at load, so this cannot fail
    /// on a loaded config).
    pub fn sealer(&self) -> Result<crate::auth::sealed::Sealer, ConfigError> {
        use crate::auth::sealed::{Sealer, SealingKey};
        let current = if self.secret_encryption_key.is_empty() {
            None
        } else {
            Some(
                SealingKey::parse(&self.secret_encryption_key)
                    .map_err(|r| invalid("auth.secret_encryption_key", r))?,
            )
        };
        let previous = self
            .previous_secret_encryption_keys
            .iter()
            .map(|k| {
                SealingKey::parse(k).map_err(|r| invalid("auth.previous_secret_encryption_keys", r))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Sealer::new(current, previous))
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// The data-plane listener: every request on it is a task.
    pub listen: SocketAddr,
    /// Names this gateway in usage events: `source = "tollgate/<instance>"`.
    pub instance: String,
    /// On SIGTERM, how long in-flight tasks may run before the gateway exits
    /// anyway (their events, if they succeed in time, are still recorded).
    pub shutdown_grace_ms: u64,
    /// Open data-plane connections at most (each queued task holds one);
    /// past it a new connection is closed at once and counted in
    /// `tollgate_connections_refused_total{listener="data"}`.
    pub max_connections: usize,
    /// A connection that has not sent a complete request head within this
    /// time is closed: a new silent one, one idle between keep-alive
    /// requests, or one sending its headers too slowly.
    pub idle_timeout_ms: u64,
    /// Data-plane workers, each a runtime of one thread with its own
    /// listening socket on `listen` (`SO_REUSEPORT`: the kernel spreads
    /// new connections over them) and its own idle backend connections.
    /// 0: one per core the process may run on.
    pub workers: usize,
}

impl ServerConfig {
    /// `workers`, with 0 read as the cores this process may run on.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid literal"),
            instance: "local".into(),
            shutdown_grace_ms: 30_000,
            max_connections: 10_000,
            idle_timeout_ms: 30_000,
            workers: 0,
        }
    }
}

#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token for `/v1/`. Empty: the `/v1/` API refuses every call
    /// (metrics and health stay open).
    pub token: String,
    /// Open admin connections at most, kept apart from the data plane's so
    /// neither can starve the other.
    pub max_connections: usize,
    /// As `server.idle_timeout_ms`, for the admin listener.
    pub idle_timeout_ms: u64,
}

// Hand-written so the token can never reach a log line through `{:?}`.
impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("max_connections", &self.max_connections)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field(
                "token",
                &if self.token.is_empty() {
                    "<unset>"
                } else {
                    "<redacted>"
                },
            )
            .finish()
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".parse().expect("valid literal"),
            token: String::new(),
            max_connections: 64,
            idle_timeout_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SuccessMode {
    /// Any 2xx answer is a success.
    Status,
    /// A 2xx answer whose JSON body has no `Response.Error`.
    TencentJson,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// `http://host:port[/prefix]`. Empty: start the built-in simulator
    /// in-process and use it.
    pub url: String,
    pub timeout_ms: u64,
    pub success: SuccessMode,
    /// Backend answers are read whole before they are classified and
    /// released; this bounds that buffer.
    pub max_response_bytes: usize,
    /// All answers being read at once together (each already bounded by
    /// `max_response_bytes`); past it a task fails uncharged (503).
    pub max_buffered_response_bytes: u64,
    /// The `data.api` of usage events.
    pub api_name: String,
    /// Idle keep-alive connections kept to the backend.
    pub pool_max_idle: usize,
    /// The HTTP methods that make a task; any other is refused (405)
    /// before anything is reserved. CONNECT, TRACE and OPTIONS are never
    /// tasks.
    pub methods: Vec<String>,
    /// API 3.0: the service a TC3 credential must name.
    pub service: String,
    /// API 3.0: the `X-TC-Action`s accepted; the action is the event's `api`.
    pub actions: Vec<String>,
    /// API 3.0: the `X-TC-Version` accepted.
    pub api_version: String,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout_ms: 120_000,
            success: SuccessMode::Status,
            max_response_bytes: 64 << 20,
            max_buffered_response_bytes: 512 << 20,
            api_name: "ImageStyleTransfer".into(),
            pool_max_idle: 1024,
            methods: vec!["POST".into(), "GET".into()],
            service: "aiart".into(),
            actions: vec!["ImageToImage".into()],
            api_version: "2022-12-29".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub default_concurrency: u32,
    pub max_queue_per_account: usize,
    pub max_queue_wait_ms: u64,
    pub max_body_bytes: u64,
    /// API 3.0 bodies are read (and their signature verified) before a
    /// task queues: all bodies held at once together stay under this.
    pub max_buffered_bytes: u64,
    /// Tasks waiting for a slot across all accounts; past it a task is
    /// refused (503 `RequestLimitExceeded`) instead of queued.
    pub max_queued_tasks: u64,
    /// Once a task is forwarded, the longest pause allowed in its request
    /// body: a client that stalls its upload cannot pin a slot.
    pub body_idle_timeout_ms: u64,
    /// The slowest average a request body may arrive at, enforced once the
    /// first `body_idle_timeout_ms` has passed (0: off).
    pub min_body_rate_bytes_per_s: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            default_concurrency: DEFAULT_CONCURRENCY,
            max_queue_per_account: 100,
            max_queue_wait_ms: 60_000,
            max_body_bytes: 10 << 20,
            max_buffered_bytes: 256 << 20,
            max_queued_tasks: 10_000,
            body_idle_timeout_ms: 10_000,
            min_body_rate_bytes_per_s: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Local files: the SQLite database, the JSON Lines export, and (with
    /// PostgreSQL) the spool of usage events awaiting an outage's end.
    pub data_dir: PathBuf,
    pub kind: StorageKind,
    /// `postgres://user[:password]@host[:port]/db`; required by `kind =
    /// "postgres"`. Never logged with its password.
    pub postgres_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// One node, embedded.
    #[default]
    Sqlite,
    /// Many replicas sharing one database (SPEC §8).
    Postgres,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            kind: StorageKind::Sqlite,
            postgres_url: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingConfig {
    pub timezone: String,
    #[serde(deserialize_with = "human_duration")]
    pub arrears_grace: Duration,
    /// The largest balance a top-up may leave (USD, a decimal string like
    /// every amount of money): a top-up past it is refused, unchanged.
    #[serde(deserialize_with = "usd_amount")]
    pub max_balance_usd: rust_decimal::Decimal,
}

/// `billing.max_balance_usd` unless set: the largest single top-up.
pub const DEFAULT_MAX_BALANCE_USD: &str = "1000000000";
/// The largest `billing.max_balance_usd` accepted (far from where a
/// balance's arithmetic could overflow).
pub const MAX_MAX_BALANCE_USD: &str = "1000000000000000";

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            timezone: "UTC".into(),
            arrears_grace: Duration::from_secs(24 * 3600),
            max_balance_usd: DEFAULT_MAX_BALANCE_USD.parse().expect("a decimal"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Label gauges by account. Turn off for large fleets: the gauges are
    /// then totals over all accounts.
    pub per_account_labels: bool,
    /// Bucket bounds (seconds) of the task and upstream duration
    /// histograms: dense between 0.5 s and 5 s, where an AI backend's
    /// answers fall.
    pub duration_buckets: Vec<f64>,
    /// Bucket bounds (seconds) of the queue-wait histogram.
    pub queue_wait_buckets: Vec<f64>,
}

pub const DEFAULT_DURATION_BUCKETS: [f64; 24] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0,
    7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
];
pub const DEFAULT_QUEUE_WAIT_BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 20.0, 30.0,
    60.0,
];

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            per_account_labels: true,
            duration_buckets: DEFAULT_DURATION_BUCKETS.to_vec(),
            queue_wait_buckets: DEFAULT_QUEUE_WAIT_BUCKETS.to_vec(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A level (`info`) or tracing-subscriber directives
    /// (`info,tollgate=debug`); a bare word that is not a level is refused
    /// ([`check_log_level`]).
    pub level: String,
    /// One line per task (target `tollgate::access`, in `format`), whatever
    /// `level` says.
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            access: true,
        }
    }
}

impl LogConfig {
    /// The filter the subscriber runs: `level`, plus the access log at
    /// info when it is on.
    pub fn filter(&self) -> String {
        if self.access {
            format!("{},{}=info", self.level, crate::gateway::access_log::TARGET)
        } else {
            format!("{},{}=off", self.level, crate::gateway::access_log::TARGET)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatorConfig {
    pub listen: SocketAddr,
    /// Mean latency of an answer.
    pub latency_ms: u64,
    /// Uniform jitter around the mean: latency is in `mean ± jitter`.
    pub latency_jitter_ms: u64,
    /// Share of requests answered with a 500 (0.0 to 1.0).
    pub failure_rate: f64,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("valid literal"),
            latency_ms: 800,
            latency_jitter_ms: 400,
            failure_rate: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// Seed a demo account and the public demo key at start. Unset: only
    /// when the built-in simulator is the backend, so a deployment with a
    /// real backend never accepts the public key unless told to.
    pub enabled: Option<bool>,
    pub account: String,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            enabled: None,
            account: "demo".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisOutagePolicy {
    /// Keep serving: each replica limits every account on its own to
    /// `max(1, floor(limit / live replicas))`.
    Local,
    /// Refuse new tasks with `503 FailedOperation.CoordinationUnavailable`.
    Reject,
}

/// Cluster mode (SPEC §8): replicas share slots, queues and quota
/// reservations through Redis.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://host:port/db`. Empty: single node, nothing shared.
    pub redis_url: String,
    /// Prefix of every Redis key, so several clusters can share one Redis.
    pub key_prefix: String,
    /// A dead replica's slots, tickets and reservations return within this.
    pub lease_ms: u64,
    pub on_redis_outage: RedisOutagePolicy,
}

// Hand-written so a password in the Redis URL never reaches a log line.
impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("key_prefix", &self.key_prefix)
            .field("lease_ms", &self.lease_ms)
            .field("on_redis_outage", &self.on_redis_outage)
            .finish()
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            key_prefix: "tollgate".into(),
            lease_ms: 10_000,
            on_redis_outage: RedisOutagePolicy::Local,
        }
    }
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.redis_url.is_empty()
    }
}

/// A URL with any password replaced, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    // scheme://user:password@host... → scheme://user:***@host...
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// A config that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Parse(String),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("environment variable `{var}` (config key `{key}`): {reason}")]
    FromEnv {
        var: String,
        key: String,
        reason: String,
    },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn human_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{text}` is not a duration such as \"24h\", \"90s\" or \"150ms\": {e}"
        ))
    })
}

/// A USD amount written as a string: `^[0-9]+(\.[0-9]{1,2})?$`, as the
/// admin API takes money (no float, sign, exponent or spaces).
fn usd_amount<'de, D: Deserializer<'de>>(d: D) -> Result<rust_decimal::Decimal, D::Error> {
    let text = String::deserialize(d)?;
    let (whole, cents) = match text.split_once('.') {
        Some((w, c)) => (w, Some(c)),
        None => (text.as_str(), None),
    };
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let well_formed = digits(whole) && cents.is_none_or(|c| digits(c) && c.len() <= 2);
    well_formed
        .then(|| text.parse().ok())
        .flatten()
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{text}` is not a USD amount such as \"1000000000\" or \"250.50\" (a string of digits, at most 2 decimals)"
            ))
        })
}

impl Config {
    /// Loads the file (if any), applies `TOLLGATE_*` variables from `env`,
    /// and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        Self::from_toml_and_env(&text, env)
    }

    pub fn from_toml_and_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(toml_error(&e, text)))?;
        // Key → the variable that set it, so an error names what to fix.
        let mut from_env: Vec<(String, String)> = Vec::new();
        for (name, value) in env {
            if let Some(key) = apply_env_override(&mut table, &name, &value)? {
                from_env.push((key, name));
            }
        }
        let name_variable = |e: ConfigError| match e {
            ConfigError::Invalid { key, reason } => {
                match from_env.iter().find(|(k, _)| *k == key) {
                    Some((_, var)) => ConfigError::FromEnv {
                        var: var.clone(),
                        key,
                        reason,
                    },
                    None => ConfigError::Invalid { key, reason },
                }
            }
            e => e,
        };
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let key = e.path().to_string();
                let reason = without_secret(&key, e.inner().message());
                ConfigError::Invalid { key, reason }
            })
            .map_err(name_variable)?;
        config.validate().map_err(name_variable)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.server.instance.is_empty() {
            return Err(invalid("server.instance", "must not be empty"));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(365 * 86_400))
            .contains(&self.idempotency.ttl)
        {
            return Err(invalid(
                "idempotency.ttl",
                "must be between 1s and 365 days",
            ));
        }
        if self.events.stream == EventStream::Nats {
            let url = &self.events.nats_url;
            let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|p| url.starts_with(p) && url.len() > p.len());
            if !scheme_ok || url.contains(char::is_whitespace) {
                return Err(invalid(
                    "events.nats_url",
                    "must be a NATS URL such as \"nats://127.0.0.1:4222\"",
                ));
            }
            let subject = &self.events.subject;
            if subject.is_empty()
                || subject.starts_with('.')
                || subject.ends_with('.')
                || subject.contains("..")
                || !subject
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(invalid(
                    "events.subject",
                    "must be a NATS subject such as \"tollgate.usage\" (letters, digits, . _ -, no wildcards)",
                ));
            }
            let name = &self.events.stream_name;
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
            {
                return Err(invalid(
                    "events.stream_name",
                    "must be letters, digits, _ and - (a JetStream stream name)",
                ));
            }
            if self.events.duplicate_window < Duration::from_secs(1)
                || self.events.duplicate_window > self.events.max_age
            {
                return Err(invalid(
                    "events.duplicate_window",
                    "must be at least 1s and at most events.max_age",
                ));
            }
            if !self.events.creds_file.is_empty()
                && !std::path::Path::new(&self.events.creds_file).is_file()
            {
                return Err(invalid("events.creds_file", "is not a readable file"));
            }
        }
        let prefix = &self.jobs.path_prefix;
        if prefix.len() < 2
            || !prefix.starts_with('/')
            || prefix.ends_with('/')
            || prefix.contains("//")
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b))
            || prefix.split('/').any(|seg| seg == "." || seg == "..")
        {
            return Err(invalid(
                "jobs.path_prefix",
                "must be a path such as \"/tollgate/jobs\": a leading /, no trailing /, letters, digits and -_.~ only",
            ));
        }
        for (key, value) in [
            ("jobs.max_wait", self.jobs.max_wait),
            ("jobs.result_ttl", self.jobs.result_ttl),
        ] {
            if !(Duration::from_secs(1)..=Duration::from_secs(365 * 86_400)).contains(&value) {
                return Err(invalid(key, "must be between 1s and 365 days"));
            }
        }
        for (key, value) in [
            ("jobs.max_body_bytes", self.jobs.max_body_bytes),
            ("jobs.max_result_bytes", self.jobs.max_result_bytes),
        ] {
            if value == 0 || value > 256 << 20 {
                return Err(invalid(key, "must be between 1 and 268435456 (256 MiB)"));
            }
        }
        if self.jobs.max_pending_per_account == 0 || self.jobs.max_pending_per_account > 1_000_000 {
            return Err(invalid(
                "jobs.max_pending_per_account",
                "must be between 1 and 1000000",
            ));
        }
        if self.idempotency.max_stored_answer_bytes > 64 << 20 {
            return Err(invalid(
                "idempotency.max_stored_answer_bytes",
                "must be at most 67108864 (64 MiB)",
            ));
        }
        if self.server.workers > 1024 {
            return Err(invalid(
                "server.workers",
                "must be between 0 (one per core) and 1024",
            ));
        }
        for (key, value) in [
            ("server.max_connections", self.server.max_connections),
            ("admin.max_connections", self.admin.max_connections),
        ] {
            if value == 0 || value > 1_000_000 {
                return Err(invalid(key, "must be between 1 and 1000000"));
            }
        }
        for (key, value) in [
            ("server.idle_timeout_ms", self.server.idle_timeout_ms),
            ("admin.idle_timeout_ms", self.admin.idle_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&value) {
                return Err(invalid(key, "must be between 100 and 3600000"));
            }
        }
        if !self.admin.token.is_empty() && self.admin.token.len() < 16 {
            return Err(invalid(
                "admin.token",
                "must be at least 16 characters (or empty to disable the admin API)",
            ));
        }
        if !self.backend.url.is_empty() {
            BackendUrl::parse(&self.backend.url).map_err(|r| invalid("backend.url", r))?;
        }
        check_log_level(&self.log.level).map_err(|reason| invalid("log.level", reason))?;
        for (key, bounds) in [
            ("metrics.duration_buckets", &self.metrics.duration_buckets),
            (
                "metrics.queue_wait_buckets",
                &self.metrics.queue_wait_buckets,
            ),
        ] {
            check_buckets(bounds).map_err(|reason| invalid(key, reason))?;
        }
        self.auth.sealer()?;
        if !(1_000..=86_400_000).contains(&self.auth.max_clock_skew_ms) {
            return Err(invalid(
                "auth.max_clock_skew_ms",
                "must be between 1000 and 86400000",
            ));
        }
        if self.backend.actions.is_empty() || self.backend.actions.iter().any(|a| a.is_empty()) {
            return Err(invalid("backend.actions", "must name at least one action"));
        }
        if self.backend.service.is_empty() || self.backend.api_version.is_empty() {
            return Err(invalid(
                "backend.service",
                "backend.service and backend.api_version must not be empty",
            ));
        }
        if self.limits.max_buffered_bytes < self.limits.max_body_bytes {
            return Err(invalid(
                "limits.max_buffered_bytes",
                "must be at least limits.max_body_bytes",
            ));
        }
        if self.backend.methods.is_empty() {
            return Err(invalid("backend.methods", "must name at least one method"));
        }
        for m in &self.backend.methods {
            let ok = matches!(
                m.as_str(),
                "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD"
            );
            if !ok {
                return Err(invalid(
                    "backend.methods",
                    format!("`{m}` is not one of GET, POST, PUT, PATCH, DELETE, HEAD"),
                ));
            }
        }
        if self.backend.timeout_ms == 0 {
            return Err(invalid("backend.timeout_ms", "must be at least 1"));
        }
        if (self.backend.max_buffered_response_bytes as u128)
            < self.backend.max_response_bytes as u128
        {
            return Err(invalid(
                "backend.max_buffered_response_bytes",
                "must be at least backend.max_response_bytes",
            ));
        }
        if self.backend.max_response_bytes == 0 {
            return Err(invalid("backend.max_response_bytes", "must be at least 1"));
        }
        if self.limits.default_concurrency == 0 || self.limits.default_concurrency > 100_000 {
            return Err(invalid(
                "limits.default_concurrency",
                "must be between 1 and 100000",
            ));
        }
        if self.limits.max_queue_per_account > 1_000_000 {
            return Err(invalid(
                "limits.max_queue_per_account",
                "must be at most 1000000",
            ));
        }
        if self.limits.max_queue_wait_ms > 86_400_000 {
            return Err(invalid(
                "limits.max_queue_wait_ms",
                "must be at most 86400000 (one day)",
            ));
        }
        if self.limits.body_idle_timeout_ms == 0 {
            return Err(invalid("limits.body_idle_timeout_ms", "must be at least 1"));
        }
        if self.limits.max_body_bytes == 0 {
            return Err(invalid("limits.max_body_bytes", "must be at least 1"));
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            return Err(invalid("storage.data_dir", "must not be empty"));
        }
        if self.storage.kind == StorageKind::Postgres {
            if self.storage.postgres_url.is_empty() {
                return Err(invalid(
                    "storage.postgres_url",
                    "is required when storage.kind = \"postgres\"",
                ));
            }
            if let Err(e) = self.storage.postgres_url.parse::<tokio_postgres::Config>() {
                return Err(invalid(
                    "storage.postgres_url",
                    format!("is not a PostgreSQL URL: {e}"),
                ));
            }
        }
        let max_balance: rust_decimal::Decimal = MAX_MAX_BALANCE_USD.parse().expect("a decimal");
        if self.billing.max_balance_usd <= rust_decimal::Decimal::ZERO
            || self.billing.max_balance_usd > max_balance
        {
            return Err(invalid(
                "billing.max_balance_usd",
                format!("must be greater than 0 and at most {MAX_MAX_BALANCE_USD}"),
            ));
        }
        if jiff::tz::TimeZone::get(&self.billing.timezone).is_err() {
            return Err(invalid(
                "billing.timezone",
                format!("`{}` is not a known IANA time zone", self.billing.timezone),
            ));
        }
        if !(0.0..=1.0).contains(&self.simulator.failure_rate) {
            return Err(invalid(
                "simulator.failure_rate",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.simulator.latency_jitter_ms > self.simulator.latency_ms {
            return Err(invalid(
                "simulator.latency_jitter_ms",
                "must not exceed simulator.latency_ms",
            ));
        }
        if self.cluster.enabled() {
            if !self.cluster.redis_url.starts_with("redis://") {
                return Err(invalid("cluster.redis_url", "must start with redis://"));
            }
            if self.cluster.key_prefix.is_empty()
                || self.cluster.key_prefix.contains(['{', '}', ' '])
            {
                return Err(invalid(
                    "cluster.key_prefix",
                    "must be non-empty, without braces or spaces",
                ));
            }
            if !(1_000..=3_600_000).contains(&self.cluster.lease_ms) {
                return Err(invalid(
                    "cluster.lease_ms",
                    "must be between 1000 and 3600000",
                ));
            }
            if self.storage.kind != StorageKind::Postgres {
                return Err(invalid(
                    "cluster.redis_url",
                    "cluster mode needs a shared store: set storage.kind = \"postgres\" and storage.postgres_url",
                ));
            }
        }
        if self.demo_enabled() && crate::accounts::validate_id(&self.demo.account).is_err() {
            return Err(invalid("demo.account", "is not a valid account id"));
        }
        Ok(())
    }

    /// What a reload (SIGHUP) may apply: `next` with every key that needs
    /// a restart kept at its running value, and the names of those keys
    /// that `next` tried to change. Listeners, storage, cluster, billing,
    /// auth, the demo and the simulator are fixed for the process's life;
    /// limits (the default concurrency too: every account's limit follows
    /// it, across the cluster), backend, log level, the access log,
    /// buckets, idempotency and the admin token change live.
    pub fn reload_into(&self, mut next: Config) -> (Config, Vec<&'static str>) {
        let mut kept = Vec::new();
        macro_rules! keep {
            ($($name:literal => $($field:ident).+),+ $(,)?) => {$(
                if self.$($field).+ != next.$($field).+ {
                    next.$($field).+ = self.$($field).+.clone();
                    kept.push($name);
                }
            )+};
        }
        keep!(
            "server.listen" => server.listen,
            "server.instance" => server.instance,
            "server.max_connections" => server.max_connections,
            "server.idle_timeout_ms" => server.idle_timeout_ms,
            "server.shutdown_grace_ms" => server.shutdown_grace_ms,
            "server.workers" => server.workers,
            "admin.listen" => admin.listen,
            "admin.max_connections" => admin.max_connections,
            "admin.idle_timeout_ms" => admin.idle_timeout_ms,
            "storage" => storage,
            "billing" => billing,
            "metrics.per_account_labels" => metrics.per_account_labels,
            "log.format" => log.format,
            "simulator" => simulator,
            "demo" => demo,
            "cluster" => cluster,
            "auth" => auth,
            "jobs.path_prefix" => jobs.path_prefix,
            "events" => events,
        );
        // Between the embedded simulator and a real backend is a change of
        // demo mode (the public key), not of backend: a restart.
        if self.uses_embedded_simulator() != next.uses_embedded_simulator() {
            next.backend.url = self.backend.url.clone();
            kept.push("backend.url");
        }
        (next, kept)
    }

    /// Whether `serve` starts the built-in simulator as its backend.
    pub fn uses_embedded_simulator(&self) -> bool {
        self.backend.url.is_empty()
    }

    /// Whether `serve` seeds the demo account and key.
    pub fn demo_enabled(&self) -> bool {
        self.demo
            .enabled
            .unwrap_or_else(|| self.uses_embedded_simulator())
    }

    pub fn max_queue_wait(&self) -> Duration {
        Duration::from_millis(self.limits.max_queue_wait_ms)
    }
}

/// Keys whose values are secrets (or may carry one, as a URL's password).
const SECRET_KEYS: [&str; 5] = [
    "admin.token",
    "auth.secret_encryption_key",
    "auth.previous_secret_encryption_keys",
    "storage.postgres_url",
    "cluster.redis_url",
];

/// A deserializer's complaint about `key`, without the value it quotes
/// (`invalid type: string "…"`) when the key holds a secret: config errors
/// reach the log on a reload.
fn without_secret(key: &str, reason: &str) -> String {
    if !SECRET_KEYS.iter().any(|s| key.starts_with(s)) {
        return reason.to_string();
    }
    match reason.find("expected") {
        Some(i) => format!(
            "has the wrong type ({}; the value is not shown)",
            &reason[i..]
        ),
        None => "is not valid (the value is not shown)".to_string(),
    }
}

/// A TOML syntax error as a position and a message: toml's own text
/// quotes the offending line, which may hold a secret.
fn toml_error(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {}", e.message())
        }
        None => e.message().to_string(),
    }
}

/// The level names `log.level` (and `RUST_LOG`) may give bare.
pub const LOG_LEVELS: &str = "error, warn, info, debug, trace, off";

/// Checks a `log.level` value: a level (`warn`) or tracing directives
/// (`info,tollgate::access=off`, `tollgate=debug`). A bare word that is not
/// a level is refused: the filter would read it as a target name (`inf0`)
/// and silence every line but the access log's. A target is given with its
/// level (`tollgate=debug`) or as a path (`tollgate::gateway`).
pub fn check_log_level(level: &str) -> Result<(), String> {
    if level.trim().is_empty() {
        return Err(format!("is empty; give a level ({LOG_LEVELS})"));
    }
    if tracing_subscriber::EnvFilter::try_new(level).is_err() {
        return Err(format!(
            "is not a log filter: give a level ({LOG_LEVELS}) or directives such as \
             \"info,tollgate=debug\""
        ));
    }
    for word in level.split(',').map(str::trim) {
        let directive = word.is_empty() || word.contains(['=', '[']) || word.contains("::");
        if !directive
            && word
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
        {
            return Err(format!(
                "`{word}` is not a level ({LOG_LEVELS}); a bare word is read as a target \
                 name and would silence every other log line (a target is given with \
                 its level, as in \"tollgate=debug\")"
            ));
        }
    }
    Ok(())
}

/// The config keys the `TOLLGATE_*` variables in `env` set, each with its
/// variable (`limits.max_queue_per_account`,
/// `TOLLGATE_LIMITS_MAX_QUEUE_PER_ACCOUNT`): the file's values of these
/// keys are not used. Variables that name no key are left out.
pub fn keys_set_by_env(env: impl IntoIterator<Item = (String, String)>) -> Vec<(String, String)> {
    let mut scratch = toml::Table::new();
    let mut keys: Vec<(String, String)> = Vec::new();
    for (name, value) in env {
        if let Ok(Some(key)) = apply_env_override(&mut scratch, &name, &value) {
            keys.retain(|(k, _)| *k != key);
            keys.push((key, name));
        }
    }
    keys.sort();
    keys
}

fn check_buckets(bounds: &[f64]) -> Result<(), String> {
    if bounds.is_empty() || bounds.len() > 64 {
        return Err("must list between 1 and 64 bucket bounds".into());
    }
    if bounds.iter().any(|b| !b.is_finite() || *b <= 0.0) {
        return Err("bucket bounds must be positive numbers of seconds".into());
    }
    if bounds.windows(2).any(|w| w[0] >= w[1]) {
        return Err("bucket bounds must be strictly increasing".into());
    }
    Ok(())
}

/// `TOLLGATE_LIMITS_MAX_QUEUE_PER_ACCOUNT=5` sets `limits.max_queue_per_account`.
/// The value is read as a TOML value when it is one (`5`, `true`, `0.5`),
/// else as a string.
/// Returns the key it set (`limits.max_queue_per_account`).
fn apply_env_override(
    table: &mut toml::Table,
    name: &str,
    value: &str,
) -> Result<Option<String>, ConfigError> {
    let Some(rest) = name.strip_prefix("TOLLGATE_") else {
        return Ok(None);
    };
    // `TOLLGATE_CONFIG` names the file (`--config`), not a key.
    if rest == "CONFIG" {
        return Ok(None);
    }
    let rest = rest.to_ascii_lowercase();
    let Some((section, key)) = SECTIONS.iter().find_map(|s| {
        rest.strip_prefix(s)
            .and_then(|k| k.strip_prefix('_'))
            .map(|k| (*s, k))
    }) else {
        return Err(invalid(
            name,
            format!(
                "environment variable names no config section ({})",
                SECTIONS.join(", ")
            ),
        ));
    };
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(section_table) = entry else {
        return Err(invalid(section, "must be a table"));
    };
    // Keys that are strings in the schema stay strings even when they look
    // like numbers (a token of digits, an instance named `1`).
    let value = match (key, &parsed) {
        (
            "token"
            | "instance"
            | "url"
            | "account"
            | "timezone"
            | "level"
            | "data_dir"
            | "arrears_grace"
            | "max_balance_usd"
            | "ttl"
            | "listen"
            | "kind"
            | "redis_url"
            | "key_prefix"
            | "postgres_url"
            | "secret_encryption_key"
            | "service"
            | "api_version",
            v,
        ) if !v.is_str() => toml::Value::String(value.to_string()),
        _ => parsed,
    };
    section_table.insert(key.to_string(), value);
    Ok(Some(format!("{section}.{key}")))
}

/// A parsed `backend.url`: scheme http only (TLS to the backend is not built
/// yet), host, port and an optional path prefix.
#[derive(Debug, Clone)]
pub struct BackendUrl {
    pub authority: String,
    pub path_prefix: String,
}

impl BackendUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        // A URL with user info may carry a password: never echoed.
        let url_shown = &if url.contains('@') {
            "the URL (not shown: it holds an `@`)".to_string()
        } else {
            format!("`{url}`")
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("{url_shown} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "{url_shown} must start with http:// (https backends are not supported yet)"
            ));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url_shown} has no host"))?
            .to_string();
        if uri.query().is_some() {
            return Err(format!("{url_shown} must not have a query"));
        }
        if authority.contains('@') {
            return Err(format!(
                "{url_shown} must not carry a user name or password (the backend is reached without one)"
            ));
        }
        let path_prefix = uri.path().trim_end_matches('/').to_string();
        Ok(Self {
            authority,
            path_prefix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn waits_and_leases_too_long_to_add_to_a_clock_are_refused() {
        let err = Config::from_toml_and_env(
            "[limits]\nmax_queue_wait_ms = 9223372036854775807\n",
            no_env(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("limits.max_queue_wait_ms"), "{err}");
        let err = Config::from_toml_and_env(
            "[storage]\nkind = \"postgres\"\npostgres_url = \"postgres://x@127.0.0.1/db\"\n[cluster]\nredis_url = \"redis://127.0.0.1:6379/0\"\nlease_ms = 99999999999\n",
            no_env(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cluster.lease_ms"), "{err}");
    }

    #[test]
    fn the_example_config_is_valid_and_names_every_default() {
        let text = include_str!("../config/tollgate.example.toml");
        let c = Config::from_toml_and_env(text, no_env()).expect("the example loads");
        let d = Config::from_toml_and_env("", no_env()).unwrap();
        // Every key in the file is written with its default, so copying the
        // file changes nothing until a value is edited.
        assert!(
            c == d,
            "the example differs from the defaults:\n{c:#?}\nvs\n{d:#?}"
        );
        // And every key is in the file: a key missing from a section would
        // still compare equal, so count them against the schema's defaults.
        let file: toml::Table = toml::from_str(text).unwrap();
        for (section, keys) in [
            ("server", 6),
            ("admin", 4),
            ("backend", 11),
            ("limits", 8),
            ("auth", 3),
            ("storage", 3),
            ("cluster", 4),
            ("billing", 3),
            ("idempotency", 2),
            ("jobs", 6),
            ("events", 7),
            ("metrics", 3),
            ("log", 3),
            ("simulator", 4),
            // `demo.enabled` is unset by default (it follows the backend),
            // so the file shows it commented out.
            ("demo", 1),
        ] {
            let n = file[section].as_table().map_or(0, |t| t.len());
            assert_eq!(n, keys, "[{section}] in the example");
        }
    }

    #[test]
    fn an_error_from_an_environment_variable_names_the_variable() {
        let env = vec![(
            "TOLLGATE_LIMITS_MAX_QUEUE_PER_ACCOUNT".to_string(),
            "lots".to_string(),
        )];
        let err = Config::from_toml_and_env("", env).unwrap_err().to_string();
        assert!(
            err.contains("TOLLGATE_LIMITS_MAX_QUEUE_PER_ACCOUNT")
                && err.contains("limits.max_queue_per_account"),
            "{err}"
        );
        // A value that parses but fails validation names it too.
        let env = vec![(
            "TOLLGATE_LIMITS_DEFAULT_CONCURRENCY".to_string(),
            "0".to_string(),
        )];
        let err = Config::from_toml_and_env("", env).unwrap_err().to_string();
        assert!(err.contains("TOLLGATE_LIMITS_DEFAULT_CONCURRENCY"), "{err}");
        // A file's bad value is not blamed on the environment.
        let err = Config::from_toml_and_env("[limits]\ndefault_concurrency = 0\n", no_env())
            .unwrap_err()
            .to_string();
        assert!(!err.contains("environment"), "{err}");
    }

    #[test]
    fn config_errors_never_quote_a_secret() {
        let secret = "s3cr3t-value-0123456789abcdef";
        // A syntax error on a secret's line: toml would quote the line.
        let text = format!("[admin]\ntoken = \"{secret}\" oops\n");
        let err = Config::from_toml_and_env(&text, no_env())
            .unwrap_err()
            .to_string();
        assert!(!err.contains(secret), "{err}");
        assert!(err.contains("line 2"), "{err}");
        // A wrong type from the environment: serde would quote the value.
        let env = vec![(
            "TOLLGATE_AUTH_PREVIOUS_SECRET_ENCRYPTION_KEYS".to_string(),
            secret.to_string(),
        )];
        let err = Config::from_toml_and_env("", env).unwrap_err().to_string();
        assert!(!err.contains(secret), "{err}");
        assert!(
            err.contains("TOLLGATE_AUTH_PREVIOUS_SECRET_ENCRYPTION_KEYS"),
            "{err}"
        );
        // Keys that hold no secret keep the deserializer's full message.
        let err = Config::from_toml_and_env("[limits]\nmax_body_bytes = \"lots\"\n", no_env())
            .unwrap_err()
            .to_string();
        assert!(err.contains("lots"), "{err}");
    }

    #[test]
    fn bad_buckets_are_refused_naming_the_key() {
        for bad in ["[]", "[1.0, 0.5]", "[0.0, 1.0]", "[1.0, 1.0]", "[-1.0]"] {
            let err = Config::from_toml_and_env(
                &format!("[metrics]\nduration_buckets = {bad}\n"),
                no_env(),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("metrics.duration_buckets"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_reload_applies_live_keys_and_keeps_the_ones_that_need_a_restart() {
        let running = Config::from_toml_and_env("", no_env()).unwrap();
        let next = Config::from_toml_and_env(
            "[server]\nlisten = \"127.0.0.1:1\"\n[limits]\nmax_body_bytes = 10\nmax_queue_per_account = 1\ndefault_concurrency = 9\n[log]\nlevel = \"warn\"\n[storage]\ndata_dir = \"/elsewhere\"\n",
            no_env(),
        )
        .unwrap();
        let (applied, kept) = running.reload_into(next);
        assert_eq!(applied.limits.max_body_bytes, 10);
        assert_eq!(applied.limits.max_queue_per_account, 1);
        assert_eq!(applied.log.level, "warn");
        assert_eq!(applied.server.listen, running.server.listen);
        // Live: every account's limit follows it at once.
        assert_eq!(applied.limits.default_concurrency, 9);
        assert_eq!(applied.storage, running.storage);
        assert_eq!(kept, ["server.listen", "storage"]);
        // From the simulator to a real backend is a restart (demo mode).
        let real = Config::from_toml_and_env("[backend]\nurl = \"http://10.0.0.1:80\"\n", no_env())
            .unwrap();
        let (applied, kept) = running.reload_into(real.clone());
        assert!(applied.uses_embedded_simulator());
        assert!(kept.contains(&"backend.url"), "{kept:?}");
        // Between real backends it is live.
        let other =
            Config::from_toml_and_env("[backend]\nurl = \"http://10.0.0.2:80\"\n", no_env())
                .unwrap();
        let (applied, kept) = real.reload_into(other);
        assert_eq!(applied.backend.url, "http://10.0.0.2:80");
        assert!(kept.is_empty(), "{kept:?}");
    }

    #[test]
    fn a_bare_word_that_is_not_a_level_is_refused_as_log_level() {
        for good in [
            "info",
            "WARN",
            "error",
            "debug",
            "trace",
            "off",
            "3",
            "info,tollgate::access=off",
            "tollgate=debug",
            "warn,tollgate=debug",
            "tollgate::gateway",
            "info,",
            "[request]=debug",
        ] {
            assert_eq!(check_log_level(good), Ok(()), "{good}");
            Config::from_toml_and_env(&format!("[log]\nlevel = \"{good}\"\n"), no_env())
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "inf0",
            "warnn",
            "tollgate",
            "info,warnn",
            "",
            " ",
            "tollgate=inf0",
        ] {
            let reason = check_log_level(bad).unwrap_err();
            assert!(reason.contains(LOG_LEVELS), "{bad}: {reason}");
            let err = Config::from_toml_and_env(&format!("[log]\nlevel = \"{bad}\"\n"), no_env())
                .unwrap_err()
                .to_string();
            assert!(err.contains("`log.level`"), "{bad}: {err}");
            assert!(err.contains(LOG_LEVELS), "{bad}: {err}");
        }
        assert!(check_log_level("inf0").unwrap_err().contains("`inf0`"));
        // From the variable, the variable is named.
        let err =
            Config::from_toml_and_env("", vec![("TOLLGATE_LOG_LEVEL".into(), "warnn".into())])
                .unwrap_err()
                .to_string();
        assert!(err.contains("TOLLGATE_LOG_LEVEL"), "{err}");
        assert!(err.contains("`warnn`"), "{err}");
    }

    #[test]
    fn the_keys_set_by_variables_are_named_with_their_variable() {
        let keys = keys_set_by_env(vec![
            ("TOLLGATE_LIMITS_MAX_QUEUE_PER_ACCOUNT".into(), "5".into()),
            ("TOLLGATE_CONFIG".into(), "/etc/tollgate.toml".into()),
            ("PATH".into(), "/usr/bin".into()),
            ("TOLLGATE_NOSUCHSECTION_X".into(), "1".into()),
            ("TOLLGATE_ADMIN_TOKEN".into(), "s3cret-s3cret-s3cret".into()),
        ]);
        assert_eq!(
            keys,
            [
                (
                    "admin.token".to_string(),
                    "TOLLGATE_ADMIN_TOKEN".to_string()
                ),
                (
                    "limits.max_queue_per_account".to_string(),
                    "TOLLGATE_LIMITS_MAX_QUEUE_PER_ACCOUNT".to_string()
                ),
            ]
        );
    }

    #[test]
    fn defaults_run_the_demo() {
        let c = Config::from_toml_and_env("", no_env()).unwrap();
        assert!(c.uses_embedded_simulator());
        assert!(c.demo_enabled());
        let real = Config::from_toml_and_env("[backend]\nurl = \"http://10.0.0.1:80\"\n", no_env())
            .unwrap();
        assert!(
            !real.demo_enabled(),
            "no public demo key in front of a real backend"
        );
        assert_eq!(c.limits.default_concurrency, 3);
        assert_eq!(c.billing.arrears_grace, Duration::from_secs(86_400));
    }

    #[test]
    fn tc3_settings_are_checked_and_the_key_never_echoed() {
        let key = "ab".repeat(32);
        let c = Config::from_toml_and_env(
            "",
            vec![("TOLLGATE_AUTH_SECRET_ENCRYPTION_KEY".into(), key.clone())],
        )
        .unwrap();
        assert!(c.auth.sealer().unwrap().can_seal());
        assert!(!format!("{:?}", c.auth).contains(&key));
        for (name, value, names) in [
            (
                "TOLLGATE_AUTH_SECRET_ENCRYPTION_KEY",
                "not-hex-at-all",
                "auth.secret_encryption_key",
            ),
            (
                "TOLLGATE_AUTH_MAX_CLOCK_SKEW_MS",
                "0",
                "auth.max_clock_skew_ms",
            ),
            ("TOLLGATE_BACKEND_ACTIONS", "[]", "backend.actions"),
            (
                "TOLLGATE_LIMITS_MAX_BUFFERED_BYTES",
                "1",
                "limits.max_buffered_bytes",
            ),
            (
                "TOLLGATE_BACKEND_MAX_BUFFERED_RESPONSE_BYTES",
                "1",
                "backend.max_buffered_response_bytes",
            ),
        ] {
            let e = Config::from_toml_and_env("", vec![(name.into(), value.into())])
                .unwrap_err()
                .to_string();
            assert!(e.contains(names), "{name}: {e}");
            assert!(!e.contains("not-hex-at-all"), "{e}");
        }
    }

    #[test]
    fn env_overrides_file_and_keeps_types() {
        let c = Config::from_toml_and_env(
            "[limits]\nmax_queue_per_account = 7\n",
            vec![
                ("TOLLGATE_LIMITS_MAX_QUEUE_PER_ACCOUNT".into(), "9".into()),
                ("TOLLGATE_ADMIN_TOKEN".into(), "1234567890123456".into()),
                ("TOLLGATE_BILLING_ARREARS_GRACE".into(), "90s".into()),
                ("PATH".into(), "/bin".into()),
                // Names the file (`--config`), not a key: not an error.
                ("TOLLGATE_CONFIG".into(), "/etc/tollgate.toml".into()),
            ],
        )
        .unwrap();
        assert_eq!(c.limits.max_queue_per_account, 9);
        assert_eq!(c.admin.token, "1234567890123456");
        assert_eq!(c.billing.arrears_grace, Duration::from_secs(90));
    }

    #[test]
    fn storage_kind_and_url_come_from_the_environment() {
        let c = Config::from_toml_and_env(
            "",
            vec![
                ("TOLLGATE_STORAGE_KIND".into(), "postgres".into()),
                (
                    "TOLLGATE_STORAGE_POSTGRES_URL".into(),
                    "postgres://u:secret@127.0.0.1:5432/db".into(),
                ),
            ],
        )
        .unwrap();
        assert_eq!(c.storage.kind, StorageKind::Postgres);
        assert_eq!(
            c.storage.postgres_url,
            "postgres://u:secret@127.0.0.1:5432/db"
        );
        let err = Config::from_toml_and_env("[storage]\nkind = \"postgres\"\n", no_env())
            .unwrap_err()
            .to_string();
        assert!(err.contains("storage.postgres_url"), "{err}");
        assert_eq!(Config::default().storage.kind, StorageKind::Sqlite);
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (
                "[limits]\ndefault_concurrency = 0\n",
                "limits.default_concurrency",
            ),
            ("[backend]\nurl = \"ftp://x\"\n", "backend.url"),
            (
                "[billing]\ntimezone = \"Mars/Olympus\"\n",
                "billing.timezone",
            ),
            ("[billing]\narrears_grace = \"soon\"\n", "soon"),
            ("[limits]\nmax_queue_wait_ms = \"x\"\n", "max_queue_wait_ms"),
            ("[limits]\nmax_queue = 3\n", "max_queue"),
            ("[nope]\n", "nope"),
            ("not toml at all", "config"),
        ];
        for (text, needle) in cases {
            let err = Config::from_toml_and_env(text, no_env())
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn max_balance_is_money_as_a_string_checked_at_start() {
        let d = Config::default().billing.max_balance_usd;
        assert_eq!(d.to_string(), DEFAULT_MAX_BALANCE_USD);
        let c = Config::from_toml_and_env("[billing]\nmax_balance_usd = \"250.50\"\n", no_env())
            .unwrap();
        assert_eq!(c.billing.max_balance_usd.to_string(), "250.50");
        // A variable of digits stays a string (TOML would read a number).
        let env = vec![("TOLLGATE_BILLING_MAX_BALANCE_USD".into(), "5000".into())];
        let c = Config::from_toml_and_env("", env).unwrap();
        assert_eq!(c.billing.max_balance_usd.to_string(), "5000");
        for bad in [
            "1000",
            "1e9",
            "\"-5\"",
            "\"5.001\"",
            "\" 5\"",
            "\"\"",
            "\"0\"",
            "\"0.00\"",
            "\"1000000000000000.01\"",
        ] {
            let err = Config::from_toml_and_env(
                &format!("[billing]\nmax_balance_usd = {bad}\n"),
                no_env(),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("billing.max_balance_usd"), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_env_section_is_refused() {
        let err = Config::from_toml_and_env("", vec![("TOLLGATE_LIMTS_X".into(), "1".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("TOLLGATE_LIMTS_X"), "{err}");
    }

    #[test]
    fn admin_token_is_not_debug_printed() {
        let c = Config::from_toml_and_env(
            "",
            vec![(
                "TOLLGATE_ADMIN_TOKEN".into(),
                "supersecret-token-123".into(),
            )],
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("supersecret"));
    }

    #[test]
    fn backend_url_prefix() {
        let u = BackendUrl::parse("http://127.0.0.1:9000/api/").unwrap();
        assert_eq!(u.authority, "127.0.0.1:9000");
        assert_eq!(u.path_prefix, "/api");
        let e = BackendUrl::parse("http://user:secret@127.0.0.1:9000/").unwrap_err();
        assert!(e.contains("user name or password"), "{e}");
        assert!(!e.contains("secret"), "a password is never echoed: {e}");
    }
}
