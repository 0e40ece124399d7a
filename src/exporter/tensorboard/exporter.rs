//! The TensorBoard exporter: owns the run directories under the logdir and one event file per
//! run and process session, written append-only.
//!
//! Rules (sources: TensorBoard's `event_file_writer.py`, `directory_watcher.py`, RustBoard's
//! `run.rs`/`reservoir.rs`; see `../shared/reference/tensorboard-event-files.md`):
//! - Files live in `<logdir>/<run dir>/`. The run dir starts from [`run_dir_name`] of the run name
//!   (else its key), a single path component, so no run name can write outside the logdir.
//! - A run claims its directory with a marker file [`RUN_MARKER`] holding its run key (TensorBoard
//!   ignores it: its name lacks `tfevents`). Two runs of the same name (two trainers started in
//!   the same second, a re-run with a fixed `run_name`) must not share a directory: TensorBoard
//!   would show one run, purging the other's points by step. A run uses `<name>` if that
//!   directory does not exist, or its marker holds this run's key, or it exists with neither a
//!   marker nor any `*tfevents*` file; otherwise `<name>~<8 hex digits of fnv1a32(run key)>` by
//!   the same rule, then the hash of `<key>#1`, `<key>#2`… (at most [`MAX_DIR_CANDIDATES`] names
//!   in all). The same run key (a resumed run) therefore finds the same directory again. The
//!   marker is created exclusively, so of two processes claiming a directory at once one wins.
//!   The choice is made on a run's first write, once per exporter, and published in
//!   [`TensorBoardExporter::run_dirs`].
//! - Files are named `events.out.tfevents.<unix secs, 10 digits>.<host>.<pid>.<counter, 6
//!   digits>`, so that lexicographic order is creation order, which both TensorBoard loaders
//!   rely on.
//! - A file is created on the first write (nothing is created for a run that sends nothing). It
//!   starts with a `file_version` event (`brain.Event:2`); the first step written in this process
//!   session is preceded by a `SessionLog START` at that step, then the run's params as an
//!   hparams `session_start_info`.
//! - Scalars are rank-0 DT_FLOAT tensors with the `scalars` plugin's metadata on the first value
//!   of each tag in each file (both loaders read this; RustBoard drops DT_DOUBLE scalars), so
//!   values are stored as float32. Histograms are `[k, 3]` tensors of the `histograms` plugin.
//! - At most [`MAX_OPEN_FILES`] files are open at once (thousands of runs would exhaust the
//!   process's file descriptors); opening another closes the least recently used. A closed file
//!   is reopened in append mode and continues as the same file (no new metadata).
//! - Every export is written with one `write_all` and flushed to the OS: a crash of the process
//!   loses nothing that was exported; every file written to is fsynced when the runs end.
//! - A step at or below one already written for a tag is refused (`late`): RustBoard would
//!   discard every newer point of that tag.
//! - An I/O error (read-only logdir, full disk, removed directory) is returned as retryable,
//!   with the path; [`crate::delivery`] retries on its backoff, logs a warning when a run starts
//!   failing and an info when it recovers, and the report shows the last error. A write that
//!   failed part-way (a full disk) is cut back to the file's previous length, so the file never
//!   ends in a partial record and goes on; if the cut fails, the file is abandoned and never
//!   reopened, and the retry starts a new one. A file this export created held nothing else and
//!   is removed. After an error opening a file, the retry also claims the run's directory again
//!   (it may have been removed).
//! - Nothing is written through a symlink: a run directory candidate that is a symlink, or whose
//!   marker is a symlink, counts as taken (the run gets the next name, with a warning); event files are created exclusively, and an existing one (or its directory) that
//!   has become a symlink is refused with an error.
//! - Ranks of a distributed job ([`RunInfo::rank`]) share the job's run directory, claimed by the
//!   run key as above, and each writes its own event files in `<run dir>/rank-<N>`
//!   ([`rank_dir_name`]), which TensorBoard shows as the run `<run dir>/rank-<N>`: every rank's
//!   curve is whole, and a rank's steps never look like a resume of another's.
//! - A batch that ends its run ([`Batch::ended`]: the trainer's run-end gauge) has its event
//!   file synced and closed after its points are written.
//! - A resumed run ([`Batch::resumed_at`]: a trainer restarted from a checkpoint at step S
//!   while this exporter ran on) starts a new event file whose session begins with a
//!   `SessionLog START` at S: TensorBoard's Python loader purges the run's points at S and above
//!   on it, and RustBoard drops a tag's points from a step that goes back. Each tag accepts
//!   steps from S on again.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;

use super::config::TensorBoardSettings;
use super::encoder::{self, HParamValue};
use super::record::{append_record, append_record_with};
use crate::decode::RunInfo;
use crate::cadence::{Batch, OutPoint};
use crate::exporter::{ExportError, Exported, Exporter, RunOutcome};
use crate::fastmap::FastMap;
use crate::names::{fnv1a32, run_dir_name};
use crate::stats::DropReason;

/// Most event files one exporter holds open at once (see the module docs).
pub const MAX_OPEN_FILES: usize = 64;

/// Name of the file in a run directory that holds the key of the run owning it.
pub const RUN_MARKER: &str = ".trainmetrics-run";

/// How many directory names a run tries before giving up (the plain name, then hash suffixes);
/// more than two are only needed if someone creates colliding names on purpose.
pub const MAX_DIR_CANDIDATES: u32 = 8;

/// Run key → the directory the run writes to, filled as runs claim theirs; readable from other
/// threads (so a trainer can print where its run is).
pub type RunDirs = Arc<Mutex<BTreeMap<String, PathBuf>>>;

/// Distinguishes files one process opens within the same second.
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Default)]
struct RunFile {
    /// The claimed run directory; `None` until the first write, or after an error opening a file.
    dir: Option<PathBuf>,
    /// The current event file (open or not); `None` makes the next write start a new one.
    path: Option<PathBuf>,
    /// Every tag written in the run, with its last step and the file that has its metadata.
    tags: FastMap<Arc<str>, Tag>,
    /// The number of the current event file among the run's files (see [`Tag::file`]).
    file: u64,
    session_started: bool,
    /// Written to since the last fsync.
    unsynced: bool,
    /// The resume step last handled (see [`Batch::resumed_at`]), so a retried batch does not
    /// start yet another session.
    resumed_at: Option<i64>,
}

