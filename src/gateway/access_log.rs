//! The access log: one line per task, whatever its end, written when the
//! task's outcome is counted (see `tally`), so the log and
//! `tollgate_requests_total` always agree.
//!
//! Lines go through `tracing` under the target [`TARGET`], so they take the
//! configured format (text or JSON) and can be switched off
//! (`log.access = false`) without touching the other logs. Secrets never
//! appear: no header is logged, and the path is logged without its query.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, StatusCode, Uri};

use crate::accounts::Principal;

/// The `tracing` target of access lines.
pub const TARGET: &str = "tollgate::access";

/// A path longer than this is cut in the log (it is the client's to choose).
const MAX_LOGGED_PATH: usize = 256;

/// What is known of a task as it goes; logged once at its end.
pub struct AccessLine {
    started: Instant,
    request_id: HeaderValue,
    method: Method,
    uri: Uri,
    bytes_in: Option<u64>,
    account: Option<Arc<str>>,
    sub_account: Option<Arc<str>>,
    queue_wait: Option<Duration>,
    upstream: Option<Duration>,
    charged_to: Option<String>,
}

impl AccessLine {
    pub fn new<B>(req: &http::Request<B>, request_id: &HeaderValue) -> Self {
        Self {
            started: Instant::now(),
            request_id: request_id.clone(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            bytes_in: req
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            account: None,
            sub_account: None,
            queue_wait: None,
            upstream: None,
            charged_to: None,
        }
    }

    pub fn principal(&mut self, principal: &Principal) {
        self.account = Some(principal.root.id.clone());
        self.sub_account = principal.sub.as_ref().map(|s| s.id.clone());
    }

    pub fn queue_wait(&mut self, waited: Duration) {
        self.queue_wait = Some(waited);
    }

    pub fn upstream(&mut self, took: Duration) {
        self.upstream = Some(took);
    }

    pub fn charged_to(&mut self, source: String) {
        self.charged_to = Some(source);
    }

    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Writes the line. `code` is the tollgate error code, if the task
    /// ended in one; `status` what the client got (499: it hung up first).
    pub fn write(&self, status: StatusCode, code: Option<&str>, bytes_out: Option<u64>) {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        let path = self.uri.path();
        let path = match path.char_indices().nth(MAX_LOGGED_PATH) {
            Some((cut, _)) => &path[..cut],
            None => path,
        };
        tracing::info!(
            target: TARGET,
            request_id = self.request_id.to_str().unwrap_or_default(),
            account = self.account.as_deref(),
            sub_account = self.sub_account.as_deref(),
            method = self.method.as_str(),
            path,
            status = status.as_u16(),
            code,
            queue_wait_ms = ms(self.queue_wait),
            upstream_ms = ms(self.upstream),
            total_ms = self.started.elapsed().as_secs_f64() * 1e3,
            bytes_in = self.bytes_in,
            bytes_out,
            charged_to = self.charged_to.as_deref(),
            "task"
        );
    }
}
