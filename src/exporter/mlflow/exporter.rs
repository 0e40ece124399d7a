//! The MLflow exporter (sources: MLflow's REST API docs and `mlflow/server/handlers.py`; facts in
//! `../shared/reference/mlflow-rest-api.md`).
//!
//! Runs:
//! - The experiment is the run's `ml.experiment.name`, else the configured default; it is fetched
//!   by name and created when missing (a concurrent create, answered `RESOURCE_ALREADY_EXISTS`,
//!   is followed by a second fetch).
//! - The MLflow run is the configured `run_id` (`MLFLOW_RUN_ID`) if set; else the run in that
//!   experiment tagged `trainmetrics.run_key = <run key>` (so a restarted exporter continues
//!   it, status set back to RUNNING); else a new run with the run name, start time now, that
//!   tag, and the run's tags.
//! - Params (`ml.param.*`) are logged once per run in their own requests, so a conflict (MLflow
//!   refuses to change a param's value, rejecting the whole request with 400) never takes
//!   metrics down: it is logged and counted as the event `param_conflict`. A value over 6000
//!   characters is cut to 6000 (what the server would store) and counted `param_truncated`.
//!   Tags (other resource attributes) are upserted with values cut to 8000 characters.
//! - [`Exporter::end_runs`] sets every run this exporter used to FINISHED or FAILED, with an end
//!   time.
//!
//! Metrics: the key is the series name mapped by [`MlflowKeys`] (rules in [`crate::names`]). The
//! first time a key differs from its name, the tag `trainmetrics.name/<key>` (itself mapped to a
//! valid key) records the original name. The timestamp is the data point's time in ms, assigned
//! before the first attempt, so a retried request is identical and the server's SQL store
//! deduplicates it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::client::{Client, ClientError};
use super::config::MlflowSettings;
use super::request_builder::{
    key_value, metric, split_log_batch, truncate_chars, MAX_PARAM_VALUE_CHARS, MAX_TAG_VALUE_CHARS,
};
use crate::batch::RunInfo;
use crate::cadence::OutBatch;
use crate::exporter::{ExportError, Exported, Exporter, RunOutcome};
use crate::names::{mlflow_key, mlflow_run_name, MlflowKeys};
use crate::stats::ExporterStats;

/// Run tag holding the trainer's run key, used to find the run again after a restart.
pub const RUN_KEY_TAG: &str = "trainmetrics.run_key";

#[derive(Debug)]
struct RunState {
    mlflow_run_id: String,
    keys: MlflowKeys,
    params: HashMap<String, String>,
    tags: BTreeMap<String, String>,
}

/// Params of a run as they arrived: the first value of each key wins, as on the server.
#[derive(Debug, Default)]
struct ObservedParams {
    first: BTreeMap<String, String>,
    conflicts: std::collections::HashSet<(String, String)>,
}

/// Delivers to an MLflow tracking server. See the module docs.
#[derive(Debug)]
pub struct MlflowExporter {
    settings: MlflowSettings,
    client: Client,
    experiments: HashMap<String, String>,
    runs: HashMap<String, RunState>,
    stats: Option<Arc<ExporterStats>>,
    run_ids: RunIds,
    observed: HashMap<String, ObservedParams>,
}

/// Where a run went in MLflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlflowRunRef {
    /// Experiment id (empty when the run was given by `run_id` and not looked up).
    pub experiment_id: String,
    /// MLflow run id (32 hex characters).
    pub run_id: String,
}

/// Run key → MLflow run of every run an exporter has started, readable from other threads (so a
/// trainer can print where its run is).
pub type RunIds = Arc<std::sync::Mutex<BTreeMap<String, MlflowRunRef>>>;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A deadline-bound timeout for the next call of an export.
struct Budget(Instant);

impl Budget {
    fn left(&self) -> Result<Duration, ExportError> {
        let d = self.0.saturating_duration_since(Instant::now());
        if d.is_zero() {
            Err(ExportError::Retryable { message: "export timed out".into(), retry_after: None })
        } else {
            Ok(d)
        }
    }
}

impl MlflowExporter {
    /// An exporter for these settings. No request is made until the first export.
    pub fn new(settings: MlflowSettings) -> Self {
        let client = Client::new(&settings.tracking_uri, settings.authorization.clone());
        Self {
            settings,
            client,
            experiments: HashMap::new(),
            runs: HashMap::new(),
            stats: None,
            run_ids: RunIds::default(),
            observed: HashMap::new(),
        }
    }

    /// A shared view of the MLflow run ids this exporter starts (see [`RunIds`]).
    pub fn run_ids(&self) -> RunIds {
        self.run_ids.clone()
    }

    fn event(&self, name: &str, n: u64) {
        if let Some(s) = &self.stats {
            s.add_event(name, n);
        }
    }