/// One tag of a run (one map entry per tag: this is most of the exporter's memory per series).
#[derive(Debug, Clone, Copy)]
struct Tag {
    /// The last step written.
    written: i64,
    /// [`RunFile::file`] of the event file whose first record of the tag carries its metadata:
    /// another number means the current file has not had it yet.
    file: u64,
}

/// The open event files by run key, closed least recently used first beyond [`MAX_OPEN_FILES`].
#[derive(Debug, Default)]
struct OpenFiles {
    files: HashMap<String, (File, u64)>,
    by_use: BTreeMap<u64, String>,
    clock: u64,
}

/// What one export will write, and what it changes in the run's state once it is written: only
/// this export's tags and steps, so an export costs its points, not the run's series.
struct Pending<'a> {
    buf: Vec<u8>,
    refused: Vec<(usize, DropReason)>,
    /// The tags this export touches, each resolved once against the run's state.
    slots: Slots<'a>,
    session_started: bool,
}

/// One tag as an export sees it: its state before the export, then what the export wrote.
struct Slot<'a> {
    tag: &'a Arc<str>,
    /// The last step written (by earlier exports, then by this one).
    written: Option<i64>,
    /// The current file has had the tag's metadata (or this export writes it).
    in_file: bool,
    /// This export writes the tag's metadata.
    first_here: bool,
    /// This export writes a point of the tag.
    touched: bool,
}

/// The tags of one export, each resolved once against the run's state. A batch is ordered by
/// (step, tag) with each pair once, so a batch of one step (most exports) names each tag once
/// and needs no index; a longer batch finds a tag's slot by name.
struct Slots<'a> {
    by_name: Option<FastMap<&'a str, usize>>,
    list: Vec<Slot<'a>>,
}

impl<'a> Slots<'a> {
    fn new(points: &[OutPoint]) -> Self {
        let one_step = points.first().map(|p| p.step) == points.last().map(|p| p.step);
        Slots { by_name: (!one_step).then(FastMap::default), list: Vec::new() }
    }

    /// The slot of `tag`, resolved against run state `rf` the first time.
    fn get(&mut self, tag: &'a Arc<str>, rf: &RunFile) -> &mut Slot<'a> {
        let known = self.by_name.as_ref().and_then(|m| m.get(&**tag).copied());
        let i = match known {
            Some(i) => i,
            None => {
                let state = rf.tags.get(&**tag);
                let in_file = rf.path.is_some() && state.is_some_and(|t| t.file == rf.file);
                self.list.push(Slot { tag, written: state.map(|t| t.written), in_file, first_here: false, touched: false });
                let i = self.list.len() - 1;
                if let Some(m) = self.by_name.as_mut() {
                    m.insert(&**tag, i);
                }
                i
            }
        };
        &mut self.list[i]
    }
}

/// Writes TensorBoard event files. See the module docs.
#[derive(Debug)]
pub struct TensorBoardExporter {
    settings: TensorBoardSettings,
    runs: FastMap<String, RunFile>,
    open: OpenFiles,
    run_dirs: RunDirs,
    /// The params each run first arrived with (what hparams shows, as MLflow keeps the first).
    params: HashMap<String, BTreeMap<String, String>>,
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Host name safe for a file name (no separators), as TensorBoard's writer puts it in the name.
fn host_for_file_name() -> String {
    let h = gethostname::gethostname().to_string_lossy().into_owned();
    let h: String = h.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
    if h.is_empty() {
        "localhost".into()
    } else {
        h
    }
}

fn new_file_name() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!(
        "events.out.tfevents.{secs:010}.{}.{}.{:06}",
        host_for_file_name(),
        std::process::id(),
        FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Turns a param's text into the hparams plugin's typed value (number, bool, else text).
fn hparam_value(text: &str) -> HParamValue {
    match text {
        "true" | "True" => HParamValue::Bool(true),
        "false" | "False" => HParamValue::Bool(false),
        _ => match text.parse::<f64>() {
            Ok(v) if v.is_finite() => HParamValue::Number(v),
            _ => HParamValue::Text(text.to_string()),
        },
    }
}

fn io_error(doing: &str, path: &Path, e: io::Error) -> ExportError {
    ExportError::Retryable { message: format!("{doing} {}: {e}", path.display()), retry_after: None }
}

/// The `attempt`-th directory name a run tries (see the module docs). Stays one path component
/// of at most 209 bytes, as `name` is one of at most 200.
fn candidate_dir_name(name: &str, key: &str, attempt: u32) -> String {
    match attempt {
        0 => name.to_string(),
        1 => format!("{name}~{:08x}", fnv1a32(key)),
        n => format!("{name}~{:08x}", fnv1a32(&format!("{key}#{}", n - 1))),
    }
}

/// Chooses and claims the directory of run `key` named after `name`, by the module docs' rule.
fn claim_run_dir(logdir: &Path, name: &str, key: &str) -> Result<PathBuf, ExportError> {
    for attempt in 0..MAX_DIR_CANDIDATES {
        let dir = logdir.join(candidate_dir_name(name, key, attempt));
        if claim(&dir, key)? {
            return Ok(dir);
        }
    }
    Err(ExportError::Retryable {
        message: format!("no free run directory for {name:?} in {}: {MAX_DIR_CANDIDATES} names taken", logdir.display()),
        retry_after: None,
    })
}

/// Whether `path` is a symlink (it could point outside the logdir: never written through).
fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Whether `dir` is run `key`'s, claiming it (creating it and its marker) when it is free. A
/// candidate that is a symlink, or whose marker is a symlink, is never written through: it
/// counts as taken (logged), so the run uses the next name.
fn claim(dir: &Path, key: &str) -> Result<bool, ExportError> {
    let marker = dir.join(RUN_MARKER);
    if is_symlink(dir) || is_symlink(&marker) {
        tracing::warn!(dir = %dir.display(), "run directory candidate (or its marker) is a symlink: not writing through it");
        return Ok(false);
    }
    std::fs::create_dir_all(dir).map_err(|e| io_error("creating", dir, e))?;
    // Checked again: something may have been planted between the look and the creation.
    if is_symlink(dir) {
        return Ok(false);
    }
    if let Some(owner) = read_marker(&marker)? {
        return Ok(owner == key.as_bytes());
    }
    if has_event_files(dir)? {
        return Ok(false);
    }
    match OpenOptions::new().write(true).create_new(true).open(&marker) {
        Ok(mut f) => match f.write_all(key.as_bytes()) {
            Ok(()) => Ok(true),
            Err(e) => {
                // A marker without the full key would keep this run out of its own directory.
                drop(f);
                let _ = std::fs::remove_file(&marker);
                Err(io_error("writing", &marker, e))
            }
        },
        // Another process claimed it between our look and our claim: its marker decides.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Ok(read_marker(&marker)?.is_some_and(|owner| owner == key.as_bytes()))
        }
        Err(e) => Err(io_error("creating", &marker, e)),
    }
}

/// The marker's content, `None` if there is none.
fn read_marker(marker: &Path) -> Result<Option<Vec<u8>>, ExportError> {
    match std::fs::read(marker) {
        Ok(owner) => Ok(Some(owner)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("reading", marker, e)),
    }
}

/// Whether `dir` directly holds a file TensorBoard reads (a run of some other writer, or ours
/// from before markers existed).
fn has_event_files(dir: &Path) -> Result<bool, ExportError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("listing", dir, e))?;
        if entry.file_name().to_string_lossy().contains("tfevents") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Opens an event file for appending: a new one (`create`), else the run's current file, which
/// must still exist (recreating it would give a file without `file_version` and metadata). A
/// new file is created exclusively (`O_EXCL` never follows a symlink); an existing one, or its
/// directory, that has become a symlink is refused.
fn open_event_file(path: &Path, create: bool) -> io::Result<File> {
    let dir_is_link = path.parent().is_some_and(is_symlink);
    if dir_is_link || (!create && is_symlink(path)) {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "refusing to write through a symlink"));
    }
    OpenOptions::new().append(true).create_new(create).open(path)
}

