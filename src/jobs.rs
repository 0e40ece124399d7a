//! Jobs: how the ranks of one distributed job become one run of an exporter that shows the job
//! as a whole (MLflow: one run per job). It sits between the cadence and the exporter: each
//! rank's points are windowed and aggregated per process first ([`crate::cadence`], keyed by
//! [`RunInfo::process_key`]), then the job view decides, per series, what the job's run shows.
//!
//! # Views (`ranks` config: `view` and per-series `metrics`)
//! - `rank0` (default; what HF Trainer, Lightning and Axolotl log: the main process only):
//!   rank 0's points, as they come; other ranks' points are counted `other_rank`. A job with
//!   no rank 0 shows nothing under this view.
//! - `mean`, `min`, `max`: across ranks at each step. A step's point is written once every
//!   rank known to the job (seen so far and not ended) has one for that series and step and no
//!   new rank has appeared for `wait` (default 10 s; ranks start at different moments, so the
//!   first steps wait until the set of ranks is settled), or when `wait` has passed since the
//!   first of them arrived, or at shutdown; it stands for the inputs of every rank it
//!   combines. A rank's point for a step already written is `late` (it is never written
//!   twice). `mean` propagates NaN; `min` and `max`
//!   ignore NaN unless every value is NaN. The histogram of a combined point is not kept.
//! - `each`: every rank's points under the series name with `/rank-<N>` appended.
//!
//! A key of `metrics` names a series, or a metric whose series are `<metric>/<attributes>`.
//! Points of runs without a rank pass unchanged.
//!
//! # Resume, idle and end
//! - A rank's resume ([`Batch::resumed_at`]) drops its combined-view points still waiting at
//!   that step or above (`superseded`); the job's batch carries the resume of rank 0 (of any
//!   rank when the job has no rank 0).
//! - The job is idle (an [`Batch::idle`] batch, which may end the MLflow run by idle time)
//!   once every known rank's last batch was idle.
//! - The job ends ([`Batch::ended`]) on the first rank that ends `FAILED`, and when every
//!   known rank has ended: `FAILED` if one did, else `KILLED` if one was, else `FINISHED`, at
//!   the latest end time. Waiting combined points are written first. A job whose ranks send
//!   points again after its end is running again and ends again by the same rule.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::decode::{EndStatus, RunEnd, RunInfo};
use crate::cadence::{Close, Batch, OutPoint, MAX_BATCH_POINTS};
use crate::problems::Problems;
use crate::stats::DropReason;

/// What a job's run shows of its ranks for one series (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RankView {
    /// Rank 0's points (default).
    #[default]
    Rank0,
    /// The mean across ranks at each step.
    Mean,
    /// The smallest value across ranks at each step.
    Min,
    /// The largest value across ranks at each step.
    Max,
    /// Every rank, under `<series>/rank-<N>`.
    Each,
}

/// Default of [`JobSettings::wait`].
pub const DEFAULT_RANK_WAIT: Duration = Duration::from_secs(10);

/// The `ranks` key of an exporter that shows jobs as one run (MLflow), as users write it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RanksConfig {
    /// The view of every series not named in `metrics`; default `rank0`.
    #[serde(default)]
    pub view: Option<RankView>,
    /// The view per series or metric name.
    #[serde(default)]
    pub metrics: BTreeMap<String, RankView>,
    /// Longest wait of a combined view (`mean`, `min`, `max`) for the other ranks of a step;
    /// default 10s.
    #[serde(default, with = "humantime_serde")]
    pub wait: Option<Duration>,
}

/// Validated job view of one exporter.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSettings {
    /// The default view.
    pub view: RankView,
    /// Views per series or metric name.
    pub per_metric: HashMap<String, RankView>,
    /// Longest wait of a combined view for the other ranks of a step.
    pub wait: Duration,
}

impl Default for JobSettings {
    fn default() -> Self {
        Self { view: RankView::Rank0, per_metric: HashMap::new(), wait: DEFAULT_RANK_WAIT }
    }
}

impl RanksConfig {
    /// The settings, with problems (a zero `wait`) added to `p` under `path.ranks`.
    pub fn settings(&self, path: &str, p: &mut Problems) -> JobSettings {
        if self.wait == Some(Duration::ZERO) {
            p.add(format!("{path}.ranks.wait"), "must be positive");
        }
        JobSettings {
            view: self.view.unwrap_or_default(),
            per_metric: self.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            wait: self.wait.unwrap_or(DEFAULT_RANK_WAIT),
        }
    }
}

