//! HTTP client of the MLflow REST API: JSON in and out, auth header, per-call timeout, and the
//! classification of failures for the retry policy (source: mlflow's `rest_utils.py` retries
//! 408, 429, 500, 502, 503, 504 and connection errors; everything else is final).

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
    /// Whether trying again can help: transport errors and HTTP 408, 429, 5xx.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            ClientError::Decode { .. } => false,
        }
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
            ClientError::Status { status, .. } => Some(*status),
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
        if e.is_retryable() {
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

impl Client {
    /// A client for the server at `tracking_uri` (`http(s)://host:port[/prefix]`, no
    /// credentials in it), sending `authorization` as the `Authorization` header when given.
    pub fn new(tracking_uri: &str, authorization: Option<String>) -> Self {
        let config = ureq::Agent::config_builder().http_status_as_error(false).build();
        Self {
            agent: ureq::Agent::new_with_config(config),
            base: format!("{}{}", tracking_uri.trim_end_matches('/'), API_PREFIX),
            authorization,
        }
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
        Self::answer(endpoint, result)
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
        Self::answer(endpoint, result)
    }

    fn answer(
        endpoint: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Value, ClientError> {
        let mut resp = result.map_err(|e| ClientError::Transport {
            endpoint: endpoint.to_string(),
            message: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
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
                message: e.to_string(),
            });
        }
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let field = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
        Err(ClientError::Status {
            endpoint: endpoint.to_string(),
            status,
            error_code: field("error_code").unwrap_or_default(),
            message: shorten(&field("message").unwrap_or_else(|| text.clone()), 500),
            retry_after,
        })
    }
}
