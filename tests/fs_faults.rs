//! Faults in the file system under the TensorBoard exporter (issue 4, items 5 and 6): a
//! read-only logdir, a full disk, a trainer killed mid-write, and symlinks planted in the logdir.
//! TensorBoard fails and reports it while training and MLflow carry on; once the file system
//! recovers, TensorBoard catches up with every point exactly once, and both of TensorBoard's
//! loaders read every record. The file-system faults are real: a tmpfs mounted for the test
//! (root needed), remounted read-only or filled up, unmounted at the end even on failure.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{history, mlflow_config, mlflow_run_id, mlflow_uri, read_tb, read_tb_both, trainer, unique, Loader};
use trainmetrics::config::{DeliveryConfig, ExporterConfig, RetryConfig, TensorBoardConfig};
use trainmetrics::exporter::tensorboard::record::masked_crc32c;
use trainmetrics::Pipeline;

/// A tmpfs mounted on a fresh directory; unmounted when dropped (also when the test fails).
struct Tmpfs {
    dir: PathBuf,
    _holder: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let holder = tempfile::tempdir().expect("tempdir");
        let dir = holder.path().join("mnt");
        std::fs::create_dir(&dir).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("missing component: the mount command");
        assert!(
            out.status.success(),
            "missing component: mounting a tmpfs (this test needs root or CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir, _holder: holder }
    }