impl JobSettings {
    fn view_for(&self, series: &str) -> RankView {
        if let Some(v) = self.per_metric.get(series) {
            return *v;
        }
        // `<metric>/<attributes>`: the longest metric name that is a prefix at a `/`.
        let mut best: Option<(usize, RankView)> = None;
        for (k, v) in &self.per_metric {
            if series.len() > k.len() && series.starts_with(k.as_str()) && series.as_bytes()[k.len()] == b'/' && best.is_none_or(|(n, _)| k.len() > n) {
                best = Some((k.len(), *v));
            }
        }
        best.map_or(self.view, |(_, v)| v)
    }
}

#[derive(Debug, Default)]
struct Rank {
    /// Its last batch was idle.
    idle: bool,
    /// It ended so, and sent nothing since.
    ended: Option<RunEnd>,
}

/// The ranks' points of one series and step under a combined view.
#[derive(Debug)]
struct Gather {
    view: RankView,
    first: Instant,
    by_rank: BTreeMap<i64, OutPoint>,
}

#[derive(Debug)]
struct Job {
    run: Arc<RunInfo>,
    ranks: BTreeMap<i64, Rank>,
    gathers: BTreeMap<(String, i64), Gather>,
    /// When the last new rank appeared.
    ranks_changed: Instant,
    /// Per series under a combined view: the largest step written.
    written: HashMap<String, i64>,
    /// Points ready for the job's next batch.
    ready: Vec<OutPoint>,
    resumed_at: Option<i64>,
    /// The idle batch was emitted and no rank sent anything since.
    idle_emitted: bool,
    /// The end emitted last, and whether points were emitted after it.
    end_emitted: Option<EndStatus>,
    sent_since_end: bool,
    /// An end to emit with the next batch.
    end: Option<RunEnd>,
    idle: bool,
}

/// The job view of one exporter (see the module docs).
#[derive(Debug)]
pub struct JobView {
    settings: JobSettings,
    jobs: HashMap<String, Job>,
    pending: u64,
    dropped: BTreeMap<DropReason, u64>,
}

fn combine(view: RankView, points: &BTreeMap<i64, OutPoint>, series: &str, step: i64) -> OutPoint {
    let values = points.values().map(|p| p.scalar);
    let scalar = match view {
        RankView::Mean => values.sum::<f64>() / points.len().max(1) as f64,
        RankView::Min => values.fold(f64::NAN, f64::min),
        RankView::Max => values.fold(f64::NAN, f64::max),
        // Not combined views; a gather is never made for them.
        RankView::Rank0 | RankView::Each => f64::NAN,
    };
    OutPoint {
        series: series.into(),
        step,
        time_unix_nano: points.values().map(|p| p.time_unix_nano).max().unwrap_or(0),
        scalar,
        histogram: None,
        inputs: points.values().map(|p| p.inputs).sum(),
    }
}

impl JobView {
    /// An empty job view.
    pub fn new(settings: JobSettings) -> Self {
        Self { settings, jobs: HashMap::new(), pending: 0, dropped: BTreeMap::new() }
    }

