//! The JSON Lines export: one file per UTC day, `usage/events-YYYY-MM-DD.jsonl`,
//! one event per line in commit order.
//!
//! The files are derived from the store's event feed (see
//! [`super::export`], which tails it). [`JsonlSink::open`] repairs them
//! after a crash (cuts a torn last line); the tail then re-exports what the
//! files miss and writes nothing twice.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One committed event, as the store hands it to the export.
pub struct ExportedEvent<'a> {
    pub seq: u64,
    pub id: &'a str,
    /// `YYYY-MM-DD...`, the event's UTC time.
    pub time: &'a str,
    pub json: &'a str,
}

pub struct JsonlSink {
    dir: PathBuf,
    current: Option<(String, File)>,
    exported_up_to: u64,
    last_id: Option<String>,
    /// Lines written to `current` since its last fsync.
    unsynced: bool,
}

impl JsonlSink {
    /// Opens the export directory and returns the sink with the id of the
    /// last event the files hold, if any (the caller maps it to a sequence
    /// number and calls [`JsonlSink::set_exported_up_to`]).
    pub fn open(dir: &Path) -> io::Result<(Self, Option<String>)> {
        fs::create_dir_all(dir)?;
        let mut files: Vec<PathBuf> = fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("events-") && n.ends_with(".jsonl"))
            })
            .collect();
        files.sort();
        let mut last_id = None;
        for path in files.iter().rev() {
            if let Some(id) = last_complete_id(path)? {
                last_id = Some(id);
                break;
            }
        }
        let sink = Self {
            dir: dir.to_path_buf(),
            current: None,
            exported_up_to: 0,
            last_id: last_id.clone(),
            unsynced: false,
        };
        Ok((sink, last_id))
    }

    pub fn exported_up_to(&self) -> u64 {
        self.exported_up_to
    }

    pub fn set_exported_up_to(&mut self, seq: u64) {
        self.exported_up_to = seq;
    }

    /// The id of the last event written.
    pub fn last_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// Makes every line written so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some((_, f)) = &self.current
            && self.unsynced
        {
            f.sync_data()?;
        }
        self.unsynced = false;
        Ok(())
    }

    /// Appends events (in commit order); skips any already exported. The
    /// lines of one day go out in one `write`, not one per event.
    pub fn append<'a>(
        &mut self,
        events: impl IntoIterator<Item = ExportedEvent<'a>>,
    ) -> io::Result<()> {
        let mut lines = Vec::new();
        let mut day: Option<&'a str> = None;
        let mut last: Option<(u64, &'a str)> = None;
        for ev in events {
            if ev.seq <= last.map_or(self.exported_up_to, |l| l.0) {
                continue;
            }
            let ev_day = ev.time.get(..10).unwrap_or("unknown-day");
            if day.is_some_and(|d| d != ev_day) {
                self.write_lines(day, &mut lines, last)?;
            }
            day = Some(ev_day);
            lines.extend_from_slice(ev.json.as_bytes());
            lines.push(b'\n');
            last = Some((ev.seq, ev.id));
        }
        self.write_lines(day, &mut lines, last)
    }

    /// Writes one day's gathered lines; the cursor moves only once they are
    /// written, so a failed write is retried whole.
    fn write_lines(
        &mut self,
        day: Option<&str>,
        lines: &mut Vec<u8>,
        last: Option<(u64, &str)>,
    ) -> io::Result<()> {
        let (Some(day), Some((seq, id))) = (day, last) else {
            return Ok(());
        };
        if lines.is_empty() {
            return Ok(());
        }
        self.file_for(day)?.write_all(lines)?;
        lines.clear();
        self.unsynced = true;
        self.exported_up_to = seq;
        self.last_id = Some(id.to_string());
        Ok(())
    }

    fn file_for(&mut self, day: &str) -> io::Result<&mut File> {
        let stale = !matches!(&self.current, Some((d, _)) if d == day);
        if stale {
            // A day's file is left for good: make its lines durable first.
            self.sync()?;
            let path = self.dir.join(format!("events-{day}.jsonl"));
            let file = OpenOptions::new().create(true).append(true).open(path)?;
            self.current = Some((day.to_string(), file));
        }
        Ok(&mut self.current.as_mut().expect("just set").1)
    }
}

/// The id of the last complete line of a file; cuts a torn last line (one
/// without its newline) left by a crash mid-write.
fn last_complete_id(path: &Path) -> io::Result<Option<String>> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    let mut complete_len = 0u64;
    let mut last_line = None;
    {
        let mut reader = BufReader::new(&mut file);
        let mut pos = 0u64;
        let mut buf = String::new();
        loop {
            buf.clear();
            let n = reader.read_line(&mut buf)?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            if buf.ends_with('\n') {
                complete_len = pos;
                if !buf.trim().is_empty() {
                    last_line = Some(buf.clone());
                }
            }
        }
    }
    if complete_len < len {
        file.set_len(complete_len)?;
        file.seek(SeekFrom::End(0))?;
    }
    Ok(last_line.and_then(|line| {
        serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_string))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, json: &str) -> ExportedEvent<'_> {
        ExportedEvent {
            seq,
            id: "",
            time: "2026-11-26T00:00:00.000Z",
            json,
        }
    }

    #[test]
    fn appends_then_recovers_last_id_and_cuts_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, last) = JsonlSink::open(dir.path()).unwrap();
        assert_eq!(last, None);
        sink.append([ev(1, r#"{"id":"a"}"#), ev(2, r#"{"id":"b"}"#)])
            .unwrap();
        sink.append([ev(2, r#"{"id":"b"}"#)]).unwrap(); // already exported
        let path = dir.path().join("events-2026-11-26.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"id":"c","#).unwrap(); // a crash mid-line
        drop(f);
        let (_, last) = JsonlSink::open(dir.path()).unwrap();
        assert_eq!(last.as_deref(), Some("b"));
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"id\":\"a\"}\n{\"id\":\"b\"}\n");
    }

    #[test]
    fn a_batch_spanning_midnight_goes_to_each_days_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, _) = JsonlSink::open(dir.path()).unwrap();
        let at = |seq, id, time, json| ExportedEvent {
            seq,
            id,
            time,
            json,
        };
        sink.append([
            at(1, "a", "2026-11-26T23:59:59.999Z", r#"{"id":"a"}"#),
            at(2, "b", "2026-11-26T23:59:59.999Z", r#"{"id":"b"}"#),
            at(3, "c", "2026-11-27T00:00:00.000Z", r#"{"id":"c"}"#),
            at(2, "b", "2026-11-26T23:59:59.999Z", r#"{"id":"b"}"#),
        ])
        .unwrap();
        sink.sync().unwrap();
        let day =
            |d: &str| fs::read_to_string(dir.path().join(format!("events-{d}.jsonl"))).unwrap();
        assert_eq!(day("2026-11-26"), "{\"id\":\"a\"}\n{\"id\":\"b\"}\n");
        assert_eq!(day("2026-11-27"), "{\"id\":\"c\"}\n");
        assert_eq!((sink.exported_up_to(), sink.last_id()), (3, Some("c")));
    }
}
