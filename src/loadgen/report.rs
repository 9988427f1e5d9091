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
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
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

impl Report {
    pub fn from_tally(mode: String, window: Duration, elapsed: Duration, t: &Tally) -> Self {
        let ms = |q: f64| t.latency.value_at_quantile(q) as f64 / 1000.0;
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
            latency_ms: Percentiles {
                p50: ms(0.5),
                p90: ms(0.9),
                p99: ms(0.99),
                p999: ms(0.999),
                max: t.latency.max() as f64 / 1000.0,
                mean: t.latency.mean() / 1000.0,
            },
            statuses: t.statuses.clone(),
            error_codes: t.error_codes.clone(),
            connection_errors: t.connection_errors,
            dropped: t.dropped,
            unfinished: t.unfinished,
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
        out
    }
}
