//! The TensorBoard exporter's run directories and file handling, read back with TensorBoard's
//! own loaders (both): runs sharing a name get their own directories, thousands of runs stay
//! within the open-file cap, and a failed write leaves no empty event files.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use common::{read_tb, Loader};
use trainmetrics::decode::RunInfo;
use trainmetrics::cadence::{Batch, OutPoint};
use trainmetrics::config::{DeliveryConfig, ExporterConfig, TensorBoardConfig};
use trainmetrics::exporter::tensorboard::exporter::{MAX_OPEN_FILES, RUN_MARKER};
use trainmetrics::exporter::tensorboard::{TensorBoardExporter, TensorBoardSettings};
use trainmetrics::exporter::{ExportError, Exporter, RunOutcome};
use trainmetrics::names::fnv1a32;
use trainmetrics::Pipeline;

const T: Duration = Duration::from_secs(5);

/// Tests here count the process's open file descriptors; running them one at a time keeps the
/// other tests' loader subprocesses (pipes) out of that count.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn exporter(logdir: &Path) -> TensorBoardExporter {
    TensorBoardExporter::new(TensorBoardSettings { logdir: logdir.to_path_buf() })
}

fn run(key: &str, name: &str) -> Arc<RunInfo> {
    Arc::new(RunInfo { key: key.into(), run_name: Some(name.into()), ..Default::default() })
}

/// One `loss` point per step.
fn batch(run: &Arc<RunInfo>, steps: &[(i64, f64)]) -> Batch {
    Batch {
        run: run.clone(),
        points: steps
            .iter()
            .map(|(step, v)| OutPoint {
                series: "loss".into(),
                step: *step,
                time_unix_nano: 1_790_000_000_000_000_000 + *step as u64 * 1_000_000,
                scalar: *v,
                histogram: None,
                inputs: 1,
            })
            .collect(),
        ..Default::default()
    }
}

fn steps(range: std::ops::RangeInclusive<i64>, value: impl Fn(i64) -> f64) -> Vec<(i64, f64)> {
    range.map(|s| (s, value(s))).collect()
}

/// run dir → `loss` points, as `loader` shows them.
fn losses(logdir: &Path, loader: Loader) -> BTreeMap<String, Vec<(i64, f64)>> {
    read_tb(logdir, loader)
        .scalars
        .into_iter()
        .map(|(run, mut tags)| (run, tags.remove("loss").unwrap_or_default()))
        .collect()
}

/// Every `*tfevents*` file under `dir`, recursively.
fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(event_files(&path));
        } else if entry.file_name().to_string_lossy().contains("tfevents") {
            out.push(path);
        }
    }
    out
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

#[test]
fn runs_with_the_same_name_get_their_own_directories_and_keep_them_on_restart() {
    let _serial = serial();
    let logdir = tempfile::tempdir().expect("tempdir");
    let a = run("key-a", "mlp");
    let b = run("key-b", "mlp");
    let value_a = |s: i64| 1.0 + s as f64 * 0.25;
    let value_b = |s: i64| 100.0 + s as f64 * 0.5;
    let mut e = exporter(logdir.path());
    e.export(&batch(&a, &steps(1..=10, value_a)), T).expect("run a");
    e.export(&batch(&b, &steps(1..=10, value_b)), T).expect("run b");
    e.end_runs(RunOutcome::Finished, T).expect("end runs");
    let b_dir = format!("mlp~{:08x}", fnv1a32("key-b"));
    let dirs = e.run_dirs().lock().expect("run dirs").clone();
    assert_eq!(dirs.get("key-a"), Some(&logdir.path().join("mlp")));
    assert_eq!(dirs.get("key-b"), Some(&logdir.path().join(&b_dir)));
    assert_eq!(std::fs::read(logdir.path().join(&b_dir).join(RUN_MARKER)).ok(), Some(b"key-b".to_vec()));

    // Restarted processes (new exporters), b first: each run key finds its own directory again.
    let mut e = exporter(logdir.path());
    e.export(&batch(&b, &steps(11..=20, value_b)), T).expect("run b resumed");
    e.end_runs(RunOutcome::Finished, T).expect("end runs");
    let mut e = exporter(logdir.path());
    e.export(&batch(&a, &steps(11..=20, value_a)), T).expect("run a resumed");
    e.end_runs(RunOutcome::Finished, T).expect("end runs");
    assert_eq!(e.run_dirs().lock().expect("run dirs").get("key-a"), Some(&logdir.path().join("mlp")));

    let expected: BTreeMap<String, Vec<(i64, f64)>> = [
        ("mlp".to_string(), steps(1..=20, value_a)),
        (b_dir.clone(), steps(1..=20, value_b)),
    ]
    .into_iter()
    .collect();
    for loader in [Loader::Python, Loader::Rust] {
        assert_eq!(losses(logdir.path(), loader), expected, "{loader:?}");
    }
}