    /// Takes the cadence's batches and returns the batches for the exporter: rank-less runs'
    /// batches unchanged, then each job's batch of what is ready (`Close::All`: everything).
    pub fn process(&mut self, batches: Vec<Batch>, now: Instant, close: Close) -> Vec<Batch> {
        let mut out = Vec::new();
        for b in batches {
            match b.run.rank {
                None => out.push(b),
                Some(rank) => self.take(b, rank, now),
            }
        }
        let wait = self.settings.wait;
        let mut keys: Vec<&String> = self.jobs.keys().collect();
        keys.sort();
        let keys: Vec<String> = keys.into_iter().cloned().collect();
        for key in keys {
            let Some(job) = self.jobs.get_mut(&key) else { continue };
            let alive: Vec<i64> = job.ranks.iter().filter(|(_, r)| r.ended.is_none()).map(|(k, _)| *k).collect();
            let ending = job.end.is_some() || alive.is_empty();
            let settled = now.saturating_duration_since(job.ranks_changed) >= wait;
            let done: Vec<(String, i64)> = job
                .gathers
                .iter()
                .filter(|(_, g)| {
                    close == Close::All
                        || ending
                        || now.saturating_duration_since(g.first) >= wait
                        || (settled && alive.iter().all(|r| g.by_rank.contains_key(r)))
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in done {
                if let Some(g) = job.gathers.remove(&k) {
                    let w = job.written.entry(k.0.clone()).or_insert(k.1);
                    *w = (*w).max(k.1);
                    let p = combine(g.view, &g.by_rank, &k.0, k.1);
                    self.pending -= p.inputs;
                    job.ready.push(p);
                }
            }
            if job.end.is_none() && !job.ranks.is_empty() && alive.is_empty() {
                let status = [EndStatus::Failed, EndStatus::Killed, EndStatus::Finished]
                    .into_iter()
                    .find(|s| job.ranks.values().any(|r| r.ended.is_some_and(|e| e.status == *s)))
                    .unwrap_or(EndStatus::Finished);
                let time = job.ranks.values().filter_map(|r| r.ended.map(|e| e.time_unix_nano)).max().unwrap_or(0);
                if job.end_emitted != Some(status) || job.sent_since_end || !job.ready.is_empty() {
                    job.end = Some(RunEnd { status, time_unix_nano: time });
                }
            }
            let idle = !job.idle_emitted && !job.ranks.is_empty() && job.ranks.values().all(|r| r.idle) && job.gathers.is_empty();
            job.idle |= idle;
            if job.ready.is_empty() && job.end.is_none() && !job.idle && job.resumed_at.is_none() {
                continue;
            }
            if job.idle {
                job.idle_emitted = true;
            }
            let mut points = std::mem::take(&mut job.ready);
            points.sort_by(|a, b| (a.step, &a.series).cmp(&(b.step, &b.series)));
            let end = job.end.take();
            let idle = std::mem::take(&mut job.idle) && end.is_none();
            if let Some(e) = end {
                job.end_emitted = Some(e.status);
                job.sent_since_end = false;
            } else if !points.is_empty() {
                job.sent_since_end = true;
            }
            let resumed_at = job.resumed_at.take();
            let pieces = points.len().div_ceil(MAX_BATCH_POINTS).max(1);
            let mut rest = points.into_iter();
            for i in 0..pieces {
                let last = i + 1 == pieces;
                out.push(Batch {
                    run: job.run.clone(),
                    points: rest.by_ref().take(MAX_BATCH_POINTS).collect(),
                    resumed_at: if i == 0 { resumed_at } else { None },
                    idle: idle && last,
                    ended: if last { end } else { None },
                });
            }
        }
        out
    }

    fn take(&mut self, b: Batch, rank: i64, now: Instant) {
        let job = self.jobs.entry(b.run.key.clone()).or_insert_with(|| Job {
            run: b.run.job(),
            ranks: BTreeMap::new(),
            gathers: BTreeMap::new(),
            ranks_changed: now,
            written: HashMap::new(),
            ready: Vec::new(),
            resumed_at: None,
            idle_emitted: false,
            end_emitted: None,
            sent_since_end: false,
            end: None,
            idle: false,
        });
        if rank == 0 || (!job.ranks.contains_key(&0) && job.ranks.keys().all(|r| *r > rank)) {
            // The job is described by its lowest rank seen (rank 0 when it has one).
            job.run = b.run.job();
        }
        if !job.ranks.contains_key(&rank) {
            job.ranks_changed = now;
        }
        let r = job.ranks.entry(rank).or_default();
        r.idle = b.idle;
        if !b.idle {
            job.idle_emitted = false;
        }
        if !b.points.is_empty() {
            r.ended = None;
        }
        if let Some(s) = b.resumed_at {
            let mut superseded = 0;
            for g in job.gathers.values_mut().filter(|g| g.by_rank.contains_key(&rank)) {
                if g.by_rank.get(&rank).is_some_and(|p| p.step >= s) {
                    if let Some(p) = g.by_rank.remove(&rank) {
                        superseded += p.inputs;
                    }
                }
            }
            job.gathers.retain(|_, g| !g.by_rank.is_empty());
            let below = s.saturating_sub(1);
            job.written.values_mut().for_each(|w| *w = (*w).min(below));
            self.pending -= superseded;
            *self.dropped.entry(DropReason::Superseded).or_default() += superseded;
            if rank == 0 || !job.ranks.contains_key(&0) {
                job.resumed_at = Some(job.resumed_at.map_or(s, |a| a.min(s)));
            }
        }
        for mut p in b.points {
            match self.settings.view_for(&p.series) {
                RankView::Rank0 if rank == 0 => job.ready.push(p),
                RankView::Rank0 => *self.dropped.entry(DropReason::OtherRank).or_default() += p.inputs,
                RankView::Each => {
                    p.series = format!("{}/rank-{rank}", p.series).into();
                    job.ready.push(p);
                }
                _ if job.written.get(&*p.series).is_some_and(|w| p.step <= *w) => {
                    *self.dropped.entry(DropReason::Late).or_default() += p.inputs;
                }
                view => {
                    let g = job
                        .gathers
                        .entry((p.series.to_string(), p.step))
                        .or_insert_with(|| Gather { view, first: now, by_rank: BTreeMap::new() });
                    self.pending += p.inputs;
                    if let Some(old) = g.by_rank.insert(rank, p) {
                        // The rank wrote this step again (a resume): its newer point counts.
                        self.pending -= old.inputs;
                        *self.dropped.entry(DropReason::Superseded).or_default() += old.inputs;
                    }
                }
            }
        }
        if let Some(e) = b.ended {
            if let Some(r) = job.ranks.get_mut(&rank) {
                r.ended = Some(e);
            }
            if e.status == EndStatus::Failed && job.end_emitted != Some(EndStatus::Failed) {
                job.end = Some(e);
            }
        }
    }

    /// Data points dropped since the last call, by reason (`other_rank`, `superseded`).
    pub fn take_dropped(&mut self) -> Vec<(DropReason, u64)> {
        std::mem::take(&mut self.dropped).into_iter().filter(|(_, n)| *n > 0).collect()
    }

    /// Data points waiting for the other ranks of their step.
    pub fn pending_inputs(&self) -> u64 {
        self.pending
    }

    /// Points (one per rank, series and step) waiting: what the view costs in memory.
    pub fn held_entries(&self) -> u64 {
        self.jobs.values().flat_map(|j| j.gathers.values()).map(|g| g.by_rank.len() as u64).sum()
    }

    /// When a waiting step's `wait` ends, if any does after `now`.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        self.jobs
            .values()
            .flat_map(|j| j.gathers.values())
            .filter_map(|g| g.first.checked_add(self.settings.wait))
            .filter(|t| *t > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rank: i64) -> Arc<RunInfo> {
        Arc::new(RunInfo { key: "job".into(), rank: Some(rank), ..Default::default() })
    }

    fn batch(rank: i64, points: &[(&str, i64, f64)]) -> Batch {
        Batch {
            run: run(rank),
            points: points
                .iter()
                .map(|(s, step, v)| OutPoint { series: (*s).into(), step: *step, time_unix_nano: *step as u64, scalar: *v, histogram: None, inputs: 1 })
                .collect(),
            ..Default::default()
        }
    }

    fn values(out: &[Batch]) -> Vec<(String, i64, f64, u64)> {
        out.iter().flat_map(|b| &b.points).map(|p| (p.series.to_string(), p.step, p.scalar, p.inputs)).collect()
    }

    fn view(view: RankView) -> JobView {
        JobView::new(JobSettings { view, ..Default::default() })
    }

    #[test]
    fn rank0_shows_rank_0_and_counts_the_others() {
        let mut j = view(RankView::Rank0);
        let t = Instant::now();
        let out = j.process((0..4).map(|r| batch(r, &[("loss", 1, r as f64 * 1000.0)])).collect(), t, Close::Due);
        assert_eq!(values(&out), [("loss".to_string(), 1, 0.0, 1)]);
        assert!(out.iter().all(|b| b.run.rank.is_none() && b.run.key == "job"));
        assert_eq!(j.take_dropped(), [(DropReason::OtherRank, 3)]);
    }

    #[test]
    fn mean_waits_for_every_known_rank_then_combines() {
        let mut j = view(RankView::Mean);
        let t0 = Instant::now();
        // Ranks appear at different moments: the first steps wait until none is new for `wait`.
        assert!(j.process(vec![batch(0, &[("loss", 1, 1.0)]), batch(1, &[("loss", 1, 3.0)])], t0, Close::Due).is_empty());
        let t = t0 + DEFAULT_RANK_WAIT;
        let out = j.process(vec![], t, Close::Due);
        assert_eq!(values(&out), [("loss".to_string(), 1, 2.0, 2)]);
        // Two ranks are known; step 2 of rank 0 waits for rank 1.
        assert!(j.process(vec![batch(0, &[("loss", 2, 10.0)])], t, Close::Due).is_empty());
        assert_eq!(j.pending_inputs(), 1);
        let out = j.process(vec![batch(1, &[("loss", 2, 20.0)])], t, Close::Due);
        assert_eq!(values(&out), [("loss".to_string(), 2, 15.0, 2)]);
        // A rank that never comes: the step is written after `wait` with the ranks it has.
        assert!(j.process(vec![batch(0, &[("loss", 3, 7.0)])], t, Close::Due).is_empty());
        let out = j.process(vec![], t + DEFAULT_RANK_WAIT, Close::Due);
        assert_eq!(values(&out), [("loss".to_string(), 3, 7.0, 1)]);
        assert_eq!(j.pending_inputs(), 0);
        // The late rank's point for a written step is never written twice.
        assert!(j.process(vec![batch(1, &[("loss", 3, 9.0)])], t + DEFAULT_RANK_WAIT, Close::Due).is_empty());
        assert_eq!(j.take_dropped(), [(DropReason::Late, 1)]);
    }

    #[test]
    fn min_max_and_each_and_per_metric_views() {
        let settings = JobSettings {
            view: RankView::Each,
            per_metric: HashMap::from([("lo".to_string(), RankView::Min), ("hi".to_string(), RankView::Max)]),
            ..Default::default()
        };
        let mut j = JobView::new(settings);
        let t = Instant::now();
        let mut out = j.process(
            vec![batch(0, &[("hi/k=v", 1, 1.0), ("lo", 1, 1.0), ("x", 1, 5.0)]), batch(1, &[("hi/k=v", 1, f64::NAN), ("lo", 1, -1.0), ("x", 1, 6.0)])],
            t,
            Close::Due,
        );
        assert_eq!(values(&out).len(), 2, "each: at once; min and max: once the ranks are settled");
        out.extend(j.process(vec![], t + DEFAULT_RANK_WAIT, Close::Due));
        let mut v = values(&out);
        v.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            v,
            [
                ("hi/k=v".to_string(), 1, 1.0, 2),
                ("lo".to_string(), 1, -1.0, 2),
                ("x/rank-0".to_string(), 1, 5.0, 1),
                ("x/rank-1".to_string(), 1, 6.0, 1)
            ]
        );
    }

    #[test]
    fn the_job_ends_when_every_rank_has_or_on_the_first_failure() {
        let end = |status| RunEnd { status, time_unix_nano: 9 };
        let mut j = view(RankView::Rank0);
        let t = Instant::now();
        j.process(vec![batch(0, &[("loss", 1, 1.0)]), batch(1, &[("loss", 1, 1.0)])], t, Close::Due);
        let mut b0 = batch(0, &[("loss", 2, 2.0)]);
        b0.ended = Some(end(EndStatus::Finished));
        let out = j.process(vec![b0], t, Close::Due);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].ended, None, "rank 1 has not ended");
        let mut b1 = batch(1, &[]);
        b1.ended = Some(end(EndStatus::Finished));
        let out = j.process(vec![b1.clone()], t, Close::Due);
        assert_eq!(out.iter().filter_map(|b| b.ended).collect::<Vec<_>>(), [end(EndStatus::Finished)]);
        // The same end again ends nothing more.
        assert!(j.process(vec![b1], t, Close::Due).is_empty());

