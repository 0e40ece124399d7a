//! The MLflow exporter (sources: MLflow's REST API docs and `mlflow/server/handlers.py`; facts in
//! `../shared/reference/mlflow-rest-api.md`).
//!
//! Runs:
//! - The experiment is the run's `ml.experiment.name`, else (also when it is empty, a name
//!   MLflow refuses) the configured default; it is fetched by name and created when missing (a
//!   concurrent create, answered `RESOURCE_ALREADY_EXISTS`, is followed by a second fetch).
//! - The MLflow run is the configured `run_id` (`MLFLOW_RUN_ID`) if set; else the run in that
//!   experiment tagged `trainmetrics.run_key = <tag value>` (so a restarted exporter continues
//!   it, status set back to RUNNING); else a new run with the run name (none when it is missing
//!   or empty: MLflow then picks one), start time = its first point's, and that tag. The tag
//!   value is [`run_key_tag_value`]: the run key when it is short and filter-safe, else a hash
//!   of the full key, so the value written and the value searched for are always the same. A
//!   run tagged by an older version with the key itself (cut to 8000 characters) is found
//!   too, when that key has no quote or backslash, and its tag is moved to the current value.
//! - Params (`ml.param.*`) are logged once per run in their own requests, so a conflict (MLflow
//!   refuses to change a param's value, rejecting the whole request with 400) never takes
//!   metrics down: a rejected request is resent one param per request, and each param refused
//!   alone is logged and counted as the event `param_conflict`. A value over 6000 characters
//!   is cut to 6000 (what the server would store) and counted `param_truncated`.
//! - Tags (other resource attributes) are upserted with values cut to 8000 characters. Keys
//!   starting with `trainmetrics.` belong to this exporter: such attributes are skipped and
//!   counted once per run as the event `reserved_tag_skipped`.
//! - Param names and tag names are mapped to keys by the same rule as metric names
//!   ([`MlflowKeys`], one instance per run for params and one for tags), so two names that map
//!   to the same key (`lr@1`, `lr#1`) are both logged, under distinct keys.
//! - [`Exporter::end_runs`] sets every run this exporter used to FINISHED or FAILED, with an end
//!   time.
//!
//! Resume (see `README.md` "Resume"): a run resumes when the cadence says so
//! ([`Batch::resumed_at`], the service route), or when an exporter continues an existing
//! MLflow run whose largest logged step (`runs/get` `data.metrics`) is at or above the first
//! step of its first batch (a new process of the same run, the in-process route). Then the tag
//! [`RESUMED_AT_TAG`] is set to the step S it resumed from, and the policy
//! ([`ResumePolicy`]) decides about points at steps MLflow already holds: `log_again` logs them
//! (MLflow keeps every value it was sent), `skip_logged` refuses each point at or below the
//! largest step its key had when the run resumed, counted `superseded`.
//!
//! Liveness (see `README.md` "Run liveness"): a batch flagged [`Batch::idle`] (no data point
//! for `end_idle_runs.after`) is logged, then its run is ended with the configured status
//! (`KILLED` by default) and an end time. A later batch of that run sets it RUNNING again first.
//!
//! Metrics: the key is the series name mapped by [`MlflowKeys`] (rules in [`crate::names`]). When
//! a key differs from its name, the tag `trainmetrics.name/<key>` (itself mapped to a valid key)
//! records the original name. The exporter remembers per run which of these tags the server has
//! accepted (after the request carrying it succeeded) and adds every one not yet accepted to
//! the next request that has a point of that key, so a failed request never loses one. The
//! timestamp is the data point's time in ms, assigned before the first attempt, so a retried
//! request carries the same points and the server's SQL store deduplicates them.
//!
//! Restarts: which name holds which key depends on arrival order (who claimed a plain key
//! first), and a new process sees a new order. So before it writes to a run it continues (found
//! by its run key tag, or `run_id`), the exporter reads the run (`runs/get`) and restores the
//! claims: a key with a name tag belongs to the tagged name, every other key to the name equal
//! to it. A name that arrives first after the restart then gets the key it had, and no key ever
//! holds values of two names (case 017: `a@b` → `a_b`, `a_b` → `a_b-<hash>`, before and after).
//! Param and tag keys are not restored: MLflow refuses a changed param value (counted
//! `param_conflict`), and two resource attributes that map to one tag key are rare.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::client::{Client, ClientError};
use super::config::{MlflowRunPolicy, MlflowSettings, ResumePolicy};
use super::request_builder::{
    key_value, metric, split_log_batch, truncate_chars, MAX_PARAM_VALUE_CHARS, MAX_TAG_VALUE_CHARS,
};
use crate::decode::RunInfo;
use crate::cadence::{Batch, RunEnd};
use crate::exporter::{ExportError, Exported, Exporter, RunOutcome};
use crate::names::{mlflow_key, mlflow_run_name, MlflowKeys};
use crate::stats::{DropReason, ExporterStats};

