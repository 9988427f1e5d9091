//! The Prometheus registry and the named metrics of SPEC §7.
//!
//! Counters and histograms are updated on the request path through handles
//! resolved once at start (no label lookup per request). The per-account
//! gauges are not touched per request at all: they are read from the
//! limiter when `/metrics` is scraped.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::MetricsConfig;
use crate::limiter::GateReport;

/// How a request ended, for `tollgate_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend succeeded and the usage event is stored.
    Success,
    /// The backend answered with a failure (proxied, not charged).
    Failure,
    /// The gateway refused the task before forwarding it.
    Rejected,
    /// The backend could not be reached or timed out, or recording failed.
    Error,
    /// A retry answered with the stored answer of its key's first success
    /// (nothing forwarded, nothing charged).
    Replayed,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Success,
        Outcome::Failure,
        Outcome::Rejected,
        Outcome::Error,
        Outcome::Replayed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
            Outcome::Replayed => "replayed",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    outcomes: [IntCounter; 5],
    rejections: IntCounterVec,
    /// The histograms, swapped whole when a reload changes their buckets.
    durations: ArcSwap<Durations>,
    /// `tollgate_account_requests_total{account,outcome}`, with
    /// `metrics.per_account_labels` only.
    account_requests: Option<IntCounterVec>,
    max_queued_tasks: IntGauge,
    pub usage_events_total: IntCounter,
    /// Usage events made durable in the local spool while the shared
    /// store (PostgreSQL) is unreachable, not yet delivered.
    pub spooled_events: IntGauge,
    leases_lost: IntCounter,
    coordination_errors: IntCounterVec,
    /// Per listener (`data`, `admin`): connections closed at once because
    /// the listener was at its `max_connections`.
    pub connections_refused: IntCounterVec,
    /// Per listener: `accept` failures (out of descriptors and the like).
    pub accept_errors: IntCounterVec,
    /// Per listener: connections open now.
    pub open_connections: IntGaugeVec,
    gauges: AccountGauges,
    /// Jobs (SPEC §10.2).
    pub jobs: JobMetrics,
    /// Usage events on NATS JetStream (SPEC §11).
    pub stream: Arc<StreamMetrics>,
}

/// `tollgate_stream_published_total`, `tollgate_stream_lag_events`,
/// `tollgate_stream_errors_total`, `tollgate_stream_publishing`.
pub struct StreamMetrics {
    pub published: IntCounter,
    pub lag: IntGauge,
    pub errors: IntCounter,
    pub publishing: IntGauge,
}

impl StreamMetrics {
    fn new(registry: &Registry) -> Self {
        Self {
            published: register(
                registry,
                IntCounter::new(
                    "tollgate_stream_published_total",
                    "Usage events this replica published to NATS JetStream (acked).",
                )
                .expect("valid"),
            ),
            lag: register(
                registry,
                IntGauge::new(
                    "tollgate_stream_lag_events",
                    "Committed usage events not yet published to the stream (on the publishing replica).",
                )
                .expect("valid"),
            ),
            errors: register(
                registry,
                IntCounter::new(
                    "tollgate_stream_errors_total",
                    "Failed attempts to reach NATS or publish to the stream (events wait in the store).",
                )
                .expect("valid"),
            ),
            publishing: register(
                registry,
                IntGauge::new(
                    "tollgate_stream_publishing",
                    "1 on the replica that publishes usage events to the stream (one per cluster).",
                )
                .expect("valid"),
            ),
        }
    }
}

/// `tollgate_jobs{status}` (this replica's queued and running jobs),
/// `tollgate_jobs_total{outcome}` (jobs ended here, by how),
/// `tollgate_job_wait_seconds` (submit to start).
pub struct JobMetrics {
    pub now: IntGaugeVec,
    pub ended: IntCounterVec,
    pub wait: Histogram,
}

impl JobMetrics {
    /// Every outcome shown from the start (at 0), so a dashboard's rate of
    /// it has a series before the first job ends.
    fn with_outcomes(self) -> Self {
        for outcome in ["succeeded", "failed", "cancelled", "expired"] {
            self.ended.with_label_values(&[outcome]);
        }
        self.set_now(0, 0);
        self
    }

    /// This replica's queued and running jobs, set at each scrape.
    pub fn set_now(&self, queued: usize, running: usize) {
        self.now.with_label_values(&["queued"]).set(queued as i64);
        self.now.with_label_values(&["running"]).set(running as i64);
    }