#[cfg(test)]
thread_local! {
    /// Bytes the simulated disk still takes (tests of a full disk); `None` is unlimited.
    static DISK_LEFT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Writes `buf` in one `write_all` and flushes it to the OS.
fn write_flushed(f: &mut File, buf: &[u8]) -> io::Result<()> {
    #[cfg(test)]
    if let Some(left) = DISK_LEFT.get() {
        let n = left.min(buf.len());
        DISK_LEFT.set(Some(left - n));
        if n < buf.len() {
            f.write_all(&buf[..n])?;
            return Err(io::Error::new(io::ErrorKind::StorageFull, "simulated full disk"));
        }
    }
    f.write_all(buf)?;
    f.flush()
}

impl OpenFiles {
    /// The open file of run `key`, opened with `open` (after closing the least recently used
    /// file if [`MAX_OPEN_FILES`] are open) if it is not open.
    fn get_or_open(&mut self, key: &str, open: impl FnOnce() -> io::Result<File>) -> io::Result<&mut File> {
        if !self.files.contains_key(key) {
            while self.files.len() >= MAX_OPEN_FILES && self.close_lru() {}
        }
        self.clock += 1;
        let (file, used) = match self.files.entry(key.to_string()) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert((open()?, 0)),
        };
        self.by_use.remove(used);
        *used = self.clock;
        self.by_use.insert(self.clock, key.to_string());
        Ok(file)
    }

    /// Closes run `key`'s file, if open, returning it. Every write was already flushed to the OS,
    /// so dropping the returned file loses nothing.
    fn close(&mut self, key: &str) -> Option<File> {
        let (file, used) = self.files.remove(key)?;
        self.by_use.remove(&used);
        Some(file)
    }

    /// Closes the least recently used file; false if none is open.
    fn close_lru(&mut self) -> bool {
        let Some((_, key)) = self.by_use.pop_first() else { return false };
        self.files.remove(&key);
        true
    }
}

impl TensorBoardExporter {
    /// An exporter writing under `settings.logdir`. Nothing touches the disk until the first
    /// export.
    pub fn new(settings: TensorBoardSettings) -> Self {
        Self {
            settings,
            runs: FastMap::default(),
            open: OpenFiles::default(),
            run_dirs: RunDirs::default(),
            params: HashMap::new(),
        }
    }

    /// The directory a run writes to: the one it claimed, or before its first write the first
    /// it will try (`<logdir>/<run dir name>`; see the module docs).
    pub fn run_dir(&self, run: &RunInfo) -> PathBuf {
        match self.runs.get(run.process_key().as_ref()).and_then(|rf| rf.dir.clone()) {
            Some(dir) => dir,
            None => {
                let dir = self.settings.logdir.join(run_dir_name(run.display_name()));
                match run.rank {
                    Some(r) => dir.join(rank_dir_name(r)),
                    None => dir,
                }
            }
        }
    }

    /// A shared view of the directories this exporter's runs claimed (see [`RunDirs`]).
    pub fn run_dirs(&self) -> RunDirs {
        self.run_dirs.clone()
    }

    /// How many event files are open now (at most [`MAX_OPEN_FILES`]).
    pub fn open_files(&self) -> usize {
        self.open.files.len()
    }

    /// The run's claimed directory, claiming one on first use.
    fn claimed_dir(&mut self, run: &RunInfo) -> Result<PathBuf, ExportError> {
        let key = run.process_key();
        if let Some(dir) = self.runs.get(key.as_ref()).and_then(|rf| rf.dir.clone()) {
            return Ok(dir);
        }
        let name = run_dir_name(run.display_name());
        // The ranks of a job share the job's directory (claimed by the job's key), each in a
        // directory of its own inside it.
        let mut dir = claim_run_dir(&self.settings.logdir, &name, &run.key)?;
        if dir.file_name().is_some_and(|n| n != name.as_str()) {
            tracing::info!(run = %run.key, dir = %dir.display(), "run name taken by another run; using a suffixed directory");
        }
        if let Some(rank) = run.rank {
            dir = dir.join(rank_dir_name(rank));
            if is_symlink(&dir) {
                return Err(ExportError::Retryable { message: format!("{} is a symlink; not written through", dir.display()), retry_after: None });
            }
            std::fs::create_dir_all(&dir).map_err(|e| io_error("creating", &dir, e))?;
        }
        self.runs.entry(key.to_string()).or_default().dir = Some(dir.clone());
        if let Ok(mut dirs) = self.run_dirs.lock() {
            dirs.insert(key.into_owned(), dir.clone());
        }
        Ok(dir)
    }

    /// Syncs and closes the event file of the process `key` (its run ended): the next write
    /// of that process appends to the same file.
    fn close_run(&mut self, key: &str) -> Result<(), ExportError> {
        let Some(rf) = self.runs.get_mut(key) else { return Ok(()) };
        let open = self.open.close(key);
        let Some(path) = rf.path.as_ref().filter(|_| rf.unsynced) else { return Ok(()) };
        let synced = match open {
            Some(f) => f.sync_all(),
            None => open_event_file(path, false).and_then(|f| f.sync_all()),
        };
        synced.map_err(|e| io_error("syncing", path, e))?;
        rf.unsynced = false;
        Ok(())
    }

