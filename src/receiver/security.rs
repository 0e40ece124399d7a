//! What protects the OTLP receivers: TLS identities (rustls with the `ring` provider), the bearer
//! token, per-receiver rate limits, and the rate-limited warning log for rejected requests.
//!
//! - TLS: PEM files as the OpenTelemetry Collector's `configtls` names them (`cert_file`,
//!   `key_file`, `client_ca_file` for mutual TLS). They are read and checked once, at config
//!   validation, so a missing, unreadable or mismatched file is a config problem, not a failure
//!   at the first connection.
//! - Bearer token (RFC 6750): `Authorization: Bearer <token>`, compared in constant time
//!   (`subtle`), read from a file or an environment variable and never from the YAML itself,
//!   so configs can be shared and logged. The token never appears in `Debug` output.
//! - Rate limit: a token bucket (GCRA, `governor`) per receiver protocol, `requests_per_second`
//!   with `burst` requests allowed at once.
//! - Rejection log: one warning per cause, then at most one per [`LOG_EVERY`] with the count of
//!   rejections since, so a flood of bad requests cannot flood the log.

use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use subtle::ConstantTimeEq;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use serde::{Deserialize, Serialize};

use crate::problems::Problems;

/// The crypto provider of every TLS config here. Explicit, so nothing depends on which
/// provider happens to be the process default.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A validated TLS identity of one receiver.
#[derive(Clone)]
pub struct TlsSettings {
    /// `cert_file`, for the startup summary.
    pub cert_file: PathBuf,
    /// The certificate chain, PEM, as read (tonic takes PEM).
    pub cert_pem: Vec<u8>,
    /// The private key, PEM (a secret: never logged).
    pub key_pem: Vec<u8>,
    /// `client_ca_file`'s PEM when clients must present a certificate it signed (mutual TLS).
    pub client_ca_pem: Option<Vec<u8>>,
    /// The same as a rustls server config (HTTP/1.1 via ALPN), for the HTTP receiver.
    pub server_config: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert_file", &self.cert_file)
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

fn read(path: &Path, at: &str, p: &mut Problems) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) => {
            p.add(at, format!("cannot read {}: {e}", path.display()));
            None
        }
    }
}

fn certs(pem: &[u8], path: &Path, at: &str, p: &mut Problems) -> Option<Vec<CertificateDer<'static>>> {
    match CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>() {
        Ok(c) if !c.is_empty() => Some(c),
        Ok(_) => {
            p.add(at, format!("{} holds no PEM certificate", path.display()));
            None
        }
        Err(e) => {
            p.add(at, format!("{} is not a valid PEM certificate file: {e}", path.display()));
            None
        }
    }
}

/// Reads and checks `c` (at config path `path`, e.g. `receivers.otlp.protocols.grpc.tls`):
/// every file readable, the certificate and key valid PEM and matching, the client CA a valid
/// certificate. Problems name the file, never its content.
pub fn load_tls(c: &TlsConfig, path: &str, p: &mut Problems) -> Option<TlsSettings> {
    let before = p.len();
    let cert_at = format!("{path}.cert_file");
    let key_at = format!("{path}.key_file");
    let ca_at = format!("{path}.client_ca_file");
    let cert_pem = read(&c.cert_file, &cert_at, p);
    let key_pem = read(&c.key_file, &key_at, p);
    let ca_pem = c.client_ca_file.as_ref().and_then(|f| read(f, &ca_at, p).map(|b| (f, b)));
    let chain = cert_pem.as_ref().and_then(|pem| certs(pem, &c.cert_file, &cert_at, p));
    let key = key_pem.as_ref().and_then(|pem| match PrivateKeyDer::from_pem_slice(pem) {
        Ok(k) => Some(k),
        Err(e) => {
            p.add(&key_at, format!("{} holds no valid PEM private key: {e}", c.key_file.display()));
            None
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    if let Some((file, pem)) = &ca_pem {
        for cert in certs(pem, file, &ca_at, p).unwrap_or_default() {
            if let Err(e) = roots.add(cert) {
                p.add(&ca_at, format!("{} holds an unusable CA certificate: {e}", file.display()));
            }
        }
    }
    if p.len() > before {
        return None;
    }
    let (chain, key, cert_pem, key_pem) = (chain?, key?, cert_pem?, key_pem?);
    let builder = match rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions() {
        Ok(b) => b,
        Err(e) => {
            p.add(path, format!("TLS set-up: {e}"));
            return None;
        }
    };
    let builder = if ca_pem.is_some() {
        match rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build() {
            Ok(v) => builder.with_client_cert_verifier(v),
            Err(e) => {
                p.add(&ca_at, format!("cannot verify clients with it: {e}"));
                return None;
            }
        }
    } else {
        builder.with_no_client_auth()
    };
    match builder.with_single_cert(chain, key) {
        Ok(mut config) => {
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(TlsSettings {
                cert_file: c.cert_file.clone(),
                cert_pem,
                key_pem,
                client_ca_pem: ca_pem.map(|(_, b)| b),
                server_config: Arc::new(config),
            })
        }
        Err(e) => {
            p.add(path, format!("the certificate and key do not make a TLS identity (do they match?): {e}"));
            None
        }
    }
}

/// Where the bearer token came from (for the startup summary; never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `bearer_token_file`.
    File(PathBuf),
    /// `bearer_token_env`: the variable's name.
    Env(String),
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::File(p) => write!(f, "file {}", p.display()),
            TokenSource::Env(v) => write!(f, "env {v}"),
        }
    }
}

