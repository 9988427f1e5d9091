//! One write, applied inside the writer's transaction.

use rusqlite::{Connection, ErrorCode, params};

use super::super::{Committed, StoreError, UsageCounts, Write, changed_accounts};
use super::internal;
use crate::billing::{ChargeCandidate, PackageKind, Source, charge_order};
use crate::idempotency::IdempotencyRecord;

fn map_write_error(e: rusqlite::Error, what: &str) -> StoreError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e
        && f.code == ErrorCode::ConstraintViolation
    {
        return if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY {
            StoreError::NotFound(what.to_string())
        } else {
            StoreError::Conflict(what.to_string())
        };
    }
    internal(e)
}

/// Runs a statement that must change exactly one row.
pub(super) fn update_one(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    what: &str,
) -> Result<(), StoreError> {
    let n = conn
        .prepare_cached(sql)
        .and_then(|mut st| st.execute(params))
        .map_err(internal)?;
    if n == 0 {
        return Err(StoreError::NotFound(what.to_string()));
    }
    Ok(())
}

/// Runs an update that must change exactly one row and returns the row's
/// account (its first `RETURNING` column).
fn update_returning(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    what: &str,
) -> Result<String, StoreError> {
    use rusqlite::OptionalExtension;
    conn.prepare_cached(sql)
        .and_then(|mut st| st.query_row(params, |r| r.get::<_, String>(0)).optional())
        .map_err(internal)?
        .ok_or_else(|| StoreError::NotFound(what.to_string()))
}

pub(super) fn insert(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    what: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut st| st.execute(params))
        .map_err(|e| map_write_error(e, what))?;
    Ok(())
}

fn opt_ts(t: &Option<jiff::Timestamp>) -> Option<String> {
    t.map(|t| t.to_string())
}

/// Writes a batch's usage counts, one upsert per row; a failure here is
/// the batch's, not one write's.
pub(super) fn write_counts(conn: &Connection, counts: &UsageCounts) -> rusqlite::Result<()> {
    let mut upsert = conn.prepare_cached(
        "INSERT INTO usage_counters(account, month, source, calls) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(account, month, source) DO UPDATE SET calls = calls + excluded.calls",
    )?;
    for (account, month, source, calls) in counts.rows() {
        upsert.execute(params![account, month, source, calls])?;
    }
    Ok(())
}

