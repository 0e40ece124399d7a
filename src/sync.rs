//! `trainmetrics sync` and `trainmetrics spool`: deliver, or list, what processes that have ended
//! left in spool directories (as `wandb sync` does for offline runs).
//!
//! A spool root holds one directory per exporter (`<root>/<exporter>`, see
//! [`crate::config::default_spool_root`]); each holds segment files whose header names the
//! exporter's destination (`mlflow <tracking URI without credentials>`, `tensorboard <logdir>`). Both
//! commands read the root itself and every directory directly under it, so `--dir` may name a
//! root or one exporter's directory.
//!
//! Delivery is the library's own: per (directory, destination) one [`Delivery`] with the backend's
//! exporter and that spool, which adopts the segments no live process holds and delivers them in
//! write order, exactly as the next start of the trainer would ([`crate::spool`] "Ownership and
//! replay"); then it is shut down within the timeout with [`RunOutcome::Running`], so run
//! statuses are only what the spooled batches and end records say (a library pipeline that
//! ended while MLflow was unreachable left an end record: its run ends FINISHED or FAILED; a
//! service left none: its runs stay RUNNING, as the service leaves them). What is delivered
//! leaves the spool; what is not stays there, in place, for the next sync.
//!
//! Segments held by a live process (`flock`) are neither read for delivery nor changed: they are
//! listed as skipped. Credentials come as the exporter has them: `MLFLOW_TRACKING_USERNAME` /
//! `MLFLOW_TRACKING_PASSWORD`, `MLFLOW_TRACKING_TOKEN`, or userinfo in `--tracking-uri`; nothing
//! printed here contains them (destinations carry no credentials by construction).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use crate::decode::RunInfo;
use crate::cadence::{EndStatus, Batch};
use crate::delivery::{Delivery, DeliverySettings};
use crate::exporter::mlflow::config::{parse_tracking_uri, MlflowConfig};
use crate::exporter::mlflow::{MlflowExporter, MlflowSettings};
use crate::exporter::tensorboard::{TensorBoardExporter, TensorBoardSettings};
use crate::exporter::{ExportError, Exported, Exporter, RunOutcome};
use crate::retry::RetrySettings;
use crate::spool::{self, ScannedSegment, SpoolError, SpoolSettings, WhenFull};
use crate::stats::{ExporterReport, ExporterStats};

/// Default of `--timeout`: how long one sync delivers before it leaves the rest in the spool.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Which destinations a sync delivers.
#[derive(Clone, PartialEq, Eq)]
pub enum Selection {
    /// The MLflow server at this tracking URI (userinfo `user:password@` allowed: it becomes
    /// Basic auth and is never shown).
    TrackingUri(String),
    /// Every destination found (MLflow and TensorBoard).
    All,
}

impl fmt::Debug for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The URI may carry a password.
            Selection::TrackingUri(u) => match parse_tracking_uri(u) {
                Ok(t) => write!(f, "TrackingUri({})", t.base),
                Err(_) => f.write_str("TrackingUri(<invalid>)"),
            },
            Selection::All => f.write_str("All"),
        }
    }
}

/// Why a sync or a listing could not run at all (a backend that cannot be reached is not an
/// error: it is reported in [`SyncReport`] and its batches stay).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The spool root or one of its directories cannot be read.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// `--tracking-uri` is not a usable MLflow tracking URI (the text never repeats the URI: it
    /// may hold credentials).
    #[error("--tracking-uri {0}")]
    TrackingUri(&'static str),
    /// The OS refused to start a delivery thread.
    #[error("cannot start delivering to {destination}: {source}")]
    Start {
        /// The destination.
        destination: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What waits for one run in one spool directory and destination.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunWaiting {
    /// The run key (trainmetrics' run identity).
    pub key: String,
    /// The run name, if the trainer gave one.
    pub run_name: Option<String>,
    /// Batches with points.
    pub batches: u64,
    /// Points in them (rows MLflow gets; after cadence and aggregation).
    pub points: u64,
    /// Input data points they stand for (what reports count).
    pub data_points: u64,
    /// Bytes their records take on disk (framing included; end records too).
    pub bytes: u64,
    /// The oldest point time, ns since the Unix epoch.
    pub oldest_unix_nano: Option<u64>,
    /// The status an end record says the run's process ended it with.
    pub ended: Option<EndStatus>,
}

/// Segments of one destination in one spool directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestinationWaiting {
    /// The spool directory.
    pub directory: PathBuf,
    /// The destination (`mlflow <uri>`, `tensorboard <logdir>`), without credentials.
    pub destination: String,
    /// The exporter name in the segment headers (informational).
    pub exporter: String,
    /// Segment files no live process holds.
    pub segments: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Bytes after the last readable record of a segment (torn or damaged; not delivered).
    pub corrupt_bytes: u64,
    /// Per run, in order of first appearance.
    pub runs: Vec<RunWaiting>,
}

/// A segment file that is listed but not delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedSegment {
    /// The file.
    pub path: PathBuf,
    /// Its destination, when its header is readable.
    pub destination: Option<String>,
    /// Why it is skipped: `locked by a live process`, `another format version`, …
    pub why: String,
    /// Its size.
    pub bytes: u64,
    /// Batches with points in it (as far as it could be read).
    pub batches: u64,
    /// Points in them.
    pub points: u64,
}