/// The token clients must send as `Authorization: Bearer <token>` (RFC 6750 §2.1).
#[derive(Clone)]
pub struct BearerToken {
    token: Vec<u8>,
    /// Where it came from.
    pub source: TokenSource,
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerToken").field("token", &"<redacted>").field("source", &self.source).finish()
    }
}

/// Why a request was not authenticated (the answer's message; never echoes what was sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing Authorization: Bearer token")]
    Missing,
    /// A header that is not `Bearer <token>`, or a token that does not match.
    #[error("invalid bearer token")]
    Invalid,
}

impl BearerToken {
    /// A token from its text, trimmed of surrounding whitespace (files end with a newline).
    pub fn new(token: &str, source: TokenSource) -> Self {
        Self { token: token.trim().as_bytes().to_vec(), source }
    }

    /// Checks an `Authorization` header value. The scheme is case-insensitive (RFC 7235
    /// §2.1); the token comparison takes the same time wherever the first difference is.
    pub fn check(&self, header: Option<&[u8]>) -> Result<(), AuthError> {
        let h = header.ok_or(AuthError::Missing)?;
        if h.len() < 7 || !h[..7].eq_ignore_ascii_case(b"bearer ") {
            return Err(AuthError::Invalid);
        }
        let given = h[7..].trim_ascii();
        if bool::from(given.ct_eq(&self.token)) {
            Ok(())
        } else {
            Err(AuthError::Invalid)
        }
    }
}

/// Reads the token `c` names (at config path `path`): exactly one of `bearer_token_file` and
/// `bearer_token_env`, and not empty after trimming.
pub fn load_token(c: &AuthConfig, path: &str, p: &mut Problems) -> Option<BearerToken> {
    match (&c.bearer_token_file, &c.bearer_token_env) {
        (Some(_), Some(_)) => {
            p.add(path, "set one of bearer_token_file and bearer_token_env, not both");
            None
        }
        (None, None) => {
            p.add(path, "needs bearer_token_file or bearer_token_env");
            None
        }
        (Some(file), None) => {
            let at = format!("{path}.bearer_token_file");
            match crate::secrets::read_secret_file(file) {
                Ok(t) => Some(BearerToken::new(&t, TokenSource::File(file.clone()))),
                Err(e) => {
                    p.add(at, e.to_string());
                    None
                }
            }
        }
        (None, Some(var)) => {
            let at = format!("{path}.bearer_token_env");
            match std::env::var(var) {
                Ok(t) if !t.trim().is_empty() => Some(BearerToken::new(&t, TokenSource::Env(var.clone()))),
                _ => {
                    p.add(at, format!("environment variable {var} is not set or empty"));
                    None
                }
            }
        }
    }
}

/// A validated `rate_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitSettings {
    /// Sustained requests per second.
    pub requests_per_second: NonZeroU32,
    /// Requests allowed at once.
    pub burst: NonZeroU32,
}

/// Checks `c` (at config path `path`): both numbers at least 1; `burst` defaults to
/// `requests_per_second`.
pub fn load_rate_limit(c: &RateLimitConfig, path: &str, p: &mut Problems) -> Option<RateLimitSettings> {
    let Some(rps) = NonZeroU32::new(c.requests_per_second) else {
        p.add(format!("{path}.requests_per_second"), "must be at least 1 (leave rate_limit out to turn it off)");
        return None;
    };
    let burst = match c.burst {
        None => rps,
        Some(b) => match NonZeroU32::new(b) {
            Some(b) => b,
            None => {
                p.add(format!("{path}.burst"), "must be at least 1");
                return None;
            }
        },
    };
    Some(RateLimitSettings { requests_per_second: rps, burst })
}