/// Run tag holding the trainer's run key, used to find the run again after a restart.
pub const RUN_KEY_TAG: &str = "trainmetrics.run_key";

/// Run tag holding the step the run last resumed from (a trainer restarted from a checkpoint);
/// see the module docs.
pub const RESUMED_AT_TAG: &str = "trainmetrics.resumed_at_step";

/// Prefix of the tag keys this exporter owns; resource attributes never write under it.
pub const RESERVED_TAG_PREFIX: &str = "trainmetrics.";

/// Longest run key stored as it is in [`RUN_KEY_TAG`]; longer ones are hashed.
pub const MAX_PLAIN_RUN_KEY_CHARS: usize = 200;

/// 64-bit FNV-1a of `seed` followed by the bytes of `s`. A different seed byte starts the
/// hash of `s` from a different state, so two seeds give two hashes that collide
/// independently (unlike hashing `s` and then `s + suffix`, where the second value is a
/// function of the first and adds no bits).
fn fnv1a64(seed: u8, s: &str) -> u64 {
    crate::names::fnv1a64_bytes(std::iter::once(seed).chain(s.bytes()))
}

/// The value of [`RUN_KEY_TAG`] for a run key: deterministic, at most 200 characters, and safe
/// inside a quoted `runs/search` filter literal (MLflow's filter grammar has no escapes).
///
/// Rule: the key itself when it has 1 to 200 characters, all ASCII letters, digits or one of
/// `-_.:/@ `, and does not start with `sha-`; otherwise `sha-` followed by 32 hex digits: two
/// 64-bit FNV-1a hashes of the full key with seed bytes 1 and 2 (128 bits; the prefix names a
/// hashed form, the hash is FNV, not SHA). Keys that start with `sha-` are always hashed, so a
/// plain key never equals another key's hashed form. FNV guards against accidental collisions,
/// not against a producer forging keys; run keys come from the trainers themselves.
pub fn run_key_tag_value(key: &str) -> String {
    let plain = !key.is_empty()
        && key.len() <= MAX_PLAIN_RUN_KEY_CHARS
        && !key.starts_with("sha-")
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@' | ' '));
    if plain {
        key.to_string()
    } else {
        format!("sha-{:016x}{:016x}", fnv1a64(1, key), fnv1a64(2, key))
    }
}

/// Each metric key's largest step in a `runs/get` answer (`data.metrics` holds each key's latest
/// value, ordered by step first).
fn latest_steps_of(v: &Value) -> HashMap<String, i64> {
    let metrics = v.pointer("/run/data/metrics").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    metrics
        .iter()
        .filter_map(|m| {
            let key = m.get("key")?.as_str()?.to_string();
            // int64 fields may come as JSON strings (proto3 JSON mapping).
            let step = m.get("step").and_then(|s| s.as_i64().or_else(|| s.as_str()?.parse().ok())).unwrap_or(0);
            Some((key, step))
        })
        .collect()
}

/// The tag recording the original name of a renamed metric key.
fn name_tag_key(metric_key: &str) -> String {
    mlflow_key(&format!("{RESERVED_TAG_PREFIX}name/{metric_key}"))
}

#[derive(Debug)]
struct RunState {
    mlflow_run_id: String,
    /// Metric keys (series name → key).
    keys: MlflowKeys,
    /// Tag keys (resource attribute → key): its own namespace, as in MLflow.
    tag_keys: MlflowKeys,
    /// Param key → value logged.
    params: HashMap<String, String>,
    /// Tag key → value logged.
    tags: BTreeMap<String, String>,
    /// Name tags (`trainmetrics.name/<key>`) the server has accepted: every other one that a
    /// batch needs is sent with it, so a failed request never loses one.
    logged_name_tags: HashSet<String>,
    /// Resource attributes skipped as reserved (counted once each).
    reserved_skipped: HashSet<String>,
    /// An existing MLflow run was continued (found by its run key tag, or `run_id`) and no
    /// batch was logged to it yet by this exporter.
    continued_unchecked: bool,
    /// The resume step last handled (tag set, skip steps read).
    resumed_at: Option<i64>,
    /// `skip_logged`: metric key → largest step MLflow held when the run resumed.
    skip_upto: HashMap<String, i64>,
    /// Ended for being idle; set RUNNING again on its next points.
    ended_idle: bool,
    /// For a continued run: each metric key's largest step on the server when it was continued
    /// (read with the key mapping; taken by the first batch's resume check).
    server_latest: Option<HashMap<String, i64>>,
}

