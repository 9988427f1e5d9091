//! Answering the tasks that wait on a commit.
//!
//! A writer thread that answered each waiting task itself would wake the
//! task's runtime once per task: a lock on its queue each time, and a
//! system call whenever its thread sleeps (tokio unparks it with an
//! `eventfd` write). So a task on a data-plane worker sends, with
//! its write, its worker's inbox ([`Inbox::install`]); the writer puts a
//! whole group commit's answers into the inboxes and wakes each worker
//! once, and each worker hands them out on its own thread, where a wake
//! is a queue push. Tasks elsewhere (the admin runtime, tests) are
//! answered directly.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

use super::{Committed, StoreError};

type Answer = Result<Committed, StoreError>;

/// Where a write's result goes.
pub struct Ack {
    tx: oneshot::Sender<Answer>,
    inbox: Option<Arc<Inbox>>,
}

/// The answers waiting for one worker's thread.
pub struct Inbox {
    answers: Mutex<Vec<(oneshot::Sender<Answer>, Answer)>>,
    ready: Notify,
}

thread_local! {
    static INBOX: RefCell<Option<Arc<Inbox>>> = const { RefCell::new(None) };
}

impl Ack {
    /// An ack for a task running on this thread: through its inbox if this
    /// thread has one.
    pub fn new(tx: oneshot::Sender<Answer>) -> Self {
        Self {
            tx,
            inbox: INBOX.with_borrow(|i| i.clone()),
        }
    }

    /// Answers this write alone, now.
    pub fn send(self, answer: Answer) {
        let _ = self.tx.send(answer);
    }
}

/// Answers a batch: one wake per inbox, direct answers for the rest.
pub fn send_all(answers: impl IntoIterator<Item = (Ack, Answer)>) {
    let mut woken: Vec<Arc<Inbox>> = Vec::new();
    for (ack, answer) in answers {
        match ack.inbox {
            Some(inbox) => {
                inbox
                    .answers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((ack.tx, answer));
                if !woken.iter().any(|w| Arc::ptr_eq(w, &inbox)) {
                    woken.push(inbox);
                }
            }
            None => {
                let _ = ack.tx.send(answer);
            }
        }
    }
    for inbox in woken {
        // A permit is kept if the worker is not waiting yet: no answer is
        // left behind.
        inbox.ready.notify_one();
    }
}

impl Inbox {
    /// Gives this thread an inbox; the returned future hands out its
    /// answers and must run on this thread's runtime for as long as tasks
    /// commit from it.
    pub fn install() -> impl Future<Output = ()> {
        let inbox = Arc::new(Inbox {
            answers: Mutex::new(Vec::new()),
            ready: Notify::new(),
        });
        INBOX.with_borrow_mut(|i| *i = Some(inbox.clone()));
        async move {
            let mut taken = Vec::new();
            loop {
                inbox.ready.notified().await;
                std::mem::swap(
                    &mut taken,
                    &mut *inbox.answers.lock().unwrap_or_else(|e| e.into_inner()),
                );
                for (tx, answer) in taken.drain(..) {
                    let _ = tx.send(answer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Answer {
        Ok(Committed::Purged(1))
    }

    /// Answers for a worker's tasks, sent from another thread, all arrive
    /// (through the inbox); an ack made off a worker is answered directly.
    #[test]
    fn a_batch_reaches_tasks_through_their_inbox_and_others_directly() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::spawn(Inbox::install());
            let (acks, waits): (Vec<_>, Vec<_>) = (0..50)
                .map(|_| {
                    let (tx, rx) = oneshot::channel();
                    (Ack::new(tx), rx)
                })
                .unzip();
            assert!(acks.iter().all(|a| a.inbox.is_some()));
            let writer = std::thread::spawn(move || {
                let (tx, direct) = oneshot::channel();
                let off_worker = Ack::new(tx);
                assert!(off_worker.inbox.is_none());
                send_all(
                    acks.into_iter()
                        .map(|a| (a, ok()))
                        .chain([(off_worker, ok())]),
                );
                direct
            });
            for rx in waits {
                assert!(matches!(rx.await, Ok(Ok(Committed::Purged(1)))));
            }
            let direct = writer.join().unwrap();
            assert!(matches!(direct.await, Ok(Ok(_))));
        });
    }
}
