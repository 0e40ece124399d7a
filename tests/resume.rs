//! Case 008 through `trainmetrics serve`: the service keeps running while the trainer restarts
//! from a checkpoint, so its cadence and exporters still remember the old session's steps. The
//! resumed session (a step back, newer in time) replaces the old one from the resume step on.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{history, kv, mlflow_uri, otlp, read_csv, read_tb_both, run, runs_of_experiment, trainer, unique, Service};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::metric;
use prost::Message;
use trainmetrics::exporter::tensorboard::proto::{event, Event};

/// One request with `loss` at `step`, recorded at `time_unix_nano`.
fn point(exp: &str, step: i64, value: f64, time_unix_nano: u64) -> ExportMetricsServiceRequest {
    let attrs = vec![otlp::s("ml.experiment.name", exp), otlp::s("ml.run.name", "resumed"), otlp::s("ml.run.id", "resumed-1")];
    let mut req = otlp::request(vec![otlp::resource(attrs, &[("loss", Some(step), value)])]);
    for rm in &mut req.resource_metrics {
        for sm in &mut rm.scope_metrics {
            for m in &mut sm.metrics {
                if let Some(metric::Data::Gauge(g)) = &mut m.data {
                    g.data_points.iter_mut().for_each(|dp| dp.time_unix_nano = time_unix_nano);
                }
            }
        }
    }
    req
}

fn post(url: &str, req: &ExportMetricsServiceRequest) {
    let agent = ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build());
    let mut resp = agent.post(url).header("Content-Type", "application/x-protobuf").send(req.encode_to_vec()).expect("POST");
    let status = resp.status().as_u16();
    assert_eq!(status, 200, "{}", resp.body_mut().read_to_string().unwrap_or_default());
}

/// The largest scalar step written in the event files under `dir` (records read with their
/// framing; a torn last record ends the file).
fn max_step_written(dir: &Path) -> Option<i64> {
    let mut max = None;
    for f in walk(dir) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        let mut i = 0;
        while i + 12 <= bytes.len() {
            let len = u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes")) as usize;
            let Some(data) = bytes.get(i + 12..i + 12 + len) else { break };
            if let Ok(Event { step, what: Some(event::What::Summary(_)), .. }) = Event::decode(data) {
                max = max.max(Some(step));
            }
            i += 12 + len + 4;
        }
    }
    max
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.to_string_lossy().contains("tfevents") {
            out.push(p);
        }
    }
    out
}

/// Polls `cond` every 100 ms for up to 60 s (a generous bound on a loaded machine, not a speed
/// assertion), failing with `what`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn case_008_service_route_a_restarted_trainer_replaces_steps_from_its_checkpoint() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let exp = unique("resume-serve");
    let uri = mlflow_uri();
    let svc = Service::start(
        logdir.path(),
        &[
            format!("exporters.mlflow.tracking_uri={uri}"),
            "exporters.mlflow.every_steps=10".into(),
            "exporters.mlflow.linger=200ms".into(),
        ],
    );
    let url = format!("http://{}/v1/metrics", svc.http);
    let t0: u64 = 1_790_000_000_000_000_000;
    for step in (0..=150).step_by(10) {
        post(&url, &point(&exp, step, step as f64, t0 + step as u64 * 1_000_000));
    }
    // The old session is delivered to both backends before the trainer comes back, so the
    // service's exporters hold steps up to 150 (what used to make the resumed points `late`).
    wait_for("TensorBoard to write step 150", || max_step_written(logdir.path()) == Some(150));
    wait_for("MLflow to log step 150", || {
        runs_of_experiment(&uri, &exp)
            .first()
            .and_then(|r| r["info"]["run_id"].as_str().map(str::to_string))
            .is_some_and(|id| history(&uri, &id, "loss").iter().any(|m| m.0 == 150))
    });
    // A collector's late retry of the old session (the same value and time at step 120, written
    // already) is a duplicate, not a resume.
    post(&url, &point(&exp, 120, 120.0, t0 + 120 * 1_000_000));
    let t1 = t0 + 3_600_000_000_000;
    for step in (100..=300).step_by(10) {
        post(&url, &point(&exp, step, 1000.0 + step as f64, t1 + step as u64 * 1_000_000));
    }
    let report = svc.stop();
    // 16 old + 1 retried + 21 resumed; the retry is a duplicate; nothing of the old session was
    // still open when the trainer resumed.
    assert!(report.contains("tensorboard: received 38 delivered 37 dropped 1 (duplicate=1)"), "{report}");
    assert!(report.contains("mlflow: received 38 delivered 37 dropped 1 (duplicate=1)"), "{report}");

    let tbv = read_tb_both(logdir.path());
    let expect: Vec<(i64, f64)> =
        (0..100).step_by(10).map(|s| (s, s as f64)).chain((100..=300).step_by(10).map(|s| (s, 1000.0 + s as f64))).collect();
    assert_eq!(tbv.scalars["resumed"]["loss"], expect);
    assert_eq!(tbv.session_starts["resumed"], vec![0, 100]);

    common::assert_case_008_log_again(&uri, &exp);
}

