//! HTTP client of the MLflow REST API: JSON in and out, auth header, per-call timeout, and the
//! classification of failures for the retry policy (source: mlflow's `rest_utils.py` retries
//! 408, 429, 500, 502, 503, 504 and connection errors). We also retry 401 and 403: a refused
//! credential is an outage of the whole backend (a password changed, a token expired), not a
//! fault of one batch, so batches wait (in the spool) until the credentials are fixed, as they
//! do while the server is down (case 019). Everything else is final.
//!
//! Redirects are not followed: an HTTP client following a 301/302 turns the POST into a GET
//! (and would carry the `Authorization` header to wherever it points), so the call would fail
//! later with a misleading message. A 3xx is a permanent [`ClientError::Redirect`] that says
//! where the tracking URI redirects to (the `Location` without any userinfo), so the user can
//! configure the final URI.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

use crate::exporter::ExportError;

/// Path prefix of the run and metric endpoints (they do not exist under `/api/3.0`).
pub const API_PREFIX: &str = "/api/2.0/mlflow/";

/// A failed call. Messages never contain credentials (the URL carries none, headers are not
/// printed).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No HTTP answer: connection refused or reset, DNS, TLS, timeout. Retryable.
    #[error("{endpoint}: {message}")]
    Transport {
        /// The endpoint, e.g. `runs/log-batch`.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// The server answered with a non-2xx status.
    #[error("{endpoint}: HTTP {status} {error_code}: {message}")]
    Status {
        /// The endpoint.
        endpoint: String,
        /// HTTP status code.
        status: u16,
        /// MLflow's `error_code` (e.g. `RESOURCE_DOES_NOT_EXIST`), empty if the body had none.
        error_code: String,
        /// MLflow's `message`, shortened to 500 characters.
        message: String,
        /// The `Retry-After` header in seconds, when present.
        retry_after: Option<Duration>,
    },
    /// The server answered 3xx: the tracking URI points at a redirect. Not retryable.
    #[error(
        "{endpoint}: HTTP {status}: the tracking URI redirects to {location}; set tracking_uri to the final URI{hint}"
    )]
    Redirect {
        /// The endpoint.
        endpoint: String,
        /// HTTP status code (300–399).
        status: u16,
        /// The `Location` header without userinfo, shortened (or a note that there was none).
        location: String,
        /// The suggested tracking URI (` (e.g. …)`), or empty when it cannot be derived.
        hint: String,
    },
    /// A 2xx answer whose body is not the JSON we expect. Not retryable.
    #[error("{endpoint}: unreadable response: {message}")]
    Decode {
        /// The endpoint.
        endpoint: String,
        /// What was wrong.
        message: String,
    },
}

impl ClientError {
    /// Whether trying again can help: transport errors and HTTP 401, 403 (credentials: see the
    /// module docs), 408, 429, 5xx.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Status { status, .. } => matches!(status, 401 | 403 | 408 | 429 | 500..=599),
            ClientError::Redirect { .. } | ClientError::Decode { .. } => false,
        }
    }

    /// Whether the server refused the credentials (HTTP 401 or 403).
    pub fn is_credentials_refused(&self) -> bool {
        matches!(self.status(), Some(401 | 403))
    }

    /// MLflow's error code, if the server sent one.
    pub fn error_code(&self) -> Option<&str> {
        match self {
            ClientError::Status { error_code, .. } if !error_code.is_empty() => Some(error_code),
            _ => None,
        }
    }

    /// HTTP status, if there was an answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } | ClientError::Redirect { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl From<ClientError> for ExportError {
    fn from(e: ClientError) -> Self {
        let retry_after = match &e {
            ClientError::Status { retry_after, .. } => *retry_after,
            _ => None,
        };
        if e.is_credentials_refused() {
            let message = format!("{e} (MLflow refused the credentials; batches wait until it accepts them)");
            ExportError::Retryable { message, retry_after }
        } else if e.is_retryable() {
            ExportError::Retryable { message: e.to_string(), retry_after }
        } else {
            ExportError::Permanent { message: e.to_string() }
        }
    }
}