#[test]
fn hundreds_of_runs_stay_within_the_open_file_cap() {
    let _serial = serial();
    let logdir = tempfile::tempdir().expect("tempdir");
    let runs: Vec<Arc<RunInfo>> = (0..200).map(|i| run(&format!("key-{i}"), &format!("run-{i:03}"))).collect();
    let value = |i: usize, s: i64| i as f64 + s as f64 / 4.0;
    let fds_before = open_fds();
    let mut most_fds = 0;
    let mut e = exporter(logdir.path());
    // Round-robin over the runs, so every file is closed and reopened between its steps.
    for step in 1..=3 {
        for (i, r) in runs.iter().enumerate() {
            e.export(&batch(r, &[(step, value(i, step))]), T).expect("export");
            assert!(e.open_files() <= MAX_OPEN_FILES, "{} files open", e.open_files());
            most_fds = most_fds.max(open_fds());
        }
    }
    e.end_runs(RunOutcome::Finished, T).expect("end runs");
    if cfg!(target_os = "linux") {
        assert!(most_fds <= fds_before + MAX_OPEN_FILES, "{most_fds} fds open, {fds_before} before");
        assert!(open_fds() <= fds_before, "files left open after end_runs");
    }
    // Reopened files were appended to, not replaced: one file per run.
    for i in 0..runs.len() {
        assert_eq!(event_files(&logdir.path().join(format!("run-{i:03}"))).len(), 1, "run-{i:03}");
    }
    let expected: BTreeMap<String, Vec<(i64, f64)>> =
        (0..runs.len()).map(|i| (format!("run-{i:03}"), steps(1..=3, |s| value(i, s)))).collect();
    for loader in [Loader::Python, Loader::Rust] {
        assert_eq!(losses(logdir.path(), loader), expected, "{loader:?}");
    }
}

#[test]
fn an_unwritable_run_dir_fails_retryably_and_leaves_no_event_files() {
    let _serial = serial();
    let logdir = tempfile::tempdir().expect("tempdir");
    let blocker = logdir.path().join("blocked");
    std::fs::write(&blocker, b"not a directory").expect("write blocker");
    let blocked = run("key-blocked", "blocked");
    let fine = run("key-fine", "fine");
    let mut e = exporter(logdir.path());
    for _ in 0..7 {
        match e.export(&batch(&blocked, &steps(1..=3, |s| s as f64)), T) {
            Err(ExportError::Retryable { message, .. }) => {
                assert!(message.contains(&blocker.display().to_string()), "{message}")
            }
            other => panic!("expected a retryable error, got {other:?}"),
        }
    }
    e.export(&batch(&fine, &steps(1..=3, |s| s as f64)), T).expect("the other run still writes");
    e.end_runs(RunOutcome::Finished, T).expect("end runs");
    let files = event_files(logdir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with(logdir.path().join("fine")), "{files:?}");
    for f in &files {
        assert!(std::fs::metadata(f).map(|m| m.len()).unwrap_or(0) > 0, "empty event file {}", f.display());
    }
    assert_eq!(std::fs::read(&blocker).ok(), Some(b"not a directory".to_vec()));
    for loader in [Loader::Python, Loader::Rust] {
        let seen = losses(logdir.path(), loader);
        assert_eq!(seen.keys().collect::<Vec<_>>(), vec!["fine"], "{loader:?}");
    }
}

#[test]
fn a_restarted_trainer_continues_its_run_by_id_and_a_new_id_gets_its_own_directory() {
    let _serial = serial();
    let logdir = tempfile::tempdir().expect("tempdir");
    for (id, first, last) in [("r-1", 1, 5), ("r-1", 6, 10), ("r-2", 1, 3)] {
        let p = Pipeline::builder()
            .run_name("restarted")
            .run_id(id)
            .exporter("tensorboard", ExporterConfig { backend: TensorBoardConfig { logdir: Some(logdir.path().into()) }, delivery: DeliveryConfig::default() })
            .build()
            .expect("pipeline");
        let rec = p.recorder();
        for step in first..=last {
            rec.record(step, "x", step as f64 + if id == "r-2" { 0.5 } else { 0.0 });
        }
        drop(p);
    }
    let other = format!("restarted~{:08x}", fnv1a32("r-2"));
    assert_eq!(event_files(&logdir.path().join("restarted")).len(), 2, "one event file per process session");
    assert_eq!(event_files(&logdir.path().join(&other)).len(), 1);
    for loader in [Loader::Python, Loader::Rust] {
        let tb = read_tb(logdir.path(), loader);
        assert_eq!(tb.scalars["restarted"]["x"], steps(1..=10, |s| s as f64), "{loader:?}");
        assert_eq!(tb.scalars[&other]["x"], steps(1..=3, |s| s as f64 + 0.5), "{loader:?}");
    }
    assert_eq!(read_tb(logdir.path(), Loader::Python).session_starts["restarted"], vec![1, 6]);
}
