//! OTLP/HTTP receiver (axum): `POST /v1/metrics` with a protobuf (`application/x-protobuf`) or
//! JSON (`application/json`) `ExportMetricsServiceRequest`, optionally `Content-Encoding: gzip`
//! or `zstd`. Bodies are limited before and after decompression, so a compression bomb is
//! refused (413) instead of exhausting memory (OTLP/HTTP spec: 400 for bad data, 503 +
//! `Retry-After` to make the client retry).
//!
//! A middleware runs the [`Admission`] before the body is read: a missing or wrong bearer token is
//! answered 401 with `WWW-Authenticate: Bearer` (RFC 6750 §3), a request over the rate limit
//! 429 with `Retry-After` (RFC 6585 §4). With `tls`, connections are served over rustls
//! (`tokio-rustls`) by hyper's connection builder, each handshake on its own task with a
//! timeout, so a slow or plaintext client holds up no one else.

use std::future::Future;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use prost::Message;
use tokio_rustls::rustls::ServerConfig;

use super::{retry_after_secs, Accepted, Admission, Fanout, Refusal, RETRY_AFTER};

#[derive(Clone)]
struct AppState {
    fanout: Fanout,
    max_body: usize,
    admission: Admission,
}

/// Authentication and rate limit, before the body is read.
async fn admit(State(state): State<AppState>, req: Request<Body>, next: Next) -> Response {
    let auth = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    match state.admission.admit(auth) {
        // The only await inside is reading the body (the data is handed over synchronously
        // after it), so a timeout never cuts an accepted request short.
        Ok(()) => match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
            Ok(resp) => resp,
            Err(_) => {
                state.admission.log.reject("OTLP/HTTP request timed out", &format_args!("no complete body within {REQUEST_TIMEOUT:?}"));
                (StatusCode::REQUEST_TIMEOUT, [CLOSE], "the request body did not arrive in time").into_response()
            }
        },
        // The body of a refused request is not read, so the connection cannot carry another
        // request: say so, or a client reusing it finds it closed.
        Err(refusal) => ([CLOSE], refusal).into_response(),
    }
}

const CLOSE: (header::HeaderName, &str) = (header::CONNECTION, "close");

/// The HTTP answer to a refusal (OTLP/HTTP spec "Failures"; RFC 6750 §3 for 401, RFC 6585 §4
/// for 429, RFC 9110 §10.2.3 for `Retry-After`).
impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let text = (header::CONTENT_TYPE, "text/plain; charset=utf-8");
        let retry_after = |wait| (header::RETRY_AFTER, retry_after_secs(wait).to_string());
        let message = self.to_string();
        match self {
            Refusal::Unauthenticated(_) => {
                (StatusCode::UNAUTHORIZED, [text, (header::WWW_AUTHENTICATE, "Bearer")], message).into_response()
            }
            Refusal::Throttled(wait) => (StatusCode::TOO_MANY_REQUESTS, [text], [retry_after(wait)], message).into_response(),
            Refusal::Malformed(_) => (StatusCode::BAD_REQUEST, [text], message).into_response(),
            Refusal::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, [text], message).into_response(),
            Refusal::Unsupported(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, [text], message).into_response(),
            Refusal::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, [text], [retry_after(RETRY_AFTER)], message).into_response(),
        }
    }
}

/// An accepted request's answer, in the body's own format.
struct Reply {
    json: bool,
    accepted: Accepted,
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let resp = ExportMetricsServiceResponse { partial_success: self.accepted.partial_success };
        if self.json {
            let body = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{}".to_vec());
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        } else {
            ([(header::CONTENT_TYPE, "application/x-protobuf")], resp.encode_to_vec()).into_response()
        }
    }
}

