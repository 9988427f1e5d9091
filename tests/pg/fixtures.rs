//! Writes the store tests commit.

use jiff::Timestamp;
use rust_decimal::Decimal;
use tollgate::accounts::AccountStatus;
use tollgate::billing::{PackageKind, ResourcePackage};
use tollgate::store::{AccountRow, Write};
use tollgate::usage::{UsageData, UsageEvent};

/// Turns postpaid on for `account`.
pub fn postpaid(account: &str) -> Write {
    Write::SetPostpaid {
        account: account.into(),
        enabled: true,
    }
}

pub fn account(id: &str) -> Write {
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

pub fn event(account: &str, charged_to: &str, request_id: &str) -> UsageEvent {
    UsageEvent::new(
        "t",
        Timestamp::now(),
        UsageData {
            account: account.into(),
            sub_account: None,
            api: "ImageStyleTransfer".into(),
            units: 1,
            request_id: request_id.into(),
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

pub fn append(event: UsageEvent, package: Option<&str>) -> Write {
    Write::AppendUsage {
        json: serde_json::to_string(&event).unwrap(),
        event: Box::new(event),
        package: package.map(String::from),
        month: "2026-11".into(),
        idempotency: None,
        job: None,
    }
}

/// A usage append charged to `package` (free-* is the free package), or
/// postpaid.
pub fn usage(account: &str, package: Option<&str>, request_id: &str) -> Write {
    let charged_to = match package {
        Some(p) if p.starts_with("free") => "free".to_string(),
        Some(p) => format!("prepaid:{p}"),
        None => "postpaid".into(),
    };
    append(event(account, &charged_to, request_id), package)
}