    fn remount(&self, mode: &str) {
        let out = Command::new("mount").args(["-o", &format!("remount,{mode}")]).arg(&self.dir).output().expect("mount");
        assert!(out.status.success(), "remount {mode}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.dir).status().is_ok_and(|s| s.success());
        if !ok {
            // Busy (a file still open in a failing test): detach it now, freed when closed.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// TensorBoard every step, collecting every 100 ms, retrying quickly and for long.
fn tb(logdir: &Path) -> ExporterConfig<TensorBoardConfig> {
    ExporterConfig {
        backend: TensorBoardConfig { logdir: Some(logdir.to_path_buf()) },
        delivery: DeliveryConfig {
            every_steps: Some(1),
            reader_interval: Some(Duration::from_millis(100)),
            retry_on_failure: RetryConfig {
                initial_interval: Some(Duration::from_millis(100)),
                max_interval: Some(Duration::from_millis(300)),
                max_elapsed_time: Some(Duration::from_secs(600)),
                ..Default::default()
            },
            ..Default::default()
        },
    }
}

/// Polls `cond` every 100 ms for up to 60 s (a generous bound, not a speed assertion).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The MLflow run id once the exporter has one.
fn mlflow_id(p: &Pipeline) -> Option<String> {
    p.run_destinations().into_iter().find_map(|l| match l {
        trainmetrics::RunDestination::Mlflow { run_id, .. } => run_id,
        _ => None,
    })
}

fn tb_report(p: &Pipeline) -> trainmetrics::ExporterReport {
    p.reports().into_iter().find(|r| r.name == "tensorboard").expect("tensorboard report")
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(event_files(&p));
        } else if p.to_string_lossy().contains("tfevents") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Number of whole records in an event file, asserting each one's framing and both CRCs, and
/// that nothing follows the last one (no partial record).
fn assert_whole_records(path: &Path) -> usize {
    let (n, torn) = whole_records(path);
    assert_eq!(torn, 0, "{}: a partial record of {torn} bytes after {n} whole ones", path.display());
    n
}

/// Whole records of an event file (each one's framing and both CRCs asserted) and the length of
/// what follows the last one without forming a record (0: the file ends on a record boundary).
fn whole_records(path: &Path) -> (usize, usize) {
    let b = std::fs::read(path).expect("event file");
    let (mut i, mut n) = (0, 0);
    while i + 12 <= b.len() {
        let len_bytes: [u8; 8] = b[i..i + 8].try_into().expect("8 bytes");
        assert_eq!(b[i + 8..i + 12], masked_crc32c(&len_bytes).to_le_bytes(), "{}: length CRC at {i}", path.display());
        let len = u64::from_le_bytes(len_bytes) as usize;
        let end = i + 12 + len + 4;
        if end > b.len() {
            break;
        }
        assert_eq!(b[end - 4..end], masked_crc32c(&b[i + 12..end - 4]).to_le_bytes(), "{}: data CRC at {i}", path.display());
        i = end;
        n += 1;
    }
    (n, b.len() - i)
}

fn expect_losses(steps: std::ops::RangeInclusive<i64>) -> Vec<(i64, f64)> {
    steps.map(|s| (s, f64::from((s as f64 * 0.5) as f32))).collect()
}

#[test]
fn a_read_only_logdir_fails_tensorboard_only_and_it_catches_up_when_writable() {
    let fs = Tmpfs::mount("8m");
    let logdir = fs.dir.join("logdir");
    std::fs::create_dir(&logdir).expect("logdir");
    fs.remount("ro");
    let exp = unique("fs-ro");
    let p = Pipeline::builder()
        .experiment(&exp)
        .run_name("ro")
        .exporter("tensorboard", tb(&logdir))
        .exporter("mlflow", mlflow_config(1, &[]))
        .build()
        .expect("pipeline");
    let rec = p.recorder();
    for step in 1..=30 {
        rec.record(step, "loss", step as f64 * 0.5);
    }
    let uri = mlflow_uri();
    wait_for("MLflow to log all 30 steps", || mlflow_id(&p).is_some_and(|id| history(&uri, &id, "loss").len() == 30));
    wait_for("TensorBoard to report the read-only logdir", || {
        tb_report(&p).last_error.is_some_and(|e| e.contains("Read-only file system"))
    });
    let r = tb_report(&p);
    assert_eq!((r.received, r.delivered, r.dropped_total()), (30, 0, 0), "{r}");
    fs.remount("rw");
    let report = p.shutdown();
    for e in &report.exporters {
        assert_eq!((e.received, e.delivered, e.dropped_total()), (30, 30, 0), "{e}");
    }
    let mut steps: Vec<(i64, f64)> = history(&uri, &mlflow_run_id(&p), "loss").iter().map(|m| (m.0, m.1)).collect();
    steps.sort_by_key(|m| m.0);
    assert_eq!(steps, (1..=30).map(|s| (s, s as f64 * 0.5)).collect::<Vec<_>>());
    let tbv = read_tb_both(&logdir);
    assert_eq!(tbv.scalars["ro"]["loss"], expect_losses(1..=30));
    for f in event_files(&logdir) {
        assert_whole_records(&f);
    }
}

#[test]
fn a_full_disk_fails_tensorboard_only_and_it_catches_up_when_space_is_freed() {
    let fs = Tmpfs::mount("1m");
    let logdir = fs.dir.join("logdir");
    std::fs::create_dir(&logdir).expect("logdir");
    let exp = unique("fs-full");
    let p = Pipeline::builder()
        .experiment(&exp)
        .run_name("full")
        .exporter("tensorboard", tb(&logdir))
        .exporter("mlflow", mlflow_config(1, &[]))
        .build()
        .expect("pipeline");
    let rec = p.recorder();
    for step in 1..=20 {
        rec.record(step, "loss", step as f64 * 0.5);
    }
    p.flush(Duration::from_secs(30)).expect("first steps delivered");
    // Fill the disk: the event file's last page keeps some room, so the next writes fail part-way.
    let filler = fs.dir.join("filler");
    let mut f = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.flush();
    drop(f);
    for step in 21..=600 {
        rec.record(step, "loss", step as f64 * 0.5);
    }
    let uri = mlflow_uri();
    wait_for("MLflow to log all 600 steps", || mlflow_id(&p).is_some_and(|id| history(&uri, &id, "loss").len() == 600));
    // "writing …": a write failed (part-way, as the page's room ran out), not an open.
    wait_for("TensorBoard to report the full disk", || {
        tb_report(&p).last_error.is_some_and(|e| e.starts_with("writing") && e.contains("No space left on device"))
    });
    let r = tb_report(&p);
    assert!(r.delivered < 600 && r.dropped_total() == 0, "{r}");
    std::fs::remove_file(&filler).expect("free space");
    let report = p.shutdown();
    for e in &report.exporters {
        assert_eq!((e.received, e.delivered, e.dropped_total()), (600, 600, 0), "{e}");
    }
    let tbv = read_tb_both(&logdir);
    assert_eq!(tbv.scalars["full"]["loss"], expect_losses(1..=600));
    let files = event_files(&logdir);
    assert_eq!(files.len(), 1, "a part-written record is cut back and the file goes on: {files:?}");
    assert!(assert_whole_records(&files[0]) > 0);
}

/// `step,name,value` lines of a `--record-csv` file that were written completely (a killed
/// trainer's buffered file may end in a partial line).
fn complete_csv(path: &Path) -> Vec<(i64, String, f64)> {
    let text = std::fs::read_to_string(path).expect("csv");
    let whole = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    whole
        .lines()
        .skip(1)
        .map(|l| {
            let mut it = l.splitn(3, ',');
            let (Some(s), Some(n), Some(v)) = (it.next(), it.next(), it.next()) else { panic!("bad csv line {l:?}") };
            (s.parse().expect("step"), n.to_string(), v.parse().expect("value"))
        })
        .collect()
}

#[test]
fn a_trainer_killed_mid_run_leaves_event_files_both_loaders_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (killed_dir, full_dir) = (dir.path().join("killed"), dir.path().join("full"));
    let args = |logdir: &Path, csv: &Path| {
        let mut c = Command::new(trainer());
        c.args(["--no-mlflow", "--steps", "5000", "--seed", "7", "--run-name", "run"])
            .arg("--logdir")
            .arg(logdir)
            .arg("--record-csv")
            .arg(csv)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let killed_csv = dir.path().join("killed.csv");
    let mut child = args(&killed_dir, &killed_csv).args(["--sleep-ms", "5"]).spawn().expect("run the example trainer");
    wait_for("the trainer to write a few hundred steps", || {
        event_files(&killed_dir).iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum::<u64>() > 60_000
    });
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    // The same run to the end (deterministic for a seed), for what the killed one's buffered CSV
    // had not written yet; train.throughput is a timing, so only the killed run's CSV has it.
    let full_csv = dir.path().join("full.csv");
    assert!(args(&full_dir, &full_csv).status().expect("run the example trainer").success());
    let killed_rows = complete_csv(&killed_csv);
    let full_rows = complete_csv(&full_csv);
    let value = |rows: &[(i64, String, f64)], step: i64, name: &str| {
        rows.iter().find(|r| r.0 == step && r.1 == name).map(|r| f64::from(r.2 as f32))
    };

    let files = event_files(&killed_dir);
    let views = [read_tb(&killed_dir, Loader::Python), read_tb(&killed_dir, Loader::Rust)];
    assert_eq!(common::fmt_scalars(&views[0]), common::fmt_scalars(&views[1]), "the loaders disagree");
    let tags = &views[0].scalars["run"];
    let loss = &tags["train.loss"];
    assert!(loss.len() >= 100, "read {} steps of train.loss", loss.len());
    let mut unverifiable = 0;
    for (tag, points) in tags {
        for (i, (step, v)) in points.iter().enumerate() {
            let want = if tag == "train.throughput" { value(&killed_rows, *step, tag) } else { value(&full_rows, *step, tag) };
            match want {
                Some(w) => assert_eq!(*v, w, "{tag} at step {step}"),
                None => {
                    // Only the last throughput values, recorded after the CSV's last flush.
                    assert!(tag == "train.throughput" && killed_rows.iter().all(|r| r.0 <= *step), "{tag} at {step} not recorded");
                    unverifiable += 1;
                }
            }
            if tag != "eval.loss" && tag != "eval.accuracy" {
                assert_eq!(*step, points[0].0 + i as i64, "{tag}: contiguous steps up to the last flush");
            }
        }
    }
    assert!(unverifiable < 200, "{unverifiable}");
    // Only the last file can end in a torn record: SIGKILL cuts a write(2) in progress at a
    // page boundary (Linux checks for a fatal signal between pages), which no writer can
    // prevent. Both readers skip a torn last record; where the kill left none, simulate one.
    let (last, earlier) = files.split_last().expect("event file");
    for f in earlier {
        assert_whole_records(f);
    }
    let (whole, torn) = whole_records(last);
    assert!(whole > 0);
    eprintln!("the killed trainer's last event file: {whole} whole records, a torn tail of {torn} bytes");
    if torn == 0 {
        let mut f = std::fs::OpenOptions::new().append(true).open(last).expect("open");
        f.write_all(&[0x40, 0, 0, 0, 0, 0, 0, 0, 1, 2]).expect("append a torn record");
    }
    let torn = [read_tb(&killed_dir, Loader::Python), read_tb(&killed_dir, Loader::Rust)];
    for (a, b) in views.iter().zip(&torn) {
        assert_eq!(common::fmt_scalars(a), common::fmt_scalars(b));
    }
}

#[test]
fn a_symlink_planted_in_the_logdir_is_never_written_through() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (logdir, outside) = (dir.path().join("logdir"), dir.path().join("outside"));
    std::fs::create_dir_all(logdir.join("marked")).expect("dirs");
    std::fs::create_dir(&outside).expect("outside");
    // A run directory that is a symlink out of the logdir, and a marker that is one.
    std::os::unix::fs::symlink(&outside, logdir.join("planted")).expect("symlink");
    std::os::unix::fs::symlink(outside.join("marker"), logdir.join("marked").join(".trainmetrics-run")).expect("symlink");
    for name in ["planted", "marked"] {
        let p = Pipeline::builder().run_name(name).exporter("tensorboard", tb(&logdir)).build().expect("pipeline");
        let rec = p.recorder();
        for step in 1..=5 {
            rec.record(step, "loss", step as f64 * 0.5);
        }
        let report = p.shutdown();
        assert_eq!((report.exporters[0].delivered, report.exporters[0].dropped_total()), (5, 0), "{}", report.exporters[0]);
        let dirs = p.run_destinations().iter().map(|l| l.to_string()).collect::<Vec<_>>().join(" ");
        assert!(dirs.contains(&format!("{name}~")), "the run went to a suffixed directory: {dirs}");
    }
    assert_eq!(std::fs::read_dir(&outside).expect("outside").count(), 0, "nothing written outside the logdir");
    let tbv = read_tb_both(&logdir);
    let runs: Vec<&String> = tbv.scalars.keys().collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    for tags in tbv.scalars.values() {
        assert_eq!(tags["loss"], expect_losses(1..=5));
    }
}