/// Decompresses `body` per `encoding`, refusing output beyond `max` bytes (an uncompressed
/// body is used as it is: axum's limit already bounds it).
fn decompress(encoding: &str, body: &Bytes, max: usize) -> Result<Bytes, Refusal> {
    let mut out = Vec::new();
    let limit = max as u64 + 1;
    let read = match encoding {
        "" | "identity" => return Ok(body.clone()),
        "gzip" => flate2::read::MultiGzDecoder::new(&body[..]).take(limit).read_to_end(&mut out),
        "zstd" => match zstd::stream::read::Decoder::new(&body[..]) {
            Ok(d) => d.take(limit).read_to_end(&mut out),
            Err(e) => Err(e),
        },
        other => return Err(Refusal::Unsupported(format!("unsupported Content-Encoding {other:?} (gzip, zstd)"))),
    };
    match read {
        Ok(_) if out.len() > max => Err(Refusal::TooLarge(format!("decompressed body exceeds {max} bytes"))),
        Ok(_) => Ok(out.into()),
        Err(e) => Err(Refusal::Malformed(format!("cannot decompress the body: {e}"))),
    }
}

async fn export(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let json = text(&headers, header::CONTENT_TYPE).starts_with("application/json");
    let answer = handle(&state, &headers, json, body);
    state.admission.record(&answer);
    answer.map(|accepted| Reply { json, accepted }).into_response()
}

/// A header's value, lowercase (`""` when absent or not text).
fn text(headers: &HeaderMap, name: header::HeaderName) -> String {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase()
}

fn handle(state: &AppState, headers: &HeaderMap, json: bool, body: Result<Bytes, BytesRejection>) -> Result<Accepted, Refusal> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Refusal::TooLarge(rejection.body_text()),
        _ => Refusal::Malformed(rejection.body_text()),
    })?;
    let (encoding, content_type) = (text(headers, header::CONTENT_ENCODING), text(headers, header::CONTENT_TYPE));
    let raw = decompress(encoding.trim(), &body, state.max_body)?;
    // Data points of a JSON body that the typed decode could not keep (see `decode_json`).
    let mut unreadable = 0;
    let mut accepted = if json {
        let (req, lost) = decode_json(&raw).map_err(Refusal::undecodable)?;
        unreadable = lost;
        state.fanout.accept(req)?
    } else if content_type.starts_with("application/x-protobuf") || content_type.is_empty() {
        state.fanout.accept_protobuf(raw)?
    } else {
        return Err(Refusal::Unsupported(format!("unsupported Content-Type {content_type:?}")));
    };
    if unreadable > 0 {
        accepted.add_rejected(unreadable, format!("{unreadable} data point(s) of the OTLP/JSON body could not be read (a malformed field drops its whole metric in the JSON decoding)"));
    }
    Ok(accepted)
}

/// Decodes an OTLP/JSON body, returning the request and how many data points the JSON held
/// that the request lost.
///
/// Two gaps of the typed (opentelemetry-proto serde) decoding are closed here:
/// - The proto3 JSON mapping writes non-finite doubles as the strings `"NaN"`, `"Infinity"`,
///   `"-Infinity"`, which the typed decoding refuses: such an `asDouble` becomes `0.0` with the
///   attribute `trainmetrics.nonfinite` (the convention of [`crate::decode`]), so the value
///   arrives as sent.
/// - A malformed field inside a metric (e.g. `"timeUnixNano": "-5"`) makes the typed decoding
///   drop the whole metric without an error. Counting `dataPoints` in the JSON first turns that
///   loss into rejected data points in `partial_success`, never a silent 200.
///
/// Errors: the body is not JSON, not a JSON object, or not an `ExportMetricsServiceRequest` at
/// all (400).
pub fn decode_json(raw: &[u8]) -> Result<(ExportMetricsServiceRequest, u64), String> {
    let mut value: serde_json::Value = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    // serde reads a struct from an array too (`[]` would be an empty request): the proto3 JSON
    // mapping of a message is an object.
    if !value.is_object() {
        return Err("an OTLP/JSON body is a JSON object".to_string());
    }
    let mut points = 0u64;
    visit_points(&mut value, &mut points);
    let req: ExportMetricsServiceRequest = serde_json::from_value(value).map_err(|e| e.to_string())?;
    let kept = crate::decode::count_data_points(&req);
    Ok((req, points.saturating_sub(kept)))
}

