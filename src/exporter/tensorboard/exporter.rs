//! The TensorBoard exporter: one event file per run and process session, written append-only.
//!
//! Rules (sources: TensorBoard's `event_file_writer.py`, `directory_watcher.py`, RustBoard's
//! `run.rs`/`reservoir.rs`; see `../shared/reference/tensorboard-event-files.md`):
//! - Files live in `<logdir>/<run dir>/`, the run dir being [`run_dir_name`] of the run name (else
//!   its key), so no run name can write outside the logdir. They are named
//!   `events.out.tfevents.<unix secs, 10 digits>.<host>.<pid>.<counter, 6 digits>`, so that
//!   lexicographic order is creation order, which both TensorBoard loaders rely on.
//! - A file is created on the first write (nothing is created for a run that sends nothing). It
//!   starts with a `file_version` event (`brain.Event:2`); the first step written in this process
//!   session is preceded by a `SessionLog START` at that step, then the run's params as an
//!   hparams `session_start_info`.
//! - Scalars are rank-0 DT_FLOAT tensors with the `scalars` plugin's metadata on the first value
//!   of each tag in each file (both loaders read this; RustBoard drops DT_DOUBLE scalars), so
//!   values are stored as float32. Histograms are `[k, 3]` tensors of the `histograms` plugin.
//! - Every export is written with one `write_all` and flushed to the OS: a crash of the process
//!   loses nothing that was exported; the file is fsynced when the run ends.
//! - A step at or below one already written for a tag is refused (`late`): RustBoard would
//!   discard every newer point of that tag.
//! - An I/O error is returned as retryable; the file is abandoned (it may end in a partial
//!   record, after which no reader can read further) and the retry starts a new file.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;

use super::config::TensorBoardSettings;
use super::encoder::{self, HParamValue};
use super::record::append_record;
use crate::batch::RunInfo;
use crate::cadence::OutBatch;
use crate::exporter::{ExportError, Exported, Exporter, RunOutcome};
use crate::names::run_dir_name;
use crate::stats::DropReason;

/// Distinguishes files one process opens within the same second.
static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Default)]
struct RunFile {
    dir: PathBuf,
    file: Option<(File, PathBuf)>,
    tags_in_file: HashSet<String>,
    written: HashMap<String, i64>,
    session_started: bool,
}

/// Writes TensorBoard event files. See the module docs.
#[derive(Debug)]
pub struct TensorBoardExporter {
    settings: TensorBoardSettings,
    runs: HashMap<String, RunFile>,
    /// The params each run first arrived with (what hparams shows, as MLflow keeps the first).
    params: HashMap<String, std::collections::BTreeMap<String, String>>,
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

impl TensorBoardExporter {
    /// An exporter writing under `settings.logdir`. Nothing touches the disk until the first
    /// export.
    pub fn new(settings: TensorBoardSettings) -> Self {
        Self { settings, runs: HashMap::new(), params: HashMap::new() }
    }

