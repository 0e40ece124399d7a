//! The pipeline's promises beyond the cases: histograms, run status on failure and panic,
//! continuing a run, cardinality overflow, a full queue never blocking, and the retry policy
//! (the last two with faults a real server cannot produce on demand: a blocking exporter and a
//! scripted HTTP server).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{history, mlflow_run_id, mlflow_uri, otlp, read_tb, run, runs_of_experiment, unique, Loader};
use trainmetrics::cadence::{Aggregation, CadenceSettings, Batch};
use trainmetrics::config::{DeliveryConfig, ExporterConfig, MlflowConfig, TensorBoardConfig};
use trainmetrics::delivery::{Delivery, DeliverySettings, SubmitError};
use trainmetrics::exporter::mlflow::{MlflowExporter, MlflowSettings};
use trainmetrics::exporter::{ExportError, Exported, Exporter, RunOutcome};
use trainmetrics::retry::RetrySettings;
use trainmetrics::Pipeline;

fn mlflow(every: u64) -> ExporterConfig<MlflowConfig> {
    common::mlflow_config(every, &[])
}

#[test]
fn histograms_reach_tensorboard_as_buckets_and_mlflow_as_exact_means() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let p = Pipeline::builder()
        .experiment(unique("hist"))
        .exporter("tensorboard", ExporterConfig { backend: TensorBoardConfig { logdir: Some(logdir.path().into()) }, delivery: DeliveryConfig::default() })
        .exporter("mlflow", { let base = mlflow(10); ExporterConfig { backend: base.backend, delivery: DeliveryConfig { aggregation: Some(Aggregation::Mean), ..base.delivery } } })
        .build()
        .expect("pipeline");
    let rec = p.recorder();
    let bounds = vec![0.0, 1.0, 2.0];
    for step in 1..=10 {
        let values: Vec<f64> = (0..step).map(|i| i as f64 * 0.25).collect();
        rec.record_histogram(step, "grad.hist", &values, Some(bounds.clone()));
    }
    let report = p.shutdown();
    assert!(report.exporters.iter().all(|e| e.received == 10 && e.delivered == 10), "{report}");

    // Step 3 holds 0, 0.25, 0.5: bucket (-inf,0] has 1, (0,1] has 2; open ends use min/max.
    let want3 = vec![[0.0, 0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 2.0, 0.0], [2.0, 2.0, 0.0]];
    for loader in [Loader::Python, Loader::Rust] {
        let tb = read_tb(logdir.path(), loader);
        let h = &tb.histograms.values().next().expect("one run")["grad.hist"];
        assert_eq!(h.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>(), "{loader:?}");
        let rows3 = &h[2].1;
        let total: f64 = rows3.iter().map(|r| r[2]).sum();
        assert_eq!(total, 3.0, "{loader:?}: {rows3:?}");
        assert_eq!(rows3, &want3, "{loader:?}");
    }
    // One window of 10 steps: Σsum / Σcount over all 55 measurements.
    let (sum, count) = (1..=10).fold((0.0, 0.0), |(s, c), step| {
        ((0..step).map(|i| i as f64 * 0.25).sum::<f64>() + s, c + step as f64)
    });
    let h = history(&mlflow_uri(), &mlflow_run_id(&p), "grad.hist");
    assert_eq!(h.iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(), vec![(10, sum / count)]);
}

