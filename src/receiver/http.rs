//! OTLP/HTTP receiver (axum): `POST /v1/metrics` with a protobuf (`application/x-protobuf`) or
//! JSON (`application/json`) `ExportMetricsServiceRequest`, optionally `Content-Encoding: gzip`
//! or `zstd`. Bodies are limited before and after decompression, so a compression bomb is
//! refused (413) instead of exhausting memory (OTLP/HTTP spec: 400 for bad data, 503 +
//! `Retry-After` to make the client retry).

use std::future::Future;
use std::io::Read;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use prost::Message;

use super::{Fanout, RETRY_AFTER};

#[derive(Clone)]
struct AppState {
    fanout: Fanout,
    max_body: usize,
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

async fn export(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
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
            let resp = ExportMetricsServiceResponse { partial_success };
            if json {
                let body = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{}".to_vec());
                ([(header::CONTENT_TYPE, "application/json")], body).into_response()
            } else {
                ([(header::CONTENT_TYPE, "application/x-protobuf")], resp.encode_to_vec()).into_response()
            }
        }
        Err(busy) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, RETRY_AFTER.as_secs().to_string())],
            busy.to_string(),
        )
            .into_response(),
    }
}

/// Serves OTLP/HTTP on `listener` until `shutdown` resolves. `max_body` bounds the body before
/// and after decompression, bytes.
///
/// Errors: accepting connections failed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    fanout: Fanout,
    max_body: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/metrics", post(export))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(AppState { fanout, max_body });
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
