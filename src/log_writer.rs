//! Where log lines go: one buffer that every thread appends a formatted
//! line to, written to the sink (stderr) by a writer thread every
//! [`FLUSH_EVERY`], as nginx's `access_log ... buffer= flush=` does.
//!
//! A line costs its formatting and an append under an uncontended lock on
//! the thread that logs: no channel, no wake-up, and no allocation once
//! the buffer has grown to a batch's size. A channel
//! to a writer thread (tracing-appender's `non_blocking`) woke that thread
//! for nearly every access line, and its receiver spun with
//! `sched_yield` before it slept: on one pinned core, 2 context switches
//! per task (`strace -f`, see BENCHMARKS.md).
//!
//! Never lossy: past [`MAX_PENDING`] bytes the thread that logs writes the
//! buffer out itself (the logger waits, as it would on a full pipe). Lines
//! keep their order: the buffer is handed to the sink under the sink's
//! lock, taken before the buffer's is let go. What is buffered is written
//! when the [`Flusher`] guard drops (keep it until the process ends).

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// Past this the logging thread writes the buffer out itself: seconds of
/// access lines at full load, so a sink held up by the disk (the kernel
/// throttling writers while it writes back checkpointed pages) does not
/// stall the request path.
const MAX_PENDING: usize = 8 << 20;

struct Shared {
    pending: Mutex<Vec<u8>>,
    sink: Mutex<Box<dyn Write + Send>>,
    stop: Mutex<bool>,
    stopping: Condvar,
}

/// Poisoning only means a thread panicked mid-append; the bytes are still
/// worth writing.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Writes out what is pending. With `pending` held by the caller, the
    /// sink's lock is taken before it is let go, so no later batch can
    /// overtake this one.
    fn drain(&self, mut pending: MutexGuard<'_, Vec<u8>>) {
        if pending.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut *pending);
        let mut sink = lock(&self.sink);
        drop(pending);
        // A log that cannot be written has nowhere to say so.
        let _ = sink.write_all(&batch).and_then(|()| sink.flush());
        drop(sink);
        // Give the allocation back for the next batch (unless the buffer
        // was refilled meanwhile).
        let mut batch = batch;
        batch.clear();
        let mut pending = lock(&self.pending);
        if pending.is_empty() && pending.capacity() < batch.capacity() {
            *pending = batch;
        }
    }
}

/// The subscriber's writer (`with_writer`).
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after writing what is buffered.
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A writer to `sink` and the guard of its writer thread (named `name`).
pub fn buffered(sink: Box<dyn Write + Send>, name: &str) -> io::Result<(LogWriter, Flusher)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Vec::with_capacity(64 << 10)),
        sink: Mutex::new(sink),
        stop: Mutex::new(false),
        stopping: Condvar::new(),
    });
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut stop = lock(&shared.stop);
                loop {
                    let (s, _) = shared
                        .stopping
                        .wait_timeout(stop, FLUSH_EVERY)
                        .unwrap_or_else(|e| e.into_inner());
                    stop = s;
                    let done = *stop;
                    drop(stop);
                    shared.drain(lock(&shared.pending));
                    if done {
                        return;
                    }
                    stop = lock(&shared.stop);
                }
            })?
    };
    Ok((
        LogWriter {
            shared: shared.clone(),
        },
        Flusher {
            shared,
            thread: Some(thread),
        },
    ))
}

impl Drop for Flusher {
    fn drop(&mut self) {
        *lock(&self.shared.stop) = true;
        self.shared.stopping.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Lines logged after the thread's last pass.
        self.shared.drain(lock(&self.shared.pending));
    }
}

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut pending = lock(&self.shared.pending);
        pending.extend_from_slice(line);
        if pending.len() >= MAX_PENDING {
            self.shared.drain(pending);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read, counting the writes it gets.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            s.0.extend_from_slice(b);
            s.1 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().0.clone()).unwrap()
        }
        fn writes(&self) -> usize {
            self.0.lock().unwrap().1
        }
    }

    #[test]
    fn lines_reach_the_sink_in_batches_in_order_and_all_on_drop() {
        let sink = Sink::default();
        let (writer, flusher) = buffered(Box::new(sink.clone()), "test-log").unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = writer.make_writer();
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        w.write_all(format!("t{t} {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(flusher);
        let text = sink.text();
        assert_eq!(text.lines().count(), 8_000, "nothing is lost");
        for t in 0..4 {
            let seen: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("t{t} ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(seen, (0..2_000).collect::<Vec<_>>(), "thread {t} in order");
        }
        assert!(sink.writes() < 8_000, "lines are written in batches");
    }

    #[test]
    fn a_line_is_written_soon_without_a_drop() {
        let sink = Sink::default();
        let (writer, _flusher) = buffered(Box::new(sink.clone()), "test-log").unwrap();
        writer.make_writer().write_all(b"hello\n").unwrap();
        for _ in 0..250 {
            if sink.text() == "hello\n" {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the line never reached the sink: {:?}", sink.text());
    }

    #[test]
    fn a_full_buffer_is_written_by_the_logging_thread() {
        let sink = Sink::default();
        let (writer, _flusher) = buffered(Box::new(sink.clone()), "test-log").unwrap();
        let line = vec![b'x'; MAX_PENDING];
        writer.make_writer().write_all(&line).unwrap();
        assert_eq!(sink.text().len(), MAX_PENDING, "written at once");
    }
}
