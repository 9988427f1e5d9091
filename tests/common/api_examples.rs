//! Replays the examples of docs/API.md against a running gateway and
//! compares every answer with the one the document shows. The convention
//! (stated at the top of docs/API.md):
//!
//! - a ```` ```sh replay ```` block holds requests (`curl` lines) sent in
//!   order; `<!-- replay … -->` holds requests sent the same way but not
//!   shown (what an example needs that no earlier example made);
//! - a ```` ```json answer <status> ```` block is the answer to the next
//!   unanswered request of the latest replay block: status and body
//!   compared field by field; a replayed request without one must get a
//!   `2xx`;
//! - values that differ from run to run are compared by shape: timestamps,
//!   dates, months, ids (`free_`, `rp_`, `cp_`, `key_` + 32 hex digits,
//!   `tg_` + 48, `AKID` + 32, 32 hex digits, UUIDs) and the timings
//!   `queue_wait_ms` and `upstream_ms`. An id shown in an answer stands for
//!   the real one in later requests, and one id of the document is always
//!   the same real id;
//! - in requests, a date `YYYY-MM-DD` is moved by the days from
//!   [`DOC_TODAY`] to tomorrow (so every date the examples use is in the
//!   future, refund deadlines included), a month `YYYY-MM` becomes this
//!   month; `$A` is the admin listener, `$G` the data plane, `$T` and `$J`
//!   the token and JSON headers, `$API_KEY` the `api_key` of the latest
//!   answer that had one.

use std::collections::HashMap;

use http::{Method, StatusCode};
use serde_json::Value;

use crate::common::{ADMIN_TOKEN, Http, Resp};

/// "Today" in the document's examples.
pub const DOC_TODAY: &str = "2026-05-04";

#[derive(Debug, Clone)]
enum Item {
    /// A request line (continuations joined), its document line, and how
    /// many times it is sent.
    Request {
        line: String,
        at: usize,
        times: usize,
    },
    /// The start of a replay block.
    Block,
    /// An expected answer.
    Answer {
        status: u16,
        body: String,
        at: usize,
    },
    /// A `curl` line of an `sh` block not marked `replay`.
    Unreplayed { line: String, at: usize },
}

fn parse(doc: &str) -> Vec<Item> {
    let mut items = Vec::new();
    let lines: Vec<&str> = doc.lines().collect();
    let mut i = 0;
    // `sh` blocks are held to the convention from the admin API on.
    let mut in_admin = false;
    while i < lines.len() {
        let line = lines[i];
        if line.starts_with("## ") {
            in_admin = line.trim() == "## Admin API";
        }
        if let Some(info) = line.strip_prefix("```").filter(|s| !s.is_empty()) {
            let words: Vec<&str> = info.split_whitespace().collect();
            let start = i + 1;
            let mut end = start;
            while end < lines.len() && !lines[end].starts_with("```") {
                end += 1;
            }
            let body = &lines[start..end];
            match words.as_slice() {
                ["sh", "replay"] => {
                    items.push(Item::Block);
                    items.extend(requests(body, start));
                }
                ["json", "answer", status] => items.push(Item::Answer {
                    status: status.parse().expect("an answer's status"),
                    body: body.join("\n"),
                    at: start,
                }),
                ["sh"] if in_admin => {
                    let curls: Vec<&str> = body
                        .iter()
                        .copied()
                        .filter(|l| l.trim_start().starts_with("curl "))
                        .collect();
                    for r in requests(&curls, start) {
                        if let Item::Request { line, at, .. } = r {
                            items.push(Item::Unreplayed { line, at });
                        }
                    }
                }
                [_, marker, ..] if ["replay", "answer"].contains(marker) => {
                    panic!("docs/API.md:{}: a malformed marker `{info}`", i + 1)
                }
                _ => {}
            }
            i = end + 1;
            continue;
        }
        if line.trim() == "<!-- replay" {
            let start = i + 1;
            let mut end = start;
            while end < lines.len() && lines[end].trim() != "-->" {
                end += 1;
            }
            items.push(Item::Block);
            items.extend(requests(&lines[start..end], start));
            i = end + 1;
            continue;
        }
        i += 1;
    }
    items
}