    /// The directory a run writes to (`<logdir>/<run dir>`).
    pub fn run_dir(&self, run: &RunInfo) -> PathBuf {
        self.settings.logdir.join(run_dir_name(run.display_name()))
    }
}

impl RunFile {
    fn open(&mut self) -> std::io::Result<&mut File> {
        if self.file.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let name = format!(
                "events.out.tfevents.{secs:010}.{}.{}.{:06}",
                host_for_file_name(),
                std::process::id(),
                FILE_COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let path = self.dir.join(name);
            let f = OpenOptions::new().write(true).create_new(true).open(&path)?;
            self.tags_in_file.clear();
            self.file = Some((f, path));
        }
        match self.file.as_mut() {
            Some((f, _)) => Ok(f),
            None => Err(std::io::Error::other("event file vanished")),
        }
    }
}

impl Exporter for TensorBoardExporter {
    fn export(&mut self, batch: &OutBatch, _timeout: Duration) -> Result<Exported, ExportError> {
        let dir = self.run_dir(&batch.run);
        let rf = self.runs.entry(batch.run.key.clone()).or_insert_with(|| RunFile { dir, ..Default::default() });
        let mut refused = Vec::new();
        let mut buf = Vec::new();
        let new_file = rf.file.is_none();
        // Tags first seen in this export get metadata; committed only after the write succeeds.
        let mut tags_in_file = if new_file { HashSet::new() } else { rf.tags_in_file.clone() };
        let mut written = rf.written.clone();
        let mut session_started = rf.session_started;
        if new_file {
            append_record(&mut buf, &encoder::file_version_event(now_secs()).encode_to_vec());
        }
        let mut i = 0;
        while i < batch.points.len() {
            let step = batch.points[i].step;
            let mut j = i;
            let mut values = Vec::new();
            let mut time = 0u64;
            while j < batch.points.len() && batch.points[j].step == step {
                let p = &batch.points[j];
                if written.get(&p.series).is_some_and(|w| step <= *w) {
                    refused.push((j, DropReason::Late));
                } else {
                    written.insert(p.series.clone(), step);
                    let first = tags_in_file.insert(p.series.clone());
                    values.push(match &p.histogram {
                        Some(h) => encoder::histogram_value(
                            &p.series, h.count, h.sum, h.min, h.max, &h.bounds, &h.counts, first,
                        ),
                        None => encoder::scalar_value(&p.series, p.scalar as f32, first),
                    });
                    time = time.max(p.time_unix_nano);
                }
                j += 1;
            }
            if !values.is_empty() {
                // A wall time of NaN makes RustBoard abandon the whole file; ours is always finite.
                let wall = if time == 0 { now_secs() } else { time as f64 / 1e9 };
                if !session_started {
                    session_started = true;
                    append_record(&mut buf, &encoder::session_start_event(wall, step).encode_to_vec());
                    let params = self.params.get(&batch.run.key).unwrap_or(&batch.run.params);
                    if !params.is_empty() {
                        let hp: Vec<(String, HParamValue)> =
                            params.iter().map(|(k, v)| (k.clone(), hparam_value(v))).collect();
                        let v = encoder::hparams_value(&hp, batch.run.display_name(), wall);
                        append_record(&mut buf, &encoder::summary_event(wall, step, vec![v]).encode_to_vec());
                    }
                }
                append_record(&mut buf, &encoder::summary_event(wall, step, values).encode_to_vec());
            }
            i = j;
        }
        if buf.is_empty() || (new_file && refused.len() == batch.points.len()) {
            return Ok(Exported { refused });
        }
        let result = rf.open().and_then(|f| {
            f.write_all(&buf)?;
            f.flush()
        });
        match result {
            Ok(()) => {
                rf.tags_in_file = tags_in_file;
                rf.written = written;
                rf.session_started = session_started;
                Ok(Exported { refused })
            }
            Err(e) => {
                let path = rf.file.take().map(|(_, p)| p).unwrap_or_else(|| rf.dir.clone());
                Err(ExportError::Retryable {
                    message: format!("writing {}: {e}", path.display()),
                    retry_after: None,
                })
            }
        }
    }

    fn observe_run(&mut self, run: &RunInfo) {
        if !self.params.contains_key(&run.key) {
            self.params.insert(run.key.clone(), run.params.clone());
        }
    }

    fn end_runs(&mut self, _outcome: RunOutcome, _timeout: Duration) -> Result<(), ExportError> {
        let mut first_error = None;
        for rf in self.runs.values_mut() {
            if let Some((f, path)) = rf.file.take() {
                if let Err(e) = f.sync_all() {
                    first_error.get_or_insert_with(|| format!("syncing {}: {e}", path.display()));
                }
            }
        }
        match first_error {
            Some(message) => Err(ExportError::Retryable { message, retry_after: None }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cadence::OutPoint;
    use std::sync::Arc;

    fn batch(run: &str, pts: &[(i64, &str, f64)]) -> OutBatch {
        OutBatch {
            run: Arc::new(RunInfo { key: run.into(), run_name: Some(run.into()), ..Default::default() }),
            points: pts
                .iter()
                .map(|(step, tag, v)| OutPoint {
                    series: tag.to_string(),
                    step: *step,
                    time_unix_nano: 1_700_000_000_000_000_000,
                    scalar: *v,
                    histogram: None,
                    inputs: 1,
                })
                .collect(),
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
}
