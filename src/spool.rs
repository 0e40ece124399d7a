//! Spool: the on-disk part of an exporter's delivery queue. It keeps batches (after cadence and
//! aggregation, exactly as the exporter would receive them) that could not be delivered yet, so an
//! outage of the backend or a restart of the process loses nothing.
//!
//! [`crate::delivery`] decides *when* a batch goes to disk (its run's backend is failing, memory is
//! over `sending_queue.max_pending_points`, or shutdown ends with batches undelivered); this module
//! owns *how*: files, records, checksums, ownership between processes, replay and limits.
//!
//! # Layout
//! One directory per exporter (`sending_queue.spool.directory`). Inside, segment files named
//! `<unix-ns>-<pid>.spool`, append-only. Each record:
//!
//! ```text
//! u32 LE  length of payload
//! u32 LE  CRC-32C (Castagnoli) of payload
//! u8[length] payload: a protobuf message (schema below)
//! ```
//!
//! The first record of a segment is a [`SegmentHeader`] (format version, exporter name and the
//! exporter's destination, e.g. the MLflow tracking URI without credentials); every later record is one
//! [`SpoolBatch`]. A record whose length runs past the end of the file or whose checksum does not
//! match ends the segment (a torn write from a crash): what came before it is replayed, the rest
//! is reported as corrupt bytes.
//!
//! # Durability (fsync policy)
//! With `fsync: true` (the default) every appended record is followed by `fdatasync` before the
//! worker moves on, so a batch that reached the spool survives a power cut; appends only happen
//! while a backend is failing, over the memory limit or at shutdown, so the cost is off the
//! normal path. With `fsync: false` records survive a process crash (they are in the page cache),
//! not a machine crash.
//!
//! # Ownership and replay
//! A process holds an exclusive `flock` on every segment it writes or replays, so two trainers (or
//! a trainer and a service) sharing a spool directory never replay each other's live segments. At
//! start, segments that no live process holds and whose header names the same exporter destination
//! are adopted: their batches are put at the front of the queue, in the order they were written,
//! and delivered again with their original timestamps. MLflow stores a metric row once per
//! (key, step, timestamp, value), so a batch that was in fact committed before the crash is not
//! duplicated. Segments of another destination are left alone (logged once).
//!
//! A segment is deleted once every batch in it is delivered or dropped.
//!
//! # Limits
//! `max_size_mib` bounds the bytes on disk (all segments of the directory this process owns).
//! An append that would pass it fails with [`SpoolError::Full`]; the delivery applies
//! `sending_queue.spool.when_full` and counts the points `spool_full`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use serde::{Deserialize, Serialize};

use crate::decode::{Histogram, RunInfo};
use crate::cadence::{EndStatus, Batch, OutPoint, RunEnd};
use crate::problems::Problems;

/// Format version written in every segment header; a segment of another version is not replayed.
pub const VERSION: u32 = 1;
/// A segment is sealed and a new one started past this size, so delivered data is freed in
/// pieces rather than only when a whole outage is over.
const SEGMENT_BYTES: u64 = 16 << 20;
/// A record larger than this is treated as corrupt on replay (a batch is far smaller; guards
/// against allocating a length read from a damaged file).
const MAX_RECORD: u32 = 256 << 20;
/// Bytes of framing per record.
const FRAME: u64 = 8;

/// What to do when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Keep what is queued; the batch that does not fit is dropped (`spool_full`). Default: the
    /// older data is usually what a user is missing.
    DropNewest,
    /// Drop the oldest queued batch (memory or disk) to make room (`spool_full`).
    DropOldest,
}

/// `sending_queue.spool`: batches that cannot be delivered yet go to disk and survive restarts
/// (see the module docs for the format, fsync policy and replay).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Default: true for mlflow exporters, false for tensorboard (its backend is the disk).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The exporter's spool directory. Default: `<root>/<exporter name>` ('/' in the name as
    /// '-'), root = `$TRAINMETRICS_SPOOL_DIR`, else `$XDG_STATE_HOME/trainmetrics/spool`, else
    /// `$HOME/.local/state/trainmetrics/spool`, else `.trainmetrics/spool`.
    #[serde(default)]
    pub directory: Option<PathBuf>,
    /// Most disk space, MiB; default 1024.
    #[serde(default)]
    pub max_size_mib: Option<u64>,
    /// `drop_newest` (default) or `drop_oldest`: which batch goes when the spool is full.
    #[serde(default)]
    pub when_full: Option<WhenFull>,
    /// fdatasync after every record; default true.
    #[serde(default)]
    pub fsync: Option<bool>,
}