    /// Appends `buf` to the run's current file, or to a new one in its directory. On error the
    /// file is abandoned (and removed if this call created it).
    fn write(&mut self, run: &RunInfo, buf: &[u8]) -> Result<(), ExportError> {
        let dir = self.claimed_dir(run)?;
        let key = run.process_key();
        let rf = self.runs.entry(key.to_string()).or_default();
        let created = rf.path.is_none();
        let path = rf.path.take().unwrap_or_else(|| dir.join(new_file_name()));
        let file = match self.open.get_or_open(&key, || open_event_file(&path, created)) {
            Ok(f) => f,
            Err(e) => {
                rf.dir = None;
                return Err(io_error("opening", &path, e));
            }
        };
        let len_before = if created { 0 } else { file.metadata().map(|m| m.len()).unwrap_or(u64::MAX) };
        if let Err(e) = write_flushed(file, buf) {
            // A partial record would end the file for every reader: cut it off, and the file
            // goes on (a full disk still lets a file shrink). If that fails, it is abandoned.
            let cut = !created && len_before != u64::MAX && file.set_len(len_before).is_ok();
            drop(self.open.close(&key));
            if cut {
                rf.path = Some(path.clone());
            }
            if created {
                if let Err(re) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %re, "could not remove a failed event file");
                }
            }
            return Err(io_error("writing", &path, e));
        }
        rf.path = Some(path);
        rf.unsynced = true;
        Ok(())
    }

    /// Fsyncs every file written to since its last sync, closing the open ones; the first error.
    fn sync_files(&mut self) -> Option<String> {
        let mut first_error = None;
        for (key, rf) in self.runs.iter_mut() {
            let open = self.open.close(key);
            let Some(path) = rf.path.as_ref().filter(|_| rf.unsynced) else { continue };
            let synced = match open {
                Some(f) => f.sync_all(),
                None => open_event_file(path, false).and_then(|f| f.sync_all()),
            };
            match synced {
                Ok(()) => rf.unsynced = false,
                Err(e) => {
                    first_error.get_or_insert_with(|| format!("syncing {}: {e}", path.display()));
                }
            }
        }
        first_error
    }
}

/// Encodes `points` (of `run`, at indices from `base` of their batch) not yet written for run
/// state `rf`, refusing late ones. A session that starts here starts at `start_at` if given
/// (a resume), else at the first step written.
fn encode<'a>(run: &RunInfo, points: &'a [OutPoint], base: usize, start_at: Option<i64>, rf: &RunFile, params: &BTreeMap<String, String>) -> Pending<'a> {
    let new_file = rf.path.is_none();
    let mut p = Pending {
        buf: Vec::new(),
        refused: Vec::new(),
        // What the export writes per tag; committed only after the write succeeds.
        slots: Slots::new(points),
        session_started: rf.session_started,
    };
    if new_file {
        append_record(&mut p.buf, &encoder::file_version_event(now_secs()).encode_to_vec());
    }
    let mut i = 0;
    while i < points.len() {
        i = encode_step(run, points, base, i, start_at, params, rf, &mut p);
    }
    p
}

/// Encodes the points of the step starting at index `i` as one event; returns the next step's
/// index. `rf` is the run's state before this export (a new file's tags start over).
// The export's inputs one by one: the step loop reads them while it writes only `p`.
#[allow(clippy::too_many_arguments)]
fn encode_step<'a>(
    run: &RunInfo,
    points: &'a [OutPoint],
    base: usize,
    i: usize,
    start_at: Option<i64>,
    params: &BTreeMap<String, String>,
    rf: &RunFile,
    p: &mut Pending<'a>,
) -> usize {
    let step = points[i].step;
    let mut j = i;
    // Scalars are encoded straight into the buffer; a step with a histogram goes through the
    // messages (its order kept).
    let mut scalars: Vec<encoder::Scalar<'_>> = Vec::new();
    let mut values = Vec::new();
    let mut time = 0u64;
    while j < points.len() && points[j].step == step {
        let pt = &points[j];
        let slot = p.slots.get(&pt.series, rf);
        if slot.written.is_some_and(|w| step <= w) {
            p.refused.push((base + j, DropReason::Late));
        } else {
            slot.written = Some(step);
            slot.touched = true;
            let first = !slot.in_file;
            if first {
                slot.in_file = true;
                slot.first_here = true;
            }
            match &pt.histogram {
                None if values.is_empty() => scalars.push((&*pt.series, pt.scalar as f32, first)),
                None => values.push(encoder::scalar_value(&pt.series, pt.scalar as f32, first)),
                Some(h) => {
                    values.extend(scalars.drain(..).map(|(tag, v, first)| encoder::scalar_value(tag, v, first)));
                    values.push(encoder::histogram_value(&pt.series, h.count, h.sum, h.min, h.max, &h.bounds, &h.counts, first));
                }
            }
            time = time.max(pt.time_unix_nano);
        }
        j += 1;
    }
    if values.is_empty() && scalars.is_empty() {
        return j;
    }
    // A wall time of NaN makes RustBoard abandon the whole file; ours is always finite.
    let wall = if time == 0 { now_secs() } else { time as f64 / 1e9 };
    if !p.session_started {
        p.session_started = true;
        append_record(&mut p.buf, &encoder::session_start_event(wall, start_at.unwrap_or(step).min(step)).encode_to_vec());
        if !params.is_empty() {
            let hp: Vec<(String, HParamValue)> = params.iter().map(|(k, v)| (k.clone(), hparam_value(v))).collect();
            let v = encoder::hparams_value(&hp, run.display_name(), wall);
            append_record(&mut p.buf, &encoder::summary_event(wall, step, vec![v]).encode_to_vec());
        }
    }
    if values.is_empty() {
        let event = encoder::ScalarEvent { wall_time: wall, step, scalars: &scalars };
        append_record_with(&mut p.buf, event.encoded_len(), |out| event.encode(out));
    } else {
        append_record(&mut p.buf, &encoder::summary_event(wall, step, values).encode_to_vec());
    }
    j
}

