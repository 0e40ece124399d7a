//! Runs: the run a resource describes (module docs' "Runs", "Ranks"), and one exporter's table
//! of tracked processes, which admits runs under `max_runs` (forgetting idle ones) and series
//! under `max_series_per_run`, and bounds each run's params and tags.

use std::collections::HashSet;
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::KeyValue;

use super::model::{any_value_text, short, Decoded, Pending, PointValue, RunInfo};
use super::settings::{DecodeSettings, IdentityKeys};
use super::steps::{parse_step, StepState};
use crate::fastmap::FastMap;
use crate::names::bounded_name;
use crate::stats::DropReason;

/// What one exporter keeps per tracked process.
#[derive(Debug, Default)]
pub(crate) struct RunState {
    /// Steps and cumulative totals so far.
    pub(crate) steps: StepState,
    /// Series admitted under `max_series_per_run`, with their kind (true: histogram).
    pub(crate) series: FastMap<Arc<str>, bool>,
    /// Whether the series limit has been reported for this run.
    limit_reported: bool,
    /// Param (`p`) and tag (`t`) keys passed on for this run, at most [`MAX_RUN_ATTRIBUTES`].
    attribute_keys: HashSet<(char, String)>,
    /// Whether the attribute limit has been reported for this run.
    attributes_reported: bool,
    /// When the run last had points (for forgetting idle runs under `max_runs`).
    last_seen: Option<std::time::Instant>,
}

/// One exporter's tracked processes (by [`RunInfo::process_key`]), each with its run as passed
/// on and its state; both maps hold the same keys.
#[derive(Debug, Default)]
pub(crate) struct Runs {
    pub(crate) states: FastMap<String, RunState>,
    pub(crate) infos: FastMap<String, Arc<RunInfo>>,
    /// Whether the `max_runs` limit has been reported.
    run_limit_reported: bool,
    /// Until when no tracked run can be idle long enough to forget (see `run_admitted`).
    no_idle_run_until: Option<std::time::Instant>,
}

/// Most distinct param and tag keys (together) a run passes on over its life; further keys are
/// left out (with one warning per run), so exporters' per-run param and tag maps stay bounded.
pub const MAX_RUN_ATTRIBUTES: usize = 1024;
/// Longest param or tag value passed on, in characters (MLflow keeps at most 8000 of a tag
/// value and 6000 of a param value, `mlflow/utils/validation.py`); longer values are cut.
pub const MAX_ATTRIBUTE_VALUE_CHARS: usize = 8000;

/// Applies [`MAX_RUN_ATTRIBUTES`] and [`MAX_ATTRIBUTE_VALUE_CHARS`] (keys are bounded like
/// series names); returns how many keys were left out.
fn bound_run_attributes(info: &mut RunInfo, state: &mut RunState) -> usize {
    let mut refused = 0;
    for (kind, map) in [('p', &mut info.params), ('t', &mut info.tags)] {
        let entries = std::mem::take(map);
        for (k, mut v) in entries {
            let k = bounded_name(&k).into_owned();
            let id = (kind, k);
            if !state.attribute_keys.contains(&id) {
                if state.attribute_keys.len() >= MAX_RUN_ATTRIBUTES {
                    refused += 1;
                    continue;
                }
                state.attribute_keys.insert(id.clone());
            }
            if let Some((i, _)) = v.char_indices().nth(MAX_ATTRIBUTE_VALUE_CHARS) {
                v.truncate(i);
            }
            map.insert(id.1, v);
        }
    }
    refused
}

/// The run a resource describes (module docs' "Runs"); its key bounded, the rest as sent.
pub(crate) fn run_info(attrs: &[KeyValue], keys: &IdentityKeys) -> RunInfo {
    let mut info = RunInfo::default();
    let mut service = (None, None);
    for kv in attrs {
        let text = any_value_text(kv.value.as_ref());
        if kv.key == keys.experiment {
            info.experiment = Some(text);
        } else if kv.key == keys.run_name {
            info.run_name = Some(text);
        } else if kv.key == keys.run_id {
            info.run_id = Some(text);
        } else if let Some(p) = kv.key.strip_prefix(keys.param_prefix.as_str()) {
            info.params.insert(p.to_string(), text);
        } else if let Some(rank) = (kv.key == keys.rank).then(|| parse_step(kv.value.as_ref())).flatten() {
            info.rank = Some(rank);
        } else {
            if kv.key == "service.name" {
                service.0 = Some(text.clone());
            } else if kv.key == "service.instance.id" {
                service.1 = Some(text.clone());
            }
            info.tags.insert(kv.key.clone(), text);
        }
    }
    info.key = match (&info.run_id, &info.run_name, service) {
        (Some(id), _, _) if !id.is_empty() => id.clone(),
        (_, Some(name), _) if !name.is_empty() => name.clone(),
        (_, _, (Some(s), Some(i))) => format!("{s}/{i}"),
        (_, _, (Some(s), None)) => s,
        _ => "default".to_string(),
    };
    info.key = bounded_name(&info.key).into_owned();
    info
}

impl Runs {
    /// The step state of a tracked process.
    pub(crate) fn steps_of(&mut self, process: &str) -> &mut StepState {
        &mut self.states.entry(process.to_string()).or_default().steps
    }

