//! Distributed jobs and run ends through the real collector (`collector-config/agent.yaml`:
//! persistent queue, several consumers) from trainers using the OTel Python SDK as it comes
//! (`tests/support/rank_trainer.py`): four ranks of one job (case 016), and trainers that end
//! cleanly or with an exception (case 018). Read back from a real MLflow server while `serve`
//! still runs, and from both TensorBoard loaders.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{history, kv, mlflow_uri, python, read_tb, root, run, runs_of_experiment, unique, Collector, Loader, Service};
use serde_json::Value;

/// Starts one trainer process through the collector at `endpoint`.
fn trainer(endpoint: &str, run_id: &str, experiment: &str, extra: &[&str]) -> Child {
    Command::new(python())
        .arg(root().join("tests/support/rank_trainer.py"))
        .args(["--endpoint", &format!("http://{endpoint}"), "--run-id", run_id, "--experiment", experiment])
        .args(extra)
        .env_remove("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("missing component: the venv's Python with the OTel SDK")
}

/// Waits for a trainer; returns (exit success, stderr).
fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().expect("wait for the trainer");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The MLflow run of an experiment (exactly one).
fn only_run(uri: &str, experiment: &str) -> Value {
    let runs = runs_of_experiment(uri, experiment);
    assert_eq!(runs.len(), 1, "runs of {experiment}: {runs:?}");
    runs[0].clone()
}

/// Polls until the experiment's one run has `status`, at most 30 s (the end waits for the
/// reorder window); returns the run.
fn wait_status(uri: &str, experiment: &str, status: &str) -> Value {
    let started = Instant::now();
    loop {
        let runs = runs_of_experiment(uri, experiment);
        if let [r] = runs.as_slice() {
            if r["info"]["status"] == status {
                return r.clone();
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no run of {experiment} became {status} in 30 s: {runs:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn values(uri: &str, run_id: &str, key: &str) -> Vec<(i64, f64)> {
    history(uri, run_id, key).into_iter().map(|(s, v, _)| (s, v)).collect()
}

/// The line of `name` in a shutdown report, as numbers and the text.
fn report_line<'a>(report: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}: received");
    report.lines().find(|l| l.trim_start().starts_with(&prefix)).unwrap_or_else(|| panic!("no {name} line in:\n{report}"))
}

/// `received = delivered + dropped`, every drop for one of `reasons`; returns (received, line).
fn assert_adds_up(report: &str, name: &str, reasons: &[&str]) -> u64 {
    let line = report_line(report, name);
    let num = |k: &str| -> u64 {
        line.split(k).nth(1).and_then(|r| r.trim_start().split(|c: char| !c.is_ascii_digit()).next()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let (received, delivered, dropped) = (num("received"), num("delivered"), num("dropped"));
    assert_eq!(received, delivered + dropped, "{line}");
    let by_reason: u64 = reasons.iter().map(|r| num(&format!("{r}="))).sum();
    assert_eq!(dropped, by_reason, "drops other than {reasons:?}: {line}");
    assert!(!line.contains("pending") || num("pending") == 0, "{line}");
    received
}

fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("trainmetrics.yaml");
    std::fs::write(&path, body).expect("write config");
    path
}

/// Case 016: four processes of one job (same `ml.run.id`, resource attribute `rank` 0..3, each
/// with its own `service.instance.id`), the same names and steps 1..200, values offset by
/// rank × 1000, through the collector. TensorBoard: one run directory per rank, every curve
/// whole in both loaders. MLflow: one run per job and exporter: rank 0's values (the default
/// view), the mean over ranks (`ranks.view: mean`), and each rank under its own key (`each`);
/// nothing `superseded`, no resume; the job ends FINISHED once every rank has ended.
#[test]
fn case_016_ranks_of_one_job_are_one_run_and_never_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().join("runs");
    let uri = mlflow_uri();
    let (exp0, exp_mean, exp_each) = (unique("case-016-rank0"), unique("case-016-mean"), unique("case-016-each"));
    // The job's own experiment is unused: each exporter's runs go to its own (the trainer
    // names none below), so the three views can be read apart.
    let config = write_config(
        dir.path(),
        &format!(
            "exporters:\n  tensorboard:\n    logdir: {logdir}\n    reorder_window: 5s\n\
             \x20 mlflow:\n    tracking_uri: {uri}\n    experiment: {exp0}\n    every_steps: 1\n    reorder_window: 5s\n\
             \x20 mlflow/mean:\n    tracking_uri: {uri}\n    experiment: {exp_mean}\n    every_steps: 1\n    reorder_window: 5s\n    ranks: {{view: mean}}\n\
             \x20 mlflow/each:\n    tracking_uri: {uri}\n    experiment: {exp_each}\n    every_steps: 100\n    reorder_window: 5s\n    ranks: {{view: each}}\n",
            logdir = logdir.display()
        ),
    );
    let svc = Service::start_with(Some(&config), &logdir, &["exporters.tensorboard.reorder_window=5s".into()]);
    let collector = Collector::start(&svc.grpc, &dir.path().join("queue"), Stdio::null());
    // An empty experiment name is the exporter's default experiment (see the MLflow exporter).
    let trainers: Vec<Child> =
        (0..4).map(|r| trainer(&collector.grpc, "case-016", "", &["--rank", &r.to_string(), "--steps", "200"])).collect();
    for t in trainers {
        let (ok, err) = finish(t);
        assert!(ok, "trainer: {err}");
    }
    collector.wait_drained();
    // The job ends when its last rank has: before serve stops.
    for exp in [&exp0, &exp_mean, &exp_each] {
        let r = wait_status(&uri, exp, "FINISHED");
        assert!(r["info"]["end_time"].as_i64().is_some_and(|t| t > 0), "{r}");
    }
    let id = |exp: &str| only_run(&uri, exp)["info"]["run_id"].as_str().expect("run id").to_string();
    let (id0, id_mean, id_each) = (id(&exp0), id(&exp_mean), id(&exp_each));
    collector.stop();
    let report = svc.stop();

    assert_eq!(values(&uri, &id0, "train.loss"), (1..=200).map(|s| (s, s as f64)).collect::<Vec<_>>(), "rank 0's values");
    assert_eq!(values(&uri, &id_mean, "train.loss"), (1..=200).map(|s| (s, s as f64 + 1500.0)).collect::<Vec<_>>(), "the mean over 4 ranks");
    // A histogram's scalar is its mean: records 1 and 3 on every rank.
    assert_eq!(values(&uri, &id0, "train.grad_norm"), (1..=200).map(|s| (s, 2.0)).collect::<Vec<_>>());
    for r in 0..4 {
        let got = values(&uri, &id_each, &format!("train.loss/rank-{r}"));
        assert_eq!(got, vec![(100, 100.0 + r as f64 * 1000.0), (200, 200.0 + r as f64 * 1000.0)], "rank {r}");
    }
    for rid in [&id0, &id_mean, &id_each] {
        let tags = kv(&run(&uri, rid), "tags");
        assert!(!tags.contains_key("trainmetrics.resumed_at_step"), "no resume: {tags:?}");
        assert!(!tags.contains_key("rank"), "the rank is not a tag of the job: {tags:?}");
    }
    for loader in [Loader::Python, Loader::Rust] {
        let tb = read_tb(&logdir, loader);
        let runs: Vec<&String> = tb.scalars.keys().collect();
        assert_eq!(runs, ["case-016/rank-0", "case-016/rank-1", "case-016/rank-2", "case-016/rank-3"], "{loader:?}");
        for r in 0..4 {
            let loss = &tb.scalars[&format!("case-016/rank-{r}")]["train.loss"];
            assert_eq!(loss, &(1..=200).map(|s| (s, s as f64 + r as f64 * 1000.0)).collect::<Vec<_>>(), "{loader:?} rank {r}");
        }
    }
    // Cumulative histograms are re-sent at every collection: those drops are `duplicate`;
    // the default view counts the other ranks' points `other_rank`. Never `superseded`.
    let tb_received = assert_adds_up(&report, "tensorboard", &["duplicate"]);
    assert!(tb_received >= 1600, "{report}");
    assert_adds_up(&report, "mlflow", &["duplicate", "other_rank"]);
    assert!(report_line(&report, "mlflow").contains("other_rank="), "{report}");
    assert_adds_up(&report, "mlflow/mean", &["duplicate"]);
    assert_adds_up(&report, "mlflow/each", &["duplicate"]);
}

/// Case 018: a trainer that ends cleanly after 250 steps and one that raises after step 120,
/// both through the collector into the shipped config (MLflow every 100 steps, `train.loss`
/// mean, reorder window 5 s). While `serve` still runs, the first MLflow run is FINISHED with
/// the windows at 100, 200 and the partial window at 250; the second FAILED with 100 and its
/// partial window at 120. TensorBoard holds every step of both.
#[test]
fn case_018_a_trainer_ends_its_run_through_the_collector() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().join("runs");
    let uri = mlflow_uri();
    let (exp_ok, exp_fail) = (unique("case-018-ok"), unique("case-018-failed"));
    let svc = Service::start_with(
        Some(&root().join("collector-config/trainmetrics.yaml")),
        &logdir,
        &[format!("exporters.mlflow.tracking_uri={uri}"), "exporters.tensorboard.reorder_window=5s".into()],
    );
    let collector = Collector::start(&svc.grpc, &dir.path().join("queue"), Stdio::null());
    let ok = trainer(&collector.grpc, "case-018-ok", &exp_ok, &["--steps", "250"]);
    let failing = trainer(&collector.grpc, "case-018-failed", &exp_fail, &["--steps", "250", "--fail-after", "120"]);
    let (ok_exit, ok_err) = finish(ok);
    assert!(ok_exit, "the clean trainer failed: {ok_err}");
    let (fail_exit, fail_err) = finish(failing);
    assert!(!fail_exit && fail_err.contains("injected failure after step 120"), "the failing trainer: {fail_err}");
    collector.wait_drained();

    let finished = wait_status(&uri, &exp_ok, "FINISHED");
    let failed = wait_status(&uri, &exp_fail, "FAILED");
    for r in [&finished, &failed] {
        let (start, end) = (r["info"]["start_time"].as_i64().unwrap_or(0), r["info"]["end_time"].as_i64().unwrap_or(0));
        assert!(end >= start && start > 0, "{r}");
    }
    let id = |r: &Value| r["info"]["run_id"].as_str().expect("run id").to_string();
    let mean = |a: i64, b: i64| (a + b) as f64 / 2.0;
    assert_eq!(values(&uri, &id(&finished), "train.loss"), vec![(100, mean(1, 100)), (200, mean(101, 200)), (250, mean(201, 250))]);
    assert_eq!(values(&uri, &id(&failed), "train.loss"), vec![(100, mean(1, 100)), (120, mean(101, 120))]);
    collector.stop();
    let report = svc.stop();
    for loader in [Loader::Python, Loader::Rust] {
        let tb = read_tb(&logdir, loader);
        assert_eq!(tb.scalars["case-018-ok"]["train.loss"], (1..=250).map(|s| (s, s as f64)).collect::<Vec<_>>(), "{loader:?}");
        assert_eq!(tb.scalars["case-018-failed"]["train.loss"], (1..=120).map(|s| (s, s as f64)).collect::<Vec<_>>(), "{loader:?}");
    }
    assert_adds_up(&report, "tensorboard", &["duplicate"]);
    assert_adds_up(&report, "mlflow", &["duplicate"]);
    // serve's shutdown leaves the runs as the trainers ended them.
    assert_eq!(only_run(&uri, &exp_ok)["info"]["status"], "FINISHED");
    assert_eq!(only_run(&uri, &exp_fail)["info"]["status"], "FAILED");
}

/// The first failed rank ends its job (issue 7, item 5), as a DDP job fails: rank 1 raises after
/// step 150 (`FAILED`), rank 0 is torn down without an end. MLflow (every 100 steps, `mean` of
/// the ranks) gets window 100 and the partial window at 150 with both ranks' points (not rank
/// 1's alone), and the run is FAILED and stays FAILED through `serve`'s shutdown (no window of
/// rank 0 is left to reopen it). TensorBoard has each rank's steps 1..150.
#[test]
fn a_failed_rank_ends_the_job_failed_with_every_rank_s_last_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().join("runs");
    let uri = mlflow_uri();
    let exp = unique("rank-failed");
    let config = write_config(
        dir.path(),
        &format!(
            "exporters:\n  tensorboard:\n    logdir: {logdir}\n    reorder_window: 5s\n\
             \x20 mlflow:\n    tracking_uri: {uri}\n    every_steps: 100\n    reorder_window: 5s\n    aggregation: mean\n    ranks: {{view: mean}}\n",
            logdir = logdir.display()
        ),
    );
    let svc = Service::start_with(Some(&config), &logdir, &["exporters.tensorboard.reorder_window=5s".into()]);
    let collector = Collector::start(&svc.grpc, &dir.path().join("queue"), Stdio::null());
    let failing = trainer(&collector.grpc, "rank-failed", &exp, &["--rank", "1", "--steps", "150", "--fail-after", "150"]);
    let torn_down = trainer(&collector.grpc, "rank-failed", &exp, &["--rank", "0", "--steps", "150", "--no-end"]);
    let (ok, err) = finish(failing);
    assert!(!ok && err.contains("injected failure after step 150"), "rank 1 fails: {err}");
    assert!(finish(torn_down).0, "rank 0 ends its loop");
    collector.wait_drained();
    let r = wait_status(&uri, &exp, "FAILED");
    let id = r["info"]["run_id"].as_str().expect("run id").to_string();
    collector.stop();
    let report = svc.stop();
    // Window means per rank: 50.5 / 1050.5 and 125.5 / 1125.5; the job view averages the ranks.
    assert_eq!(values(&uri, &id, "train.loss"), vec![(100, 550.5), (150, 625.5)], "{report}");
    assert_eq!(only_run(&uri, &exp)["info"]["status"], "FAILED", "still FAILED after serve's shutdown");
    assert_adds_up(&report, "mlflow", &["duplicate"]);
    for loader in [Loader::Python, Loader::Rust] {
        let tb = read_tb(&logdir, loader);
        for r in 0..2 {
            let loss = &tb.scalars[&format!("rank-failed/rank-{r}")]["train.loss"];
            assert_eq!(loss, &(1..=150).map(|s| (s, s as f64 + r as f64 * 1000.0)).collect::<Vec<_>>(), "{loader:?} rank {r}");
        }
    }
}
