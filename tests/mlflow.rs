//! The MLflow exporter's promises on runs, keys and errors: against the real MLflow server
//! (empty names, long or unsafe run keys found again after a restart, colliding param and tag
//! keys, reserved tags), and against a scripted HTTP server for faults the real one cannot
//! produce on demand (a failed first log-batch, a redirect).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{fake_run_endpoints, history, kv, mlflow_uri, otlp, run, runs_of_experiment, scripted_server, unique};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use serde_json::Value;
use trainmetrics::cadence::CadenceSettings;
use trainmetrics::delivery::{Delivery, DeliverySettings};
use trainmetrics::exporter::mlflow::{MlflowExporter, MlflowSettings};
use trainmetrics::exporter::RunOutcome;
use trainmetrics::retry::RetrySettings;
use trainmetrics::stats::ExporterReport;

fn delivery(uri: &str, experiment: &str) -> Delivery {
    let settings =
        MlflowSettings { tracking_uri: uri.into(), authorization: None, experiment: experiment.into(), run_id: None, credential_file: None };
    let d = DeliverySettings {
        cadence: CadenceSettings { linger: Duration::from_millis(1), ..Default::default() },
        retry: RetrySettings { initial_interval: Duration::from_millis(50), ..Default::default() },
        ..Default::default()
    };
    Delivery::start("mlflow", MlflowExporter::new(settings), d).expect("start")
}

/// Submits one request per `(metric, step, value)` of one resource and shuts down.
fn deliver(uri: &str, experiment: &str, attrs: impl Fn() -> Vec<KeyValue>, points: &[(&str, i64, f64)]) -> ExporterReport {
    let d = delivery(uri, experiment);
    for (name, step, value) in points {
        let req = otlp::request(vec![otlp::resource(attrs(), &[(name, Some(*step), *value)])]);
        d.submit(Arc::new(req)).expect("submit");
    }
    d.shutdown(RunOutcome::Finished, Duration::from_secs(30))
}

fn assert_all_delivered(report: &ExporterReport) {
    assert_eq!(report.received, report.delivered, "{report}");
    assert_eq!(report.dropped_total(), 0, "{report}");
}

fn run_id_of(r: &Value) -> String {
    r["info"]["run_id"].as_str().expect("run_id").to_string()
}

fn steps(uri: &str, run_id: &str, key: &str) -> Vec<(i64, f64)> {
    history(uri, run_id, key).iter().map(|m| (m.0, m.1)).collect()
}

#[test]
fn an_empty_experiment_name_falls_back_to_the_default_and_an_empty_run_name_is_not_sent() {
    let uri = mlflow_uri();
    let default = unique("empty-names-default");
    let run_key = unique("empty-names-run");
    let attrs = || vec![otlp::s("ml.experiment.name", ""), otlp::s("ml.run.name", ""), otlp::s("ml.run.id", &run_key)];
    let report = deliver(&uri, &default, attrs, &[("x", 1, 1.0), ("x", 2, 2.0)]);
    assert_all_delivered(&report);
    assert_eq!(report.received, 2, "{report}");
    let runs = runs_of_experiment(&uri, &default);
    assert_eq!(runs.len(), 1, "one run in the default experiment");
    let r = run(&uri, &run_id_of(&runs[0]));
    // MLflow picked a name; the run key tag identifies the run.
    assert!(!r["info"]["run_name"].as_str().unwrap_or("").is_empty(), "{r}");
    assert_eq!(kv(&r, "tags").get("trainmetrics.run_key"), Some(&run_key));
    assert_eq!(steps(&uri, &run_id_of(&runs[0]), "x"), vec![(1, 1.0), (2, 2.0)]);
}

/// Two deliveries one after the other (a restarted trainer) with the same run key.
fn restart_continues_the_run(run_key: &str) {
    let uri = mlflow_uri();
    let exp = unique("restart-key");
    let attrs = || {
        vec![
            otlp::s("ml.experiment.name", &exp),
            otlp::s("ml.run.name", "restarted"),
            otlp::s("ml.run.id", run_key),
            // Must not replace the exporter's own tag, or the run would not be found again.
            otlp::s("trainmetrics.run_key", "forged"),
        ]
    };
    let reports: Vec<ExporterReport> =
        [1, 2].into_iter().map(|step| deliver(&uri, "unused", attrs, &[("x", step, step as f64)])).collect();
    reports.iter().for_each(assert_all_delivered);
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.len(), 1, "one MLflow run for one run key");
    for report in &reports {
        assert_eq!(report.events.get("reserved_tag_skipped"), Some(&1), "{report}");
    }
    let id = run_id_of(&runs[0]);
    assert_eq!(steps(&uri, &id, "x"), vec![(1, 1.0), (2, 2.0)]);
    let tag = kv(&run(&uri, &id), "tags").get("trainmetrics.run_key").cloned().unwrap_or_default();
    assert_ne!(tag, "forged");
    assert!(tag.chars().count() <= 200, "{}", tag.len());
}

