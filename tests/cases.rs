//! The cases of `../shared/cases` (001–007, 010–012), each against the real components: a real
//! MLflow server and TensorBoard's own loaders (both).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{history, kv, mlflow_config as mlflow, mlflow_run_id, mlflow_uri, otlp, read_tb_both, run, runs_of_experiment, unique};
use trainmetrics::cadence::Aggregation;
use trainmetrics::config::{DeliveryConfig, ExporterConfig, MlflowConfig, TensorBoardConfig};
use trainmetrics::delivery::{Delivery, DeliverySettings};
use trainmetrics::exporter::mlflow::{MlflowExporter, MlflowSettings};
use trainmetrics::exporter::tensorboard::{TensorBoardExporter, TensorBoardSettings};
use trainmetrics::exporter::RunOutcome;
use trainmetrics::Pipeline;

fn tb(logdir: &Path) -> ExporterConfig<TensorBoardConfig> {
    ExporterConfig {
        backend: TensorBoardConfig { logdir: Some(logdir.to_path_buf()) },
        delivery: DeliveryConfig { every_steps: Some(1), reader_interval: Some(Duration::from_millis(100)), ..Default::default() },
    }
}

/// The only run directory's scalars, asserting there is exactly one.
fn only_run<T: Clone>(m: &BTreeMap<String, T>) -> T {
    assert_eq!(m.len(), 1, "expected one TensorBoard run, got {:?}", m.keys().collect::<Vec<_>>());
    m.values().next().cloned().expect("one run")
}

fn f32_exact(v: f64) -> f64 {
    f64::from(v as f32)
}

fn loss(step: i64) -> f64 {
    2.0 / (1.0 + step as f64 * 0.01) + 0.1 * (step as f64 * 0.7).sin()
}

fn lr(step: i64) -> f64 {
    1e-3 * (1.0 - step as f64 / 1000.0) + 1e-5
}

#[test]
fn case_001_every_step_to_tensorboard_window_means_to_mlflow() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let exp = unique("case001");
    let p = Pipeline::builder()
        .experiment(&exp)
        .run_name("case-001")
        .param("lr", 0.001)
        .exporter("tensorboard", tb(logdir.path()))
        .exporter("mlflow", mlflow(100, &[("train.loss", Aggregation::Mean), ("train.lr", Aggregation::Last)]))
        .build()
        .expect("pipeline");
    let rec = p.recorder();
    for step in 1..=1000 {
        rec.record_all(step, &[("train.loss", loss(step)), ("train.lr", lr(step))]);
    }
    let report = p.shutdown();
    assert_eq!(report.recorded, 2000);
    for e in &report.exporters {
        assert_eq!((e.received, e.delivered, e.dropped_total()), (2000, 2000, 0), "{e}");
    }

    let tbv = read_tb_both(logdir.path());
    let scalars = only_run(&tbv.scalars);
    let expect = |f: fn(i64) -> f64| (1..=1000).map(|s| (s, f32_exact(f(s)))).collect::<Vec<_>>();
    assert_eq!(scalars["train.loss"], expect(loss));
    assert_eq!(scalars["train.lr"], expect(lr));
    let hp = only_run(&tbv.hparams);
    assert_eq!(hp.get("lr").and_then(|v| v.as_f64()), Some(0.001));

    let uri = mlflow_uri();
    let id = mlflow_run_id(&p);
    let losses = history(&uri, &id, "train.loss");
    let steps: Vec<i64> = losses.iter().map(|m| m.0).collect();
    assert_eq!(steps, (1..=10).map(|w| w * 100).collect::<Vec<_>>());
    for (step, value, _) in &losses {
        let mean = (step - 99..=*step).map(loss).sum::<f64>() / 100.0;
        assert!(((value - mean) / mean).abs() < 1e-6, "step {step}: {value} vs mean {mean}");
    }
    let lrs = history(&uri, &id, "train.lr");
    assert_eq!(lrs.iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(), (1..=10).map(|w| (w * 100, lr(w * 100))).collect::<Vec<_>>());
    let r = run(&uri, &id);
    assert_eq!(r["info"]["status"], "FINISHED");
    assert_eq!(r["info"]["run_name"], "case-001");
    assert_eq!(kv(&r, "params").get("lr").map(String::as_str), Some("0.001"));
}

