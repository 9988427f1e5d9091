//! One suite for every `Store`: the contract written on the trait, run
//! against SQLite (a temp directory) and PostgreSQL (a fresh database).

mod pg;

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use pg::fixtures::{account, usage};
use rust_decimal::Decimal;
use tokio::sync::broadcast;
use tollgate::accounts::hash_key;
use tollgate::billing::{self, PackageKind, ResourcePackage};
use tollgate::entitlements::{ConcurrencyPackage, Period};
use tollgate::idempotency::{Fingerprint, IdempotencyRecord, StoredAnswer};
use tollgate::jobs::{Job, JobEnd, JobRequest, JobResult, JobStatus};
use tollgate::store::{
    Change, Committed, KeyRow, PostgresStore, SettlementLine, SqliteStore, Store, StoreError,
    SubAccountRow, Write, commit,
};

/// Waits (bounded) for `Change::Account(id)` on the feed.
async fn expect_change(rx: &mut broadcast::Receiver<Change>, id: &str) {
    let found = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match rx.recv().await {
                Ok(Change::Account(a)) if a == id => return,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("change feed ended: {e}"),
            }
        }
    })
    .await;
    assert!(found.is_ok(), "no change announced for {id}");
}

fn key(id: &str, root: &str, sub: Option<&str>) -> KeyRow {
    KeyRow {
        key_id: id.into(),
        hash: hash_key(&format!("secret-{id}")),
        root: root.into(),
        sub: sub.map(String::from),
        created_at: Timestamp::now(),
        // A TC3 key's sealed secret is stored and read back as is.
        sealed_secret: (id == "k2").then(|| format!("v1.sealed-{id}")),
    }
}

