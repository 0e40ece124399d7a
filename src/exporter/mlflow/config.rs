//! The MLflow exporter's own config keys ([`MlflowConfig`]) and their validation into
//! [`MlflowSettings`] and [`MlflowRunPolicy`], following the MLflow client's environment
//! conventions (source: mlflow's `environment_variables.py`,
//! `utils/credentials.py`):
//! - `tracking_uri`, else `MLFLOW_TRACKING_URI`; only `http://` and `https://` servers;
//! - `MLFLOW_TRACKING_USERNAME` + `MLFLOW_TRACKING_PASSWORD` → HTTP Basic; else
//!   `MLFLOW_TRACKING_TOKEN` → Bearer (MLflow's client gives Basic precedence, and so do we).
//!   `token_file` / `password_file` keys name files holding the token / password (trimmed of
//!   surrounding whitespace), so no secret needs to sit in the YAML or the environment; a file
//!   beats the matching variable, `password_file` needs `MLFLOW_TRACKING_USERNAME`, and at most
//!   one of the two may be set. Problems name the file, never its content. When MLflow refuses
//!   the credentials (HTTP 401/403), the exporter reads the file again before its next try, so
//!   credentials fixed (or rotated) in the file are taken up by the running process;
//!   Credentials written into the URI (`http://user:pass@host[/prefix]`) are moved into Basic
//!   auth and removed from the URI every request and message uses ([`parse_tracking_uri`]):
//!   when the part after `scheme://` has an `@` before its first `?`/`#`, everything up to the
//!   LAST such `@` is the userinfo (so a password may hold `/` and `@` unescaped), split into
//!   user and password at its first `:`, each percent-decoded (`%2F` → `/`); the rest is
//!   `host[:port][/prefix]`. A query or fragment is refused (request paths are appended to the
//!   URI). Problems never echo the URI: it may hold credentials;
//! - `experiment`, else `MLFLOW_EXPERIMENT_NAME`, else `Default` (an empty value counts as
//!   unset): the experiment of runs whose resource names none (or names "");
//! - `run_id`, else `MLFLOW_RUN_ID`: an existing MLflow run to continue (meant for the in-process
//!   library, which has one run).

use std::path::PathBuf;

use base64::Engine;

use serde::{Deserialize, Serialize};

use crate::exporter::BackendDefaults;
use crate::jobs::RanksConfig;
use crate::problems::{Problems, MAX_DURATION};
use crate::secrets::{read_secret_file, SecretFileError, MAX_SECRET_FILE_BYTES};

/// What differs from other backends in the keys every exporter has: every 100 steps by default
/// (MLflow's REST API takes batches, not a stream), a spool by default (the server can be
/// down for hours), and non-finite values clamped to `f64`'s range.
pub const DEFAULTS: BackendDefaults = BackendDefaults {
    every_steps: 100,
    spool: true,
    clamp_limit: f64::MAX,
};

/// The keys only an MLflow exporter has. Unknown keys are refused by the enclosing
/// [`crate::config::ExporterConfig`] (flattened structs cannot refuse them themselves).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MlflowConfig {
    /// Server URI; default `MLFLOW_TRACKING_URI`.
    #[serde(default)]
    pub tracking_uri: Option<String>,
    /// Experiment of runs that name none; default `MLFLOW_EXPERIMENT_NAME`, else `Default`.
    #[serde(default)]
    pub experiment: Option<String>,
    /// An existing MLflow run id to continue; default `MLFLOW_RUN_ID`.
    #[serde(default)]
    pub run_id: Option<String>,
    /// File holding a Bearer token (trimmed); beats `MLFLOW_TRACKING_TOKEN`. Default none.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// File holding the HTTP Basic password (trimmed) of `MLFLOW_TRACKING_USERNAME`; beats
    /// `MLFLOW_TRACKING_PASSWORD`. Default none.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Steps of a resumed run that MLflow already holds: `log_again` (default) or
    /// `skip_logged` (see README "Resume").
    #[serde(default)]
    pub resume: Option<ResumePolicy>,
    /// End runs without data for a while (`enabled` true, `after` 1h, `status` KILLED; see
    /// README "Run liveness").
    #[serde(default)]
    pub end_idle_runs: EndIdleRunsConfig,
    /// What the job's run shows of a distributed job's ranks (`view`: rank0 | mean | min | max
    /// | each, default rank0; `metrics` per series; `wait` 10s; see [`crate::jobs`]).
    /// TensorBoard writes one run directory per rank instead.
    #[serde(default)]
    pub ranks: Option<RanksConfig>,
}

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
    /// The file `authorization` was read from (`token_file` / `password_file`), read again when
    /// the server refuses the credentials; `None` when they come from the environment or the URI.
    pub credential_file: Option<CredentialFile>,
}

