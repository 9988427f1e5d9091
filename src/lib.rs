//! tollgate: a concurrency-limiting task gateway for slow, expensive AI
//! backends.
//!
//! The crate follows the path of one task (see the README's architecture
//! section): `gateway` accepts and admits it, `limiter` holds the account to
//! its concurrency, `gateway::proxy` forwards it, and `usage` records a
//! durable event for every success through `store`. `admin` and `metrics`
//! are the operator's side; `simulator` is the backend double used by the
//! demo, the tests and the benches.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod api_error;
pub mod app;
pub mod auth;
pub mod billing;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod entitlements;
pub mod gateway;
pub mod head_check;
pub mod idempotency;
pub mod jobs;
pub mod limiter;
pub mod listen;
pub mod loadgen;
pub mod log_writer;
pub mod metrics;
pub mod simulator;
pub mod store;
pub mod usage;