/// The default spool root (see [`SpoolConfig::directory`]).
pub fn default_spool_root() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("TRAINMETRICS_SPOOL_DIR")
        .or_else(|| env("XDG_STATE_HOME").map(|d| d.join("trainmetrics/spool")))
        .or_else(|| env("HOME").map(|d| d.join(".local/state/trainmetrics/spool")))
        .unwrap_or_else(|| PathBuf::from(".trainmetrics/spool"))
}

impl SpoolConfig {
    /// Validates (at config path `path`, e.g. `exporters.mlflow.sending_queue.spool`) into
    /// settings for the exporter `exporter` writing to `destination`; `None` when the spool is off
    /// (`enabled`, default `on_by_default`). Problems go to `p`.
    pub fn settings(
        &self,
        path: &str,
        exporter: &str,
        destination: String,
        on_by_default: bool,
        p: &mut Problems,
    ) -> Option<SpoolSettings> {
        if self.max_size_mib == Some(0) {
            p.add(format!("{path}.max_size_mib"), "must be at least 1");
        }
        self.enabled
            .unwrap_or(on_by_default)
            .then(|| SpoolSettings {
                directory: self
                    .directory
                    .clone()
                    .unwrap_or_else(|| default_spool_root().join(exporter.replace('/', "-"))),
                max_bytes: self.max_size_mib.unwrap_or(1024).saturating_mul(1 << 20),
                when_full: self.when_full.unwrap_or(WhenFull::DropNewest),
                fsync: self.fsync.unwrap_or(true),
                destination,
            })
    }
}

/// Validated spool settings of one exporter.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolSettings {
    /// The exporter's spool directory (created if missing).
    pub directory: PathBuf,
    /// Most bytes on disk (records and framing). Default 1 GiB.
    pub max_bytes: u64,
    /// Policy when full. Default [`WhenFull::DropNewest`].
    pub when_full: WhenFull,
    /// `fdatasync` after every appended record. Default true.
    pub fsync: bool,
    /// What the batches are for (e.g. `mlflow http://127.0.0.1:5000`): only segments with the
    /// same destination are replayed.
    pub destination: String,
}

/// Where one spooled batch lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef {
    segment: u64,
    offset: u64,
    len: u32,
}

impl RecordRef {
    /// Bytes the record takes on disk, framing included.
    pub fn disk_bytes(&self) -> u64 {
        FRAME + u64::from(self.len)
    }
}

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool would pass `max_size_mib`.
    #[error("the spool is full ({max_bytes} bytes)")]
    Full {
        /// The configured limit, bytes.
        max_bytes: u64,
    },
    /// Reading or writing a spool file failed (permissions, disk full, …).
    #[error("spool {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A record read back does not decode (damaged file).
    #[error("spool {path}: damaged record at byte {offset}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where the record starts.
        offset: u64,
    },
}

/// A batch adopted from a previous process's segment, in write order.
#[derive(Debug)]
pub struct Replayed {
    /// The batch.
    pub batch: Batch,
    /// Where it is on disk (ack it once delivered or dropped).
    pub at: RecordRef,
}

/// What [`Spool::open`] found.
#[derive(Debug, Default)]
pub struct Opened {
    /// Batches left by earlier processes, oldest first.
    pub replayed: Vec<Replayed>,
    /// Segments skipped because they belong to another destination or format version.
    pub foreign_segments: usize,
    /// Bytes at the end of segments that could not be read (torn or damaged records).
    pub corrupt_bytes: u64,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    file: File,
    /// Bytes in the file.
    size: u64,
    /// Records not yet acknowledged.
    live: u64,
}