impl TensorBoardExporter {
    /// Writes `points` (indices from `base` in their batch) of `run`; the refused ones.
    fn export_points(&mut self, run: &RunInfo, points: &[OutPoint], base: usize, start_at: Option<i64>) -> Result<Vec<(usize, DropReason)>, ExportError> {
        let key = run.process_key();
        let rf = self.runs.entry(key.to_string()).or_default();
        let new_file = rf.path.is_none();
        let params = self.params.get(&run.key).unwrap_or(&run.params);
        let p = encode(run, points, base, start_at, rf, params);
        if p.buf.is_empty() || (new_file && p.refused.len() == points.len()) {
            return Ok(p.refused);
        }
        self.write(run, &p.buf)?;
        let rf = self.runs.entry(key.into_owned()).or_default();
        if new_file {
            rf.file += 1;
        }
        for slot in p.slots.list.iter().filter(|s| s.touched) {
            let written = slot.written.unwrap_or(i64::MIN);
            match rf.tags.get_mut(&**slot.tag) {
                Some(t) => {
                    t.written = written;
                    if slot.first_here {
                        t.file = rf.file;
                    }
                }
                None => {
                    rf.tags.insert(slot.tag.clone(), Tag { written, file: rf.file });
                }
            }
        }
        rf.session_started = p.session_started;
        Ok(p.refused)
    }

    /// Starts a new session of run `key` at `step` (a resume; see the module docs): the current
    /// file is synced and closed, the next write starts a new file with `SessionLog START` at
    /// `step`, and each tag accepts steps from `step` on again.
    fn break_session(&mut self, key: &str, step: i64) {
        let Some(rf) = self.runs.get_mut(key) else { return };
        if rf.resumed_at == Some(step) {
            return;
        }
        if let Some(f) = self.open.close(key) {
            if let Err(e) = f.sync_all() {
                tracing::warn!(run = %key, error = %e, "could not sync the event file of the previous session");
            }
        }
        rf.path = None;
        rf.session_started = false;
        rf.unsynced = false;
        let below = step.saturating_sub(1);
        for t in rf.tags.values_mut() {
            t.written = t.written.min(below);
        }
        rf.resumed_at = Some(step);
        tracing::info!(run = %key, step, "run resumed from an earlier step: new event file");
    }
}

impl Exporter for TensorBoardExporter {
    fn export(&mut self, batch: &Batch, _timeout: Duration) -> Result<Exported, ExportError> {
        let exported = self.export_batch(batch)?;
        if batch.ended.is_some() {
            self.close_run(&batch.run.process_key())?;
        }
        Ok(exported)
    }

    fn observe_run(&mut self, run: &RunInfo) {
        if !self.params.contains_key(&run.key) {
            self.params.insert(run.key.clone(), run.params.clone());
        }
    }

    fn end_runs(&mut self, _outcome: RunOutcome, _timeout: Duration) -> Result<(), ExportError> {
        match self.sync_files() {
            Some(message) => Err(ExportError::Retryable { message, retry_after: None }),
            None => Ok(()),
        }
    }
}

impl TensorBoardExporter {
    /// Writes a batch's points, starting a new session on a resume (see the module docs).
    fn export_batch(&mut self, batch: &Batch) -> Result<Exported, ExportError> {
        let Some(resumed) = batch.resumed_at else {
            return Ok(Exported { refused: self.export_points(&batch.run, &batch.points, 0, None)? });
        };
        let key = batch.run.process_key();
        // Points below the resume step (windows of the old session closing now) end the old
        // file; the rest starts the new session (batches are sorted by step).
        let split = batch.points.partition_point(|p| p.step < resumed);
        let (old, new) = batch.points.split_at(split);
        let mut refused = if old.is_empty() || self.runs.get(key.as_ref()).is_some_and(|rf| rf.resumed_at == Some(resumed)) {
            Vec::new()
        } else {
            self.export_points(&batch.run, old, 0, None)?
        };
        if self.runs.get(key.as_ref()).is_some_and(|rf| rf.path.is_some()) {
            self.break_session(&key, resumed);
        } else {
            // Nothing written yet by this exporter (or a file just failed): the next file is
            // new anyway; its session starts at the resume step.
            let rf = self.runs.entry(key.to_string()).or_default();
            if rf.resumed_at != Some(resumed) {
                rf.session_started = false;
                rf.tags.values_mut().for_each(|t| t.written = t.written.min(resumed.saturating_sub(1)));
                rf.resumed_at = Some(resumed);
            }
        }
        refused.extend(self.export_points(&batch.run, new, split, Some(resumed))?);
        Ok(Exported { refused })
    }
}

