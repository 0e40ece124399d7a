//! Cadence and aggregation: when an exporter writes, and what one written point stands for.
//!
//! An exporter's cadence is `every_steps: N` and/or `interval: T`.
//! - With `every_steps: N`, the points of a series fall into windows that end at each multiple of
//!   N (`(0, N]`, `(N, 2N]`, …: step 1..=100 → window 100; step 0 → window 0). A window is written
//!   when a point of the same run arrives with a later step than the window's end, or when its end
//!   step has arrived and nothing newer came for `linger` (default 2 s), and is stamped with its
//!   end step.
//! - With `interval: T`, every T all open windows are written. A window closed this way before its
//!   end step was reached (or the single open window when there is no `every_steps`) is stamped
//!   with the largest step it holds.
//! - Shutdown writes every open window the same way.
//!
//! Each written point aggregates the window's data points with the exporter's aggregation (or the
//! one named for its metric or series): `last` (the point with the largest step; ties: the later
//! arrival), `mean`, `min`, `max`, `sum`. `mean` and `sum` propagate NaN; `min` and `max` ignore
//! NaN unless every value is NaN. Histogram data points aggregate exactly: their buckets are
//! summed (for TensorBoard) and their scalar is `mean = Σsum / Σcount`, `sum = Σsum`, `min`/`max`
//! from the points' min/max, `last` = the last point's `sum / count`.
//!
//! With `reorder_window: T`, a window is not written before T has passed since its first point
//! arrived, so points of a series that arrive out of step order within T are written in order.
//! A series' windows are written in step order: one still inside its reorder window holds back
//! every later window of that series.
//!
//! No release is larger than [`MAX_BATCH_POINTS`]: a run's ready points (a 5 s hold can release
//! hundreds of thousands at once) are cut into batches of at most that many, in (step, series)
//! order; `resumed_at` is on the first of them, `idle` on the last.
//!
//! A data point at or below the step last written for its series is `late`: counted, not
//! written, because TensorBoard discards points newer than a step that goes back.
//!
//! # Duplicates
//! A data point's identity within its series is (step, time, value): a collector that re-sends
//! a request whose answer it lost re-sends exactly that. A point identical to one its open
//! window (reorder window included) already took is not aggregated again and is counted
//! `duplicate`, so `mean` and `sum` of an MLflow window stay those of the points recorded once.
//! A repeated point whose window was already written is `late` like any point at a written step
//! (for a delta point the two cannot be told apart without keeping every written point).
//!
//! A gauge's point without a record time ([`Point::collected`]) is stamped with the collection
//! time, and an SDK with cumulative temporality re-sends a synchronous gauge's last value at
//! every collection (the OTel Python SDK does): its identity is (step, value), so a re-send is
//! `duplicate` in an open window and, like a cumulative point, at the last
//! [`WRITTEN_CUMULATIVE_STEPS`] written steps. The same value set twice at one step is one
//! point, as a gauge's last value is.
//!
//! # Cumulative points
//! A point of cumulative temporality with a step ([`Point::cumulative`]) is the producer's total
//! for that series and step so far, re-sent at every collection. Its identity is (step, start
//! time, value). In an open window the latest total of each step replaces the earlier one (the
//! replaced point counts as an input of the written point: its data is in the newer total), and
//! the window aggregates one value per step, like delta points. A re-send of the total already
//! taken or written for that step (the last [`WRITTEN_CUMULATIVE_STEPS`] written steps per
//! series) is `duplicate`; a changed total for a step already written is `late`. A cumulative
//! point of the same start time as its series' points so far is never a resume (only a new
//! start time, a restarted producer, can be).
//!
//! # Resume
//! A trainer restarted from a checkpoint records steps again that its run already passed. It is
//! told apart from late data by the record time ([`crate::decode::Point::time_unix_nano`]): a
//! point whose step is below the largest step its series has seen **and** whose time is newer
//! than every point seen for that series starts a new session of the run at that step `S` (a
//! collector's retried or reordered batch is old in time; a restarted trainer is new in time).
//! The check is made per request and series before its points are taken: the resume step is the
//! smallest step of the series' points newer than all it has seen (they may come in any order
//! within a request). A point at the same step as the series' largest is not a resume (a metric
//! recorded twice at one step), so a trainer resumed at exactly its last step has that one step
//! counted `late`. Nor is a request that repeats the series' point at its largest step with the
//! same value: a producer with cumulative temporality re-sends every step it ever recorded, newer
//! in time, at each collection. (A restarted trainer whose new value at that step equals the old
//! one, a deterministic metric, is then not seen as resumed by that series; its other series
//! decide.)
//! On a resume at `S`:
//! - every open window of the run holding a point at step `S` or above is dropped and its points
//!   counted `superseded` (a window holding points on both sides of `S`, possible only when `S`
//!   is inside a window of `every_steps > 1` that never closed, is dropped whole: an aggregate
//!   cannot be split);
//! - the run's series accept steps from `S` on again;
//! - later points of the run at step `S` or above that are older than the resuming point (the
//!   old session's, retried by a collector) are counted `superseded`;
//! - the run's next [`Batch`] carries `resumed_at: Some(S)`, so exporters start a new
//!   session (TensorBoard: a new event file beginning with `SessionLog START` at `S`).
//!
//! # Run end
//! A run end ([`RunEnd`], from the trainer's `trainmetrics.run.end` gauge, see
//! [`crate::decode`]) is held for the cadence's `reorder_window` after it arrives, so points a
//! collector's other consumers still had in flight are taken; then every open window of the
//! process is written (stamped as on shutdown: the partial window at its largest step) and the
//! last batch carries [`Batch::ended`] (an empty batch when nothing was open). The same end
//! arriving again (a retry, or a cumulative SDK re-sending its gauge) with no point taken in
//! between ends nothing more. Windows are keyed by [`RunInfo::process_key`]: each rank of a job
//! has its own steps, windows, resumes and end.
//!
//! # Idle runs
//! With `idle_after: T`, a run that received no data point for `T` has every open window
//! written (stamped as on shutdown) in one batch flagged `idle` (also when it is empty), once
//! per quiet period: the exporter may end the run (see `end_idle_runs` of the MLflow exporter).
//! A point arriving afterwards makes the run active again.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::fastmap::FastMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use crate::decode::{EndStatus, RunEnd};
use crate::decode::{Histogram, Point, PointValue, RunInfo, RunPoints};

/// Most points in one [`Batch`] (see the module docs): one release of held points is cut
/// into batches of at most this many, so no single export call, spool record or allocation
/// grows with the length of a hold. 10 000 points are about 2.5 MB in memory and one MLflow
/// exporter call of 10 `log-batch` requests.
pub const MAX_BATCH_POINTS: usize = 10_000;

/// How a window's data points become one point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    /// The value at the largest step (default).
    #[default]
    Last,
    /// Arithmetic mean.
    Mean,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// Sum.
    Sum,
}

/// Validated cadence of one exporter.
#[derive(Debug, Clone)]
pub struct CadenceSettings {
    /// Window length in steps; `None` = time-only windows.
    pub every_steps: Option<u64>,
    /// Time after which all open windows are written.
    pub interval: Option<Duration>,
    /// How long a window whose end step has arrived waits for more points of that step.
    pub linger: Duration,
    /// How long a window stays open after its first point arrived, at least: points of a
    /// series may arrive out of step order within this time (a collector's parallel queue
    /// consumers) and are still written in order. Default 0 (in process, order is kept).
    pub reorder_window: Duration,
    /// Default aggregation.
    pub aggregation: Aggregation,
    /// Aggregation per metric name or series name (series name wins).
    pub per_metric: HashMap<String, Aggregation>,
    /// A run without data points for this long gets an `idle` batch (see the module docs);
    /// `None` (default) never.
    pub idle_after: Option<Duration>,
}

impl Default for CadenceSettings {
    fn default() -> Self {
        Self {
            every_steps: Some(1),
            interval: None,
            linger: Duration::from_secs(2),
            reorder_window: Duration::ZERO,
            aggregation: Aggregation::Last,
            per_metric: HashMap::new(),
            idle_after: None,
        }
    }
}

impl CadenceSettings {
    fn aggregation_for(&self, metric: &str, series: &str) -> Aggregation {
        self.per_metric
            .get(series)
            .or_else(|| self.per_metric.get(metric))
            .copied()
            .unwrap_or(self.aggregation)
    }

    /// The window end for `step` (the key windows are stored under).
    fn window_end(&self, step: i64) -> i64 {
        match self.every_steps {
            Some(n) => {
                let n = i64::try_from(n).unwrap_or(i64::MAX).max(1);
                let r = step.rem_euclid(n);
                if r == 0 {
                    step
                } else {
                    step.saturating_add(n - r)
                }
            }
            None => i64::MAX,
        }
    }
}

