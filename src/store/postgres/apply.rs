//! One write, applied inside the writer's transaction: the same statements
//! and guards as the SQLite store's `apply`, in PostgreSQL's dialect.

use jiff::Timestamp;
use rust_decimal::Decimal;
use tokio_postgres::Transaction;
use tokio_postgres::types::ToSql;

use super::super::{Committed, StoreError, UsageCounts, Write, changed_accounts};
use super::{internal, pg_write_error};
use crate::billing::{ChargeCandidate, PackageKind, Source, charge_order};
use crate::idempotency::IdempotencyRecord;
use crate::jobs::JobResult;

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

async fn insert(
    tx: &Transaction<'_>,
    sql: &str,
    params: Params<'_>,
    what: &str,
) -> Result<(), StoreError> {
    tx.execute(sql, params)
        .await
        .map_err(|e| pg_write_error(e, what))?;
    Ok(())
}

/// Runs a statement that must change exactly one row.
async fn update_one(
    tx: &Transaction<'_>,
    sql: &str,
    params: Params<'_>,
    what: &str,
) -> Result<(), StoreError> {
    let n = tx
        .execute(sql, params)
        .await
        .map_err(|e| pg_write_error(e, what))?;
    if n == 0 {
        return Err(StoreError::NotFound(what.to_string()));
    }
    Ok(())
}

/// An update of exactly one row that returns the row's account.
async fn update_returning(
    tx: &Transaction<'_>,
    sql: &str,
    params: Params<'_>,
    what: &str,
) -> Result<String, StoreError> {
    tx.query_opt(sql, params)
        .await
        .map_err(|e| pg_write_error(e, what))?
        .map(|r| r.get(0))
        .ok_or_else(|| StoreError::NotFound(what.to_string()))
}

/// One usage event as stored: what a spooled event carries too.
pub(super) struct UsageRow<'a> {
    pub id: &'a str,
    pub account: &'a str,
    pub time: &'a str,
    pub charged_to: &'a str,
    pub json: &'a str,
    pub package: Option<&'a str>,
    pub month: &'a str,
    pub idempotency: Option<&'a IdempotencyRecord>,
    pub job: Option<&'a JobResult>,
}

/// Inserts the event and, with it, its counters and its charge (the
/// reserved package, or the payer the commit falls through to).
/// `redelivery`: the event may already be stored (a spooled event whose
/// first commit's outcome was unknown): then nothing happens and `None` is
/// returned; and an account with no payer left does not refuse an event
/// the client was already answered for (it is logged instead).
pub(super) async fn append_usage(
    tx: &deadpool_postgres::Transaction<'_>,
    u: &UsageRow<'_>,
    redelivery: bool,
    counts: &mut UsageCounts,
) -> Result<(Option<u64>, Option<Source>), StoreError> {
    // The hot path of every success: statements prepared once per
    // connection, so each one is one round trip (a text query would be a
    // parse round trip and then an execute round trip).
    let time: Timestamp = u
        .time
        .parse()
        .map_err(|e| internal(format!("usage event {}: bad time {}: {e}", u.id, u.time)))?;
    let what = format!("usage event {}", u.id);
    if redelivery {
        // A spooled event delivered again after a crash: charged once.
        let seen = prepared(tx, "SELECT 1 FROM usage_events WHERE id = $1").await?;
        if tx
            .query_opt(&seen, &[&u.id])
            .await
            .map_err(|e| pg_write_error(e, &what))?
            .is_some()
        {
            return Ok((None, None));
        }
    }
    if let Some(r) = u.idempotency {
        match remember(tx, r).await {
            // A spooled success whose key another task took meanwhile:
            // its event still counts (the client was answered).
            Err(StoreError::Conflict(why)) if redelivery => {
                tracing::warn!(event = %u.id, "spooled event delivered without its idempotency record: {why}");
            }
            other => other?,
        }
    }
    // The charge is decided first: the stored event says who paid.
    let fell_through = match charge(tx, u, time).await {
        Err(StoreError::NotFound(why)) if redelivery => {
            tracing::warn!(event = %u.id, "spooled event delivered without its charge: no {why}");
            None
        }
        other => other?,
    };
    let relabelled = match &fell_through {
        Some(payer) => Some(super::super::relabel(u.json, payer)?),
        None => None,
    };
    let (charged_to, json) = match &relabelled {
        Some((label, json)) => (label.as_str(), json.as_str()),
        None => (u.charged_to, u.json),
    };
    if let Some(r) = u.job {
        match super::jobs::succeed(tx, r, charged_to).await {
            // A spooled job success whose job ended meanwhile another way
            // (it cannot: only this replica ran it); its event still counts.
            Err(StoreError::Conflict(why)) if redelivery => {
                tracing::warn!(event = %u.id, "spooled event delivered without its job result: {why}");
            }
            other => other?,
        }
    }
    let insert_event = prepared(
        tx,
        "INSERT INTO usage_events(id, account, time, charged_to, json) VALUES ($1, $2, $3, $4, $5)
         RETURNING seq",
    )
    .await?;
    let row = tx
        .query_one(
            &insert_event,
            &[&u.id, &u.account, &time, &charged_to, &json],
        )
        .await
        .map_err(|e| pg_write_error(e, &what))?;
    let seq: i64 = row.get(0);
    let source = charged_to.split(':').next().unwrap_or("postpaid");
    counts.add(u.account, u.month, source);
    Ok((Some(seq as u64), fell_through))
}

