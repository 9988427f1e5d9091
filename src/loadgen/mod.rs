//! `tollgate loadgen`: a load generator for any tollgate deployment (and
//! for the simulator or another proxy, to compare).
//!
//! Two modes: closed loop (N connections, each sending its next request
//! when the last one is answered) and open loop (a fixed arrival rate; each
//! request's latency is measured from the moment it was *due*, so a slow
//! server cannot hide its queueing: no coordinated omission).
//!
//! Either mode can submit jobs instead (`--jobs`): `--url` is then the
//! jobs submit URL (`http://host:port/tollgate/jobs/<backend path>`), each
//! `202` is followed by polling the job at its `Location` every
//! `--poll-ms` until it is final, and the summary adds the time from
//! submit to result and the jobs' final statuses.

mod driver;
mod jobs;
mod report;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

pub use report::Report;

#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// Target URL, e.g. http://127.0.0.1:8080/v1/style-transfer.
    #[arg(long)]
    pub url: String,
    /// An API key (repeat for several; they are used round-robin).
    #[arg(long = "key")]
    pub keys: Vec<String>,
    /// A file with one API key per line.
    #[arg(long)]
    pub keys_file: Option<PathBuf>,
    /// Closed loop: this many connections, each one request at a time.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Open loop: this many requests per second (overrides closed loop).
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long to send, e.g. 10s, 1m.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Request body size in bytes.
    #[arg(long, default_value_t = 256)]
    pub body_size: usize,
    /// Extra header `Name: value` (repeatable), e.g. `X-Sim-Delay-Ms: 50`.
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Open loop: requests outstanding at most; beyond it a due request is
    /// counted as dropped instead of piling up in the generator.
    #[arg(long, default_value_t = 20_000)]
    pub max_outstanding: usize,
    /// Jobs mode: `--url` is a jobs submit URL (e.g.
    /// http://127.0.0.1:8080/tollgate/jobs/v1/style-transfer); every 202 is
    /// polled (GET on its `Location`, else `/tollgate/jobs/<job_id>`) until
    /// the job is final. The latency reported is the submit's; the jobs
    /// section adds submit-to-result times and final statuses. In closed
    /// loop each connection submits its next job once its last submit is
    /// answered (the polling goes on beside it). `--max-outstanding` counts
    /// jobs not yet final too (open loop: a submit due beyond it is
    /// dropped; closed loop: the connection waits).
    #[arg(long)]
    pub jobs: bool,
    /// Jobs mode: how often each job is polled, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub poll_ms: u64,
    /// Jobs mode: after `--duration`, how long to wait at most for the
    /// last submits' answers and for jobs to become final; jobs not final
    /// then are counted as unfinished by their last status.
    #[arg(long, default_value_t = 10_000)]
    pub drain_ms: u64,
}

/// A validated plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub uri: http::Uri,
    pub keys: Vec<String>,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub body: Bytes,
    pub duration: Duration,
    pub mode: Mode,
    pub max_outstanding: usize,
    /// Jobs mode.
    pub jobs: Option<JobsPlan>,
}

#[derive(Debug, Clone, Copy)]
pub struct JobsPlan {
    pub poll: Duration,
    pub drain: Duration,
}

#[derive(Debug, Clone, Copy)]
pub enum Mode {
    Closed { connections: usize },
    Open { rate: f64 },
}

impl LoadgenArgs {
    pub fn plan(&self) -> Result<Plan, String> {
        let uri: http::Uri = self.url.parse().map_err(|e| format!("--url: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err("--url: must be http://host:port/path".into());
        }
        let mut keys = self.keys.clone();
        if let Some(path) = &self.keys_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--keys-file {}: {e}", path.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from),
            );
        }
        let mut headers = Vec::new();
        for h in &self.headers {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| format!("--header {h:?}: expected `Name: value`"))?;
            let name = http::HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|e| format!("--header {h:?}: {e}"))?;
            let value = http::HeaderValue::from_str(value.trim())
                .map_err(|e| format!("--header {h:?}: {e}"))?;
            headers.push((name, value));
        }
        let mode = match self.rate {
            Some(rate) if rate > 0.0 && rate.is_finite() => Mode::Open { rate },
            Some(_) => return Err("--rate: must be a positive number".into()),
            None if self.connections == 0 => return Err("--connections: must be at least 1".into()),
            None => Mode::Closed {
                connections: self.connections,
            },
        };
        if self.duration.is_zero() {
            return Err("--duration: must be more than 0".into());
        }
        let jobs = match self.jobs {
            false => None,
            true if self.poll_ms == 0 => return Err("--poll-ms: must be at least 1".into()),
            true => Some(JobsPlan {
                poll: Duration::from_millis(self.poll_ms),
                drain: Duration::from_millis(self.drain_ms),
            }),
        };
        Ok(Plan {
            uri,
            keys,
            headers,
            body: make_body(self.body_size),
            duration: self.duration,
            mode,
            max_outstanding: self.max_outstanding.max(1),
            jobs,
        })
    }
}

/// A JSON body of exactly `size` bytes where possible.
fn make_body(size: usize) -> Bytes {
    let frame = r#"{"InputImage":""}"#;
    if size <= frame.len() {
        return Bytes::from(frame.as_bytes()[..size].to_vec());
    }
    let pad = "x".repeat(size - frame.len());
    Bytes::from(format!(r#"{{"InputImage":"{pad}"}}"#))
}

/// Runs the plan and returns the summary.
pub async fn run(plan: Plan, progress: bool) -> Report {
    driver::run(plan, progress).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_asked_size() {
        assert_eq!(make_body(256).len(), 256);
        assert_eq!(make_body(3).len(), 3);
        assert!(serde_json::from_slice::<serde_json::Value>(&make_body(1000)).is_ok());
    }
}
