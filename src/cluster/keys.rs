//! Redis key and channel names: one place decides the layout.
//!
//! Every key of one account carries the account in braces
//! (`{prefix}:{<account>}:…`), a Redis Cluster hash tag, so each script only
//! touches keys of one slot.

/// The pool of one root account: the order is the one `lua/pool.lua` reads.
pub(crate) fn pool(prefix: &str, account: &str) -> [String; 13] {
    const PARTS: [&str; 13] = [
        "holders", "hsub", "subn", "queue", "qlive", "qsub", "qcap", "owner", "seq", "limit",
        "ver", "ewma", "limsrc",
    ];
    PARTS.map(|p| format!("{prefix}:{{{account}}}:{p}"))
}

/// The quota reservations of one root account, as `lua/quota.lua` reads
/// them.
pub(crate) fn quota(prefix: &str, account: &str) -> [String; 3] {
    ["taken", "resv", "resvpkg"].map(|p| format!("{prefix}:{{{account}}}:q:{p}"))
}

/// The in-progress marker of one idempotency key (its SHA-256, so any
/// key makes a short, safe Redis key).
pub(crate) fn marker(prefix: &str, account: &str, key: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(key.as_bytes());
    format!("{prefix}:{{{account}}}:idem:{}", hex::encode(&h[..16]))
}

/// `limits.default_concurrency` as the whole cluster applies it: one
/// value, so two replicas never enforce different limits for an account.
pub(crate) fn default_concurrency(prefix: &str) -> String {
    format!("{prefix}:default_concurrency")
}

/// The replica registry.
pub(crate) fn instances(prefix: &str) -> String {
    format!("{prefix}:instances")
}

/// Grants and refusals are published on `<this><instance>`.
pub(crate) fn grant_channel_prefix(prefix: &str) -> String {
    format!("{prefix}:grants:")
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_of_one_account_share_a_hash_tag() {
        for k in super::pool("tg", "acme")
            .iter()
            .chain(&super::quota("tg", "acme"))
            .chain(&[super::marker("tg", "acme", "{other}:key")])
        {
            assert!(k.starts_with("tg:{acme}:"), "{k}");
        }
    }
}