/// A credential file of the MLflow exporter (`token_file` or `password_file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialFile {
    /// `token_file`: the file holds a bearer token.
    Token(std::path::PathBuf),
    /// `password_file`: the file holds the password of `user` (`MLFLOW_TRACKING_USERNAME`).
    Password {
        /// The user name (not a secret).
        user: String,
        /// The file.
        file: std::path::PathBuf,
    },
}

/// Why a credential file gave no credentials (see [`crate::secrets`]).
pub type CredentialFileError = SecretFileError;

/// Largest credential file read, in bytes.
pub const MAX_CREDENTIAL_FILE_BYTES: u64 = MAX_SECRET_FILE_BYTES;

impl CredentialFile {
    /// The file.
    pub fn path(&self) -> &std::path::Path {
        match self {
            CredentialFile::Token(f) | CredentialFile::Password { file: f, .. } => f,
        }
    }

    /// The `Authorization` header value from the file's current content (trimmed of surrounding
    /// white space): `Bearer <token>` or HTTP Basic of the user and the password.
    ///
    /// Errors: the file cannot be read, is not a regular file (symlinks are followed: mounted
    /// secrets are symlinks), is larger than [`MAX_CREDENTIAL_FILE_BYTES`], or is empty.
    pub fn authorization(&self) -> Result<String, CredentialFileError> {
        let secret = read_secret_file(self.path())?;
        Ok(match self {
            CredentialFile::Token(_) => format!("Bearer {secret}"),
            CredentialFile::Password { user, .. } => basic(user, &secret),
        })
    }
}

impl std::fmt::Debug for MlflowSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlflowSettings")
            .field("tracking_uri", &self.tracking_uri)
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("experiment", &self.experiment)
            .field("run_id", &self.run_id)
            .field("credential_file", &self.credential_file)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn basic(user: &str, password: &str) -> String {
    basic_bytes(user.as_bytes(), password.as_bytes())
}

/// HTTP Basic of raw bytes: percent-decoded URI credentials need not be UTF-8.
fn basic_bytes(user: &[u8], password: &[u8]) -> String {
    let mut pair = Vec::with_capacity(user.len() + 1 + password.len());
    pair.extend_from_slice(user);
    pair.push(b':');
    pair.extend_from_slice(password);
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair))
}

/// Decodes `%XX` escapes (RFC 3986) to bytes (the `percent-encoding` crate); a `%` not
/// followed by two hex digits is kept as it is, since a password may well contain a bare `%`.
fn percent_decode(s: &str) -> Vec<u8> {
    percent_encoding::percent_decode_str(s).collect()
}

/// A tracking URI split into what requests go to and the credentials written into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackingUri {
    /// `scheme://host[:port][/prefix]`, no userinfo, no trailing `/`.
    pub base: String,
    /// `Authorization` value from userinfo in the URI, if it had any.
    pub basic: Option<String>,
}