/// Counts the data points of every `dataPoints` array below `v` and rewrites non-finite
/// `asDouble` strings (see [`decode_json`]). serde_json's recursion limit (128) bounds the depth.
fn visit_points(v: &mut serde_json::Value, points: &mut u64) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if (k == "dataPoints" || k == "data_points") && child.is_array() {
                    if let Value::Array(dps) = child {
                        *points += dps.len() as u64;
                        for dp in dps.iter_mut() {
                            mark_nonfinite(dp);
                        }
                    }
                } else {
                    visit_points(child, points);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                visit_points(item, points);
            }
        }
        _ => {}
    }
}

fn mark_nonfinite(dp: &mut serde_json::Value) {
    use serde_json::Value;
    let Value::Object(map) = dp else { return };
    let key = if map.contains_key("asDouble") { "asDouble" } else { "as_double" };
    let text = match map.get(key) {
        Some(Value::String(t)) if matches!(t.as_str(), "NaN" | "Infinity" | "-Infinity") => t.clone(),
        _ => return,
    };
    map.insert(key.to_string(), Value::from(0.0));
    let attr = serde_json::json!({"key": crate::decode::NONFINITE_ATTRIBUTE, "value": {"stringValue": text}});
    match map.get_mut("attributes") {
        Some(Value::Array(a)) => a.push(attr),
        _ => {
            map.insert("attributes".to_string(), Value::Array(vec![attr]));
        }
    }
}

/// How long a client may take for the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves OTLP/HTTP on `listener` until `shutdown` resolves. `max_body` bounds the body before
/// and after decompression, bytes; `tls`, if set, is required of every connection; `admission`
/// checks every request before its body is read.
///
/// Errors: accepting connections failed (plaintext; with TLS, accept errors are logged and
/// accepting goes on).
pub async fn serve(
    listener: tokio::net::TcpListener,
    fanout: Fanout,
    max_body: usize,
    tls: Option<Arc<ServerConfig>>,
    admission: Admission,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = AppState { fanout, max_body, admission };
    let app = Router::new()
        .route("/v1/metrics", post(export))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(state.clone(), admit))
        .with_state(state.clone());
    serve_connections(listener, app, tls.map(tokio_rustls::TlsAcceptor::from), state.admission, shutdown).await;
    Ok(())
}

/// How long a client may take to send a request's headers (HTTP/1), and its whole request:
/// a connection that stalls is closed, so idle or slow clients cannot hold every file
/// descriptor.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of one request from its headers to the answer (body upload included); past it the
/// answer is 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    admission: Admission,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(30)));
    tokio::pin!(shutdown);
    loop {
        let (tcp, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    admission.log.reject("OTLP/HTTP accept failed", &e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let (acceptor, app, builder, watcher, admission) =
            (acceptor.clone(), app.clone(), builder.clone(), graceful.watcher(), admission.clone());
        tokio::spawn(async move {
            let Some(acceptor) = acceptor else {
                let conn = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app)).into_owned();
                let _ = watcher.watch(conn).await;
                return;
            };
            let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return admission.log.reject("OTLP/HTTP TLS handshake failed", &e),
                Err(_) => return admission.log.reject("OTLP/HTTP TLS handshake failed", &"timed out"),
            };
            let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app)).into_owned();
            let _ = watcher.watch(conn).await;
        });
    }
    // Requests in flight finish (serve bounds the wait); idle keep-alive connections close.
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_body_must_be_an_object() {
        for body in ["[]", "[[]]", "42", "null", "\"text\""] {
            assert_eq!(decode_json(body.as_bytes()).err().as_deref(), Some("an OTLP/JSON body is a JSON object"), "{body}");
        }
        let (req, lost) = decode_json(b"{}").expect("an empty object is an empty request");
        assert_eq!((req.resource_metrics.len(), lost), (0, 0));
    }
}
