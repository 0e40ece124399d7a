//! Test harness: the real components. A real MLflow server (one per test binary, on a free
//! 127.0.0.1 port, stopped when the test process exits: its launcher watches our PID), MLflow's
//! REST API to read back what landed, and TensorBoard's own loaders (Python's and RustBoard) via
//! `tests/support/read_tb.py`. A missing component fails the test with a message naming it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The project venv's Python, which has mlflow and tensorboard.
pub fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "missing component: the Python venv {} (mlflow, tensorboard). Run scripts/setup.sh",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// A real MLflow tracking server (tests/support/mlflow_server.py: SQLite store in `dir`, bound to
/// 127.0.0.1:`port`), stopped by PID when dropped or by [`MlflowServer::stop`]. A test may stop it
/// and start another on the same port and directory: the same tracking URI, the same data.
pub struct MlflowServer {
    /// `http://127.0.0.1:<port>`.
    pub uri: String,
    child: Child,
    stopped: bool,
}

impl MlflowServer {
    /// Starts one and waits until it answers `/health`.
    pub fn start(port: u16, dir: &Path) -> MlflowServer {
        Self::start_args(port, dir, &[])
    }

    /// As [`MlflowServer::start`], running MLflow's basic-auth app: every API call needs HTTP
    /// Basic credentials; the user `admin` has `password`.
    pub fn start_basic_auth(port: u16, dir: &Path, password: &str) -> MlflowServer {
        Self::start_args(port, dir, &["--admin-password", password])
    }

    fn start_args(port: u16, dir: &Path, extra: &[&str]) -> MlflowServer {
        let mut child = Command::new(python())
            .arg(root().join("tests/support/mlflow_server.py"))
            .args(["--port", &port.to_string()])
            .arg("--dir")
            .arg(dir)
            .args(["--parent-pid", &std::process::id().to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("missing component: could not run tests/support/mlflow_server.py with the venv's python");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read mlflow_server.py output");
        let uri = line
            .trim()
            .strip_prefix("READY ")
            .unwrap_or_else(|| panic!("missing component: MLflow server did not start: {line}"))
            .to_string();
        MlflowServer { uri, child, stopped: false }
    }

    /// Stops it (the watchdog ends the server's whole process group) and waits until it has.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        self.terminate();
    }
}

struct Server {
    server: MlflowServer,
    _dir: tempfile::TempDir,
}

static MLFLOW: OnceLock<Server> = OnceLock::new();

/// The tracking URI of this test binary's MLflow server, started on first use.
pub fn mlflow_uri() -> String {
    MLFLOW
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir for mlflow");
            let server = MlflowServer::start(free_port(), dir.path());
            Server { server, _dir: dir }
        })
        .server
        .uri
        .clone()
}

/// `uri` without userinfo, and the HTTP Basic header of its `user:password@`, if it has one: the
/// readers below take `http://admin:pw@127.0.0.1:P` for a server running the basic-auth app.
fn split_auth(uri: &str) -> (String, Option<String>) {
    use base64::Engine;
    let Some((scheme, rest)) = uri.split_once("://") else { return (uri.to_string(), None) };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let header = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(userinfo));
            (format!("{scheme}://{host}"), Some(header))
        }
        None => (uri.to_string(), None),
    }
}

fn get(uri: &str, endpoint: &str, query: &[(&str, &str)]) -> Value {
    let (uri, auth) = split_auth(uri);
    let mut req = ureq::get(format!("{uri}/api/2.0/mlflow/{endpoint}"));
    if let Some(a) = &auth {
        req = req.header("Authorization", a);
    }
    for (k, v) in query {
        req = req.query(*k, *v);
    }
    let mut resp = req.call().unwrap_or_else(|e| panic!("GET {endpoint}: {e}"));
    let text = resp.body_mut().read_to_string().expect("body");
    serde_json::from_str(&text).expect("json")
}

fn post(uri: &str, endpoint: &str, body: &Value) -> Value {
    let (uri, auth) = split_auth(uri);
    let mut req = ureq::post(format!("{uri}/api/2.0/mlflow/{endpoint}"));
    if let Some(a) = &auth {
        req = req.header("Authorization", a);
    }
    let mut resp = req
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap_or_else(|e| panic!("POST {endpoint}: {e}"));
    let text = resp.body_mut().read_to_string().expect("body");
    serde_json::from_str(&text).expect("json")
}