/// One exporter's spool (owned by its delivery worker).
#[derive(Debug)]
pub struct Spool {
    settings: SpoolSettings,
    exporter: String,
    segments: BTreeMap<u64, Segment>,
    /// The segment appends go to, once one exists.
    active: Option<u64>,
    next_id: u64,
    /// Bytes of all segments held (what the limit applies to).
    bytes: u64,
    /// Appends skip their fdatasync until [`Spool::sync`] (many appends at once, at shutdown).
    deferred: bool,
}

impl Spool {
    /// Opens (creating) the directory and adopts the segments no live process holds.
    ///
    /// Errors: the directory cannot be created or listed. Unreadable single segments are skipped
    /// with a warning, not an error.
    pub fn open(exporter: &str, settings: SpoolSettings) -> Result<(Spool, Opened), SpoolError> {
        let dir = settings.directory.clone();
        let io = |source| SpoolError::Io { path: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "spool"))
            .collect();
        // Names start with the creation time in ns, so this is write order.
        names.sort();
        let mut spool = Spool { settings, exporter: exporter.to_string(), segments: BTreeMap::new(), active: None, next_id: 0, bytes: 0, deferred: false };
        let mut opened = Opened::default();
        for path in names {
            match spool.adopt(&path, &mut opened) {
                Ok(()) => {}
                Err(e) => tracing::warn!(exporter = %spool.exporter, "spool segment skipped: {e}"),
            }
        }
        if opened.foreign_segments > 0 {
            tracing::warn!(exporter = %spool.exporter, segments = opened.foreign_segments, dir = %dir.display(),
                "spool segments of another destination or format left in place");
        }
        Ok((spool, opened))
    }

    fn adopt(&mut self, path: &Path, opened: &mut Opened) -> Result<(), SpoolError> {
        let io = |source| SpoolError::Io { path: path.to_path_buf(), source };
        let not_ours = |what: &str| SpoolError::Io { path: path.to_path_buf(), source: std::io::Error::other(format!("not a spool segment: {what}")) };
        // Only regular files we could have written: a symlink, FIFO or device planted here is
        // never read (a FIFO would block startup; /dev/zero would read forever).
        let meta = std::fs::symlink_metadata(path).map_err(io)?;
        if !meta.file_type().is_file() {
            return Err(not_ours("not a regular file"));
        }
        if meta.len() > SEGMENT_BYTES + u64::from(MAX_RECORD) {
            return Err(not_ours("larger than any segment this format writes"));
        }
        let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        if !file.metadata().map_err(io)?.file_type().is_file() {
            return Err(not_ours("replaced while opening"));
        }
        match file.try_lock() {
            Ok(()) => {}
            // Held by a live process (or by another exporter of this one): not ours.
            Err(std::fs::TryLockError::WouldBlock) => return Ok(()),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let mut records = Frames { bytes: &bytes, at: 0 };
        let header = records.next().and_then(|(_, p)| SegmentHeader::decode(p).ok());
        match header {
            Some(h) if h.version == VERSION && h.destination == self.settings.destination => {}
            _ => {
                opened.foreign_segments += 1;
                return Ok(());
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut live = 0;
        for (offset, payload) in records.by_ref() {
            let Ok(record) = SpoolBatch::decode(payload) else {
                records.at = bytes.len();
                opened.corrupt_bytes += bytes.len() as u64 - offset;
                break;
            };
            let at = RecordRef { segment: id, offset, len: payload.len() as u32 };
            opened.replayed.push(Replayed { batch: record.into_batch(), at });
            live += 1;
        }
        opened.corrupt_bytes += (bytes.len() - records.at) as u64;
        let size = bytes.len() as u64;
        if live == 0 {
            // Nothing to deliver: an empty or fully torn segment.
            drop(file);
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
        self.bytes += size;
        self.segments.insert(id, Segment { path: path.to_path_buf(), file, size, live });
        Ok(())
    }

    /// Appends `batch`, returning where it is.
    ///
    /// Errors: [`SpoolError::Full`] past `max_bytes`; [`SpoolError::Io`] when the file cannot be
    /// written (the batch is then not spooled).
    pub fn append(&mut self, batch: &Batch) -> Result<RecordRef, SpoolError> {
        let payload = SpoolBatch::from_batch(batch).encode_to_vec();
        let need = FRAME + payload.len() as u64;
        if self.bytes + need > self.settings.max_bytes {
            return Err(SpoolError::Full { max_bytes: self.settings.max_bytes });
        }
        let id = match self.active.filter(|id| self.segments.get(id).is_some_and(|s| s.size < SEGMENT_BYTES)) {
            Some(id) => id,
            None => self.new_segment()?,
        };
        let fsync = self.settings.fsync && !self.deferred;
        let Some(seg) = self.segments.get_mut(&id) else {
            return Err(SpoolError::Io { path: self.settings.directory.clone(), source: std::io::Error::other("segment vanished") });
        };
        let offset = seg.size;
        let frame = frame(&payload);
        let path = seg.path.clone();
        let written = seg.file.write_all(&frame).and_then(|()| if fsync { seg.file.sync_data() } else { Ok(()) });
        if let Err(source) = written {
            // Cut the partial record off so the segment stays readable; appends go to a new one.
            let _ = seg.file.set_len(offset);
            let _ = seg.file.seek(SeekFrom::Start(offset));
            self.active = None;
            return Err(SpoolError::Io { path, source });
        }
        seg.size += need;
        seg.live += 1;
        self.bytes += need;
        Ok(RecordRef { segment: id, offset, len: payload.len() as u32 })
    }

    fn new_segment(&mut self) -> Result<u64, SpoolError> {
        let ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = self.settings.directory.join(format!("{ns:020}-{}.spool", std::process::id()));
        let io = |source| SpoolError::Io { path: path.clone(), source };
        std::fs::create_dir_all(&self.settings.directory).map_err(|source| SpoolError::Io { path: self.settings.directory.clone(), source })?;
        let mut file = OpenOptions::new().read(true).append(true).create_new(true).open(&path).map_err(io)?;
        file.try_lock().map_err(|e| io(std::io::Error::other(e.to_string())))?;
        let header = SegmentHeader { version: VERSION, destination: self.settings.destination.clone(), exporter: self.exporter.clone() }.encode_to_vec();
        let header = frame(&header);
        let written = file.write_all(&header).and_then(|()| if self.settings.fsync { file.sync_all() } else { Ok(()) });
        if let Err(e) = written {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(io(e));
        }
        if self.settings.fsync {
            // The new name must survive a crash too.
            if let Ok(d) = File::open(&self.settings.directory) {
                let _ = d.sync_all();
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let size = header.len() as u64;
        self.bytes += size;
        self.segments.insert(id, Segment { path, file, size, live: 0 });
        // A sealed segment whose records were all acknowledged is freed now.
        if let Some(old) = self.active.replace(id) {
            self.free_if_done(old);
        }
        Ok(id)
    }

    /// From now on, appends leave their fdatasync to one [`Spool::sync`] call: spooling a
    /// thousand batches at shutdown then costs one disk flush, not a thousand.
    pub fn defer_sync(&mut self) {
        self.deferred = true;
    }

    /// Flushes what deferred appends wrote (with `fsync: true`) and ends deferring.
    ///
    /// Errors: the OS could not flush a segment (its records may not survive a power cut).
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.deferred = false;
        if !self.settings.fsync {
            return Ok(());
        }
        for seg in self.segments.values() {
            seg.file.sync_data().map_err(|source| SpoolError::Io { path: seg.path.clone(), source })?;
        }
        Ok(())
    }

    /// Reads a spooled batch back.
    ///
    /// Errors: the file cannot be read, or the record is damaged (checksum or decoding).
    pub fn read(&mut self, at: RecordRef) -> Result<Batch, SpoolError> {
        let Some(seg) = self.segments.get_mut(&at.segment) else {
            return Err(SpoolError::Corrupt { path: self.settings.directory.clone(), offset: at.offset });
        };
        let corrupt = || SpoolError::Corrupt { path: seg.path.clone(), offset: at.offset };
        let mut frame = vec![0u8; at.disk_bytes() as usize];
        let read = (&seg.file).seek(SeekFrom::Start(at.offset)).and_then(|_| (&seg.file).read_exact(&mut frame));
        if let Err(source) = read {
            return Err(SpoolError::Io { path: seg.path.clone(), source });
        }
        let Some((payload, _)) = unframe(&frame).filter(|(_, n)| *n == frame.len()) else {
            return Err(corrupt());
        };
        SpoolBatch::decode(payload).map(SpoolBatch::into_batch).map_err(|_| corrupt())
    }

    /// Marks a spooled batch as done (delivered or dropped); frees its segment once every batch
    /// in it is done.
    pub fn ack(&mut self, at: RecordRef) {
        if let Some(seg) = self.segments.get_mut(&at.segment) {
            seg.live = seg.live.saturating_sub(1);
        }
        self.free_if_done(at.segment);
    }

    fn free_if_done(&mut self, id: u64) {
        let done = self.segments.get(&id).is_some_and(|s| s.live == 0);
        if !done {
            return;
        }
        if self.active == Some(id) {
            // Keep the open active segment but start it over: nothing in it is needed.
            return self.reset_active(id);
        }
        if let Some(seg) = self.segments.remove(&id) {
            self.bytes = self.bytes.saturating_sub(seg.size);
            drop(seg.file);
            if let Err(e) = std::fs::remove_file(&seg.path) {
                tracing::warn!(exporter = %self.exporter, "could not remove spool segment {}: {e}", seg.path.display());
            }
        }
    }

    fn reset_active(&mut self, id: u64) {
        if let Some(seg) = self.segments.remove(&id) {
            self.bytes = self.bytes.saturating_sub(seg.size);
            drop(seg.file);
            let _ = std::fs::remove_file(&seg.path);
        }
        self.active = None;
    }

    /// Bytes on disk held by this spool.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The spool directory.
    pub fn directory(&self) -> &Path {
        &self.settings.directory
    }
}

/// Iterates over the framed records of a segment, stopping at the first torn or damaged one.
struct Frames<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Frames<'a> {
    /// (offset of the record, payload)
    type Item = (u64, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let (payload, n) = unframe(self.bytes.get(self.at..)?)?;
        let offset = self.at as u64;
        self.at += n;
        Some((offset, payload))
    }
}

/// One framed record: `u32` payload length (LE), `u32` CRC-32C of the payload (LE), payload.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME as usize + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of the record at the start of `bytes` and the bytes the record takes; `None`
/// when it is torn (cut short), longer than [`MAX_RECORD`], or fails its checksum.
fn unframe(bytes: &[u8]) -> Option<(&[u8], usize)> {
    let head = bytes.get(..FRAME as usize)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_RECORD {
        return None;
    }
    let end = FRAME as usize + len as usize;
    let payload = bytes.get(FRAME as usize..end)?;
    (crc32c::crc32c(payload) == crc).then_some((payload, end))
}

/// First record of a segment.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SegmentHeader {
    /// Format version ([`VERSION`]).
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The exporter's destination (see [`SpoolSettings::destination`]).
    #[prost(string, tag = "2")]
    pub destination: String,
    /// The exporter's configured name (informational).
    #[prost(string, tag = "3")]
    pub exporter: String,
}

/// One spooled batch: an [`Batch`] field by field.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpoolBatch {
    /// The run.
    #[prost(message, optional, tag = "1")]
    pub run: Option<SpoolRun>,
    /// Its points.
    #[prost(message, repeated, tag = "2")]
    pub points: Vec<SpoolPoint>,
    /// [`Batch::resumed_at`].
    #[prost(int64, optional, tag = "3")]
    pub resumed_at: Option<i64>,
    /// [`Batch::idle`].
    #[prost(bool, tag = "4")]
    pub idle: bool,
    /// [`Batch::ended`]: the status (`FINISHED`, `FAILED`, `KILLED`) of an end record.
    #[prost(string, optional, tag = "5")]
    pub ended: Option<String>,
    /// [`Batch::ended`]: when the process ended the run, ns since the Unix epoch.
    #[prost(fixed64, tag = "6")]
    pub ended_unix_nano: u64,
}

/// [`RunInfo`] on disk.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpoolRun {
    /// [`RunInfo::key`].
    #[prost(string, tag = "1")]
    pub key: String,
    /// [`RunInfo::experiment`].
    #[prost(string, optional, tag = "2")]
    pub experiment: Option<String>,
    /// [`RunInfo::run_name`].
    #[prost(string, optional, tag = "3")]
    pub run_name: Option<String>,
    /// [`RunInfo::run_id`].
    #[prost(string, optional, tag = "4")]
    pub run_id: Option<String>,
    /// [`RunInfo::params`].
    #[prost(btree_map = "string, string", tag = "5")]
    pub params: BTreeMap<String, String>,
    /// [`RunInfo::tags`].
    #[prost(btree_map = "string, string", tag = "6")]
    pub tags: BTreeMap<String, String>,
    /// [`RunInfo::rank`] (absent in records of versions before ranks: no rank).
    #[prost(int64, optional, tag = "7")]
    pub rank: Option<i64>,
}

