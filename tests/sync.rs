//! `trainmetrics sync` and `trainmetrics spool` (issue 7, item 9), run as the real binary against
//! a real MLflow server: trainers (library pipelines, a service) end while MLflow is unreachable,
//! their batches stay in a spool root (a temp dir, laid out as the default one:
//! `<root>/<exporter>`), and `sync` delivers them later, as `wandb sync` does for offline runs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::{history, MlflowServer};
use trainmetrics::cadence::Batch;
use trainmetrics::config::{ExporterConfig, MlflowConfig, RetryConfig};
use trainmetrics::Pipeline;

fn value(step: i64) -> f64 {
    1.0 / (step as f64 + 1.0) + 0.001 * (step % 7) as f64
}

/// An MLflow exporter writing every step, spooling into `<root>/mlflow` (the default layout),
/// retrying after `retry`.
fn exporter(uri: &str, root: &Path, retry: Duration) -> ExporterConfig<MlflowConfig> {
    let retry = RetryConfig { initial_interval: Some(retry), max_interval: Some(retry), ..Default::default() };
    common::spooling_mlflow(uri, &root.join("mlflow"), retry, None)
}

/// Runs the binary; (exit success, stdout, stderr). No MLflow variables leak in from the
/// environment.
fn trainmetrics(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trainmetrics"));
    cmd.args(args);
    for k in ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run trainmetrics");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Per run key, from the crate's own spool reader: (run name, batches with points, points,
/// oldest point time, end status).
#[derive(Debug, Default, PartialEq)]
struct Spooled {
    name: String,
    batches: u64,
    points: u64,
    oldest: u64,
    ended: Option<&'static str>,
}

fn spooled(dir: &Path) -> BTreeMap<String, Spooled> {
    let mut out: BTreeMap<String, Spooled> = BTreeMap::new();
    for b in trainmetrics::spool::inspect(dir) {
        let s = out.entry(b.run.key.clone()).or_insert_with(|| Spooled { oldest: u64::MAX, ..Default::default() });
        s.name = b.run.run_name.clone().unwrap_or_default();
        note(s, &b);
    }
    out
}

fn note(s: &mut Spooled, b: &Batch) {
    if !b.points.is_empty() {
        s.batches += 1;
        s.points += b.points.len() as u64;
    }
    s.oldest = b.points.iter().map(|p| p.time_unix_nano).fold(s.oldest, u64::min);
    if let Some(e) = b.ended {
        s.ended = Some(e.status.as_str());
    }
}

fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// The line of `out` that mentions run `name`.
fn line_of<'a>(out: &'a str, name: &str) -> &'a str {
    let needle = format!("run \"{name}\"");
    out.lines().find(|l| l.contains(&needle)).unwrap_or_else(|| panic!("no line for {name}:\n{out}"))
}

/// The MLflow run of `experiment` named `name`.
fn run_named(uri: &str, experiment: &str, name: &str) -> serde_json::Value {
    let runs = common::runs_of_experiment(uri, experiment);
    let found: Vec<_> = runs.iter().filter(|r| r["info"]["run_name"] == name).collect();
    assert_eq!(found.len(), 1, "one MLflow run named {name}: {runs:?}");
    found[0].clone()
}

/// `key`'s history holds exactly `steps` once each with `f(step)`, in step order.
fn assert_history(uri: &str, run_id: &str, key: &str, steps: std::ops::RangeInclusive<i64>, f: impl Fn(i64) -> f64) {
    let mut h = history(uri, run_id, key);
    h.sort_by_key(|m| m.0);
    let got: Vec<(i64, f64)> = h.iter().map(|m| (m.0, m.1)).collect();
    let want: Vec<(i64, f64)> = steps.map(|s| (s, f(s))).collect();
    assert_eq!(got, want, "{key}: every step once, values exact");
}