const CASE_002_ODD: [&str; 6] = ["timing(s)/gen", "eval_acc@1", "precision,recall", "huber[delta=1.3]", "n:estimators", "lossé"];

#[test]
fn case_002_forty_names_with_odd_characters() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let p = Pipeline::builder()
        .experiment(unique("case002"))
        .exporter("tensorboard", tb(logdir.path()))
        .exporter("mlflow", mlflow(1, &[]))
        .build()
        .expect("pipeline");
    let mut names: Vec<String> = CASE_002_ODD.iter().map(|s| s.to_string()).collect();
    names.extend((0..34).map(|i| format!("metric.{i}")));
    let rec = p.recorder();
    for (i, n) in names.iter().enumerate() {
        rec.record(7, n, i as f64);
    }
    let report = p.shutdown();
    assert!(report.exporters.iter().all(|e| e.delivered == 40 && e.dropped_total() == 0), "{report}");

    // TensorBoard keeps the original names.
    let tags = only_run(&read_tb_both(logdir.path()).scalars);
    assert_eq!(tags.keys().cloned().collect::<BTreeSet<_>>(), names.iter().cloned().collect::<BTreeSet<_>>());
    // MLflow: the documented sanitized keys, originals as tags.
    let uri = mlflow_uri();
    let r = run(&uri, &mlflow_run_id(&p));
    let metrics: BTreeMap<String, f64> = r["data"]["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .map(|m| (m["key"].as_str().unwrap_or("").to_string(), common::json_f64(&m["value"])))
        .collect();
    assert_eq!(metrics.len(), 40);
    let expected_keys = ["timing_s_/gen", "eval_acc_1", "precision_recall", "huber_delta_1.3_", "n:estimators", "lossé"];
    for (i, key) in expected_keys.iter().enumerate() {
        assert_eq!(metrics.get(*key), Some(&(i as f64)), "{key}");
    }
    let tags = kv(&r, "tags");
    assert_eq!(tags.get("trainmetrics.name/eval_acc_1").map(String::as_str), Some("eval_acc@1"));
    assert_eq!(tags.get("trainmetrics.name/timing_s_/gen").map(String::as_str), Some("timing(s)/gen"));
    assert!(!tags.contains_key("trainmetrics.name/lossé"), "unchanged names get no mapping tag");
}

#[test]
fn case_003_1001_metrics_and_150_params_in_one_step() {
    let mut b = Pipeline::builder().experiment(unique("case003")).exporter("mlflow", mlflow(1, &[]));
    for i in 0..150 {
        b = b.param(format!("p{i:03}"), i);
    }
    let p = b.build().expect("pipeline");
    let rec = p.recorder();
    for i in 0..1001 {
        rec.record(1, &format!("m{i:04}"), i as f64 * 0.5);
    }
    let report = p.shutdown();
    assert_eq!((report.exporters[0].delivered, report.exporters[0].dropped_total()), (1001, 0), "{report}");
    let r = run(&mlflow_uri(), &mlflow_run_id(&p));
    let metrics = r["data"]["metrics"].as_array().expect("metrics");
    assert_eq!(metrics.len(), 1001);
    let m500 = metrics.iter().find(|m| m["key"] == "m0500").expect("m0500");
    assert_eq!(common::json_f64(&m500["value"]), 250.0);
    let params = kv(&r, "params");
    assert_eq!(params.len(), 150);
    assert_eq!(params.get("p149").map(String::as_str), Some("149"));
}

