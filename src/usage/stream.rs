//! Usage events on NATS JetStream (SPEC §11): a publisher that follows the
//! store's durable event feed (the store is the outbox), publishes each
//! event as its CloudEvents JSON on `<subject>.<root account>` with
//! `Nats-Msg-Id` = the event id, waits for JetStream's ack, and only then
//! moves the watermark it keeps in the store.
//!
//! A task never waits for NATS: events are committed first and published
//! after. NATS down or slow, the lag grows and the publisher retries on
//! its own; a crash between a publish and its watermark publishes that
//! event again, and the stream's duplicate window drops it.
//!
//! Publishes are pipelined (up to [`WINDOW`] awaiting their acks) and
//! still stored in feed order: each publish but a pass's first carries
//! `Nats-Expected-Last-Msg-Id` = the event sent before it, so when
//! event k is not stored, k+1 is refused by JetStream rather than stored
//! ahead of it. The pass stops at the first refusal, the watermark moves
//! to the last event acked in order, and the next pass publishes again
//! from there (what was stored meanwhile is a duplicate and dropped;
//! JetStream checks duplicates before the expectation). The stream's
//! contents are therefore always a prefix of the feed, and a consumer
//! sees each account's events in commit order across any failure.
//!
//! In cluster mode one replica publishes: the one holding the publisher's
//! claim, an in-progress marker held with the replica's lease (the
//! mechanism of idempotency keys), so a dead publisher is replaced within
//! a lease and carries on from the shared watermark.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    context::{Publish, PublishAckFuture},
};
use bytes::Bytes;
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
/// Publishes sent and not yet acked, at most. One at a time managed 2,162
/// events/s on loopback (a round trip each), below what one node commits.
pub const WINDOW: usize = 256;
/// The longest the publisher waits for a new commit before looking.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// After a commit wakes it, how long the publisher lets more gather: one
/// pass (a feed read, the acks awaited, a wake) per batch instead of per
/// group commit. Events reach the stream that much later.
const LINGER: Duration = Duration::from_millis(20);
/// How often the watermark is stored while events flow (and on every
/// stop): each store is a durable commit of its own, so not one per pass.
/// A crash publishes at most this much again, as duplicates the stream
/// drops.
const SAVE_MARK_EVERY: Duration = Duration::from_secs(1);
/// Between attempts while NATS cannot be reached (doubling up to the max).
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// One publish and its ack.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// error (returned) or `stop` (`Ok`). What was acked in order stays
    /// published: the watermark is stored on the way out, error or not.
    async fn publish_until_error(
        &self,
        js: &jetstream::Context,
        stop: &CancellationToken,
    ) -> Result<(), PassError> {
        let mark = self.store.watermark(WATERMARK).await?;
        let mut window = Window {
            mark,
            stored_mark: mark,
            stored_at: tokio::time::Instant::now(),
            in_flight: VecDeque::with_capacity(WINDOW),
        };
        let result = self.follow(js, stop, &mut window).await;
        self.save_mark(&mut window).await?;
        result
    }

    async fn follow(
        &self,
        js: &jetstream::Context,
        stop: &CancellationToken,
        window: &mut Window,
    ) -> Result<(), PassError> {
        // The last event sent (its feed position and id): the next publish
        // expects it to be the stream's last.
        let mut sent = window.mark;
        let mut last_id: Option<String> = None;
        loop {
            let events = self.store.usage_events(sent, PAGE).await?;
            for e in &events {
                if window.in_flight.len() >= WINDOW {
                    self.settle(window, WINDOW - 1).await?;
                }
                let (id, ack) = self.send(js, e, last_id.as_deref()).await?;
                window.in_flight.push_back((e.seq, ack));
                sent = e.seq;
                last_id = Some(id);
            }
            if events.len() == PAGE {
                // Far behind: the window stays full.
                self.lag_to_end(window.mark).await?;
                if window.stored_at.elapsed() >= SAVE_MARK_EVERY {
                    self.save_mark(window).await?;
                }
                continue;
            }
            // Caught up with the feed: everything sent is acked before the
            // publisher waits for a commit.
            self.settle(window, 0).await?;
            if window.stored_at.elapsed() >= SAVE_MARK_EVERY {
                self.save_mark(window).await?;
            }
            if self.lag_to_end(window.mark).await? > window.mark {
                continue;
            }
            let woken = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = self.committed.notified() => true,
                () = tokio::time::sleep(POLL_EVERY) => false,
            };
            if woken {
                if sleep_or_stop(stop, LINGER).await {
                    return Ok(());
                }
            } else {
                // Quiet: what was acked is stored now.
                self.save_mark(window).await?;
            }
        }
    }

    /// Awaits the oldest acks until at most `keep` are in flight. The
    /// first failure ends it: the rest in flight are dropped (refused by
    /// their expectation, or duplicates of what the next pass sends).
    async fn settle(&self, window: &mut Window, keep: usize) -> Result<(), PassError> {
        while window.in_flight.len() > keep {
            let (seq, ack) = window.in_flight.pop_front().expect("not empty");
            if let Err(err) = ack.await {
                window.in_flight.clear();
                return Err(PassError::Nats(err.to_string()));
            }
            window.mark = seq;
            self.metrics.published.inc();
        }
        Ok(())
    }

    /// Stores the watermark if the acks moved it.
    async fn save_mark(&self, window: &mut Window) -> Result<(), PassError> {
        if window.mark > window.stored_mark {
            commit(
                &*self.store,
                Write::SetWatermark {
                    name: WATERMARK.into(),
                    seq: window.mark,
                },
            )
            .await?;
            window.stored_mark = window.mark;
        }
        window.stored_at = tokio::time::Instant::now();
        Ok(())
    }

    /// Sets the lag metric from the feed's end; returns the end.
    async fn lag_to_end(&self, mark: u64) -> Result<u64, PassError> {
        let end = self.store.feed_end().await?;
        self.metrics.lag.set(end.saturating_sub(mark) as i64);
        Ok(end)
    }

    /// Sends one event (not awaiting its ack); returns its id and the ack.
    async fn send(
        &self,
        js: &jetstream::Context,
        e: &StoredEvent,
        after: Option<&str>,
    ) -> Result<(String, PublishAckFuture), PassError> {
        let head = e
            .head()
            .ok_or_else(|| PassError::Nats(format!("event {} is not CloudEvents JSON", e.seq)))?;
        let subject = format!("{}.{}", self.config.subject, head.subject);
        let mut publish = Publish::build()
            .payload(Bytes::copy_from_slice(e.event.as_bytes()))
            .message_id(&head.id);
        if let Some(after) = after {
            publish = publish.expected_last_message_id(after);
        }
        let ack = js
            .send_publish(subject, publish)
            .await
            .map_err(|err| PassError::Nats(err.to_string()))?;
        Ok((head.id.clone(), ack))
    }
}

/// The publishes of a pass awaiting their acks, and how far the acks got.
struct Window {
    /// The feed position up to which every event is acked.
    mark: u64,
    /// The watermark as stored, and when.
    stored_mark: u64,
    stored_at: tokio::time::Instant,
    in_flight: VecDeque<(u64, PublishAckFuture)>,
}

/// Sleeps `d`; `true` if `stop` came first.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}