        let mut j = view(RankView::Mean);
        j.process(vec![batch(0, &[("loss", 1, 1.0)]), batch(1, &[("loss", 1, 3.0)])], t, Close::Due);
        let t = t + DEFAULT_RANK_WAIT;
        assert_eq!(values(&j.process(vec![], t, Close::Due)), [("loss".to_string(), 1, 2.0, 2)]);
        assert!(j.process(vec![batch(0, &[("loss", 2, 1.0)])], t, Close::Due).is_empty());
        let mut b1 = batch(1, &[]);
        b1.ended = Some(end(EndStatus::Failed));
        let out = j.process(vec![b1], t, Close::Due);
        // The waiting step is written before the end.
        assert_eq!(values(&out), [("loss".to_string(), 2, 1.0, 1)]);
        assert_eq!(out.last().and_then(|b| b.ended), Some(end(EndStatus::Failed)));
    }

    /// Through the cadence (every 100 steps, mean) as the delivery worker runs them: rank 1 fails
    /// after step 150 and rank 0 sends no end (DDP kills it). The job's last window holds both
    /// ranks' points, the job ends FAILED with it, and nothing is left open to reopen the run.
    #[test]
    fn a_failed_rank_ends_the_job_with_every_rank_s_last_window() {
        use crate::decode::{Point, PointValue, RunPoints};
        use crate::cadence::{Aggregation, CadenceSettings, Windows};
        let reorder = Duration::from_secs(5);
        let cadence = CadenceSettings { every_steps: Some(100), aggregation: Aggregation::Mean, reorder_window: reorder, ..Default::default() };
        let t = Instant::now();
        let mut w = Windows::new(cadence, t);
        let mut j = view(RankView::Mean);
        for rank in [0, 1] {
            let points = (1..=150)
                .map(|step| Point {
                    metric: "loss".into(),
                    series: "loss".into(),
                    step,
                    time_unix_nano: step as u64,
                    value: PointValue::Scalar(rank as f64 * 1000.0 + step as f64),
                    cumulative: None,
                    collected: false,
                })
                .collect();
            w.push(RunPoints { run: run(rank), points }, t);
        }
        let failed = RunEnd { status: EndStatus::Failed, time_unix_nano: 9 };
        assert_eq!(w.end_job(&run(1), failed, t), ["job#rank-0"]);
        assert!(w.end(run(1), failed, t));
        let mut out = Vec::new();
        for now in [t + Duration::from_secs(1), t + reorder, t + reorder + DEFAULT_RANK_WAIT] {
            out.extend(j.process(w.take_ready(now, Close::Due), now, Close::Due));
        }
        // Window 100: mean over both ranks of 1..100 and 1001..1100; window 150: of 101..150 and
        // 1101..1150, both ranks (not rank 1 alone).
        assert_eq!(values(&out), [("loss".to_string(), 100, 550.5, 200), ("loss".to_string(), 150, 625.5, 100)]);
        assert_eq!(out.iter().filter_map(|b| b.ended).collect::<Vec<_>>(), [failed]);
        assert_eq!((w.pending_inputs(), j.pending_inputs()), (0, 0));
        assert_eq!(j.take_dropped(), []);
    }

    #[test]
    fn a_resume_drops_the_ranks_waiting_points_and_is_announced_once() {
        let mut j = view(RankView::Mean);
        let t = Instant::now();
        j.process(vec![batch(0, &[("loss", 1, 1.0)]), batch(1, &[("loss", 1, 1.0)])], t, Close::Due);
        let t = t + DEFAULT_RANK_WAIT;
        assert_eq!(values(&j.process(vec![], t, Close::Due)).len(), 1);
        j.process(vec![batch(0, &[("loss", 5, 1.0)])], t, Close::Due);
        let mut b = batch(0, &[("loss", 3, 4.0)]);
        b.resumed_at = Some(3);
        let out = j.process(vec![b], t, Close::Due);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].resumed_at, Some(3));
        assert!(out[0].points.is_empty());
        assert_eq!(j.take_dropped(), [(DropReason::Superseded, 1)]);
        let out = j.process(vec![batch(1, &[("loss", 3, 6.0)])], t, Close::Due);
        assert_eq!(values(&out), [("loss".to_string(), 3, 5.0, 2)]);
    }

    #[test]
    fn runs_without_a_rank_pass_unchanged_and_the_job_goes_idle_with_its_last_rank() {
        let mut j = view(RankView::Rank0);
        let t = Instant::now();
        let plain = Batch { run: Arc::new(RunInfo { key: "solo".into(), ..Default::default() }), ..batch(0, &[("a", 1, 1.0)]) };
        let out = j.process(vec![plain], t, Close::Due);
        assert_eq!(out[0].run.key, "solo");
        assert_eq!(out[0].points.len(), 1);
        j.process(vec![batch(0, &[("loss", 1, 1.0)]), batch(1, &[("loss", 1, 1.0)])], t, Close::Due);
        let mut i0 = batch(0, &[]);
        i0.idle = true;
        assert!(j.process(vec![i0], t, Close::Due).is_empty());
        let mut i1 = batch(1, &[]);
        i1.idle = true;
        let out = j.process(vec![i1], t, Close::Due);
        assert_eq!(out.len(), 1);
        assert!(out[0].idle && out[0].run.rank.is_none());
    }
}