/// Applies one write; returns its result and the root accounts whose
/// durable state it changed (for the change feed). Usage counts go to
/// `counters`, for the caller to write before it commits.
pub(super) fn apply(
    conn: &Connection,
    write: &Write,
    counters: &mut UsageCounts,
) -> Result<(Committed, Vec<String>), StoreError> {
    let mut changed = changed_accounts(write);
    match write {
        Write::CreateAccount {
            account: a,
            free_package: p,
        } => {
            insert(
                conn,
                "INSERT INTO accounts(id, status, created_at, postpaid, balance_usd, arrears_since)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    a.id,
                    a.status.as_str(),
                    a.created_at.to_string(),
                    a.postpaid,
                    a.balance_usd.to_string(),
                    opt_ts(&a.arrears_since)
                ],
                &format!("account {}", a.id),
            )?;
            insert_resource_package(conn, p)?;
        }
        Write::SetAccountStatus { id, status } => update_one(
            conn,
            "UPDATE accounts SET status = ?2 WHERE id = ?1",
            params![id, status.as_str()],
            &format!("account {id}"),
        )?,
        Write::CreateSubAccount(s) => insert(
            conn,
            "INSERT INTO sub_accounts(id, root, max_concurrency, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![s.id, s.root, s.max_concurrency, s.created_at.to_string()],
            &format!("sub-account {}", s.id),
        )?,
        Write::CreateKey(k) => insert(
            conn,
            "INSERT INTO api_keys(key_id, hash, root, sub, created_at, sealed_secret)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                k.key_id,
                &k.hash[..],
                k.root,
                k.sub,
                k.created_at.to_string(),
                k.sealed_secret
            ],
            &format!("key {}", k.key_id),
        )?,
        Write::RevokeKey { key_id, at } => changed.push(update_returning(
            conn,
            "UPDATE api_keys SET revoked_at = ?2 WHERE key_id = ?1 AND revoked_at IS NULL
             RETURNING root",
            params![key_id, at.to_string()],
            &format!("key {key_id}"),
        )?),
        Write::AppendUsage {
            event,
            json,
            package,
            month,
            idempotency,
            job,
        } => {
            if let Some(r) = idempotency {
                remember(conn, r)?;
            }
            // The charge is decided first: the stored event says who paid.
            let fell_through = charge(conn, event, package.as_deref())?;
            let relabelled = match &fell_through {
                Some(payer) => Some(super::super::relabel(json, payer)?),
                None => None,
            };
            let (charged_to, json) = match &relabelled {
                Some((label, json)) => (label.as_str(), json.as_str()),
                None => (event.data.charged_to.as_str(), json.as_str()),
            };
            if let Some(r) = job {
                super::jobs::succeed(conn, r, charged_to)?;
            }
            insert(
                conn,
                "INSERT INTO usage_events(id, account, time, charged_to, json) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![event.id, event.subject, event.time, charged_to, json],
                &format!("usage event {}", event.id),
            )?;
            let seq = conn.last_insert_rowid() as u64;
            let source = charged_to.split(':').next().unwrap_or("postpaid");
            counters.add(&event.subject, month, source);
            return Ok((
                Committed::Usage {
                    seq: Some(seq),
                    fell_through,
                },
                changed,
            ));
        }
        Write::PurgeIdempotency { before_ms, limit } => {
            let n = conn
                .prepare_cached(
                    "DELETE FROM idempotency_keys WHERE rowid IN
                     (SELECT rowid FROM idempotency_keys WHERE expires_at_ms <= ?1 LIMIT ?2)",
                )
                .and_then(|mut st| st.execute(params![before_ms, limit]))
                .map_err(internal)?;
            return Ok((Committed::Purged(n as u64), changed));
        }
        Write::SubmitJob {
            job,
            body,
            max_pending,
            idempotency,
        } => {
            let done = super::jobs::submit(
                conn,
                job,
                body,
                *max_pending,
                idempotency.as_deref(),
                remember,
            )?;
            return Ok((done, changed));
        }
        Write::StartJob { id, at } => super::jobs::start(conn, id, *at)?,
        Write::SetWatermark { name, seq } => insert(
            conn,
            "INSERT INTO meta(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
            params![format!("watermark:{name}"), *seq as i64],
            "watermark",
        )?,
        Write::EndJob { id, end, from, at } => super::jobs::end(conn, id, end, from, *at)?,
        Write::PurgeJobs { before_ms, limit } => {
            let n = super::jobs::purge(conn, *before_ms, *limit)?;
            return Ok((Committed::Purged(n), changed));
        }
        Write::CreateConcurrencyPackage(p) => insert(
            conn,
            "INSERT INTO concurrency_packages
             (id, account, units, period, start_date, starts_at, ends_at, price_usd, bought_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                p.id,
                p.account,
                p.units,
                p.period.as_str(),
                p.start.to_string(),
                p.starts_at.to_string(),
                p.ends_at.to_string(),
                p.price_usd.to_string(),
                p.bought_at.to_string()
            ],
            &format!("concurrency package {}", p.id),
        )?,
        Write::RefundConcurrencyPackage { id, at } => changed.push(update_returning(
            conn,
            "UPDATE concurrency_packages SET refunded_at = ?2 WHERE id = ?1 AND refunded_at IS NULL
             RETURNING account",
            params![id, at.to_string()],
            &format!("concurrency package {id}"),
        )?),
        Write::CreateResourcePackage(p) => insert_resource_package(conn, p)?,
        Write::RefundResourcePackage { id, at } => changed.push(update_returning(
            conn,
            "UPDATE resource_packages SET refunded_at = ?2
             WHERE id = ?1 AND refunded_at IS NULL AND used = 0 AND kind = 'prepaid'
             RETURNING account",
            params![id, at.to_string()],
            &format!("unused prepaid package {id}"),
        )?),
        Write::SetPostpaid { account, enabled } => update_one(
            conn,
            "UPDATE accounts SET postpaid = ?2 WHERE id = ?1",
            params![account, enabled],
            &format!("account {account}"),
        )?,
        Write::TopUp {
            account,
            amount_usd,
            balance_before_usd,
            balance_after_usd,
            arrears_since,
            at,
        } => {
            set_balance(
                conn,
                account,
                balance_before_usd,
                balance_after_usd,
                arrears_since,
            )?;
            ledger(
                conn,
                account,
                "top-up",
                amount_usd,
                balance_after_usd,
                "",
                at,
            )?;
        }
        Write::Settle { month, lines, at } => {
            for l in lines {
                insert(
                    conn,
                    "INSERT OR REPLACE INTO settlements
                     (account, month, calls, postpaid_units, unit_price_usd, amount_usd, settled_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        l.account,
                        month,
                        l.bill.calls as i64,
                        l.bill.postpaid_units as i64,
                        l.bill.tier.unit_price_usd.to_string(),
                        l.bill.amount_usd.to_string(),
                        at.to_string()
                    ],
                    &format!("settlement of {} for {month}", l.account),
                )?;
                set_balance(
                    conn,
                    &l.account,
                    &l.balance_before_usd,
                    &l.balance_after_usd,
                    &l.arrears_since,
                )?;
                ledger(
                    conn,
                    &l.account,
                    "settlement",
                    &(-l.delta_usd),
                    &l.balance_after_usd,
                    month,
                    at,
                )?;
            }
        }
    }
    Ok((Committed::Done, changed))
}