/// [`OutPoint`] on disk.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpoolPoint {
    /// Series name.
    #[prost(string, tag = "1")]
    pub series: String,
    /// Step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// ns since the Unix epoch.
    #[prost(fixed64, tag = "3")]
    pub time_unix_nano: u64,
    /// Aggregated scalar (NaN and ±Inf kept bit for bit).
    #[prost(double, tag = "4")]
    pub scalar: f64,
    /// Merged histogram.
    #[prost(message, optional, tag = "5")]
    pub histogram: Option<SpoolHistogram>,
    /// Input data points this point stands for.
    #[prost(uint64, tag = "6")]
    pub inputs: u64,
}

/// [`Histogram`] on disk.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpoolHistogram {
    /// Count.
    #[prost(uint64, tag = "1")]
    pub count: u64,
    /// Sum.
    #[prost(double, tag = "2")]
    pub sum: f64,
    /// Min.
    #[prost(double, optional, tag = "3")]
    pub min: Option<f64>,
    /// Max.
    #[prost(double, optional, tag = "4")]
    pub max: Option<f64>,
    /// Bucket bounds.
    #[prost(double, repeated, tag = "5")]
    pub bounds: Vec<f64>,
    /// Bucket counts.
    #[prost(uint64, repeated, tag = "6")]
    pub counts: Vec<u64>,
}