/// One written point: the aggregate of a window.
#[derive(Debug, Clone, PartialEq)]
pub struct OutPoint {
    /// Series name (TensorBoard tag; MLflow key before mapping), shared with the decoder's.
    pub series: Arc<str>,
    /// The step it is stamped with.
    pub step: i64,
    /// ns since the Unix epoch: the latest data point time in the window.
    pub time_unix_nano: u64,
    /// The aggregated scalar (for histograms, per the module docs).
    pub scalar: f64,
    /// The merged histogram, when the window held histograms.
    pub histogram: Option<Box<Histogram>>,
    /// How many input data points this point stands for.
    pub inputs: u64,
}

/// The points of one run ready for an exporter, sorted by (step, series).
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The run.
    pub run: Arc<RunInfo>,
    /// Its points.
    pub points: Vec<OutPoint>,
    /// The run resumed from this step since its previous batch: its points at this step or
    /// above from an earlier session are superseded (see the module docs' "Resume").
    pub resumed_at: Option<i64>,
    /// The run has been quiet for the cadence's `idle_after`: these are its last open windows
    /// (see the module docs' "Idle runs").
    pub idle: bool,
    /// The run (this process of it) ended after these points: the exporter ends it so (MLflow:
    /// status and end time; TensorBoard: the event file is synced and closed). Set by the
    /// cadence on the last batch of a run whose end gauge arrived (see the module docs' "Run
    /// end"), and on the end record the delivery writes into the spool at shutdown after a
    /// run's last spooled batch (see [`crate::spool`]), so whoever replays it ends the run as
    /// the process would have.
    pub ended: Option<RunEnd>,
}

impl Batch {
    /// Input data points this batch stands for.
    pub fn inputs(&self) -> u64 {
        self.points.iter().map(|p| p.inputs).sum()
    }
}

/// One open window's aggregate. Kept small (one per held point at every-step cadence): it
/// keeps only its own aggregation's running value, and what only cumulative points or
/// histograms need is boxed in [`AccMore`].
#[derive(Debug, Clone)]
struct Acc {
    /// The running value of `agg`: the sum (mean, sum), the smallest (min), the largest (max)
    /// or the value at `last_step` (last).
    value: f64,
    /// Measurements taken (a histogram's count): the mean's divisor.
    n: u64,
    last_step: i64,
    max_step: i64,
    time: u64,
    inputs: u64,
    opened: Instant,
    /// [`identity`] of every delta point taken (see "Duplicates" in the module docs).
    seen: Seen,
    more: Option<Box<AccMore>>,
    agg: Aggregation,
}

/// The parts of a window that only cumulative points and histograms use.
#[derive(Debug, Clone, Default)]
struct AccMore {
    /// Cumulative points by step: (time, identity, value). A later one for the same step
    /// replaces the earlier; they are folded into the aggregate when the window is written.
    cumulative: BTreeMap<i64, (u64, u64, PointValue)>,
    /// The merged histogram, when the window holds histograms.
    hist: Option<Box<Histogram>>,
}

impl Acc {
    fn new(agg: Aggregation, opened: Instant) -> Self {
        Self {
            value: match agg {
                Aggregation::Mean | Aggregation::Sum => 0.0,
                Aggregation::Last | Aggregation::Min | Aggregation::Max => f64::NAN,
            },
            n: 0,
            last_step: i64::MIN,
            max_step: i64::MIN,
            time: 0,
            inputs: 0,
            opened,
            seen: Seen::None,
            more: None,
            agg,
        }
    }

    fn more(&mut self) -> &mut AccMore {
        self.more.get_or_insert_with(Box::default)
    }

    /// Takes one data point of the window's series; `id` is its [`identity`].
    fn take(&mut self, p: &Point, id: u64) -> Taken {
        if p.cumulative.is_none() {
            if !self.seen.insert(p.step, id, p.collected, self.last_step) {
                return Taken::Duplicate;
            }
            self.inputs += 1;
            self.add(p.step, p.time_unix_nano, &p.value);
            return Taken::Added;
        }
        let (time, step) = (p.time_unix_nano, p.step);
        match self.more().cumulative.entry(step) {
            std::collections::btree_map::Entry::Occupied(e) if e.get().1 == id => return Taken::Duplicate,
            // The newer total stands for the older one too: both are inputs of the point.
            std::collections::btree_map::Entry::Occupied(mut e) => {
                if time >= e.get().0 {
                    *e.get_mut() = (time, id, p.value.clone());
                }
            }
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert((time, id, p.value.clone()));
                self.max_step = self.max_step.max(step);
            }
        }
        self.inputs += 1;
        self.time = self.time.max(time);
        Taken::Added
    }

    /// (step, identity) of each cumulative point and each gauge point stamped with its
    /// collection time: remembered once written (a cumulative SDK re-sends them).
    fn resendable(&self) -> impl Iterator<Item = (i64, u64)> + '_ {
        let cumulative = self.more.iter().flat_map(|m| m.cumulative.iter().map(|(step, (_, id, _))| (*step, *id)));
        // Before the cumulative points are folded in, `last_step` is the step of the delta points'
        // newest, so of the one point of a window that took one.
        cumulative.chain(self.seen.collected(self.last_step))
    }

    /// Folds the latest cumulative value of each step into the aggregate (before it is read).
    fn fold_cumulative(&mut self) {
        let Some(more) = self.more.as_mut() else { return };
        for (step, (time, _, value)) in std::mem::take(&mut more.cumulative) {
            self.add(step, time, &value);
        }
    }

    fn add(&mut self, step: i64, time: u64, value: &PointValue) {
        self.time = self.time.max(time);
        self.max_step = self.max_step.max(step);
        let (contrib_n, contrib_sum, lo, hi, last) = match value {
            PointValue::Scalar(v) => (1, *v, *v, *v, *v),
            PointValue::Histogram(h) => {
                merge_histogram(&mut self.more().hist, h);
                (h.count, h.sum, h.min.unwrap_or(f64::NAN), h.max.unwrap_or(f64::NAN), h.mean())
            }
        };
        self.n = self.n.saturating_add(contrib_n);
        let newest = step >= self.last_step;
        match self.agg {
            Aggregation::Mean | Aggregation::Sum => self.value += contrib_sum,
            // f64::min/max return the non-NaN operand, which is the documented NaN rule.
            Aggregation::Min => self.value = self.value.min(lo),
            Aggregation::Max => self.value = self.value.max(hi),
            Aggregation::Last if newest => self.value = last,
            Aggregation::Last => {}
        }
        if newest {
            self.last_step = step;
        }
    }

    fn scalar(&self) -> f64 {
        match self.agg {
            Aggregation::Last | Aggregation::Sum | Aggregation::Min | Aggregation::Max => self.value,
            Aggregation::Mean => {
                if self.n == 0 {
                    f64::NAN
                } else {
                    self.value / self.n as f64
                }
            }
        }
    }
}

