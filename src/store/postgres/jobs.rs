//! Jobs in PostgreSQL: the same writes and guards as the SQLite store's,
//! and the reads.

use deadpool_postgres::Pool;
use tokio_postgres::Row;

use super::super::job_rows::{
    JOB_COLUMNS, JobCols, TO_RUN_COLUMNS, job_to_run, request_column, result_columns, status_list,
};
use super::super::{Committed, JobToRun, StoreError};
use super::{client, pg_error, pg_write_error};
use crate::jobs::{Job, JobEnd, JobResult, JobStatus};

/// Migration 4: jobs (SPEC §10.2).
pub(super) const V4: &str = "
CREATE TABLE jobs (
    id             text PRIMARY KEY,
    account        text NOT NULL,
    sub_account    text,
    api            text NOT NULL,
    action         text,
    status         text NOT NULL,
    created_at_ms  bigint NOT NULL,
    started_at_ms  bigint,
    finished_at_ms bigint,
    request        text NOT NULL,
    body           bytea,
    result_status  bigint,
    result_headers text,
    result_body    bytea,
    error_code     text,
    charged_to     text
);
CREATE INDEX jobs_unfinished ON jobs(account, created_at_ms) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_by_account ON jobs(account, id);
CREATE INDEX jobs_finished ON jobs(finished_at_ms) WHERE finished_at_ms IS NOT NULL;
";

type Tx<'a> = deadpool_postgres::Transaction<'a>;

pub(super) async fn submit(
    tx: &Tx<'_>,
    job: &Job,
    body: &[u8],
    max_pending: u32,
) -> Result<Committed, StoreError> {
    // Submits of one account are serialised on its row, so two replicas
    // never both take the last pending place.
    tx.execute(
        "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
        &[&job.account],
    )
    .await
    .map_err(|e| pg_write_error(e, "account of a job"))?;
    let pending: i64 = tx
        .query_one(
            "SELECT count(*) FROM jobs WHERE account = $1 AND status IN ('queued', 'running')",
            &[&job.account],
        )
        .await
        .map_err(|e| pg_write_error(e, "pending jobs"))?
        .get(0);
    if pending >= i64::from(max_pending) {
        return Ok(Committed::JobsFull);
    }
    tx.execute(
        "INSERT INTO jobs (id, account, sub_account, api, action, status, created_at_ms, request, body)
         VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8)",
        &[
            &job.id,
            &job.account,
            &job.sub_account,
            &job.api,
            &job.action,
            &job.created_at.as_millisecond(),
            &request_column(job),
            &body,
        ],
    )
    .await
    .map_err(|e| pg_write_error(e, &format!("job {}", job.id)))?;
    Ok(Committed::Done)
}

fn one_row(n: Result<u64, tokio_postgres::Error>, what: &str) -> Result<(), StoreError> {
    match n.map_err(|e| pg_write_error(e, what))? {
        0 => Err(StoreError::NotFound(what.to_string())),
        _ => Ok(()),
    }
}

pub(super) async fn start(tx: &Tx<'_>, id: &str, at: jiff::Timestamp) -> Result<(), StoreError> {
    let n = tx
        .execute(
            "UPDATE jobs SET status = 'running', started_at_ms = $2 WHERE id = $1 AND status = 'queued'",
            &[&id, &at.as_millisecond()],
        )
        .await;
    one_row(n, &format!("queued job {id}"))
}

pub(super) async fn end(
    tx: &Tx<'_>,
    id: &str,
    end: &JobEnd,
    from: &[JobStatus],
    at: jiff::Timestamp,
) -> Result<(), StoreError> {
    let what = format!("job {id} in a state it can leave that way");
    let n = if end.status == JobStatus::Queued {
        let sql = format!(
            "UPDATE jobs SET status = 'queued', started_at_ms = NULL WHERE id = $1 AND status IN ({})",
            status_list(from)
        );
        tx.execute(&sql, &[&id]).await
    } else {
        let sql = format!(
            "UPDATE jobs SET status = $2, error_code = $3, finished_at_ms = $4, body = NULL
             WHERE id = $1 AND status IN ({})",
            status_list(from)
        );
        tx.execute(
            &sql,
            &[
                &id,
                &end.status.as_str(),
                &end.error_code,
                &at.as_millisecond(),
            ],
        )
        .await
    };
    one_row(n, &what)
}

