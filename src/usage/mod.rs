//! Usage events: the durable record of each successful task (CloudEvents 1.0),
//! the recorder the data plane calls before releasing a success, and the JSON
//! Lines export under `<data_dir>/usage/`, and the NATS JetStream publisher
//! (`stream`).
//!
//! The events' durable home is the store (group commits, fsync); the JSON
//! Lines files are an export that tails the store's event feed and is
//! repaired from it after a crash.

mod event;
pub mod export;
pub mod jsonl;
mod recorder;
pub mod stream;

pub use event::{EventHead, EventIdempotency, UsageData, UsageEvent};
pub use recorder::{Recorded, UsageRecorder};