    /// Whether a run with this key is tracked, or may be under `max_runs`; when the limit is
    /// reached, the run idle longest is forgotten if it has been idle for
    /// [`DecodeSettings::forget_idle_runs_after`].
    fn run_admitted(&mut self, settings: &DecodeSettings, key: &str) -> bool {
        if self.states.contains_key(key) || self.states.len() < settings.max_runs {
            return true;
        }
        let now = std::time::Instant::now();
        // A scan that found nobody idle enough is not repeated before someone can be: a
        // request of 100 000 new runs must not scan `max_runs` runs for each of them.
        if self.no_idle_run_until.is_some_and(|t| now < t) {
            return false;
        }
        let idlest = self
            .states
            .iter()
            .map(|(k, st)| (st.last_seen.map_or(std::time::Duration::MAX, |t| now.saturating_duration_since(t)), k))
            .max_by_key(|(idle, _)| *idle)
            .map(|(idle, k)| (idle, k.clone()));
        let forget = settings.forget_idle_runs_after;
        match idlest {
            Some((idle, k)) if idle >= forget => {
                self.states.remove(&k);
                self.infos.remove(&k);
                true
            }
            Some((idle, _)) => {
                // Nobody can be forgotten before the idlest run reaches `forget`.
                self.no_idle_run_until = now.checked_add(forget - idle);
                false
            }
            None => false,
        }
    }

    /// The run of a parsed resource under this exporter's `max_runs` and per-run attribute
    /// bounds: the shared `Arc` when nothing changed, so downstream maps see one run object.
    pub(crate) fn run_info(&mut self, settings: &DecodeSettings, described: &RunInfo) -> Arc<RunInfo> {
        let mut info = described.clone();
        let process = info.process_key().into_owned();
        if !self.run_admitted(settings, &process) {
            // Not tracked: its points are all dropped, so nothing may be kept for it.
            return Arc::new(info);
        }
        // The run takes its slot under `max_runs` now, so `runs` and `steps` hold the same keys.
        let state = self.states.entry(process.clone()).or_default();
        let refused = bound_run_attributes(&mut info, state);
        if refused > 0 && !state.attributes_reported {
            state.attributes_reported = true;
            tracing::warn!(
                run = %short(&info.key),
                refused,
                "run has {MAX_RUN_ATTRIBUTES} distinct params and tags; further keys are not passed on"
            );
        }
        match self.infos.get(&process) {
            Some(existing) if **existing == info => existing.clone(),
            _ => {
                let arc = Arc::new(info);
                self.infos.insert(process, arc.clone());
                arc
            }
        }
    }

    /// `run` as the process of `rank` (a data point's rank attribute), admitted under
    /// `max_runs` like a resource of its own; `None` when it is not admitted.
    pub(crate) fn with_rank(&mut self, settings: &DecodeSettings, run: &Arc<RunInfo>, rank: i64) -> Option<Arc<RunInfo>> {
        if run.rank == Some(rank) {
            return Some(run.clone());
        }
        let info = RunInfo { rank: Some(rank), ..(**run).clone() };
        let process = info.process_key().into_owned();
        match self.infos.get(&process) {
            Some(existing) if **existing == info => return Some(existing.clone()),
            _ => {}
        }
        if !self.run_admitted(settings, &process) {
            return None;
        }
        self.states.entry(process.clone()).or_default();
        let arc = Arc::new(info);
        self.infos.insert(process, arc.clone());
        Some(arc)
    }

    /// Applies `max_runs` and `max_series_per_run`: returns the points of admitted series, or
    /// `None` when none is left. Dropped points count `series_limit`.
    pub(crate) fn admit(&mut self, settings: &DecodeSettings, run_key: &str, mut pending: Vec<Pending>, out: &mut Decoded) -> Option<Vec<Pending>> {
        let max_series = settings.max_series_per_run;
        if !self.run_admitted(settings, run_key) {
            out.drop_quiet(DropReason::SeriesLimit, pending.len() as u64);
            if !self.run_limit_reported {
                self.run_limit_reported = true;
                out.messages.push((
                    DropReason::SeriesLimit,
                    format!("run {:?}: already tracking max_runs={} runs; points of further runs are dropped", short(run_key), settings.max_runs),
                ));
            }
            return None;
        }
        let state = self.states.entry(run_key.to_string()).or_default();
        state.last_seen = Some(std::time::Instant::now());
        let mut refused = 0u64;
        let mut first_refused = None;
        // A series' points come one after another (one name shared): its kind is looked up
        // once per stretch. Kept points stay where they are (no second vector).
        let mut known: Option<(Arc<str>, bool)> = None;
        pending.retain(|p| {
            let histogram = matches!(p.value, PointValue::Histogram(_));
            let kind = match &known {
                Some((name, kind)) if Arc::ptr_eq(name, &p.series) => Some(*kind),
                _ => {
                    let kind = state.series.get(&p.series).copied();
                    known = kind.map(|k| (p.series.clone(), k));
                    kind
                }
            };
            match kind {
                Some(kind) if kind == histogram => true,
                Some(kind) => {
                    let (was, is) = if kind { ("histograms", "a scalar") } else { ("scalars", "a histogram") };
                    out.drop(DropReason::InvalidValue, || {
                        format!("series {:?} holds {was}; {is} point cannot share its TensorBoard tag", short(&p.series))
                    });
                    false
                }
                None if state.series.len() < max_series => {
                    state.series.insert(p.series.clone(), histogram);
                    known = Some((p.series.clone(), histogram));
                    true
                }
                None => {
                    refused += 1;
                    if first_refused.is_none() {
                        first_refused = Some(p.series.clone());
                    }
                    false
                }
            }
        });
        if refused > 0 {
            out.drop_quiet(DropReason::SeriesLimit, refused);
            if !state.limit_reported {
                state.limit_reported = true;
                let series: String = first_refused.unwrap_or_default().chars().take(200).collect();
                out.messages.push((
                    DropReason::SeriesLimit,
                    format!("run {:?} reached max_series_per_run={max_series}; points of further series (first: {series:?}) are dropped", short(run_key)),
                ));
            }
        }
        (!pending.is_empty()).then_some(pending)
    }
}