impl SpoolBatch {
    fn from_batch(b: &Batch) -> Self {
        let r = &b.run;
        SpoolBatch {
            run: Some(SpoolRun {
                key: r.key.clone(),
                experiment: r.experiment.clone(),
                run_name: r.run_name.clone(),
                run_id: r.run_id.clone(),
                params: r.params.clone(),
                tags: r.tags.clone(),
                rank: r.rank,
            }),
            points: b
                .points
                .iter()
                .map(|p| SpoolPoint {
                    series: p.series.to_string(),
                    step: p.step,
                    time_unix_nano: p.time_unix_nano,
                    scalar: p.scalar,
                    histogram: p.histogram.as_ref().map(|h| SpoolHistogram {
                        count: h.count,
                        sum: h.sum,
                        min: h.min,
                        max: h.max,
                        bounds: h.bounds.clone(),
                        counts: h.counts.clone(),
                    }),
                    inputs: p.inputs,
                })
                .collect(),
            resumed_at: b.resumed_at,
            idle: b.idle,
            ended: b.ended.map(|e| e.status.as_str().to_string()),
            ended_unix_nano: b.ended.map_or(0, |e| e.time_unix_nano),
        }
    }

    fn into_batch(self) -> Batch {
        let r = self.run.unwrap_or_default();
        Batch {
            run: Arc::new(RunInfo {
                key: r.key,
                experiment: r.experiment,
                run_name: r.run_name,
                run_id: r.run_id,
                params: r.params,
                tags: r.tags,
                rank: r.rank,
            }),
            points: self
                .points
                .into_iter()
                .map(|p| OutPoint {
                    series: p.series.into(),
                    step: p.step,
                    time_unix_nano: p.time_unix_nano,
                    scalar: p.scalar,
                    histogram: p.histogram.map(|h| {
                        Box::new(Histogram { count: h.count, sum: h.sum, min: h.min, max: h.max, bounds: h.bounds, counts: h.counts })
                    }),
                    inputs: p.inputs,
                })
                .collect(),
            resumed_at: self.resumed_at,
            idle: self.idle,
            // A status this version does not know is not an end it can apply.
            ended: self.ended.as_deref().and_then(EndStatus::parse).map(|status| RunEnd { status, time_unix_nano: self.ended_unix_nano }),
        }
    }
}

