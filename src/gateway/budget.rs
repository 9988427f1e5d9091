//! Shared bounds on what many tasks hold at once: bytes of API 3.0 bodies
//! read before queueing, tasks waiting for a slot. A [`Share`] is taken
//! whole or not at all and given back when dropped, on every path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Clone)]
pub struct Budget {
    used: Arc<AtomicU64>,
}

/// A part of a [`Budget`], given back on drop.
pub struct Share {
    used: Arc<AtomicU64>,
    amount: u64,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.used.fetch_sub(self.amount, Ordering::AcqRel);
    }
}

impl Budget {
    /// Takes `amount` if the total stays within `limit`.
    pub fn take(&self, amount: u64, limit: u64) -> Option<Share> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(amount).filter(|t| *t <= limit)
            })
            .ok()
            .map(|_| Share {
                used: self.used.clone(),
                amount,
            })
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Adds `extra` to a share of this budget if the total stays within
    /// `limit`; `false` (and nothing taken) otherwise.
    pub fn grow(&self, share: &mut Share, extra: u64, limit: u64) -> bool {
        match self.take(extra, limit) {
            Some(more) => {
                share.amount += more.amount;
                std::mem::forget(more);
                true
            }
            None => false,
        }
    }
}

impl Share {
    pub fn amount(&self) -> u64 {
        self.amount
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_all_or_nothing_and_come_back_on_drop() {
        let b = Budget::default();
        let a = b.take(6, 10).unwrap();
        assert!(b.take(5, 10).is_none(), "over the limit: nothing taken");
        assert_eq!(b.used(), 6);
        let c = b.take(4, 10).unwrap();
        assert_eq!(b.used(), 10);
        drop(a);
        drop(c);
        assert_eq!(b.used(), 0);
        let mut s = b.take(2, 10).unwrap();
        assert!(b.grow(&mut s, 8, 10));
        assert!(!b.grow(&mut s, 1, 10));
        assert_eq!((s.amount(), b.used()), (10, 10));
        drop(s);
        assert_eq!(b.used(), 0);
        assert!(b.take(u64::MAX, u64::MAX).is_some());
    }
}
