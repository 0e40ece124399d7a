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
        Ok(()) => next.run(req).await,
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
    let req = if json {
        serde_json::from_slice::<ExportMetricsServiceRequest>(&raw).map_err(|e| e.to_string())
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
        Ok(partial_success) => {
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
    match tls {
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
        Some(config) => {
            serve_tls(listener, app, config, state.guard, shutdown).await;
            Ok(())
        }
    }
}

async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    config: Arc<ServerConfig>,
    guard: Guard,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = Builder::new(TokioExecutor::new());
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