/// The directory of a rank inside its job's run directory: `rank-<N>`.
pub fn rank_dir_name(rank: i64) -> String {
    format!("rank-{rank}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn batch(run: &str, pts: &[(i64, &str, f64)]) -> Batch {
        Batch {
            run: Arc::new(RunInfo { key: run.into(), run_name: Some(run.into()), ..Default::default() }),
            points: pts
                .iter()
                .map(|(step, tag, v)| OutPoint {
                    series: (*tag).into(),
                    step: *step,
                    time_unix_nano: 1_700_000_000_000_000_000,
                    scalar: *v,
                    histogram: None,
                    inputs: 1,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn late_steps_are_refused_and_files_stay_inside_the_logdir() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { panic!("tempdir: {dir:?}") };
        let mut e = TensorBoardExporter::new(TensorBoardSettings { logdir: dir.path().to_path_buf() });
        let r = e.export(&batch("../../x", &[(1, "a", 1.0), (2, "a", 2.0)]), Duration::from_secs(1));
        assert!(matches!(r, Ok(Exported { ref refused }) if refused.is_empty()));
        let r = e.export(&batch("../../x", &[(2, "a", 9.0), (3, "a", 3.0)]), Duration::from_secs(1));
        assert!(matches!(r, Ok(Exported { ref refused }) if refused == &[(0, DropReason::Late)]));
        let entries: Vec<String> = std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries, vec!["%2E.%2F..%2Fx".to_string()]);
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn event_files_in(dir: &Path) -> usize {
        files_in(dir).iter().filter(|n| n.contains("tfevents")).count()
    }

    #[test]
    fn a_failed_write_removes_the_file_it_created_and_cuts_an_older_one_back() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { panic!("tempdir: {dir:?}") };
        let mut e = TensorBoardExporter::new(TensorBoardSettings { logdir: dir.path().to_path_buf() });
        let run_dir = dir.path().join("r");
        DISK_LEFT.set(Some(10));
        for _ in 0..7 {
            let r = e.export(&batch("r", &[(1, "a", 1.0)]), Duration::from_secs(1));
            assert!(matches!(r, Err(ExportError::Retryable { ref message, .. }) if message.contains("simulated full disk")), "{r:?}");
        }
        assert_eq!(files_in(&run_dir), vec![RUN_MARKER.to_string()]);
        DISK_LEFT.set(None);
        assert!(e.export(&batch("r", &[(1, "a", 1.0)]), Duration::from_secs(1)).is_ok());
        assert_eq!(event_files_in(&run_dir), 1);
        // A file that already holds exported points is cut back to its length before the failed
        // write and goes on: no partial record, no second file.
        let file = run_dir.join(files_in(&run_dir).into_iter().find(|n| n.contains("tfevents")).unwrap_or_default());
        let len = std::fs::metadata(&file).map(|m| m.len()).ok();
        DISK_LEFT.set(Some(3));
        assert!(e.export(&batch("r", &[(2, "a", 2.0)]), Duration::from_secs(1)).is_err());
        assert_eq!(std::fs::metadata(&file).map(|m| m.len()).ok(), len);
        DISK_LEFT.set(None);
        assert!(e.export(&batch("r", &[(2, "a", 2.0)]), Duration::from_secs(1)).is_ok());
        assert_eq!(event_files_in(&run_dir), 1);
        assert!(std::fs::metadata(&file).map(|m| m.len()).ok() > len);
    }

    #[test]
    fn a_run_claims_a_free_directory_and_leaves_others_alone() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { panic!("tempdir: {dir:?}") };
        let logdir = dir.path();
        // Empty and unmarked: free. Holding event files but no marker: someone else's.
        assert!(std::fs::create_dir(logdir.join("empty")).is_ok());
        assert!(std::fs::create_dir(logdir.join("foreign")).is_ok());
        assert!(std::fs::write(logdir.join("foreign/events.out.tfevents.1.h.1.000001"), b"").is_ok());
        assert!(matches!(claim_run_dir(logdir, "empty", "k1"), Ok(ref d) if d == &logdir.join("empty")));
        let suffixed = logdir.join(format!("foreign~{:08x}", fnv1a32("k1")));
        assert!(matches!(claim_run_dir(logdir, "foreign", "k1"), Ok(ref d) if d == &suffixed));
        assert!(matches!(claim_run_dir(logdir, "foreign", "k1"), Ok(ref d) if d == &suffixed));
        // A name taken on every candidate by other keys: further candidates, then an error.
        let k2_second = logdir.join(format!("empty~{:08x}", fnv1a32("k2#1")));
        assert!(std::fs::create_dir(logdir.join(format!("empty~{:08x}", fnv1a32("k2")))).is_ok());
        assert!(std::fs::write(logdir.join(format!("empty~{:08x}/{RUN_MARKER}", fnv1a32("k2"))), b"k3").is_ok());
        assert!(matches!(claim_run_dir(logdir, "empty", "k2"), Ok(ref d) if d == &k2_second));
        for attempt in 0..MAX_DIR_CANDIDATES {
            let d = logdir.join(candidate_dir_name("full", "k9", attempt));
            assert!(std::fs::create_dir_all(&d).is_ok() && std::fs::write(d.join(RUN_MARKER), b"other").is_ok());
        }
        assert!(matches!(claim_run_dir(logdir, "full", "k9"), Err(ExportError::Retryable { .. })));
        assert_eq!(std::fs::read(logdir.join("empty").join(RUN_MARKER)).ok(), Some(b"k1".to_vec()));
    }

    #[test]
    fn files_beyond_the_cap_are_closed_and_reopened_for_appending() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { panic!("tempdir: {dir:?}") };
        let mut e = TensorBoardExporter::new(TensorBoardSettings { logdir: dir.path().to_path_buf() });
        let runs: Vec<String> = (0..MAX_OPEN_FILES + 6).map(|i| format!("run{i}")).collect();
        for step in 1..=3 {
            for r in &runs {
                assert!(e.export(&batch(r, &[(step, "a", step as f64)]), Duration::from_secs(1)).is_ok());
                assert!(e.open_files() <= MAX_OPEN_FILES);
            }
        }
        assert_eq!(e.open_files(), MAX_OPEN_FILES);
        assert!(e.end_runs(RunOutcome::Finished, Duration::from_secs(1)).is_ok());
        assert_eq!(e.open_files(), 0);
        for r in &runs {
            assert_eq!(event_files_in(&dir.path().join(r)), 1, "{r}");
        }
        let dirs = e.run_dirs();
        let dirs = dirs.lock().map(|d| d.len()).unwrap_or(0);
        assert_eq!(dirs, runs.len());
    }

    #[test]
    fn symlinks_in_the_logdir_are_never_written_through() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { panic!("tempdir: {dir:?}") };
        let (logdir, outside) = (dir.path().join("logdir"), dir.path().join("outside"));
        assert!(std::fs::create_dir(&logdir).is_ok() && std::fs::create_dir(&outside).is_ok());
        // A run directory that is a symlink, and a directory whose marker is a symlink.
        assert!(std::os::unix::fs::symlink(&outside, logdir.join("linked")).is_ok());
        assert!(std::fs::create_dir(logdir.join("marked")).is_ok());
        assert!(std::os::unix::fs::symlink(outside.join("m"), logdir.join("marked").join(RUN_MARKER)).is_ok());
        for name in ["linked", "marked"] {
            let got = claim_run_dir(&logdir, name, "k");
            assert!(matches!(got, Ok(ref d) if d == &logdir.join(candidate_dir_name(name, "k", 1))), "{got:?}");
        }
        assert!(files_in(&outside).is_empty());
        // An event file replaced by a symlink is not reopened.
        assert!(std::fs::write(outside.join("target"), b"").is_ok());
        let link = logdir.join("events.out.tfevents.1.h.1.000001");
        assert!(std::os::unix::fs::symlink(outside.join("target"), &link).is_ok());
        assert!(open_event_file(&link, false).is_err());
    }

    #[test]
    fn an_unwritable_logdir_is_a_retryable_error() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { panic!("tempdir: {dir:?}") };
        let blocker = dir.path().join("file");
        assert!(std::fs::write(&blocker, b"x").is_ok());
        let mut e = TensorBoardExporter::new(TensorBoardSettings { logdir: blocker });
        let r = e.export(&batch("r", &[(1, "a", 1.0)]), Duration::from_secs(1));
        assert!(matches!(r, Err(ExportError::Retryable { .. })), "{r:?}");
    }

    // Metadata once per tag per event file, late points and resumes, read back with
    // TensorBoard's own loader.

    /// (file index, step, tag, has plugin metadata) of every summary value of a run dir, read
    /// with TensorBoard's own event file loader (tests/support/tb_records.py, in `./.venv`).
    fn records_in_files(run_dir: &Path) -> (usize, Vec<(usize, i64, String, bool)>) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = std::process::Command::new(root.join(".venv/bin/python"))
            .arg(root.join("tests/support/tb_records.py"))
            .arg(run_dir)
            .output();
        let Ok(out) = out else { panic!("missing component: .venv/bin/python with tensorboard (scripts/setup.sh): {out:?}") };
        assert!(out.status.success(), "tb_records.py: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let files = v["files"].as_u64().unwrap_or(0) as usize;
        let recs = v["records"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r[2].as_str() != Some("__session__") && !r[2].as_str().unwrap_or("").starts_with("_hparams_"))
            .map(|r| (r[0].as_u64().unwrap_or(99) as usize, r[1].as_i64().unwrap_or(-1), r[2].as_str().unwrap_or("").to_string(), r[3].as_bool().unwrap_or(false)))
            .collect();
        (files, recs)
    }

    /// Every tag's first record in each file carries its metadata, and no later one does.
    fn assert_metadata_once_per_file(recs: &[(usize, i64, String, bool)]) {
        let mut seen = std::collections::HashSet::new();
        for (file, step, tag, has) in recs {
            let first = seen.insert((*file, tag.clone()));
            assert_eq!(*has, first, "file {file} step {step} tag {tag}: metadata {has}, first in file {first}; all: {recs:?}");
        }
    }

    fn exporter_in_tempdir() -> (tempfile::TempDir, TensorBoardExporter) {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { panic!("tempdir: {dir:?}") };
        let e = TensorBoardExporter::new(TensorBoardSettings { logdir: dir.path().to_path_buf() });
        (dir, e)
    }

    fn refused(r: Result<Exported, ExportError>) -> Vec<(usize, DropReason)> {
        match r {
            Ok(x) => x.refused,
            Err(e) => panic!("export failed: {e:?}"),
        }
    }

    #[test]
    fn multi_step_batches_and_late_points_keep_metadata_once_per_file() {
        let (dir, mut e) = exporter_in_tempdir();
        let d = Duration::from_secs(1);
        // A tag at several steps of one batch.
        assert!(refused(e.export(&batch("r", &[(1, "a", 1.0), (1, "b", 1.0), (2, "a", 2.0), (3, "a", 3.0), (3, "b", 3.0)]), d)).is_empty());
        // Late points in a multi-step batch: at and below the last written step.
        let r = refused(e.export(&batch("r", &[(2, "a", 9.0), (3, "b", 9.0), (4, "a", 4.0), (4, "b", 4.0), (4, "c", 4.0)]), d));
        assert_eq!(r, vec![(0, DropReason::Late), (1, DropReason::Late)]);
        // Late in a single-step batch.
        assert_eq!(refused(e.export(&batch("r", &[(4, "a", 9.0), (4, "b", 9.0)]), d)), vec![(0, DropReason::Late), (1, DropReason::Late)]);
        assert_eq!(refused(e.export(&batch("r", &[(4, "a", 9.0)]), d)), vec![(0, DropReason::Late)]);
        // A single-step batch where one tag is late and a new tag comes.
        assert_eq!(refused(e.export(&batch("r", &[(5, "a", 5.0), (5, "d", 5.0)]), d)), vec![]);
        assert_eq!(refused(e.export(&batch("r", &[(5, "b", 5.0), (5, "d", 9.0)]), d)), vec![(1, DropReason::Late)]);
        // Multi-step batch where a tag is late at its first step and new at the next.
        assert_eq!(refused(e.export(&batch("r", &[(5, "a", 9.0), (6, "a", 6.0), (6, "e", 6.0), (7, "e", 7.0)]), d)), vec![(0, DropReason::Late)]);
        let (files, recs) = records_in_files(&dir.path().join("r"));
        assert_eq!(files, 1);
        assert_metadata_once_per_file(&recs);
        let steps = |tag: &str| recs.iter().filter(|r| r.2 == tag).map(|r| r.1).collect::<Vec<_>>();
        assert_eq!(steps("a"), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(steps("b"), vec![1, 3, 4, 5]);
        assert_eq!(steps("c"), vec![4]);
        assert_eq!(steps("d"), vec![5]);
        assert_eq!(steps("e"), vec![6, 7]);
    }

    #[test]
    fn resumes_write_metadata_again_in_each_new_file() {
        let (dir, mut e) = exporter_in_tempdir();
        let d = Duration::from_secs(1);
        let pts: Vec<(i64, &str, f64)> = (1..=5).flat_map(|s| [(s, "a", s as f64), (s, "b", s as f64), (s, "c", s as f64)]).collect();
        assert!(refused(e.export(&batch("r", &pts), d)).is_empty());
        // Resume at 3: only a in the first export of the new file, b at the next, c a file later.
        let resumed = |pts: &[(i64, &str, f64)], at: i64| Batch { resumed_at: Some(at), ..batch("r", pts) };
        assert!(refused(e.export(&resumed(&[(3, "a", 30.0)], 3), d)).is_empty());
        assert!(refused(e.export(&batch("r", &[(4, "a", 40.0), (4, "b", 40.0)]), d)).is_empty());
        // A late point in the new session (below the resume's last written step).
        assert_eq!(refused(e.export(&batch("r", &[(4, "b", 41.0)]), d)), vec![(0, DropReason::Late)]);
        // A second resume at 2, with old-session points below it in the same batch (file 2's),
        // then a multi-step batch: a tag of file 1 only (c) and one of file 2 (a).
        assert!(refused(e.export(&resumed(&[(1, "d", 10.0), (2, "b", 200.0), (3, "b", 300.0)], 2), d)).is_empty());
        assert!(refused(e.export(&batch("r", &[(4, "a", 400.0), (4, "c", 400.0), (5, "a", 500.0), (5, "c", 500.0)]), d)).is_empty());
        // A resume at a step where every point is late for nothing written: the tag's first
        // write lands in a later export.
        assert!(refused(e.export(&resumed(&[(5, "b", 5000.0)], 5), d)).is_empty());
        assert!(refused(e.export(&batch("r", &[(6, "a", 6.0), (6, "b", 6.0), (6, "c", 6.0)]), d)).is_empty());
        // The run ends (close_run) and goes on in the same file.
        assert!(refused(e.export(&Batch { ended: Some(crate::cadence::RunEnd { status: crate::cadence::EndStatus::Finished, time_unix_nano: 1 }), ..batch("r", &[(7, "a", 7.0)]) }, d)).is_empty());
        assert!(refused(e.export(&batch("r", &[(8, "a", 8.0), (8, "d", 8.0)]), d)).is_empty());
        // A resume after the end.
        assert!(refused(e.export(&resumed(&[(8, "d", 80.0), (9, "c", 9.0)], 8), d)).is_empty());
        let (files, recs) = records_in_files(&dir.path().join("r"));
        assert_metadata_once_per_file(&recs);
        assert_eq!(files, 5, "{recs:?}");
        let in_file = |f: usize| recs.iter().filter(|r| r.0 == f).map(|r| (r.1, r.2.clone())).collect::<Vec<_>>();
        let s = |v: &[(i64, &str)]| v.iter().map(|(a, b)| (*a, b.to_string())).collect::<Vec<_>>();
        assert_eq!(in_file(1), s(&[(3, "a"), (4, "a"), (4, "b"), (1, "d")]));
        assert_eq!(in_file(2), s(&[(2, "b"), (3, "b"), (4, "a"), (4, "c"), (5, "a"), (5, "c")]));
        assert_eq!(in_file(3), s(&[(5, "b"), (6, "a"), (6, "b"), (6, "c"), (7, "a"), (8, "a"), (8, "d")]));
        assert_eq!(in_file(4), s(&[(8, "d"), (9, "c")]));
    }

    #[test]
    fn failed_writes_leave_metadata_for_the_retry() {
        let (dir, mut e) = exporter_in_tempdir();
        let d = Duration::from_secs(1);
        let run_dir = dir.path().join("r");
        assert!(refused(e.export(&batch("r", &[(1, "a", 1.0)]), d)).is_empty());
        // A new tag's first write fails in the existing file (cut back): the retry carries it.
        DISK_LEFT.set(Some(3));
        assert!(e.export(&batch("r", &[(2, "a", 2.0), (2, "b", 2.0)]), d).is_err());
        DISK_LEFT.set(None);
        assert!(refused(e.export(&batch("r", &[(2, "a", 2.0), (2, "b", 2.0)]), d)).is_empty());
        // A resume whose new file fails (removed): the retry's new file carries every tag's.
        DISK_LEFT.set(Some(3));
        let b = Batch { resumed_at: Some(2), ..batch("r", &[(2, "a", 20.0), (2, "b", 20.0), (3, "a", 30.0)]) };
        assert!(e.export(&b, d).is_err());
        DISK_LEFT.set(None);
        assert!(refused(e.export(&b, d)).is_empty());
        // The same resume again fails once more inside the now existing file, then a tag of the
        // old file only.
        DISK_LEFT.set(Some(3));
        assert!(e.export(&batch("r", &[(4, "c", 4.0), (4, "a", 4.0)]), d).is_err());
        DISK_LEFT.set(None);
        assert!(refused(e.export(&batch("r", &[(4, "a", 4.0), (4, "c", 4.0)]), d)).is_empty());
        let (files, recs) = records_in_files(&run_dir);
        assert_eq!(files, 2, "{recs:?}");
        assert_metadata_once_per_file(&recs);
    }

    /// Random exports (one- and multi-step batches, resumes, failed writes, run ends): in every
    /// event file each tag's first record has metadata and no other does, each tag's steps rise
    /// within a file, and every point an export accepted is in the files.
    #[test]
    fn random_exports_keep_the_per_file_invariants() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let tags = ["a", "b", "c", "d"];
        for seed in 0..40 {
            let (dir, mut e) = exporter_in_tempdir();
            let d = Duration::from_secs(1);
            let mut accepted = 0usize;
            let mut step: i64 = 1;
            let mut log = Vec::new();
            let mut last_resume = None;
            for _ in 0..25 {
                let multi = rnd(2) == 0;
                let resume = rnd(6) == 0;
                if resume {
                    step = (step - 1 - rnd(4) as i64).max(0);
                }
                let nsteps = if multi { 2 + rnd(3) as i64 } else { 1 };
                let mut pts: Vec<(i64, &str, f64)> = Vec::new();
                let first = if !resume && rnd(4) == 0 { step - 1 - rnd(2) as i64 } else { step };
                for s in first..first + nsteps {
                    for t in tags {
                        if rnd(2) == 0 {
                            pts.push((s, t, s as f64));
                        }
                    }
                }
                if pts.is_empty() {
                    continue;
                }
                step = first + nsteps;
                let mut b = batch("r", &pts);
                if resume {
                    // The cadence announces a resume once (a retry repeats a whole batch; not modelled).
                    let at = pts[0].0 + rnd(2) as i64;
                    if last_resume != Some(at) {
                        b.resumed_at = Some(at);
                        last_resume = Some(at);
                    }
                }
                if rnd(8) == 0 {
                    b.ended = Some(crate::cadence::RunEnd { status: crate::cadence::EndStatus::Finished, time_unix_nano: 1 });
                }
                let fail = rnd(7) == 0;
                if fail {
                    DISK_LEFT.set(Some(rnd(40) as usize));
                }
                let r = e.export(&b, d);
                DISK_LEFT.set(None);
                log.push(format!("{pts:?} resumed {:?} ended {} fail {fail} -> {:?}", b.resumed_at, b.ended.is_some(), r.as_ref().map(|x| x.refused.clone())));
                if let Ok(x) = r {
                    accepted += pts.len() - x.refused.len();
                }
            }
            let (_, recs) = records_in_files(&dir.path().join("r"));
            let ctx = format!("seed {seed}:\n{}\n{recs:?}", log.join("\n"));
            let mut seen = std::collections::HashMap::new();
            for (file, s, tag, has) in &recs {
                let prev = seen.insert((*file, tag.clone()), *s);
                assert_eq!(*has, prev.is_none(), "metadata of {tag} at {s} in file {file}; {ctx}");
                assert!(prev.is_none_or(|p| p < *s), "{tag} goes from {prev:?} to {s} in file {file}; {ctx}");
            }
            assert_eq!(recs.len(), accepted, "{ctx}");
        }
    }
}