fn insert_resource_package(
    conn: &Connection,
    p: &crate::billing::ResourcePackage,
) -> Result<(), StoreError> {
    insert(
        conn,
        "INSERT INTO resource_packages
         (id, account, kind, size, used, effective_at, expires_at, price_usd, refunded_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            p.id,
            p.account,
            p.kind.as_str(),
            p.size as i64,
            p.used as i64,
            p.effective_at.to_string(),
            p.expires_at.to_string(),
            p.price_usd.to_string(),
            opt_ts(&p.refunded_at)
        ],
        &format!("resource package {}", p.id),
    )
}

/// Compare-and-set of an account's balance (see the Postgres store; on
/// one node the billing service serializes balance changes anyway).
/// Balances are stored as the decimal's own text, so comparing the text
/// compares the value as written.
fn set_balance(
    conn: &Connection,
    account: &str,
    before: &rust_decimal::Decimal,
    balance: &rust_decimal::Decimal,
    arrears_since: &Option<jiff::Timestamp>,
) -> Result<(), StoreError> {
    let what = format!("account {account}");
    let n = conn
        .prepare_cached(
            "UPDATE accounts SET balance_usd = ?2, arrears_since = ?3 WHERE id = ?1 AND balance_usd = ?4",
        )
        .and_then(|mut st| {
            st.execute(params![
                account,
                balance.to_string(),
                opt_ts(arrears_since),
                before.to_string()
            ])
        })
        .map_err(internal)?;
    if n == 0 {
        return Err(StoreError::Conflict(format!(
            "the balance of {what} changed meanwhile"
        )));
    }
    Ok(())
}

fn ledger(
    conn: &Connection,
    account: &str,
    kind: &str,
    amount: &rust_decimal::Decimal,
    balance_after: &rust_decimal::Decimal,
    memo: &str,
    at: &jiff::Timestamp,
) -> Result<(), StoreError> {
    insert(
        conn,
        "INSERT INTO ledger(account, kind, amount_usd, balance_after_usd, memo, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            account,
            kind,
            amount.to_string(),
            balance_after.to_string(),
            memo,
            at.to_string()
        ],
        "ledger entry",
    )
}

