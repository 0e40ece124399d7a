//! Targets: generated requests through decode, cadence, the real TensorBoard exporter, the
//! MLflow request builder, TensorBoard's loaders and the real MLflow server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use prost::Message;
use serde_json::Value;
use trainmetrics::decode::{count_data_points, DecodeSettings, Decoder};
use trainmetrics::cadence::{CadenceSettings, Close, Windows};
use trainmetrics::exporter::mlflow::request_builder::{self, MAX_BODY_BYTES, MAX_ENTITIES, MAX_METRICS};
use trainmetrics::exporter::tensorboard::{TensorBoardExporter, TensorBoardSettings};
use trainmetrics::exporter::{Exporter, RunOutcome};
use trainmetrics::names::{MlflowKeys, MLFLOW_MAX_KEY_CHARS};
use crate::common;
use crate::harness::*;
use crate::strategies::*;

/// MLflow's key rules (mlflow/utils/validation.py): `^[/\w.\- :]*$` with Unicode `\w`, at most
/// 250 characters, a normalized relative path.
pub(crate) fn valid_mlflow_key(k: &str) -> bool {
    use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};
    let chars_ok = k.chars().all(|c| {
        if c.is_ascii() {
            c.is_ascii_alphanumeric() || "_-. :/".contains(c)
        } else {
            matches!(c.general_category_group(), GeneralCategoryGroup::Letter | GeneralCategoryGroup::Number)
        }
    });
    let path_ok = !k.is_empty()
        && !k.starts_with('/')
        && !k.starts_with("..")
        && k.split('/').all(|s| !s.is_empty() && s != "." && s != "..");
    chars_ok && path_ok && k.chars().count() <= MLFLOW_MAX_KEY_CHARS
}

/// Checks the TFRecord framing and CRCs of every event file under `dir`; returns records read.
pub(crate) fn check_event_files(dir: &Path) -> usize {
    use trainmetrics::exporter::tensorboard::record::masked_crc32c;
    let mut records = 0;
    // An exporter that wrote nothing has not created its logdir.
    let mut stack: Vec<PathBuf> = dir.exists().then(|| dir.to_path_buf()).into_iter().collect();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if !p.file_name().is_some_and(|n| n.to_string_lossy().contains("tfevents")) {
                continue;
            }
            let data = std::fs::read(&p).expect("read event file");
            let mut at = 0;
            while at < data.len() {
                assert!(at + 12 <= data.len(), "truncated header in {}", p.display());
                let len_bytes = &data[at..at + 8];
                let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
                let crc = u32::from_le_bytes(data[at + 8..at + 12].try_into().expect("4 bytes"));
                assert_eq!(crc, masked_crc32c(len_bytes), "length CRC in {}", p.display());
                let body = &data[at + 12..at + 12 + len];
                let crc = u32::from_le_bytes(data[at + 12 + len..at + 16 + len].try_into().expect("4 bytes"));
                assert_eq!(crc, masked_crc32c(body), "data CRC in {}", p.display());
                at += 16 + len;
                records += 1;
            }
        }
    }
    records
}

/// What one case wrote to TensorBoard: scalar and histogram points (one per window).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct Shown {
    scalars: usize,
    histograms: usize,
}

/// Scalars as TensorBoard should show them: (run dir relative to the root, tag) → [(step,
/// float32 value as `{:?}` of f64)].
type Expected = BTreeMap<(String, String), Vec<(i64, String)>>;