/// What waits in a spool root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The root that was read.
    pub root: PathBuf,
    /// Per directory and destination, what a sync can deliver.
    pub destinations: Vec<DestinationWaiting>,
    /// Segments a sync does not touch (held by a live process, unreadable, other format).
    pub skipped: Vec<SkippedSegment>,
}

impl Listing {
    /// Whether nothing waits (skipped segments aside).
    pub fn is_empty(&self) -> bool {
        self.destinations.is_empty()
    }
}

/// The directories to read under `root`: itself and every directory directly under it (not
/// through symlinks), sorted.
fn directories(root: &Path) -> Result<Vec<PathBuf>, SpoolError> {
    let mut out = vec![root.to_path_buf()];
    let entries = match std::fs::read_dir(root) {
        Ok(it) => it,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => return Err(SpoolError::Io { path: root.to_path_buf(), source }),
    };
    let mut subs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    subs.sort();
    out.extend(subs);
    Ok(out)
}

fn data_batches(seg: &ScannedSegment) -> (u64, u64) {
    let with_points = seg.batches.iter().filter(|(b, _)| !b.points.is_empty());
    with_points.fold((0, 0), |(n, p), (b, _)| (n + 1, p + b.points.len() as u64))
}

/// Lists what waits under `root` (see the module docs for which directories are read). With
/// `only`, only that destination's segments are listed as waiting (others are left out).
///
/// Errors: a directory exists but cannot be listed.
pub fn list(root: &Path, only: Option<&str>) -> Result<Listing, SyncError> {
    let mut listing = Listing { root: root.to_path_buf(), ..Default::default() };
    for dir in directories(root)? {
        let scan = spool::scan(&dir)?;
        for (path, why) in scan.skipped {
            listing.skipped.push(SkippedSegment { path, destination: None, why, bytes: 0, batches: 0, points: 0 });
        }
        let mut by_destination: BTreeMap<String, DestinationWaiting> = BTreeMap::new();
        for seg in scan.segments {
            let destination = seg.header.as_ref().map(|h| h.destination.clone());
            if only.is_some_and(|t| destination.as_deref() != Some(t)) {
                continue;
            }
            let why = match &seg.header {
                _ if seg.locked => Some("locked by a live process"),
                None => Some("no readable header"),
                Some(h) if !seg.adoptable_by(&h.destination) => Some("another format version"),
                Some(_) => None,
            };
            if let Some(why) = why {
                let (batches, points) = data_batches(&seg);
                listing.skipped.push(SkippedSegment { path: seg.path.clone(), destination, why: why.into(), bytes: seg.bytes, batches, points });
                continue;
            }
            let Some(h) = seg.header else { continue };
            let t = by_destination.entry(h.destination.clone()).or_insert_with(|| DestinationWaiting {
                directory: dir.clone(),
                destination: h.destination.clone(),
                exporter: h.exporter.clone(),
                ..Default::default()
            });
            t.segments += 1;
            t.bytes += seg.bytes;
            t.corrupt_bytes += seg.corrupt_bytes;
            for (batch, bytes) in &seg.batches {
                add_batch(&mut t.runs, batch, *bytes);
            }
        }
        listing.destinations.extend(by_destination.into_values());
    }
    Ok(listing)
}

fn add_batch(runs: &mut Vec<RunWaiting>, batch: &Batch, bytes: u64) {
    let i = match runs.iter().position(|r| r.key == batch.run.key) {
        Some(i) => i,
        None => {
            runs.push(RunWaiting { key: batch.run.key.clone(), run_name: batch.run.run_name.clone(), ..Default::default() });
            runs.len() - 1
        }
    };
    let r = &mut runs[i];
    r.bytes += bytes;
    if !batch.points.is_empty() {
        r.batches += 1;
        r.points += batch.points.len() as u64;
        r.data_points += batch.inputs();
    }
    if let Some(t) = batch.points.iter().map(|p| p.time_unix_nano).min() {
        r.oldest_unix_nano = Some(r.oldest_unix_nano.map_or(t, |o| o.min(t)));
    }
    if let Some(e) = batch.ended {
        r.ended = Some(e.status);
    }
}

