//! Reads: the snapshot memory is rebuilt from at start, and the billing
//! queries of the admin API.

use jiff::Timestamp;
use rusqlite::{Connection, Row, params};
use rust_decimal::Decimal;

use crate::accounts::AccountStatus;
use crate::billing::{PackageKind, ResourcePackage};
use crate::entitlements::{ConcurrencyPackage, Period};
use crate::idempotency::IdempotencyRecord;

use super::super::{
    AccountRow, KeyRow, MonthUsage, PackageUsage, Snapshot, StoreError, SubAccountRow,
};
use super::{internal, parse_ts, parse_usd};

/// Runs a query and maps each row, with storage errors as `StoreError`.
pub(super) fn rows<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl Fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut st = conn.prepare_cached(sql).map_err(internal)?;
    let mut q = st.query(params).map_err(internal)?;
    let mut out = Vec::new();
    while let Some(row) = q.next().map_err(internal)? {
        out.push(map(row)?);
    }
    Ok(out)
}

pub(super) fn col<T: rusqlite::types::FromSql>(row: &Row<'_>, i: usize) -> Result<T, StoreError> {
    row.get(i).map_err(internal)
}

fn opt_ts(row: &Row<'_>, i: usize) -> Result<Option<Timestamp>, StoreError> {
    col::<Option<String>>(row, i)?
        .map(|s| parse_ts(&s))
        .transpose()
}

/// Every account's state, or (with `account`) one root account's.
pub(super) fn snapshot(
    conn: &Connection,
    now: Timestamp,
    account: Option<&str>,
) -> Result<Snapshot, StoreError> {
    let accounts = rows(
        conn,
        "SELECT id, status, created_at, postpaid, balance_usd, arrears_since FROM accounts
         WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
        params![account],
        |r| {
            let id: String = col(r, 0)?;
            let status: String = col(r, 1)?;
            Ok(AccountRow {
                status: AccountStatus::parse(&status)
                    .ok_or_else(|| internal(format!("account {id}: bad status {status}")))?,
                created_at: parse_ts(&col::<String>(r, 2)?)?,
                postpaid: col(r, 3)?,
                balance_usd: parse_usd(&col::<String>(r, 4)?)?,
                arrears_since: opt_ts(r, 5)?,
                id,
            })
        },
    )?;
    let sub_accounts = rows(
        conn,
        "SELECT id, root, max_concurrency, created_at FROM sub_accounts
         WHERE ?1 IS NULL OR root = ?1 ORDER BY id",
        params![account],
        |r| {
            Ok(SubAccountRow {
                id: col(r, 0)?,
                root: col(r, 1)?,
                max_concurrency: col(r, 2)?,
                created_at: parse_ts(&col::<String>(r, 3)?)?,
            })
        },
    )?;
    let keys = rows(
        conn,
        "SELECT key_id, hash, root, sub, created_at, sealed_secret FROM api_keys
         WHERE revoked_at IS NULL AND (?1 IS NULL OR root = ?1) ORDER BY key_id",
        params![account],
        |r| {
            let key_id: String = col(r, 0)?;
            let hash: Vec<u8> = col(r, 1)?;
            Ok(KeyRow {
                hash: hash
                    .try_into()
                    .map_err(|_| internal(format!("key {key_id}: hash is not 32 bytes")))?,
                key_id,
                root: col(r, 2)?,
                sub: col(r, 3)?,
                created_at: parse_ts(&col::<String>(r, 4)?)?,
                sealed_secret: col(r, 5)?,
            })
        },
    )?;
    let concurrency_packages = rows(
        conn,
        "SELECT id, account, units, period, start_date, starts_at, ends_at, price_usd, bought_at
         FROM concurrency_packages WHERE refunded_at IS NULL AND (?1 IS NULL OR account = ?1)
         ORDER BY starts_at, id",
        params![account],
        |r| {
            let id: String = col(r, 0)?;
            let period: String = col(r, 3)?;
            Ok(ConcurrencyPackage {
                account: col(r, 1)?,
                units: col(r, 2)?,
                period: Period::parse(&period)
                    .ok_or_else(|| internal(format!("package {id}: bad period")))?,
                start: col::<String>(r, 4)?
                    .parse()
                    .map_err(|e| internal(format!("package {id}: {e}")))?,
                starts_at: parse_ts(&col::<String>(r, 5)?)?,
                ends_at: parse_ts(&col::<String>(r, 6)?)?,
                price_usd: parse_usd(&col::<String>(r, 7)?)?,
                bought_at: parse_ts(&col::<String>(r, 8)?)?,
                id,
            })
        },
    )?
    .into_iter()
    .filter(|p| p.ends_at > now)
    .collect();
    let resource_packages = rows(
        conn,
        "SELECT id, account, kind, size, used, effective_at, expires_at, price_usd, refunded_at
         FROM resource_packages WHERE ?1 IS NULL OR account = ?1 ORDER BY effective_at, id",
        params![account],
        |r| {
            let id: String = col(r, 0)?;
            let kind: String = col(r, 2)?;
            Ok(ResourcePackage {
                account: col(r, 1)?,
                kind: PackageKind::parse(&kind)
                    .ok_or_else(|| internal(format!("package {id}: bad kind")))?,
                size: col::<i64>(r, 3)? as u64,
                used: col::<i64>(r, 4)? as u64,
                reserved: 0,
                effective_at: parse_ts(&col::<String>(r, 5)?)?,
                expires_at: parse_ts(&col::<String>(r, 6)?)?,
                price_usd: parse_usd(&col::<String>(r, 7)?)?,
                refunded_at: opt_ts(r, 8)?,
                id,
            })
        },
    )?;
    Ok(Snapshot {
        accounts,
        sub_accounts,
        keys,
        concurrency_packages,
        resource_packages,
    })
}

