//! Jobs in SQLite: their writes (inside the writer's transaction) and
//! reads.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::super::job_rows::{
    JOB_COLUMNS, JobCols, TO_RUN_COLUMNS, job_to_run, request_column, result_columns, status_list,
};
use super::super::{Committed, JobToRun, StoreError};
use super::apply::{insert, update_one};
use super::internal;
use super::load::{col, rows};
use crate::idempotency::IdempotencyRecord;
use crate::jobs::{Job, JobEnd, JobResult, JobStatus};

pub(super) const SCHEMA: &str = "
-- Jobs (SPEC §10.2): the request until it runs, then its result or error.
CREATE TABLE IF NOT EXISTS jobs (
    id             TEXT PRIMARY KEY,
    account        TEXT NOT NULL,
    sub_account    TEXT,
    api            TEXT NOT NULL,
    action         TEXT,
    status         TEXT NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    started_at_ms  INTEGER,
    finished_at_ms INTEGER,
    request        TEXT NOT NULL,
    body           BLOB,
    result_status  INTEGER,
    result_headers TEXT,
    result_body    BLOB,
    error_code     TEXT,
    charged_to     TEXT
);
-- A start reads the unfinished ones; a submit counts its account's.
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs(account, created_at_ms)
    WHERE status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_by_account ON jobs(account, id);
-- The purge's bounded passes read the oldest finished first.
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at_ms)
    WHERE finished_at_ms IS NOT NULL;
";

pub(super) fn submit(
    conn: &Connection,
    job: &Job,
    body: &[u8],
    max_pending: u32,
    idempotency: Option<&IdempotencyRecord>,
    remember: impl Fn(&Connection, &IdempotencyRecord) -> Result<(), StoreError>,
) -> Result<Committed, StoreError> {
    let pending: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM jobs WHERE account = ?1 AND status IN ('queued', 'running')",
        )
        .and_then(|mut st| st.query_row(params![job.account], |r| r.get(0)))
        .map_err(internal)?;
    if pending >= i64::from(max_pending) {
        return Ok(Committed::JobsFull);
    }
    if let Some(r) = idempotency {
        remember(conn, r)?;
    }
    insert(
        conn,
        "INSERT INTO jobs (id, account, sub_account, api, action, status, created_at_ms, request, body)
         VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?7, ?8)",
        params![
            job.id,
            job.account,
            job.sub_account,
            job.api,
            job.action,
            job.created_at.as_millisecond(),
            request_column(job),
            body
        ],
        &format!("job {}", job.id),
    )?;
    Ok(Committed::Done)
}

pub(super) fn start(conn: &Connection, id: &str, at: jiff::Timestamp) -> Result<(), StoreError> {
    update_one(
        conn,
        "UPDATE jobs SET status = 'running', started_at_ms = ?2 WHERE id = ?1 AND status = 'queued'",
        params![id, at.as_millisecond()],
        &format!("queued job {id}"),
    )
}

pub(super) fn end(
    conn: &Connection,
    id: &str,
    end: &JobEnd,
    from: &[JobStatus],
    at: jiff::Timestamp,
) -> Result<(), StoreError> {
    let what = format!("job {id} in a state it can leave that way");
    if end.status == JobStatus::Queued {
        // Back in the queue: its body is still needed.
        let sql = format!(
            "UPDATE jobs SET status = 'queued', started_at_ms = NULL WHERE id = ?1 AND status IN ({})",
            status_list(from)
        );
        return update_one(conn, &sql, params![id], &what);
    }
    let sql = format!(
        "UPDATE jobs SET status = ?2, error_code = ?3, finished_at_ms = ?4, body = NULL
         WHERE id = ?1 AND status IN ({})",
        status_list(from)
    );
    update_one(
        conn,
        &sql,
        params![id, end.status.as_str(), end.error_code, at.as_millisecond()],
        &what,
    )
}

/// A job's success, in its usage event's transaction: refused unless the
/// job is unfinished (a second run of it is never charged).
pub(super) fn succeed(
    conn: &Connection,
    r: &JobResult,
    charged_to: &str,
) -> Result<(), StoreError> {
    let (status, headers, body) = result_columns(r.answer.as_ref());
    let n = conn
        .prepare_cached(
            "UPDATE jobs SET status = 'succeeded', finished_at_ms = ?2, result_status = ?3,
               result_headers = ?4, result_body = ?5, charged_to = ?6, body = NULL
             WHERE id = ?1 AND status IN ('queued', 'running')",
        )
        .and_then(|mut st| st.execute(params![r.id, r.at_ms, status, headers, body, charged_to]))
        .map_err(internal)?;
    if n == 0 {
        return Err(StoreError::Conflict(format!(
            "job {} (finished already)",
            r.id
        )));
    }
    Ok(())
}

pub(super) fn purge(conn: &Connection, before_ms: i64, limit: u32) -> Result<u64, StoreError> {
    let n = conn
        .prepare_cached(
            "DELETE FROM jobs WHERE rowid IN
             (SELECT rowid FROM jobs WHERE finished_at_ms IS NOT NULL AND finished_at_ms <= ?1 LIMIT ?2)",
        )
        .and_then(|mut st| st.execute(params![before_ms, limit]))
        .map_err(internal)?;
    Ok(n as u64)
}

fn job_of(r: &Row<'_>) -> Result<Job, StoreError> {
    JobCols {
        id: col(r, 0)?,
        account: col(r, 1)?,
        sub_account: col(r, 2)?,
        api: col(r, 3)?,
        action: col(r, 4)?,
        status: col(r, 5)?,
        created_at_ms: col(r, 6)?,
        started_at_ms: col(r, 7)?,
        finished_at_ms: col(r, 8)?,
        request: col(r, 9)?,
        result_status: col(r, 10)?,
        result_headers: col(r, 11)?,
        result_body: col(r, 12)?,
        error_code: col(r, 13)?,
        charged_to: col(r, 14)?,
    }
    .into_job()
}

pub(super) fn job(conn: &Connection, id: &str) -> Result<Option<Job>, StoreError> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
    Ok(rows(conn, &sql, params![id], job_of)?.pop())
}

pub(super) fn to_run(conn: &Connection, id: &str) -> Result<Option<JobToRun>, StoreError> {
    let row = conn
        .prepare_cached(&format!("SELECT {TO_RUN_COLUMNS} FROM jobs WHERE id = ?1"))
        .and_then(|mut st| {
            st.query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .map_err(internal)?;
    match row {
        Some((request, action, body)) => job_to_run(id, request, action, body),
        None => Ok(None),
    }
}

pub(super) fn unfinished(conn: &Connection) -> Result<Vec<Job>, StoreError> {
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE status IN ('queued', 'running')
         ORDER BY created_at_ms, id"
    );
    rows(conn, &sql, [], job_of)
}

pub(super) fn of_account(
    conn: &Connection,
    account: &str,
    status: Option<JobStatus>,
    after: &str,
    limit: usize,
) -> Result<Vec<Job>, StoreError> {
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE account = ?1 AND id > ?2 AND (?3 IS NULL OR status = ?3)
         ORDER BY id LIMIT ?4"
    );
    rows(
        conn,
        &sql,
        params![account, after, status.map(JobStatus::as_str), limit as i64],
        job_of,
    )
}