/// A metric value as MLflow returns it (numbers, or "NaN"/"Infinity"/"-Infinity").
pub fn json_f64(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().expect("f64"),
        Value::String(s) if s == "NaN" => f64::NAN,
        Value::String(s) if s == "Infinity" => f64::INFINITY,
        Value::String(s) if s == "-Infinity" => f64::NEG_INFINITY,
        other => panic!("not a metric value: {other}"),
    }
}

/// Full history of one metric: (step, value, timestamp ms), in the server's order.
pub fn history(uri: &str, run_id: &str, key: &str) -> Vec<(i64, f64, i64)> {
    let v = get(uri, "metrics/get-history", &[("run_id", run_id), ("metric_key", key)]);
    v.get("metrics")
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    (
                        m["step"].as_i64().unwrap_or(0),
                        json_f64(&m["value"]),
                        m["timestamp"].as_i64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `runs/get` → `run`.
pub fn run(uri: &str, run_id: &str) -> Value {
    get(uri, "runs/get", &[("run_id", run_id)])["run"].clone()
}

/// key → value of a run's `data.params` or `data.tags`.
pub fn kv(run: &Value, what: &str) -> BTreeMap<String, String> {
    run["data"][what]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| (x["key"].as_str().unwrap_or("").to_string(), x["value"].as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs of an experiment by name (empty if the experiment does not exist).
pub fn runs_of_experiment(uri: &str, experiment: &str) -> Vec<Value> {
    // 404 (RESOURCE_DOES_NOT_EXIST) is an answer here, not a failure.
    let (base, auth) = split_auth(uri);
    let mut req = ureq::get(format!("{base}/api/2.0/mlflow/experiments/get-by-name"));
    if let Some(a) = &auth {
        req = req.header("Authorization", a);
    }
    let mut resp = req
        .query("experiment_name", experiment)
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap_or_else(|e| panic!("GET experiments/get-by-name: {e}"));
    let e: Value = serde_json::from_str(&resp.body_mut().read_to_string().expect("body")).expect("json");
    let Some(id) = e.pointer("/experiment/experiment_id").and_then(Value::as_str) else {
        return Vec::new();
    };
    let body = serde_json::json!({"experiment_ids": [id], "max_results": 1000});
    post(uri, "runs/search", &body)["runs"].as_array().cloned().unwrap_or_default()
}

/// Case 008 (steps 0..=150 every 10 with value = step, then a resume at 100 recording steps
/// 100..=300 every 10 with value = 1000 + step) as MLflow holds it under `resume: log_again`:
/// one run, tagged with the resume step, whose `loss` history has both sessions' values, the
/// resumed one's later in time. Returns the run (`runs/get`).
pub fn assert_case_008_log_again(uri: &str, experiment: &str) -> Value {
    let runs = runs_of_experiment(uri, experiment);
    assert_eq!(runs.len(), 1, "the same MLflow run continues");
    let id = runs[0]["info"]["run_id"].as_str().expect("run id");
    let r = run(uri, id);
    assert_eq!(kv(&r, "tags").get("trainmetrics.resumed_at_step").map(String::as_str), Some("100"));
    let mut h = history(uri, id, "loss");
    h.sort_by_key(|m| (m.2, m.0));
    let got: Vec<(i64, f64)> = h.iter().map(|m| (m.0, m.1)).collect();
    let expect: Vec<(i64, f64)> =
        (0..=150).step_by(10).map(|s| (s, s as f64)).chain((100..=300).step_by(10).map(|s| (s, 1000.0 + s as f64))).collect();
    assert_eq!(got, expect, "log_again: both sessions' values, the resumed one's later");
    r
}

/// An MLflow exporter config pointing at this binary's server, collecting every 100 ms.
pub fn mlflow_config(every: u64, metrics: &[(&str, trainmetrics::cadence::Aggregation)]) -> trainmetrics::config::ExporterConfig<trainmetrics::config::MlflowConfig> {
    trainmetrics::config::ExporterConfig {
        backend: trainmetrics::config::MlflowConfig { tracking_uri: Some(mlflow_uri()), ..Default::default() },
        delivery: trainmetrics::config::DeliveryConfig {
            every_steps: Some(every),
            reader_interval: Some(Duration::from_millis(100)),
            metrics: metrics.iter().map(|(k, a)| (k.to_string(), *a)).collect(),
            ..Default::default()
        },
    }
}

/// An MLflow exporter that writes every step (last value), spools into `spool` and retries per
/// `retry`, each export call bounded by 2 s: the shape of the outage and sync tests.
pub fn spooling_mlflow(uri: &str, spool: &std::path::Path, retry: trainmetrics::config::RetryConfig, max_pending_points: Option<usize>) -> trainmetrics::config::ExporterConfig<trainmetrics::config::MlflowConfig> {
    use trainmetrics::config::{DeliveryConfig, ExporterConfig, MlflowConfig, QueueConfig};
    let mut sending_queue = QueueConfig { max_pending_points, ..Default::default() };
    sending_queue.spool.directory = Some(spool.to_path_buf());
    ExporterConfig {
        backend: MlflowConfig { tracking_uri: Some(uri.to_string()), ..Default::default() },
        delivery: DeliveryConfig {
            every_steps: Some(1),
            aggregation: Some(trainmetrics::cadence::Aggregation::Last),
            reader_interval: Some(Duration::from_millis(100)),
            timeout: Some(Duration::from_secs(2)),
            retry_on_failure: retry,
            sending_queue,
            ..Default::default()
        },
    }
}

/// The MLflow run id a pipeline reports (panics if it has none yet).
pub fn mlflow_run_id(p: &trainmetrics::Pipeline) -> String {
    p.run_destinations()
        .into_iter()
        .find_map(|l| match l {
            trainmetrics::RunDestination::Mlflow { run_id: Some(id), .. } => Some(id),
            _ => None,
        })
        .expect("the pipeline has an MLflow run")
}

/// A unique name for this test's experiment.
pub fn unique(name: &str) -> String {
    format!("{name}-{}-{:08x}", std::process::id(), rand::random::<u32>())
}

/// Histogram points of one tag: (step, rows `[left, right, count]`).
pub type HistogramSeries = Vec<(i64, Vec<[f64; 3]>)>;

/// What TensorBoard's loaders show.
#[derive(Debug, Default)]
pub struct Tb {
    /// run → tag → [(step, value)]
    pub scalars: BTreeMap<String, BTreeMap<String, Vec<(i64, f64)>>>,
    /// run → tag → [(step, rows [left, right, count])]
    pub histograms: BTreeMap<String, BTreeMap<String, HistogramSeries>>,
    /// run → param → value (as JSON)
    pub hparams: BTreeMap<String, BTreeMap<String, Value>>,
    /// run → steps of SessionLog START (Python loader only)
    pub session_starts: BTreeMap<String, Vec<i64>>,
}

/// Which TensorBoard loader.
#[derive(Debug, Clone, Copy)]
pub enum Loader {
    /// The legacy Python loader (EventMultiplexer).
    Python,
    /// RustBoard, the default loader (`--load_fast=true`).
    Rust,
}

/// Reads `logdir` with TensorBoard's own loader.
pub fn read_tb(logdir: &Path, loader: Loader) -> Tb {
    let name = match loader {
        Loader::Python => "python",
        Loader::Rust => "rust",
    };
    let out = Command::new(python())
        .arg(root().join("tests/support/read_tb.py"))
        .arg("--logdir")
        .arg(logdir)
        .args(["--loader", name])
        .output()
        .expect("missing component: could not run tests/support/read_tb.py");
    assert!(
        out.status.success(),
        "read_tb.py --loader {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("read_tb.py JSON");
    let mut tb = Tb::default();
    for (run, tags) in v["scalars"].as_object().into_iter().flatten() {
        for (tag, pts) in tags.as_object().into_iter().flatten() {
            let pts = pts
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| (p[0].as_i64().expect("step"), json_f64(&p[1])))
                .collect();
            tb.scalars.entry(run.clone()).or_default().insert(tag.clone(), pts);
        }
    }
    for (run, tags) in v["histograms"].as_object().into_iter().flatten() {
        for (tag, pts) in tags.as_object().into_iter().flatten() {
            let pts = pts
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    let rows = p[1]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| [json_f64(&r[0]), json_f64(&r[1]), json_f64(&r[2])])
                        .collect();
                    (p[0].as_i64().expect("step"), rows)
                })
                .collect();
            tb.histograms.entry(run.clone()).or_default().insert(tag.clone(), pts);
        }
    }
    for (run, hp) in v["hparams"].as_object().into_iter().flatten() {
        if let Some(m) = hp.as_object() {
            tb.hparams.insert(run.clone(), m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        }
    }
    for (run, steps) in v["session_starts"].as_object().into_iter().flatten() {
        tb.session_starts.insert(run.clone(), steps.as_array().into_iter().flatten().filter_map(Value::as_i64).collect());
    }
    tb
}

/// Both loaders, checked to agree on every scalar; returns the Python loader's view.
pub fn read_tb_both(logdir: &Path) -> Tb {
    let py = read_tb(logdir, Loader::Python);
    let rs = read_tb(logdir, Loader::Rust);
    assert_eq!(fmt_scalars(&py), fmt_scalars(&rs), "TensorBoard's Python and Rust loaders disagree");
    py
}

/// Scalars with NaN made comparable.
pub fn fmt_scalars(tb: &Tb) -> BTreeMap<String, BTreeMap<String, Vec<(i64, String)>>> {
    tb.scalars
        .iter()
        .map(|(r, tags)| {
            (
                r.clone(),
                tags.iter().map(|(t, p)| (t.clone(), p.iter().map(|(s, v)| (*s, format!("{v:?}"))).collect())).collect(),
            )
        })
        .collect()
}

/// Pauses briefly (used only to let a server-side effect settle, never to assert speed).
pub fn settle() {
    std::thread::sleep(Duration::from_millis(50));
}

/// OTLP requests built by hand, as a collector or another SDK would send them.
pub mod otlp {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::metrics::v1::{
        metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;

    /// A string attribute.
    pub fn s(k: &str, v: &str) -> KeyValue {
        KeyValue { key: k.into(), value: Some(AnyValue { value: Some(any_value::Value::StringValue(v.into())) }), ..Default::default() }
    }

    /// An int attribute.
    pub fn i(k: &str, v: i64) -> KeyValue {
        KeyValue { key: k.into(), value: Some(AnyValue { value: Some(any_value::Value::IntValue(v)) }), ..Default::default() }
    }

    /// One resource (run) with gauge points `(metric, step, value)`; `step: None` sends no step.
    pub fn resource(attrs: Vec<KeyValue>, points: &[(&str, Option<i64>, f64)]) -> ResourceMetrics {
        let metrics = points
            .iter()
            .map(|(name, step, v)| Metric {
                name: name.to_string(),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![NumberDataPoint {
                        attributes: step.map(|st| vec![i("step", st)]).unwrap_or_default(),
                        time_unix_nano: 1_790_000_000_000_000_000 + step.unwrap_or(0).max(0) as u64 * 1_000_000,
                        value: Some(number_data_point::Value::AsDouble(*v)),
                        ..Default::default()
                    }],
                })),
                ..Default::default()
            })
            .collect();
        ResourceMetrics {
            resource: Some(Resource { attributes: attrs, ..Default::default() }),
            scope_metrics: vec![ScopeMetrics { metrics, ..Default::default() }],
            ..Default::default()
        }
    }

    /// A request of resources.
    pub fn request(resources: Vec<ResourceMetrics>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest { resource_metrics: resources }
    }
}