/// A job's success, in its usage event's transaction: refused unless the
/// job is unfinished (a second run of it is never charged).
pub(super) async fn succeed(
    tx: &Tx<'_>,
    r: &JobResult,
    charged_to: &str,
) -> Result<(), StoreError> {
    let (status, headers, body) = result_columns(r.answer.as_ref());
    let n = tx
        .execute(
            "UPDATE jobs SET status = 'succeeded', finished_at_ms = $2, result_status = $3,
               result_headers = $4, result_body = $5, charged_to = $6, body = NULL
             WHERE id = $1 AND status IN ('queued', 'running')",
            &[&r.id, &r.at_ms, &status, &headers, &body, &charged_to],
        )
        .await
        .map_err(|e| pg_write_error(e, "job result"))?;
    if n == 0 {
        return Err(StoreError::Conflict(format!(
            "job {} (finished already)",
            r.id
        )));
    }
    Ok(())
}

pub(super) async fn purge(tx: &Tx<'_>, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
    tx.execute(
        "DELETE FROM jobs WHERE ctid IN
         (SELECT ctid FROM jobs WHERE finished_at_ms IS NOT NULL AND finished_at_ms <= $1 LIMIT $2)",
        &[&before_ms, &i64::from(limit)],
    )
    .await
    .map_err(|e| pg_write_error(e, "finished jobs"))
}

fn job_of(r: &Row) -> Result<Job, StoreError> {
    JobCols {
        id: r.get(0),
        account: r.get(1),
        sub_account: r.get(2),
        api: r.get(3),
        action: r.get(4),
        status: r.get(5),
        created_at_ms: r.get(6),
        started_at_ms: r.get(7),
        finished_at_ms: r.get(8),
        request: r.get(9),
        result_status: r.get(10),
        result_headers: r.get(11),
        result_body: r.get(12),
        error_code: r.get(13),
        charged_to: r.get(14),
    }
    .into_job()
}

async fn query_jobs(
    pool: &Pool,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<Job>, StoreError> {
    let client = client(pool).await?;
    let st = client.prepare_cached(sql).await.map_err(pg_error)?;
    let rows = client.query(&st, params).await.map_err(pg_error)?;
    rows.iter().map(job_of).collect()
}

pub(super) async fn job(pool: &Pool, id: &str) -> Result<Option<Job>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
    Ok(query_jobs(pool, &sql, &[&id]).await?.pop())
}

pub(super) async fn to_run(pool: &Pool, id: &str) -> Result<Option<JobToRun>, StoreError> {
    let client = client(pool).await?;
    let row = client
        .query_opt(
            &format!("SELECT {TO_RUN_COLUMNS} FROM jobs WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(pg_error)?;
    match row {
        Some(r) => job_to_run(id, r.get(0), r.get(1), r.get(2)),
        None => Ok(None),
    }
}

pub(super) async fn unfinished(pool: &Pool) -> Result<Vec<Job>, StoreError> {
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE status IN ('queued', 'running')
         ORDER BY created_at_ms, id"
    );
    query_jobs(pool, &sql, &[]).await
}

pub(super) async fn of_account(
    pool: &Pool,
    account: &str,
    status: Option<JobStatus>,
    after: &str,
    limit: usize,
) -> Result<Vec<Job>, StoreError> {
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE account = $1 AND id > $2
           AND ($3::text IS NULL OR status = $3) ORDER BY id LIMIT $4"
    );
    let status = status.map(JobStatus::as_str);
    query_jobs(pool, &sql, &[&account, &after, &status, &(limit as i64)]).await
}