/// Index of the end of the userinfo in the part of a URI after `scheme://`: the LAST `@`
/// before the first `?` or `#`. The last, not the first `@` nor one before the first `/`,
/// because users paste passwords with `/` and `@` unescaped (`http://u:se/c@ret@host`); an
/// `@` inside a path prefix is therefore not supported (write it as `%40`).
fn userinfo_end(rest: &str) -> Option<usize> {
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    rest[..end].rfind('@')
}

/// Splits a tracking URI into its base and Basic credentials (see the module docs). The error
/// is a problem text that never contains the URI: it may hold credentials.
pub fn parse_tracking_uri(uri: &str) -> Result<TrackingUri, &'static str> {
    if uri.is_empty() {
        return Err("is not set and MLFLOW_TRACKING_URI is empty (e.g. http://127.0.0.1:5000)");
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err("must start with http:// or https://");
    };
    if scheme != "http" && scheme != "https" {
        return Err("must start with http:// or https://");
    }
    let (basic, location) = match userinfo_end(rest) {
        Some(at) => {
            let userinfo = &rest[..at];
            // The user name cannot hold `:` unescaped (RFC 3986), so the first `:` splits.
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (Some(basic_bytes(&percent_decode(user), &percent_decode(password))), &rest[at + 1..])
        }
        None => (None, rest),
    };
    if location.contains(['?', '#']) {
        // Request paths are appended to the base: a query or fragment would swallow them.
        return Err("must not have a query (?) or fragment (#); in a password write them as %3F and %23");
    }
    let location = location.trim_end_matches('/');
    let host = location.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err("has no host");
    }
    Ok(TrackingUri { base: format!("{scheme}://{location}"), basic })
}

/// `uri` with any userinfo (`user:password@`) removed, for messages: used on URIs from peers
/// (a redirect's `Location`), which may carry credentials. Absolute (`scheme://`) and
/// scheme-relative (`//host`) URIs are cut; other text is returned unchanged.
pub fn strip_userinfo(uri: &str) -> String {
    let Some(i) = uri.find("//") else { return uri.to_string() };
    let scheme = &uri[..i];
    let is_authority = scheme.is_empty() || (scheme.ends_with(':') && !scheme.contains('/'));
    let rest = &uri[i + 2..];
    match userinfo_end(rest) {
        Some(at) if is_authority => format!("{scheme}//{}", &rest[at + 1..]),
        _ => uri.to_string(),
    }
}

/// The credential file of `token_file` / `password_file` and the `Authorization` value read
/// from it now, if one is set and usable.
fn credential_files(c: &MlflowConfig, path: &str, p: &mut Problems) -> Option<(CredentialFile, String)> {
    let (file, key) = match (&c.token_file, &c.password_file) {
        (None, None) => return None,
        (Some(_), Some(_)) => {
            p.add(path, "set one of token_file and password_file, not both");
            return None;
        }
        (Some(f), None) => (CredentialFile::Token(f.clone()), "token_file"),
        (None, Some(f)) => match env("MLFLOW_TRACKING_USERNAME") {
            Some(user) => (CredentialFile::Password { user, file: f.clone() }, "password_file"),
            None => {
                p.add(format!("{path}.password_file"), "needs MLFLOW_TRACKING_USERNAME (the user name)");
                return None;
            }
        },
    };
    match file.authorization() {
        Ok(a) => Some((file, a)),
        Err(e) => {
            p.add(format!("{path}.{key}"), e.to_string());
            None
        }
    }
}