#[test]
fn a_real_trainer_restarted_with_the_same_run_id_replaces_its_run_in_the_service() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().join("runs");
    let exp = unique("resume-trainer");
    let uri = mlflow_uri();
    let svc = Service::start(&logdir, &[format!("exporters.mlflow.tracking_uri={uri}")]);
    // Two sessions of one run id: 150 steps, then a restart from scratch (step 1) with another
    // seed, so every value differs, for 300 steps: the restarted trainer's exports hold many
    // steps in the SDK's own order, and its first already passes the old session's last step.
    let session = |steps: &str, seed: &str, csv: &Path| {
        let out = std::process::Command::new(trainer())
            .args(["--otlp-endpoint", &format!("http://{}", svc.grpc), "--experiment", &exp])
            .args(["--run-name", "restarted", "--run-id", "restarted-1", "--steps", steps, "--seed", seed])
            .arg("--record-csv")
            .arg(csv)
            .output()
            .expect("run the example trainer");
        assert!(out.status.success(), "trainer: {}", String::from_utf8_lossy(&out.stderr));
        read_csv(csv)
    };
    let first = session("150", "1", &dir.path().join("first.csv"));
    wait_for("TensorBoard to write step 150", || max_step_written(&logdir) == Some(150));
    wait_for("MLflow to log step 100", || {
        runs_of_experiment(&uri, &exp)
            .first()
            .and_then(|r| r["info"]["run_id"].as_str().map(str::to_string))
            .is_some_and(|id| history(&uri, &id, "train.loss").iter().any(|m| m.0 == 100))
    });
    // The first session ended its run (the run-end gauge): its partial window at step 150 is
    // written before the second session starts, so nothing of it is left open to supersede.
    wait_for("MLflow to log the partial window at step 150", || {
        runs_of_experiment(&uri, &exp)
            .first()
            .and_then(|r| r["info"]["run_id"].as_str().map(str::to_string))
            .is_some_and(|id| history(&uri, &id, "train.loss").iter().any(|m| m.0 == 150))
    });
    let second = session("300", "2", &dir.path().join("second.csv"));
    let report = svc.stop();
    let total: usize = first.values().chain(second.values()).map(Vec::len).sum();
    for name in ["tensorboard", "mlflow"] {
        let want = format!("{name}: received {total} delivered {total} dropped 0");
        assert!(report.contains(&want), "{want:?} not in:\n{report}");
    }
    // TensorBoard, both loaders: only the second session, exactly as recorded.
    let tb = read_tb_both(&logdir);
    assert_eq!(tb.scalars.keys().collect::<Vec<_>>(), vec!["restarted"]);
    common::assert_tb_matches(&tb.scalars["restarted"], &second, &["train.logits"]);
    assert_eq!(tb.session_starts["restarted"], vec![1, 1]);
    // MLflow: the same run, tagged with the resume step; log_again keeps both sessions' windows
    // (the first session's partial window at its end, step 150, included).
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.len(), 1);
    let id = runs[0]["info"]["run_id"].as_str().expect("run id");
    assert_eq!(kv(&run(&uri, id), "tags").get("trainmetrics.resumed_at_step").map(String::as_str), Some("1"));
    let mut h = history(&uri, id, "train.loss");
    h.sort_by_key(|m| (m.2, m.0));
    assert_eq!(h.iter().map(|m| m.0).collect::<Vec<_>>(), vec![100, 150, 100, 200, 300]);
    let last_of = |rec: &common::Recorded, step: i64| rec["train.loss"].iter().find(|r| r.0 == step).map(|r| r.1);
    assert_eq!(h.iter().map(|m| Some(m.1)).collect::<Vec<_>>(), vec![
        last_of(&first, 100),
        last_of(&first, 150),
        last_of(&second, 100),
        last_of(&second, 200),
        last_of(&second, 300)
    ]);
}