/// The `curl` lines of a block (`\` continuations joined; `for i in $(seq
/// N); do …; done` sends it N times).
fn requests(body: &[&str], first: usize) -> Vec<Item> {
    let mut out = Vec::new();
    let mut acc = String::new();
    let mut at = first;
    for (n, l) in body.iter().enumerate() {
        if acc.is_empty() {
            at = first + n + 1;
        }
        let l = l.trim();
        if let Some(cont) = l.strip_suffix('\\') {
            acc.push_str(cont);
            acc.push(' ');
            continue;
        }
        acc.push_str(l);
        let line = std::mem::take(&mut acc);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (line, times) = match line
            .strip_prefix("for i in $(seq ")
            .and_then(|r| r.split_once("); do "))
        {
            Some((n, rest)) => (
                rest.strip_suffix("; done")
                    .expect("`for …; do …; done`")
                    .to_string(),
                n.parse().expect("a count"),
            ),
            None => (line.to_string(), 1),
        };
        assert!(
            line.starts_with("curl "),
            "docs/API.md:{at}: not a curl line: {line}"
        );
        out.push(Item::Request { line, at, times });
    }
    out
}

/// Splits a shell line into words: '…' literal, "…" and bare words with
/// `$NAME` expanded from `vars`; stops at a `#` comment.
fn shell_words(line: &str, vars: &HashMap<&str, String>) -> Vec<String> {
    let expand = |s: &str| -> String {
        let mut out = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '$' {
                out.push(c);
                continue;
            }
            let mut name = String::new();
            while let Some(&n) = chars.peek() {
                if n.is_ascii_alphanumeric() || n == '_' {
                    name.push(n);
                    chars.next();
                } else {
                    break;
                }
            }
            match vars.get(name.as_str()) {
                Some(v) => out.push_str(v),
                None => panic!("`${name}` is not a variable of the replay: {line}"),
            }
        }
        out
    };
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else { break };
        if first == '#' {
            break;
        }
        let mut word = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            match c {
                '\'' => {
                    for q in chars.by_ref() {
                        if q == '\'' {
                            break;
                        }
                        word.push(q);
                    }
                }
                '"' => {
                    let mut inner = String::new();
                    for q in chars.by_ref() {
                        if q == '"' {
                            break;
                        }
                        inner.push(q);
                    }
                    word.push_str(&expand(&inner));
                }
                '$' => {
                    let mut bare = String::from("$");
                    while let Some(&n) = chars.peek() {
                        if n.is_ascii_alphanumeric() || n == '_' {
                            bare.push(n);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    word.push_str(&expand(&bare));
                }
                c => word.push(c),
            }
        }
        words.push(word);
    }
    words
}

struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: String,
}

