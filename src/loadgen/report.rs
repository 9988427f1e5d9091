//! Collecting results and printing the summary.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// What one worker saw; merged at the end.
pub struct Tally {
    /// Latency in microseconds, 1 µs to 1 hour, 3 significant digits.
    pub latency: Histogram<u64>,
    pub statuses: BTreeMap<u16, u64>,
    pub error_codes: BTreeMap<String, u64>,
    pub connection_errors: u64,
    pub dropped: u64,
    /// Sent but unanswered when the run ended at `--duration`.
    pub unfinished: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            latency: histogram(),
            statuses: BTreeMap::new(),
            error_codes: BTreeMap::new(),
            connection_errors: 0,
            dropped: 0,
            unfinished: 0,
        }
    }
}

impl Tally {
    pub fn record(&mut self, latency: Duration, status: u16, error_code: Option<String>) {
        let _ = self.latency.record((latency.as_micros() as u64).max(1));
        *self.statuses.entry(status).or_default() += 1;
        if let Some(code) = error_code {
            *self.error_codes.entry(code).or_default() += 1;
        }
    }

    pub fn merge(&mut self, other: &Tally) {
        let _ = self.latency.add(&other.latency);
        for (k, v) in &other.statuses {
            *self.statuses.entry(*k).or_default() += v;
        }
        for (k, v) in &other.error_codes {
            *self.error_codes.entry(k.clone()).or_default() += v;
        }
        self.connection_errors += other.connection_errors;
        self.dropped += other.dropped;
        self.unfinished += other.unfinished;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: String,
    /// The measured window (`--duration`); throughput is over it.
    pub duration_s: f64,
    /// Wall time of the whole run (the window plus starting and stopping).
    pub elapsed_s: f64,
    /// Requests answered within the window (any status).
    pub requests: u64,
    pub throughput_rps: f64,
    pub ok_2xx: u64,
    /// Answered with a status other than 2xx.
    pub non_2xx: u64,
    pub latency_ms: Percentiles,
    pub statuses: BTreeMap<u16, u64>,
    pub error_codes: BTreeMap<String, u64>,
    pub connection_errors: u64,
    pub dropped: u64,
    /// Sent but still unanswered when the window ended (abandoned).
    pub unfinished: u64,
    /// Jobs mode: what became of the accepted jobs (the fields above are
    /// then the submits').
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs: Option<JobsSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    /// Of a histogram in microseconds.
    fn of_micros(h: &Histogram<u64>) -> Self {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Self {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
            mean: h.mean() / 1000.0,
        }
    }
}

impl Report {
    pub fn from_tally(mode: String, window: Duration, elapsed: Duration, t: &Tally) -> Self {
        let requests = t.latency.len();
        let ok_2xx = t
            .statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum();
        Self {
            mode,
            duration_s: window.as_secs_f64(),
            elapsed_s: elapsed.as_secs_f64(),
            requests,
            throughput_rps: requests as f64 / window.as_secs_f64().max(1e-9),
            ok_2xx,
            non_2xx: requests.saturating_sub(ok_2xx),
            latency_ms: Percentiles::of_micros(&t.latency),
            statuses: t.statuses.clone(),
            error_codes: t.error_codes.clone(),
            connection_errors: t.connection_errors,
            dropped: t.dropped,
            unfinished: t.unfinished,
            jobs: None,
        }
    }

    /// No request got a 2xx answer: the run measured nothing useful (a
    /// wrong URL, a bad key, a server down), so the command fails.
    pub fn all_failed(&self) -> bool {
        self.ok_2xx == 0
    }

