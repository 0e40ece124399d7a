//! The stage between decode and delivery, one per exporter: it applies the exporter's decoding
//! rules to requests parsed once for the whole pipeline ([`Decoder`]), holds its cadence windows
//! ([`Windows`]) and, for an exporter that shows jobs whole, its job view ([`JobView`]).
//! Requests in, batches out: it counts what it drops in the exporter's stats and logs why
//! (rate-limited), and never exports; [`crate::delivery`] wraps it with the queue, the order of
//! batches, retries, the spool and shutdown.

use std::sync::Arc;
use std::time::Instant;

use crate::cadence::{Batch, CadenceSettings, Close, EndStatus, Windows};
use crate::decode::{DecodeSettings, Decoder, Parsed, RunInfo};
use crate::jobs::{JobSettings, JobView};
use crate::rejections::RejectionLog;
use crate::stats::{DropReason, ExporterStats};

/// One exporter's decoding, windows and job view.
#[derive(Debug)]
pub struct Stage {
    /// The exporter's name (in logs).
    name: String,
    decoder: Decoder,
    windows: Windows,
    jobs: Option<JobView>,
    stats: Arc<ExporterStats>,
    /// Unusable data points are logged once per reason, then at most every 10 s with a count.
    rejections: RejectionLog,
}

impl Stage {
    /// A stage for exporter `name`, counting into `stats`; `now` starts the interval cadence.
    pub fn new(
        name: &str,
        decode: DecodeSettings,
        cadence: CadenceSettings,
        jobs: Option<JobSettings>,
        stats: Arc<ExporterStats>,
        now: Instant,
    ) -> Self {
        Self {
            name: name.to_string(),
            decoder: Decoder::new(decode),
            windows: Windows::new(cadence, now),
            jobs: jobs.map(JobView::new),
            stats,
            rejections: RejectionLog::default(),
        }
    }

    /// Takes one parsed request into the windows: its unusable points, and points at or below
    /// a step already written (`late`), identical to ones taken (`duplicate`) or of a resumed
    /// run's old session (`superseded`), are counted as dropped. Returns the runs it had points
    /// for, in request order (the caller tells the exporter and its spool).
    pub fn ingest(&mut self, parsed: &Parsed, now: Instant) -> Vec<Arc<RunInfo>> {
        let decoded = self.decoder.decode_parsed(parsed);
        for (reason, count) in &decoded.dropped {
            self.stats.add_dropped(*reason, *count);
        }
        for (name, count) in &decoded.events {
            self.stats.add_event(name, *count);
        }
        for (reason, message) in &decoded.messages {
            self.rejections.reject(reason.as_str(), &format_args!("exporter {}: {message}", self.name));
        }
        for message in &decoded.end_errors {
            self.rejections.reject("run_end", &format_args!("exporter {}: {message}", self.name));
        }
        let mut runs = Vec::with_capacity(decoded.runs.len());
        for rp in decoded.runs {
            runs.push(rp.run.clone());
            let late = self.windows.push(rp, now);
            if late > 0 {
                self.stats.add_dropped(DropReason::Late, late);
                tracing::debug!(exporter = %self.name, late, "points at or below a step already written");
            }
        }
        for (run, end) in decoded.ends {
            let key = run.process_key().into_owned();
            // A job view ends the job on its first failed rank: the other ranks end with it.
            let job_fails = self.jobs.is_some() && end.status == EndStatus::Failed && run.rank.is_some();
            let others = if job_fails { self.windows.end_job(&run, end, now) } else { Vec::new() };
            if self.windows.end(run, end, now) {
                tracing::info!(exporter = %self.name, run = %key, status = end.status.as_str(), "the trainer ended its run; its open windows are written after the reorder window");
            }
            if !others.is_empty() {
                tracing::info!(exporter = %self.name, run = %key, ranks = others.len(), "a rank failed: the job ends FAILED; every rank's open windows are written with it");
            }
        }
        let duplicates = self.windows.take_duplicates();
        if duplicates > 0 {
            self.stats.add_dropped(DropReason::Duplicate, duplicates);
            tracing::debug!(exporter = %self.name, duplicates, "data points identical to ones already taken (a retried request or a cumulative re-send)");
        }
        let superseded = self.windows.take_superseded();
        if superseded > 0 {
            self.stats.add_dropped(DropReason::Superseded, superseded);
            tracing::info!(exporter = %self.name, superseded, "a run resumed from an earlier step; the old session's points from there on are superseded");
        }
        runs
    }

    /// The batches whose windows `close` allows to close at `now`, through the job view if any
    /// (its drops counted).
    pub fn take_ready(&mut self, now: Instant, close: Close) -> Vec<Batch> {
        let batches = self.windows.take_ready(now, close);
        let Some(jobs) = self.jobs.as_mut() else { return batches };
        let batches = jobs.process(batches, now, close);
        for (reason, n) in jobs.take_dropped() {
            self.stats.add_dropped(reason, n);
        }
        batches
    }

    /// When a window or the job view next can close something without new input.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        let jobs = self.jobs.as_ref().and_then(|j| j.next_due(now));
        match (self.windows.next_due(now), jobs) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Data points held in windows and the job view, as inputs (what `held` reports).
    pub fn pending_inputs(&self) -> u64 {
        self.windows.pending_inputs() + self.jobs.as_ref().map_or(0, JobView::pending_inputs)
    }

    /// Entries held in windows and the job view (what memory admission counts).
    pub fn held_entries(&self) -> u64 {
        self.windows.held_entries() + self.jobs.as_ref().map_or(0, JobView::held_entries)
    }

    /// Entries held in windows alone.
    pub fn window_entries(&self) -> u64 {
        self.windows.held_entries()
    }

    /// Logs the rejection counts the rate limit held back (at shutdown).
    pub fn flush_log(&self) {
        self.rejections.flush();
    }
}