fn curl(words: &[String], at: usize) -> Request {
    assert_eq!(words[0], "curl");
    let (mut method, mut url, mut headers, mut body) = (None, None, Vec::new(), None);
    let mut it = words[1..].iter();
    while let Some(w) = it.next() {
        match w.as_str() {
            "-s" => {}
            "-X" => method = Some(it.next().expect("a method").clone()),
            "-H" => {
                let h = it.next().expect("a header");
                let (k, v) = h.split_once(':').expect("Name: value");
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            "-d" => body = Some(it.next().expect("a body").clone()),
            u if u.starts_with("http://") => url = Some(u.to_string()),
            other => panic!("docs/API.md:{at}: curl option `{other}` is not replayed"),
        }
    }
    let method = match (method, &body) {
        (Some(m), _) => m.parse().expect("a method"),
        (None, Some(_)) => Method::POST,
        (None, None) => Method::GET,
    };
    Request {
        method,
        url: url.unwrap_or_else(|| panic!("docs/API.md:{at}: no URL")),
        headers,
        body: body.unwrap_or_default(),
    }
}

/// What a varying value is, by its shape.
#[derive(Debug, PartialEq, Clone, Copy)]
enum Shape {
    Timestamp,
    Date,
    Month,
    /// An id: its prefix and how many hex digits follow.
    Id(&'static str, usize),
    Uuid,
}

fn hex(s: &str, n: usize) -> bool {
    s.len() == n
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn digits_at(s: &[u8], spans: &[(usize, usize)]) -> bool {
    spans
        .iter()
        .all(|&(a, b)| s[a..b].iter().all(u8::is_ascii_digit))
}

fn shape(s: &str) -> Option<Shape> {
    let b = s.as_bytes();
    let date = |b: &[u8]| {
        b.len() >= 10 && b[4] == b'-' && b[7] == b'-' && digits_at(b, &[(0, 4), (5, 7), (8, 10)])
    };
    if b.len() == 24
        && date(b)
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && digits_at(b, &[(11, 13), (14, 16), (17, 19), (20, 23)])
    {
        return Some(Shape::Timestamp);
    }
    if b.len() == 10 && date(b) {
        return Some(Shape::Date);
    }
    if b.len() == 7 && b[4] == b'-' && digits_at(b, &[(0, 4), (5, 7)]) {
        return Some(Shape::Month);
    }
    for (prefix, n) in [
        ("free_", 32),
        ("rp_", 32),
        ("cp_", 32),
        ("key_", 32),
        ("tg_", 48),
        ("AKID", 32),
        ("", 32),
    ] {
        if s.strip_prefix(prefix).is_some_and(|rest| hex(rest, n)) {
            return Some(Shape::Id(prefix, n));
        }
    }
    let parts: Vec<&str> = s.split('-').collect();
    if parts.len() == 5 && parts.iter().zip([8, 4, 4, 4, 12]).all(|(p, n)| hex(p, n)) {
        return Some(Shape::Uuid);
    }
    None
}

/// Keys whose numbers are timings.
const TIMINGS: [&str; 2] = ["queue_wait_ms", "upstream_ms"];

/// Compares `doc` with `got`; records ids in `ids` (document → real).
fn compare(
    doc: &Value,
    got: &Value,
    path: &str,
    ids: &mut HashMap<String, String>,
    errors: &mut Vec<String>,
) {
    match (doc, got) {
        (Value::Object(d), Value::Object(g)) => {
            for k in d.keys().filter(|k| !g.contains_key(*k)) {
                errors.push(format!("{path}.{k}: shown but not answered"));
            }
            for k in g.keys().filter(|k| !d.contains_key(*k)) {
                errors.push(format!("{path}.{k}: answered ({}) but not shown", g[k]));
            }
            for (k, dv) in d {
                if let Some(gv) = g.get(k) {
                    if TIMINGS.contains(&k.as_str()) {
                        if !(dv.is_u64() && gv.is_u64()) {
                            errors.push(format!("{path}.{k}: {dv} vs {gv}, not timings"));
                        }
                        continue;
                    }
                    compare(dv, gv, &format!("{path}.{k}"), ids, errors);
                }
            }
        }
        (Value::Array(d), Value::Array(g)) => {
            if d.len() != g.len() {
                errors.push(format!(
                    "{path}: {} elements shown, {} answered: {got}",
                    d.len(),
                    g.len()
                ));
                return;
            }
            for (i, (dv, gv)) in d.iter().zip(g).enumerate() {
                compare(dv, gv, &format!("{path}[{i}]"), ids, errors);
            }
        }
        (Value::String(d), Value::String(g)) if shape(d).is_some() => {
            let s = shape(d);
            if shape(g) != s {
                errors.push(format!("{path}: {d:?} ({s:?}) vs {g:?} ({:?})", shape(g)));
                return;
            }
            if matches!(s, Some(Shape::Id(..) | Shape::Uuid)) {
                match ids.get(d) {
                    Some(known) if known != g => errors.push(format!(
                        "{path}: {d} stood for {known} earlier, here for {g}"
                    )),
                    Some(_) => {}
                    None => {
                        if let Some((other, _)) = ids.iter().find(|(_, v)| *v == g) {
                            errors.push(format!(
                                "{path}: {g} is shown as {d} here but as {other} earlier"
                            ));
                        }
                        ids.insert(d.clone(), g.clone());
                    }
                }
            }
        }
        (d, g) => {
            if d != g {
                errors.push(format!("{path}: shown {d}, answered {g}"));
            }
        }
    }
}

/// Moves the dates and months of a request (see the module doc).
fn move_dates(s: &str, shift_days: i64, month: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    let is_digit = |j: usize| b.get(j).is_some_and(u8::is_ascii_digit);
    while i < b.len() {
        let starts = i == 0 || !is_digit(i - 1);
        if starts
            && i + 10 <= b.len()
            && shape(&s[i..i + 10]) == Some(Shape::Date)
            && !is_digit(i + 10)
        {
            let d: jiff::civil::Date = s[i..i + 10].parse().expect("a date");
            let moved = d.checked_add(jiff::Span::new().days(shift_days)).unwrap();
            out.push_str(&moved.to_string());
            i += 10;
            continue;
        }
        if starts
            && i + 7 <= b.len()
            && shape(&s[i..i + 7]) == Some(Shape::Month)
            && !is_digit(i + 7)
            && b.get(i + 7) != Some(&b'-')
        {
            out.push_str(month);
            i += 7;
            continue;
        }
        let c = s[i..].chars().next().unwrap();
        out.push(c);
        i += c.len_utf8();
    }
    out
}

type Pending = std::collections::VecDeque<(usize, String, Resp)>;

/// Requests of a block left without an answer must have succeeded.
fn unanswered(pending: &mut Pending, errors: &mut Vec<String>) {
    for (at, line, r) in pending.drain(..) {
        if !r.status.is_success() {
            errors.push(format!(
                "docs/API.md:{at}: `{line}` answered {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
    }
}

/// What a replay checked.
pub struct Replayed {
    pub requests: usize,
    pub answers: usize,
}

/// Replays `doc` against the admin listener `admin` and the data plane
/// `data`. Panics listing every difference.
pub async fn replay(doc: &str, http: &Http, admin: &str, data: &str) -> Replayed {
    let items = parse(doc);
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let doc_today: jiff::civil::Date = DOC_TODAY.parse().unwrap();
    let shift_days = i64::from(today.since(doc_today).unwrap().get_days()) + 1;
    let month = today.strftime("%Y-%m").to_string();
    let mut vars: HashMap<&str, String> = HashMap::from([
        ("A", admin.to_string()),
        ("G", data.to_string()),
        ("T", format!("Authorization: Bearer {ADMIN_TOKEN}")),
        ("J", "Content-Type: application/json".to_string()),
    ]);
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut errors = Vec::new();
    let mut sent_lines: Vec<String> = Vec::new();
    // The current block's answers not yet compared, in order.
    let mut pending = Pending::default();
    let (mut requests, mut answers) = (0, 0);
    for item in items {
        match item {
            Item::Block => unanswered(&mut pending, &mut errors),
            Item::Request { line, at, times } => {
                sent_lines.push(line.clone());
                let mut last = None;
                for _ in 0..times {
                    let mut text = move_dates(&line, shift_days, &month);
                    // Longest first: no id is a prefix of another, but be safe.
                    let mut known: Vec<_> = ids.iter().collect();
                    known.sort_by_key(|(d, _)| std::cmp::Reverse(d.len()));
                    for (d, g) in known {
                        text = text.replace(d.as_str(), g);
                    }
                    let req = curl(&shell_words(&text, &vars), at);
                    let headers: Vec<(&str, &str)> = req
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let r = http
                        .send(req.method.clone(), &req.url, &headers, req.body.clone())
                        .await;
                    requests += 1;
                    if let Some(key) = r.json()["api_key"].as_str() {
                        vars.insert("API_KEY", key.to_string());
                    }
                    if let Some(prev) = last.replace(r) {
                        pending.push_back((at, line.clone(), prev));
                    }
                }
                let r = last.expect("sent at least once");
                pending.push_back((at, line, r));
            }
            Item::Answer { status, body, at } => {
                let Some((req_at, line, r)) = pending.pop_front() else {
                    errors.push(format!(
                        "docs/API.md:{at}: an answer with no request before it"
                    ));
                    continue;
                };
                answers += 1;
                if r.status != StatusCode::from_u16(status).unwrap() {
                    errors.push(format!(
                        "docs/API.md:{at}: `{line}` (line {req_at}) answered {}, shown {status}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    ));
                    continue;
                }
                let doc: Value = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("docs/API.md:{at}: the answer is not JSON: {e}"));
                let got = r.json();
                let mut diffs = Vec::new();
                compare(&doc, &got, "", &mut ids, &mut diffs);
                for d in diffs {
                    errors.push(format!("docs/API.md:{at} (`{line}`): {d}"));
                }
            }
            Item::Unreplayed { line, at } => {
                if !sent_lines.contains(&line) {
                    errors.push(format!(
                        "docs/API.md:{at}: `{line}` is an admin example not replayed (mark its block `sh replay`)"
                    ));
                }
            }
        }
    }
    unanswered(&mut pending, &mut errors);
    assert!(
        errors.is_empty(),
        "docs/API.md differs from the binary:\n{}",
        errors.join("\n")
    );
    Replayed { requests, answers }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_dates() {
        assert_eq!(shape("2026-05-04T09:12:33.120Z"), Some(Shape::Timestamp));
        assert_eq!(shape("2026-05-04"), Some(Shape::Date));
        assert_eq!(shape("2026-05"), Some(Shape::Month));
        assert_eq!(
            shape("key_0196a3c8b1e27f3a9c4d5e6f7a8b9c0d"),
            Some(Shape::Id("key_", 32))
        );
        assert_eq!(
            shape("0196a3e0-7b1c-7d2e-8f3a-4b5c6d7e8f90"),
            Some(Shape::Uuid)
        );
        assert_eq!(shape("acme"), None);
        assert_eq!(shape("12.50"), None);
        assert_eq!(
            move_dates(r#"{"start":"2026-05-05"} ?month=2026-05"#, 2, "2027-01"),
            r#"{"start":"2026-05-07"} ?month=2027-01"#
        );
    }
}