/// MLflow REST client.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    authorization: Option<String>,
    /// The last answer was 401 or 403 (a call since then succeeded: cleared).
    refused: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The authorization header is a secret: never printed.
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

/// The error for a 3xx answer; `location` is the raw header (`Err` when not visible ASCII).
fn redirect(endpoint: &str, status: u16, location: Option<Result<String, ureq::http::header::ToStrError>>) -> ClientError {
    let (location, hint) = match location {
        Some(Ok(l)) => {
            let clean = super::config::strip_userinfo(l.trim());
            // The Location of an API call ends in our API path: what precedes it is the URI to
            // configure. Cut at the first `?`/`#` so a query is never taken for the base.
            let path = clean.split(['?', '#']).next().unwrap_or("");
            let hint = match path.find(API_PREFIX) {
                Some(i) if path.contains("://") => format!(" (e.g. {})", shorten(&path[..i], 200)),
                _ => String::new(),
            };
            (shorten(&clean, 300), hint)
        }
        Some(Err(_)) => ("an unreadable Location".to_string(), String::new()),
        None => ("nowhere (no Location header)".to_string(), String::new()),
    };
    ClientError::Redirect { endpoint: endpoint.to_string(), status, location, hint }
}

impl Client {
    /// A client for the server at `tracking_uri` (`http(s)://host:port[/prefix]`, no
    /// credentials in it), sending `authorization` as the `Authorization` header when given.
    pub fn new(tracking_uri: &str, authorization: Option<String>) -> Self {
        // max_redirects(0): a 3xx comes back as the answer (see the module docs).
        let config = ureq::Agent::config_builder().http_status_as_error(false).max_redirects(0).build();
        Self {
            agent: ureq::Agent::new_with_config(config),
            base: format!("{}{}", tracking_uri.trim_end_matches('/'), API_PREFIX),
            authorization,
            refused: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether the server refused the credentials at its last answer (HTTP 401 or 403).
    pub fn credentials_refused(&self) -> bool {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends `authorization` as the `Authorization` header from now on; true if it changed.
    pub fn set_authorization(&mut self, authorization: Option<String>) -> bool {
        if self.authorization == authorization {
            return false;
        }
        self.authorization = authorization;
        true
    }

    /// `GET <endpoint>?<query>` → the JSON body.
    pub fn get(&self, endpoint: &str, query: &[(&str, &str)], timeout: Duration) -> Result<Value, ClientError> {
        let mut req = self.agent.get(format!("{}{endpoint}", self.base));
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a);
        }
        let result = req.config().timeout_global(Some(timeout)).build().call();
        self.answer(endpoint, result)
    }

    /// `POST <endpoint>` with a JSON body → the JSON body.
    pub fn post(&self, endpoint: &str, body: &Value, timeout: Duration) -> Result<Value, ClientError> {
        let mut req = self
            .agent
            .post(format!("{}{endpoint}", self.base))
            .header("Content-Type", "application/json");
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a);
        }
        let result = req.config().timeout_global(Some(timeout)).build().send(body.to_string());
        self.answer(endpoint, result)
    }

    /// Every form in which the credentials could come back in a server's (or a proxy's) error
    /// text: the header value, its credential part, and for Basic the decoded pair and password.
    fn secrets(&self) -> Vec<String> {
        let Some(auth) = self.authorization.as_deref() else { return Vec::new() };
        let mut out = vec![auth.to_string()];
        if let Some((scheme, cred)) = auth.split_once(' ') {
            out.push(cred.to_string());
            if scheme.eq_ignore_ascii_case("basic") {
                use base64::Engine;
                if let Ok(pair) = base64::engine::general_purpose::STANDARD.decode(cred) {
                    let pair = String::from_utf8_lossy(&pair).into_owned();
                    if let Some((_, password)) = pair.split_once(':') {
                        out.push(password.to_string());
                    }
                    out.push(pair);
                }
            }
        }
        // Longest first, so a pair is replaced whole before its password part.
        out.retain(|s| s.len() >= 4);
        out.sort_by_key(|s| std::cmp::Reverse(s.len()));
        out
    }

    /// `text` with every credential form replaced by `<redacted>`.
    fn redact(&self, text: &str) -> String {
        self.secrets().iter().fold(text.to_string(), |t, s| t.replace(s.as_str(), "<redacted>"))
    }

    fn answer(
        &self,
        endpoint: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, ClientError> {
        let mut resp = result.map_err(|e| ClientError::Transport {
            endpoint: endpoint.to_string(),
            message: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        self.refused.store(matches!(status, 401 | 403), std::sync::atomic::Ordering::Relaxed);
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if (300..400).contains(&status) {
            let location = resp.headers().get("location").map(|v| v.to_str().map(str::to_string));
            return Err(redirect(endpoint, status, location));
        }
        let text = resp.body_mut().read_to_string().map_err(|e| ClientError::Transport {
            endpoint: endpoint.to_string(),
            message: format!("reading the response: {e}"),
        })?;
        if (200..300).contains(&status) {
            if text.trim().is_empty() {
                return Ok(Value::Object(Default::default()));
            }
            return serde_json::from_str(&text).map_err(|e| ClientError::Decode {
                endpoint: endpoint.to_string(),
                message: self.redact(&e.to_string()),
            });
        }
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let field = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
        Err(ClientError::Status {
            endpoint: endpoint.to_string(),
            status,
            error_code: shorten(&self.redact(&field("error_code").unwrap_or_default()), 100),
            // A proxy in front of MLflow may echo the request headers in its error page.
            message: shorten(&self.redact(&field("message").unwrap_or_else(|| text.clone())), 500),
            retry_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_echoed_by_a_server_never_reach_an_error_message() {
        use base64::Engine;
        let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("alice:pa55word"));
        let c = Client::new("http://127.0.0.1:1", Some(basic.clone()));
        let echoed = format!("denied: header {basic}; user alice:pa55word; pw pa55word");
        let out = c.redact(&echoed);
        assert!(!out.contains("pa55word") && !out.contains(&basic[6..]), "{out}");
        let c = Client::new("http://127.0.0.1:1", Some("Bearer tok-123456".into()));
        assert_eq!(c.redact("bad token tok-123456"), "bad token <redacted>");
    }

    #[test]
    fn refused_credentials_are_an_outage_and_other_client_errors_are_final() {
        let status = |status| ClientError::Status {
            endpoint: "runs/log-batch".into(),
            status,
            error_code: String::new(),
            message: "no".into(),
            retry_after: None,
        };
        for s in [401, 403] {
            assert!(status(s).is_retryable() && status(s).is_credentials_refused(), "{s}");
            match ExportError::from(status(s)) {
                ExportError::Retryable { message, .. } => assert!(message.contains(&format!("HTTP {s}")) && message.contains("credentials"), "{message}"),
                other => panic!("{s}: {other:?}"),
            }
        }
        for s in [400, 404, 409] {
            assert!(!status(s).is_retryable() && !status(s).is_credentials_refused(), "{s}");
        }
        assert!(status(503).is_retryable() && !status(503).is_credentials_refused());
    }

    #[test]
    fn a_redirect_is_permanent_and_names_its_target_without_userinfo() {
        let loc = format!("https://user:s3/cret@mlflow.example.com/prefix{API_PREFIX}runs/create?x=1");
        let e = redirect("runs/create", 308, Some(Ok(loc)));
        assert!(!e.is_retryable());
        assert_eq!(e.status(), Some(308));
        let msg = e.to_string();
        assert!(!msg.contains("s3") && !msg.contains("cret") && !msg.contains("user"), "{msg}");
        assert!(msg.contains("redirects to https://mlflow.example.com/prefix/api/2.0/mlflow/runs/create?x=1"), "{msg}");
        assert!(msg.contains("(e.g. https://mlflow.example.com/prefix)"), "{msg}");
        assert!(matches!(ExportError::from(e), ExportError::Permanent { .. }));
        let msg = redirect("runs/create", 302, Some(Ok("/login".into()))).to_string();
        assert!(msg.contains("redirects to /login; set tracking_uri to the final URI"), "{msg}");
        let msg = redirect("runs/create", 301, None).to_string();
        assert!(msg.contains("no Location header"), "{msg}");
    }
}