fn segment_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Two trainers end while MLflow is unreachable (one cleanly, one after `fail()`): `spool` and
/// `sync --dry-run` list exactly what waits; `sync` with the server still down exits 1 and keeps
/// every byte; once the server is up, `sync` (credentials in the URI, never printed) delivers every
/// point with its exact step and value, ends the runs FINISHED and FAILED as the trainers would
/// have, prints per run the MLflow run id and counts, and exits 0; a second `sync` delivers
/// nothing and says so.
#[test]
fn sync_delivers_what_trainers_left_while_mlflow_was_down_and_a_second_sync_delivers_nothing() {
    let data = tempfile::tempdir().expect("tempdir");
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("mlflow");
    let port = common::free_port();
    let uri = format!("http://127.0.0.1:{port}");
    let experiment = common::unique("sync");
    let ok = Pipeline::builder()
        .experiment(&experiment)
        .run_name("offline-ok")
        .exporter("mlflow", exporter(&uri, root.path(), Duration::from_millis(200)))
        .shutdown_timeout(Duration::from_secs(2))
        .build()
        .expect("pipeline");
    let rec = ok.recorder();
    for step in 1..=40 {
        rec.record_all(step, &[("loss", value(step)), ("lr", value(step) / 10.0)]);
    }
    let r = ok.shutdown();
    let ml = &r.exporters[0];
    assert_eq!((ml.received, ml.delivered, ml.dropped_total(), ml.spooled), (80, 0, 0, 80), "{ml}");
    let failed = Pipeline::builder()
        .experiment(&experiment)
        .run_name("offline-failed")
        .exporter("mlflow", exporter(&uri, root.path(), Duration::from_millis(200)))
        .shutdown_timeout(Duration::from_secs(2))
        .build()
        .expect("pipeline");
    let rec = failed.recorder();
    for step in 1..=15 {
        rec.record(step, "loss", 2.0 * value(step));
    }
    failed.fail();
    let r = failed.shutdown();
    // The second trainer adopted the first one's segment too (same spool directory and destination)
    // and could not deliver it either.
    let ml = &r.exporters[0];
    assert_eq!((ml.received, ml.spooled, ml.events.get("replayed_from_spool")), (95, 95, Some(&80)), "{ml}");

    // What waits, read with the crate's spool reader: each run's batches and its end record.
    let waiting = spooled(&dir);
    let by_name = |n: &str| waiting.values().find(|s| s.name == n).unwrap_or_else(|| panic!("{n} not spooled: {waiting:?}"));
    let (a, b) = (by_name("offline-ok"), by_name("offline-failed"));
    assert_eq!((a.points, a.ended, b.points, b.ended), (80, Some("FINISHED"), 15, Some("FAILED")), "{waiting:?}");
    let total_bytes = trainmetrics::spool::directory_bytes(&dir);
    let root_s = root.path().to_str().expect("utf-8 path");

    let (success, listing, err) = trainmetrics(&["spool", "--dir", root_s], &[]);
    assert!(success, "{listing}{err}");
    eprintln!("trainmetrics spool:\n{listing}");
    let destination = format!("mlflow {uri}");
    assert!(listing.contains(&format!("{} ({destination}): 2 segment(s), {total_bytes} bytes", dir.display())), "{listing}");
    for (name, s) in [("offline-ok", a), ("offline-failed", b)] {
        let line = line_of(&listing, name);
        let want = format!("{} batches, {} points, ", s.batches, s.points);
        assert!(line.contains(&want), "{want} in {line}");
        assert!(line.contains(&format!("oldest {}, then ends {}", rfc3339(s.oldest), s.ended.unwrap_or("-"))), "{line}");
    }
    let (success, dry, err) = trainmetrics(&["sync", "--dir", root_s, "--tracking-uri", &uri, "--dry-run"], &[]);
    assert!(success, "{dry}{err}");
    assert_eq!(dry, listing, "sync --dry-run lists what spool lists");

    // The server is still down: nothing moves, exit 1, the place is named.
    let before = segment_bytes(&dir);
    let (success, out, err) = trainmetrics(&["sync", "--dir", root_s, "--tracking-uri", &uri, "--timeout", "2s"], &[]);
    assert!(!success, "exit 1 while MLflow is unreachable:\n{out}{err}");
    eprintln!("trainmetrics sync (MLflow down):\n{out}");
    let want = format!("NOT DELIVERED: {} batches, 95 points stay in {}", a.batches + b.batches, dir.display());
    assert!(out.contains(&want) && out.contains("last error:"), "{want} in:\n{out}");
    assert!(out.contains("delivered 0 points in 0 batches of 0 run(s)"), "{out}");
    assert_eq!(segment_bytes(&dir), before, "every segment kept, byte for byte");

    let server = MlflowServer::start(port, data.path());
    let secret_uri = format!("http://sync-user:s3cret-pw@127.0.0.1:{port}/");
    let synced_at = std::time::SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64;
    let (success, out, err) = trainmetrics(&["sync", "--dir", root_s, "--tracking-uri", &secret_uri], &[("MLFLOW_TRACKING_TOKEN", "t0ken-s3cret")]);
    assert!(success, "{out}{err}");
    assert!(!format!("{out}{err}").contains("s3cret"), "a credential was printed:\n{out}{err}");
    eprintln!("trainmetrics sync:\n{out}");
    let ok_run = run_named(&uri, &experiment, "offline-ok");
    let failed_run = run_named(&uri, &experiment, "offline-failed");
    let ok_id = ok_run["info"]["run_id"].as_str().expect("id");
    let failed_id = failed_run["info"]["run_id"].as_str().expect("id");
    let line = line_of(&out, "offline-ok");
    assert!(line.contains(&format!("-> MLflow run {ok_id}: delivered 80 points in {} batches, ended FINISHED", a.batches)), "{line}");
    let line = line_of(&out, "offline-failed");
    assert!(line.contains(&format!("-> MLflow run {failed_id}: delivered 15 points in {} batches, ended FAILED", b.batches)), "{line}");
    assert!(out.contains(&format!("delivered 95 points in {} batches of 2 run(s)\n  nothing left", a.batches + b.batches)), "{out}");
    assert_history(&uri, ok_id, "loss", 1..=40, value);
    assert_history(&uri, ok_id, "lr", 1..=40, |s| value(s) / 10.0);
    assert_history(&uri, failed_id, "loss", 1..=15, |s| 2.0 * value(s));
    let (ok_info, failed_info) = (&common::run(&uri, ok_id)["info"], &common::run(&uri, failed_id)["info"]);
    assert_eq!((ok_info["status"].as_str(), failed_info["status"].as_str()), (Some("FINISHED"), Some("FAILED")));
    // The end time is the trainer's, not the sync's.
    let ok_end = ok_info["end_time"].as_i64().or_else(|| ok_info["end_time"].as_str()?.parse().ok()).expect("end_time");
    let ok_start = ok_info["start_time"].as_i64().or_else(|| ok_info["start_time"].as_str()?.parse().ok()).expect("start_time");
    assert!(ok_start <= ok_end && (ok_end as u64) * 1_000_000 >= a.oldest && ok_end < synced_at, "{ok_info}");
    assert_eq!(trainmetrics::spool::directory_bytes(&dir), 0, "delivered segments leave the spool");

    let (success, out, err) = trainmetrics(&["sync", "--dir", root_s, "--tracking-uri", &uri], &[]);
    assert!(success, "{out}{err}");
    assert_eq!(out, format!("nothing to sync for {destination} in {root_s}: nothing delivered\n"));
    assert_eq!(history(&uri, ok_id, "loss").len(), 40, "the second sync delivered nothing");
    assert_eq!(history(&uri, failed_id, "loss").len(), 15);
    let (success, out, _) = trainmetrics(&["spool", "--dir", root_s], &[]);
    assert!(success && out == format!("nothing waits in {root_s}\n"), "{out}");
    server.stop();
}

