//! The `trainmetrics` binary: `validate --config FILE`.

use std::process::Command;

fn validate(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_trainmetrics")).arg("validate").arg("--config").arg(&path).output().expect("run");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_valid_config_passes() {
    let (ok, out) = validate(
        "exporters:\n  tensorboard: {logdir: runs}\n  mlflow:\n    tracking_uri: http://127.0.0.1:5000\n    every_steps: 100\n    aggregation: mean\n",
    );
    assert!(ok, "{out}");
    assert!(out.contains("valid, 2 exporter(s)") && out.contains("mlflow: every_steps 100, interval -, aggregation Mean"), "{out}");
}

#[test]
fn every_problem_is_listed_and_the_exit_code_says_so() {
    let (ok, out) = validate(
        "exporters:\n  tensorboard: {every_steps: 0}\n  mlflow: {tracking_uri: 'ftp://user:hunter2@x', interval: 0s}\n  sink: {}\n",
    );
    assert!(!ok, "{out}");
    for needle in ["exporters.tensorboard.every_steps", "exporters.mlflow.tracking_uri", "exporters.mlflow.interval", "unknown exporter type \"sink\""] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }
    assert!(!out.contains("hunter2"), "a secret was echoed:\n{out}");
}

#[test]
fn unknown_keys_and_missing_files_are_clear_errors() {
    let (ok, out) = validate("exporters:\n  tensorboard: {log_dir: runs}\n");
    assert!(!ok && out.contains("log_dir"), "{out}");
    let out = Command::new(env!("CARGO_BIN_EXE_trainmetrics")).args(["validate", "--config", "/nonexistent/c.yaml"]).output().expect("run");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("/nonexistent/c.yaml"));
}
