//! The usage event's shape.

use std::borrow::Cow;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::clock::rfc3339_millis;

pub const EVENT_TYPE: &str = "tollgate.usage.v1";

/// A CloudEvents 1.0 event in structured JSON mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    // The constant fields are borrowed when this gateway makes the event
    // (no allocation per task) and owned when one is read back.
    pub specversion: Cow<'static, str>,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: Cow<'static, str>,
    pub time: String,
    pub subject: String,
    pub datacontenttype: Cow<'static, str>,
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
            specversion: Cow::Borrowed("1.0"),
            id: uuid_v7(),
            source: format!("tollgate/{instance}"),
            kind: Cow::Borrowed(EVENT_TYPE),
            time: rfc3339_millis(time),
            subject: data.account.clone(),
            datacontenttype: Cow::Borrowed("application/json"),
            data,
        }
    }
}

/// A new UUIDv7 in its hyphenated form, written straight into the string
/// (`to_string` goes through the formatting machinery).
fn uuid_v7() -> String {
    uuid::Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut uuid::Uuid::encode_buffer())
        .to_owned()
}

/// The fields the export and the stream publisher need from a stored
/// event.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct EventHead {
    pub id: String,
    #[serde(default)]
    pub time: String,
    #[serde(default)]
    pub subject: String,
}

impl EventHead {
    /// The head of a stored event's JSON. An event this gateway wrote
    /// starts with its fields in [`UsageEvent`]'s order (specversion, id,
    /// source, type, time, subject), none escaped, so they are read in
    /// place without parsing the rest (the `data` object, most of the
    /// text: a full parse was ~6,000 instructions a task in the export);
    /// anything else is parsed whole. `None`: not a JSON object with an id.
    pub fn of(json: &str) -> Option<Self> {
        Self::in_place(json).or_else(|| serde_json::from_str(json).ok())
    }

    fn in_place(json: &str) -> Option<Self> {
        let mut rest = json.strip_prefix('{')?;
        take_field(&mut rest, "specversion")?;
        let id = take_field(&mut rest, "id")?.to_string();
        take_field(&mut rest, "source")?;
        take_field(&mut rest, "type")?;
        let time = take_field(&mut rest, "time")?.to_string();
        let subject = take_field(&mut rest, "subject")?.to_string();
        Some(Self { id, time, subject })
    }
}

/// `"<name>":"<value>",` at the start of `rest`: the value (unescaped
/// only), and `rest` moved past it.
fn take_field<'a>(rest: &mut &'a str, name: &str) -> Option<&'a str> {
    let r: &'a str = rest;
    let r = r
        .strip_prefix('"')?
        .strip_prefix(name)?
        .strip_prefix("\":\"")?;
    let end = r.find('"')?;
    let value = &r[..end];
    if value.contains('\\') {
        return None;
    }
    *rest = r[end + 1..].strip_prefix(',')?;
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event of root account `acme` through sub-account `acme-dev`,
    /// charged to prepaid package `p1`.
    fn event() -> UsageEvent {
        UsageEvent::new(
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
        )
    }

    #[test]
    fn the_head_is_read_in_place_and_agrees_with_a_full_parse() {
        let ev = event();
        let json = serde_json::to_string(&ev).unwrap();
        let quick = EventHead::in_place(&json).expect("our own shape");
        let full: EventHead = serde_json::from_str(&json).unwrap();
        assert_eq!(quick, full);
        assert_eq!(
            (
                quick.id.as_str(),
                quick.time.as_str(),
                quick.subject.as_str()
            ),
            (ev.id.as_str(), "2026-11-26T02:40:00.123Z", "acme")
        );
    }

    #[test]
    fn any_other_shape_is_parsed_whole() {
        // Another field order, whitespace, an escaped value: not read in
        // place, still read right.
        for json in [
            r#"{"id":"e1","specversion":"1.0","time":"2026-01-01T00:00:00Z","subject":"a"}"#,
            r#"{ "specversion": "1.0", "id": "e1", "source": "s", "type": "t", "time": "2026-01-01T00:00:00Z", "subject": "a" }"#,
            r#"{"specversion":"1.0","id":"e1","source":"s\"x","type":"t","time":"2026-01-01T00:00:00Z","subject":"a"}"#,
        ] {
            assert!(EventHead::in_place(json).is_none(), "{json}");
            let h = EventHead::of(json).unwrap();
            assert_eq!((h.id.as_str(), h.subject.as_str()), ("e1", "a"), "{json}");
        }
        assert_eq!(EventHead::of("[1]"), None);
        assert_eq!(EventHead::of("{\"specversion\":\"1.0\""), None);
    }

    #[test]
    fn serializes_as_a_cloudevent() {
        let ev = event();
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
