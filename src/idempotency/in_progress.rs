//! The in-progress marker: while a task with a key is queued or running,
//! a second request with the same key is refused (`409
//! FailedOperation.IdempotentRequestInProgress`) instead of running twice.
//!
//! [`LocalMarkers`] is the single node's (and a replica's under the `local`
//! outage policy); cluster mode shares markers through Redis as leases
//! renewed by the replica's heartbeat (`cluster::RedisMarkers`), so a dead
//! replica's marker lapses with its other leases.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::IdempotencyKey;

/// Why a marker could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerTaken {
    /// Another request with this key is queued or running.
    Held,
    /// The shared markers cannot be reached (cluster mode, Redis down,
    /// policy `reject`).
    Unavailable,
}

/// A held marker: dropping it (the task ended, on any path) lets the next
/// request with the key in.
pub struct Marker {
    _held: Box<dyn Send + Sync>,
}

impl Marker {
    pub fn new(held: impl Send + Sync + 'static) -> Self {
        Self {
            _held: Box::new(held),
        }
    }
}

pub type TakeMarker<'a> = Pin<Box<dyn Future<Output = Result<Marker, MarkerTaken>> + Send + 'a>>;

pub trait InProgress: Send + Sync + 'static {
    /// Takes the marker of `key` in root account `account` for one task.
    fn take<'a>(&'a self, account: &'a str, key: &'a IdempotencyKey) -> TakeMarker<'a>;
}

/// Keyed by `<account>\0<key>` (account ids hold no NUL), one allocation
/// shared by the map and the marker: a queued job holds one for as long as
/// it waits.
type Map = DashMap<Arc<str>, ()>;

/// Markers in this process's memory.
#[derive(Default, Clone)]
pub struct LocalMarkers {
    map: Arc<Map>,
}

struct LocalMarker {
    map: Arc<Map>,
    key: Arc<str>,
}

impl Drop for LocalMarker {
    fn drop(&mut self) {
        self.map.remove(&self.key);
    }
}

impl LocalMarkers {
    pub fn take_now(&self, account: &str, key: &IdempotencyKey) -> Result<Marker, MarkerTaken> {
        let k: Arc<str> = Arc::from(format!("{account}\0{}", key.as_str()));
        match self.map.entry(k.clone()) {
            Entry::Occupied(_) => Err(MarkerTaken::Held),
            Entry::Vacant(v) => {
                v.insert(());
                Ok(Marker::new(LocalMarker {
                    map: self.map.clone(),
                    key: k,
                }))
            }
        }
    }

    /// Markers held now (tests, metrics).
    pub fn held(&self) -> usize {
        self.map.len()
    }
}

impl InProgress for LocalMarkers {
    fn take<'a>(&'a self, account: &'a str, key: &'a IdempotencyKey) -> TakeMarker<'a> {
        let taken = self.take_now(account, key);
        Box::pin(std::future::ready(taken))
    }
}