#[test]
fn a_restart_finds_the_run_of_a_10000_character_run_key() {
    let id = unique("run");
    let key = format!("{}{id}", "k".repeat(10_000 - id.len()));
    assert_eq!(key.chars().count(), 10_000);
    restart_continues_the_run(&key);
}

#[test]
fn a_restart_finds_the_run_of_a_run_key_with_quotes_and_backslashes() {
    restart_continues_the_run(&unique(r#"it's "a\b" run"#));
}

#[test]
fn a_restart_finds_the_run_of_a_plain_run_key_with_every_safe_character() {
    restart_continues_the_run(&unique("user@host:exp/run 1_a.b"));
}

/// Case 017's kind for keys whose name tag key had to be shortened (over 232 characters) and
/// for series names cut to 1024 bytes: after a restart (a new exporter continuing the run), a
/// renamed name and the name that collides with it get the keys they had, one name per key.
#[test]
fn a_restart_keeps_long_renamed_names_on_their_keys() {
    let uri = mlflow_uri();
    let exp = unique("long-renamed");
    let run_key = unique("long-renamed-run");
    let attrs = || vec![otlp::s("ml.experiment.name", &exp), otlp::s("ml.run.id", &run_key)];
    let renamed = format!("w@{}", "q".repeat(238));
    let plain = format!("w_{}", "q".repeat(238));
    let huge = format!("h@{}", "é".repeat(800));
    assert_all_delivered(&deliver(&uri, &exp, attrs, &[(&renamed, 1, 1.0), (&plain, 1, 10.0), (&huge, 1, 100.0)]));
    // After the restart the colliding name comes first.
    assert_all_delivered(&deliver(&uri, &exp, attrs, &[(&plain, 2, 20.0), (&renamed, 2, 2.0), (&huge, 2, 200.0)]));
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.len(), 1);
    let id = run_id_of(&runs[0]);
    let r = run(&uri, &id);
    let mut keys: Vec<String> = r["data"]["metrics"].as_array().expect("metrics").iter().filter_map(|m| m["key"].as_str().map(str::to_string)).collect();
    keys.sort();
    assert_eq!(keys.len(), 3, "three names, three keys: {keys:?}");
    let mut series: Vec<Vec<(i64, f64)>> = keys.iter().map(|k| steps(&uri, &id, k)).collect();
    series.sort_by(|a, b| a[0].1.total_cmp(&b[0].1));
    assert_eq!(series, [vec![(1, 1.0), (2, 2.0)], vec![(1, 10.0), (2, 20.0)], vec![(1, 100.0), (2, 200.0)]]);
    assert_eq!(kv(&r, "tags").values().filter(|v| **v == renamed).count(), 1, "one name tag for the renamed name");
}

fn post(uri: &str, endpoint: &str, body: &Value) -> Value {
    let mut resp = ureq::post(format!("{uri}/api/2.0/mlflow/{endpoint}"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap_or_else(|e| panic!("POST {endpoint}: {e}"));
    serde_json::from_str(&resp.body_mut().read_to_string().expect("body")).expect("json")
}

#[test]
fn a_run_tagged_with_the_raw_key_by_an_older_version_is_continued() {
    let uri = mlflow_uri();
    let exp = unique("legacy-key");
    // Not ASCII, so the current tag value is a hash; an older version stored the key itself.
    let key = unique("résumé");
    let exp_id = post(&uri, "experiments/create", &serde_json::json!({"name": exp}))["experiment_id"].clone();
    let tags = serde_json::json!([{"key": "trainmetrics.run_key", "value": key}]);
    let created = post(&uri, "runs/create", &serde_json::json!({"experiment_id": exp_id, "start_time": 1, "tags": tags}));
    let id = created["run"]["info"]["run_id"].as_str().expect("run id").to_string();
    let attrs = || vec![otlp::s("ml.experiment.name", &exp), otlp::s("ml.run.id", &key)];
    for step in [1, 2] {
        assert_all_delivered(&deliver(&uri, "unused", attrs, &[("x", step, step as f64)]));
    }
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.iter().map(run_id_of).collect::<Vec<_>>(), vec![id.clone()]);
    assert_eq!(steps(&uri, &id, "x"), vec![(1, 1.0), (2, 2.0)]);
    let tag = kv(&run(&uri, &id), "tags").get("trainmetrics.run_key").cloned().unwrap_or_default();
    assert!(tag.starts_with("sha-"), "the tag moved to the current value: {tag}");
}

#[test]
fn params_and_tags_whose_keys_collide_are_all_logged_under_distinct_keys() {
    let uri = mlflow_uri();
    let exp = unique("collide");
    let attrs = || {
        vec![
            otlp::s("ml.experiment.name", &exp),
            otlp::s("ml.run.name", "collide"),
            otlp::s("ml.param.lr@1", "0.1"),
            otlp::s("ml.param.lr#1", "0.2"),
            otlp::s("team@x", "red"),
            otlp::s("team#x", "blue"),
        ]
    };
    // Two requests: the second must not re-send anything that could conflict.
    let report = deliver(&uri, "unused", attrs, &[("x", 1, 1.0), ("x", 2, 2.0)]);
    assert_all_delivered(&report);
    assert!(!report.events.contains_key("param_conflict"), "{report}");
    let runs = runs_of_experiment(&uri, &exp);
    assert_eq!(runs.len(), 1);
    let r = run(&uri, &run_id_of(&runs[0]));
    let of = |what: &str, prefix: &str| -> Vec<(String, String)> {
        kv(&r, what).into_iter().filter(|(k, _)| k.starts_with(prefix)).collect()
    };
    let params = of("params", "lr_1");
    assert_eq!(params.len(), 2, "{params:?}");
    assert!(params.iter().any(|(k, _)| k == "lr_1"), "{params:?}");
    let mut values: Vec<&str> = params.iter().map(|(_, v)| v.as_str()).collect();
    values.sort();
    assert_eq!(values, vec!["0.1", "0.2"]);
    let tags = of("tags", "team_x");
    assert_eq!(tags.len(), 2, "{tags:?}");
    assert!(tags.iter().any(|(k, _)| k == "team_x"), "{tags:?}");
    let mut values: Vec<&str> = tags.iter().map(|(_, v)| v.as_str()).collect();
    values.sort();
    assert_eq!(values, vec!["blue", "red"]);
}


fn name_tags(body: &str) -> Vec<(String, String)> {
    let v: Value = serde_json::from_str(body).expect("json body");
    v["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| (t["key"].as_str().unwrap_or("").to_string(), t["value"].as_str().unwrap_or("").to_string()))
        .collect()
}

#[test]
fn the_name_tag_survives_a_failed_first_log_batch() {
    let mut log_batches = 0;
    let (uri, seen) = scripted_server(move |line, _| {
        fake_run_endpoints(line).unwrap_or_else(|| {
            log_batches += 1;
            if log_batches == 1 {
                (503, String::new(), r#"{"error_code":"TEMPORARILY_UNAVAILABLE","message":"scripted"}"#.into())
            } else {
                (200, String::new(), "{}".into())
            }
        })
    });
    let attrs = || vec![otlp::s("ml.run.name", "r")];
    let d = delivery(&uri, "e");
    d.submit(Arc::new(otlp::request(vec![otlp::resource(attrs(), &[("acc@1", Some(1), 0.5)])]))).expect("submit");
    d.flush(Duration::from_secs(20)).expect("flush");
    d.submit(Arc::new(otlp::request(vec![otlp::resource(attrs(), &[("acc@1", Some(2), 0.6)])]))).expect("submit");
    let report = d.shutdown(RunOutcome::Finished, Duration::from_secs(20));
    assert_eq!((report.received, report.delivered, report.retried), (2, 2, 1), "{report}");
    let batches: Vec<String> =
        seen.lock().expect("lock").iter().filter(|(l, _)| l.contains("log-batch")).map(|(_, b)| b.clone()).collect();
    assert_eq!(batches.len(), 3, "{batches:?}");
    let want = vec![("trainmetrics.name/acc_1".to_string(), "acc@1".to_string())];
    assert_eq!(name_tags(&batches[0]), want, "the first attempt carries the name tag");
    assert_eq!(name_tags(&batches[1]), want, "so does its retry, after the 503");
    assert_eq!(name_tags(&batches[2]), vec![], "once accepted, it is not sent again");
}

#[test]
fn a_redirect_is_not_followed_and_says_where_to_point_the_tracking_uri() {
    let port = Arc::new(Mutex::new(String::new()));
    let target = port.clone();
    let (uri, seen) = scripted_server(move |line, _| {
        let host = target.lock().map(|p| p.clone()).unwrap_or_default();
        let path = line.split_whitespace().nth(1).unwrap_or("/");
        // Points back at this server, so a followed redirect would show as a second request.
        let location = format!("Location: http://user:s3cret@{host}/final{path}\r\n");
        (308, location, String::new())
    });
    if let Ok(mut p) = port.lock() {
        *p = uri.trim_start_matches("http://").to_string();
    }
    let d = delivery(&uri, "e");
    let attrs = || vec![otlp::s("ml.run.name", "r")];
    d.submit(Arc::new(otlp::request(vec![otlp::resource(attrs(), &[("x", Some(1), 1.0)])]))).expect("submit");
    let report = d.shutdown(RunOutcome::Finished, Duration::from_secs(20));
    assert_eq!((report.received, report.delivered, report.retried), (1, 0, 0), "{report}");
    assert_eq!(report.dropped.get("rejected"), Some(&1), "a redirect is permanent: {report}");
    let err = report.last_error.clone().unwrap_or_default();
    let host = uri.trim_start_matches("http://");
    assert!(err.contains("HTTP 308: the tracking URI redirects to"), "{err}");
    assert!(err.contains(&format!("(e.g. http://{host}/final)")), "{err}");
    assert!(!err.contains("s3cret") && !err.contains("user"), "{err}");
    let requests = seen.lock().expect("lock").clone();
    assert!(requests.iter().all(|(l, _)| !l.contains("/final")), "the redirect was followed: {requests:?}");
}
