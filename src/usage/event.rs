//! The usage event's shape.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::clock::rfc3339_millis;

pub const EVENT_TYPE: &str = "tollgate.usage.v1";

/// A CloudEvents 1.0 event in structured JSON mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub time: String,
    pub subject: String,
    pub datacontenttype: String,
    pub data: UsageData,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageData {
    pub account: String,
    /// `null` when the task came in on a root account's key.
    pub sub_account: Option<String>,
    pub api: String,
    pub units: u32,
    pub request_id: String,
    pub status: u16,
    pub queue_wait_ms: u64,
    pub upstream_ms: u64,
    pub charged_to: String,
    /// The client had gone away before the backend answered; the task ran to
    /// completion anyway and is billed.
    pub client_gone: bool,
    /// Only for a task with an idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<EventIdempotency>,
    /// Only for a job (SPEC §10.2): its id. A job has at most one event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

/// A keyed task's key, and whether its answer was kept for retries (an
/// answer over `idempotency.max_stored_answer_bytes` is not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventIdempotency {
    pub key: String,
    pub answer_stored: bool,
}

impl UsageEvent {
    /// A new event with a fresh UUIDv7 id (time-ordered, so ids sort roughly
    /// in commit order).
    pub fn new(instance: &str, time: Timestamp, data: UsageData) -> Self {
        Self {
            specversion: "1.0".into(),
            id: uuid::Uuid::now_v7().to_string(),
            source: format!("tollgate/{instance}"),
            kind: EVENT_TYPE.into(),
            time: rfc3339_millis(time),
            subject: data.account.clone(),
            datacontenttype: "application/json".into(),
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_a_cloudevent() {
        let ev = UsageEvent::new(
            "gw1",
            "2026-11-26T02:40:00.123Z".parse().unwrap(),
            UsageData {
                account: "acme".into(),
                sub_account: Some("acme-dev".into()),
                api: "ImageStyleTransfer".into(),
                units: 1,
                request_id: "r1".into(),
                status: 200,
                queue_wait_ms: 12,
                upstream_ms: 840,
                charged_to: "prepaid:p1".into(),
                client_gone: false,
                idempotency: None,
                job_id: None,
            },
        );
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "tollgate.usage.v1");
        assert_eq!(v["source"], "tollgate/gw1");
        assert_eq!(v["subject"], "acme");
        assert_eq!(v["time"], "2026-11-26T02:40:00.123Z");
        assert_eq!(v["data"]["charged_to"], "prepaid:p1");
        assert!(uuid::Uuid::parse_str(v["id"].as_str().unwrap()).is_ok());
    }
}
