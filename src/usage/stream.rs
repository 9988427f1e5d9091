//! Usage events on NATS JetStream (SPEC §11): a publisher that follows the
//! store's durable event feed (the store is the outbox), publishes each
//! event as its CloudEvents JSON on `<subject>.<root account>` with
//! `Nats-Msg-Id` = the event id, waits for JetStream's ack, and only then
//! moves the watermark it keeps in the store.
//!
//! A task never waits for NATS: events are committed first and published
//! after. NATS down or slow, the lag grows and the publisher retries on
//! its own; a crash between a publish and its watermark publishes that
//! event again, and the stream's duplicate window drops it. Events are
//! published one at a time, in feed order, each acked before the next, so
//! a consumer sees each account's events in commit order even across a
//! failure (a pipelined batch could store event k+1 while k failed).
//!
//! In cluster mode one replica publishes: the one holding the publisher's
//! claim, an in-progress marker held with the replica's lease (the
//! mechanism of idempotency keys), so a dead publisher is replaced within
//! a lease and carries on from the shared watermark.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::Publish};
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::EventsConfig;
use crate::idempotency::{IdempotencyKey, InProgress};
use crate::metrics::StreamMetrics;

use crate::store::{Store, StoreError, StoredEvent, Write, commit};

/// The watermark's name in the store.
pub const WATERMARK: &str = "nats";
/// Events read from the feed at once.
const PAGE: usize = 500;
/// The longest the publisher waits for a new commit before looking.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// Between attempts while NATS cannot be reached (doubling up to the max).
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// One publish and its ack.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
struct Head {
    id: String,
    subject: String,
}

/// Why a pass stopped.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Publisher {
    pub config: EventsConfig,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<StreamMetrics>,
    /// Poked on each commit of this replica.
    pub committed: Arc<Notify>,
    /// Who may publish (in cluster mode shared through Redis).
    pub claims: Arc<dyn InProgress>,
}

impl Publisher {
    /// Runs until `stop`. Never fails: NATS and store errors are logged,
    /// counted and retried.
    pub async fn run(self, stop: CancellationToken) {
        let claim_key = IdempotencyKey::internal("stream-publisher");
        let mut retry = RETRY_FIRST;
        loop {
            if stop.is_cancelled() {
                return;
            }
            // Held for as long as this replica publishes.
            let claim = match self.claims.take("", &claim_key).await {
                Ok(m) => m,
                Err(_) => {
                    // Another replica publishes (or Redis is away).
                    self.metrics.publishing.set(0);
                    if sleep_or_stop(&stop, POLL_EVERY * 5).await {
                        return;
                    }
                    continue;
                }
            };
            self.metrics.publishing.set(1);
            match self.connect().await {
                Ok(js) => {
                    retry = RETRY_FIRST;
                    match self.publish_until_error(&js, &stop).await {
                        Ok(()) => return,
                        Err(e) => {
                            self.metrics.errors.inc();
                            tracing::warn!(error = %e, "usage events not published for now; retrying (they wait in the store)");
                        }
                    }
                }
                Err(e) => {
                    self.metrics.errors.inc();
                    tracing::warn!(error = %e, "NATS cannot be reached; usage events wait in the store");
                }
            }
            drop(claim);
            if sleep_or_stop(&stop, retry).await {
                return;
            }
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    async fn connect(&self) -> Result<jetstream::Context, PassError> {
        let nats = |e: &dyn std::fmt::Display| PassError::Nats(e.to_string());
        let mut opts = if self.config.creds_file.is_empty() {
            async_nats::ConnectOptions::new()
        } else {
            async_nats::ConnectOptions::with_credentials_file(&self.config.creds_file)
                .await
                .map_err(|e| nats(&e))?
        };
        opts = opts
            .connection_timeout(Duration::from_secs(5))
            .name("tollgate");
        let client = opts
            .connect(self.config.nats_url.as_str())
            .await
            // The URL may hold a password: never in the message.
            .map_err(|e| PassError::Nats(format!("connect to events.nats_url: {}", e.kind())))?;
        let mut js = jetstream::new(client);
        js.set_timeout(ACK_TIMEOUT);
        js.get_or_create_stream(jetstream::stream::Config {
            name: self.config.stream_name.clone(),
            subjects: vec![format!("{}.>", self.config.subject)],
            max_age: self.config.max_age,
            duplicate_window: self.config.duplicate_window,
            ..Default::default()
        })
        .await
        .map_err(|e| nats(&e))?;
        Ok(js)
    }

    /// Publishes from the watermark on, as events are committed, until an
    /// error (returned) or `stop` (`Ok`).
    async fn publish_until_error(
        &self,
        js: &jetstream::Context,
        stop: &CancellationToken,
    ) -> Result<(), PassError> {
        let mut mark = self.store.watermark(WATERMARK).await?;
        loop {
            let events = self.store.usage_events(mark, PAGE).await?;
            if events.len() == PAGE {
                // More than a page behind: the lag is to the feed's end.
                let end = self.store.feed_end().await?;
                self.metrics.lag.set(end.saturating_sub(mark) as i64);
            } else if let Some(last) = events.last() {
                self.metrics.lag.set(last.seq.saturating_sub(mark) as i64);
            }
            let full = events.len() == PAGE;
            let from = mark;
            let mut failed = None;
            for e in &events {
                if let Err(err) = self.publish(js, e).await {
                    failed = Some(err);
                    break;
                }
                mark = e.seq;
                self.metrics.published.inc();
            }
            if mark > from {
                // What was acked stays published, even if the rest failed.
                commit(
                    &*self.store,
                    Write::SetWatermark {
                        name: WATERMARK.into(),
                        seq: mark,
                    },
                )
                .await?;
            }
            if let Some(err) = failed {
                return Err(err);
            }
            if full {
                continue;
            }
            let end = self.store.feed_end().await?;
            self.metrics.lag.set(end.saturating_sub(mark) as i64);
            if end > mark {
                continue;
            }
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = self.committed.notified() => {}
                () = tokio::time::sleep(POLL_EVERY) => {}
            }
        }
    }

    async fn publish(&self, js: &jetstream::Context, e: &StoredEvent) -> Result<(), PassError> {
        let head: Head = serde_json::from_str(e.event.get()).map_err(|err| {
            PassError::Nats(format!("event {} is not CloudEvents JSON: {err}", e.seq))
        })?;
        let subject = format!("{}.{}", self.config.subject, head.subject);
        let publish = Publish::build()
            .payload(Bytes::copy_from_slice(e.event.get().as_bytes()))
            .message_id(&head.id);
        let ack = js
            .send_publish(subject, publish)
            .await
            .map_err(|err| PassError::Nats(err.to_string()))?;
        ack.await.map_err(|err| PassError::Nats(err.to_string()))?;
        Ok(())
    }
}

/// Sleeps `d`; `true` if `stop` came first.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}
