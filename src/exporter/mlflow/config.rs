//! MLflow exporter settings, validated from [`crate::config::ExporterConfig`] and the MLflow
//! client's environment conventions (source: mlflow's `environment_variables.py`,
//! `utils/credentials.py`):
//! - `tracking_uri`, else `MLFLOW_TRACKING_URI`; only `http://` and `https://` servers;
//! - `MLFLOW_TRACKING_USERNAME` + `MLFLOW_TRACKING_PASSWORD` → HTTP Basic; else
//!   `MLFLOW_TRACKING_TOKEN` → Bearer (MLflow's client gives Basic precedence, and so do we).
//!   Credentials written into the URI (`http://user:pass@host`) are moved into Basic auth;
//! - `experiment`, else `MLFLOW_EXPERIMENT_NAME`, else `Default`: the experiment of runs whose
//!   resource names none;
//! - `run_id`, else `MLFLOW_RUN_ID`: an existing MLflow run to continue (meant for the in-process
//!   library, which has one run).

use base64::Engine;

use crate::config::{ExporterConfig, Problems};

/// Validated MLflow settings.
#[derive(Clone, PartialEq, Eq)]
pub struct MlflowSettings {
    /// Server base URI without credentials, e.g. `http://127.0.0.1:5000`.
    pub tracking_uri: String,
    /// Value of the `Authorization` header, if any (a secret: never logged).
    pub authorization: Option<String>,
    /// Experiment of runs whose resource names none.
    pub experiment: String,
    /// An MLflow run id to continue instead of finding or creating one.
    pub run_id: Option<String>,
}

impl std::fmt::Debug for MlflowSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlflowSettings")
            .field("tracking_uri", &self.tracking_uri)
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("experiment", &self.experiment)
            .field("run_id", &self.run_id)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

impl MlflowSettings {
    /// Validates the MLflow keys of `c` (at config path `path`), adding problems to `p`.
    pub fn from_config(c: &ExporterConfig, path: &str, p: &mut Problems) -> Self {
        p.reject_key(path, "logdir", c.logdir.is_some(), "a tensorboard key");
        let uri = c.tracking_uri.clone().or_else(|| env("MLFLOW_TRACKING_URI")).unwrap_or_default();
        let mut authorization = match (env("MLFLOW_TRACKING_USERNAME"), env("MLFLOW_TRACKING_PASSWORD")) {
            (Some(u), Some(pw)) => Some(basic(&u, &pw)),
            _ => env("MLFLOW_TRACKING_TOKEN").map(|t| format!("Bearer {t}")),
        };
        let trimmed = uri.trim_end_matches('/').to_string();
        let mut tracking_uri = trimmed.clone();
        match trimmed.split_once("://") {
            Some((scheme, rest)) if scheme == "http" || scheme == "https" => {
                let (authority, tail) = rest.split_once('/').map_or((rest, ""), |(a, t)| (a, t));
                if let Some((userinfo, host)) = authority.rsplit_once('@') {
                    let (u, pw) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                    authorization = Some(basic(u, pw));
                    tracking_uri = if tail.is_empty() {
                        format!("{scheme}://{host}")
                    } else {
                        format!("{scheme}://{host}/{tail}")
                    };
                }
                if authority.is_empty() {
                    p.add(format!("{path}.tracking_uri"), "has no host");
                }
            }
            _ if uri.is_empty() => p.add(
                format!("{path}.tracking_uri"),
                "is not set and MLFLOW_TRACKING_URI is empty (e.g. http://127.0.0.1:5000)",
            ),
            // Never echo the URI itself: it may hold credentials.
            _ => p.add(format!("{path}.tracking_uri"), "must start with http:// or https://"),
        }
        let experiment = c
            .experiment
            .clone()
            .or_else(|| env("MLFLOW_EXPERIMENT_NAME"))
            .unwrap_or_else(|| "Default".to_string());
        if experiment.chars().count() > 500 {
            p.add(format!("{path}.experiment"), "is longer than MLflow's 500 characters");
        }
        let run_id = c.run_id.clone().or_else(|| env("MLFLOW_RUN_ID"));
        Self { tracking_uri, authorization, experiment, run_id }
    }
}