impl MlflowConfig {
    /// Validates the connection keys (at config path `path`), adding problems to `p`.
    pub fn settings(&self, path: &str, p: &mut Problems) -> MlflowSettings {
        let c = self;
        let uri = c.tracking_uri.clone().or_else(|| env("MLFLOW_TRACKING_URI")).unwrap_or_default();
        let mut tracking_uri = String::new();
        let mut authorization = match (env("MLFLOW_TRACKING_USERNAME"), env("MLFLOW_TRACKING_PASSWORD")) {
            (Some(u), Some(pw)) => Some(basic(&u, &pw)),
            _ => env("MLFLOW_TRACKING_TOKEN").map(|t| format!("Bearer {t}")),
        };
        let mut credential_file = None;
        if let Some((file, a)) = credential_files(c, path, p) {
            authorization = Some(a);
            credential_file = Some(file);
        }
        match parse_tracking_uri(&uri) {
            Ok(parsed) => {
                tracking_uri = parsed.base;
                if let Some(basic_auth) = parsed.basic {
                    // Credentials in the URI win over a file: the file is not read again either.
                    authorization = Some(basic_auth);
                    credential_file = None;
                }
            }
            Err(problem) => p.add(format!("{path}.tracking_uri"), problem),
        }
        // An empty name is no name: MLflow refuses to create an experiment named "".
        let experiment = c
            .experiment
            .clone()
            .filter(|e| !e.is_empty())
            .or_else(|| env("MLFLOW_EXPERIMENT_NAME"))
            .unwrap_or_else(|| "Default".to_string());
        if experiment.chars().count() > 500 {
            p.add(format!("{path}.experiment"), "is longer than MLflow's 500 characters");
        }
        let run_id = c.run_id.clone().or_else(|| env("MLFLOW_RUN_ID"));
        MlflowSettings { tracking_uri, authorization, experiment, run_id, credential_file }
    }
}

