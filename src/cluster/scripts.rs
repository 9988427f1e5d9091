//! The Lua scripts, each one atomic round trip. Pool and quota scripts
//! get their shared functions prepended at build time.

use std::sync::LazyLock;

use redis::Script;

macro_rules! pool_script {
    ($file:literal) => {
        LazyLock::new(|| Script::new(concat!(include_str!("lua/pool.lua"), include_str!($file))))
    };
}

macro_rules! quota_script {
    ($file:literal) => {
        LazyLock::new(|| Script::new(concat!(include_str!("lua/quota.lua"), include_str!($file))))
    };
}

pub(crate) static ACQUIRE: LazyLock<Script> = pool_script!("lua/acquire.lua");
pub(crate) static LEAVE: LazyLock<Script> = pool_script!("lua/leave.lua");
pub(crate) static SET_LIMIT: LazyLock<Script> = pool_script!("lua/set_limit.lua");
pub(crate) static REFUSE: LazyLock<Script> = pool_script!("lua/refuse.lua");
pub(crate) static POOL_BEAT: LazyLock<Script> = pool_script!("lua/pool_beat.lua");
pub(crate) static POOL_STATS: LazyLock<Script> = pool_script!("lua/pool_stats.lua");
pub(crate) static INSTANCES: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/instances.lua")));
pub(crate) static RESERVE: LazyLock<Script> = quota_script!("lua/reserve.lua");
pub(crate) static SETTLE: LazyLock<Script> = quota_script!("lua/settle.lua");
pub(crate) static QUOTA_BEAT: LazyLock<Script> = quota_script!("lua/quota_beat.lua");
pub(crate) static DEFAULT_CONCURRENCY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/default_concurrency.lua")));
pub(crate) static MARKER_TAKE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/marker_take.lua")));
pub(crate) static MARKER_BEAT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/marker_beat.lua")));
pub(crate) static MARKER_RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/marker_release.lua")));