/// A segment held by a live process (its `flock`) is listed as skipped and not touched, even
/// with MLflow up; once that process has ended, `sync` delivers it.
#[test]
fn a_segment_locked_by_a_live_process_is_skipped_and_delivered_after_it_ends() {
    let data = tempfile::tempdir().expect("tempdir");
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("mlflow");
    let port = common::free_port();
    let uri = format!("http://127.0.0.1:{port}");
    let experiment = common::unique("sync-locked");
    // Retries only after 10 minutes (±50 %): the live trainer does not deliver during the test.
    let live = Pipeline::builder()
        .experiment(&experiment)
        .run_name("live")
        .exporter("mlflow", exporter(&uri, root.path(), Duration::from_secs(600)))
        .shutdown_timeout(Duration::from_secs(2))
        .build()
        .expect("pipeline");
    let rec = live.recorder();
    for step in 1..=12 {
        rec.record(step, "loss", value(step));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while spooled(&dir).values().map(|s| s.points).sum::<u64>() < 12 {
        assert!(Instant::now() < deadline, "the failing run was never written ahead: {}", live.reports()[0]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let server = MlflowServer::start(port, data.path());
    let root_s = root.path().to_str().expect("utf-8 path");
    let before = segment_bytes(&dir);
    assert_eq!(before.len(), 1, "one segment");
    let seg = dir.join(&before[0].0);
    let s = spooled(&dir).into_values().next().expect("spooled run");

    let (success, out, err) = trainmetrics(&["sync", "--dir", root_s, "--tracking-uri", &uri], &[]);
    assert!(success, "{out}{err}");
    let want = format!(
        "nothing to sync for mlflow {uri} in {root_s}: nothing delivered\nskipped {}: locked by a live process (mlflow {uri}, {} batches, 12 points, {} bytes)\n",
        seg.display(),
        s.batches,
        before[0].1.len()
    );
    assert_eq!(out, want);
    eprintln!("trainmetrics sync (segment locked):\n{out}");
    let (success, listing, _) = trainmetrics(&["spool", "--dir", root_s], &[]);
    assert!(success && listing.contains(&format!("skipped {}: locked by a live process", seg.display())), "{listing}");
    assert_eq!(segment_bytes(&dir), before, "the live process's segment is untouched");
    assert!(common::runs_of_experiment(&uri, &experiment).is_empty(), "nothing reached MLflow");

    let r = live.shutdown();
    assert_eq!((r.exporters[0].received, r.exporters[0].spooled), (12, 12), "{}", r.exporters[0]);
    let (success, out, err) = trainmetrics(&["sync", "--dir", root_s, "--tracking-uri", &uri], &[]);
    assert!(success, "{out}{err}");
    let run = run_named(&uri, &experiment, "live");
    let id = run["info"]["run_id"].as_str().expect("id");
    assert!(line_of(&out, "live").contains(&format!("-> MLflow run {id}: delivered 12 points in {} batches, ended FINISHED", s.batches)), "{out}");
    assert_history(&uri, id, "loss", 1..=12, value);
    assert_eq!(common::run(&uri, id)["info"]["status"], "FINISHED");
    server.stop();
}

/// A service stopped (SIGTERM) while MLflow is down spools its batches and leaves no end record:
/// `sync` delivers them and the run stays RUNNING, as the service leaves runs it did not see end.
#[test]
fn sync_delivers_what_a_stopped_service_spooled_and_leaves_its_run_running() {
    let data = tempfile::tempdir().expect("tempdir");
    let root = tempfile::tempdir().expect("tempdir");
    let logdir = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("mlflow");
    let port = common::free_port();
    let uri = format!("http://127.0.0.1:{port}");
    let experiment = common::unique("sync-serve");
    let sets = [
        format!("exporters.mlflow.tracking_uri={uri}"),
        "exporters.mlflow.every_steps=1".into(),
        "exporters.mlflow.retry_on_failure.initial_interval=200ms".into(),
        "exporters.mlflow.retry_on_failure.max_interval=1s".into(),
        format!("exporters.mlflow.sending_queue.spool.directory={}", dir.display()),
        "shutdown_timeout=2s".into(),
    ];
    let svc = common::Service::start(logdir.path(), &sets);
    let attrs = vec![common::otlp::s("ml.experiment.name", &experiment), common::otlp::s("ml.run.name", "served")];
    let points: Vec<(&str, Option<i64>, f64)> = (1..=20).map(|s| ("loss", Some(s), value(s))).collect();
    let body = prost::Message::encode_to_vec(&common::otlp::request(vec![common::otlp::resource(attrs, &points)]));
    let resp = ureq::post(format!("http://{}/v1/metrics", svc.http)).header("Content-Type", "application/x-protobuf").send(&body[..]);
    assert_eq!(resp.expect("POST /v1/metrics").status(), 200);
    std::thread::sleep(Duration::from_millis(1500));
    let report = svc.stop();
    assert!(report.contains("received 20 delivered 0 dropped 0 pending 20 (spooled 20"), "{report}");
    let s = spooled(&dir).into_values().next().expect("spooled run");
    assert_eq!((s.points, s.ended), (20, None), "a service writes no end record");

    let server = MlflowServer::start(port, data.path());
    let root_s = root.path().to_str().expect("utf-8 path");
    let (success, out, err) = trainmetrics(&["sync", "--dir", root_s], &[("MLFLOW_TRACKING_URI", &uri)]);
    assert!(success, "{out}{err}");
    let run = run_named(&uri, &experiment, "served");
    let id = run["info"]["run_id"].as_str().expect("id");
    let line = line_of(&out, "served");
    assert!(line.ends_with(&format!("-> MLflow run {id}: delivered 20 points in {} batches", s.batches)), "{line}");
    assert_history(&uri, id, "loss", 1..=20, value);
    assert_eq!(common::run(&uri, id)["info"]["status"], "RUNNING");
    server.stop();
}

/// Without `--tracking-uri`, `--all` or `MLFLOW_TRACKING_URI`, sync names what waits and asks.
#[test]
fn sync_without_a_target_says_which_targets_wait() {
    let root = tempfile::tempdir().expect("tempdir");
    let (success, out, err) = trainmetrics(&["sync", "--dir", root.path().to_str().expect("utf-8")], &[]);
    assert!(!success, "{out}");
    assert!(err.contains("--tracking-uri URI (or MLFLOW_TRACKING_URI) or --all") && err.contains("waits for: nothing"), "{err}");
}
