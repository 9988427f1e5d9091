//! Reads: the snapshot memory is rebuilt from (all accounts, or one), the
//! usage-event cursor, and the billing queries of the admin API.

use deadpool_postgres::Pool;
use jiff::Timestamp;
use rust_decimal::Decimal;
use tokio_postgres::IsolationLevel;

use crate::accounts::AccountStatus;
use crate::billing::{PackageKind, ResourcePackage};
use crate::entitlements::{ConcurrencyPackage, Period};
use crate::idempotency::IdempotencyRecord;

use super::super::{
    AccountRow, KeyRow, MonthUsage, PackageUsage, Snapshot, StoreError, StoredEvent, SubAccountRow,
};
use super::{client, internal, pg_error};

/// Every account's state, or (with `account`) one root account's, from one
/// consistent view (repeatable read).
pub(super) async fn snapshot(
    pool: &Pool,
    now: Timestamp,
    account: Option<&str>,
) -> Result<Snapshot, StoreError> {
    let mut client = client(pool).await?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_error)?;
    let q = |sql: &'static str| {
        let tx = &tx;
        async move { tx.query(sql, &[&account]).await.map_err(pg_error) }
    };
    let mut accounts = Vec::new();
    for r in q(
        "SELECT id, status, created_at, postpaid, balance_usd, arrears_since FROM accounts
                WHERE $1::text IS NULL OR id = $1 ORDER BY id",
    )
    .await?
    {
        let id: String = r.get(0);
        let status: String = r.get(1);
        accounts.push(AccountRow {
            status: AccountStatus::parse(&status)
                .ok_or_else(|| internal(format!("account {id}: bad status {status}")))?,
            created_at: r.get(2),
            postpaid: r.get(3),
            balance_usd: r.get(4),
            arrears_since: r.get(5),
            id,
        });
    }
    let sub_accounts = q(
        "SELECT id, root, max_concurrency, created_at FROM sub_accounts
                          WHERE $1::text IS NULL OR root = $1 ORDER BY id",
    )
    .await?
    .iter()
    .map(|r| SubAccountRow {
        id: r.get(0),
        root: r.get(1),
        max_concurrency: r.get::<_, Option<i64>>(2).map(|c| c as u32),
        created_at: r.get(3),
    })
    .collect();
    let mut keys = Vec::new();
    for r in q(
        "SELECT key_id, hash, root, sub, created_at, sealed_secret FROM api_keys
                WHERE revoked_at IS NULL AND ($1::text IS NULL OR root = $1) ORDER BY key_id",
    )
    .await?
    {
        let key_id: String = r.get(0);
        let hash: Vec<u8> = r.get(1);
        keys.push(KeyRow {
            hash: hash
                .try_into()
                .map_err(|_| internal(format!("key {key_id}: hash is not 32 bytes")))?,
            key_id,
            root: r.get(2),
            sub: r.get(3),
            created_at: r.get(4),
            sealed_secret: r.get(5),
        });
    }
    let mut concurrency_packages = Vec::new();
    for r in q(
        "SELECT id, account, units, period, start_date, starts_at, ends_at, price_usd, bought_at
                FROM concurrency_packages
                WHERE refunded_at IS NULL AND ($1::text IS NULL OR account = $1)
                ORDER BY starts_at, id",
    )
    .await?
    {
        let id: String = r.get(0);
        let period: String = r.get(3);
        let p = ConcurrencyPackage {
            account: r.get(1),
            units: r.get::<_, i64>(2) as u32,
            period: Period::parse(&period)
                .ok_or_else(|| internal(format!("package {id}: bad period")))?,
            start: r.get(4),
            starts_at: r.get(5),
            ends_at: r.get(6),
            price_usd: r.get(7),
            bought_at: r.get(8),
            id,
        };
        if p.ends_at > now {
            concurrency_packages.push(p);
        }
    }
    let mut resource_packages = Vec::new();
    for r in q(
        "SELECT id, account, kind, size, used, effective_at, expires_at, price_usd, refunded_at
                FROM resource_packages WHERE $1::text IS NULL OR account = $1
                ORDER BY effective_at, id",
    )
    .await?
    {
        let id: String = r.get(0);
        let kind: String = r.get(2);
        resource_packages.push(ResourcePackage {
            account: r.get(1),
            kind: PackageKind::parse(&kind)
                .ok_or_else(|| internal(format!("package {id}: bad kind")))?,
            size: r.get::<_, i64>(3) as u64,
            used: r.get::<_, i64>(4) as u64,
            reserved: 0,
            effective_at: r.get(5),
            expires_at: r.get(6),
            price_usd: r.get(7),
            refunded_at: r.get(8),
            id,
        });
    }
    tx.commit().await.map_err(pg_error)?;
    Ok(Snapshot {
        accounts,
        sub_accounts,
        keys,
        concurrency_packages,
        resource_packages,
    })
}

