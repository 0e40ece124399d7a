//! The hash maps of the hot path, looked up for every data point (series and run names to their
//! state): foldhash's quality hasher, seeded randomly per map like std's `RandomState`, so a
//! client cannot choose names that collide, at a fraction of SipHash's cost on short keys.

/// A `HashMap` hashed with [`foldhash::quality::RandomState`].
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::quality::RandomState>;