fn mlflow_delivery(experiment: &str) -> Delivery {
    let settings = MlflowSettings {
        tracking_uri: mlflow_uri(),
        authorization: None,
        experiment: experiment.to_string(),
        run_id: None,
        credential_file: None,
    };
    let d = DeliverySettings {
        cadence: trainmetrics::cadence::CadenceSettings { linger: Duration::from_millis(200), ..Default::default() },
        ..Default::default()
    };
    Delivery::start("mlflow", MlflowExporter::new(settings), d).expect("delivery")
}

#[test]
fn case_004_long_param_and_a_param_that_changes() {
    let exp = unique("case004");
    let d = mlflow_delivery(&exp);
    let long = "x".repeat(780);
    let res = |lr: &str| vec![otlp::s("ml.run.name", "case-004"), otlp::s("ml.run.id", "case-004"), otlp::s("ml.param.lr", lr), otlp::s("ml.param.long", &long)];
    d.submit(Arc::new(otlp::request(vec![otlp::resource(res("0.1"), &[("loss", Some(1), 1.0)])]))).expect("submit");
    d.submit(Arc::new(otlp::request(vec![otlp::resource(res("0.2"), &[("loss", Some(2), 2.0), ("acc", Some(2), 0.5)])])))
        .expect("submit");
    d.submit(Arc::new(otlp::request(vec![otlp::resource(res("0.2"), &[("loss", Some(3), 3.0)])]))).expect("submit");
    let report = d.shutdown(RunOutcome::Finished, Duration::from_secs(20));
    assert_eq!((report.delivered, report.dropped_total()), (4, 0), "{report}");
    assert_eq!(report.events.get("param_conflict"), Some(&1), "{report}");

    let uri = mlflow_uri();
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.len(), 1);
    let id = runs[0]["info"]["run_id"].as_str().expect("run id");
    assert_eq!(history(&uri, id, "loss").iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(), vec![(1, 1.0), (2, 2.0), (3, 3.0)]);
    assert_eq!(history(&uri, id, "acc").iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(), vec![(2, 0.5)]);
    let params = kv(&run(&uri, id), "params");
    assert_eq!(params.get("lr").map(String::as_str), Some("0.1"), "MLflow keeps the first value");
    assert_eq!(params.get("long").map(|v| v.len()), Some(780), "under 6000 characters: kept whole");
}

#[test]
fn case_005_nan_and_infinities() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let p = Pipeline::builder()
        .experiment(unique("case005"))
        .exporter("tensorboard", tb(logdir.path()))
        .exporter("mlflow", mlflow(1, &[]))
        .build()
        .expect("pipeline");
    let values = [f64::NAN, 1.0, f64::NAN, 2.0, f64::INFINITY, f64::NEG_INFINITY];
    let rec = p.recorder();
    for (i, v) in values.iter().enumerate() {
        rec.record(i as i64 + 1, "train.loss", *v);
        rec.record(i as i64 + 1, "train.ok", 1.0);
    }
    let report = p.shutdown();
    assert!(report.exporters.iter().all(|e| e.delivered == 12 && e.dropped_total() == 0), "{report}");
    let fmt = |v: &[(i64, f64)]| v.iter().map(|(s, x)| format!("{s}:{x:?}")).collect::<Vec<_>>();
    let tags = only_run(&read_tb_both(logdir.path()).scalars);
    assert_eq!(fmt(&tags["train.loss"]), ["1:NaN", "2:1.0", "3:NaN", "4:2.0", "5:inf", "6:-inf"]);
    assert_eq!(tags["train.ok"].len(), 6);
    let uri = mlflow_uri();
    let h = history(&uri, &mlflow_run_id(&p), "train.loss");
    let got: Vec<(i64, f64)> = h.iter().map(|m| (m.0, m.1)).collect();
    // The SQL store keeps NaN as NaN and stores ±Inf as ±f64::MAX (its documented stand-in).
    assert_eq!(fmt(&got), ["1:NaN", "2:1.0", "3:NaN", "4:2.0", "5:1.7976931348623157e308", "6:-1.7976931348623157e308"]);
    assert!(h.iter().all(|m| m.2 > 0), "no point stored at timestamp 0");
}

