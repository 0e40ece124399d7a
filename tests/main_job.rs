//! The main job end to end: the real trainer (`examples/train.rs`, candle on wine quality) through
//! the pipeline, compared with what it says it recorded (`--record-csv`): every TensorBoard scalar
//! in both loaders, and MLflow's window means and last values at steps 100, 200, ….

mod common;

use std::process::Command;

use common::{kv, mlflow_uri, read_csv, read_tb_both, runs_of_experiment, trainer, unique};

#[test]
fn main_job_matches_what_the_trainer_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logdir = dir.path().join("runs");
    let csv = dir.path().join("recorded.csv");
    let exp = unique("main-job");
    let uri = mlflow_uri();
    let out = Command::new(trainer())
        .args(["--steps", "1000", "--run-name", "main-job", "--experiment", &exp, "--tracking-uri", &uri])
        .arg("--logdir")
        .arg(&logdir)
        .arg("--record-csv")
        .arg(&csv)
        .output()
        .expect("run the trainer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "trainer failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("step_time_ms mean="), "{stdout}");
    assert!(stdout.contains("tensorboard: received") && stdout.contains("mlflow: received"), "{stdout}");

    let recorded = read_csv(&csv);
    assert_eq!(recorded["train.loss"].len(), 1000);
    assert_eq!(recorded["eval.accuracy"].len(), 20);

    // TensorBoard: exactly one point per recorded step, equal as float32, in both loaders.
    let tb = read_tb_both(&logdir);
    assert_eq!(tb.scalars.keys().collect::<Vec<_>>(), vec!["main-job"]);
    // Histograms (train.logits) show under TensorBoard's histograms, not scalars.
    common::assert_tb_matches(&tb.scalars["main-job"], &recorded, &["train.logits"]);
    let logits = &tb.histograms["main-job"]["train.logits"];
    assert_eq!(logits.iter().map(|h| h.0).collect::<Vec<_>>(), recorded["train.logits"].iter().map(|r| r.0).collect::<Vec<_>>());
    let hp = &tb.hparams["main-job"];
    assert!(hp.contains_key("lr") && hp.contains_key("batch_size"), "{hp:?}");

    // MLflow: points exactly at 100, 200, …, 1000; loss = the window mean, the rest = last value.
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run["info"]["status"], "FINISHED");
    assert_eq!(run["info"]["run_name"], "main-job");
    let id = run["info"]["run_id"].as_str().expect("run id");
    assert!(stdout.contains(id), "the trainer prints its MLflow run id");
    common::assert_mlflow_windows(&uri, id, &recorded, 100, 1000);

    let params = kv(run, "params");
    for p in ["lr", "batch_size", "hidden", "steps", "warmup", "weight_decay", "seed", "dataset"] {
        assert!(params.contains_key(p), "param {p} missing: {params:?}");
    }
}
