//! The SQLite store against a temp directory.

use jiff::Timestamp;
use rust_decimal::Decimal;

use super::SqliteStore;
use crate::accounts::AccountStatus;
use crate::billing::{self, PackageKind, ResourcePackage};
use crate::store::{
    AccountRow, Committed, SettlementLine, Store, StoreError, SubAccountRow, Write, commit,
};
use crate::usage::{UsageData, UsageEvent};

fn event(account: &str, charged_to: &str) -> UsageEvent {
    UsageEvent::new(
        "t",
        Timestamp::now(),
        UsageData {
            account: account.into(),
            sub_account: None,
            api: "ImageStyleTransfer".into(),
            units: 1,
            request_id: "r".into(),
            status: 200,
            queue_wait_ms: 0,
            upstream_ms: 1,
            charged_to: charged_to.into(),
            client_gone: false,
            idempotency: None,
            job_id: None,
        },
    )
}

fn usage(account: &str, package: Option<&str>) -> Write {
    let charged_to = match package {
        Some(p) if p.starts_with("free") => "free".to_string(),
        Some(p) => format!("prepaid:{p}"),
        None => "postpaid".into(),
    };
    let event = event(account, &charged_to);
    Write::AppendUsage {
        json: serde_json::to_string(&event).unwrap(),
        event: Box::new(event),
        package: package.map(String::from),
        month: "2026-11".into(),
        idempotency: None,
        job: None,
    }
}

fn account(id: &str) -> Write {
    let now = Timestamp::now();
    Write::CreateAccount {
        account: AccountRow {
            id: id.into(),
            status: AccountStatus::Active,
            created_at: now,
            postpaid: false,
            balance_usd: Decimal::ZERO,
            arrears_since: None,
        },
        free_package: Box::new(ResourcePackage::new(
            format!("free-{id}"),
            id,
            PackageKind::Free,
            2,
            Decimal::ZERO,
            now,
        )),
    }
}