/// Writes a batch's usage counts in one statement (one round trip, where
/// an upsert per event was one each).
pub(super) async fn write_counts(
    tx: &deadpool_postgres::Transaction<'_>,
    counts: &UsageCounts,
) -> Result<(), StoreError> {
    let (mut accounts, mut months, mut sources, mut calls) = (vec![], vec![], vec![], vec![]);
    for (account, month, source, n) in counts.rows() {
        accounts.push(account);
        months.push(month);
        sources.push(source);
        calls.push(n);
    }
    if accounts.is_empty() {
        return Ok(());
    }
    let upsert = prepared(
        tx,
        "INSERT INTO usage_counters(account, month, source, calls)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
         ON CONFLICT (account, month, source) DO UPDATE SET calls = usage_counters.calls + excluded.calls",
    )
    .await?;
    tx.execute(&upsert, &[&accounts, &months, &sources, &calls])
        .await
        .map_err(|e| pg_write_error(e, "usage counters"))?;
    Ok(())
}

async fn prepared(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &'static str,
) -> Result<tokio_postgres::Statement, StoreError> {
    tx.prepare_cached(sql)
        .await
        .map_err(|e| pg_write_error(e, "a usage statement"))
}

/// Stores a key's record, unless a live one holds the key (`Conflict`):
/// an expired record is replaced.
async fn remember(
    tx: &deadpool_postgres::Transaction<'_>,
    r: &IdempotencyRecord,
) -> Result<(), StoreError> {
    let (status, headers, body) = super::super::answer_columns(r);
    let st = prepared(
        tx,
        "INSERT INTO idempotency_keys
         (account, idem_key, fingerprint, status, headers, body, created_at_ms, expires_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (account, idem_key) DO UPDATE SET
           fingerprint = excluded.fingerprint, status = excluded.status,
           headers = excluded.headers, body = excluded.body,
           created_at_ms = excluded.created_at_ms, expires_at_ms = excluded.expires_at_ms
         WHERE idempotency_keys.expires_at_ms <= excluded.created_at_ms",
    )
    .await?;
    let fp: &[u8] = &r.fingerprint.0;
    let n = tx
        .execute(
            &st,
            &[
                &r.account,
                &r.key,
                &fp,
                &status,
                &headers,
                &body,
                &r.created_at_ms,
                &r.expires_at_ms,
            ],
        )
        .await
        .map_err(|e| pg_write_error(e, "idempotency key"))?;
    if n == 0 {
        return Err(StoreError::Conflict(format!(
            "idempotency key of account {} (already remembered)",
            r.account
        )));
    }
    Ok(())
}

/// Charges one unit of the reserved package if it can still pay, else the
/// next payer in the deduction order; `Some` names the payer when it is
/// not the reserved one. See the `Store` contract. Concurrent commits of
/// other replicas are safe: each charge is one guarded update.
async fn charge(
    tx: &deadpool_postgres::Transaction<'_>,
    u: &UsageRow<'_>,
    at: Timestamp,
) -> Result<Option<Source>, StoreError> {
    let Some(reserved) = u.package else {
        return Ok(None);
    };
    let what = format!("resource package {reserved}");
    let update = prepared(
        tx,
        "UPDATE resource_packages SET used = used + 1
         WHERE id = $1 AND used < size AND refunded_at IS NULL",
    )
    .await?;
    let try_charge = |id: String| {
        let update = &update;
        let what = &what;
        async move {
            tx.execute(update, &[&id])
                .await
                .map(|n| n == 1)
                .map_err(|e| pg_write_error(e, what))
        }
    };
    if try_charge(reserved.to_string()).await? {
        return Ok(None);
    }
    let rows = tx
        .query(
            "SELECT id, kind, effective_at, expires_at FROM resource_packages
             WHERE account = $1 AND refunded_at IS NULL AND used < size",
            &[&u.account],
        )
        .await
        .map_err(|e| pg_write_error(e, &what))?;
    let mut candidates = Vec::with_capacity(rows.len());
    for r in rows {
        let id: String = r.get(0);
        let kind: String = r.get(1);
        candidates.push(ChargeCandidate {
            kind: PackageKind::parse(&kind)
                .ok_or_else(|| internal(format!("package {id}: bad kind")))?,
            effective_at: r.get(2),
            expires_at: r.get(3),
            id,
        });
    }
    for c in charge_order(candidates, at) {
        if c.id != reserved && try_charge(c.id.clone()).await? {
            return Ok(Some(Source::Package {
                id: c.id,
                kind: c.kind,
            }));
        }
    }
    let postpaid = tx
        .query_opt("SELECT postpaid FROM accounts WHERE id = $1", &[&u.account])
        .await
        .map_err(|e| pg_write_error(e, &what))?
        .map(|r| r.get::<_, bool>(0));
    if postpaid == Some(true) {
        return Ok(Some(Source::Postpaid));
    }
    Err(StoreError::NotFound(format!(
        "a payer for account {}: resource package {reserved} has no unit left and postpaid is off",
        u.account
    )))
}

/// Applies one write; returns its result and the root accounts whose
/// durable state it changed (for the change feed).
pub(super) async fn apply(
    tx: &deadpool_postgres::Transaction<'_>,
    write: &Write,
    counts: &mut UsageCounts,
) -> Result<(Committed, Vec<String>), StoreError> {
    let mut changed = changed_accounts(write);
    match write {
        Write::CreateAccount { account: a, free_package: p } => {
            insert(
                tx,
                "INSERT INTO accounts(id, status, created_at, postpaid, balance_usd, arrears_since)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&a.id, &a.status.as_str(), &a.created_at, &a.postpaid, &a.balance_usd, &a.arrears_since],
                &format!("account {}", a.id),
            )
            .await?;
            insert_resource_package(tx, p).await?;
        }
        Write::SetAccountStatus { id, status } => {
            update_one(
                tx,
                "UPDATE accounts SET status = $2 WHERE id = $1",
                &[id, &status.as_str()],
                &format!("account {id}"),
            )
            .await?
        }
        Write::CreateSubAccount(s) => {
            let cap = s.max_concurrency.map(i64::from);
            insert(
                tx,
                "INSERT INTO sub_accounts(id, root, max_concurrency, created_at) VALUES ($1, $2, $3, $4)",
                &[&s.id, &s.root, &cap, &s.created_at],
                &format!("sub-account {}", s.id),
            )
            .await?
        }
        Write::CreateKey(k) => {
            let hash: &[u8] = &k.hash[..];
            insert(
                tx,
                "INSERT INTO api_keys(key_id, hash, root, sub, created_at, sealed_secret)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&k.key_id, &hash, &k.root, &k.sub, &k.created_at, &k.sealed_secret],
                &format!("key {}", k.key_id),
            )
            .await?
        }
        Write::RevokeKey { key_id, at } => changed.push(
            update_returning(
                tx,
                "UPDATE api_keys SET revoked_at = $2 WHERE key_id = $1 AND revoked_at IS NULL
                 RETURNING root",
                &[key_id, at],
                &format!("key {key_id}"),
            )
            .await?,
        ),
        Write::SubmitJob { job, body, max_pending, idempotency } => {
            if let Some(r) = idempotency {
                remember(tx, r).await?;
            }
            let done = super::jobs::submit(tx, job, body, *max_pending).await?;
            return Ok((done, changed));
        }
        Write::StartJob { id, at } => super::jobs::start(tx, id, *at).await?,
        Write::SetWatermark { name, seq } => {
            let seq = *seq as i64;
            insert(
                tx,
                "INSERT INTO watermarks(name, seq) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET seq = greatest(watermarks.seq, excluded.seq)",
                &[name, &seq],
                "watermark",
            )
            .await?
        }
        Write::EndJob { id, end, from, at } => super::jobs::end(tx, id, end, from, *at).await?,
        Write::PurgeJobs { before_ms, limit } => {
            let n = super::jobs::purge(tx, *before_ms, *limit).await?;
            return Ok((Committed::Purged(n), changed));
        }
        Write::PurgeIdempotency { before_ms, limit } => {
            let n = tx
                .execute(
                    "DELETE FROM idempotency_keys WHERE ctid IN
                     (SELECT ctid FROM idempotency_keys WHERE expires_at_ms <= $1 LIMIT $2)",
                    &[before_ms, &i64::from(*limit)],
                )
                .await
                .map_err(|e| pg_write_error(e, "expired idempotency keys"))?;
            return Ok((Committed::Purged(n), changed));
        }
        Write::AppendUsage { event, json, package, month, idempotency, job } => {
            let row = UsageRow {
                idempotency: idempotency.as_deref(),
                job: job.as_deref(),
                id: &event.id,
                account: &event.subject,
                time: &event.time,
                charged_to: &event.data.charged_to,
                json,
                package: package.as_deref(),
                month,
            };
            let (seq, fell_through) = append_usage(tx, &row, false, counts).await?;
            return Ok((Committed::Usage { seq, fell_through }, changed));
        }
        Write::CreateConcurrencyPackage(p) => {
            let units = i64::from(p.units);
            insert(
                tx,
                "INSERT INTO concurrency_packages
                 (id, account, units, period, start_date, starts_at, ends_at, price_usd, bought_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[&p.id, &p.account, &units, &p.period.as_str(), &p.start, &p.starts_at, &p.ends_at, &p.price_usd, &p.bought_at],
                &format!("concurrency package {}", p.id),
            )
            .await?
        }
        Write::RefundConcurrencyPackage { id, at } => changed.push(
            update_returning(
                tx,
                "UPDATE concurrency_packages SET refunded_at = $2 WHERE id = $1 AND refunded_at IS NULL
                 RETURNING account",
                &[id, at],
                &format!("concurrency package {id}"),
            )
            .await?,
        ),
        Write::CreateResourcePackage(p) => insert_resource_package(tx, p).await?,
        Write::RefundResourcePackage { id, at } => changed.push(
            update_returning(
                tx,
                "UPDATE resource_packages SET refunded_at = $2
                 WHERE id = $1 AND refunded_at IS NULL AND used = 0 AND kind = 'prepaid'
                 RETURNING account",
                &[id, at],
                &format!("unused prepaid package {id}"),
            )
            .await?,
        ),
        Write::SetPostpaid { account, enabled } => {
            update_one(
                tx,
                "UPDATE accounts SET postpaid = $2 WHERE id = $1",
                &[account, enabled],
                &format!("account {account}"),
            )
            .await?
        }
        Write::TopUp { account, amount_usd, balance_before_usd, balance_after_usd, arrears_since, at } => {
            set_balance(tx, account, balance_before_usd, balance_after_usd, arrears_since).await?;
            ledger(tx, account, "top-up", amount_usd, balance_after_usd, "", at).await?;
        }
        Write::Settle { month, lines, at } => {
            for l in lines {
                let (calls, units) = (l.bill.calls as i64, l.bill.postpaid_units as i64);
                insert(
                    tx,
                    "INSERT INTO settlements
                     (account, month, calls, postpaid_units, unit_price_usd, amount_usd, settled_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (account, month) DO UPDATE SET calls = EXCLUDED.calls,
                       postpaid_units = EXCLUDED.postpaid_units, unit_price_usd = EXCLUDED.unit_price_usd,
                       amount_usd = EXCLUDED.amount_usd, settled_at = EXCLUDED.settled_at",
                    &[&l.account, month, &calls, &units, &l.bill.tier.unit_price_usd, &l.bill.amount_usd, at],
                    &format!("settlement of {} for {month}", l.account),
                )
                .await?;
                set_balance(tx, &l.account, &l.balance_before_usd, &l.balance_after_usd, &l.arrears_since)
                    .await?;
                ledger(tx, &l.account, "settlement", &(-l.delta_usd), &l.balance_after_usd, month, at).await?;
            }
        }
    }
    Ok((Committed::Done, changed))
}

async fn insert_resource_package(
    tx: &Transaction<'_>,
    p: &crate::billing::ResourcePackage,
) -> Result<(), StoreError> {
    let (size, used) = (p.size as i64, p.used as i64);
    insert(
        tx,
        "INSERT INTO resource_packages
         (id, account, kind, size, used, effective_at, expires_at, price_usd, refunded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &p.id,
            &p.account,
            &p.kind.as_str(),
            &size,
            &used,
            &p.effective_at,
            &p.expires_at,
            &p.price_usd,
            &p.refunded_at,
        ],
        &format!("resource package {}", p.id),
    )
    .await
}

/// Compare-and-set of an account's balance: another replica's change in
/// between makes this one a `Conflict` (the caller reads and retries).
async fn set_balance(
    tx: &Transaction<'_>,
    account: &str,
    before: &Decimal,
    balance: &Decimal,
    arrears_since: &Option<Timestamp>,
) -> Result<(), StoreError> {
    let what = format!("account {account}");
    let n = tx
        .execute(
            "UPDATE accounts SET balance_usd = $2, arrears_since = $3 WHERE id = $1 AND balance_usd = $4",
            &[&account, balance, arrears_since, before],
        )
        .await
        .map_err(|e| pg_write_error(e, &what))?;
    if n == 0 {
        return Err(StoreError::Conflict(format!(
            "the balance of {what} changed meanwhile"
        )));
    }
    Ok(())
}

async fn ledger(
    tx: &Transaction<'_>,
    account: &str,
    kind: &str,
    amount: &Decimal,
    balance_after: &Decimal,
    memo: &str,
    at: &Timestamp,
) -> Result<(), StoreError> {
    insert(
        tx,
        "INSERT INTO ledger(account, kind, amount_usd, balance_after_usd, memo, at) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&account, &kind, amount, balance_after, &memo, at],
        "ledger entry",
    )
    .await
}