/// What one sync delivered to one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSynced {
    /// The run key.
    pub key: String,
    /// The run name, if any.
    pub run_name: Option<String>,
    /// Where it went: the MLflow run id, or the TensorBoard run directory.
    pub destination: Option<String>,
    /// Batches with points delivered.
    pub batches: u64,
    /// Points delivered (rows written).
    pub points: u64,
    /// Input data points they stand for.
    pub data_points: u64,
    /// Points the backend refused for good (counted by reason in the report).
    pub refused: u64,
    /// The status the run was ended with from its end record.
    pub ended: Option<EndStatus>,
}

/// One (directory, destination) after a sync.
#[derive(Debug, Clone)]
pub struct TargetSynced {
    /// What waited before.
    pub before: DestinationWaiting,
    /// What was delivered, per run.
    pub runs: Vec<RunSynced>,
    /// The delivery's report (received = replayed data points).
    pub report: ExporterReport,
    /// What stays in the spool for this destination (`None`: nothing).
    pub left: Option<DestinationWaiting>,
}

/// What a sync did.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    /// The root that was read.
    pub root: PathBuf,
    /// What was selected (shown without credentials).
    pub selected: String,
    /// Per directory and destination delivered.
    pub destinations: Vec<TargetSynced>,
    /// Segments not touched (live processes' and unreadable ones), of the selected destinations.
    pub skipped: Vec<SkippedSegment>,
    /// Destinations found but not selected (`--tracking-uri` names another one).
    pub not_selected: Vec<String>,
}

impl SyncReport {
    /// Whether batches of the selected destinations stay in the spool (the command then exits
    /// non-zero).
    pub fn anything_left(&self) -> bool {
        self.destinations.iter().any(|t| t.left.is_some())
    }
}

/// Counts, per run, what the wrapped exporter delivered.
struct Counting<E> {
    inner: E,
    runs: Arc<Mutex<Vec<RunSynced>>>,
}

impl<E: Exporter> Exporter for Counting<E> {
    fn export(&mut self, batch: &Batch, timeout: Duration) -> Result<Exported, ExportError> {
        let result = self.inner.export(batch, timeout);
        if let (Ok(exported), Ok(mut runs)) = (&result, self.runs.lock()) {
            let i = match runs.iter().position(|r| r.key == batch.run.key) {
                Some(i) => i,
                None => {
                    runs.push(RunSynced { key: batch.run.key.clone(), run_name: batch.run.run_name.clone(), ..Default::default() });
                    runs.len() - 1
                }
            };
            let r = &mut runs[i];
            if !batch.points.is_empty() {
                let refused_inputs: u64 = exported.refused.iter().filter_map(|(j, _)| batch.points.get(*j)).map(|p| p.inputs).sum();
                r.batches += 1;
                r.points += (batch.points.len() - exported.refused.len()) as u64;
                r.data_points += batch.inputs() - refused_inputs;
                r.refused += exported.refused.len() as u64;
            }
            if let Some(e) = batch.ended {
                r.ended = Some(e.status);
            }
        }
        result
    }

    fn end_runs(&mut self, outcome: RunOutcome, timeout: Duration) -> Result<(), ExportError> {
        self.inner.end_runs(outcome, timeout)
    }

    fn observe_run(&mut self, run: &RunInfo) {
        self.inner.observe_run(run);
    }

    fn attach_stats(&mut self, stats: Arc<ExporterStats>) {
        self.inner.attach_stats(stats);
    }
}

/// The MLflow destination string of a tracking URI (`mlflow <base>`), as exporters write it.
///
/// Errors: the URI is not a usable tracking URI.
pub fn mlflow_destination(uri: &str) -> Result<String, SyncError> {
    parse_tracking_uri(uri).map(|t| format!("mlflow {}", t.base)).map_err(SyncError::TrackingUri)
}