/// One generated case through decode (twice, as a collector's retry), cadence, the TensorBoard exporter into `logdir`
/// and the MLflow request builder, with every check; returns what TensorBoard should show.
pub(crate) fn pipeline_case(
    req: &ExportMetricsServiceRequest,
    decode: DecodeSettings,
    cadence: CadenceSettings,
    logdir: &Path,
    root: &Path,
    expected: &mut Expected,
) -> Result<Shown, TestCaseError> {
    // The protobuf form decodes back to a request with the same encoding (proto3 writes
    // -0.0 as the default 0.0, so the structs may differ in the sign of a zero).
    let bin = req.encode_to_vec();
    let again = ExportMetricsServiceRequest::decode(bin.as_slice()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(again.encode_to_vec() == bin);

    let mut tb = TensorBoardExporter::new(TensorBoardSettings { logdir: logdir.to_path_buf() });
    let mut windows = Windows::new(cadence, Instant::now());
    let mut decoder = Decoder::new(decode);
    let mut keys: BTreeMap<String, MlflowKeys> = BTreeMap::new();
    let (mut accepted, mut late, mut written, mut duplicate) = (0u64, 0u64, 0u64, 0u64);
    let mut shown = Shown::default();
    for _ in 0..2 {
        let out = decoder.decode(req);
        prop_assert_eq!(out.accounted(), count_data_points(req));
        for rp in out.runs {
            accepted += rp.points.len() as u64;
            tb.observe_run(&rp.run);
            late += windows.push(rp, Instant::now());
        }
        // The second decode is a retried request: its points repeat the first's.
        duplicate += windows.take_duplicates();
    }
    for batch in windows.take_ready(Instant::now(), Close::All) {
        written += batch.inputs();
        let exported = tb.export(&batch, Duration::from_secs(10)).map_err(|e| TestCaseError::fail(format!("TensorBoard export: {e}")))?;
        prop_assert!(exported.refused.is_empty(), "{:?}", exported.refused);
        let run = tb.run_dir(&batch.run).strip_prefix(root).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        for p in &batch.points {
            if p.histogram.is_some() {
                shown.histograms += 1;
            } else {
                shown.scalars += 1;
                // TensorBoard's scalars are float32 (the exporter's documented conversion).
                let shown_value = format!("{:?}", f64::from(p.scalar as f32));
                expected.entry((run.clone(), p.series.to_string())).or_default().push((p.step, shown_value));
            }
        }
        // What the MLflow exporter sends for this batch, built the same way.
        let run_keys = keys.entry(batch.run.key.clone()).or_default();
        let metrics: Vec<Value> = batch
            .points
            .iter()
            .map(|p| {
                let key = run_keys.key_for(&p.series).key;
                let ts = i64::try_from(p.time_unix_nano / 1_000_000).unwrap_or(i64::MAX);
                request_builder::metric(&key, p.scalar, ts, p.step)
            })
            .collect();
        // Params and tags as the MLflow exporter maps them: keys valid, values cut.
        let mut param_keys = MlflowKeys::default();
        let mut tag_keys = MlflowKeys::default();
        let params: Vec<Value> = batch
            .run
            .params
            .iter()
            .map(|(k, v)| request_builder::key_value(&param_keys.key_for(k).key, &request_builder::truncate_chars(v, request_builder::MAX_PARAM_VALUE_CHARS).0))
            .collect();
        let tags: Vec<Value> = batch
            .run
            .tags
            .iter()
            .map(|(k, v)| request_builder::key_value(&tag_keys.key_for(k).key, &request_builder::truncate_chars(v, request_builder::MAX_TAG_VALUE_CHARS).0))
            .collect();
        for body in request_builder::split_log_batch(vec![], params, tags) {
            let json = serde_json::to_string(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(json.len() <= MAX_BODY_BYTES, "body of {} bytes", json.len());
            for kind in ["params", "tags"] {
                for e in body[kind].as_array().into_iter().flatten() {
                    let key = e["key"].as_str().unwrap_or_default();
                    prop_assert!(valid_mlflow_key(key), "invalid MLflow {} key {:?}", kind, key);
                }
            }
        }
        let n = metrics.len();
        let bodies = request_builder::split_log_batch(metrics, vec![], vec![]);
        let mut sent = 0;
        for body in &bodies {
            let ms = body["metrics"].as_array().cloned().unwrap_or_default();
            prop_assert!(ms.len() <= MAX_METRICS && ms.len() <= MAX_ENTITIES);
            let json = serde_json::to_string(body).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(json.len() <= MAX_BODY_BYTES, "body of {} bytes", json.len());
            for m in &ms {
                let key = m["key"].as_str().unwrap_or_default();
                prop_assert!(valid_mlflow_key(key), "invalid MLflow key {:?}", key);
                let v = &m["value"];
                prop_assert!(
                    v.as_f64().is_some_and(f64::is_finite) || ["NaN", "Infinity", "-Infinity"].contains(&v.as_str().unwrap_or("")),
                    "value {}", v
                );
                prop_assert!(m["timestamp"].as_i64().is_some_and(|t| t >= 0), "timestamp {}", m["timestamp"]);
                prop_assert!(m["step"].as_i64().is_some(), "step {}", m["step"]);
            }
            sent += ms.len();
        }
        prop_assert_eq!(sent, n);
    }
    prop_assert_eq!(written + late + duplicate, accepted, "every accepted point is written or counted late or duplicate");
    tb.end_runs(RunOutcome::Finished, Duration::from_secs(10)).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let records = check_event_files(logdir);
    prop_assert!(written == 0 || records > 0, "{} points written but no event records", written);
    Ok(shown)
}

#[test]
fn generated_requests_to_tensorboard_and_mlflow() {
    runner("proptest-regressions/fuzz-generated.txt", 3000)
        .run(&(request_strategy(), settings_strategy()), |(req, (decode, cadence))| {
            let logdir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
            pipeline_case(&req, decode, cadence, logdir.path(), logdir.path(), &mut Expected::new()).map(|_| ())
        })
        .unwrap();
}

/// Generated cases read back with TensorBoard's own loaders (Python and RustBoard): every scalar
/// and histogram point written is shown, scalars with their exact steps and float32 values, and
/// both loaders agree.
#[test]
fn generated_requests_load_in_tensorboard() {
    use proptest::strategy::ValueTree;
    let root = tempfile::tempdir().expect("tempdir");
    let mut runner = TestRunner::deterministic();
    let strategy = (request_strategy(), settings_strategy());
    let mut expected = Shown::default();
    let mut scalars_expected = Expected::new();
    for i in 0..cases(40) {
        let (req, (decode, cadence)) = strategy.new_tree(&mut runner).expect("value").current();
        let dir = root.path().join(format!("case-{i}"));
        let shown = pipeline_case(&req, decode, cadence, &dir, root.path(), &mut scalars_expected).unwrap_or_else(|e| panic!("case {i}: {e}"));
        expected.scalars += shown.scalars;
        expected.histograms += shown.histograms;
    }
    let tb = common::read_tb_both(root.path());
    let scalars: usize = tb.scalars.values().flat_map(|tags| tags.values()).map(Vec::len).sum();
    let histograms: usize = tb.histograms.values().flat_map(|tags| tags.values()).map(Vec::len).sum();
    assert!(expected.scalars > 0 && expected.histograms > 0, "{expected:?}");
    assert_eq!(Shown { scalars, histograms }, expected);
    let mut got = Expected::new();
    for (run, tags) in &tb.scalars {
        for (tag, points) in tags {
            got.insert((run.clone(), tag.clone()), points.iter().map(|(s, v)| (*s, format!("{v:?}"))).collect());
        }
    }
    for points in scalars_expected.values_mut() {
        points.sort_by_key(|p| p.0);
    }
    for points in got.values_mut() {
        points.sort_by_key(|p| p.0);
    }
    assert_eq!(got, scalars_expected);
}

/// A metric value as comparable text, as MLflow's SQL store gives it back: ±Inf as ±f64::MAX
/// (README "Values"), -0.0 as 0.0.
pub(crate) fn mlflow_shown(v: f64) -> String {
    let v = if v == f64::INFINITY {
        f64::MAX
    } else if v == f64::NEG_INFINITY {
        f64::MIN
    } else if v == 0.0 {
        0.0
    } else {
        v
    };
    format!("{v:?}")
}

/// (run key, MLflow key) → {(step, value as [`mlflow_shown`], timestamp ms)}.
type MlflowExpected = BTreeMap<(String, String), std::collections::BTreeSet<(i64, String, i64)>>;

/// Generated cases through the real MLflow exporter into a real MLflow server: every export is
/// accepted (keys, values, steps, timestamps, params and tags within the server's rules), and the
/// history of every metric is what the cadence wrote, exactly.
#[test]
fn generated_requests_land_in_mlflow() {
    use proptest::strategy::ValueTree;
    use std::collections::BTreeSet;
    use trainmetrics::exporter::mlflow::{MlflowExporter, MlflowSettings};
    let uri = common::mlflow_uri();
    let mut runner = TestRunner::deterministic();
    let strategy = (request_strategy(), settings_strategy());
    let mut compared = 0;
    for i in 0..cases(25) {
        let (req, (decode, cadence)) = strategy.new_tree(&mut runner).expect("value").current();
        let experiment = common::unique(&format!("fuzz-{i}"));
        let mut exporter =
            MlflowExporter::new(MlflowSettings { tracking_uri: uri.clone(), authorization: None, experiment, run_id: None, credential_file: None });
        let mut windows = Windows::new(cadence, Instant::now());
        let mut decoder = Decoder::new(decode);
        for _ in 0..2 {
            for rp in decoder.decode(&req).runs {
                exporter.observe_run(&rp.run);
                windows.push(rp, Instant::now());
            }
        }
        let mut expected: MlflowExpected = BTreeMap::new();
        let mut keys: BTreeMap<String, MlflowKeys> = BTreeMap::new();
        for batch in windows.take_ready(Instant::now(), Close::All) {
            if let Err(e) = exporter.export(&batch, Duration::from_secs(30)) {
                panic!("case {i}: MLflow refused a batch of run {:?}: {e}\n{req:?}", batch.run.key);
            }
            let run_keys = keys.entry(batch.run.key.clone()).or_default();
            for p in &batch.points {
                let ts = i64::try_from(p.time_unix_nano / 1_000_000).unwrap_or(i64::MAX);
                expected
                    .entry((batch.run.key.clone(), run_keys.key_for(&p.series).key))
                    .or_default()
                    .insert((p.step, mlflow_shown(p.scalar), ts));
            }
        }
        exporter.end_runs(RunOutcome::Finished, Duration::from_secs(30)).unwrap_or_else(|e| panic!("case {i}: ending runs: {e}"));
        let ids: BTreeMap<String, String> = exporter
            .run_ids()
            .lock()
            .map(|m| m.iter().map(|(k, r)| (k.clone(), r.run_id.clone())).collect())
            .unwrap_or_default();
        for ((run, key), points) in &expected {
            let id = ids.get(run).unwrap_or_else(|| panic!("case {i}: no MLflow run for {run:?}"));
            let got: BTreeSet<(i64, String, i64)> =
                common::history(&uri, id, key).into_iter().map(|(s, v, t)| (s, mlflow_shown(v), t)).collect();
            assert_eq!(&got, points, "case {i}: run {run:?} metric {key:?}");
            compared += 1;
        }
    }
    assert!(compared > 0);
}