/// Every batch in a spool directory, in write order, whoever holds the segments and whatever
/// their destination (read-only, no locks taken; for tools and tests that inspect a spool). Torn or
/// damaged records end their segment, as in replay.
pub fn inspect(dir: &Path) -> Vec<Batch> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|it| it.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "spool")).collect())
        .unwrap_or_default();
    names.sort();
    let mut out = Vec::new();
    for path in names {
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let frames = Frames { bytes: &bytes, at: 0 };
        out.extend(frames.skip(1).map_while(|(_, p)| SpoolBatch::decode(p).ok()).map(SpoolBatch::into_batch));
    }
    out
}

/// Bytes of all segment files in a spool directory, whoever holds them (for tools and tests that
/// inspect a directory; a running exporter reports its own as `spool_bytes`).
pub fn directory_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "spool"))
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}

/// One segment file as [`scan`] found it.
#[derive(Debug)]
pub struct ScannedSegment {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its header: `None` when the first record is not a readable header.
    pub header: Option<SegmentHeader>,
    /// Whether a live process holds the segment's lock (it writes or replays it): replay skips
    /// it, and so does `trainmetrics sync`.
    pub locked: bool,
    /// Its batches in write order, each with the bytes its record takes (framing included).
    pub batches: Vec<(Batch, u64)>,
    /// Bytes after the last readable record (a torn or damaged tail; for a locked segment, also
    /// a record being written right now).
    pub corrupt_bytes: u64,
}