    fn new(registry: &Registry) -> Self {
        Self {
            now: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "tollgate_jobs",
                        "Jobs this replica holds now, by status (queued: waiting for a slot; running: at the backend).",
                    ),
                    &["status"],
                )
                .expect("valid"),
            ),
            ended: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "tollgate_jobs_total",
                        "Jobs that ended on this replica, by outcome (succeeded, failed, cancelled, expired).",
                    ),
                    &["outcome"],
                )
                .expect("valid"),
            ),
            // Jobs wait from seconds to a day: buckets of their own.
            wait: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "tollgate_job_wait_seconds",
                        "From a job's submit to its start at the backend.",
                    )
                    .buckets(vec![
                        0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
                    ]),
                )
                .expect("valid"),
            ),
        }
    }
}

enum AccountGauges {
    PerAccount {
        in_flight: IntGaugeVec,
        queued: IntGaugeVec,
        limit: IntGaugeVec,
    },
    Totals {
        in_flight: IntGauge,
        queued: IntGauge,
    },
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: T) -> T {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

/// The duration histograms, whose buckets come from the config.
struct Durations {
    queue_wait: Histogram,
    upstream: Histogram,
    task_vec: HistogramVec,
    /// `task_vec` by [`Outcome`], resolved once.
    task: [Histogram; 5],
}

impl Durations {
    fn new(config: &MetricsConfig) -> Self {
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("bucket bounds are checked when the config is loaded")
        };
        let task_vec = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_task_duration_seconds",
                "Time from a request's arrival to its answer (queue, upstream and recording), by outcome.",
            )
            .buckets(config.duration_buckets.clone()),
            &["outcome"],
        )
        .expect("bucket bounds are checked when the config is loaded");
        Self {
            queue_wait: histogram(
                "tollgate_queue_wait_seconds",
                "Time admitted tasks waited in their account's queue.",
                &config.queue_wait_buckets,
            ),
            upstream: histogram(
                "tollgate_upstream_seconds",
                "Time from forwarding a task to the backend's complete answer.",
                &config.duration_buckets,
            ),
            task: Outcome::ALL.map(|o| task_vec.with_label_values(&[o.label()])),
            task_vec,
        }
    }

    fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.queue_wait.clone()))?;
        registry.register(Box::new(self.upstream.clone()))?;
        registry.register(Box::new(self.task_vec.clone()))
    }

    fn unregister(&self, registry: &Registry) {
        let _ = registry.unregister(Box::new(self.queue_wait.clone()));
        let _ = registry.unregister(Box::new(self.upstream.clone()));
        let _ = registry.unregister(Box::new(self.task_vec.clone()));
    }
}

