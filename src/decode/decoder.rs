//! One exporter's decoding ([`Decoder`]): its prefix, limits and non-finite policy applied to a
//! request [`parse`]d once for the whole pipeline.

use std::sync::Arc;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

use super::model::{short, Decoded, Pending, PointValue, RunInfo, RunPoints};
use super::request::{parse, Parsed, ParsedPoint};
use super::runs::Runs;
use super::settings::{DecodeSettings, NonFinitePolicy, CLAMPED_EVENT};
use crate::fastmap::FastMap;
use crate::names::{self, series_name};
use crate::stats::DropReason;

/// One exporter's decoding of parsed requests ([`parse`]): prefix, `max_runs`,
/// `max_series_per_run`, the non-finite policy, the step of unstepped points and the deltas of
/// unstepped cumulative series. Stateful, one per exporter, because the step given to
/// unstepped points depends on what that exporter has seen.
#[derive(Debug, Default)]
pub struct Decoder {
    settings: DecodeSettings,
    /// The processes it tracks, with their steps and series.
    pub(crate) runs: Runs,
}

impl Decoder {
    /// A decoder with these settings.
    pub fn new(settings: DecodeSettings) -> Self {
        Self { settings, runs: Runs::default() }
    }

    /// [`parse`]s and decodes one request (for a single consumer; a pipeline parses once and
    /// calls [`Decoder::decode_parsed`] per exporter). Never fails: unusable data points are
    /// counted in [`Decoded::dropped`].
    pub fn decode(&mut self, req: &ExportMetricsServiceRequest) -> Decoded {
        let parsed = parse(req, &self.settings);
        self.decode_parsed(&parsed)
    }

    /// Applies this exporter's rules to a parsed request. Its drops include the parse's.
    pub fn decode_parsed(&mut self, parsed: &Parsed) -> Decoded {
        let mut out = Decoded {
            dropped: parsed.outcome.dropped.clone(),
            messages: parsed.outcome.messages.clone(),
            end_errors: parsed.outcome.end_errors.clone(),
            ..Default::default()
        };
        // Where each run's points are in `out.runs`: a request may hold many resources (a
        // linear search per resource made one request of 100 000 runs take minutes).
        let mut index: FastMap<String, usize> = FastMap::default();
        for res in &parsed.resources {
            let run = self.runs.run_info(&self.settings, &res.run);
            // Points of one resource may carry ranks of their own: each rank is a process.
            let mut by_rank: Vec<(Option<i64>, Vec<Pending>)> = Vec::new();
            for p in &res.points {
                let Some(pending) = self.pending(p, &mut out) else { continue };
                let rank = p.rank.or(run.rank);
                match by_rank.iter_mut().find(|(r, _)| *r == rank) {
                    Some((_, v)) => v.push(pending),
                    None => {
                        // Most resources are one process: its points are all of the resource's.
                        let mut points = Vec::with_capacity(if by_rank.is_empty() { res.points.len() } else { 0 });
                        points.push(pending);
                        by_rank.push((rank, points));
                    }
                }
            }
            for (rank, pending) in by_rank {
                let process = match rank {
                    Some(r) => self.runs.with_rank(&self.settings, &run, r),
                    None => Some(run.clone()),
                };
                let Some(process) = process else {
                    out.drop_quiet(DropReason::SeriesLimit, pending.len() as u64);
                    continue;
                };
                let key = process.process_key().into_owned();
                let Some(pending) = self.runs.admit(&self.settings, &key, pending, &mut out) else {
                    continue;
                };
                let points = self.runs.steps_of(&key).assign(&key, pending, &mut out);
                match index.get(&key) {
                    Some(&i) => out.runs[i].points.extend(points),
                    None => {
                        index.insert(key, out.runs.len());
                        out.runs.push(RunPoints { run: process, points });
                    }
                }
            }
            for (rank, end) in &res.ends {
                let process = match rank.or(run.rank) {
                    Some(r) => self.runs.with_rank(&self.settings, &run, r).unwrap_or_else(|| Arc::new(RunInfo { rank: Some(r), ..(*run).clone() })),
                    None => run.clone(),
                };
                out.ends.push((process, *end));
            }
        }
        out
    }

    /// A parsed point under this exporter's non-finite policy and prefix; `None` when the
    /// policy drops it.
    fn pending(&self, p: &ParsedPoint, out: &mut Decoded) -> Option<Pending> {
        let value = match &p.value {
            PointValue::Scalar(v) if !v.is_finite() && self.settings.nonfinite != NonFinitePolicy::Keep => {
                let policy = self.settings.nonfinite;
                if policy == NonFinitePolicy::Clamp && !v.is_nan() {
                    out.event(CLAMPED_EVENT);
                    let limit = self.settings.clamp_limit;
                    PointValue::Scalar(if *v > 0.0 { limit } else { -limit })
                } else {
                    out.drop(DropReason::NonFinite, || format!("metric {:?}: value {v} (nonfinite: {policy:?})", short(&p.metric)));
                    return None;
                }
            }
            v => v.clone(),
        };
        let prefix = self.settings.prefix.as_deref().filter(|p| !p.is_empty());
        let series = match prefix {
            None if p.name.len() <= names::MAX_SERIES_NAME_BYTES => p.name.clone(),
            _ => Arc::from(series_name(prefix, &p.name, &[])),
        };
        Some(Pending {
            metric: p.metric.clone(),
            series,
            step: p.step,
            time_unix_nano: p.time_unix_nano,
            value,
            cumulative: p.cumulative,
            collected: p.collected,
        })
    }
}
