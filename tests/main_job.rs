//! The main job end to end: the real trainer (`examples/train.rs`, candle on wine quality) through
//! the pipeline, compared with what it says it recorded (`--record-csv`): every TensorBoard scalar
//! in both loaders, and MLflow's window means and last values at steps 100, 200, ….

mod common;

use std::process::Command;

use common::{history, kv, mlflow_uri, read_csv, read_tb_both, runs_of_experiment, trainer, unique, Recorded};

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
    // Histograms (train.logits) show under TensorBoard's histograms, not scalars.
    let scalars: Recorded = recorded.iter().filter(|(n, _)| n.as_str() != "train.logits").map(|(n, v)| (n.clone(), v.clone())).collect();
    assert_eq!(scalars["train.loss"].len(), 1000);
    assert_eq!(scalars["eval.accuracy"].len(), 20);

    // TensorBoard: exactly one point per recorded step, equal as float32, in both loaders.
    let tb = read_tb_both(&logdir);
    assert_eq!(tb.scalars.keys().collect::<Vec<_>>(), vec!["main-job"]);
    let tags = &tb.scalars["main-job"];
    assert_eq!(tags.keys().collect::<Vec<_>>(), scalars.keys().collect::<Vec<_>>());
    for (name, points) in &scalars {
        let want: Vec<(i64, f64)> = points.iter().map(|(s, v)| (*s, f64::from(*v as f32))).collect();
        assert_eq!(tags[name], want, "{name}");
    }
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
    for (name, points) in &recorded {
        let got: Vec<(i64, f64)> = history(&uri, id, name).into_iter().map(|m| (m.0, m.1)).collect();
        let want: Vec<(i64, f64)> = (1..=10)
            .map(|w| w * 100)
            .filter_map(|end| {
                let window: Vec<f64> = points.iter().filter(|(s, _)| *s > end - 100 && *s <= end).map(|p| p.1).collect();
                let last = points.iter().filter(|(s, _)| *s > end - 100 && *s <= end).max_by_key(|p| p.0)?.1;
                Some((end, if name == "train.loss" { window.iter().sum::<f64>() / window.len() as f64 } else { last }))
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{name}: {got:?}");
        for ((gs, gv), (ws, wv)) in got.iter().zip(&want) {
            assert_eq!(gs, ws, "{name}");
            assert!((gv - wv).abs() <= 1e-6 * wv.abs().max(1e-12), "{name} at {gs}: {gv} vs {wv}");
        }
    }
    let params = kv(run, "params");
    for p in ["lr", "batch_size", "hidden", "steps", "warmup", "weight_decay", "seed", "dataset"] {
        assert!(params.contains_key(p), "param {p} missing: {params:?}");
    }
}