/// A receiver's request rate limiter.
#[derive(Debug)]
pub struct Limiter {
    limiter: DefaultDirectRateLimiter,
    clock: DefaultClock,
}

impl Limiter {
    /// A limiter for `s`.
    pub fn new(s: RateLimitSettings) -> Self {
        let clock = DefaultClock::default();
        let quota = Quota::per_second(s.requests_per_second).allow_burst(s.burst);
        Self { limiter: RateLimiter::direct_with_clock(quota, clock.clone()), clock }
    }

    /// Takes one request from the bucket, or says how long until one is allowed (at least
    /// 1 ms, so a `RetryInfo` delay is never zero).
    pub fn check(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()).max(Duration::from_millis(1)))
    }
}

// The log is shared with the exporters' delivery; it lives in a leaf module so delivery does
// not depend on the receiver.
pub use crate::rejections::{RejectionLog, LOG_EVERY};

/// `tls` of a receiver protocol: PEM files, the OpenTelemetry Collector's `configtls` keys
/// (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM.
    pub cert_file: PathBuf,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates, PEM; when set, clients must present a certificate one of them signed
    /// (mutual TLS). Default none.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// `rate_limit` of a receiver protocol: a token bucket over requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second (at least 1).
    pub requests_per_second: u32,
    /// Requests allowed at once; default `requests_per_second`.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// `receivers.otlp.auth`: clients must send `Authorization: Bearer <token>`. The token is read
/// at startup from a file (trimmed) or an environment variable, never written in the YAML.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// File holding the token.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// Name of an environment variable holding the token.
    #[serde(default)]
    pub bearer_token_env: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_checks_scheme_and_value() {
        let t = BearerToken::new(" s3cret\n", TokenSource::Env("X".into()));
        assert_eq!(t.check(Some(b"Bearer s3cret")), Ok(()));
        assert_eq!(t.check(Some(b"bearer s3cret ")), Ok(()));
        assert_eq!(t.check(Some(b"Bearer s3cre")), Err(AuthError::Invalid));
        assert_eq!(t.check(Some(b"Bearer s3cretx")), Err(AuthError::Invalid));
        assert_eq!(t.check(Some(b"Basic s3cret")), Err(AuthError::Invalid));
        assert_eq!(t.check(Some(b"Bearer")), Err(AuthError::Invalid));
        assert_eq!(t.check(None), Err(AuthError::Missing));
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn limiter_allows_the_burst_then_refuses_with_a_delay() {
        let rps = NonZeroU32::new(1).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN);
        let l = Limiter::new(RateLimitSettings { requests_per_second: rps, burst });
        for _ in 0..3 {
            assert_eq!(l.check(), Ok(()));
        }
        let wait = l.check().err().unwrap_or_default();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
    }

    #[test]
    fn rate_limit_and_auth_problems_are_listed() {
        let mut p = Problems::default();
        assert!(load_rate_limit(&RateLimitConfig { requests_per_second: 0, burst: None }, "r", &mut p).is_none());
        assert!(load_rate_limit(&RateLimitConfig { requests_per_second: 5, burst: Some(0) }, "r", &mut p).is_none());
        let both = AuthConfig { bearer_token_file: Some("/x".into()), bearer_token_env: Some("Y".into()) };
        assert!(load_token(&both, "a", &mut p).is_none());
        let missing = AuthConfig { bearer_token_file: Some("/nonexistent/token".into()), bearer_token_env: None };
        assert!(load_token(&missing, "a", &mut p).is_none());
        let shown = format!("{p:?}");
        for needle in ["r.requests_per_second", "r.burst", "not both", "a.bearer_token_file", "/nonexistent/token"] {
            assert!(shown.contains(needle), "{needle} missing in {shown}");
        }
    }

    #[test]
    fn missing_and_invalid_tls_files_are_problems() {
        let dir = std::env::temp_dir().join(format!("trainmetrics-tls-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let garbage = dir.join("garbage.pem");
        let _ = std::fs::write(&garbage, "not a certificate");
        let c = TlsConfig { cert_file: garbage.clone(), key_file: dir.join("missing.key"), client_ca_file: Some(garbage) };
        let mut p = Problems::default();
        assert!(load_tls(&c, "t", &mut p).is_none());
        let shown = format!("{p:?}");
        let _ = std::fs::remove_dir_all(&dir);
        for needle in ["t.cert_file", "holds no PEM certificate", "t.key_file", "cannot read", "t.client_ca_file"] {
            assert!(shown.contains(needle), "{needle} missing in {shown}");
        }
    }
}