/// Requests a scripted server saw: request line and body.
pub type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A scripted HTTP server (for faults a real MLflow cannot produce on demand), answering each request with `answer(request line, body)` →
/// `(status, extra headers, body)`. Records every request.
pub fn scripted_server<F>(answer: F) -> (String, Seen)
where
    F: FnMut(&str, &str) -> (u16, String, String) + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let uri = format!("http://{}", listener.local_addr().expect("addr"));
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let mut answer = answer;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let Ok(clone) = s.try_clone() else { continue };
            let mut r = BufReader::new(clone);
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let mut len = 0;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            let _ = r.read_exact(&mut body);
            let body = String::from_utf8_lossy(&body).into_owned();
            let (status, headers, text) = answer(&line, &body);
            if let Ok(mut l) = log.lock() {
                l.push((line.trim().to_string(), body));
            }
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (uri, seen)
}

/// The run endpoints of a minimal MLflow; `None` for endpoints it leaves to the caller.
pub fn fake_run_endpoints(line: &str) -> Option<(u16, String, String)> {
    let ok = |b: &str| Some((200, String::new(), b.to_string()));
    if line.contains("get-by-name") {
        ok(r#"{"experiment":{"experiment_id":"7"}}"#)
    } else if line.contains("runs/search") {
        ok("{}")
    } else if line.contains("runs/create") {
        ok(r#"{"run":{"info":{"run_id":"abc"}}}"#)
    } else if line.contains("log-batch") {
        None
    } else {
        ok("{}")
    }
}

/// The `trainmetrics` binary cargo built next to the test binaries.
pub fn trainmetrics_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(format!("trainmetrics{}", std::env::consts::EXE_SUFFIX));
    assert!(path.exists(), "missing component: the trainmetrics binary {} (built by `cargo test`)", path.display());
    path
}

/// A running `trainmetrics serve`, killed when dropped.
pub struct Service {
    child: Child,
    /// gRPC `host:port`.
    pub grpc: String,
    /// HTTP `host:port`.
    pub http: String,
    /// Self-telemetry `host:port` (`/metrics`, `/health`).
    pub telemetry: String,
    stdout: BufReader<std::process::ChildStdout>,
    /// The default spool root of this service (`TRAINMETRICS_SPOOL_DIR`), so no test replays
    /// another's leftovers; a test that restarts a service sets the directory itself.
    _spool: tempfile::TempDir,
}

impl Service {
    /// Starts it on free ports with TensorBoard into `logdir` and extra `--set` overrides.
    pub fn start(logdir: &Path, extra: &[String]) -> Service {
        Self::start_with(None, logdir, extra)
    }

    /// As [`Service::start`], from `collector-config/trainmetrics.yaml` (the config the examples
    /// use), with MLflow at `mlflow_uri` and a reorder window that covers collector batching.
    pub fn start_example(logdir: &Path, mlflow_uri: &str, extra: &[String]) -> Service {
        let mut sets = vec![format!("exporters.mlflow.tracking_uri={mlflow_uri}"), "exporters.mlflow.reorder_window=5s".into()];
        sets.extend_from_slice(extra);
        Self::start_with(Some(&root().join("collector-config/trainmetrics.yaml")), logdir, &sets)
    }

    /// As [`Service::start`], from a config file.
    pub fn start_with(config: Option<&Path>, logdir: &Path, extra: &[String]) -> Service {
        Self::start_logged(config, logdir, extra, Stdio::inherit())
    }

    /// As [`Service::start_with`], its log (stderr) to `log`.
    pub fn start_logged(config: Option<&Path>, logdir: &Path, extra: &[String], log: Stdio) -> Service {
        Self::start_env(config, logdir, extra, &[], log)
    }

    /// As [`Service::start_logged`], with extra environment variables.
    pub fn start_env(config: Option<&Path>, logdir: &Path, extra: &[String], env: &[(&str, &str)], log: Stdio) -> Service {
        let spool = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(trainmetrics_bin());
        cmd.arg("serve").env("TRAINMETRICS_SPOOL_DIR", spool.path()).envs(env.iter().copied());
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd
            .args(["--set", "receivers.otlp.protocols.grpc.endpoint=127.0.0.1:0"])
            .args(["--set", "receivers.otlp.protocols.http.endpoint=127.0.0.1:0"])
            .args(["--set", "service.telemetry.endpoint=127.0.0.1:0"])
            .arg("--set")
            .arg(format!("exporters.tensorboard.logdir={}", logdir.display()))
            .args(["--set", "exporters.tensorboard.reorder_window=1s"])
            .args(["--set", "exporters.tensorboard.linger=200ms"])
            .env_remove("MLFLOW_TRACKING_URI")
            .stdout(Stdio::piped())
            .stderr(log);
        for e in extra {
            cmd.arg("--set").arg(e);
        }
        let mut child = cmd.spawn().expect("run trainmetrics serve");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("listening line");
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("serve did not start: {line:?}"))
                .to_string()
        };
        let (grpc, http, telemetry) = (field("grpc="), field("http="), field("telemetry="));
        Service { child, grpc, http, telemetry, stdout, _spool: spool }
    }

    /// The process id (e.g. to signal it while still reading from it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no drain, no report (what a crash or the OOM killer does).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the rest of stdout (the shutdown report).
    pub fn stop(mut self) -> String {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let status = self.child.wait();
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stdout, &mut rest);
        if rest.is_empty() {
            // Say how it ended, so an assertion on the report shows why there was none.
            rest = format!("(no shutdown report; trainmetrics serve ended with {status:?})");
        }
        rest
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The collector binary (`TRAINMETRICS_OTELCOL`, set by scripts/test.sh).
pub fn otelcol() -> PathBuf {
    let path = std::env::var_os("TRAINMETRICS_OTELCOL").map(PathBuf::from).unwrap_or_else(|| {
        panic!("missing component: the OpenTelemetry Collector; run scripts/build-collector.sh and set TRAINMETRICS_OTELCOL (scripts/test.sh does both)")
    });
    assert!(path.exists(), "missing component: the OpenTelemetry Collector at {}", path.display());
    path
}

