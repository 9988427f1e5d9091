//! Versioned migrations, applied at open inside one transaction that holds
//! an advisory lock, so replicas starting at once apply each migration once
//! and none starts on a half-made schema.

use super::super::StoreError;
use super::{LOCK_MIGRATIONS, pg_error};

/// Migration 1: the schema the SQLite store has, in PostgreSQL's types,
/// plus the `changes` table the change feed pages.
const V1: &str = "
CREATE TABLE accounts (
    id            text PRIMARY KEY,
    status        text NOT NULL,
    created_at    timestamptz NOT NULL,
    postpaid      boolean NOT NULL DEFAULT false,
    balance_usd   numeric NOT NULL DEFAULT 0,
    arrears_since timestamptz
);
CREATE TABLE sub_accounts (
    id              text PRIMARY KEY,
    root            text NOT NULL REFERENCES accounts(id),
    max_concurrency bigint,
    created_at      timestamptz NOT NULL
);
CREATE INDEX sub_accounts_root ON sub_accounts(root);
CREATE TABLE api_keys (
    key_id     text PRIMARY KEY,
    hash       bytea NOT NULL UNIQUE,
    root       text NOT NULL REFERENCES accounts(id),
    sub        text REFERENCES sub_accounts(id),
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX api_keys_root ON api_keys(root);
-- seq comes from the sequence under the events advisory lock (see the
-- writer), so seq order is commit order across replicas.
CREATE SEQUENCE usage_events_seq;
CREATE TABLE usage_events (
    seq        bigint PRIMARY KEY DEFAULT nextval('usage_events_seq'),
    id         text NOT NULL UNIQUE,
    account    text NOT NULL,
    time       timestamptz NOT NULL,
    charged_to text NOT NULL,
    -- text, not jsonb: the event is served byte for byte as recorded.
    json       text NOT NULL
);
ALTER SEQUENCE usage_events_seq OWNED BY usage_events.seq;
CREATE TABLE usage_counters (
    account text NOT NULL,
    month   text NOT NULL,
    source  text NOT NULL,
    calls   bigint NOT NULL,
    PRIMARY KEY (account, month, source)
);
CREATE TABLE concurrency_packages (
    id          text PRIMARY KEY,
    account     text NOT NULL REFERENCES accounts(id),
    units       bigint NOT NULL,
    period      text NOT NULL,
    start_date  date NOT NULL,
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    price_usd   numeric NOT NULL,
    bought_at   timestamptz NOT NULL,
    refunded_at timestamptz
);
CREATE INDEX concurrency_packages_account ON concurrency_packages(account);
CREATE TABLE resource_packages (
    id           text PRIMARY KEY,
    account      text NOT NULL REFERENCES accounts(id),
    kind         text NOT NULL,
    size         bigint NOT NULL,
    used         bigint NOT NULL DEFAULT 0,
    effective_at timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    price_usd    numeric NOT NULL,
    refunded_at  timestamptz
);
CREATE INDEX resource_packages_account ON resource_packages(account);
CREATE TABLE settlements (
    account        text NOT NULL REFERENCES accounts(id),
    month          text NOT NULL,
    calls          bigint NOT NULL,
    postpaid_units bigint NOT NULL,
    unit_price_usd numeric NOT NULL,
    amount_usd     numeric NOT NULL,
    settled_at     timestamptz NOT NULL,
    PRIMARY KEY (account, month)
);
CREATE TABLE ledger (
    seq               bigserial PRIMARY KEY,
    account           text NOT NULL REFERENCES accounts(id),
    kind              text NOT NULL,
    amount_usd        numeric NOT NULL,
    balance_after_usd numeric NOT NULL,
    memo              text NOT NULL,
    at                timestamptz NOT NULL
);
-- The change feed: one row per account an admin write changed, numbered
-- in commit order under the changes advisory lock.
CREATE TABLE changes (
    seq     bigserial PRIMARY KEY,
    account text NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);
";

/// Migration 2: TC3 key pairs keep their secret sealed beside the key.
const V2: &str = "ALTER TABLE api_keys ADD COLUMN sealed_secret text;";

/// Migration 3: idempotency keys (SPEC §10.1), written in the transaction
/// of their task's usage event; status NULL: the answer was too large to
/// keep. The expiry index serves the purge's bounded passes.
const V3: &str = "
CREATE TABLE idempotency_keys (
    account       text NOT NULL,
    idem_key      text NOT NULL,
    fingerprint   bytea NOT NULL,
    status        bigint,
    headers       text,
    body          bytea,
    created_at_ms bigint NOT NULL,
    expires_at_ms bigint NOT NULL,
    PRIMARY KEY (account, idem_key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys(expires_at_ms);
";

/// Migration 5: watermarks of the event feed's sinks (the NATS stream's
/// last published event), shared by the replicas.
const V5: &str = "
CREATE TABLE watermarks (
    name text PRIMARY KEY,
    seq  bigint NOT NULL
);
";

const MIGRATIONS: &[(i32, &str)] = &[(1, V1), (2, V2), (3, V3), (4, super::jobs::V4), (5, V5)];

/// Applies the migrations not applied yet. Also what `tollgate migrate`
/// runs before it copies a single node's data, so both make one schema.
pub(in crate::store) async fn migrate(
    client: &mut tokio_postgres::Client,
) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(pg_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_MIGRATIONS])
        .await
        .map_err(pg_error)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    int PRIMARY KEY,
            applied_at timestamptz NOT NULL
        )",
    )
    .await
    .map_err(pg_error)?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(pg_error)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (version, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await.map_err(pg_error)?;
        tx.execute(
            "INSERT INTO schema_migrations(version, applied_at) VALUES ($1, now())",
            &[version],
        )
        .await
        .map_err(pg_error)?;
        tracing::info!(version, "PostgreSQL schema migration applied");
    }
    tx.commit().await.map_err(pg_error)
}