pub(super) async fn usage_events(
    pool: &Pool,
    after: u64,
    limit: usize,
) -> Result<Vec<StoredEvent>, StoreError> {
    let client = client(pool).await?;
    // Gap-free because seq order is commit order (see the writer): no
    // event with a smaller seq can become visible after this one.
    let rows = client
        .query(
            "SELECT seq, json FROM usage_events WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&(after as i64), &(limit as i64)],
        )
        .await
        .map_err(pg_error)?;
    rows.iter()
        .map(|r| {
            Ok(StoredEvent {
                seq: r.get::<_, i64>(0) as u64,
                event: r.get(1),
                // `time` is a timestamptz there: the JSON's own text is
                // what the sinks pass on.
                columns: None,
            })
        })
        .collect()
}

pub(super) async fn month_usage(
    pool: &Pool,
    month: &str,
    account: Option<&str>,
) -> Result<Vec<MonthUsage>, StoreError> {
    let client = client(pool).await?;
    let rows = client
        .query(
            "SELECT account, source, calls FROM usage_counters
             WHERE month = $1 AND ($2::text IS NULL OR account = $2) ORDER BY account",
            &[&month, &account],
        )
        .await
        .map_err(pg_error)?;
    Ok(MonthUsage::fold(rows.iter().map(|r| {
        (
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            r.get::<_, i64>(2) as u64,
        )
    })))
}

pub(super) async fn settled(
    pool: &Pool,
    month: &str,
) -> Result<Vec<(String, Decimal)>, StoreError> {
    let client = client(pool).await?;
    let rows = client
        .query(
            "SELECT account, amount_usd FROM settlements WHERE month = $1 ORDER BY account",
            &[&month],
        )
        .await
        .map_err(pg_error)?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

pub(super) async fn package_usage(
    pool: &Pool,
    now: Timestamp,
) -> Result<Vec<PackageUsage>, StoreError> {
    let client = client(pool).await?;
    let rows = client
        .query(
            "SELECT account, id, used FROM resource_packages
             WHERE refunded_at IS NULL AND expires_at > $1",
            &[&now],
        )
        .await
        .map_err(pg_error)?;
    Ok(rows
        .iter()
        .map(|r| PackageUsage {
            account: r.get(0),
            package: r.get(1),
            used: r.get::<_, i64>(2) as u64,
        })
        .collect())
}

pub(super) async fn idempotency_record(
    pool: &Pool,
    account: &str,
    key: &str,
) -> Result<Option<IdempotencyRecord>, StoreError> {
    let client = client(pool).await?;
    let st = client
        .prepare_cached(
            "SELECT fingerprint, status, headers, body, created_at_ms, expires_at_ms
             FROM idempotency_keys WHERE account = $1 AND idem_key = $2",
        )
        .await
        .map_err(pg_error)?;
    let Some(r) = client
        .query_opt(&st, &[&account, &key])
        .await
        .map_err(pg_error)?
    else {
        return Ok(None);
    };
    super::super::idempotency_row(
        account,
        key,
        r.get::<_, &[u8]>(0),
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
    )
    .map(Some)
}