impl MlflowSettings {
    /// Where this exporter writes, for logs and spool headers: `mlflow <tracking URI>`.
    pub fn destination(&self) -> String {
        format!("mlflow {}", self.tracking_uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s))
    }

    fn parsed(uri: &str) -> TrackingUri {
        match parse_tracking_uri(uri) {
            Ok(t) => t,
            Err(e) => panic!("{uri}: {e}"),
        }
    }

    #[test]
    fn plain_uri_has_no_credentials() {
        assert_eq!(parsed("http://127.0.0.1:5000/"), TrackingUri { base: "http://127.0.0.1:5000".into(), basic: None });
        assert_eq!(parsed("http://host/mlflow").base, "http://host/mlflow");
    }

    #[test]
    fn credentials_move_to_basic_auth() {
        let t = parsed("http://u:p@127.0.0.1:5000/");
        assert_eq!(t, TrackingUri { base: "http://127.0.0.1:5000".into(), basic: Some(b64("u:p")) });
        // A user without a password.
        assert_eq!(parsed("http://u@h").basic, Some(b64("u:")));
    }

    #[test]
    fn credentials_with_a_path_prefix() {
        let t = parsed("http://user:pw@host:8080/mlflow/prefix/");
        assert_eq!(t, TrackingUri { base: "http://host:8080/mlflow/prefix".into(), basic: Some(b64("user:pw")) });
    }

    #[test]
    fn slash_and_at_in_the_password() {
        let t = parsed("http://user:sec/retpw@127.0.0.1:1");
        assert_eq!(t, TrackingUri { base: "http://127.0.0.1:1".into(), basic: Some(b64("user:sec/retpw")) });
        let t = parsed("http://user:a@b/c:d@127.0.0.1:1/pre");
        assert_eq!(t, TrackingUri { base: "http://127.0.0.1:1/pre".into(), basic: Some(b64("user:a@b/c:d")) });
    }

    #[test]
    fn percent_encoded_credentials_are_decoded() {
        let t = parsed("http://us%3Aer:p%2Fw%40x%25%zz@host");
        assert_eq!(t, TrackingUri { base: "http://host".into(), basic: Some(b64("us:er:p/w@x%%zz")) });
        // Percent-decoding works on bytes: non-UTF-8 credentials survive.
        let t = parsed("http://u:%FF@host");
        let raw = base64::engine::general_purpose::STANDARD.encode(b"u:\xff");
        assert_eq!(t.basic, Some(format!("Basic {raw}")));
    }

    #[test]
    fn https_uri() {
        let t = parsed("https://tok:x-y@mlflow.example.com/");
        assert_eq!(t, TrackingUri { base: "https://mlflow.example.com".into(), basic: Some(b64("tok:x-y")) });
    }

    #[test]
    fn bad_uris_are_refused_without_echoing_them() {
        for uri in ["", "ftp://s3cret@h", "s3cret", "http://s3cret@", "http://u:s3cret@/x", "http://h/?s3cret", "http://u:s3?cret@h"] {
            match parse_tracking_uri(uri) {
                Ok(t) => panic!("{uri} accepted as {t:?}"),
                Err(e) => assert!(!e.contains("s3") && !e.contains("cret"), "{e}"),
            }
        }
        let c = MlflowConfig { tracking_uri: Some("http://user:sec/retpw@".into()), ..Default::default() };
        let mut p = Problems::default();
        let s = c.settings("exporters.mlflow", &mut p);
        let shown = format!("{p:?} {s:?}");
        assert!(shown.contains("has no host") && !shown.contains("sec") && !shown.contains("retpw"), "{shown}");
    }

    #[test]
    fn settings_carry_no_credentials_in_the_uri() {
        let c = MlflowConfig { tracking_uri: Some("http://user:sec/retpw@127.0.0.1:1".into()), ..Default::default() };
        let mut p = Problems::default();
        let s = c.settings("exporters.mlflow", &mut p);
        assert_eq!(s.tracking_uri, "http://127.0.0.1:1");
        assert_eq!(s.authorization, Some(b64("user:sec/retpw")));
        assert!(!format!("{s:?}").contains("retpw"));
    }

    #[test]
    fn empty_experiment_is_the_default() {
        let c = MlflowConfig { tracking_uri: Some("http://h".into()), experiment: Some(String::new()), ..Default::default() };
        let s = c.settings("exporters.mlflow", &mut Problems::default());
        assert!(!s.experiment.is_empty());
    }

    #[test]
    fn token_file_gives_bearer_and_problems_name_the_file_only() {
        let dir = std::env::temp_dir().join(format!("trainmetrics-mlflow-cred-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let token = dir.join("token");
        let _ = std::fs::write(&token, "  t0k-s3cret\n");
        let c = MlflowConfig { tracking_uri: Some("http://h".into()), token_file: Some(token.clone()), ..Default::default() };
        let mut p = Problems::default();
        let s = c.settings("exporters.mlflow", &mut p);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(s.authorization.as_deref(), Some("Bearer t0k-s3cret"));
        // The file is read again when the server refuses the credentials.
        let file = s.credential_file.clone().expect("the credential file is kept");
        let _ = std::fs::write(&token, "n3w-t0ken\n");
        assert_eq!(file.authorization().ok().as_deref(), Some("Bearer n3w-t0ken"));
        let _ = std::fs::write(&token, " \n");
        assert!(matches!(file.authorization(), Err(CredentialFileError::Empty { .. })));
        // A FIFO is refused without blocking on it; so is a file too large to be a credential.
        let fifo = dir.join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()), "mkfifo");
        assert!(matches!(CredentialFile::Token(fifo).authorization(), Err(CredentialFileError::NotAFile { .. })));
        let big = dir.join("big");
        let _ = std::fs::write(&big, vec![b'x'; MAX_CREDENTIAL_FILE_BYTES as usize + 1]);
        assert!(matches!(CredentialFile::Token(big).authorization(), Err(CredentialFileError::TooLarge { .. })));
        // Credentials in the URI win, and no file is read again.
        let in_uri = MlflowConfig { tracking_uri: Some("http://u:p@h".into()), ..c.clone() };
        let s = in_uri.settings("exporters.mlflow", &mut Problems::default());
        assert_eq!((s.authorization, s.credential_file), (Some(b64("u:p")), None));
        let both = MlflowConfig { password_file: Some(token.clone()), ..c.clone() };
        let missing = MlflowConfig { token_file: Some(dir.join("absent")), ..c };
        let mut p = Problems::default();
        both.settings("exporters.mlflow", &mut p);
        missing.settings("exporters.mlflow", &mut p);
        let shown = format!("{p:?}");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(shown.contains("not both") && shown.contains("exporters.mlflow.token_file") && shown.contains("absent"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn userinfo_is_stripped_from_peer_uris() {
        assert_eq!(strip_userinfo("https://u:p/w@host/x?next=a@b"), "https://host/x?next=a@b");
        assert_eq!(strip_userinfo("//u:p@host/x"), "//host/x");
        assert_eq!(strip_userinfo("/login?u=a@b"), "/login?u=a@b");
        assert_eq!(strip_userinfo("http://host/x"), "http://host/x");
    }
}

// ---- Resume and run liveness (`resume`, `end_idle_runs`) ----

/// What the MLflow exporter does with the steps of a resumed run that MLflow already holds
/// (`resume`; see `README.md` "Resume"). MLflow cannot delete a metric's history, so a trainer
/// restarted from a checkpoint at step S either logs S.. again (MLflow then holds both values
/// at those steps) or is kept from overlapping what is already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumePolicy {
    /// Log every point of the resumed session (default): nothing the trainer recorded is lost,
    /// as with MLflow's own client continuing a run; `metrics/get-history` then holds the old
    /// and the new value at each overlapping step, and the run's latest value is the new one.
    #[default]
    LogAgain,
    /// Skip a point whose step is at or below the largest step MLflow already holds for its key
    /// (read from `runs/get` `data.metrics` when the run resumes); skipped points are counted
    /// `superseded`. The history stays one value per step, the old session's.
    SkipLogged,
}

/// The MLflow status a run is ended with when it goes idle (`end_idle_runs.status`; MLflow's
/// `RunStatus`: `KILLED` or `FAILED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum IdleStatus {
    /// `KILLED` (default): the trainer vanished without reporting an outcome.
    #[default]
    #[serde(rename = "KILLED")]
    Killed,
    /// `FAILED`.
    #[serde(rename = "FAILED")]
    Failed,
}

