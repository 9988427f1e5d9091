//! The time rules of jobs, over a manual clock.

use std::time::Duration;

use jiff::SignedDuration;

use super::*;
use crate::clock::{Clock, ManualClock};

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

#[test]
fn a_queued_job_may_wait_max_wait_and_not_a_millisecond_more() {
    let clock = ManualClock::new(at("2026-12-03T10:00:00Z"));
    let created = clock.now();
    let max_wait = Duration::from_secs(24 * 3600);
    assert_eq!(wait_left(created, max_wait, clock.now()), max_wait);
    clock.advance(SignedDuration::try_from(Duration::from_secs(23 * 3600)).unwrap());
    assert_eq!(
        wait_left(created, max_wait, clock.now()),
        Duration::from_secs(3600)
    );
    clock.advance(
        SignedDuration::try_from(Duration::from_secs(3600) - Duration::from_millis(1)).unwrap(),
    );
    assert_eq!(
        wait_left(created, max_wait, clock.now()),
        Duration::from_millis(1)
    );
    clock.advance(SignedDuration::try_from(Duration::from_millis(1)).unwrap());
    assert_eq!(wait_left(created, max_wait, clock.now()), Duration::ZERO);
    // Long past (a restart after days): still zero, never negative.
    clock.advance(SignedDuration::try_from(Duration::from_secs(7 * 86_400)).unwrap());
    assert_eq!(wait_left(created, max_wait, clock.now()), Duration::ZERO);
    assert_eq!(deadline(created, max_wait), at("2026-12-04T10:00:00Z"));
}

#[test]
fn finished_jobs_are_purged_once_their_result_ttl_is_over() {
    let clock = ManualClock::new(at("2026-12-03T10:00:00Z"));
    let finished = clock.now();
    let ttl = Duration::from_secs(24 * 3600);
    // Purged when finished_at <= the cut-off.
    assert!(finished > purge_before(clock.now(), ttl));
    clock.advance(SignedDuration::try_from(ttl - Duration::from_millis(1)).unwrap());
    assert!(
        finished > purge_before(clock.now(), ttl),
        "kept until the ttl is over"
    );
    clock.advance(SignedDuration::try_from(Duration::from_millis(1)).unwrap());
    assert!(
        finished <= purge_before(clock.now(), ttl),
        "purged at the ttl"
    );
}

#[test]
fn statuses_round_trip_and_only_queued_is_cancellable() {
    for s in JobStatus::ALL {
        assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        assert_eq!(s.cancellable(), s == JobStatus::Queued);
        assert_eq!(
            s.is_final(),
            !matches!(s, JobStatus::Queued | JobStatus::Running)
        );
    }
    assert_eq!(JobStatus::parse("done"), None);
}

#[test]
fn job_ids_are_recognised_and_sort_in_submission_order() {
    let a = new_job_id();
    let b = new_job_id();
    assert!(looks_like_job_id(&a), "{a}");
    assert!(a < b, "UUIDv7 ids sort by time: {a} {b}");
    for bad in [
        "",
        "job_",
        "job_xyz",
        "task_0123456789abcdef0123456789abcdef",
        "job_0123456789abcdef0123456789abcdeg",
    ] {
        assert!(!looks_like_job_id(bad), "{bad}");
    }
}