#[tokio::test]
async fn writes_persist_and_conflicts_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    commit(&store, account("acme")).await.unwrap();
    let dup = commit(&store, account("acme")).await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    let orphan = commit(
        &store,
        Write::CreateSubAccount(SubAccountRow {
            id: "x".into(),
            root: "nobody".into(),
            max_concurrency: None,
            created_at: Timestamp::now(),
        }),
    )
    .await;
    assert!(matches!(orphan, Err(StoreError::NotFound(_))), "{orphan:?}");
    let Committed::Usage { seq: s1, .. } = commit(&store, usage("acme", None)).await.unwrap()
    else {
        panic!()
    };
    let Committed::Usage { seq: s2, .. } = commit(&store, usage("acme", None)).await.unwrap()
    else {
        panic!()
    };
    assert!(s2 > s1);
    store.close();
    drop(store);

    let store = SqliteStore::open(dir.path()).unwrap();
    let snap = store.load(Timestamp::now()).await.unwrap();
    assert_eq!(snap.accounts.len(), 1);
    assert_eq!(
        snap.resource_packages.len(),
        1,
        "the free package came with the account"
    );
    assert_eq!(store.usage_events(0, 10).await.unwrap().len(), 2);
    assert_eq!(store.usage_events(s1.unwrap(), 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_charge_and_its_event_stand_or_fall_together() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    commit(&store, account("acme")).await.unwrap();
    commit(&store, usage("acme", Some("free-acme")))
        .await
        .unwrap();
    commit(&store, usage("acme", Some("free-acme")))
        .await
        .unwrap();
    // The free package (size 2) is used up: a third charge fails, and its
    // event is not stored either.
    let third = commit(&store, usage("acme", Some("free-acme"))).await;
    assert!(matches!(third, Err(StoreError::NotFound(_))), "{third:?}");
    assert_eq!(store.usage_events(0, 10).await.unwrap().len(), 2);
    let snap = store.load(Timestamp::now()).await.unwrap();
    assert_eq!(snap.resource_packages[0].used, 2);
    let now = Timestamp::now();
    let m = store.month_usage("2026-11", None).await.unwrap();
    assert_eq!(m[0].calls, 2);
    assert_eq!(m[0].free, 2);
    // A used package cannot be refunded, whatever the caller believed.
    let r = commit(
        &store,
        Write::RefundResourcePackage {
            id: "free-acme".into(),
            at: now,
        },
    )
    .await;
    assert!(matches!(r, Err(StoreError::NotFound(_))));
}

#[tokio::test]
async fn settlements_replace_the_month_line_and_keep_a_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    commit(&store, account("acme")).await.unwrap();
    let line = |amount: &str, before: &str, balance: &str| SettlementLine {
        account: "acme".into(),
        bill: billing::bill(100, 100),
        delta_usd: amount.parse().unwrap(),
        balance_before_usd: before.parse().unwrap(),
        balance_after_usd: balance.parse().unwrap(),
        arrears_since: Some(Timestamp::now()),
    };
    let settle = |l: SettlementLine| Write::Settle {
        month: "2026-11".into(),
        lines: vec![l],
        at: Timestamp::now(),
    };
    commit(&store, settle(line("8", "0", "-8"))).await.unwrap();
    commit(&store, settle(line("0", "-8", "-8"))).await.unwrap();
    // Computed from a balance that is no longer there: refused, unchanged.
    assert!(matches!(
        commit(&store, settle(line("5", "0", "-5"))).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.settled("2026-11").await.unwrap(),
        vec![("acme".to_string(), "8".parse().unwrap())]
    );
    let snap = store.load(Timestamp::now()).await.unwrap();
    assert_eq!(
        snap.accounts[0].balance_usd,
        "-8".parse::<Decimal>().unwrap()
    );
    assert!(snap.accounts[0].arrears_since.is_some());
}

/// Writes sent together share a group commit, whose usage counts are
/// written once per account and source at its end: the counts still match
/// the stored events exactly, also when one write of the batch fails and
/// the batch is redone a write at a time.
#[tokio::test]
async fn counts_folded_per_batch_match_the_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    commit(&store, account("acme")).await.unwrap();
    commit(&store, account("beta")).await.unwrap();
    let mut writes = Vec::new();
    for i in 0..80 {
        writes.push(usage(if i % 8 < 5 { "acme" } else { "beta" }, None));
    }
    // acme's free package holds 2: the third of these fails alone.
    for _ in 0..3 {
        writes.push(usage("acme", Some("free-acme")));
    }
    let results =
        futures_util::future::join_all(writes.into_iter().map(|w| commit(&store, w))).await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(failed, 1, "{results:?}");
    assert_eq!(store.usage_events(0, 1000).await.unwrap().len(), 82);
    let m = store.month_usage("2026-11", None).await.unwrap();
    let of = |id: &str| m.iter().find(|u| u.account == id).unwrap();
    assert_eq!(
        (of("acme").calls, of("acme").free, of("acme").postpaid),
        (52, 2, 50)
    );
    assert_eq!((of("beta").calls, of("beta").postpaid), (30, 30));
}

/// The head read from the columns is the head of the stored JSON: the
/// export and the stream publisher take an event's id, time and subject
/// from the columns and pass the JSON on as it is.
#[tokio::test]
async fn an_events_columns_are_the_head_of_its_json() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path()).unwrap();
    commit(&store, account("acme")).await.unwrap();
    commit(&store, usage("acme", None)).await.unwrap();
    commit(&store, usage("acme", Some("free-acme")))
        .await
        .unwrap();
    let events = store.usage_events(0, 10).await.unwrap();
    assert_eq!(events.len(), 2);
    for e in &events {
        let columns = e
            .columns
            .as_ref()
            .expect("SQLite keeps the head in columns");
        let parsed: crate::usage::EventHead = serde_json::from_str(&e.event).unwrap();
        assert_eq!(columns, &parsed);
        assert_eq!(columns.subject, "acme");
        assert!(!columns.id.is_empty() && !columns.time.is_empty());
        assert_eq!(e.head().as_deref(), Some(&parsed));
    }
}