impl ScannedSegment {
    /// Whether replay by an exporter of `destination` would adopt it (this format version, that
    /// destination, no live holder).
    pub fn adoptable_by(&self, destination: &str) -> bool {
        !self.locked && self.header.as_ref().is_some_and(|h| h.version == VERSION && h.destination == destination)
    }
}

/// What [`scan`] found in a spool directory.
#[derive(Debug, Default)]
pub struct Scan {
    /// Segment files in write order.
    pub segments: Vec<ScannedSegment>,
    /// `*.spool` entries that are not read as segments (symlinks, FIFOs, unreadable or oversized
    /// files), with why: replay skips them too.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Reads every segment of a spool directory without taking it over: each is read under a shared
/// `flock` (released at once) or, when a live process holds it, read as it is and marked
/// [`ScannedSegment::locked`]. The same files are skipped as in replay. A missing directory is
/// an empty scan.
///
/// Errors: the directory exists but cannot be listed.
pub fn scan(dir: &Path) -> Result<Scan, SpoolError> {
    let mut names: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(it) => it.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "spool")).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Scan::default()),
        Err(source) => return Err(SpoolError::Io { path: dir.to_path_buf(), source }),
    };
    names.sort();
    let mut out = Scan::default();
    for path in names {
        match scan_segment(&path) {
            Ok(seg) => out.segments.push(seg),
            Err(why) => out.skipped.push((path, why)),
        }
    }
    Ok(out)
}

