//! Grant hints: every script that grants or refuses a queued ticket
//! publishes it on its owner's channel. A hint only speeds things up; the
//! heartbeat finds every grant and refusal anyway, so a message lost while
//! this connection is down costs at most a quarter lease of waiting.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::PubSub;

use super::coordinator::{ClusterError, Coordinator};
use super::tickets::Signal;
use crate::limiter::LimitError;

const RECONNECT_AFTER: Duration = Duration::from_millis(500);

/// Subscribes before returning, so no grant made after start is missed,
/// then listens in the background until the coordinator stops.
pub(super) async fn start(coord: &Arc<Coordinator>) -> Result<(), ClusterError> {
    let channel = format!("{}{}", coord.channel_prefix, coord.instance);
    let first = subscribe(&coord.client, &channel).await?;
    let weak = Arc::downgrade(coord);
    let client = coord.client.clone();
    let stop = coord.stop.clone();
    tokio::spawn(async move {
        let mut conn = Some(first);
        loop {
            if let Some(ps) = conn.take() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = listen(ps, &weak) => {}
                }
                tracing::debug!("grant hint connection lost");
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(RECONNECT_AFTER) => {}
            }
            conn = subscribe(&client, &channel).await.ok();
        }
    });
    Ok(())
}

async fn subscribe(client: &redis::Client, channel: &str) -> Result<PubSub, ClusterError> {
    let connect = async {
        let mut ps = client.get_async_pubsub().await?;
        ps.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(ps)
    };
    match tokio::time::timeout(Duration::from_secs(2), connect).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ClusterError::Timeout(Duration::from_secs(2))),
    }
}

async fn listen(mut ps: PubSub, coord: &Weak<Coordinator>) {
    let mut messages = ps.on_message();
    while let Some(msg) = messages.next().await {
        let Some(coord) = coord.upgrade() else { return };
        let Ok(payload) = msg.get_payload::<String>() else {
            continue;
        };
        match parse(&payload) {
            Some(("G", counts, ticket)) => coord.signal_with(ticket, &counts, Signal::Granted),
            Some(("R", counts, ticket)) => {
                coord.signal_with(ticket, &counts, Signal::Refused(LimitError::Refused))
            }
            _ => tracing::debug!(%payload, "unknown grant hint"),
        }
    }
}

/// `<kind> <version> <limit> <holders> <queued> <ewma_ms> <ticket>`.
fn parse(payload: &str) -> Option<(&str, [i64; 5], &str)> {
    let mut parts = payload.splitn(7, ' ');
    let kind = parts.next()?;
    let mut counts = [0i64; 5];
    for c in &mut counts {
        *c = parts.next()?.parse().ok()?;
    }
    Some((kind, counts, parts.next()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hints_parse() {
        assert_eq!(
            super::parse("G 7 3 3 1 250 gw a:00ff:12"),
            Some(("G", [7, 3, 3, 1, 250], "gw a:00ff:12"))
        );
        assert_eq!(super::parse("G 7 3"), None);
    }
}