/// `cargo test` builds the examples next to the test binaries (`target/<profile>/examples`).
pub fn trainer() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join("examples").join(format!("train{}", std::env::consts::EXE_SUFFIX));
    assert!(path.exists(), "missing component: the example trainer {} (built by `cargo test`)", path.display());
    path
}

/// A collector process with its own telemetry on (Prometheus, on a free port), killed when
/// dropped.
///
/// Stopping it is not enough to get everything through: on SIGTERM its batch processor hands
/// what it holds to the exporter's persistent (file_storage) sending queue, which keeps it on
/// disk for the next start instead of sending it. So the test first waits until the collector
/// says it sent every data point ([`Collector::wait_sent`]).
pub struct Collector {
    child: Child,
    /// Its OTLP/gRPC `host:port`.
    pub grpc: String,
    telemetry: String,
}

impl Collector {
    /// Starts `collector-config/agent.yaml` forwarding to `upstream`, its log to `log`.
    pub fn start(upstream: &str, queue_dir: &Path, log: Stdio) -> Collector {
        let env = [
            ("TRAINMETRICS_GRPC_ENDPOINT", upstream.to_string()),
            ("OTELCOL_QUEUE_DIR", queue_dir.display().to_string()),
        ];
        Self::start_config("agent.yaml", &env, log)
    }

