//! OTLP/HTTP receiver (axum): `POST /v1/metrics` with a protobuf (`application/x-protobuf`) or
//! JSON (`application/json`) `ExportMetricsServiceRequest`, optionally `Content-Encoding: gzip`
//! or `zstd`. Bodies are limited before and after decompression, so a compression bomb is
//! refused (413) instead of exhausting memory (OTLP/HTTP spec: 400 for bad data, 503 +
//! `Retry-After` to make the client retry).
//!
//! A middleware runs the [`Guard`] before the body is read: a missing or wrong bearer token is
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

use super::{retry_after_secs, Fanout, Guard, Outcome, Refused, RETRY_AFTER};

#[derive(Clone)]
struct AppState {
    fanout: Fanout,
    max_body: usize,
    guard: Guard,
}

/// Authentication and rate limit, before the body is read.
async fn admit(State(state): State<AppState>, req: Request<Body>, next: Next) -> Response {
    let auth = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    // The body of a refused request is not read, so the connection cannot carry another
    // request: say so, or a client reusing it finds it closed.
    let close = (header::CONNECTION, "close");
    match state.guard.admit(auth) {
        // The only await inside is reading the body (the data is handed over synchronously
        // after it), so a timeout never cuts an accepted request short.
        Ok(()) => match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
            Ok(resp) => resp,
            Err(_) => {
                state.guard.log.reject("OTLP/HTTP request timed out", &format_args!("no complete body within {REQUEST_TIMEOUT:?}"));
                (StatusCode::REQUEST_TIMEOUT, [close], "the request body did not arrive in time").into_response()
            }
        },
        Err(e @ Refused::Unauthenticated(_)) => {
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer"), close], e.to_string()).into_response()
        }
        Err(e @ Refused::Throttled(wait)) => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after_secs(wait).to_string().as_str()), close],
            e.to_string(),
        )
            .into_response(),
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], message).into_response()
}

/// Decompresses `body` per `encoding`, refusing output beyond `max` bytes.
fn decompress(encoding: &str, body: &[u8], max: usize) -> Result<Vec<u8>, Box<Response>> {
    let mut out = Vec::new();
    let limit = max as u64 + 1;
    let read = match encoding {
        "" | "identity" => return Ok(body.to_vec()),
        "gzip" => flate2::read::MultiGzDecoder::new(body).take(limit).read_to_end(&mut out),
        "zstd" => match zstd::stream::read::Decoder::new(body) {
            Ok(d) => d.take(limit).read_to_end(&mut out),
            Err(e) => Err(e),
        },
        other => {
            return Err(Box::new(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported Content-Encoding {other:?} (gzip, zstd)"),
            )))
        }
    };
    match read {
        Ok(_) if out.len() > max => {
            Err(Box::new(error(StatusCode::PAYLOAD_TOO_LARGE, format!("decompressed body exceeds {max} bytes"))))
        }
        Ok(_) => Ok(out),
        Err(e) => Err(Box::new(error(StatusCode::BAD_REQUEST, format!("cannot decompress the body: {e}")))),
    }
}

async fn export(State(state): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let resp = handle(&state, &headers, body);
    let outcome = match resp.status() {
        StatusCode::OK if resp.headers().contains_key(PARTIAL) => Outcome::Partial,
        StatusCode::OK => Outcome::Ok,
        StatusCode::SERVICE_UNAVAILABLE => Outcome::Unavailable,
        _ => Outcome::Invalid,
    };
    match outcome {
        Outcome::Ok | Outcome::Partial => state.guard.count(outcome),
        _ => state.guard.reject(outcome, &resp.status()),
    }
    resp
}

/// Internal marker header of a partial success (removed before the answer is sent).
const PARTIAL: &str = "x-trainmetrics-partial";

