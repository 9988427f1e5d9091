//! The Prometheus registry and the named metrics of SPEC §7.
//!
//! Counters and histograms are updated on the request path through handles
//! resolved once at start (no label lookup per request). The per-account
//! gauges are not touched per request at all: they are read from the
//! limiter when `/metrics` is scraped.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

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
}

pub struct Metrics {
    registry: Registry,
    outcomes: [IntCounter; 4],
    rejections: IntCounterVec,
    pub queue_wait_seconds: Histogram,
    pub upstream_seconds: Histogram,
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

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .expect("valid"),
    )
}

impl Metrics {
    pub fn new(per_account_labels: bool) -> Self {
        let registry = Registry::new();
        let requests = register(
            &registry,
            IntCounterVec::new(
                Opts::new("tollgate_requests_total", "Data-plane requests by outcome."),
                &["outcome"],
            )
            .expect("valid"),
        );
        let outcomes =
            ["success", "failure", "rejected", "error"].map(|o| requests.with_label_values(&[o]));
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
        let queue_wait_seconds = histogram(
            &registry,
            "tollgate_queue_wait_seconds",
            "Time admitted tasks waited in their account's queue.",
            &[
                0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ],
        );
        let upstream_seconds = histogram(
            &registry,
            "tollgate_upstream_seconds",
            "Time from forwarding a task to the backend's complete answer.",
            &[
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ],
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
        Self {
            registry,
            outcomes,
            rejections,
            queue_wait_seconds,
            upstream_seconds,
            usage_events_total,
            spooled_events,
            leases_lost,
            coordination_errors,
            connections_refused,
            accept_errors,
            open_connections,
            gauges,
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

    #[test]
    fn per_account_gauges_can_be_turned_into_totals() {
        let limiter = LocalLimiter::new(3, 10);
        limiter.set_limit("a", 3);
        limiter.set_limit("b", 5);
        let per_account = Metrics::new(true).render(&limiter);
        assert!(per_account.contains(r#"tollgate_concurrency_limit{account="b"} 5"#));
        let totals = Metrics::new(false).render(&limiter);
        assert!(!totals.contains("account="), "{totals}");
        assert!(totals.contains("tollgate_in_flight 0"));
        assert!(totals.contains("tollgate_queued 0"));
    }

    #[test]
    fn outcomes_count_separately() {
        let m = Metrics::new(true);
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
}
