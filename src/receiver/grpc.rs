//! OTLP/gRPC receiver (tonic): `opentelemetry.proto.collector.metrics.v1.MetricsService/Export`,
//! accepting gzip and zstd (collectors send gzip by default; without it tonic answers
//! `UNIMPLEMENTED`, which the collector treats as permanent and drops the data).
//!
//! The method is served by our own service with a codec that hands over the raw message, so a
//! body that is not an `ExportMetricsServiceRequest` is answered `INVALID_ARGUMENT` with the
//! decode error (the OTLP spec's code for bad data; tonic's prost codec would say `INTERNAL`).
//!
//! Before tonic reads the message, the [`Guard`] checks the bearer token (`UNAUTHENTICATED`)
//! and the rate limit (`RESOURCE_EXHAUSTED` with `RetryInfo`). tonic bounds the message both
//! as sent and after decompression (`max_recv_msg_size_mib`): a larger one is answered
//! `OUT_OF_RANGE` / `RESOURCE_EXHAUSTED` before more than the limit is buffered, so a gzip bomb
//! costs at most the limit in memory. With `tls`, tonic serves TLS (rustls, `ring`).

use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::SERVICE_NAME;
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use prost::bytes::Buf;
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder, EnabledCompressionEncodings};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::security::TlsSettings;
use super::{Fanout, Guard, Outcome, Refused, RETRY_AFTER};

/// gRPC path of the one method.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// Encodes responses with prost; decodes requests to raw bytes (parsed by the handler).
#[derive(Debug, Clone, Copy, Default)]
struct RawRequestCodec;

#[derive(Debug, Clone, Copy, Default)]
struct ResponseEncoder;

#[derive(Debug, Clone, Copy, Default)]
struct RawDecoder;

impl Encoder for ResponseEncoder {
    type Item = ExportMetricsServiceResponse;
    type Error = Status;
    fn encode(&mut self, item: Self::Item, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf).map_err(|e| Status::internal(format!("encoding the response: {e}")))
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; buf.remaining()];
        buf.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

impl Codec for RawRequestCodec {
    type Encode = ExportMetricsServiceResponse;
    type Decode = Vec<u8>;
    type Encoder = ResponseEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> ResponseEncoder {
        ResponseEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// The `Export` method over a [`Fanout`].
#[derive(Debug, Clone)]
struct Export {
    fanout: Fanout,
    guard: Guard,
}

impl tonic::server::UnaryService<Vec<u8>> for Export {
    type Response = ExportMetricsServiceResponse;
    type Future = BoxFuture<Response<Self::Response>, Status>;
    fn call(&mut self, request: Request<Vec<u8>>) -> Self::Future {
        let (fanout, guard) = (self.fanout.clone(), self.guard.clone());
        Box::pin(async move {
            // Refusals are counted from the answer's status in `MetricsServer::call`.
            let req = ExportMetricsServiceRequest::decode(request.get_ref().as_slice())
                .map_err(|e| Status::invalid_argument(format!("cannot decode ExportMetricsServiceRequest: {e}")))?;
            match fanout.accept(req) {
                Ok(partial_success) => {
                    guard.count(if partial_success.is_some() { Outcome::Partial } else { Outcome::Ok });
                    Ok(Response::new(ExportMetricsServiceResponse { partial_success }))
                }
                Err(busy) => Err(Status::with_error_details(
                    Code::Unavailable,
                    busy.to_string(),
                    ErrorDetails::with_retry_info(Some(RETRY_AFTER)),
                )),
            }
        })
    }
}

/// The `MetricsService` as a tower service for tonic's router.
#[derive(Debug, Clone)]
struct MetricsServer {
    export: Export,
    max_message: usize,
}

impl tonic::server::NamedService for MetricsServer {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for MetricsServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != EXPORT_PATH {
            return Box::pin(async { Ok(Status::unimplemented("only MetricsService/Export is served").into_http()) });
        }
        let auth = req.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        match self.export.guard.admit(auth) {
            Ok(()) => {}
            Err(e @ Refused::Unauthenticated(_)) => {
                return Box::pin(async move { Ok(Status::unauthenticated(e.to_string()).into_http()) })
            }
            Err(e @ Refused::Throttled(wait)) => {
                let status = Status::with_error_details(
                    Code::ResourceExhausted,
                    e.to_string(),
                    ErrorDetails::with_retry_info(Some(wait)),
                );
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        let (export, max) = (self.export.clone(), self.max_message);
        Box::pin(async move {
            let mut accept = EnabledCompressionEncodings::default();
            accept.enable(CompressionEncoding::Gzip);
            accept.enable(CompressionEncoding::Zstd);
            let mut grpc = tonic::server::Grpc::new(RawRequestCodec)
                .apply_compression_config(accept, EnabledCompressionEncodings::default())
                .apply_max_message_size_config(Some(max), None);
            let guard = export.guard.clone();
            let resp = grpc.unary(export, req).await;
            // Errors are answered trailers-only, so their status is in the headers; success
            // was counted by the handler (it knows ok from partial).
            let code = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i32>().ok());
            if let Some(code) = code.filter(|c| *c != 0) {
                let code = Code::from_i32(code);
                let outcome = if code == Code::Unavailable { Outcome::Unavailable } else { Outcome::Invalid };
                let message = resp.headers().get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("");
                guard.reject(outcome, &format_args!("{code:?} {}", percent_encoding::percent_decode_str(message).decode_utf8_lossy()));
            }
            Ok(resp)
        })
    }
}

/// How long a client may take for the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves OTLP/gRPC on `listener` until `shutdown` resolves. `max_message` bounds a message
/// before and after decompression, bytes; `tls`, if set, is required of every connection;
/// `guard` checks every request first.
///
/// Errors: the TLS identity was refused or the transport failed (tonic's error).
pub async fn serve(
    listener: tokio::net::TcpListener,
    fanout: Fanout,
    max_message: usize,
    tls: Option<&TlsSettings>,
    guard: Guard,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = tls {
        let mut config = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&t.cert_pem, &t.key_pem))
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        if let Some(ca) = &t.client_ca_pem {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder.tls_config(config)?;
    }
    builder
        .add_service(MetricsServer { export: Export { fanout, guard }, max_message })
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), shutdown)
        .await
}
