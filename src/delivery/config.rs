//! The keys every exporter has, whatever its backend ([`DeliveryConfig`]: cadence, queue,
//! retry, timeout, bad-input limits), and their validation into [`DeliverySettings`]. The
//! backend's own keys sit beside them in the same YAML mapping (see
//! [`crate::config::ExporterConfig`]) and change some defaults ([`BackendDefaults`]).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::DeliverySettings;
use crate::decode::{DecodeSettings, NonFinitePolicy, DEFAULT_MAX_RUNS, DEFAULT_MAX_SERIES_PER_RUN};
use crate::cadence::{Aggregation, CadenceSettings};
use crate::exporter::BackendDefaults;
use crate::jobs::JobSettings;
use crate::problems::{Problems, MAX_DURATION};
use crate::retry::RetryConfig;
use crate::spool::SpoolConfig;

/// The keys every exporter has. Unknown keys are refused by the enclosing
/// [`crate::config::ExporterConfig`] (flattened structs cannot refuse them themselves).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeliveryConfig {
    /// Window length in steps (see [`crate::cadence`]); default the backend's
    /// ([`BackendDefaults::every_steps`]) when `interval` is not set either.
    #[serde(default)]
    pub every_steps: Option<u64>,
    /// Write all open windows this often.
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// Wait for more points of a window's end step; default 2s.
    #[serde(default, with = "humantime_serde")]
    pub linger: Option<Duration>,
    /// Keep windows open at least this long for out-of-order arrivals; default 0s.
    #[serde(default, with = "humantime_serde")]
    pub reorder_window: Option<Duration>,
    /// Default aggregation; default `last`.
    #[serde(default)]
    pub aggregation: Option<Aggregation>,
    /// Aggregation per metric or series name.
    #[serde(default)]
    pub metrics: BTreeMap<String, Aggregation>,
    /// Series name prefix; default none.
    #[serde(default)]
    pub prefix: Option<String>,
    /// In process: the SDK PeriodicReader's interval; default 1s.
    #[serde(default, with = "humantime_serde")]
    pub reader_interval: Option<Duration>,
    /// Bound of one export call; default 10s.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Retry policy.
    #[serde(default)]
    pub retry_on_failure: RetryConfig,
    /// Queue sizes.
    #[serde(default)]
    pub sending_queue: QueueConfig,
    /// NaN/±Inf scalars: `keep` | `drop` | `clamp` (see [`crate::decode::NonFinitePolicy`]);
    /// default `keep`.
    #[serde(default)]
    pub nonfinite: Option<NonFinitePolicy>,
    /// Distinct series per run; points of further series are dropped as `series_limit`;
    /// default 10000.
    #[serde(default)]
    pub max_series_per_run: Option<usize>,
    /// Runs tracked over the exporter's life; points of further runs are dropped as
    /// `series_limit`; default 1000.
    #[serde(default)]
    pub max_runs: Option<usize>,
}

/// `sending_queue` (defaults in [`DeliverySettings`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Requests the queue holds; default 1000.
    #[serde(default)]
    pub queue_size: Option<usize>,
    /// MiB of requests (protobuf size) the queue holds, plus 256 bytes per held point
    /// ([`crate::delivery::HELD_POINT_BYTES`]); default 256. Past it the request is refused like
    /// a full queue (the service answers 503 / UNAVAILABLE so the sender retries).
    #[serde(default)]
    pub max_queued_mib: Option<u64>,
    /// Data points the exporter may hold in memory (queued, open windows, batches), checked
    /// before a request is taken (see [`crate::delivery`], "Admission"); default 100000. With a
    /// spool, batches past half of it move to disk.
    #[serde(default)]
    pub max_pending_points: Option<usize>,
    /// The on-disk part of the queue.
    #[serde(default)]
    pub spool: SpoolConfig,
}

/// Largest `sending_queue.queue_size` (requests): its slots are allocated at startup.
pub const MAX_QUEUE_SIZE: usize = 1_000_000;

/// Default of `reader_interval`.
pub const DEFAULT_READER_INTERVAL: Duration = Duration::from_secs(1);