    fn experiment_id(&mut self, name: &str, budget: &Budget) -> Result<String, ExportError> {
        if let Some(id) = self.experiments.get(name) {
            return Ok(id.clone());
        }
        let get = |c: &Client, t| c.get("experiments/get-by-name", &[("experiment_name", name)], t);
        let id_of = |v: &Value| {
            v.pointer("/experiment/experiment_id").and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
                ExportError::Permanent { message: format!("experiments/get-by-name: no experiment_id for {name:?}") }
            })
        };
        let id = match get(&self.client, budget.left()?) {
            Ok(v) => id_of(&v)?,
            Err(e) if e.status() == Some(404) => {
                match self.client.post("experiments/create", &json!({"name": name}), budget.left()?) {
                    Ok(v) => v.get("experiment_id").and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
                        ExportError::Permanent { message: "experiments/create: no experiment_id".into() }
                    })?,
                    // Someone else created it between our get and create.
                    Err(e) if e.error_code() == Some("RESOURCE_ALREADY_EXISTS") => id_of(&get(&self.client, budget.left()?)?)?,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        self.experiments.insert(name.to_string(), id.clone());
        Ok(id)
    }

    fn find_run(&self, experiment_id: &str, key: &str, budget: &Budget) -> Result<Option<(String, String)>, ExportError> {
        // MLflow's filter grammar has no documented escape for quotes: such keys are not searched
        // (a new run is created instead of guessing).
        if key.contains('\'') || key.contains('"') || key.contains('\\') {
            return Ok(None);
        }
        let body = json!({
            "experiment_ids": [experiment_id],
            "filter": format!("tags.`{RUN_KEY_TAG}` = '{key}'"),
            "run_view_type": "ACTIVE_ONLY",
            "max_results": 1,
            "order_by": ["attributes.start_time DESC"],
        });
        let v = self.client.post("runs/search", &body, budget.left()?)?;
        let info = v.pointer("/runs/0/info");
        Ok(info.and_then(|i| {
            let id = i.get("run_id").and_then(Value::as_str)?;
            let status = i.get("status").and_then(Value::as_str).unwrap_or("");
            Some((id.to_string(), status.to_string()))
        }))
    }

    /// `start_ms`: the run's start time in ms (the earliest point of its first batch, so no
    /// metric predates its run).
    fn start_run(&mut self, run: &RunInfo, start_ms: i64, budget: &Budget) -> Result<(), ExportError> {
        if self.runs.contains_key(&run.key) {
            return Ok(());
        }
        let mut exp_id = String::new();
        let mlflow_run_id = match self.settings.run_id.clone() {
            Some(id) => {
                self.client.post("runs/update", &json!({"run_id": id, "status": "RUNNING"}), budget.left()?)?;
                id
            }
            None => {
                let experiment = run.experiment.clone().unwrap_or_else(|| self.settings.experiment.clone());
                exp_id = self.experiment_id(&experiment, budget)?;
                match self.find_run(&exp_id, &run.key, budget)? {
                    Some((id, status)) => {
                        if status != "RUNNING" {
                            self.client.post("runs/update", &json!({"run_id": id, "status": "RUNNING"}), budget.left()?)?;
                        }
                        tracing::info!(run = %run.key, mlflow_run_id = %id, "continuing MLflow run");
                        id
                    }
                    None => {
                        let mut body = json!({
                            "experiment_id": exp_id,
                            "start_time": start_ms,
                            "tags": [key_value(RUN_KEY_TAG, &truncate_chars(&run.key, MAX_TAG_VALUE_CHARS).0)],
                        });
                        if let Some(name) = &run.run_name {
                            body["run_name"] = Value::from(mlflow_run_name(name));
                        }
                        let v = self.client.post("runs/create", &body, budget.left()?)?;
                        let id = v.pointer("/run/info/run_id").and_then(Value::as_str).ok_or_else(|| {
                            ExportError::Permanent { message: "runs/create: no run_id in the answer".into() }
                        })?;
                        tracing::info!(run = %run.key, mlflow_run_id = %id, "created MLflow run");
                        id.to_string()
                    }
                }
            }
        };
        if let Ok(mut ids) = self.run_ids.lock() {
            ids.insert(run.key.clone(), MlflowRunRef { experiment_id: exp_id, run_id: mlflow_run_id.clone() });
        }
        self.runs.insert(
            run.key.clone(),
            RunState { mlflow_run_id, keys: MlflowKeys::default(), params: HashMap::new(), tags: BTreeMap::new() },
        );
        Ok(())
    }

    /// Logs params and tags of `run` not logged yet (see the module docs for conflicts).
    fn sync_params_and_tags(&mut self, run: &RunInfo, budget: &Budget) -> Result<(), ExportError> {
        let Some(state) = self.runs.get(&run.key) else { return Ok(()) };
        let new_params: Vec<(String, String)> = self
            .observed
            .get(&run.key)
            .map(|o| {
                o.first.iter().filter(|(k, _)| !state.params.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect()
            })
            .unwrap_or_default();
        let new_tags: Vec<(String, String)> = run
            .tags
            .iter()
            .map(|(k, v)| (mlflow_key(k), truncate_chars(v, MAX_TAG_VALUE_CHARS).0))
            .filter(|(k, v)| state.tags.get(k) != Some(v))
            .collect();
        let run_id = state.mlflow_run_id.clone();
        // Params alone: a conflict rejects the whole request it is in.
        let params: Vec<Value> = new_params.iter().map(|(k, v)| key_value(k, v)).collect();
        for mut body in split_log_batch(vec![], params, vec![]) {
            body["run_id"] = Value::from(run_id.as_str());
            match self.client.post("runs/log-batch", &body, budget.left()?) {
                Ok(_) => {}
                Err(e) if e.is_retryable() => return Err(e.into()),
                Err(e) => {
                    let n = body["params"].as_array().map_or(0, Vec::len) as u64;
                    self.event("param_conflict", n);
                    tracing::warn!(run = %run.key, "params not logged: {e}");
                }
            }
        }
        let tags: Vec<Value> = new_tags.iter().map(|(k, v)| key_value(k, v)).collect();
        for mut body in split_log_batch(vec![], vec![], tags) {
            body["run_id"] = Value::from(run_id.as_str());
            match self.client.post("runs/log-batch", &body, budget.left()?) {
                Ok(_) => {}
                Err(e) if e.is_retryable() => return Err(e.into()),
                Err(e) => {
                    self.event("tags_rejected", body["tags"].as_array().map_or(0, Vec::len) as u64);
                    tracing::warn!(run = %run.key, "tags not logged: {e}");
                }
            }
        }
        if let Some(state) = self.runs.get_mut(&run.key) {
            state.params.extend(new_params);
            state.tags.extend(new_tags);
        }
        Ok(())
    }
}