fn scan_segment(path: &Path) -> Result<ScannedSegment, String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !meta.file_type().is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > SEGMENT_BYTES + u64::from(MAX_RECORD) {
        return Err("larger than any segment this format writes".into());
    }
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let locked = match file.try_lock_shared() {
        Ok(()) => false,
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(std::fs::TryLockError::Error(e)) => return Err(e.to_string()),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    drop(file);
    let mut frames = Frames { bytes: &bytes, at: 0 };
    let header = frames.next().and_then(|(_, p)| SegmentHeader::decode(p).ok());
    let mut batches = Vec::new();
    if header.is_some() {
        for (offset, payload) in frames.by_ref() {
            let Ok(record) = SpoolBatch::decode(payload) else {
                frames.at = offset as usize;
                break;
            };
            batches.push((record.into_batch(), FRAME + payload.len() as u64));
        }
    }
    Ok(ScannedSegment { path: path.to_path_buf(), bytes: bytes.len() as u64, header, locked, batches, corrupt_bytes: (bytes.len() - frames.at) as u64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path, max: u64) -> SpoolSettings {
        SpoolSettings { directory: dir.to_path_buf(), max_bytes: max, when_full: WhenFull::DropNewest, fsync: true, destination: "t".into() }
    }

    fn batch(step: i64, v: f64) -> Batch {
        let run = RunInfo { key: "r".into(), experiment: Some("e".into()), run_name: None, run_id: Some("id".into()), params: BTreeMap::new(), tags: BTreeMap::new(), rank: Some(3) };
        Batch {
            run: Arc::new(run),
            points: vec![OutPoint { series: "loss".into(), step, time_unix_nano: 7, scalar: v, histogram: None, inputs: 3 }],
            resumed_at: (step == 2).then_some(2),
            idle: step == 2,
            ended: None,
        }
    }

    #[test]
    fn appended_batches_come_back_in_order_in_a_new_process_and_acked_ones_are_freed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut s, opened) = Spool::open("mlflow", settings(dir.path(), 1 << 20)).expect("open");
        assert!(opened.replayed.is_empty());
        let a = s.append(&batch(1, f64::NAN)).expect("append");
        let b = s.append(&batch(2, 2.5)).expect("append");
        let back = s.read(b).expect("read");
        assert_eq!((back.points[0].scalar, back.resumed_at, back.idle), (2.5, Some(2), true));
        assert!(s.read(a).expect("read").points[0].scalar.is_nan());
        s.ack(a);
        drop(s);
        let (mut s2, opened) = Spool::open("mlflow", settings(dir.path(), 1 << 20)).expect("reopen");
        // Acks are not persisted: both come back (MLflow deduplicates the one already delivered).
        let steps: Vec<i64> = opened.replayed.iter().map(|r| r.batch.points[0].step).collect();
        assert_eq!(steps, vec![1, 2]);
        assert_eq!(opened.replayed[0].batch.run.run_id.as_deref(), Some("id"));
        for r in &opened.replayed {
            s2.ack(r.at);
        }
        assert_eq!(directory_bytes(dir.path()), 0, "a fully acknowledged segment is removed");
    }

    #[test]
    fn planted_symlinks_and_fifos_are_skipped_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("00000000000000000001-1.spool")).expect("symlink");
        let fifo = dir.path().join("00000000000000000002-1.spool");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
        assert!(made.success());
        let (mut s, opened) = Spool::open("mlflow", settings(dir.path(), 1 << 20)).expect("open");
        assert!(opened.replayed.is_empty());
        // And the spool still works beside them.
        let at = s.append(&batch(1, 1.0)).expect("append");
        assert_eq!(s.read(at).expect("read").points[0].step, 1);
    }

    #[test]
    fn a_torn_tail_keeps_the_records_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut s, _) = Spool::open("mlflow", settings(dir.path(), 1 << 20)).expect("open");
        s.append(&batch(1, 1.0)).expect("append");
        s.append(&batch(2, 2.0)).expect("append");
        let path = s.segments.values().next().map(|g| g.path.clone()).expect("segment");
        drop(s);
        let len = std::fs::metadata(&path).expect("meta").len();
        OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(len - 3)).expect("truncate");
        let (_, opened) = Spool::open("mlflow", settings(dir.path(), 1 << 20)).expect("reopen");
        assert_eq!(opened.replayed.len(), 1);
        assert_eq!(opened.replayed[0].batch.points[0].step, 1);
        assert!(opened.corrupt_bytes > 0);
    }

    #[test]
    fn a_live_segment_or_another_target_is_not_adopted_and_the_limit_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut s, _) = Spool::open("mlflow", settings(dir.path(), 1 << 20)).expect("open");
        s.append(&batch(1, 1.0)).expect("append");
        let (_, other) = Spool::open("mlflow", settings(dir.path(), 1 << 20)).expect("second");
        assert!(other.replayed.is_empty(), "segments held by a live spool are not replayed");
        drop(s);
        let mut foreign = settings(dir.path(), 1 << 20);
        foreign.destination = "u".into();
        let (_, opened) = Spool::open("mlflow", foreign).expect("foreign");
        assert_eq!((opened.replayed.len(), opened.foreign_segments), (0, 1));
        let small = tempfile::tempdir().expect("tempdir");
        let (mut s, _) = Spool::open("mlflow", settings(small.path(), 30)).expect("open");
        assert!(matches!(s.append(&batch(1, 1.0)), Err(SpoolError::Full { max_bytes: 30 })));
    }
}