/// What a continued run already holds on the server: the claims of its metric keys and the
/// name tags already there (module docs, "Restarts").
#[derive(Debug, Default)]
struct OnServer {
    keys: MlflowKeys,
    logged_name_tags: HashSet<String>,
    latest: HashMap<String, i64>,
}

/// Params of a run as they arrived: the first value of each name wins, as on the server.
#[derive(Debug, Default)]
struct ObservedParams {
    /// Param names → keys: its own namespace, so `lr@1` and `lr#1` get distinct keys.
    keys: MlflowKeys,
    /// Key → first value.
    first: BTreeMap<String, String>,
    conflicts: HashSet<(String, String)>,
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
    policy: MlflowRunPolicy,
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
            policy: MlflowRunPolicy::default(),
        }
    }

    /// Sets the resume policy and the status of idle runs (default: `log_again`, `KILLED`).
    pub fn with_run_policy(mut self, policy: MlflowRunPolicy) -> Self {
        self.policy = policy;
        self
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
        // The tag value is filter-safe by construction (no quote or backslash): see
        // `run_key_tag_value`.
        let value = run_key_tag_value(key);
        if let Some(found) = self.search_run_key_tag(experiment_id, &value, budget)? {
            return Ok(Some(found));
        }
        // Runs created before the tag value was bounded carry the key itself (cut to 8000
        // characters). Looked for too, where that value can be written in a filter, and moved
        // to the current value, so upgrading the exporter does not start a second run.
        let legacy = truncate_chars(key, MAX_TAG_VALUE_CHARS).0;
        if legacy == value || legacy.contains(['\'', '"', '\\']) {
            return Ok(None);
        }
        let Some(found) = self.search_run_key_tag(experiment_id, &legacy, budget)? else { return Ok(None) };
        let body = json!({"run_id": found.0, "key": RUN_KEY_TAG, "value": value});
        self.client.post("runs/set-tag", &body, budget.left()?)?;
        Ok(Some(found))
    }

    /// The newest active run of the experiment whose run key tag is `value`: (run id, status).
    fn search_run_key_tag(&self, experiment_id: &str, value: &str, budget: &Budget) -> Result<Option<(String, String)>, ExportError> {
        let body = json!({
            "experiment_ids": [experiment_id],
            "filter": format!("tags.`{RUN_KEY_TAG}` = '{value}'"),
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
        let mut continued = true;
        let mlflow_run_id = match self.settings.run_id.clone() {
            Some(id) => {
                self.client.post("runs/update", &json!({"run_id": id, "status": "RUNNING"}), budget.left()?)?;
                id
            }
            None => {
                // An empty name is no name: MLflow refuses to create an experiment named "".
                let experiment = match run.experiment.as_deref() {
                    Some(e) if !e.is_empty() => e.to_string(),
                    _ if !self.settings.experiment.is_empty() => self.settings.experiment.clone(),
                    _ => "Default".to_string(),
                };
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
                            "tags": [key_value(RUN_KEY_TAG, &run_key_tag_value(&run.key))],
                        });
                        // No (or an empty) name: MLflow picks one; the run key tag identifies it.
                        if let Some(name) = run.run_name.as_deref().map(mlflow_run_name).filter(|n| !n.is_empty()) {
                            body["run_name"] = Value::from(name);
                        }
                        let v = self.client.post("runs/create", &body, budget.left()?)?;
                        let id = v.pointer("/run/info/run_id").and_then(Value::as_str).ok_or_else(|| {
                            ExportError::Permanent { message: "runs/create: no run_id in the answer".into() }
                        })?;
                        tracing::info!(run = %run.key, mlflow_run_id = %id, "created MLflow run");
                        continued = false;
                        id.to_string()
                    }
                }
            }
        };
        // Before anything is written to a continued run, its key mapping comes back from the
        // server: otherwise a name arriving first after a restart could take a key that holds
        // another name's values.
        let on_server = if continued { Some(self.read_on_server(&run.key, &mlflow_run_id, budget)?) } else { None };
        if let Ok(mut ids) = self.run_ids.lock() {
            ids.insert(run.key.clone(), MlflowRunRef { experiment_id: exp_id, run_id: mlflow_run_id.clone() });
        }
        let (keys, logged_name_tags, server_latest) = match on_server {
            Some(o) => (o.keys, o.logged_name_tags, Some(o.latest)),
            None => (MlflowKeys::default(), HashSet::new(), None),
        };
        self.runs.insert(
            run.key.clone(),
            RunState {
                mlflow_run_id,
                keys,
                tag_keys: MlflowKeys::default(),
                params: HashMap::new(),
                tags: BTreeMap::new(),
                logged_name_tags,
                reserved_skipped: HashSet::new(),
                continued_unchecked: continued,
                resumed_at: None,
                skip_upto: HashMap::new(),
                ended_idle: false,
                server_latest,
            },
        );
        Ok(())
    }

    /// Reads a continued run's metric keys and name tags (`runs/get`) into the claims of its
    /// keys: a metric key with a tag `trainmetrics.name/<key>` (the tag key as [`name_tag_key`]
    /// makes it, shortened for long keys) belongs to the name in that tag, any other key to the
    /// name equal to it. Tagged keys are restored first, so when an older version let two names
    /// share a key, the tagged name keeps it and the other gets a new key from now on (logged,
    /// counted `name_mapping_conflict`). Name tags of keys that hold no metric are ignored.
    fn read_on_server(&self, run_key: &str, run_id: &str, budget: &Budget) -> Result<OnServer, ExportError> {
        let v = self.client.get("runs/get", &[("run_id", run_id)], budget.left()?)?;
        let mut out = OnServer { latest: latest_steps_of(&v), ..Default::default() };
        let tags = v.pointer("/run/data/tags").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        let by_tag: HashMap<&str, &str> = tags
            .iter()
            .filter_map(|t| Some((t.get("key")?.as_str()?, t.get("value")?.as_str()?)))
            .collect();
        let mut claims: Vec<(bool, String, String, String)> = out
            .latest
            .keys()
            .map(|key| {
                let tag = name_tag_key(key);
                match by_tag.get(tag.as_str()) {
                    Some(name) => (false, key.clone(), name.to_string(), tag),
                    None => (true, key.clone(), key.clone(), tag),
                }
            })
            .collect();
        claims.sort();
        let mut conflicts = 0u64;
        for (untagged, key, name, tag) in claims {
            if out.keys.restore(&name, &key) {
                if !untagged {
                    out.logged_name_tags.insert(tag);
                }
            } else {
                conflicts += 1;
            }
        }
        if conflicts > 0 {
            tracing::warn!(run = %run_key, mlflow_run_id = %run_id, conflicts, "the run already has metric keys shared by two names (written by an older version); new points of the later names get keys of their own");
            self.event("name_mapping_conflict", conflicts);
        }
        tracing::info!(run = %run_key, mlflow_run_id = %run_id, keys = out.latest.len(), renamed = out.logged_name_tags.len(), "restored the metric key mapping of the continued run");
        Ok(out)
    }

    /// Largest step per metric key that the server holds for `run_id` ([`latest_steps_of`]).
    fn latest_steps(&self, run_id: &str, budget: &Budget) -> Result<HashMap<String, i64>, ExportError> {
        Ok(latest_steps_of(&self.client.get("runs/get", &[("run_id", run_id)], budget.left()?)?))
    }

    /// Applies the resume rules of the module docs before `batch` is logged: sets the run
    /// RUNNING again after an idle end, detects a resume of a continued run, records
    /// [`RESUMED_AT_TAG`] and the steps `skip_logged` skips.
    fn begin_batch(&mut self, batch: &Batch, budget: &Budget) -> Result<(), ExportError> {
        let Some(state) = self.runs.get(&batch.run.key) else { return Ok(()) };
        let (run_id, ended_idle, continued_unchecked) = (state.mlflow_run_id.clone(), state.ended_idle, state.continued_unchecked);
        if ended_idle && !batch.points.is_empty() {
            self.client.post("runs/update", &json!({"run_id": run_id, "status": "RUNNING"}), budget.left()?)?;
            tracing::info!(run = %batch.run.key, mlflow_run_id = %run_id, "data came back: MLflow run RUNNING again");
            if let Some(s) = self.runs.get_mut(&batch.run.key) {
                s.ended_idle = false;
            }
        }
        let first_step = batch.points.iter().map(|p| p.step).min();
        let mut resumed_at = batch.resumed_at;
        let mut latest = None;
        if continued_unchecked && resumed_at.is_none() {
            if let Some(first) = first_step {
                let known = self.runs.get_mut(&batch.run.key).and_then(|s| s.server_latest.take());
                let l = match known {
                    Some(l) => l,
                    None => self.latest_steps(&run_id, budget)?,
                };
                if l.values().any(|s| *s >= first) {
                    resumed_at = Some(first);
                }
                latest = Some(l);
            }
        }
        let Some(state) = self.runs.get(&batch.run.key) else { return Ok(()) };
        let handled = state.resumed_at;
        if let Some(step) = resumed_at.filter(|s| handled != Some(*s)) {
            let skip = match (self.policy.resume, latest) {
                (ResumePolicy::LogAgain, _) => HashMap::new(),
                (ResumePolicy::SkipLogged, Some(l)) => l,
                (ResumePolicy::SkipLogged, None) => self.latest_steps(&run_id, budget)?,
            };
            let body = json!({"run_id": run_id, "key": RESUMED_AT_TAG, "value": step.to_string()});
            self.client.post("runs/set-tag", &body, budget.left()?)?;
            tracing::info!(run = %batch.run.key, mlflow_run_id = %run_id, step, policy = ?self.policy.resume, "run resumed from an earlier step");
            if let Some(s) = self.runs.get_mut(&batch.run.key) {
                s.resumed_at = Some(step);
                s.skip_upto = skip;
            }
        }
        if first_step.is_some() {
            if let Some(s) = self.runs.get_mut(&batch.run.key) {
                s.continued_unchecked = false;
            }
        }
        Ok(())
    }

    /// Ends `key`'s run with the idle status (see the module docs).
    fn end_idle(&mut self, key: &str, budget: &Budget) -> Result<(), ExportError> {
        let Some(state) = self.runs.get(key) else { return Ok(()) };
        let status = self.policy.idle_status.as_str();
        let body = json!({"run_id": state.mlflow_run_id, "status": status, "end_time": now_ms()});
        self.client.post("runs/update", &body, budget.left()?)?;
        tracing::info!(run = %key, mlflow_run_id = %state.mlflow_run_id, status, "no data for end_idle_runs.after: ended the MLflow run");
        if let Some(s) = self.runs.get_mut(key) {
            s.ended_idle = true;
        }
        Ok(())
    }

    /// Ends `run`'s MLflow run as an end record says (see [`Batch::ended`]): the status and
    /// end time its process would have set. A run this exporter has not used is looked up by
    /// its run key tag (its batches may have been delivered by an earlier replay); one that
    /// does not exist in MLflow is left alone.
    fn end_recorded(&mut self, run: &RunInfo, end: RunEnd, budget: &Budget) -> Result<(), ExportError> {
        let run_id = match self.runs.get(&run.key) {
            Some(state) => Some(state.mlflow_run_id.clone()),
            None => match self.settings.run_id.clone() {
                Some(id) => Some(id),
                None => {
                    let experiment = match run.experiment.as_deref() {
                        Some(e) if !e.is_empty() => e.to_string(),
                        _ if !self.settings.experiment.is_empty() => self.settings.experiment.clone(),
                        _ => "Default".to_string(),
                    };
                    let exp_id = self.experiment_id(&experiment, budget)?;
                    self.find_run(&exp_id, &run.key, budget)?.map(|(id, _)| id)
                }
            },
        };
        let Some(run_id) = run_id else {
            tracing::info!(run = %run.key, "end record of a run MLflow does not have: nothing to end");
            return Ok(());
        };
        let status = end.status.as_str();
        let end_ms = i64::try_from(end.time_unix_nano / 1_000_000).unwrap_or(i64::MAX);
        let body = json!({"run_id": run_id, "status": status, "end_time": end_ms});
        self.client.post("runs/update", &body, budget.left()?)?;
        tracing::info!(run = %run.key, mlflow_run_id = %run_id, status, "ended the MLflow run as its process had (end record)");
        if let Some(s) = self.runs.get_mut(&run.key) {
            // As after an idle end: a later batch of the run sets it RUNNING again.
            s.ended_idle = true;
        }
        Ok(())
    }

    /// After MLflow refused the credentials: reads the credential file again (when they come
    /// from one), so a fixed or rotated file is taken up without a restart. A file that cannot
    /// be read now keeps the credentials in use.
    fn reload_credentials(&mut self) {
        let Some(file) = &self.settings.credential_file else { return };
        match file.authorization() {
            Ok(a) => {
                if self.client.set_authorization(Some(a)) {
                    tracing::info!(file = %file.path().display(), "MLflow refused the credentials; using the new ones from their file");
                }
            }
            Err(e) => tracing::warn!("MLflow refused the credentials and their file gives none: {e}"),
        }
    }

    /// Logs params and tags of `run` not logged yet (see the module docs for conflicts).
    fn sync_params_and_tags(&mut self, run: &RunInfo, budget: &Budget) -> Result<(), ExportError> {
        let Some(state) = self.runs.get_mut(&run.key) else { return Ok(()) };
        let new_params: Vec<(String, String)> = self
            .observed
            .get(&run.key)
            .map(|o| {
                o.first.iter().filter(|(k, _)| !state.params.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect()
            })
            .unwrap_or_default();
        let mut new_tags: Vec<(String, String)> = Vec::new();
        let mut reserved = 0u64;
        for (k, v) in &run.tags {
            // Our own tags (the run key, name records) must not be overwritten by a resource
            // attribute, or the run would not be found again. Checked on the name and the key:
            // the mapping may drop a leading `/`.
            if k.starts_with(RESERVED_TAG_PREFIX) || mlflow_key(k).starts_with(RESERVED_TAG_PREFIX) {
                if state.reserved_skipped.insert(k.clone()) {
                    reserved += 1;
                    tracing::warn!(run = %run.key, tag = %k, "resource attribute not logged as a tag: the prefix {RESERVED_TAG_PREFIX} is reserved");
                }
                continue;
            }
            let key = state.tag_keys.key_for(k).key;
            let value = truncate_chars(v, MAX_TAG_VALUE_CHARS).0;
            if state.tags.get(&key) != Some(&value) {
                new_tags.push((key, value));
            }
        }
        let run_id = state.mlflow_run_id.clone();
        self.event("reserved_tag_skipped", reserved);
        // Params alone: a conflict rejects the whole request it is in. A rejected request of
        // several params is sent again one param per request, so only the conflicting ones
        // are lost.
        let params: Vec<Value> = new_params.iter().map(|(k, v)| key_value(k, v)).collect();
        for mut body in split_log_batch(vec![], params, vec![]) {
            body["run_id"] = Value::from(run_id.as_str());
            match self.client.post("runs/log-batch", &body, budget.left()?) {
                Ok(_) => {}
                Err(e) if e.is_retryable() => return Err(e.into()),
                Err(e) => {
                    let params = body["params"].as_array().cloned().unwrap_or_default();
                    if params.len() == 1 {
                        self.event("param_conflict", 1);
                        tracing::warn!(run = %run.key, "param not logged: {e}");
                        continue;
                    }
                    for param in params {
                        let one = json!({"run_id": run_id, "params": [param], "metrics": [], "tags": []});
                        match self.client.post("runs/log-batch", &one, budget.left()?) {
                            Ok(_) => {}
                            Err(e) if e.is_retryable() => return Err(e.into()),
                            Err(e) => {
                                self.event("param_conflict", 1);
                                tracing::warn!(run = %run.key, "param not logged: {e}");
                            }
                        }
                    }
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
    fn export(&mut self, batch: &Batch, timeout: Duration) -> Result<Exported, ExportError> {
        let budget = Budget(Instant::now() + timeout);
        if self.client.credentials_refused() {
            self.reload_credentials();
        }
        if batch.points.is_empty() {
            // An idle batch with nothing left to log: end the run if this exporter has one.
            if batch.idle && self.runs.get(&batch.run.key).is_some_and(|s| !s.ended_idle) {
                self.end_idle(&batch.run.key, &budget)?;
            }
            if let Some(end) = batch.ended {
                self.end_recorded(&batch.run, end, &budget)?;
            }
            return Ok(Exported::default());
        }
        let first_ms = batch.points.iter().map(|p| p.time_unix_nano / 1_000_000).min().and_then(|t| i64::try_from(t).ok());
        self.start_run(&batch.run, first_ms.map_or(now_ms(), |t| t.min(now_ms())), &budget)?;
        self.sync_params_and_tags(&batch.run, &budget)?;
        self.begin_batch(batch, &budget)?;
        let Some(state) = self.runs.get_mut(&batch.run.key) else {
            return Err(ExportError::Permanent { message: "run state missing".into() });
        };
        let mut metrics = Vec::with_capacity(batch.points.len());
        // Name tags not yet accepted by the server, whether or not this is the key's first use:
        // the request that first carried one may have failed.
        let mut name_tags: BTreeMap<String, &str> = BTreeMap::new();
        let mut refused = Vec::new();
        for (i, p) in batch.points.iter().enumerate() {
            let mapped = state.keys.key_for(&p.series);
            if state.skip_upto.get(&mapped.key).is_some_and(|s| p.step <= *s) {
                refused.push((i, DropReason::Superseded));
                continue;
            }
            if mapped.renamed {
                let tag = name_tag_key(&mapped.key);
                if !state.logged_name_tags.contains(&tag) {
                    name_tags.entry(tag).or_insert(&p.series);
                }
            }
            let ts = i64::try_from(p.time_unix_nano / 1_000_000).unwrap_or(i64::MAX);
            metrics.push(metric(&mapped.key, p.scalar, ts, p.step));
        }
        let name_tags = name_tags.iter().map(|(k, v)| key_value(k, &truncate_chars(v, MAX_TAG_VALUE_CHARS).0)).collect();
        let run_id = state.mlflow_run_id.clone();
        for mut body in split_log_batch(metrics, vec![], name_tags) {
            body["run_id"] = Value::from(run_id.as_str());
            self.client.post("runs/log-batch", &body, budget.left()?).map_err(ExportError::from)?;
            // Only now are this body's name tags on the server.
            let sent = body["tags"].as_array().into_iter().flatten().filter_map(|t| t["key"].as_str());
            state.logged_name_tags.extend(sent.map(str::to_string));
        }
        if batch.idle {
            self.end_idle(&batch.run.key, &budget)?;
        }
        if let Some(end) = batch.ended {
            self.end_recorded(&batch.run, end, &budget)?;
        }
        Ok(Exported { refused })
    }

    fn end_runs(&mut self, outcome: RunOutcome, timeout: Duration) -> Result<(), ExportError> {
        let budget = Budget(Instant::now() + timeout);
        let status = match outcome {
            RunOutcome::Finished => "FINISHED",
            RunOutcome::Failed => "FAILED",
            RunOutcome::Running => return Ok(()),
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
            let key = o.keys.key_for(k).key;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_safe_run_keys_are_their_own_tag_value() {
        for key in ["run-1", "a_b.c:d/e@f g", "default", &"k".repeat(200)] {
            assert_eq!(run_key_tag_value(key), key);
        }
    }

    #[test]
    fn other_run_keys_are_hashed_into_a_bounded_filter_safe_value() {
        let long = "k".repeat(10_000);
        let long2 = format!("{}x", "k".repeat(9_999));
        for key in ["", "it's", "a\"b", "a\\b", "résumé", "sha-abc", &"k".repeat(201), &long, &long2] {
            let v = run_key_tag_value(key);
            assert!(v.starts_with("sha-") && v.len() == 36, "{key:?} -> {v}");
            assert!(v[4..].chars().all(|c| c.is_ascii_hexdigit()), "{v}");
            assert_eq!(v, run_key_tag_value(key), "deterministic");
        }
        // The full key is hashed: keys that share a 200- or 8000-character prefix still differ.
        assert_ne!(run_key_tag_value(&long), run_key_tag_value(&long2));
        assert_ne!(run_key_tag_value(&"k".repeat(201)), run_key_tag_value(&"k".repeat(202)));
        // The two halves are independent hashes, not one derived from the other.
        let v = run_key_tag_value(&long);
        assert_ne!(v[4..20], v[20..36]);
        assert_eq!(fnv1a64(0, ""), 0xaf63_bd4c_8601_b7df, "FNV-1a 64 of the byte 0");
    }

    #[test]
    fn name_tags_are_valid_reserved_keys() {
        assert_eq!(name_tag_key("acc_1"), "trainmetrics.name/acc_1");
        let long = name_tag_key(&"x".repeat(250));
        assert!(long.starts_with(RESERVED_TAG_PREFIX) && long.chars().count() <= 250, "{long}");
    }
}