#[test]
fn a_failed_or_panicking_trainer_ends_its_run_failed() {
    let exp = unique("failed");
    let p = Pipeline::builder().experiment(&exp).run_name("told").exporter("mlflow", mlflow(1)).build().expect("pipeline");
    p.recorder().record(1, "x", 1.0);
    p.fail();
    drop(p);
    let panicked = std::thread::spawn({
        let exp = exp.clone();
        move || {
            let p = Pipeline::builder().experiment(&exp).run_name("panicked").exporter("mlflow", mlflow(1)).build().expect("pipeline");
            p.recorder().record(1, "x", 2.0);
            panic!("trainer crashed (expected by this test)");
        }
    })
    .join();
    assert!(panicked.is_err());
    let uri = mlflow_uri();
    let mut got: Vec<(String, String, usize)> = runs_of_experiment(&uri, &exp)
        .iter()
        .map(|r| {
            let id = r["info"]["run_id"].as_str().unwrap_or("");
            (
                r["info"]["run_name"].as_str().unwrap_or("").to_string(),
                r["info"]["status"].as_str().unwrap_or("").to_string(),
                history(&uri, id, "x").len(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(got, vec![("panicked".into(), "FAILED".into(), 1), ("told".into(), "FAILED".into(), 1)]);
}

#[test]
fn the_same_run_id_continues_the_same_mlflow_run() {
    let exp = unique("resume");
    for (first, last) in [(1, 5), (6, 10)] {
        let p = Pipeline::builder()
            .experiment(&exp)
            .run_name("resumable")
            .run_id("resume-run-1")
            .exporter("mlflow", mlflow(1))
            .build()
            .expect("pipeline");
        let rec = p.recorder();
        for step in first..=last {
            rec.record(step, "x", step as f64);
        }
        drop(p);
    }
    let uri = mlflow_uri();
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.len(), 1, "one MLflow run for one run id");
    let id = runs[0]["info"]["run_id"].as_str().expect("id");
    assert_eq!(history(&uri, id, "x").iter().map(|m| m.0).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    assert_eq!(run(&uri, id)["info"]["status"], "FINISHED");
}

#[test]
fn the_recorder_collects_before_the_cardinality_limit_and_other_overflow_is_counted() {
    use opentelemetry::metrics::MeterProvider as _;
    let logdir = tempfile::tempdir().expect("tempdir");
    let p = Pipeline::builder()
        .cardinality_limit(10)
        .exporter(
            "tensorboard",
            ExporterConfig {
                backend: TensorBoardConfig { logdir: Some(logdir.path().into()) },
                delivery: DeliveryConfig { reader_interval: Some(Duration::from_secs(3600)), ..Default::default() },
            },
        )
        .build()
        .expect("pipeline");
    // 50 steps within one reader interval: StepRecorder collects every 5 points, nothing folds.
    let rec = p.recorder();
    for step in 1..=50 {
        rec.record(step, "x", step as f64);
    }
    // A plain OTel gauge does not collect early: past 10 steps the SDK folds the rest into its
    // overflow series, which must show up as a counted drop.
    let raw = p.meter_provider().meter("raw").f64_gauge("raw").build();
    for step in 1..=50 {
        raw.record(step as f64, &[opentelemetry::KeyValue::new("step", step)]);
    }
    let report = p.shutdown();
    assert_eq!(report.recorded, 50, "{report}");
    let e = &report.exporters[0];
    assert_eq!(e.received, e.delivered + e.dropped_total(), "{e}");
    assert!(e.dropped.get("cardinality_overflow").is_some_and(|n| *n >= 1), "{e}");
    let tb = read_tb(logdir.path(), Loader::Python);
    let run = tb.scalars.values().next().expect("a run");
    assert_eq!(run["x"], (1..=50).map(|s| (s, s as f64)).collect::<Vec<_>>());
    assert!(run["raw"].len() <= 10, "{:?}", run["raw"]);
}

/// An exporter that blocks until released: stands in for a backend that hangs.
struct Stuck {
    release: Arc<Mutex<bool>>,
    seen: Arc<AtomicUsize>,
}

impl Exporter for Stuck {
    fn export(&mut self, batch: &Batch, _timeout: Duration) -> Result<Exported, ExportError> {
        while !*self.release.lock().expect("lock") {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.seen.fetch_add(batch.points.len(), Ordering::Relaxed);
        Ok(Exported::default())
    }
    fn end_runs(&mut self, _: RunOutcome, _: Duration) -> Result<(), ExportError> {
        Ok(())
    }
}

#[test]
fn a_full_queue_drops_and_counts_without_blocking() {
    let release = Arc::new(Mutex::new(false));
    let seen = Arc::new(AtomicUsize::new(0));
    let settings = DeliverySettings {
        queue_size: 2,
        cadence: CadenceSettings { linger: Duration::from_millis(1), ..Default::default() },
        ..Default::default()
    };
    let d = Delivery::start("stuck", Stuck { release: release.clone(), seen: seen.clone() }, settings).expect("start");
    let res = || vec![otlp::s("ml.run.name", "q")];
    let mut full = 0;
    for step in 1..=200 {
        match d.submit(Arc::new(otlp::request(vec![otlp::resource(res(), &[("x", Some(step), 1.0)])])))
        {
            Ok(()) => {}
            Err(SubmitError::QueueFull) => full += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(full > 0, "a stuck exporter must fill a queue of 2");
    *release.lock().expect("lock") = true;
    let report = d.shutdown(RunOutcome::Finished, Duration::from_secs(10));
    assert_eq!(report.received, 200);
    assert_eq!(report.dropped.get("queue_full"), Some(&(full as u64)), "{report}");
    assert_eq!(report.received, report.delivered + report.dropped_total(), "{report}");
    assert_eq!(seen.load(Ordering::Relaxed) as u64, report.delivered);
}

/// A scripted MLflow: answers the run endpoints, and `log-batch` with the scripted statuses in
/// turn (then 200). Records every log-batch body.
struct FakeMlflow {
    uri: String,
    batches: Arc<Mutex<Vec<(u16, String)>>>,
}

fn fake_mlflow(script: Vec<(u16, Option<&'static str>)>) -> FakeMlflow {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let seen = batches.clone();
    let mut script = script.into_iter();
    let (uri, _) = common::scripted_server(move |line, body| {
        common::fake_run_endpoints(line).unwrap_or_else(|| {
            let (st, ra) = script.next().unwrap_or((200, None));
            seen.lock().expect("lock").push((st, body.to_string()));
            let answer = if st == 200 { "{}".to_string() } else { format!(r#"{{"error_code":"X","message":"scripted {st}"}}"#) };
            (st, ra.map(|v| format!("Retry-After: {v}\r\n")).unwrap_or_default(), answer)
        })
    });
    FakeMlflow { uri, batches }
}

fn fake_delivery(uri: &str) -> Delivery {
    let settings = MlflowSettings { tracking_uri: uri.into(), authorization: None, experiment: "e".into(), run_id: None, credential_file: None };
    let d = DeliverySettings {
        cadence: CadenceSettings { linger: Duration::from_millis(1), ..Default::default() },
        retry: RetrySettings { initial_interval: Duration::from_millis(50), ..Default::default() },
        ..Default::default()
    };
    Delivery::start("mlflow", MlflowExporter::new(settings), d).expect("start")
}

#[test]
fn retryable_statuses_are_retried_honouring_retry_after_and_400_is_not() {
    let fake = fake_mlflow(vec![(503, Some("1")), (429, None), (200, None), (400, None)]);
    let d = fake_delivery(&fake.uri);
    let res = || vec![otlp::s("ml.run.name", "r")];
    let started = Instant::now();
    d.submit(Arc::new(otlp::request(vec![otlp::resource(res(), &[("x", Some(1), 1.0)])]))).expect("submit");
    // Wait until the first batch landed after its two failures.
    while fake.batches.lock().expect("lock").len() < 3 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let waited = started.elapsed();
    d.submit(Arc::new(otlp::request(vec![otlp::resource(res(), &[("x", Some(2), 2.0)])]))).expect("submit");
    let report = d.shutdown(RunOutcome::Finished, Duration::from_secs(10));
    let batches = fake.batches.lock().expect("lock").clone();
    let statuses: Vec<u16> = batches.iter().map(|b| b.0).collect();
    assert_eq!(statuses, vec![503, 429, 200, 400], "the 400 is not retried");
    // Retries re-send the identical body (same timestamps), so the server can deduplicate.
    assert_eq!(batches[0].1, batches[2].1);
    assert!(waited >= Duration::from_secs(1), "Retry-After: 1 was honoured ({waited:?})");
    assert_eq!((report.received, report.delivered, report.retried), (2, 1, 2), "{report}");
    assert_eq!(report.dropped.get("rejected"), Some(&1), "{report}");
}

#[test]
fn a_restarted_trainer_gets_a_new_event_file_and_one_curve() {
    let logdir = tempfile::tempdir().expect("tempdir");
    for (first, last) in [(1, 5), (6, 10)] {
        let p = Pipeline::builder()
            .run_name("restarted")
            .run_id("restarted-1")
            .exporter("tensorboard", ExporterConfig { backend: TensorBoardConfig { logdir: Some(logdir.path().into()) }, delivery: DeliveryConfig::default() })
            .build()
            .expect("pipeline");
        let rec = p.recorder();
        for step in first..=last {
            rec.record(step, "x", step as f64);
        }
        drop(p);
    }
    let files: Vec<_> = std::fs::read_dir(logdir.path().join("restarted"))
        .expect("run dir")
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().contains("tfevents"))
        .collect();
    assert_eq!(files.len(), 2, "one event file per process session");
    for loader in [Loader::Python, Loader::Rust] {
        let tb = read_tb(logdir.path(), loader);
        assert_eq!(tb.scalars["restarted"]["x"], (1..=10).map(|s| (s, s as f64)).collect::<Vec<_>>(), "{loader:?}");
    }
    // A SessionLog START at the first step of each session (what the Python loader reads).
    assert_eq!(read_tb(logdir.path(), Loader::Python).session_starts["restarted"], vec![1, 6]);
}

/// (run key, step) of every point a scripted exporter delivered.
type Delivered = Arc<Mutex<Vec<(String, i64)>>>;

/// An exporter scripted per run: `fail` runs always get a retryable error, `panic` runs panic,
/// others land; it can also hang forever.
struct Scripted {
    delivered: Delivered,
    hang: bool,
}

impl Exporter for Scripted {
    fn export(&mut self, batch: &Batch, _timeout: Duration) -> Result<Exported, ExportError> {
        if self.hang {
            std::thread::sleep(Duration::from_secs(3600));
        }
        match batch.run.key.as_str() {
            "fail" => Err(ExportError::Retryable { message: "scripted failure".into(), retry_after: None }),
            "panic" => panic!("scripted exporter panic (expected by this test)"),
            _ => {
                let mut d = self.delivered.lock().expect("lock");
                d.extend(batch.points.iter().map(|p| (batch.run.key.clone(), p.step)));
                Ok(Exported::default())
            }
        }
    }
    fn end_runs(&mut self, _: RunOutcome, _: Duration) -> Result<(), ExportError> {
        Ok(())
    }
}

fn scripted(hang: bool) -> (Delivery, Delivered) {
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let settings = DeliverySettings {
        cadence: CadenceSettings { linger: Duration::from_millis(1), ..Default::default() },
        retry: RetrySettings { initial_interval: Duration::from_millis(20), ..Default::default() },
        ..Default::default()
    };
    let d = Delivery::start("scripted", Scripted { delivered: delivered.clone(), hang }, settings).expect("start");
    (d, delivered)
}

fn submit_steps(d: &Delivery, run: &str, steps: std::ops::RangeInclusive<i64>) {
    for step in steps {
        let res = vec![otlp::s("ml.run.id", run)];
        d.submit(Arc::new(otlp::request(vec![otlp::resource(res, &[("x", Some(step), 1.0)])]))).expect("submit");
    }
}

#[test]
fn a_failing_or_panicking_run_never_stalls_the_others() {
    let (d, delivered) = scripted(false);
    submit_steps(&d, "fail", 1..=3);
    submit_steps(&d, "panic", 1..=2);
    submit_steps(&d, "good", 1..=5);
    // Flush then shut down: the shutdown must not be lost behind the flush.
    let _ = d.flush(Duration::from_secs(2));
    let report = d.shutdown(RunOutcome::Finished, Duration::from_secs(2));
    let good: Vec<i64> = delivered.lock().expect("lock").iter().filter(|(r, _)| r == "good").map(|(_, s)| *s).collect();
    assert_eq!(good, vec![1, 2, 3, 4, 5]);
    assert_eq!(report.received, 10);
    assert_eq!(report.delivered, 5, "{report}");
    assert_eq!(report.dropped.get("rejected"), Some(&2), "the panicking run's points: {report}");
    assert_eq!(report.dropped.get("shutdown_timeout"), Some(&3), "the failing run's points: {report}");
    assert_eq!(report.received, report.delivered + report.dropped_total(), "{report}");
}

#[test]
fn counters_add_up_when_shutdown_times_out_on_a_hung_exporter() {
    let (d, _) = scripted(true);
    submit_steps(&d, "r", 1..=20);
    std::thread::sleep(Duration::from_millis(100));
    submit_steps(&d, "r", 21..=30);
    let started = Instant::now();
    let report = d.shutdown(RunOutcome::Finished, Duration::from_secs(1));
    assert!(started.elapsed() < Duration::from_secs(3), "bounded by its timeout: {:?}", started.elapsed());
    assert_eq!((report.received, report.delivered), (30, 0), "{report}");
    assert_eq!(report.received, report.dropped_total(), "{report}");
    assert!(report.last_error.as_deref().is_some_and(|e| e.contains("timed out")), "{report}");
}