fn handle(state: &AppState, headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return rejection.into_response(),
    };
    let text = |h| headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let (encoding, content_type) = (text(header::CONTENT_ENCODING), text(header::CONTENT_TYPE));
    let raw = match decompress(encoding.trim(), &body, state.max_body) {
        Ok(raw) => raw,
        Err(resp) => return *resp,
    };
    let json = content_type.starts_with("application/json");
    // Data points of a JSON body that the typed decode could not keep (see `decode_json`).
    let mut unreadable = 0;
    let req = if json {
        decode_json(&raw).map(|(req, lost)| {
            unreadable = lost;
            req
        })
    } else if content_type.starts_with("application/x-protobuf") || content_type.is_empty() {
        ExportMetricsServiceRequest::decode(raw.as_slice()).map_err(|e| e.to_string())
    } else {
        return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("unsupported Content-Type {content_type:?}"));
    };
    let req = match req {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("cannot decode ExportMetricsServiceRequest: {e}")),
    };
    match state.fanout.accept(req) {
        Ok(mut partial_success) => {
            if unreadable > 0 {
                let p = partial_success.get_or_insert_with(Default::default);
                p.rejected_data_points += unreadable as i64;
                let note = format!("{unreadable} data point(s) of the OTLP/JSON body could not be read (a malformed field drops its whole metric in the JSON decoding)");
                p.error_message = if p.error_message.is_empty() { note } else { format!("{note}; {}", p.error_message) };
            }
            let partial = partial_success.is_some();
            let resp = ExportMetricsServiceResponse { partial_success };
            let mut resp = if json {
                let body = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{}".to_vec());
                ([(header::CONTENT_TYPE, "application/json")], body).into_response()
            } else {
                ([(header::CONTENT_TYPE, "application/x-protobuf")], resp.encode_to_vec()).into_response()
            };
            if partial {
                resp.headers_mut().insert(PARTIAL, header::HeaderValue::from_static("1"));
            }
            resp
        }
        Err(busy) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, RETRY_AFTER.as_secs().to_string())],
            busy.to_string(),
        )
            .into_response(),
    }
}

/// Decodes an OTLP/JSON body, returning the request and how many data points the JSON held
/// that the request lost.
///
/// Two gaps of the typed (opentelemetry-proto serde) decoding are closed here:
/// - The proto3 JSON mapping writes non-finite doubles as the strings `"NaN"`, `"Infinity"`,
///   `"-Infinity"`, which the typed decoding refuses: such an `asDouble` becomes `0.0` with the
///   attribute `trainmetrics.nonfinite` (the convention of [`crate::batch`]), so the value
///   arrives as sent.
/// - A malformed field inside a metric (e.g. `"timeUnixNano": "-5"`) makes the typed decoding
///   drop the whole metric without an error. Counting `dataPoints` in the JSON first turns that
///   loss into rejected data points in `partial_success`, never a silent 200.
///
/// Errors: the body is not JSON, or not an `ExportMetricsServiceRequest` at all (400).
pub fn decode_json(raw: &[u8]) -> Result<(ExportMetricsServiceRequest, u64), String> {
    let mut value: serde_json::Value = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    let mut points = 0u64;
    visit_points(&mut value, &mut points);
    let req: ExportMetricsServiceRequest = serde_json::from_value(value).map_err(|e| e.to_string())?;
    let kept = crate::batch::count_data_points(&req);
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
    let attr = serde_json::json!({"key": crate::batch::NONFINITE_ATTRIBUTE, "value": {"stringValue": text}});
    match map.get_mut("attributes") {
        Some(Value::Array(a)) => a.push(attr),
        _ => {
            map.insert("attributes".to_string(), Value::Array(vec![attr]));
        }
    }
}

/// Removes the internal partial-success marker from an answer.
async fn strip_marker(req: Request<Body>, next: Next) -> Response {
    let mut resp = next.run(req).await;
    resp.headers_mut().remove(PARTIAL);
    resp
}

/// How long a client may take for the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves OTLP/HTTP on `listener` until `shutdown` resolves. `max_body` bounds the body before
/// and after decompression, bytes; `tls`, if set, is required of every connection; `guard`
/// checks every request before its body is read.
///
/// Errors: accepting connections failed (plaintext; with TLS, accept errors are logged and
/// accepting goes on).
pub async fn serve(
    listener: tokio::net::TcpListener,
    fanout: Fanout,
    max_body: usize,
    tls: Option<Arc<ServerConfig>>,
    guard: Guard,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = AppState { fanout, max_body, guard };
    let app = Router::new()
        .route("/v1/metrics", post(export))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(state.clone(), admit))
        .layer(axum::middleware::from_fn(strip_marker))
        .with_state(state.clone());
    serve_connections(listener, app, tls.map(tokio_rustls::TlsAcceptor::from), state.guard, shutdown).await;
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
    guard: Guard,
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
                    guard.log.reject("OTLP/HTTP accept failed", &e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let (acceptor, app, builder, watcher, guard) =
            (acceptor.clone(), app.clone(), builder.clone(), graceful.watcher(), guard.clone());
        tokio::spawn(async move {
            let Some(acceptor) = acceptor else {
                let conn = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app)).into_owned();
                let _ = watcher.watch(conn).await;
                return;
            };
            let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return guard.log.reject("OTLP/HTTP TLS handshake failed", &e),
                Err(_) => return guard.log.reject("OTLP/HTTP TLS handshake failed", &"timed out"),
            };
            let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app)).into_owned();
            let _ = watcher.watch(conn).await;
        });
    }
    // Requests in flight finish (serve bounds the wait); idle keep-alive connections close.
    graceful.shutdown().await;
}
