//! The change feed: what other replicas (and this one) changed, from the
//! `changes` table. A dedicated connection LISTENs so a change arrives at
//! once; a poll every 250 ms reads the table after the last row seen, so a
//! lost notification heals within a second. Rows are numbered in commit
//! order (the writer's changes lock), so the poll never skips one.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::super::Change;

const POLL_EVERY: Duration = Duration::from_millis(250);
const RECONNECT_EVERY: Duration = Duration::from_millis(500);
const PAGE: i64 = 1000;

/// Runs until `stop`. `last` is the newest change row already reflected in
/// what the caller loaded.
pub(super) async fn run(
    config: tokio_postgres::Config,
    changes: broadcast::Sender<Change>,
    mut last: i64,
    stop: CancellationToken,
) {
    let mut connected_before = false;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let (client, mut connection) = match config.connect(NoTls).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "change feed cannot connect; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT_EVERY) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        let wake = Arc::new(Notify::new());
        let notified = wake.clone();
        let driver = tokio::spawn(async move {
            // Drives the connection; notifications only wake the poll,
            // which reads what changed.
            while let Some(msg) = poll_fn(|cx| connection.poll_message(cx)).await {
                match msg {
                    Ok(AsyncMessage::Notification(_)) => notified.notify_one(),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            notified.notify_one();
        });
        if client
            .batch_execute("LISTEN tollgate_changes")
            .await
            .is_ok()
        {
            if connected_before {
                // Cut off for a while: whatever memory missed, reload all.
                let _ = changes.send(Change::All);
            }
            connected_before = true;
            loop {
                if poll(&client, &mut last, &changes).await.is_err() {
                    break;
                }
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(POLL_EVERY) => {}
                    _ = stop.cancelled() => {
                        driver.abort();
                        return;
                    }
                }
            }
        }
        driver.abort();
        tracing::warn!("change feed connection lost; reconnecting");
    }
}

async fn poll(
    client: &tokio_postgres::Client,
    last: &mut i64,
    changes: &broadcast::Sender<Change>,
) -> Result<(), tokio_postgres::Error> {
    loop {
        let rows = client
            .query(
                "SELECT seq, account FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2",
                &[&*last, &PAGE],
            )
            .await?;
        for r in &rows {
            *last = r.get(0);
            // No subscriber yet is fine.
            let _ = changes.send(Change::Account(r.get(1)));
        }
        if (rows.len() as i64) < PAGE {
            return Ok(());
        }
    }
}