/// Delivers the selected destinations' spooled batches under `root` within `timeout` per destination (see
/// the module docs). A backend that cannot be reached leaves its batches where they are.
///
/// Errors: a spool directory cannot be read, `--tracking-uri` is invalid, or a thread cannot
/// be started.
pub fn sync(root: &Path, selection: &Selection, timeout: Duration) -> Result<SyncReport, SyncError> {
    let only = match selection {
        Selection::TrackingUri(uri) => Some(mlflow_destination(uri)?),
        Selection::All => None,
    };
    let everything = list(root, None)?;
    let listing = list(root, only.as_deref())?;
    let mut report = SyncReport {
        root: root.to_path_buf(),
        selected: only.clone().unwrap_or_else(|| "all destinations".into()),
        skipped: listing.skipped.clone(),
        ..Default::default()
    };
    for t in &everything.destinations {
        if only.as_deref().is_some_and(|o| o != t.destination) && !report.not_selected.contains(&t.destination) {
            report.not_selected.push(t.destination.clone());
        }
    }
    for before in listing.destinations {
        report.destinations.push(sync_target(before, selection, timeout)?);
    }
    Ok(report)
}

fn sync_target(before: DestinationWaiting, selection: &Selection, timeout: Duration) -> Result<TargetSynced, SyncError> {
    let runs = Arc::new(Mutex::new(Vec::new()));
    let per_call = timeout.min(Duration::from_secs(10));
    let settings = DeliverySettings {
        timeout: per_call,
        retry: RetrySettings { enabled: true, initial_interval: Duration::from_millis(500), max_interval: Duration::from_secs(5), max_elapsed_time: timeout },
        spool: Some(SpoolSettings {
            directory: before.directory.clone(),
            // Replay appends nothing; the limit only applies to appends.
            max_bytes: 1 << 50,
            when_full: WhenFull::DropNewest,
            fsync: true,
            destination: before.destination.clone(),
        }),
        ..Default::default()
    };
    let name = if before.exporter.is_empty() { "sync".to_string() } else { before.exporter.clone() };
    let start_err = |source| SyncError::Start { destination: before.destination.clone(), source };
    enum Dest {
        Mlflow(crate::exporter::mlflow::exporter::RunIds),
        TensorBoard(crate::exporter::tensorboard::exporter::RunDirs),
    }
    let (delivery, dest) = if let Some(base) = before.destination.strip_prefix("mlflow ") {
        let exporter = MlflowExporter::new(mlflow_settings(base, selection)?);
        let ids = exporter.run_ids();
        (Delivery::start(&name, Counting { inner: exporter, runs: runs.clone() }, settings).map_err(start_err)?, Dest::Mlflow(ids))
    } else if let Some(logdir) = before.destination.strip_prefix("tensorboard ") {
        let exporter = TensorBoardExporter::new(TensorBoardSettings { logdir: PathBuf::from(logdir) });
        let dirs = exporter.run_dirs();
        (Delivery::start(&name, Counting { inner: exporter, runs: runs.clone() }, settings).map_err(start_err)?, Dest::TensorBoard(dirs))
    } else {
        // A destination this version cannot deliver to: listed as left, untouched.
        let report = ExporterReport { name, ..Default::default() };
        return Ok(TargetSynced { left: Some(before.clone()), before, runs: Vec::new(), report });
    };
    let report = delivery.shutdown(RunOutcome::Running, timeout);
    drop(delivery);
    let mut runs = runs.lock().map(|r| r.clone()).unwrap_or_default();
    for r in &mut runs {
        r.destination = match &dest {
            Dest::Mlflow(ids) => ids.lock().ok().and_then(|m| m.get(&r.key).map(|x| x.run_id.clone())),
            Dest::TensorBoard(dirs) => dirs.lock().ok().and_then(|m| m.get(&r.key).map(|p| p.display().to_string())),
        };
    }
    let after = list(&before.directory, Some(&before.destination))?;
    // Only this directory's own segments: `list` also reads directories under it.
    let left = after.destinations.into_iter().find(|t| t.directory == before.directory);
    Ok(TargetSynced { before, runs, report, left })
}

/// The exporter's MLflow settings for a destination's base URI: credentials from `--tracking-uri`
/// when it names this server, else from the environment, as the exporter reads them. A
/// configured `MLFLOW_RUN_ID` is not used: spooled runs go to their own MLflow runs.
fn mlflow_settings(base: &str, selection: &Selection) -> Result<MlflowSettings, SyncError> {
    let uri = match selection {
        Selection::TrackingUri(u) if mlflow_destination(u)? == format!("mlflow {base}") => u.clone(),
        _ => base.to_string(),
    };
    let config = MlflowConfig { tracking_uri: Some(uri), ..Default::default() };
    let mut problems = crate::problems::Problems::default();
    let mut settings = config.settings("sync", &mut problems);
    settings.run_id = None;
    Ok(settings)
}