async fn conformance(store: Arc<dyn Store>) {
    let s = &*store;
    let mut feed = store.changes();

    // Accounts: create, duplicate.
    commit(s, account("acme")).await.unwrap();
    expect_change(&mut feed, "acme").await;
    let dup = commit(s, account("acme")).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    assert!(!dup.unwrap_err().retryable());

    // Sub-accounts: a missing root is not found.
    let sub = |id: &str, root: &str| {
        Write::CreateSubAccount(SubAccountRow {
            id: id.into(),
            root: root.into(),
            max_concurrency: Some(2),
            created_at: Timestamp::now(),
        })
    };
    let orphan = commit(s, sub("x", "nobody")).await;
    assert!(matches!(orphan, Err(StoreError::NotFound(_))), "{orphan:?}");
    commit(s, sub("acme-dev", "acme")).await.unwrap();

    // Keys: create, duplicate, revoke (once).
    commit(s, Write::CreateKey(key("k1", "acme", None)))
        .await
        .unwrap();
    commit(s, Write::CreateKey(key("k2", "acme", Some("acme-dev"))))
        .await
        .unwrap();
    let dup = commit(s, Write::CreateKey(key("k1", "acme", None))).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    let mut feed = store.changes();
    let revoke = |id: &str| Write::RevokeKey {
        key_id: id.into(),
        at: Timestamp::now(),
    };
    commit(s, revoke("k1")).await.unwrap();
    expect_change(&mut feed, "acme").await;
    let again = commit(s, revoke("k1")).await;
    assert!(matches!(again, Err(StoreError::NotFound(_))), "{again:?}");
    let unknown = commit(s, revoke("nope")).await;
    assert!(
        matches!(unknown, Err(StoreError::NotFound(_))),
        "{unknown:?}"
    );

    // Packages: concurrency (bought, refunded once), prepaid (refunded once).
    let now = Timestamp::now();
    let cpkg = |id: &str| {
        Write::CreateConcurrencyPackage(Box::new(ConcurrencyPackage {
            id: id.into(),
            account: "acme".into(),
            units: 2,
            period: Period::Daily,
            start: now.to_zoned(jiff::tz::TimeZone::UTC).date(),
            starts_at: now,
            ends_at: now + jiff::SignedDuration::from_hours(24),
            price_usd: "3.5".parse().unwrap(),
            bought_at: now,
        }))
    };
    commit(s, cpkg("c1")).await.unwrap();
    commit(s, cpkg("c2")).await.unwrap();
    let refund_c = Write::RefundConcurrencyPackage {
        id: "c2".into(),
        at: now,
    };
    commit(s, refund_c).await.unwrap();
    let prepaid = ResourcePackage::new(
        "p1".into(),
        "acme",
        PackageKind::Prepaid,
        1,
        Decimal::ONE,
        now,
    );
    commit(s, Write::CreateResourcePackage(Box::new(prepaid.clone())))
        .await
        .unwrap();
    let refund = || Write::RefundResourcePackage {
        id: "p1".into(),
        at: Timestamp::now(),
    };
    commit(s, refund()).await.unwrap();
    let twice = commit(s, refund()).await;
    assert!(matches!(twice, Err(StoreError::NotFound(_))), "{twice:?}");

    // load and load_account agree and leave out revoked keys and refunded
    // concurrency packages.
    let snap = store.load(Timestamp::now()).await.unwrap();
    assert_eq!(snap.accounts.len(), 1);
    assert_eq!(snap.sub_accounts.len(), 1);
    assert_eq!(
        snap.keys
            .iter()
            .map(|k| k.key_id.as_str())
            .collect::<Vec<_>>(),
        ["k2"]
    );
    assert_eq!(snap.keys[0].hash, hash_key("secret-k2"));
    assert_eq!(snap.keys[0].sealed_secret.as_deref(), Some("v1.sealed-k2"));
    assert_eq!(snap.concurrency_packages.len(), 1);
    assert_eq!(
        snap.concurrency_packages[0].price_usd,
        "3.5".parse::<Decimal>().unwrap()
    );
    assert_eq!(snap.resource_packages.len(), 2, "refunded ones included");
    let one = store
        .load_account("acme", Timestamp::now())
        .await
        .unwrap()
        .expect("acme exists");
    assert_eq!(one.account.id, "acme");
    assert_eq!(one.sub_accounts.len(), 1);
    assert_eq!(one.keys.len(), 1);
    assert_eq!(one.concurrency_packages.len(), 1);
    assert_eq!(one.resource_packages.len(), 2);
    assert!(
        store
            .load_account("nobody", Timestamp::now())
            .await
            .unwrap()
            .is_none()
    );
    commit(s, account("other")).await.unwrap();
    let other = store
        .load_account("other", Timestamp::now())
        .await
        .unwrap()
        .unwrap();
    assert!(other.keys.is_empty() && other.sub_accounts.is_empty());
    assert_eq!(other.resource_packages.len(), 1);

    // Usage: the charge guard (the free package has 2 units), duplicates.
    let mut seqs = Vec::new();
    for i in 0..2 {
        match commit(s, usage("acme", Some("free-acme"), &format!("r{i}")))
            .await
            .unwrap()
        {
            Committed::Usage {
                seq: Some(seq),
                fell_through: None,
            } => seqs.push(seq),
            other => panic!("{other:?}"),
        }
    }
    assert!(seqs[1] > seqs[0]);
    let over = commit(s, usage("acme", Some("free-acme"), "r-over")).await;
    assert!(matches!(over, Err(StoreError::NotFound(_))), "{over:?}");
    let postpaid = usage("acme", None, "r-post");
    let Write::AppendUsage { event, .. } = &postpaid else {
        unreachable!()
    };
    let dup_event = pg::fixtures::append((**event).clone(), None);
    commit(s, postpaid).await.unwrap();
    let dup = commit(s, dup_event).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    let one = store
        .load_account("acme", Timestamp::now())
        .await
        .unwrap()
        .unwrap();
    let free = one
        .resource_packages
        .iter()
        .find(|p| p.id == "free-acme")
        .unwrap();
    assert_eq!(free.used, 2, "the refused charge left nothing behind");

    // Events page in commit order.
    let all = store.usage_events(0, 100).await.unwrap();
    assert_eq!(all.len(), 3, "the refused append stored no event");
    let first = store.usage_events(0, 2).await.unwrap();
    assert_eq!(first.len(), 2);
    let rest = store.usage_events(first[1].seq, 100).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert!(rest[0].event.contains("r-post"));
    assert!(
        store
            .usage_events(rest[0].seq, 100)
            .await
            .unwrap()
            .is_empty()
    );

    // Month counters.
    let m = store.month_usage("2026-11", None).await.unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].calls, m[0].free, m[0].postpaid), (3, 2, 1));
    let m = store.month_usage("2026-11", Some("other")).await.unwrap();
    assert!(m.is_empty());

    // Settlements replace the month's line and set the balance.
    let mut feed = store.changes();
    let line = |delta: &str, before: &str, balance: &str| SettlementLine {
        account: "acme".into(),
        bill: billing::bill(100, 100),
        delta_usd: delta.parse().unwrap(),
        balance_before_usd: before.parse().unwrap(),
        balance_after_usd: balance.parse().unwrap(),
        arrears_since: Some(Timestamp::now()),
    };
    let settle = |l: SettlementLine| Write::Settle {
        month: "2026-11".into(),
        lines: vec![l],
        at: Timestamp::now(),
    };
    commit(s, settle(line("8", "0", "-8"))).await.unwrap();
    expect_change(&mut feed, "acme").await;
    commit(s, settle(line("0", "-8", "-8"))).await.unwrap();
    // A balance change computed from a balance that is no longer there
    // (another replica's top-up won) is refused and changes nothing.
    assert!(matches!(
        commit(s, settle(line("1", "0", "-1"))).await,
        Err(StoreError::Conflict(_))
    ));
    let settled = store.settled("2026-11").await.unwrap();
    assert_eq!(settled.len(), 1);
    assert_eq!(settled[0].0, "acme");
    assert_eq!(settled[0].1, billing::bill(100, 100).amount_usd);
    let acme = store
        .load_account("acme", Timestamp::now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(acme.account.balance_usd, "-8".parse::<Decimal>().unwrap());
    assert!(acme.account.arrears_since.is_some());

    // Top-ups and postpaid switches are announced too.
    commit(s, pg::fixtures::postpaid("other")).await.unwrap();
    expect_change(&mut feed, "other").await;

    charges_fall_through_in_the_deduction_order(s).await;
    idempotency_records_stand_or_fall_with_their_event(s).await;
    jobs_move_only_forward_and_succeed_once(s).await;
    counts_of_a_group_commit_match_its_events(s).await;

    let store2 = store.clone();
    tokio::task::spawn_blocking(move || store2.close())
        .await
        .unwrap();
    let closed = commit(s, account("late")).await;
    assert!(matches!(closed, Err(StoreError::Closed)), "{closed:?}");
}

