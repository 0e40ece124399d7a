//! Run liveness: a trainer killed with SIGKILL (no clean end) has its MLflow run ended by
//! `trainmetrics serve` after `end_idle_runs.after`, with the configured status; when the run's
//! data comes back, the run is RUNNING again and continues.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{history, mlflow_uri, otlp, run, runs_of_experiment, trainer, unique, Service};
use prost::Message;

/// Polls `cond` every 200 ms for up to 90 s (a generous bound on a loaded machine, not a speed
/// assertion), failing with `what`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(90), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The experiment's only run, `None` while the experiment or the run does not exist yet.
fn only_run_id(uri: &str, exp: &str) -> Option<String> {
    let agent = ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build());
    let resp = agent.get(format!("{uri}/api/2.0/mlflow/experiments/get-by-name")).query("experiment_name", exp).call();
    if resp.ok()?.status().as_u16() == 404 {
        return None;
    }
    let runs = runs_of_experiment(uri, exp);
    assert!(runs.len() <= 1, "one MLflow run per trainer run: {runs:?}");
    runs.first().and_then(|r| r["info"]["run_id"].as_str().map(str::to_string))
}

fn status(uri: &str, id: &str) -> String {
    run(uri, id)["info"]["status"].as_str().unwrap_or("").to_string()
}

#[test]
fn a_killed_trainer_s_run_ends_killed_after_the_idle_time_and_comes_back_running() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let exp = unique("liveness");
    let uri = mlflow_uri();
    let svc = Service::start(
        logdir.path(),
        &[
            format!("exporters.mlflow.tracking_uri={uri}"),
            "exporters.mlflow.every_steps=10".into(),
            "exporters.mlflow.end_idle_runs.after=2s".into(),
        ],
    );
    let mut child = Command::new(trainer())
        .args(["--otlp-endpoint", &format!("http://{}", svc.grpc)])
        .args(["--experiment", &exp, "--run-name", "killed", "--run-id", "killed-1"])
        .args(["--steps", "100000", "--sleep-ms", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the example trainer");
    // Killed mid-run once MLflow has some of its metrics.
    wait_for("the trainer's first metrics in MLflow", || {
        only_run_id(&uri, &exp).is_some_and(|id| !history(&uri, &id, "train.loss").is_empty())
    });
    let id = only_run_id(&uri, &exp).expect("run id");
    assert_eq!(status(&uri, &id), "RUNNING");
    child.kill().expect("SIGKILL the trainer");
    let _ = child.wait();
    wait_for("the idle run to be ended KILLED", || status(&uri, &id) == "KILLED");
    let info = run(&uri, &id)["info"].clone();
    assert!(info["end_time"].as_i64().is_some_and(|t| t > 0), "an end time: {info}");
    let last_step = history(&uri, &id, "train.loss").iter().map(|m| m.0).max().expect("steps");

    // The run's data comes back (the trainer restarted and continues): while it keeps coming,
    // the same run is RUNNING again and logs it.
    let attrs = vec![otlp::s("ml.experiment.name", &exp), otlp::s("ml.run.name", "killed"), otlp::s("ml.run.id", "killed-1")];
    let agent = ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build());
    let mut step = (last_step / 10 + 100) * 10;
    let first_new = step + 1;
    wait_for("the run to be RUNNING again with the new points", || {
        step += 1;
        let req = otlp::request(vec![otlp::resource(attrs.clone(), &[("train.loss", Some(step), 0.25)])]);
        let resp = agent
            .post(format!("http://{}/v1/metrics", svc.http))
            .header("Content-Type", "application/x-protobuf")
            .send(req.encode_to_vec())
            .expect("POST");
        assert_eq!(resp.status().as_u16(), 200);
        status(&uri, &id) == "RUNNING" && history(&uri, &id, "train.loss").iter().any(|m| m.0 == first_new + 9 && m.1 == 0.25)
    });
    // Quiet again: ended again.
    wait_for("the run to be ended KILLED again", || status(&uri, &id) == "KILLED");
    assert_eq!(only_run_id(&uri, &exp).as_deref(), Some(id.as_str()));
    let report = svc.stop();
    assert!(report.contains("mlflow: received"), "{report}");
    let line = report.lines().find(|l| l.contains("mlflow: received")).unwrap_or_default();
    assert!(line.contains("dropped 0"), "{report}");
}