#[test]
fn case_006_drop_without_flush_delivers_everything() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let exp = unique("case006");
    {
        let p = Pipeline::builder()
            .experiment(&exp)
            .exporter("tensorboard", tb(logdir.path()))
            .exporter("mlflow", mlflow(1, &[]))
            .build()
            .expect("pipeline");
        let rec = p.recorder();
        for step in 1..=10 {
            rec.record(step, "x", step as f64);
        }
        // Dropped here: no shutdown or flush call.
    }
    let tags = only_run(&read_tb_both(logdir.path()).scalars);
    assert_eq!(tags["x"], (1..=10).map(|s| (s, s as f64)).collect::<Vec<_>>());
    let uri = mlflow_uri();
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["info"]["status"], "FINISHED");
    let id = runs[0]["info"]["run_id"].as_str().expect("run id");
    assert_eq!(history(&uri, id, "x").iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(), (1..=10).map(|s| (s, s as f64)).collect::<Vec<_>>());
}

fn tb_delivery(logdir: &Path) -> Delivery {
    let d = DeliverySettings {
        cadence: trainmetrics::cadence::CadenceSettings { linger: Duration::from_millis(300), ..Default::default() },
        ..Default::default()
    };
    Delivery::start("tensorboard", TensorBoardExporter::new(TensorBoardSettings { logdir: logdir.to_path_buf() }), d)
        .expect("delivery")
}

#[test]
fn case_007_out_of_order_batches_end_in_step_order() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let d = tb_delivery(logdir.path());
    let res = || vec![otlp::s("ml.run.name", "case-007")];
    for step in [5, 3, 4] {
        d.submit(Arc::new(otlp::request(vec![otlp::resource(res(), &[("x", Some(step), step as f64)])]))).expect("submit");
    }
    let report = d.shutdown(RunOutcome::Finished, Duration::from_secs(10));
    assert_eq!((report.delivered, report.dropped_total()), (3, 0), "{report}");
    let tags = only_run(&read_tb_both(logdir.path()).scalars);
    assert_eq!(tags["x"], vec![(3, 3.0), (4, 4.0), (5, 5.0)]);
}

#[test]
fn case_010_points_without_a_step() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let d = tb_delivery(logdir.path());
    let res = || vec![otlp::s("ml.run.name", "case-010")];
    // Three collections with no step anywhere, then one where the run carries step 40.
    for v in [1.0, 2.0, 3.0] {
        d.submit(Arc::new(otlp::request(vec![otlp::resource(res(), &[("gpu.util", None, v)])]))).expect("submit");
    }
    d.submit(Arc::new(otlp::request(vec![otlp::resource(res(), &[("train.loss", Some(40), 0.5), ("gpu.util", None, 4.0)])])))
        .expect("submit");
    let report = d.shutdown(RunOutcome::Finished, Duration::from_secs(10));
    assert_eq!((report.delivered, report.dropped_total()), (5, 0), "{report}");
    let tags = only_run(&read_tb_both(logdir.path()).scalars);
    assert_eq!(tags["gpu.util"], vec![(0, 1.0), (1, 2.0), (2, 3.0), (40, 4.0)]);
}