/// Charges one unit of `package` (the one reserved at admission) if it can
/// still pay, else the next payer in the deduction order; `Some` names the
/// payer when it is not the reserved one. See the `Store` contract.
fn charge(
    conn: &Connection,
    event: &crate::usage::UsageEvent,
    package: Option<&str>,
) -> Result<Option<Source>, StoreError> {
    const CHARGE: &str = "UPDATE resource_packages SET used = used + 1
         WHERE id = ?1 AND used < size AND refunded_at IS NULL";
    let try_charge = |id: &str| -> Result<bool, StoreError> {
        let n = conn
            .prepare_cached(CHARGE)
            .and_then(|mut st| st.execute(params![id]))
            .map_err(internal)?;
        Ok(n == 1)
    };
    let Some(reserved) = package else {
        return Ok(None);
    };
    if try_charge(reserved)? {
        return Ok(None);
    }
    let at = super::parse_ts(&event.time)?;
    let mut candidates = Vec::new();
    {
        let mut st = conn
            .prepare_cached(
                "SELECT id, kind, effective_at, expires_at FROM resource_packages
                 WHERE account = ?1 AND refunded_at IS NULL AND used < size",
            )
            .map_err(internal)?;
        let mut rows = st.query(params![event.subject]).map_err(internal)?;
        while let Some(r) = rows.next().map_err(internal)? {
            let id: String = r.get(0).map_err(internal)?;
            let kind: String = r.get(1).map_err(internal)?;
            candidates.push(ChargeCandidate {
                kind: PackageKind::parse(&kind)
                    .ok_or_else(|| internal(format!("package {id}: bad kind")))?,
                effective_at: super::parse_ts(&r.get::<_, String>(2).map_err(internal)?)?,
                expires_at: super::parse_ts(&r.get::<_, String>(3).map_err(internal)?)?,
                id,
            });
        }
    }
    for c in charge_order(candidates, at) {
        if c.id != reserved && try_charge(&c.id)? {
            return Ok(Some(Source::Package {
                id: c.id,
                kind: c.kind,
            }));
        }
    }
    use rusqlite::OptionalExtension;
    let postpaid: Option<bool> = conn
        .prepare_cached("SELECT postpaid FROM accounts WHERE id = ?1")
        .and_then(|mut st| {
            st.query_row(params![event.subject], |r| r.get(0))
                .optional()
        })
        .map_err(internal)?;
    if postpaid == Some(true) {
        return Ok(Some(Source::Postpaid));
    }
    Err(StoreError::NotFound(format!(
        "a payer for account {}: resource package {reserved} has no unit left and postpaid is off",
        event.subject
    )))
}

/// Stores a key's record, unless a live one holds the key (`Conflict`):
/// an expired record is replaced.
fn remember(conn: &Connection, r: &IdempotencyRecord) -> Result<(), StoreError> {
    let (status, headers, body) = super::super::answer_columns(r);
    let n = conn
        .prepare_cached(
            "INSERT INTO idempotency_keys
             (account, idem_key, fingerprint, status, headers, body, created_at_ms, expires_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(account, idem_key) DO UPDATE SET
               fingerprint = excluded.fingerprint, status = excluded.status,
               headers = excluded.headers, body = excluded.body,
               created_at_ms = excluded.created_at_ms, expires_at_ms = excluded.expires_at_ms
             WHERE idempotency_keys.expires_at_ms <= excluded.created_at_ms",
        )
        .and_then(|mut st| {
            st.execute(params![
                r.account,
                r.key,
                &r.fingerprint.0[..],
                status,
                headers,
                body,
                r.created_at_ms,
                r.expires_at_ms
            ])
        })
        .map_err(internal)?;
    if n == 0 {
        return Err(StoreError::Conflict(format!(
            "idempotency key of account {} (already remembered)",
            r.account
        )));
    }
    Ok(())
}