pub(super) fn month_usage(
    conn: &Connection,
    month: &str,
    account: Option<&str>,
) -> Result<Vec<MonthUsage>, StoreError> {
    let counters = rows(
        conn,
        "SELECT account, source, calls FROM usage_counters
         WHERE month = ?1 AND (?2 IS NULL OR account = ?2) ORDER BY account",
        params![month, account],
        |r| {
            Ok((
                col::<String>(r, 0)?,
                col::<String>(r, 1)?,
                col::<i64>(r, 2)? as u64,
            ))
        },
    )?;
    Ok(MonthUsage::fold(counters))
}

pub(super) fn settled(
    conn: &Connection,
    month: &str,
) -> Result<Vec<(String, Decimal)>, StoreError> {
    rows(
        conn,
        "SELECT account, amount_usd FROM settlements WHERE month = ?1 ORDER BY account",
        params![month],
        |r| Ok((col(r, 0)?, parse_usd(&col::<String>(r, 1)?)?)),
    )
}

pub(super) fn package_usage(
    conn: &Connection,
    now: Timestamp,
) -> Result<Vec<PackageUsage>, StoreError> {
    // Expiry is compared after parsing: stored timestamps do not all have
    // the same number of fraction digits, so text order is not time order.
    let rows = rows(
        conn,
        "SELECT account, id, used, expires_at FROM resource_packages WHERE refunded_at IS NULL",
        params![],
        |r| {
            Ok((
                PackageUsage {
                    account: col(r, 0)?,
                    package: col(r, 1)?,
                    used: col::<i64>(r, 2)? as u64,
                },
                parse_ts(&col::<String>(r, 3)?)?,
            ))
        },
    )?;
    Ok(rows
        .into_iter()
        .filter(|(_, expires)| *expires > now)
        .map(|(u, _)| u)
        .collect())
}

pub(super) fn idempotency_record(
    conn: &Connection,
    account: &str,
    key: &str,
) -> Result<Option<IdempotencyRecord>, StoreError> {
    let mut found = rows(
        conn,
        "SELECT fingerprint, status, headers, body, created_at_ms, expires_at_ms
         FROM idempotency_keys WHERE account = ?1 AND idem_key = ?2",
        params![account, key],
        |r| {
            super::super::idempotency_row(
                account,
                key,
                &col::<Vec<u8>>(r, 0)?,
                col::<Option<i64>>(r, 1)?,
                col::<Option<String>>(r, 2)?,
                col::<Option<Vec<u8>>>(r, 3)?,
                col(r, 4)?,
                col(r, 5)?,
            )
        },
    )?;
    Ok(found.pop())
}