impl IdleStatus {
    /// The status string of MLflow's REST API.
    pub fn as_str(self) -> &'static str {
        match self {
            IdleStatus::Killed => "KILLED",
            IdleStatus::Failed => "FAILED",
        }
    }
}

/// Default of `end_idle_runs.after`: 1 h, longer than any pause between metrics of a healthy
/// trainer (an epoch's evaluation, a checkpoint upload).
pub const DEFAULT_IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// `end_idle_runs` (mlflow): end a run that received no data point for `after` (see `README.md`
/// "Run liveness").
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndIdleRunsConfig {
    /// Default true.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Quiet time after which the run is ended; default 1h (at most 24h).
    #[serde(default, with = "humantime_serde")]
    pub after: Option<std::time::Duration>,
    /// `KILLED` (default) or `FAILED`.
    #[serde(default)]
    pub status: Option<IdleStatus>,
}

/// Validated resume and liveness settings of an MLflow exporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MlflowRunPolicy {
    /// Policy for overlapping steps of a resumed run.
    pub resume: ResumePolicy,
    /// Status of runs ended for being idle.
    pub idle_status: IdleStatus,
}

impl MlflowConfig {
    /// Validates `resume` and `end_idle_runs` (at config path `path`): the policy, and the idle
    /// time for the cadence (`None` when disabled). Problems go to `p`.
    pub fn run_policy(&self, path: &str, p: &mut Problems) -> (MlflowRunPolicy, Option<std::time::Duration>) {
        let c = self;
        let e = &c.end_idle_runs;
        let after = e.after.unwrap_or(DEFAULT_IDLE_AFTER);
        if after.is_zero() || after > MAX_DURATION {
            p.add(format!("{path}.end_idle_runs.after"), "must be positive and at most 24h");
        }
        let policy = MlflowRunPolicy { resume: c.resume.unwrap_or_default(), idle_status: e.status.unwrap_or_default() };
        (policy, e.enabled.unwrap_or(true).then_some(after))
    }
}