impl Exporter for MlflowExporter {
    fn export(&mut self, batch: &OutBatch, timeout: Duration) -> Result<Exported, ExportError> {
        let budget = Budget(Instant::now() + timeout);
        let first_ms = batch.points.iter().map(|p| p.time_unix_nano / 1_000_000).min().and_then(|t| i64::try_from(t).ok());
        self.start_run(&batch.run, first_ms.map_or(now_ms(), |t| t.min(now_ms())), &budget)?;
        self.sync_params_and_tags(&batch.run, &budget)?;
        let Some(state) = self.runs.get_mut(&batch.run.key) else {
            return Err(ExportError::Permanent { message: "run state missing".into() });
        };
        let mut metrics = Vec::with_capacity(batch.points.len());
        let mut name_tags = Vec::new();
        for p in &batch.points {
            let mapped = state.keys.key_for(&p.series);
            if mapped.renamed && mapped.first_use {
                let tag = mlflow_key(&format!("trainmetrics.name/{}", mapped.key));
                name_tags.push(key_value(&tag, &truncate_chars(&p.series, MAX_TAG_VALUE_CHARS).0));
            }
            let ts = i64::try_from(p.time_unix_nano / 1_000_000).unwrap_or(i64::MAX);
            metrics.push(metric(&mapped.key, p.scalar, ts, p.step));
        }
        let run_id = state.mlflow_run_id.clone();
        for mut body in split_log_batch(metrics, vec![], name_tags) {
            body["run_id"] = Value::from(run_id.as_str());
            self.client.post("runs/log-batch", &body, budget.left()?).map_err(ExportError::from)?;
        }
        Ok(Exported::default())
    }

    fn end_runs(&mut self, outcome: RunOutcome, timeout: Duration) -> Result<(), ExportError> {
        let budget = Budget(Instant::now() + timeout);
        let status = match outcome {
            RunOutcome::Finished => "FINISHED",
            RunOutcome::Failed => "FAILED",
        };
        let mut first_error: Option<ClientError> = None;
        for (key, state) in &self.runs {
            let body = json!({"run_id": state.mlflow_run_id, "status": status, "end_time": now_ms()});
            let result = budget.left().map_err(|e| ClientError::Transport { endpoint: "runs/update".into(), message: e.to_string() });
            match result.and_then(|t| self.client.post("runs/update", &body, t)) {
                Ok(_) => tracing::info!(run = %key, mlflow_run_id = %state.mlflow_run_id, status, "ended MLflow run"),
                Err(e) => {
                    tracing::warn!(run = %key, "could not end MLflow run: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn observe_run(&mut self, run: &RunInfo) {
        let mut truncated = 0;
        let mut conflicts = 0;
        let o = self.observed.entry(run.key.clone()).or_default();
        for (k, v) in &run.params {
            let key = mlflow_key(k);
            let (value, cut) = truncate_chars(v, MAX_PARAM_VALUE_CHARS);
            match o.first.get(&key) {
                None => {
                    truncated += u64::from(cut);
                    o.first.insert(key, value);
                }
                Some(first) if *first == value => {}
                Some(first) => {
                    if o.conflicts.insert((key.clone(), value.clone())) {
                        conflicts += 1;
                        tracing::warn!(run = %run.key, param = %key, first = %first, new = %value, "param changed value; MLflow keeps the first, the new value is not logged");
                    }
                }
            }
        }
        self.event("param_truncated", truncated);
        self.event("param_conflict", conflicts);
    }

    fn attach_stats(&mut self, stats: Arc<ExporterStats>) {
        self.stats = Some(stats);
    }
}