impl Metrics {
    pub fn new(config: &MetricsConfig) -> Self {
        let per_account_labels = config.per_account_labels;
        let registry = Registry::new();
        // CPU, memory, descriptors and start time, as every Prometheus
        // exporter has them (`process_*`).
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics are registered once");
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "tollgate_build_info",
                    "Always 1; the version of the running binary is in the label.",
                ),
                &["version"],
            )
            .expect("valid"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let max_queued_tasks = register(
            &registry,
            IntGauge::new(
                "tollgate_max_queued_tasks",
                "limits.max_queued_tasks: tasks that may wait for a slot at once, all accounts.",
            )
            .expect("valid"),
        );
        let durations = Durations::new(config);
        durations
            .register(&registry)
            .expect("metric names are unique and valid");
        let account_requests = per_account_labels.then(|| {
            register(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "tollgate_account_requests_total",
                        "Data-plane requests by account and outcome (requests refused before the key was known are not counted here).",
                    ),
                    &["account", "outcome"],
                )
                .expect("valid"),
            )
        });
        let requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new("tollgate_requests_total", "Data-plane requests by outcome."),
                &["outcome"],
            )
            .expect("valid"),
        );
        let outcomes = Outcome::ALL.map(|o| requests.with_label_values(&[o.label()]));
        let rejections = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "tollgate_rejections_total",
                    "Requests the gateway answered with an error, by error code.",
                ),
                &["code"],
            )
            .expect("valid"),
        );
        let usage_events_total = register(
            &registry,
            IntCounter::new(
                "tollgate_usage_events_total",
                "Usage events durably stored.",
            )
            .expect("valid"),
        );
        let spooled_events = register(
            &registry,
            IntGauge::new(
                "tollgate_spooled_events",
                "Usage events held in this replica's local spool until the store is back.",
            )
            .expect("valid"),
        );
        let leases_lost = register(
            &registry,
            IntCounter::new(
                "tollgate_leases_lost_total",
                "Slots or reservations whose Redis lease expired before this replica could renew it (the account may briefly have exceeded its limit).",
            )
            .expect("valid"),
        );
        let coordination_errors = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "tollgate_coordination_errors_total",
                    "Failed exchanges with the coordination service (Redis), by operation.",
                ),
                &["op"],
            )
            .expect("valid"),
        );
        let connections_refused = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "tollgate_connections_refused_total",
                    "Connections closed on accept because the listener was at its connection cap.",
                ),
                &["listener"],
            )
            .expect("valid"),
        );
        let accept_errors = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "tollgate_accept_errors_total",
                    "Failed accepts (such as running out of file descriptors), by listener.",
                ),
                &["listener"],
            )
            .expect("valid"),
        );
        let open_connections = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "tollgate_open_connections",
                    "Connections open now, by listener.",
                ),
                &["listener"],
            )
            .expect("valid"),
        );
        let gauges = if per_account_labels {
            let vec = |name: &str, help: &str| {
                register(
                    &registry,
                    IntGaugeVec::new(Opts::new(name, help), &["account"]).expect("valid"),
                )
            };
            AccountGauges::PerAccount {
                in_flight: vec(
                    "tollgate_in_flight",
                    "Tasks of the account at the backend now.",
                ),
                queued: vec(
                    "tollgate_queued",
                    "Tasks of the account waiting for a slot.",
                ),
                limit: vec(
                    "tollgate_concurrency_limit",
                    "The account's concurrency limit now.",
                ),
            }
        } else {
            AccountGauges::Totals {
                in_flight: register(
                    &registry,
                    IntGauge::new(
                        "tollgate_in_flight",
                        "Tasks at the backend now, all accounts.",
                    )
                    .expect("valid"),
                ),
                queued: register(
                    &registry,
                    IntGauge::new("tollgate_queued", "Tasks waiting for a slot, all accounts.")
                        .expect("valid"),
                ),
            }
        };
        let jobs = JobMetrics::new(&registry).with_outcomes();
        let stream = Arc::new(StreamMetrics::new(&registry));
        Self {
            registry,
            outcomes,
            rejections,
            durations: ArcSwap::from_pointee(durations),
            account_requests,
            max_queued_tasks,
            usage_events_total,
            spooled_events,
            leases_lost,
            coordination_errors,
            connections_refused,
            accept_errors,
            open_connections,
            gauges,
            jobs,
            stream,
        }
    }

    /// Brings the cluster counters up to the coordinator's totals (they
    /// only grow), at scrape time.
    pub fn observe_cluster(&self, leases_lost: u64, errors: &[(&'static str, u64)]) {
        let catch_up = |c: &IntCounter, total: u64| {
            let seen = c.get();
            if total > seen {
                c.inc_by(total - seen);
            }
        };
        catch_up(&self.leases_lost, leases_lost);
        for (op, total) in errors {
            catch_up(&self.coordination_errors.with_label_values(&[op]), *total);
        }
    }

    pub fn request(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].inc();
    }

    /// One task's end: its end-to-end time, and its account's count when
    /// accounts are labelled and the key was known.
    pub fn task_ended(&self, outcome: Outcome, took: Duration, account: Option<&str>) {
        self.durations.load().task[outcome as usize].observe(took.as_secs_f64());
        if let (Some(vec), Some(account)) = (&self.account_requests, account) {
            vec.with_label_values(&[account, outcome.label()]).inc();
        }
    }

    pub fn observe_queue_wait(&self, waited: Duration) {
        self.durations
            .load()
            .queue_wait
            .observe(waited.as_secs_f64());
    }

    pub fn observe_upstream(&self, took: Duration) {
        self.durations.load().upstream.observe(took.as_secs_f64());
    }

    pub fn set_max_queued_tasks(&self, max: u64) {
        self.max_queued_tasks
            .set(i64::try_from(max).unwrap_or(i64::MAX));
    }

    /// A reload changed the buckets: the histograms start over with the
    /// new bounds (Prometheus reads it as a counter reset).
    pub fn set_buckets(&self, config: &MetricsConfig) -> Result<(), String> {
        let fresh = std::sync::Arc::new(Durations::new(config));
        let old = self.durations.load_full();
        old.unregister(&self.registry);
        if let Err(e) = fresh.register(&self.registry) {
            fresh.unregister(&self.registry);
            let _ = old.register(&self.registry);
            return Err(format!("metrics buckets: {e}"));
        }
        self.durations.store(fresh);
        Ok(())
    }

    pub fn rejection(&self, code: &str) {
        self.rejections.with_label_values(&[code]).inc();
    }

    /// Renders the text exposition, first reading the gauges off the limiter.
    pub fn render(&self, limiter: &dyn GateReport) -> String {
        match &self.gauges {
            AccountGauges::PerAccount {
                in_flight,
                queued,
                limit,
            } => {
                // Reset first so deleted gates do not linger.
                in_flight.reset();
                queued.reset();
                limit.reset();
                limiter.for_each_gate(&mut |account, s| {
                    in_flight
                        .with_label_values(&[account])
                        .set(i64::from(s.in_flight));
                    queued
                        .with_label_values(&[account])
                        .set(i64::from(s.queued));
                    limit.with_label_values(&[account]).set(i64::from(s.limit));
                });
            }
            AccountGauges::Totals { in_flight, queued } => {
                let (mut f, mut q) = (0i64, 0i64);
                limiter.for_each_gate(&mut |_, s| {
                    f += i64::from(s.in_flight);
                    q += i64::from(s.queued);
                });
                in_flight.set(f);
                queued.set(q);
            }
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Limiter, LocalLimiter};

    fn metrics(per_account_labels: bool) -> Metrics {
        Metrics::new(&MetricsConfig {
            per_account_labels,
            ..MetricsConfig::default()
        })
    }

    #[test]
    fn per_account_gauges_can_be_turned_into_totals() {
        let limiter = LocalLimiter::new(3, 10);
        limiter.set_limit("a", 3);
        limiter.set_limit("b", 5);
        let per_account = metrics(true).render(&limiter);
        assert!(per_account.contains(r#"tollgate_concurrency_limit{account="b"} 5"#));
        let totals = metrics(false).render(&limiter);
        assert!(!totals.contains("account="), "{totals}");
        assert!(totals.contains("tollgate_in_flight 0"));
        assert!(totals.contains("tollgate_queued 0"));
    }

    #[test]
    fn outcomes_count_separately() {
        let m = metrics(true);
        m.request(Outcome::Success);
        m.request(Outcome::Success);
        m.request(Outcome::Error);
        m.rejection("RequestLimitExceeded.JobNumExceed");
        let text = m.render(&LocalLimiter::new(3, 10));
        assert!(text.contains(r#"tollgate_requests_total{outcome="success"} 2"#));
        assert!(text.contains(r#"tollgate_requests_total{outcome="error"} 1"#));
        assert!(
            text.contains(
                r#"tollgate_rejections_total{code="RequestLimitExceeded.JobNumExceed"} 1"#
            )
        );
    }

    #[test]
    fn task_durations_land_in_the_configured_buckets_and_a_reload_replaces_them() {
        let m = metrics(true);
        m.task_ended(Outcome::Success, Duration::from_millis(1_160), Some("acme"));
        let text = m.render(&LocalLimiter::new(3, 10));
        // The default buckets resolve a 1.16 s task between 1 s and 1.25 s.
        assert!(
            text.contains(
                r#"tollgate_task_duration_seconds_bucket{outcome="success",le="1.25"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"tollgate_task_duration_seconds_bucket{outcome="success",le="1"} 0"#)
        );
        assert!(
            text.contains(r#"tollgate_account_requests_total{account="acme",outcome="success"} 1"#)
        );
        assert!(text.contains(r#"tollgate_build_info{version=""#));

        m.set_buckets(&MetricsConfig {
            duration_buckets: vec![0.5, 3.0],
            ..MetricsConfig::default()
        })
        .unwrap();
        m.task_ended(Outcome::Failure, Duration::from_millis(700), None);
        let text = m.render(&LocalLimiter::new(3, 10));
        assert!(
            text.contains(r#"tollgate_task_duration_seconds_bucket{outcome="failure",le="3"} 1"#)
        );
        assert!(!text.contains(r#"le="1.25""#), "old buckets gone: {text}");
    }

    #[test]
    fn accounts_are_not_labelled_when_per_account_labels_are_off() {
        let m = metrics(false);
        m.task_ended(Outcome::Success, Duration::from_millis(10), Some("acme"));
        let text = m.render(&LocalLimiter::new(3, 10));
        assert!(!text.contains("tollgate_account_requests_total"), "{text}");
        assert!(text.contains("tollgate_task_duration_seconds_count{outcome=\"success\"} 1"));
    }
}