/// What an exporter's backend keys decided that its delivery settings need.
#[derive(Debug, Clone)]
pub struct FromBackend {
    /// The backend's defaults.
    pub defaults: BackendDefaults,
    /// Where the exporter writes (spool segments name it; see [`crate::spool::SpoolSettings`]).
    pub destination: String,
    /// The job view of distributed jobs; `None`: each rank is a run of its own.
    pub jobs: Option<JobSettings>,
    /// Quiet time after which a run is ended; `None`: runs are never ended for being idle.
    pub idle_after: Option<Duration>,
}

impl DeliveryConfig {
    /// Validates these keys of the exporter `name` (at config path `path`) into settings,
    /// defaults filled in from [`DeliverySettings::default`] and `backend`; `decode` carries
    /// the pipeline's step and identity keys. Problems go to `p`.
    pub fn settings(
        &self,
        path: &str,
        name: &str,
        backend: FromBackend,
        decode: &DecodeSettings,
        p: &mut Problems,
    ) -> DeliverySettings {
        let c = self;
        if c.every_steps == Some(0) {
            p.add(format!("{path}.every_steps"), "must be at least 1");
        }
        for (key, d) in [
            ("interval", c.interval),
            ("linger", c.linger),
            ("reader_interval", c.reader_interval),
            ("timeout", c.timeout),
        ] {
            p.positive(path, key, d);
        }
        if c.reorder_window.is_some_and(|d| d > MAX_DURATION) {
            p.add(format!("{path}.reorder_window"), "must be at most 24h");
        }
        let retry = c
            .retry_on_failure
            .settings(&format!("{path}.retry_on_failure"), p);
        for (key, v) in [
            ("max_series_per_run", c.max_series_per_run),
            ("max_runs", c.max_runs),
        ] {
            if v == Some(0) {
                p.add(format!("{path}.{key}"), "must be at least 1");
            }
        }
        let q = &c.sending_queue;
        match q.queue_size {
            Some(0) => p.add(
                format!("{path}.sending_queue.queue_size"),
                "must be at least 1",
            ),
            // The queue's slots are allocated up front (48 bytes each).
            Some(n) if n > MAX_QUEUE_SIZE => p.add(
                format!("{path}.sending_queue.queue_size"),
                format!("must be at most {MAX_QUEUE_SIZE}"),
            ),
            _ => {}
        }
        if q.max_queued_mib == Some(0) {
            p.add(
                format!("{path}.sending_queue.max_queued_mib"),
                "must be at least 1",
            );
        }
        let spool = q.spool.settings(
            &format!("{path}.sending_queue.spool"),
            name,
            backend.destination,
            backend.defaults.spool,
            p,
        );
        let defaults = DeliverySettings::default();
        let every_steps = match (c.every_steps, c.interval) {
            (None, None) => Some(backend.defaults.every_steps),
            (e, _) => e,
        };
        let cadence = CadenceSettings {
            every_steps,
            interval: c.interval,
            linger: c.linger.unwrap_or(defaults.cadence.linger),
            reorder_window: c.reorder_window.unwrap_or_default(),
            aggregation: c.aggregation.unwrap_or_default(),
            per_metric: c
                .metrics
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect::<HashMap<_, _>>(),
            idle_after: backend.idle_after,
        };
        DeliverySettings {
            queue_size: q.queue_size.unwrap_or(defaults.queue_size),
            max_queued_bytes: q
                .max_queued_mib
                .map_or(defaults.max_queued_bytes, |m| m.saturating_mul(1 << 20)),
            max_pending_points: q.max_pending_points.unwrap_or(defaults.max_pending_points),
            timeout: c.timeout.unwrap_or(defaults.timeout),
            retry,
            cadence,
            decode: DecodeSettings {
                prefix: c.prefix.clone().filter(|s| !s.is_empty()),
                max_series_per_run: c.max_series_per_run.unwrap_or(DEFAULT_MAX_SERIES_PER_RUN),
                max_runs: c.max_runs.unwrap_or(DEFAULT_MAX_RUNS),
                nonfinite: c.nonfinite.unwrap_or_default(),
                clamp_limit: backend.defaults.clamp_limit,
                ..decode.clone()
            },
            spool,
            jobs: backend.jobs,
        }
    }

    /// `reader_interval`, default filled in.
    pub fn reader_interval(&self) -> Duration {
        self.reader_interval.unwrap_or(DEFAULT_READER_INTERVAL)
    }
}