    pub fn to_text(&self) -> String {
        let l = &self.latency_ms;
        let mut out = format!(
            "mode          {}\nduration      {:.2} s\nrequests      {} ({} 2xx)\nthroughput    {:.0} req/s\n\
             latency ms    p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}\n",
            self.mode,
            self.duration_s,
            self.requests,
            self.ok_2xx,
            self.throughput_rps,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            l.mean
        );
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        out.push_str(&format!("statuses      {}\n", statuses.join(", ")));
        if !self.error_codes.is_empty() {
            let codes: Vec<String> = self
                .error_codes
                .iter()
                .map(|(c, n)| format!("{c}: {n}"))
                .collect();
            out.push_str(&format!("error codes   {}\n", codes.join(", ")));
        }
        if self.connection_errors > 0 || self.dropped > 0 {
            out.push_str(&format!(
                "conn errors   {}\ndropped       {} (generator saturated)\n",
                self.connection_errors, self.dropped
            ));
        }
        if self.unfinished > 0 {
            out.push_str(&format!(
                "unfinished    {} (unanswered at the end of the window, abandoned)\n",
                self.unfinished
            ));
        }
        if let Some(j) = &self.jobs {
            out.push_str(&j.to_text());
        }
        out
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

fn counts(m: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = m.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// What became of one accepted job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    /// The last status a poll saw (`None`: no poll answered).
    pub last_status: Option<String>,
    /// Whether `last_status` is final.
    pub finished: bool,
    /// A poll was answered 404: the job is gone (purged, or not ours).
    pub lost: bool,
    /// From the submit (its due time in open loop) to the poll that saw
    /// it final.
    pub to_result: Option<Duration>,
    /// The gateway's own `finished_at - created_at`, when the view had both.
    pub server_time: Option<Duration>,
    /// When, from the run's start, the poll that saw it final was answered.
    pub final_at: Option<Duration>,
    pub polls: u64,
    /// Polls not answered 200 (404 aside), or not answered at all.
    pub poll_errors: u64,
}

/// The jobs of a run, merged.
pub struct JobsTally {
    /// Submits answered 202 (jobs followed).
    pub accepted: u64,
    pub by_status: BTreeMap<String, u64>,
    /// Not final when the drain ended, by their last seen status
    /// (`unknown`: no poll answered).
    pub unfinished_by_status: BTreeMap<String, u64>,
    pub lost: u64,
    /// Submit to result, microseconds.
    pub to_result: Histogram<u64>,
    /// `finished_at - created_at` by the gateway, microseconds.
    pub server_time: Histogram<u64>,
    pub last_final_at: Duration,
    pub polls: u64,
    pub poll_errors: u64,
}

impl Default for JobsTally {
    fn default() -> Self {
        Self {
            accepted: 0,
            by_status: BTreeMap::new(),
            unfinished_by_status: BTreeMap::new(),
            lost: 0,
            to_result: histogram(),
            server_time: histogram(),
            last_final_at: Duration::ZERO,
            polls: 0,
            poll_errors: 0,
        }
    }
}

impl JobsTally {
    pub fn record(&mut self, o: &JobOutcome) {
        self.accepted += 1;
        self.polls += o.polls;
        self.poll_errors += o.poll_errors;
        let status = o.last_status.clone().unwrap_or_else(|| "unknown".into());
        if o.lost {
            self.lost += 1;
        } else if o.finished {
            *self.by_status.entry(status).or_default() += 1;
            if let Some(d) = o.to_result {
                let _ = self.to_result.record((d.as_micros() as u64).max(1));
            }
            if let Some(d) = o.server_time {
                let _ = self.server_time.record((d.as_micros() as u64).max(1));
            }
            if let Some(at) = o.final_at {
                self.last_final_at = self.last_final_at.max(at);
            }
        } else {
            *self.unfinished_by_status.entry(status).or_default() += 1;
        }
    }

    pub fn finished(&self) -> u64 {
        self.by_status.values().sum()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct JobsSummary {
    pub poll_ms: u64,
    pub drain_ms: u64,
    /// Submits answered 202.
    pub accepted: u64,
    /// Seen final (any final status).
    pub finished: u64,
    /// Final jobs by status: succeeded, failed, cancelled, expired.
    pub by_status: BTreeMap<String, u64>,
    /// Not final when the drain ended, by their last seen status.
    pub unfinished: u64,
    pub unfinished_by_status: BTreeMap<String, u64>,
    /// A poll answered 404.
    pub lost: u64,
    /// From the submit (its due time in open loop) to the poll that saw it
    /// final: includes up to one `--poll-ms` of polling delay.
    pub to_result_ms: Percentiles,
    /// The gateway's own `finished_at - created_at` (millisecond stamps).
    pub server_ms: Percentiles,
    /// Finished jobs per second, from the run's start to the last one seen
    /// final.
    pub finished_per_s: f64,
    pub polls: u64,
    pub poll_errors: u64,
}

impl JobsSummary {
    pub fn from_tally(poll: Duration, drain: Duration, t: &JobsTally) -> Self {
        let finished = t.finished();
        let span = t.last_final_at.as_secs_f64();
        Self {
            poll_ms: poll.as_millis() as u64,
            drain_ms: drain.as_millis() as u64,
            accepted: t.accepted,
            finished,
            by_status: t.by_status.clone(),
            unfinished: t.unfinished_by_status.values().sum(),
            unfinished_by_status: t.unfinished_by_status.clone(),
            lost: t.lost,
            to_result_ms: Percentiles::of_micros(&t.to_result),
            server_ms: Percentiles::of_micros(&t.server_time),
            finished_per_s: if span > 0.0 {
                finished as f64 / span
            } else {
                0.0
            },
            polls: t.polls,
            poll_errors: t.poll_errors,
        }
    }

    pub fn to_text(&self) -> String {
        let r = &self.to_result_ms;
        let s = &self.server_ms;
        let mut out = format!(
            "jobs          {} accepted, {} finished ({:.0} jobs/s), {} unfinished, {} lost
             final         {}
             to result ms  p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  (polled every {} ms)
             server ms     p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  (finished_at - created_at)
             polls         {} ({} errors)
",
            self.accepted,
            self.finished,
            self.finished_per_s,
            self.unfinished,
            self.lost,
            counts(&self.by_status),
            r.p50,
            r.p90,
            r.p99,
            r.max,
            self.poll_ms,
            s.p50,
            s.p90,
            s.p99,
            s.max,
            self.polls,
            self.poll_errors,
        );
        if self.unfinished > 0 {
            out.push_str(&format!(
                "unfinished    {} (not final {} ms after the window)
",
                counts(&self.unfinished_by_status),
                self.drain_ms
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(status: &str, ms: u64, at_ms: u64) -> JobOutcome {
        JobOutcome {
            last_status: Some(status.into()),
            finished: true,
            lost: false,
            to_result: Some(Duration::from_millis(ms)),
            server_time: Some(Duration::from_millis(ms / 2)),
            final_at: Some(Duration::from_millis(at_ms)),
            polls: 2,
            poll_errors: 0,
        }
    }

    #[test]
    fn jobs_are_counted_by_final_status_and_unfinished_ones_by_their_last() {
        let mut t = JobsTally::default();
        for i in 0..98 {
            t.record(&done("succeeded", 100 + i, 1000 + i));
        }
        t.record(&done("expired", 5000, 2000));
        t.record(&done("failed", 10, 500));
        t.record(&JobOutcome {
            last_status: Some("queued".into()),
            finished: false,
            lost: false,
            to_result: None,
            server_time: None,
            final_at: None,
            polls: 7,
            poll_errors: 1,
        });
        t.record(&JobOutcome {
            last_status: None,
            finished: false,
            lost: false,
            to_result: None,
            server_time: None,
            final_at: None,
            polls: 0,
            poll_errors: 3,
        });
        t.record(&JobOutcome {
            last_status: None,
            finished: false,
            lost: true,
            to_result: None,
            server_time: None,
            final_at: None,
            polls: 1,
            poll_errors: 0,
        });
        let s = JobsSummary::from_tally(Duration::from_millis(100), Duration::from_secs(10), &t);
        assert_eq!(s.accepted, 103);
        assert_eq!(s.finished, 100);
        assert_eq!(s.by_status["succeeded"], 98);
        assert_eq!(s.by_status["expired"], 1);
        assert_eq!(s.by_status["failed"], 1);
        assert_eq!(s.unfinished, 2);
        assert_eq!(s.unfinished_by_status["queued"], 1);
        assert_eq!(s.unfinished_by_status["unknown"], 1);
        assert_eq!(s.lost, 1);
        assert_eq!(s.polls, 2 * 100 + 7 + 1);
        assert_eq!(s.poll_errors, 4);
        // 100 finished jobs over the 2 s until the last one was seen final.
        assert!((s.finished_per_s - 50.0).abs() < 1e-9, "{s:?}");
        // Only finished jobs have a time to result.
        assert_eq!(t.to_result.len(), 100);
        assert!((s.to_result_ms.max - 5000.0).abs() < 5.0, "{s:?}");
        assert!((s.to_result_ms.p50 - 149.0).abs() < 1.0, "{s:?}");
        assert!((s.server_ms.max - 2500.0).abs() < 5.0, "{s:?}");
        let text = s.to_text();
        assert!(
            text.contains("expired: 1, failed: 1, succeeded: 98"),
            "{text}"
        );
        assert!(text.contains("queued: 1, unknown: 1"), "{text}");
    }

    #[test]
    fn nothing_finished_gives_zero_rates_not_nan() {
        let s = JobsSummary::from_tally(
            Duration::from_millis(100),
            Duration::ZERO,
            &JobsTally::default(),
        );
        assert_eq!(s.finished_per_s, 0.0);
        assert_eq!(s.to_result_ms.p99, 0.0);
        assert!(s.to_text().contains("final         none"));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["finished"], 0);
    }
}