    /// Starts `collector-config/<file>` on free ports with extra environment variables.
    pub fn start_config(file: &str, env: &[(&str, String)], log: Stdio) -> Collector {
        let grpc = format!("127.0.0.1:{}", free_port());
        let metrics_port = free_port();
        let mut cmd = Command::new(otelcol());
        cmd.arg(format!("--config={}", root().join("collector-config").join(file).display()))
            .env("OTELCOL_GRPC_ENDPOINT", &grpc)
            .env("OTELCOL_HTTP_ENDPOINT", format!("127.0.0.1:{}", free_port()))
            .env("OTELCOL_LOG_LEVEL", "info")
            .env("OTELCOL_METRICS_LEVEL", "basic")
            .env("OTELCOL_METRICS_PORT", metrics_port.to_string())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start the collector");
        let started = Instant::now();
        while TcpStream::connect(&grpc).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "the collector did not listen on {grpc}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Collector { child, grpc, telemetry: format!("http://127.0.0.1:{metrics_port}/metrics") }
    }

    /// The collector's own metrics (Prometheus text), empty until its endpoint answers.
    fn telemetry(&self) -> String {
        ureq::get(&self.telemetry)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default()
    }

    /// Waits until the collector's exporter has sent `n` data points (acknowledged by the
    /// service), at most 60 s (its retries back off up to 10 s).
    pub fn wait_sent(&self, n: u64) {
        let started = Instant::now();
        loop {
            let text = self.telemetry();
            let sent: f64 = text
                .lines()
                .filter(|l| l.starts_with("otelcol_exporter_sent_metric_points{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if sent as u64 >= n {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the collector sent {sent} of {n} data points in 60 s:\n{}",
                text.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the collector's exporter has sent every data point its receiver accepted
    /// (and at least one), at most 60 s: for producers whose point count is not known upfront
    /// (cumulative temporality re-sends every attribute set at each collection).
    pub fn wait_drained(&self) {
        let started = Instant::now();
        let total = |text: &str, metric: &str| -> f64 {
            text.lines().filter(|l| l.starts_with(metric)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
        };
        loop {
            let text = self.telemetry();
            let (accepted, sent) = (total(&text, "otelcol_receiver_accepted_metric_points{"), total(&text, "otelcol_exporter_sent_metric_points{"));
            if accepted > 0.0 && sent >= accepted {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the collector sent {sent} of the {accepted} data points it accepted in 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then wait for the process.
    pub fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// metric name → [(step, value)] as a trainer's `--record-csv` wrote them.
pub type Recorded = BTreeMap<String, Vec<(i64, f64)>>;

/// Reads a `--record-csv` file (`step,name,value`).
pub fn read_csv(path: &Path) -> Recorded {
    let text = std::fs::read_to_string(path).expect("record csv");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("step,name,value"));
    let mut out = Recorded::new();
    for l in lines {
        let mut it = l.splitn(3, ',');
        let (Some(s), Some(n), Some(v)) = (it.next(), it.next(), it.next()) else { panic!("bad csv line {l:?}") };
        out.entry(n.to_string()).or_default().push((s.parse().expect("step"), v.parse().expect("value")));
    }
    out
}

/// Asserts that MLflow's history of every recorded metric holds exactly the windows of
/// `every` steps up to `last_step`, each stamped with its end: the window mean for `train.loss`,
/// else the value at the window's last recorded step (1e-6 relative).
pub fn assert_mlflow_windows(uri: &str, run_id: &str, recorded: &Recorded, every: i64, last_step: i64) {
    for (name, points) in recorded {
        let got: Vec<(i64, f64)> = history(uri, run_id, name).into_iter().map(|m| (m.0, m.1)).collect();
        let want: Vec<(i64, f64)> = (1..=last_step / every)
            .filter_map(|w| {
                let end = w * every;
                let window: Vec<&(i64, f64)> = points.iter().filter(|(s, _)| *s > end - every && *s <= end).collect();
                let last = window.iter().max_by_key(|p| p.0)?.1;
                let mean = window.iter().map(|p| p.1).sum::<f64>() / window.len() as f64;
                Some((end, if name == "train.loss" { mean } else { last }))
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{name}: {got:?}");
        for ((gs, gv), (ws, wv)) in got.iter().zip(&want) {
            assert_eq!(gs, ws, "{name}");
            assert!((gv - wv).abs() <= 1e-6 * wv.abs().max(1e-12), "{name} at {gs}: {gv} vs {wv}");
        }
    }
}

/// Asserts that a TensorBoard run's scalar tags are exactly the recorded scalars (all recorded
/// metrics but `histograms`), one point per recorded step, equal as float32.
pub fn assert_tb_matches(tags: &BTreeMap<String, Vec<(i64, f64)>>, recorded: &Recorded, histograms: &[&str]) {
    let scalars: Vec<&String> = recorded.keys().filter(|n| !histograms.contains(&n.as_str())).collect();
    assert_eq!(tags.keys().collect::<Vec<_>>(), scalars);
    for name in scalars {
        let want: Vec<(i64, f64)> = recorded[name].iter().map(|(s, v)| (*s, f64::from(*v as f32))).collect();
        assert_eq!(tags[name], want, "{name}");
    }
}

/// A gRPC client codec that sends raw bytes as the request message (to send what no SDK
/// would) and decodes the OTLP metrics answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;
#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for ResponseDecoder {
    type Item = opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Self::Item>, tonic::Status> {
        prost::Message::decode(buf).map(Some).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}