/// A reserved package that can no longer pay (refunded since, or used up)
/// is never a failed append while the account has another payer: the
/// commit charges the next one in the deduction order, then postpaid, and
/// the stored event says so; with no payer left nothing is stored.
async fn charges_fall_through_in_the_deduction_order(s: &dyn Store) {
    let now = Timestamp::now();
    commit(s, account("payer")).await.unwrap();
    for (id, size) in [("pay-p", 1), ("pay-r", 5)] {
        let p = ResourcePackage::new(
            id.into(),
            "payer",
            PackageKind::Prepaid,
            size,
            Decimal::ONE,
            now,
        );
        commit(s, Write::CreateResourcePackage(Box::new(p)))
            .await
            .unwrap();
    }
    commit(
        s,
        Write::RefundResourcePackage {
            id: "pay-r".into(),
            at: Timestamp::now(),
        },
    )
    .await
    .unwrap();
    let fell = |w| async move {
        match commit(s, w).await {
            Ok(Committed::Usage { fell_through, .. }) => Ok(fell_through.map(|p| p.label())),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        }
    };
    // Reserved before the refund: the free package pays (it comes first).
    assert_eq!(
        fell(usage("payer", Some("pay-r"), "f1")).await.unwrap(),
        Some("free".into())
    );
    assert_eq!(
        fell(usage("payer", Some("free-payer"), "f2"))
            .await
            .unwrap(),
        None
    );
    // The free package is used up: the prepaid one pays.
    assert_eq!(
        fell(usage("payer", Some("free-payer"), "f3"))
            .await
            .unwrap(),
        Some("prepaid:pay-p".into())
    );
    // Nothing left and postpaid off: refused, nothing stored.
    let none = fell(usage("payer", Some("free-payer"), "f4")).await;
    assert!(matches!(none, Err(StoreError::NotFound(_))), "{none:?}");
    commit(s, pg::fixtures::postpaid("payer")).await.unwrap();
    assert_eq!(
        fell(usage("payer", Some("pay-p"), "f5")).await.unwrap(),
        Some("postpaid".into())
    );

    let mut charged = Vec::new();
    let mut after = 0;
    loop {
        let page = s.usage_events(after, 100).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        for e in &page {
            let v: serde_json::Value = serde_json::from_str(&e.event).unwrap();
            if v["subject"] == "payer" {
                charged.push((
                    v["data"]["request_id"].as_str().unwrap().to_string(),
                    v["data"]["charged_to"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    let expect = [
        ("f1", "free"),
        ("f2", "free"),
        ("f3", "prepaid:pay-p"),
        ("f5", "postpaid"),
    ];
    assert_eq!(
        charged,
        expect.map(|(r, c)| (r.to_string(), c.to_string())).to_vec()
    );
    let m = s.month_usage("2026-11", Some("payer")).await.unwrap();
    assert_eq!(
        (m[0].calls, m[0].free, m[0].prepaid, m[0].postpaid),
        (4, 2, 1, 1)
    );
    let payer = s
        .load_account("payer", Timestamp::now())
        .await
        .unwrap()
        .unwrap();
    let used = |id: &str| {
        payer
            .resource_packages
            .iter()
            .find(|p| p.id == id)
            .unwrap()
            .used
    };
    assert_eq!(
        (used("free-payer"), used("pay-p"), used("pay-r")),
        (2, 1, 0)
    );
    // What a shared quota is reconciled from: unrefunded packages only.
    let mut usage = s.package_usage(Timestamp::now()).await.unwrap();
    usage.retain(|u| u.account == "payer");
    usage.sort_by(|a, b| a.package.cmp(&b.package));
    let got: Vec<(&str, u64)> = usage.iter().map(|u| (u.package.as_str(), u.used)).collect();
    assert_eq!(got, [("free-payer", 2), ("pay-p", 1)]);
}

fn keyed_usage(
    account: &str,
    package: Option<&str>,
    request_id: &str,
    key: &str,
    created_ms: i64,
    ttl_ms: i64,
) -> (Write, IdempotencyRecord) {
    let record = IdempotencyRecord {
        account: account.into(),
        key: key.into(),
        fingerprint: Fingerprint::of("POST", "/v1/x", "", request_id.as_bytes()),
        answer: Some(StoredAnswer {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: format!("{{\"id\":\"{request_id}\"}}").into_bytes(),
        }),
        created_at_ms: created_ms,
        expires_at_ms: created_ms + ttl_ms,
    };
    let mut w = usage(account, package, request_id);
    if let Write::AppendUsage { idempotency, .. } = &mut w {
        *idempotency = Some(Box::new(record.clone()));
    }
    (w, record)
}

/// Writes sent together share a group commit, whose usage counts are
/// written once per row at its end: they still match the events, also
/// when one write of the batch fails and it is redone a write at a time.
async fn counts_of_a_group_commit_match_its_events(s: &dyn Store) {
    for id in ["fold-a", "fold-b"] {
        commit(s, account(id)).await.unwrap();
    }
    let mut writes: Vec<Write> = (0..60)
        .map(|i| {
            let id = if i % 3 == 0 { "fold-b" } else { "fold-a" };
            usage(id, None, &format!("fold-{i}"))
        })
        .collect();
    // fold-a's free package holds 2: the third of these fails alone.
    for i in 0..3 {
        writes.push(usage(
            "fold-a",
            Some("free-fold-a"),
            &format!("fold-free-{i}"),
        ));
    }
    let results = futures_util::future::join_all(writes.into_iter().map(|w| commit(s, w))).await;
    assert_eq!(
        results.iter().filter(|r| r.is_err()).count(),
        1,
        "{results:?}"
    );
    let of = |m: &[tollgate::store::MonthUsage]| (m[0].calls, m[0].free, m[0].postpaid);
    let a = s.month_usage("2026-11", Some("fold-a")).await.unwrap();
    assert_eq!(of(&a), (42, 2, 40));
    let b = s.month_usage("2026-11", Some("fold-b")).await.unwrap();
    assert_eq!(of(&b), (20, 0, 20));
}

/// A key's record is committed with its task's event or not at all; a
/// live record holds its key, an expired one is replaced; the purge
/// forgets expired records in bounded writes.
async fn idempotency_records_stand_or_fall_with_their_event(s: &dyn Store) {
    let now = Timestamp::now().as_millisecond();
    commit(s, account("idem")).await.unwrap();
    let events = || async {
        let page = s.usage_events(0, 10_000).await.unwrap();
        page.iter()
            .filter(|e| e.event.contains("\"subject\":\"idem\""))
            .count()
    };
    let (w, rec) = keyed_usage("idem", None, "i1", "k1", now, 60_000);
    commit(s, w).await.unwrap();
    assert_eq!(
        s.idempotency_record("idem", "k1").await.unwrap(),
        Some(rec.clone())
    );
    assert_eq!(
        s.idempotency_record("other", "k1").await.unwrap(),
        None,
        "scoped to the account"
    );
    // A live record holds its key: the second success is not stored.
    let (w, _) = keyed_usage("idem", None, "i2", "k1", now, 60_000);
    let dup = commit(s, w).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    assert_eq!(events().await, 1, "no event without its record");
    assert_eq!(s.idempotency_record("idem", "k1").await.unwrap(), Some(rec));
    // An expired record is replaced.
    let (w, _) = keyed_usage("idem", None, "i3", "k2", now - 10_000, 1_000);
    commit(s, w).await.unwrap();
    let (w, fresh) = keyed_usage("idem", None, "i4", "k2", now, 60_000);
    commit(s, w).await.unwrap();
    assert_eq!(
        s.idempotency_record("idem", "k2").await.unwrap(),
        Some(fresh)
    );
    // A refused append leaves no record behind.
    commit(s, usage("idem", Some("free-idem"), "fill-1"))
        .await
        .unwrap();
    commit(s, usage("idem", Some("free-idem"), "fill-2"))
        .await
        .unwrap();
    let (w, _) = keyed_usage("idem", Some("free-idem"), "i5", "k3", now, 60_000);
    let refused = commit(s, w).await;
    assert!(
        matches!(refused, Err(StoreError::NotFound(_))),
        "{refused:?}"
    );
    assert_eq!(s.idempotency_record("idem", "k3").await.unwrap(), None);
    // A record whose answer was too large keeps no answer.
    let (mut w, mut big) = keyed_usage("idem", None, "i6", "k-big", now, 60_000);
    big.answer = None;
    if let Write::AppendUsage { idempotency, .. } = &mut w {
        *idempotency = Some(Box::new(big.clone()));
    }
    commit(s, w).await.unwrap();
    assert_eq!(
        s.idempotency_record("idem", "k-big").await.unwrap(),
        Some(big)
    );

    // The purge: five expired records, forgotten two at a time.
    for i in 0..5 {
        let (w, _) = keyed_usage(
            "idem",
            None,
            &format!("old{i}"),
            &format!("old{i}"),
            now - 10_000,
            1_000,
        );
        commit(s, w).await.unwrap();
    }
    let mut purged = Vec::new();
    loop {
        let n = match commit(
            s,
            Write::PurgeIdempotency {
                before_ms: now,
                limit: 2,
            },
        )
        .await
        .unwrap()
        {
            Committed::Purged(n) => n,
            other => panic!("{other:?}"),
        };
        purged.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(purged, [2, 2, 1, 0]);
    assert!(
        s.idempotency_record("idem", "old0")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.idempotency_record("idem", "k1").await.unwrap().is_some(),
        "live records stay"
    );
}

fn job(id: &str, account: &str, created_ms: i64) -> Job {
    Job {
        id: id.into(),
        account: account.into(),
        sub_account: None,
        api: "ImageStyleTransfer".into(),
        action: None,
        status: JobStatus::Queued,
        created_at: Timestamp::from_millisecond(created_ms).unwrap(),
        started_at: None,
        finished_at: None,
        request: JobRequest {
            method: "POST".into(),
            path_and_query: "/v1/style-transfer?x=1".into(),
            headers: vec![("content-type".into(), "application/json".into())],
        },
        result: None,
        error_code: None,
        charged_to: None,
    }
}

fn submit(job: Job, max_pending: u32) -> Write {
    Write::SubmitJob {
        job: Box::new(job),
        body: b"{\"InputImage\":\"x\"}".to_vec(),
        max_pending,
        idempotency: None,
    }
}

fn succeeded_usage(account: &str, job_id: &str, request_id: &str) -> Write {
    let mut w = usage(account, None, request_id);
    if let Write::AppendUsage { job, .. } = &mut w {
        *job = Some(Box::new(JobResult {
            id: job_id.into(),
            answer: Some(StoredAnswer {
                status: 200,
                headers: vec![("content-type".into(), "application/json".into())],
                body: b"{\"ok\":true}".to_vec(),
            }),
            at_ms: 2_000,
        }));
    }
    w
}

/// SPEC §10.2 at the store: a job is stored with its body, moves queued →
/// running → one final state and never back (but a requeue of a run that
/// died), its success is one commit with its event and happens once, the
/// pending bound holds, and the purge forgets finished jobs only.
async fn jobs_move_only_forward_and_succeed_once(s: &dyn Store) {
    commit(s, account("jobs")).await.unwrap();
    commit(s, pg::fixtures::postpaid("jobs")).await.unwrap();
    let at = Timestamp::from_millisecond(1_500).unwrap();
    assert_eq!(
        commit(s, submit(job("job_a", "jobs", 1_000), 2))
            .await
            .unwrap(),
        Committed::Done
    );
    assert_eq!(
        commit(s, submit(job("job_b", "jobs", 1_001), 2))
            .await
            .unwrap(),
        Committed::Done
    );
    assert_eq!(
        commit(s, submit(job("job_c", "jobs", 1_002), 2))
            .await
            .unwrap(),
        Committed::JobsFull,
        "2 unfinished already"
    );
    assert!(s.job("job_c").await.unwrap().is_none(), "nothing stored");
    let a = s.job("job_a").await.unwrap().unwrap();
    assert_eq!(a, job("job_a", "jobs", 1_000));
    assert_eq!(
        s.job_to_run("job_a")
            .await
            .unwrap()
            .map(|r| r.body)
            .as_deref(),
        Some(&b"{\"InputImage\":\"x\"}"[..])
    );
    let ids: Vec<String> = s
        .unfinished_jobs()
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, ["job_a", "job_b"], "oldest first");

    // Started once; a second start (another replica) is refused.
    commit(
        s,
        Write::StartJob {
            id: "job_a".into(),
            at,
        },
    )
    .await
    .unwrap();
    let again = commit(
        s,
        Write::StartJob {
            id: "job_a".into(),
            at,
        },
    )
    .await;
    assert!(matches!(again, Err(StoreError::NotFound(_))), "{again:?}");
    // A queued job can be cancelled; a running one cannot (by that write).
    let cancel = |id: &str| Write::EndJob {
        id: id.into(),
        end: JobEnd {
            status: JobStatus::Cancelled,
            error_code: None,
        },
        from: &[JobStatus::Queued],
        at,
    };
    assert!(matches!(
        commit(s, cancel("job_a")).await,
        Err(StoreError::NotFound(_))
    ));
    commit(s, cancel("job_b")).await.unwrap();
    let b = s.job("job_b").await.unwrap().unwrap();
    assert_eq!(b.status, JobStatus::Cancelled);
    assert!(b.finished_at.is_some());
    assert!(
        s.job_to_run("job_b").await.unwrap().is_none(),
        "a final job's body is gone"
    );

    // The success: once, with its event; a second success is refused and
    // stores no event.
    let before = s.usage_events(0, 10_000).await.unwrap().len();
    commit(s, succeeded_usage("jobs", "job_a", "ja1"))
        .await
        .unwrap();
    let twice = commit(s, succeeded_usage("jobs", "job_a", "ja2")).await;
    assert!(matches!(twice, Err(StoreError::Conflict(_))), "{twice:?}");
    assert_eq!(s.usage_events(0, 10_000).await.unwrap().len(), before + 1);
    let a = s.job("job_a").await.unwrap().unwrap();
    assert_eq!(a.status, JobStatus::Succeeded);
    assert_eq!(a.charged_to.as_deref(), Some("postpaid"));
    assert_eq!(a.result.as_ref().unwrap().body, b"{\"ok\":true}");
    assert!(s.unfinished_jobs().await.unwrap().is_empty());

    // A run that died goes back to queued (body kept), then fails.
    commit(s, submit(job("job_d", "jobs", 1_003), 2))
        .await
        .unwrap();
    commit(
        s,
        Write::StartJob {
            id: "job_d".into(),
            at,
        },
    )
    .await
    .unwrap();
    commit(
        s,
        Write::EndJob {
            id: "job_d".into(),
            end: JobEnd {
                status: JobStatus::Queued,
                error_code: None,
            },
            from: &[JobStatus::Running],
            at,
        },
    )
    .await
    .unwrap();
    let d = s.job("job_d").await.unwrap().unwrap();
    assert_eq!((d.status, d.started_at), (JobStatus::Queued, None));
    assert!(s.job_to_run("job_d").await.unwrap().is_some());
    commit(
        s,
        Write::EndJob {
            id: "job_d".into(),
            end: JobEnd {
                status: JobStatus::Failed,
                error_code: Some("FailedOperation.X".into()),
            },
            from: &[JobStatus::Queued, JobStatus::Running],
            at,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        s.job("job_d").await.unwrap().unwrap().error_code.as_deref(),
        Some("FailedOperation.X")
    );

    // Listed by account in id order, filtered by status, paged.
    let all: Vec<String> = s
        .jobs_of("jobs", None, "", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(all, ["job_a", "job_b", "job_d"]);
    let page: Vec<String> = s
        .jobs_of("jobs", None, "job_a", 1)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(page, ["job_b"]);
    let failed = s
        .jobs_of("jobs", Some(JobStatus::Failed), "", 10)
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);

    // The purge forgets finished jobs up to the cut-off, bounded.
    commit(s, submit(job("job_e", "jobs", 1_004), 5))
        .await
        .unwrap();
    let purge = |before_ms, limit| Write::PurgeJobs { before_ms, limit };
    assert_eq!(
        commit(s, purge(1_000, 10)).await.unwrap(),
        Committed::Purged(0),
        "none finished that early"
    );
    assert_eq!(
        commit(s, purge(10_000, 2)).await.unwrap(),
        Committed::Purged(2)
    );
    assert_eq!(
        commit(s, purge(10_000, 2)).await.unwrap(),
        Committed::Purged(1)
    );
    assert!(
        s.job("job_e").await.unwrap().is_some(),
        "an unfinished job is never purged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    conformance(Arc::new(SqliteStore::open(dir.path()).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_keeps_the_contract() {
    let db = pg::TestDb::create().await;
    let dir = tempfile::tempdir().unwrap();
    let store = PostgresStore::open(&db.url, dir.path(), "t").await.unwrap();
    conformance(store).await;
}