/// Merges histogram `h` into a window's histogram `acc`.
fn merge_histogram(acc: &mut Option<Box<Histogram>>, h: &Histogram) {
    match acc {
        Some(acc) if acc.bounds == h.bounds => {
            for (a, b) in acc.counts.iter_mut().zip(&h.counts) {
                *a = a.saturating_add(*b);
            }
            acc.count = acc.count.saturating_add(h.count);
            acc.sum += h.sum;
            acc.min = match (acc.min, h.min) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            acc.max = match (acc.max, h.max) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
        // Bounds changed inside a window (a producer reconfigured its buckets): the buckets
        // cannot be merged, so the latest layout is kept; the scalar stays exact.
        _ => *acc = Some(Box::new(h.clone())),
    }
}

/// Identities taken by a window, and which of them are gauge points stamped with their
/// collection time (with their steps). Most windows (every step) take one point, so one needs
/// no allocation; its step is the window's [`Acc::last_step`].
#[derive(Debug, Clone)]
enum Seen {
    None,
    One { id: u64, collected: bool },
    Many(Box<ManySeen>),
}

#[derive(Debug, Clone, Default)]
struct ManySeen {
    ids: HashSet<u64>,
    collected: Vec<(i64, u64)>,
}

impl Seen {
    /// Adds `id` (of a point at `step`; `one_step` is the step of the one point taken so far,
    /// if one); false if it was there.
    fn insert(&mut self, step: i64, id: u64, collected: bool, one_step: i64) -> bool {
        match self {
            Seen::None => *self = Seen::One { id, collected },
            Seen::One { id: x, .. } if *x == id => return false,
            Seen::One { id: x, collected: c } => {
                let mut many = ManySeen { ids: HashSet::from([*x, id]), collected: Vec::new() };
                many.collected.extend(c.then_some((one_step, *x)));
                many.collected.extend(collected.then_some((step, id)));
                *self = Seen::Many(Box::new(many));
            }
            Seen::Many(m) => {
                if !m.ids.insert(id) {
                    return false;
                }
                if collected {
                    m.collected.push((step, id));
                }
            }
        }
        true
    }

    /// (step, identity) of the gauge points stamped with their collection time (`one_step`:
    /// the step of the one point taken, if one).
    fn collected(&self, one_step: i64) -> impl Iterator<Item = (i64, u64)> + '_ {
        let (one, many) = match self {
            Seen::One { id, collected: true } => (Some((one_step, *id)), None),
            Seen::Many(m) => (None, Some(m.collected.iter().copied())),
            _ => (None, None),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// What [`Acc::take`] did with a data point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    Added,
    Duplicate,
}

/// Most written cumulative steps a series remembers (to tell an unchanged re-send, a
/// `duplicate`, from a changed total, `late`). A producer with cumulative temporality and a
/// step attribute re-sends every step at each collection until its SDK's cardinality limit
/// (2000 attribute sets by default), so this covers it with room to spare.
pub const WRITTEN_CUMULATIVE_STEPS: usize = 4096;

/// The identity of a data point within its series (see "Duplicates" in the module docs):
/// step, time and value; for a cumulative point, step, start time and value (its time changes
/// at every collection). A 64-bit hash (`ids`: the exporter's own randomly seeded foldhash, so
/// a client cannot aim collisions): two distinct points of one window collide with probability
/// about 2^-64.
fn identity(ids: &foldhash::quality::RandomState, p: &Point) -> u64 {
    let mut h = ids.build_hasher();
    p.step.hash(&mut h);
    match p.cumulative {
        Some(start) => (1u8, start).hash(&mut h),
        // A gauge stamped with the collection time is re-sent with a new one.
        None if p.collected => 2u8.hash(&mut h),
        None => (0u8, p.time_unix_nano).hash(&mut h),
    }
    match &p.value {
        PointValue::Scalar(v) => v.to_bits().hash(&mut h),
        PointValue::Histogram(x) => {
            (x.count, x.sum.to_bits(), x.min.map(f64::to_bits), x.max.map(f64::to_bits)).hash(&mut h);
            x.bounds.iter().for_each(|b| b.to_bits().hash(&mut h));
            x.counts.hash(&mut h);
        }
    }
    h.finish()
}

/// A series' open windows by end step, in order. Points come almost always in step order, so a
/// new window goes at the back and the oldest leaves from the front, both without moving the
/// others (a `BTreeMap` shifted every remaining accumulator of its node on each removal).
#[derive(Debug, Default)]
struct OpenWindows(std::collections::VecDeque<(i64, Acc)>);

impl OpenWindows {
    fn first_key_value(&self) -> Option<(&i64, &Acc)> {
        self.0.front().map(|(k, a)| (k, a))
    }

    fn pop_first(&mut self) -> Option<(i64, Acc)> {
        self.0.pop_front()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// Frees the queue's buffer once every window is written: a series between windows then
    /// holds no accumulator space (a queue keeps its largest size otherwise, and most series
    /// of a service are between windows most of the time).
    fn release_if_empty(&mut self) {
        if self.0.is_empty() {
            self.0 = std::collections::VecDeque::new();
        }
    }

    fn values(&self) -> impl Iterator<Item = &Acc> {
        self.0.iter().map(|(_, a)| a)
    }

    fn retain(&mut self, mut keep: impl FnMut(&i64, &mut Acc) -> bool) {
        self.0.retain_mut(|(k, a)| keep(k, a));
    }

    /// The window ending at `end`, opened with `open` if there is none.
    fn get_or_open(&mut self, end: i64, open: impl FnOnce() -> Acc) -> &mut Acc {
        let at = match self.0.back() {
            Some((last, _)) if *last < end => self.0.len(),
            None => 0,
            Some(_) => match self.0.binary_search_by_key(&end, |(k, _)| *k) {
                Ok(i) => return &mut self.0[i].1,
                Err(i) => i,
            },
        };
        // Doubling up to 1024 windows, then a quarter more at a time: a long hold (a reorder
        // window, a cadence of many steps) keeps little unused room per held point.
        if self.0.len() == self.0.capacity() {
            let more = if self.0.len() < 1024 { self.0.len().max(4) } else { self.0.len() / 4 };
            self.0.reserve_exact(more);
        }
        self.0.insert(at, (end, open()));
        &mut self.0[at].1
    }
}

/// The identity written per step for the last [`WRITTEN_CUMULATIVE_STEPS`] steps, in step order.
/// Steps are written in nearly ascending order (windows close in order; only the steps of one
/// window may come unordered), so a sorted queue inserts at or near its back and drops its
/// front, where a B-tree allocated and moved nodes for every written point.
#[derive(Debug, Default)]
struct WrittenSteps(std::collections::VecDeque<(i64, u64)>);

impl WrittenSteps {
    fn position(&self, step: i64) -> Result<usize, usize> {
        match self.0.back() {
            Some((last, _)) if *last < step => Err(self.0.len()),
            None => Err(0),
            Some(_) => self.0.binary_search_by_key(&step, |(s, _)| *s),
        }
    }

    fn get(&self, step: i64) -> Option<u64> {
        self.position(step).ok().map(|i| self.0[i].1)
    }

    /// Sets `step`'s identity, then forgets the oldest steps past the bound.
    fn insert(&mut self, step: i64, id: u64) {
        match self.position(step) {
            Ok(i) => self.0[i].1 = id,
            Err(i) => {
                // Most series of a service write few steps of this kind: the first takes room
                // for one (a queue's first growth takes room for four).
                if self.0.capacity() == 0 {
                    self.0.reserve_exact(1);
                }
                self.0.insert(i, (step, id))
            }
        }
        while self.0.len() > WRITTEN_CUMULATIVE_STEPS {
            self.0.pop_front();
        }
    }
}

#[derive(Debug)]
struct SeriesState {
    windows: OpenWindows,
    /// Identity of the cumulative value written per step (the last [`WRITTEN_CUMULATIVE_STEPS`]).
    written_cumulative: WrittenSteps,
    /// Largest start time of the series' cumulative points: an older or equal one is a re-send
    /// of the same producer session, never a resume.
    max_start: u64,
    written_upto: Option<i64>,
    max_step: i64,
    /// Newest data point time seen (ns): what tells a resumed trainer from late data.
    max_time: u64,
    /// [`fingerprint`] of the value last accepted at `max_step`.
    max_fingerprint: u64,
    last_arrival: Instant,
}

impl SeriesState {
    fn new(now: Instant) -> Self {
        SeriesState {
            windows: OpenWindows::default(),
            written_cumulative: WrittenSteps::default(),
            max_start: 0,
            written_upto: None,
            max_step: i64::MIN,
            max_time: 0,
            max_fingerprint: 0,
            last_arrival: now,
        }
    }
}

#[derive(Debug)]
struct RunState {
    run: Arc<RunInfo>,
    max_step: i64,
    series: FastMap<Arc<str>, SeriesState>,
    /// The latest resume: (step S, time of the resuming point). Older points at S or above
    /// belong to the session it replaced.
    resumed: Option<(i64, u64)>,
    /// A resume not yet announced in an [`Batch`].
    announce_resume: Option<i64>,
    last_arrival: Instant,
    /// An idle batch was emitted and no point arrived since.
    idle_reported: bool,
    /// An end that arrived, and when it may be written (after the reorder window).
    ending: Option<(RunEnd, Instant)>,
    /// The run's end was written and no point was taken since: the same end again is a repeat.
    ended: bool,
}

impl RunState {
    fn new(run: Arc<RunInfo>, now: Instant) -> Self {
        RunState {
            run,
            max_step: i64::MIN,
            series: FastMap::default(),
            resumed: None,
            announce_resume: None,
            last_arrival: now,
            idle_reported: false,
            ending: None,
            ended: false,
        }
    }

    /// Starts a new session at `step` (see the module docs' "Resume"); returns the data points
    /// of open windows it superseded.
    fn resume(&mut self, step: i64, time: u64) -> u64 {
        let mut superseded = 0;
        let below = step.saturating_sub(1);
        for s in self.series.values_mut() {
            s.windows.retain(|_, acc| {
                let keep = acc.max_step < step;
                if !keep {
                    superseded += acc.inputs;
                }
                keep
            });
            s.written_upto = s.written_upto.map(|w| w.min(below));
            s.max_step = s.windows.values().map(|a| a.max_step).max().unwrap_or(i64::MIN).max(s.max_step.min(below));
        }
        self.max_step = self.series.values().map(|s| s.max_step).max().unwrap_or(i64::MIN);
        self.resumed = Some((step, time));
        self.announce_resume = Some(self.announce_resume.map_or(step, |a| a.min(step)));
        superseded
    }
}

/// The bits of a value, to recognise a point sent again (a cumulative re-send).
fn fingerprint(v: &PointValue) -> u64 {
    match v {
        PointValue::Scalar(x) => x.to_bits(),
        PointValue::Histogram(h) => h.sum.to_bits() ^ h.count.rotate_left(32),
    }
}

/// The step a request resumes its run from, if it does (see the module docs' "Resume"): the
/// smallest step, over the series whose points in the request are newer than every point seen
/// for them, of those newer points, when it is below the series' largest step and the request
/// does not repeat the series' point at its largest step unchanged.
fn resume_step(state: &RunState, points: &[Point]) -> Option<i64> {
    // Per series: (smallest step of the newer points, whether the largest-step point repeats).
    // A series' points come one after another: each stretch is looked up once.
    let mut per: FastMap<&str, (i64, bool)> = FastMap::default();
    let mut i = 0;
    while i < points.len() {
        let name = &points[i].series;
        let stretch = points[i..].iter().take_while(|p| Arc::ptr_eq(&p.series, name)).count();
        let (mine, next) = (&points[i..i + stretch], i + stretch);
        i = next;
        let Some(s) = state.series.get(&**name) else { continue };
        let e = per.entry(&**name).or_insert((i64::MAX, false));
        for p in mine {
            // A cumulative producer re-sends old steps, newer in time, at every collection; only
            // a new start time (a restarted producer) can mean a resume.
            let resend = p.cumulative.is_some_and(|start| start <= s.max_start);
            if p.time_unix_nano > s.max_time && !resend {
                e.0 = e.0.min(p.step);
            }
            if p.step == s.max_step && fingerprint(&p.value) == s.max_fingerprint {
                e.1 = true;
            }
        }
    }
    per.into_iter()
        .filter(|(series, (min, repeats))| !repeats && state.series.get(*series).is_some_and(|s| *min < s.max_step))
        .map(|(_, (min, _))| min)
        .min()
}

/// The open windows of one exporter, over all runs.
#[derive(Debug)]
pub struct Windows {
    settings: CadenceSettings,
    runs: FastMap<String, RunState>,
    interval_started: Instant,
    /// Seeds the data point identities ([`identity`]).
    ids: foldhash::quality::RandomState,
    pending: u64,
    superseded: u64,
    duplicates: u64,
}

/// Why windows are being closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Only what the cadence says is due.
    Due,
    /// Everything (shutdown).
    All,
}

impl Windows {
    /// Empty windows for this cadence; `now` starts the interval clock.
    pub fn new(settings: CadenceSettings, now: Instant) -> Self {
        Self {
            settings,
            runs: FastMap::default(),
            interval_started: now,
            ids: foldhash::quality::RandomState::default(),
            pending: 0,
            superseded: 0,
            duplicates: 0,
        }
    }

    /// Adds points. Returns the number of points that were late (see the module docs); points
    /// superseded by a resume are counted in [`Windows::take_superseded`].
    pub fn push(&mut self, rp: RunPoints, now: Instant) -> u64 {
        let settings = &self.settings;
        let state = self.runs.entry(rp.run.process_key().into_owned()).or_insert_with(|| RunState::new(rp.run.clone(), now));
        state.run = rp.run.clone();
        state.last_arrival = now;
        state.idle_reported = false;
        if let Some(step) = resume_step(state, &rp.points) {
            // Every point of the old session is at or before the newest time seen in the run.
            let boundary = state.series.values().map(|s| s.max_time).max().unwrap_or(0).saturating_add(1);
            let dropped = state.resume(step, boundary);
            self.pending -= dropped;
            self.superseded += dropped;
        }
        let mut late = 0;
        let RunState { series, max_step: run_max_step, resumed, ended, .. } = state;
        // A request holds a series' points one after another (one attribute set over many
        // steps, sharing one name): its state is looked up once per such stretch, not per point.
        let mut current: Option<(&Arc<str>, &mut SeriesState)> = None;
        for p in &rp.points {
            if resumed.is_some_and(|(step, time)| p.step >= step && p.time_unix_nano < time) {
                self.superseded += 1;
                continue;
            }
            if !current.as_ref().is_some_and(|(name, _)| Arc::ptr_eq(name, &p.series)) {
                let s = series.entry(p.series.clone()).or_insert_with(|| SeriesState::new(now));
                current = Some((&p.series, s));
            }
            let Some((_, s)) = current.as_mut() else { continue };
            s.max_time = s.max_time.max(p.time_unix_nano);
            let id = identity(&self.ids, p);
            if s.written_upto.is_some_and(|w| p.step <= w) {
                if (p.cumulative.is_some() || p.collected) && s.written_cumulative.get(p.step) == Some(id) {
                    self.duplicates += 1;
                } else {
                    late += 1;
                }
                continue;
            }
            if let Some(start) = p.cumulative {
                s.max_start = s.max_start.max(start);
            }
            *run_max_step = (*run_max_step).max(p.step);
            if p.step >= s.max_step {
                s.max_fingerprint = fingerprint(&p.value);
            }
            s.max_step = s.max_step.max(p.step);
            s.last_arrival = now;
            let acc = s.windows.get_or_open(settings.window_end(p.step), || Acc::new(settings.aggregation_for(&p.metric, &p.series), now));
            match acc.take(p, id) {
                Taken::Added => {
                    self.pending += 1;
                    *ended = false;
                }
                Taken::Duplicate => self.duplicates += 1,
            }
        }
        late
    }

    /// Takes the end of a run's process (see the module docs' "Run end"). Returns false when it
    /// is a repeat of an end already taken, with no point taken since.
    pub fn end(&mut self, run: Arc<RunInfo>, end: RunEnd, now: Instant) -> bool {
        let reorder = self.settings.reorder_window;
        let state = self.runs.entry(run.process_key().into_owned()).or_insert_with(|| RunState::new(run.clone(), now));
        if state.ended || state.ending.is_some() {
            return false;
        }
        state.run = run;
        state.ending = Some((end, now.checked_add(reorder).unwrap_or(now)));
        true
    }

    /// Ends every other rank's process of `run`'s job (same run key, another rank, not ended or
    /// ending) as [`Windows::end`] would: when one rank fails its job ends, so the other ranks'
    /// open windows are written together with the failed rank's (a combined job view of the
    /// last step then has every rank's points) and none is left to reopen the job afterwards.
    /// Returns the process keys it ended.
    pub fn end_job(&mut self, run: &RunInfo, end: RunEnd, now: Instant) -> Vec<String> {
        let at = now.checked_add(self.settings.reorder_window).unwrap_or(now);
        let mut ended = Vec::new();
        for (key, state) in &mut self.runs {
            let other_rank = state.run.key == run.key && state.run.rank.is_some() && state.run.rank != run.rank;
            if other_rank && !state.ended && state.ending.is_none() {
                state.ending = Some((end, at));
                ended.push(key.clone());
            }
        }
        ended.sort();
        ended
    }

    /// Data points dropped as `duplicate` since the last call (see the module docs'
    /// "Duplicates"), resetting the count.
    pub fn take_duplicates(&mut self) -> u64 {
        std::mem::take(&mut self.duplicates)
    }

    /// Data points dropped as `superseded` by resumes since the last call (see the module
    /// docs' "Resume"), resetting the count.
    pub fn take_superseded(&mut self) -> u64 {
        std::mem::take(&mut self.superseded)
    }

    /// Data points held in open windows.
    pub fn pending_inputs(&self) -> u64 {
        self.pending
    }

    /// Open windows (accumulators) held, over every run and series: what the windows cost in
    /// memory. A window of `every_steps: 100` is one entry whatever its inputs; at every-step
    /// cadence an entry is a point.
    pub fn held_entries(&self) -> u64 {
        self.runs.values().flat_map(|r| r.series.values()).map(|s| s.windows.len() as u64).sum()
    }

    /// When `take_ready(Close::Due)` may next have something to do without new input: the
    /// interval's end, or the end of a series' `linger`. Never an instant already past, so a
    /// caller waiting for it never spins.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        let interval = self.settings.interval.and_then(|i| self.interval_started.checked_add(i));
        let reorder = self.settings.reorder_window;
        let linger = self
            .runs
            .values()
            .flat_map(|r| r.series.values())
            .filter_map(|s| Some((s, s.windows.first_key_value()?.1)))
            .flat_map(|(s, first)| [s.last_arrival.checked_add(self.settings.linger), first.opened.checked_add(reorder)])
            .flatten()
            .chain(self.runs.values().filter_map(|r| r.ending.map(|(_, at)| at)))
            .filter(|t| *t > now)
            .min();
        match (interval, linger) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Closes the windows that are due (or all) and returns their points, one batch per run.
    pub fn take_ready(&mut self, now: Instant, close: Close) -> Vec<Batch> {
        let interval_due = self
            .settings
            .interval
            .is_some_and(|i| self.interval_started.checked_add(i).is_some_and(|t| now >= t));
        if interval_due {
            self.interval_started = now;
        }
        let all = close == Close::All || interval_due;
        let linger = self.settings.linger;
        // Without `every_steps` a window never closes by steps (its end, `i64::MAX`, is a key,
        // not a step), while with it a window may end at `i64::MAX` like any other.
        let steps_close = self.settings.every_steps.is_some();
        let reorder = self.settings.reorder_window;
        let mut out = Vec::new();
        for state in self.runs.values_mut() {
            let run_max = state.max_step;
            let idle = !state.idle_reported
                && self.settings.idle_after.is_some_and(|t| now.saturating_duration_since(state.last_arrival) >= t);
            let ending = state.ending.filter(|(_, at)| now >= *at || close == Close::All).map(|(end, _)| end);
            let all = all || idle || ending.is_some();
            // Each writing series' points, in step order.
            let mut per_series: Vec<Vec<OutPoint>> = Vec::new();
            // Whether a series' first window closes now (the loop below closes it and the next).
            let due = |s: &SeriesState| {
                s.windows.first_key_value().is_some_and(|(&end, first)| {
                    all || (steps_close
                        && now.saturating_duration_since(first.opened) >= reorder
                        && (s.max_step > end || (now.saturating_duration_since(s.last_arrival) >= linger && run_max >= end)))
                })
            };
            // The series that write, in name order, so merging their points by step alone puts
            // the batch in (step, series) order: names are compared once per series, not once
            // per point.
            let mut ready: Vec<(&Arc<str>, &mut SeriesState)> = state.series.iter_mut().filter(|(_, s)| due(s)).collect();
            ready.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (series, s) in ready {
                let mut points = Vec::with_capacity(s.windows.len());
                let quiet = now.saturating_duration_since(s.last_arrival) >= linger;
                while let Some((&end, first)) = s.windows.first_key_value() {
                    let settled = now.saturating_duration_since(first.opened) >= self.settings.reorder_window;
                    let reached = settled && steps_close && (s.max_step > end || (quiet && run_max >= end));
                    if !(reached || all) {
                        break;
                    }
                    let Some((_, mut acc)) = s.windows.pop_first() else { break };
                    for (step, id) in acc.resendable() {
                        s.written_cumulative.insert(step, id);
                    }
                    acc.fold_cumulative();
                    let step = if reached { end } else { acc.max_step };
                    self.pending -= acc.inputs;
                    s.written_upto = Some(s.written_upto.map_or(step, |w| w.max(step)));
                    points.push(OutPoint {
                        series: series.clone(),
                        step,
                        time_unix_nano: acc.time,
                        scalar: acc.scalar(),
                        histogram: acc.more.and_then(|m| m.hist),
                        inputs: acc.inputs,
                    });
                }
                s.windows.release_if_empty();
                per_series.push(points);
            }
            if idle {
                state.idle_reported = true;
            }
            if ending.is_some() {
                state.ending = None;
                state.ended = true;
                // Ended, not idle: an idle end must not overwrite the status the trainer gave.
                state.idle_reported = true;
            }
            if per_series.iter().any(|p| !p.is_empty()) || idle || ending.is_some() {
                // (step, series) is unique in a batch: one window per series end.
                let points = merge_by_step(per_series);
                let resumed_at = state.announce_resume.take();
                // Cut into pieces of at most MAX_BATCH_POINTS, in order (see the module docs).
                let pieces = points.len().div_ceil(MAX_BATCH_POINTS).max(1);
                let mut rest = points.into_iter();
                for i in 0..pieces {
                    out.push(Batch {
                        run: state.run.clone(),
                        points: rest.by_ref().take(MAX_BATCH_POINTS).collect(),
                        resumed_at: if i == 0 { resumed_at } else { None },
                        idle: idle && ending.is_none() && i + 1 == pieces,
                        ended: if i + 1 == pieces { ending } else { None },
                    });
                }
            }
        }
        out.sort_by(|a, b| a.run.process_key().cmp(&b.run.process_key()));
        out
    }
}

/// Merges lists each in step order into one in (step, list) order: every point moves once
/// (a sort of the concatenation moved each point once per merge level).
fn merge_by_step(lists: Vec<Vec<OutPoint>>) -> Vec<OutPoint> {
    use std::cmp::Reverse;
    let total = lists.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(total);
    // The series of a run usually hold the same steps (a trainer records each of them at every
    // step): the merge is then a transposition, read in order, without a heap.
    let aligned = lists
        .split_first()
        .is_some_and(|(first, rest)| rest.iter().all(|l| l.len() == first.len() && l.iter().zip(first).all(|(a, b)| a.step == b.step)));
    if aligned {
        let rows = lists.first().map_or(0, Vec::len);
        let mut iters: Vec<std::vec::IntoIter<OutPoint>> = lists.into_iter().map(Vec::into_iter).collect();
        for _ in 0..rows {
            out.extend(iters.iter_mut().filter_map(Iterator::next));
        }
        return out;
    }
    let mut iters: Vec<std::iter::Peekable<std::vec::IntoIter<OutPoint>>> = lists.into_iter().map(|l| l.into_iter().peekable()).collect();
    let mut heap: std::collections::BinaryHeap<Reverse<(i64, usize)>> =
        iters.iter_mut().enumerate().filter_map(|(i, it)| Some(Reverse((it.peek()?.step, i)))).collect();
    while let Some(Reverse((_, i))) = heap.pop() {
        let Some(p) = iters[i].next() else { continue };
        out.push(p);
        if let Some(next) = iters[i].peek() {
            heap.push(Reverse((next.step, i)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> Arc<RunInfo> {
        Arc::new(RunInfo { key: "r".into(), ..Default::default() })
    }

    fn pts(metric: &str, steps: impl IntoIterator<Item = (i64, f64)>) -> RunPoints {
        RunPoints {
            run: run(),
            points: steps
                .into_iter()
                .map(|(step, v)| Point {
                    metric: metric.into(),
                    series: metric.into(),
                    step,
                    time_unix_nano: step as u64 * 1000,
                    value: PointValue::Scalar(v),
                    cumulative: None,
                    collected: false,
                })
                .collect(),
        }
    }

    fn settings(every: Option<u64>, agg: Aggregation) -> CadenceSettings {
        CadenceSettings { every_steps: every, aggregation: agg, ..Default::default() }
    }

    fn flat(batches: Vec<Batch>) -> Vec<(String, i64, f64, u64)> {
        batches
            .into_iter()
            .flat_map(|b| b.points)
            .map(|p| (p.series.to_string(), p.step, p.scalar, p.inputs))
            .collect()
    }

    #[test]
    fn a_run_end_writes_the_partial_window_after_the_reorder_window_once() {
        let mut w = Windows::new(CadenceSettings { reorder_window: Duration::from_secs(5), ..settings(Some(100), Aggregation::Mean) }, Instant::now());
        let t = Instant::now();
        w.push(pts("loss", (1..=250).map(|s| (s, s as f64))), t);
        let end = RunEnd { status: EndStatus::Finished, time_unix_nano: 7 };
        assert!(w.end(run(), end, t));
        assert!(!w.end(run(), end, t), "a repeat while it waits");
        // Within the reorder window: 100 and 200 are due (later steps arrived), 250 waits.
        let first = w.take_ready(t + Duration::from_secs(1), Close::Due);
        assert!(first.is_empty(), "nothing settled before the reorder window");
        // A point still in flight when the end came is taken.
        w.push(pts("loss", [(251, 251.0)]), t + Duration::from_secs(2));
        let out = w.take_ready(t + Duration::from_secs(5), Close::Due);
        assert_eq!(out.iter().filter(|b| b.ended.is_some()).count(), 1);
        assert_eq!(out.last().and_then(|b| b.ended), Some(end));
        assert_eq!(flat(out), [("loss".to_string(), 100, 50.5, 100), ("loss".to_string(), 200, 150.5, 100), ("loss".to_string(), 251, 226.0, 51)]);
        assert_eq!(w.pending_inputs(), 0);
        // The same end again (a cumulative SDK re-sends its gauge) ends nothing more.
        assert!(!w.end(run(), end, t + Duration::from_secs(6)));
        // An end with nothing open still ends the run: an empty batch.
        let other = Arc::new(RunInfo { key: "q".into(), rank: Some(1), ..Default::default() });
        assert!(w.end(other, end, t));
        let out = w.take_ready(t + Duration::from_secs(5), Close::Due);
        assert_eq!(out.len(), 1);
        assert!(out[0].points.is_empty() && out[0].ended == Some(end) && out[0].run.process_key() == "q#rank-1");
    }

    /// The merge of per-series lists equals a stable sort of their concatenation by step:
    /// (step, series) order, with uneven lists, gaps, repeated steps across series and empty lists.
    #[test]
    fn merging_by_step_orders_points_as_a_stable_sort_does() {
        let list = |name: &str, steps: &[i64]| -> Vec<OutPoint> {
            steps
                .iter()
                .map(|&step| OutPoint { series: name.into(), step, time_unix_nano: 0, scalar: step as f64, histogram: None, inputs: 1 })
                .collect()
        };
        let key = |ps: &[OutPoint]| ps.iter().map(|p| (p.step, p.series.to_string())).collect::<Vec<_>>();
        let stable_sort = |lists: &[Vec<OutPoint>]| {
            let mut expected: Vec<OutPoint> = lists.iter().flatten().cloned().collect();
            expected.sort_by_key(|p| p.step);
            key(&expected)
        };
        let lists = vec![list("a", &[1, 2, 5, 9]), list("b", &[]), list("c", &[2, 3, 5]), list("d", &[-4, 9, 10]), list("e", &[5])];
        let expected = stable_sort(&lists);
        let merged = key(&merge_by_step(lists));
        assert_eq!(merged, expected);
        assert_eq!(merged[..4], [(-4, "d".to_string()), (1, "a".into()), (2, "a".into()), (2, "c".into())]);
        // Lists of the same steps (the transposition), and lists that differ only in their last
        // step or their length (the general merge).
        for lists in [
            vec![list("a", &[3, 4, 7]), list("b", &[3, 4, 7]), list("c", &[3, 4, 7])],
            vec![list("a", &[3, 4, 7]), list("b", &[3, 4, 8]), list("c", &[3, 4, 7])],
            vec![list("a", &[3, 4, 7]), list("b", &[3, 4]), list("c", &[3, 4, 7])],
            vec![list("a", &[]), list("b", &[])],
        ] {
            let expected = stable_sort(&lists);
            assert_eq!(key(&merge_by_step(lists)), expected);
        }
        let aligned = key(&merge_by_step(vec![list("a", &[3, 4]), list("b", &[3, 4])]));
        assert_eq!(aligned, [(3, "a".to_string()), (3, "b".into()), (4, "a".into()), (4, "b".into())]);
    }

    /// A gauge point stamped with its collection time (`collected`) is re-sent by a cumulative
    /// SDK at every collection with a new time: once written, the same step and value again is a
    /// `duplicate`, another value at that step is `late`; for windows of one point and of two.
    #[test]
    fn collected_gauge_re_sends_after_the_write_are_duplicates() {
        for every in [1, 2] {
            let t = Instant::now();
            let mut w = Windows::new(settings(Some(every), Aggregation::Last), t);
            let collected = |steps: &[(i64, f64)], time: u64| {
                let mut rp = pts("g", steps.iter().copied());
                for p in &mut rp.points {
                    p.collected = true;
                    p.time_unix_nano = time;
                }
                rp
            };
            assert_eq!(w.push(collected(&[(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)], 10), t), 0);
            let written = flat(w.take_ready(t + Duration::from_secs(3), Close::Due));
            let expect: Vec<(String, i64, f64, u64)> = if every == 1 {
                (1..=4).map(|s| ("g".to_string(), s, s as f64, 1)).collect()
            } else {
                vec![("g".into(), 2, 2.0, 2), ("g".into(), 4, 4.0, 2)]
            };
            assert_eq!(written, expect, "every {every}");
            // The next collection re-sends every step with a new time; step 3 changed.
            let late = w.push(collected(&[(1, 1.0), (2, 2.0), (3, 30.0), (4, 4.0)], 20), t + Duration::from_secs(4));
            assert_eq!((late, w.take_duplicates()), (1, 3), "every {every}");
            assert_eq!(w.pending_inputs(), 0);
        }
    }

    /// An open window is what a held point costs at every-step cadence (memory per point in
    /// flight, `scripts/bench-series.sh`): what only cumulative points and histograms need stays
    /// boxed.
    #[test]
    fn an_open_window_stays_small() {
        assert!(std::mem::size_of::<Acc>() <= 96, "Acc is {} bytes", std::mem::size_of::<Acc>());
    }

    #[test]
    fn window_ends_are_multiples() {
        let s = settings(Some(100), Aggregation::Last);
        assert_eq!([1, 100, 101, 0, -1, -100].map(|x| s.window_end(x)), [100, 100, 200, 0, 0, -100]);
        assert_eq!(settings(Some(1), Aggregation::Last).window_end(7), 7);
        assert_eq!(s.window_end(i64::MAX - 3), i64::MAX);
    }

    #[test]
    fn a_window_ending_at_the_largest_step_closes_like_any_other() {
        let t = Instant::now();
        let mut w = Windows::new(settings(Some(1), Aggregation::Last), t);
        let mut p = pts("loss", [(1, 1.0)]);
        p.points[0].step = i64::MAX;
        w.push(p, t);
        let out = flat(w.take_ready(t + Duration::from_secs(3600), Close::Due));
        assert_eq!(out, vec![("loss".to_string(), i64::MAX, 1.0, 1)]);
    }

    #[test]
    fn every_aggregation_over_windows_of_100() {
        let t = Instant::now();
        let values = |w: i64| (1..=100).map(move |i| ((w - 1) * 100 + i, ((w - 1) * 100 + i) as f64));
        for (agg, expect) in [
            (Aggregation::Mean, [50.5, 150.5]),
            (Aggregation::Last, [100.0, 200.0]),
            (Aggregation::Min, [1.0, 101.0]),
            (Aggregation::Max, [100.0, 200.0]),
            (Aggregation::Sum, [5050.0, 15050.0]),
        ] {
            let mut w = Windows::new(settings(Some(100), agg), t);
            w.push(pts("loss", values(1).chain(values(2))), t);
            // Window 200 is not closed yet: its end step arrived, but linger has not passed.
            assert_eq!(flat(w.take_ready(t, Close::Due)), vec![("loss".into(), 100, expect[0], 100)]);
            assert_eq!(w.pending_inputs(), 100);
            let later = t + Duration::from_secs(3);
            assert_eq!(flat(w.take_ready(later, Close::Due)), vec![("loss".into(), 200, expect[1], 100)]);
            assert_eq!(w.pending_inputs(), 0);
        }
    }

    #[test]
    fn partial_window_on_shutdown_is_stamped_with_its_last_step() {
        let t = Instant::now();
        let mut w = Windows::new(settings(Some(100), Aggregation::Mean), t);
        w.push(pts("loss", [(101, 1.0), (150, 3.0)]), t);
        assert!(w.take_ready(t, Close::Due).is_empty());
        assert_eq!(flat(w.take_ready(t, Close::All)), vec![("loss".into(), 150, 2.0, 2)]);
    }

    #[test]
    fn late_points_are_refused() {
        let t = Instant::now();
        let mut w = Windows::new(settings(Some(1), Aggregation::Last), t);
        w.push(pts("x", [(5, 5.0), (6, 6.0)]), t);
        assert_eq!(flat(w.take_ready(t, Close::Due)), vec![("x".into(), 5, 5.0, 1)]);
        assert_eq!(w.push(pts("x", [(3, 3.0), (5, 5.5)]), t), 2);
        assert_eq!(w.push(pts("x", [(6, 6.5), (7, 7.0)]), t), 0);
        let got = flat(w.take_ready(t, Close::All));
        assert_eq!(got, vec![("x".into(), 6, 6.5, 2), ("x".into(), 7, 7.0, 1)]);
    }

    #[test]
    fn interval_closes_everything_and_nan_rules_hold() {
        let t = Instant::now();
        let s = CadenceSettings {
            every_steps: None,
            interval: Some(Duration::from_secs(30)),
            aggregation: Aggregation::Max,
            per_metric: HashMap::from([("m".to_string(), Aggregation::Mean)]),
            ..Default::default()
        };
        let mut w = Windows::new(s, t);
        w.push(pts("x", [(1, f64::NAN), (2, 4.0), (3, 2.0)]), t);
        w.push(pts("m", [(1, f64::NAN), (2, 4.0)]), t);
        assert!(w.take_ready(t + Duration::from_secs(29), Close::Due).is_empty());
        let got = flat(w.take_ready(t + Duration::from_secs(30), Close::Due));
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].1, got[0].2.is_nan()), (2, true), "mean propagates NaN");
        assert_eq!((got[1].1, got[1].2), (3, 4.0), "max ignores NaN");
    }

    #[test]
    fn histograms_aggregate_exactly() {
        let t = Instant::now();
        let h = |count, sum, counts: Vec<u64>| Histogram {
            count,
            sum,
            min: Some(0.5),
            max: Some(9.0),
            bounds: vec![1.0, 5.0],
            counts,
        };
        let mut w = Windows::new(settings(Some(10), Aggregation::Mean), t);
        let mut rp = pts("h", []);
        for (step, hist) in [(1, h(2, 3.0, vec![1, 1, 0])), (2, h(4, 17.0, vec![0, 2, 2]))] {
            rp.points.push(Point {
                metric: "h".into(),
                series: "h".into(),
                step,
                time_unix_nano: 1,
                value: PointValue::Histogram(Box::new(hist)),
                cumulative: None,
                collected: false,
            });
        }
        w.push(rp, t);
        let out = w.take_ready(t, Close::All);
        let p = &out[0].points[0];
        assert_eq!(p.scalar, 20.0 / 6.0);
        let merged = p.histogram.clone().map(|h| (h.count, h.sum, h.counts));
        assert_eq!(merged, Some((6, 20.0, vec![1, 3, 2])));
    }

    #[test]
    fn progress_of_other_series_never_makes_points_late() {
        let t = Instant::now();
        let mut w = Windows::new(settings(Some(100), Aggregation::Mean), t);
        // One stray huge step in another series, then a lagging series keeps arriving.
        w.push(pts("sys", [(1_700_000_000_000, 1.0)]), t);
        let mut late = 0;
        let mut out = Vec::new();
        for step in 1..=300 {
            late += w.push(pts("loss", [(step, step as f64)]), t);
            out.extend(flat(w.take_ready(t, Close::Due)).into_iter().filter(|p| p.0 == "loss"));
        }
        assert_eq!(late, 0);
        assert_eq!(out, vec![("loss".into(), 100, 50.5, 100), ("loss".into(), 200, 150.5, 100)]);
    }

    #[test]
    fn a_sparse_series_closes_once_the_run_passes_and_it_is_quiet() {
        let t = Instant::now();
        let mut w = Windows::new(settings(Some(100), Aggregation::Last), t);
        w.push(pts("eval", [(250, 0.5)]), t);
        w.push(pts("loss", (251..=320).map(|s| (s, 1.0))), t);
        assert!(flat(w.take_ready(t, Close::Due)).iter().all(|p| p.0 != "eval"), "not quiet yet");
        let later = t + Duration::from_secs(3);
        let got: Vec<_> = flat(w.take_ready(later, Close::Due)).into_iter().filter(|p| p.0 == "eval").collect();
        assert_eq!(got, vec![("eval".into(), 300, 0.5, 1)]);
    }

    fn timed(metric: &str, pts: impl IntoIterator<Item = (i64, u64, f64)>) -> RunPoints {
        let mut rp = pts_empty();
        for (step, time, v) in pts {
            rp.points.push(Point {
                metric: metric.into(),
                series: metric.into(),
                step,
                time_unix_nano: time,
                value: PointValue::Scalar(v),
                cumulative: None,
                collected: false,
            });
        }
        rp
    }

    fn pts_empty() -> RunPoints {
        RunPoints { run: run(), points: Vec::new() }
    }

    #[test]
    fn a_step_back_newer_in_time_is_a_resume_and_older_in_time_is_late() {
        let t = Instant::now();
        let mut w = Windows::new(settings(Some(1), Aggregation::Last), t);
        // Session 1: steps 0..=150 every 10, times 1000 + step.
        for step in (0..=150).step_by(10) {
            w.push(timed("loss", [(step, 1000 + step as u64, step as f64)]), t);
        }
        let first: Vec<_> = w.take_ready(t, Close::Due);
        assert_eq!(first.iter().map(|b| b.resumed_at).collect::<Vec<_>>(), vec![None]);
        assert_eq!(flat(first).last().map(|p| p.1), Some(140), "150 waits for linger");
        // A collector's retry of step 120: old in time, so late, no resume.
        assert_eq!(w.push(timed("loss", [(120, 1120, 120.0)]), t), 1);
        assert_eq!(w.take_superseded(), 0);
        // The restarted trainer: step 100 again, newer than anything seen.
        assert_eq!(w.push(timed("loss", [(100, 5000, -100.0)]), t), 0);
        assert_eq!(w.take_superseded(), 1, "the open window of step 150");
        // An old-session point of step 130 retried after the resume: superseded.
        assert_eq!(w.push(timed("loss", [(130, 1130, 130.0), (110, 5010, -110.0)]), t), 0);
        assert_eq!(w.take_superseded(), 1);
        let out = w.take_ready(t + Duration::from_secs(3), Close::Due);
        assert_eq!(out.iter().map(|b| b.resumed_at).collect::<Vec<_>>(), vec![Some(100)]);
        assert_eq!(flat(out), vec![("loss".into(), 100, -100.0, 1), ("loss".into(), 110, -110.0, 1)]);
        assert_eq!(w.pending_inputs(), 0);
        // The same step again at a newer time is not a resume (recorded twice at one step).
        assert_eq!(w.push(timed("loss", [(110, 6000, 1.0)]), t), 1);
        assert!(w.take_ready(t + Duration::from_secs(6), Close::Due).is_empty());
    }

    #[test]
    fn a_fast_restarted_trainer_resumes_even_when_its_first_request_passes_the_old_steps() {
        let t = Instant::now();
        let mut w = Windows::new(settings(Some(1), Aggregation::Last), t);
        w.push(timed("loss", (0..=150).step_by(10).map(|s| (s, 1000 + s as u64, s as f64))), t);
        assert_eq!(flat(w.take_ready(t, Close::Due)).len(), 15, "0..=140; 150 waits for linger");
        // One request from 100 to 400, in no particular order (an SDK's attribute sets).
        let mut steps: Vec<i64> = (100..=400).step_by(10).collect();
        steps.reverse();
        steps.swap(3, 20);
        assert_eq!(w.push(timed("loss", steps.iter().map(|s| (*s, 5000 + *s as u64, -(*s as f64)))), t), 0);
        assert_eq!(w.take_superseded(), 1, "the old session's open step 150");
        let out = w.take_ready(t + Duration::from_secs(3), Close::Due);
        assert_eq!(out.iter().map(|b| b.resumed_at).collect::<Vec<_>>(), vec![Some(100)]);
        let got: Vec<(i64, f64)> = flat(out).into_iter().map(|p| (p.1, p.2)).collect();
        assert_eq!(got, (100..=400).step_by(10).map(|s| (s, -(s as f64))).collect::<Vec<_>>());
    }

    #[test]
    fn a_cumulative_re_send_of_every_step_is_not_a_resume() {
        let t = Instant::now();
        let mut w = Windows::new(settings(Some(1), Aggregation::Last), t);
        w.push(timed("g", (1..=5).map(|s| (s, 100, s as f64))), t);
        // The next collection re-sends steps 1..=5 and adds 6..=8, all at the new collection time.
        assert_eq!(w.push(timed("g", (1..=8).map(|s| (s, 200, s as f64))), t), 0);
        assert_eq!(w.take_superseded(), 0);
        let out = w.take_ready(t + Duration::from_secs(3), Close::Due);
        assert_eq!(out.iter().map(|b| b.resumed_at).collect::<Vec<_>>(), vec![None]);
        assert_eq!(flat(out).iter().map(|p| p.1).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
        // Once written, a third re-send is late, never a new session.
        assert_eq!(w.push(timed("g", (1..=8).map(|s| (s, 300, s as f64))), t), 8);
        assert!(w.take_ready(t + Duration::from_secs(6), Close::Due).is_empty());
    }

    #[test]
    fn a_run_quiet_for_idle_after_gets_one_idle_batch_with_its_open_windows() {
        let t = Instant::now();
        let s = CadenceSettings { every_steps: Some(100), idle_after: Some(Duration::from_secs(10)), ..Default::default() };
        let mut w = Windows::new(s, t);
        w.push(pts("loss", [(101, 1.0), (150, 3.0)]), t);
        assert!(w.take_ready(t + Duration::from_secs(9), Close::Due).is_empty());
        let idle = w.take_ready(t + Duration::from_secs(10), Close::Due);
        assert_eq!(idle.iter().map(|b| b.idle).collect::<Vec<_>>(), vec![true]);
        assert_eq!(flat(idle), vec![("loss".into(), 150, 3.0, 2)]);
        assert!(w.take_ready(t + Duration::from_secs(30), Close::Due).is_empty(), "once per quiet period");
        w.push(pts("loss", [(160, 4.0)]), t + Duration::from_secs(31));
        let again = w.take_ready(t + Duration::from_secs(41), Close::Due);
        assert_eq!(again.iter().map(|b| (b.idle, b.points.len())).collect::<Vec<_>>(), vec![(true, 1)]);
    }

    #[test]
    fn next_due_is_never_in_the_past() {
        let t = Instant::now();
        let mut w = Windows::new(settings(Some(100), Aggregation::Last), t);
        w.push(pts("x", [(50, 1.0)]), t);
        assert_eq!(w.next_due(t), Some(t + Duration::from_secs(2)));
        // Linger passed but the window cannot close (step 100 not reached): nothing to wake for.
        let later = t + Duration::from_secs(5);
        assert!(w.take_ready(later, Close::Due).is_empty());
        assert_eq!(w.next_due(later), None);
    }

    /// Case 014 at the cadence: a request repeated (a collector's retry) is not aggregated again.
    #[test]
    fn a_repeated_request_is_counted_duplicate_not_aggregated() {
        let t = Instant::now();
        for (agg, expect) in [(Aggregation::Mean, 2.0), (Aggregation::Sum, 200.0)] {
            let mut w = Windows::new(settings(Some(100), agg), t);
            let first = || pts("train.loss", (1..=50).map(|s| (s, 1.0)));
            w.push(first(), t);
            w.push(first(), t);
            assert_eq!(w.take_duplicates(), 50);
            w.push(pts("train.loss", (51..=100).map(|s| (s, 3.0))), t);
            assert_eq!(w.take_duplicates(), 0);
            assert_eq!(flat(w.take_ready(t, Close::All)), vec![("train.loss".into(), 100, expect, 100)]);
        }
        // The same value at the same step with another time is another data point.
        let mut w = Windows::new(settings(Some(100), Aggregation::Sum), t);
        w.push(timed("x", [(1, 10, 1.0), (1, 11, 1.0)]), t);
        assert_eq!(w.take_duplicates(), 0);
        assert_eq!(flat(w.take_ready(t, Close::All)), vec![("x".into(), 1, 2.0, 2)]);
    }

    fn cumulative(metric: &str, start: u64, pts: impl IntoIterator<Item = (i64, u64, PointValue)>) -> RunPoints {
        let mut rp = pts_empty();
        for (step, time, value) in pts {
            rp.points.push(Point { metric: metric.into(), series: metric.into(), step, time_unix_nano: time, value, cumulative: Some(start), collected: false });
        }
        rp
    }

    fn hist(count: u64, sum: f64) -> PointValue {
        PointValue::Histogram(Box::new(Histogram { count, sum, min: None, max: None, bounds: vec![1.0], counts: vec![count, 0] }))
    }

    /// Case 015 at the cadence: cumulative re-sends replace, never add; unchanged ones are
    /// duplicates, also after their step was written; a changed total for a written step is late.
    #[test]
    fn cumulative_points_replace_per_step() {
        let t = Instant::now();
        let mut w = Windows::new(CadenceSettings { reorder_window: Duration::from_secs(5), ..settings(Some(1), Aggregation::Last) }, t);
        // Collection 1: step 1 complete (3 records), step 2 partial (2 of 3).
        w.push(cumulative("g", 7, [(1, 100, hist(3, 3.0)), (2, 100, hist(2, 2.0))]), t);
        // Collection 2 re-sends both, step 2 now complete, and step 3.
        w.push(cumulative("g", 7, [(1, 200, hist(3, 3.0)), (2, 200, hist(3, 6.0)), (3, 200, hist(3, 9.0))]), t);
        assert_eq!(w.take_duplicates(), 1, "step 1 unchanged");
        let out = w.take_ready(t + Duration::from_secs(5), Close::Due);
        let got: Vec<_> = out.iter().flat_map(|b| &b.points).map(|p| (p.step, p.histogram.as_ref().map(|h| h.count), p.inputs)).collect();
        // Step 3 is the run's last step and quiet for `linger`: written too.
        assert_eq!(got, vec![(1, Some(3), 1), (2, Some(3), 2), (3, Some(3), 1)]);
        assert_eq!(w.take_superseded(), 0, "a re-send of old steps is no resume");
        // Collection 3 re-sends all three unchanged (already written): duplicates, not late.
        let late = w.push(cumulative("g", 7, [(1, 300, hist(3, 3.0)), (2, 300, hist(3, 6.0)), (3, 300, hist(3, 9.0))]), t);
        assert_eq!((late, w.take_duplicates()), (0, 3));
        // A changed total for a written step cannot be written again.
        let late = w.push(cumulative("g", 7, [(2, 400, hist(4, 8.0))]), t);
        assert_eq!(late, 1);
        assert!(w.take_ready(t, Close::All).is_empty());
        assert_eq!(w.pending_inputs(), 0);
    }

    #[test]
    fn cumulative_sums_aggregate_one_value_per_step() {
        let t = Instant::now();
        let mut w = Windows::new(settings(Some(100), Aggregation::Sum), t);
        let sc = PointValue::Scalar;
        w.push(cumulative("c", 1, [(1, 10, sc(1.0)), (2, 10, sc(2.0))]), t);
        w.push(cumulative("c", 1, [(1, 20, sc(1.0)), (2, 20, sc(4.0)), (3, 20, sc(5.0))]), t);
        assert_eq!(w.take_duplicates(), 1);
        // 1 + 4 + 5: the latest total per step; 5 inputs stand behind it (one duplicate).
        assert_eq!(flat(w.take_ready(t, Close::All)), vec![("c".into(), 3, 10.0, 4)]);
    }

    #[test]
    fn a_restarted_cumulative_producer_can_resume() {
        let t = Instant::now();
        let mut w = Windows::new(settings(Some(1), Aggregation::Last), t);
        let sc = PointValue::Scalar;
        w.push(cumulative("c", 1, (1..=10).map(|s| (s, 100, sc(s as f64)))), t);
        w.take_ready(t, Close::All);
        // The restarted trainer's SDK has a new start time and re-records from step 5.
        w.push(cumulative("c", 500, [(5, 600, sc(50.0))]), t);
        let out = w.take_ready(t, Close::All);
        assert_eq!(out[0].resumed_at, Some(5));
        assert_eq!(flat(out), vec![("c".into(), 5, 50.0, 1)]);
    }

    /// A 5 s hold of 500 000 points (50 series x 10 000 steps, every step) is released in
    /// batches of at most MAX_BATCH_POINTS, in (step, series) order, every point once; the
    /// pending resume is announced on the first batch only, `idle` only on the last.
    #[test]
    fn a_release_of_500_000_held_points_comes_out_in_bounded_batches_in_order() {
        let t = Instant::now();
        let s = CadenceSettings {
            reorder_window: Duration::from_secs(5),
            idle_after: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        let mut w = Windows::new(s, t);
        // A resume at step 0 (step 20 000, then step 0 newer in time), so a resume is pending.
        w.push(timed("s00", [(20_000, 100, 1.0)]), t);
        w.push(timed("s00", [(0, 200, 0.5)]), t);
        assert_eq!(w.take_superseded(), 1);
        for i in 0..50 {
            w.push(timed(&format!("s{i:02}"), (1..=10_000).map(|step| (step, 1000 + step as u64, step as f64 + i as f64 / 64.0))), t);
        }
        assert_eq!(w.held_entries(), 500_001);
        assert!(w.take_ready(t + Duration::from_secs(4), Close::Due).is_empty(), "held for the reorder window");
        let out = w.take_ready(t + Duration::from_secs(5), Close::Due);
        assert_eq!(out.len(), 51, "500 001 points in pieces of {MAX_BATCH_POINTS}");
        assert!(out.iter().all(|b| !b.points.is_empty() && b.points.len() <= MAX_BATCH_POINTS));
        assert_eq!(out.iter().map(|b| b.resumed_at).filter(Option::is_some).collect::<Vec<_>>(), vec![Some(0)]);
        assert_eq!(out[0].resumed_at, Some(0));
        assert_eq!(out.iter().map(|b| b.idle).collect::<Vec<_>>(), (0..51).map(|i| i == 50).collect::<Vec<_>>());
        let got: Vec<(i64, String, f64)> = out.into_iter().flat_map(|b| b.points).map(|p| (p.step, p.series.to_string(), p.scalar)).collect();
        let want: Vec<(i64, String, f64)> = std::iter::once((0, "s00".to_string(), 0.5))
            .chain((1..=10_000).flat_map(|step| (0..50).map(move |i| (step, format!("s{i:02}"), step as f64 + i as f64 / 64.0))))
            .collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "every point once, in (step, series) order");
        assert_eq!((w.pending_inputs(), w.held_entries()), (0, 0));
    }
}