fn rfc3339(unix_nano: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_nanos(unix_nano)).to_string()
}

fn run_label(key: &str, name: Option<&str>) -> String {
    match name.filter(|n| !n.is_empty()) {
        Some(n) if n != key => format!("run {n:?} (key {key:?})"),
        _ => format!("run {key:?}"),
    }
}

fn fmt_waiting(f: &mut fmt::Formatter<'_>, t: &DestinationWaiting) -> fmt::Result {
    writeln!(f, "{} ({}): {} segment(s), {} bytes", t.directory.display(), t.destination, t.segments, t.bytes)?;
    for r in &t.runs {
        write!(f, "  {}: {} batches, {} points", run_label(&r.key, r.run_name.as_deref()), r.batches, r.points)?;
        if r.data_points != r.points {
            write!(f, " ({} data points)", r.data_points)?;
        }
        write!(f, ", {} bytes", r.bytes)?;
        if let Some(t) = r.oldest_unix_nano {
            write!(f, ", oldest {}", rfc3339(t))?;
        }
        if let Some(e) = r.ended {
            write!(f, ", then ends {}", e.as_str())?;
        }
        writeln!(f)?;
    }
    if t.corrupt_bytes > 0 {
        writeln!(f, "  {} bytes of torn or damaged records (not delivered)", t.corrupt_bytes)?;
    }
    Ok(())
}

fn fmt_skipped(f: &mut fmt::Formatter<'_>, skipped: &[SkippedSegment]) -> fmt::Result {
    for s in skipped {
        write!(f, "skipped {}: {}", s.path.display(), s.why)?;
        if let Some(t) = &s.destination {
            write!(f, " ({t}, {} batches, {} points, {} bytes)", s.batches, s.points, s.bytes)?;
        }
        writeln!(f)?;
    }
    Ok(())
}

/// The `trainmetrics spool` / `sync --dry-run` text: per directory and destination, per run:
/// batches, points, bytes, oldest point time; then skipped segments.
impl fmt::Display for Listing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.destinations.is_empty() {
            writeln!(f, "nothing waits in {}", self.root.display())?;
        }
        for t in &self.destinations {
            fmt_waiting(f, t)?;
        }
        fmt_skipped(f, &self.skipped)
    }
}

/// The `trainmetrics sync` text: per destination, per run what was delivered and where; what stays.
impl fmt::Display for SyncReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.destinations.is_empty() {
            writeln!(f, "nothing to sync for {} in {}: nothing delivered", self.selected, self.root.display())?;
        }
        for t in &self.destinations {
            writeln!(f, "{} ({}):", t.before.directory.display(), t.before.destination)?;
            for r in &t.runs {
                write!(f, "  {}", run_label(&r.key, r.run_name.as_deref()))?;
                if let Some(d) = &r.destination {
                    let what = if t.before.destination.starts_with("mlflow ") { "MLflow run" } else { "run directory" };
                    write!(f, " -> {what} {d}")?;
                }
                write!(f, ": delivered {} points in {} batches", r.points, r.batches)?;
                if r.data_points != r.points {
                    write!(f, " ({} data points)", r.data_points)?;
                }
                if r.refused > 0 {
                    write!(f, ", {} refused", r.refused)?;
                }
                if let Some(e) = r.ended {
                    write!(f, ", ended {}", e.as_str())?;
                }
                writeln!(f)?;
            }
            let delivered_points: u64 = t.runs.iter().map(|r| r.points).sum();
            let delivered_batches: u64 = t.runs.iter().map(|r| r.batches).sum();
            writeln!(f, "  delivered {delivered_points} points in {delivered_batches} batches of {} run(s)", t.runs.len())?;
            match &t.left {
                None => writeln!(f, "  nothing left")?,
                Some(left) => {
                    let batches: u64 = left.runs.iter().map(|r| r.batches).sum();
                    let points: u64 = left.runs.iter().map(|r| r.points).sum();
                    write!(f, "  NOT DELIVERED: {batches} batches, {points} points stay in {} ({} bytes)", left.directory.display(), left.bytes)?;
                    match &t.report.last_error {
                        Some(e) => writeln!(f, "; last error: {e}")?,
                        None => writeln!(f)?,
                    }
                }
            }
        }
        fmt_skipped(f, &self.skipped)?;
        for t in &self.not_selected {
            writeln!(f, "also waiting, not selected: {t} (use --all or --tracking-uri)")?;
        }
        Ok(())
    }
}