#[test]
fn case_011_hostile_run_names_stay_inside_the_logdir() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let exp = unique("case011");
    let long = "r".repeat(300);
    let names = ["../../etc/passwd", "/abs/path", "a\0b", "..", long.as_str()];
    let tbd = tb_delivery(logdir.path());
    let mld = mlflow_delivery(&exp);
    for (i, n) in names.iter().enumerate() {
        let res = vec![otlp::s("ml.run.name", n), otlp::s("ml.run.id", &format!("case011-{i}"))];
        let req = Arc::new(otlp::request(vec![otlp::resource(res, &[("x", Some(1), i as f64)])]));
        tbd.submit(req.clone()).expect("submit");
        mld.submit(req).expect("submit");
    }
    let r1 = tbd.shutdown(RunOutcome::Finished, Duration::from_secs(10));
    let r2 = mld.shutdown(RunOutcome::Finished, Duration::from_secs(20));
    assert_eq!((r1.delivered, r2.delivered), (5, 5), "{r1}\n{r2}");

    // Every file is inside the logdir, in five distinct run directories.
    let mut dirs = BTreeSet::new();
    for entry in walk(logdir.path()) {
        let canon = entry.canonicalize().expect("canonicalize");
        assert!(canon.starts_with(logdir.path().canonicalize().expect("logdir")), "{}", canon.display());
        dirs.insert(entry.parent().expect("parent").to_path_buf());
    }
    assert_eq!(dirs.len(), 5, "{dirs:?}");
    let tbv = read_tb_both(logdir.path());
    assert_eq!(tbv.scalars.len(), 5);
    let values: BTreeSet<String> = tbv.scalars.values().map(|t| format!("{:?}", t["x"])).collect();
    assert_eq!(values.len(), 5);
    // MLflow: five runs; names are kept except for what a database cannot store (see names.rs).
    let uri = mlflow_uri();
    let got: BTreeSet<String> = runs_of_experiment(&uri, &exp)
        .iter()
        .map(|r| r["info"]["run_name"].as_str().unwrap_or("").to_string())
        .collect();
    let want: BTreeSet<String> = names.iter().map(|n| trainmetrics::names::mlflow_run_name(n)).collect();
    assert_eq!(got, want);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn case_012_shutdown_with_mlflow_unreachable_is_bounded_and_reports() {
    let logdir = tempfile::tempdir().expect("tempdir");
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let timeout = Duration::from_secs(3);
    let spool = tempfile::tempdir().expect("tempdir");
    let mut sending_queue = trainmetrics::config::QueueConfig::default();
    sending_queue.spool.directory = Some(spool.path().to_path_buf());
    let p = Pipeline::builder()
        .experiment(unique("case012"))
        .exporter("tensorboard", tb(logdir.path()))
        .exporter("mlflow", ExporterConfig { backend: MlflowConfig { tracking_uri: Some(dead), ..Default::default() }, delivery: DeliveryConfig { every_steps: Some(1), sending_queue, ..Default::default() } })
        .shutdown_timeout(timeout)
        .build()
        .expect("pipeline");
    let rec = p.recorder();
    for step in 1..=50 {
        rec.record(step, "x", step as f64);
    }
    let started = Instant::now();
    let report = p.shutdown();
    let took = started.elapsed();
    // A bound, not a speed claim: shutdown must not outlive its timeout (plus scheduling slack).
    assert!(took < timeout + Duration::from_secs(2), "shutdown took {took:?}");
    let by_name: BTreeMap<&str, _> = report.exporters.iter().map(|e| (e.name.as_str(), e)).collect();
    let ml = by_name["mlflow"];
    // Not delivered, not lost: every point is in the spool for the next start.
    assert_eq!((ml.received, ml.delivered, ml.dropped_total(), ml.pending, ml.spooled), (50, 0, 0, 50, 50), "{ml}");
    assert_eq!(ml.spool_bytes, trainmetrics::spool::directory_bytes(spool.path()), "{ml}");
    assert!(ml.spool_bytes > 0, "{ml}");
    assert!(ml.last_error.as_deref().is_some_and(|e| e.contains("runs") || e.contains("experiments")), "{ml}");
    let t = by_name["tensorboard"];
    assert_eq!((t.received, t.delivered, t.dropped_total()), (50, 50, 0), "{t}");
    // Idempotent: a second call returns the same report at once.
    assert_eq!(p.shutdown(), report);
}

/// Case 008, in process: steps 0..=150 every 10, then a new `Pipeline` (a restarted trainer, same
/// run id) records 100..=300 every 10 with other values. `policy` is the MLflow exporter's
/// `resume`.
fn case_008_run(policy: Option<trainmetrics::exporter::mlflow::config::ResumePolicy>) -> (tempfile::TempDir, String, Vec<trainmetrics::ShutdownReport>) {
    let logdir = tempfile::tempdir().expect("tempdir");
    let exp = unique("case008");
    let mut reports = Vec::new();
    for (steps, offset) in [((0..=150).step_by(10), 0.0), ((100..=300).step_by(10), 1000.0)] {
        let p = Pipeline::builder()
            .experiment(&exp)
            .run_name("case-008")
            .run_id("case-008-run")
            .exporter("tensorboard", tb(logdir.path()))
            .exporter("mlflow", { let base = mlflow(10, &[]); ExporterConfig { backend: MlflowConfig { resume: policy, ..base.backend }, delivery: base.delivery } })
            .build()
            .expect("pipeline");
        let rec = p.recorder();
        for step in steps {
            rec.record(step, "loss", offset + step as f64);
        }
        reports.push(p.shutdown());
    }
    (logdir, exp, reports)
}

/// TensorBoard after case 008: old values below 100, the resumed session's from 100 on, both
/// loaders agreeing, and a `SessionLog START` at each session's first step.
fn case_008_tensorboard(logdir: &Path) {
    let tbv = read_tb_both(logdir);
    let expect: Vec<(i64, f64)> =
        (0..100).step_by(10).map(|s| (s, s as f64)).chain((100..=300).step_by(10).map(|s| (s, 1000.0 + s as f64))).collect();
    assert_eq!(only_run(&tbv.scalars)["loss"], expect);
    assert_eq!(only_run(&tbv.session_starts), vec![0, 100]);
}

#[test]
fn case_008_resume_from_a_checkpoint_logs_again_by_default() {
    let (logdir, exp, reports) = case_008_run(None);
    for r in &reports {
        for e in &r.exporters {
            assert_eq!((e.delivered, e.dropped_total()), (e.received, 0), "{e}");
        }
    }
    case_008_tensorboard(logdir.path());
    let uri = mlflow_uri();
    let r = common::assert_case_008_log_again(&uri, &exp);
    assert_eq!(r["info"]["status"], "FINISHED");
    let latest: Vec<f64> = r["data"]["metrics"].as_array().into_iter().flatten().map(|m| common::json_f64(&m["value"])).collect();
    assert_eq!(latest, vec![1300.0], "the run's latest value is the resumed session's");
}

#[test]
fn case_008_resume_from_a_checkpoint_skip_logged_keeps_one_value_per_step() {
    let (logdir, exp, reports) = case_008_run(Some(trainmetrics::exporter::mlflow::config::ResumePolicy::SkipLogged));
    let mlflow_second = reports[1].exporters.iter().find(|e| e.name == "mlflow").expect("mlflow report");
    assert_eq!((mlflow_second.received, mlflow_second.delivered), (21, 15), "{mlflow_second}");
    assert_eq!(mlflow_second.dropped.get("superseded"), Some(&6), "steps 100..=150: {mlflow_second}");
    case_008_tensorboard(logdir.path());
    let uri = mlflow_uri();
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.len(), 1);
    let id = runs[0]["info"]["run_id"].as_str().expect("run id");
    assert_eq!(kv(&run(&uri, id), "tags").get("trainmetrics.resumed_at_step").map(String::as_str), Some("100"));
    let mut h = history(&uri, id, "loss");
    h.sort_by_key(|m| m.0);
    let got: Vec<(i64, f64)> = h.iter().map(|m| (m.0, m.1)).collect();
    let expect: Vec<(i64, f64)> =
        (0..=150).step_by(10).map(|s| (s, s as f64)).chain((160..=300).step_by(10).map(|s| (s, 1000.0 + s as f64))).collect();
    assert_eq!(got, expect);
}
