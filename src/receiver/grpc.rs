//! OTLP/gRPC receiver (tonic): `opentelemetry.proto.collector.metrics.v1.MetricsService/Export`,
//! accepting gzip and zstd (collectors send gzip by default; without it tonic answers
//! `UNIMPLEMENTED`, which the collector treats as permanent and drops the data).
//!
//! The method is served by our own service with a codec that hands over the raw message, so a
//! body that is not an `ExportMetricsServiceRequest` is answered `INVALID_ARGUMENT` with the
//! decode error (the OTLP spec's code for bad data; tonic's prost codec would say `INTERNAL`).
//!
//! Before tonic reads the message, the [`Admission`] checks the bearer token (`UNAUTHENTICATED`)
//! and the rate limit (`RESOURCE_EXHAUSTED` with `RetryInfo`). tonic bounds the message both
//! as sent and after decompression (`max_recv_msg_size_mib`): a larger one is refused before more
//! than the limit is buffered, so a gzip bomb costs at most the limit in memory. What tonic
//! refuses itself is answered from our [`Refusal`]: too large → `RESOURCE_EXHAUSTED` without
//! `RetryInfo` (not retried, OTLP spec), a broken frame or compression → `INVALID_ARGUMENT`.
//! With `tls`, tonic serves TLS (rustls, `ring`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::SERVICE_NAME;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse;
use prost::bytes::Buf;
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder, EnabledCompressionEncodings};
use tonic::codegen::{http, Body, BoxFuture, Service, StdError};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::security::TlsSettings;
use super::{Accepted, Admission, Fanout, Refusal, RETRY_AFTER};

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

/// The gRPC answer to a refusal (OTLP/gRPC spec "Failures": `UNAVAILABLE` is retried, and
/// `RESOURCE_EXHAUSTED` only with `RetryInfo`).
impl From<Refusal> for Status {
    fn from(refusal: Refusal) -> Status {
        let retry = |code, wait| Status::with_error_details(code, refusal.to_string(), ErrorDetails::with_retry_info(Some(wait)));
        match &refusal {
            Refusal::Unauthenticated(_) => Status::unauthenticated(refusal.to_string()),
            Refusal::Throttled(wait) => retry(Code::ResourceExhausted, *wait),
            Refusal::Malformed(m) => Status::invalid_argument(m.clone()),
            Refusal::TooLarge(m) => Status::resource_exhausted(m.clone()),
            Refusal::Unsupported(m) => Status::unimplemented(m.clone()),
            Refusal::Busy(_) => retry(Code::Unavailable, RETRY_AFTER),
        }
    }
}

/// The refusal behind what tonic answered itself, before [`Export`] ran: a message over the
/// size limit (tonic's `OUT_OF_RANGE` as sent, `RESOURCE_EXHAUSTED` decompressed), an
/// unsupported compression (`UNIMPLEMENTED`), a broken frame or body (`INTERNAL` and others).
fn refused_by_tonic(status: &Status) -> Refusal {
    let message = status.message().to_string();
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted => Refusal::TooLarge(message),
        Code::Unimplemented => Refusal::Unsupported(message),
        _ => Refusal::Malformed(message),
    }
}

/// The `Export` method over a [`Fanout`], for one call.
#[derive(Debug, Clone)]
struct Export {
    fanout: Fanout,
    admission: Admission,
    /// Set when this call's answer was recorded, so what tonic answers without calling the
    /// method is recorded too (and nothing twice).
    recorded: Arc<AtomicBool>,
}

impl Export {
    fn answer(&self, request: Vec<u8>) -> Result<Accepted, Refusal> {
        self.fanout.accept_protobuf(request.into())
    }
}

impl tonic::server::UnaryService<Vec<u8>> for Export {
    type Response = ExportMetricsServiceResponse;
    type Future = BoxFuture<Response<Self::Response>, Status>;
    fn call(&mut self, request: Request<Vec<u8>>) -> Self::Future {
        let export = self.clone();
        Box::pin(async move {
            let answer = export.answer(request.into_inner());
            export.admission.record(&answer);
            export.recorded.store(true, Ordering::Relaxed);
            let accepted = answer?;
            Ok(Response::new(ExportMetricsServiceResponse { partial_success: accepted.partial_success }))
        })
    }
}

/// The `MetricsService` as a tower service for tonic's router.
#[derive(Debug, Clone)]
struct MetricsServer {
    fanout: Fanout,
    admission: Admission,
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
        if let Err(refusal) = self.admission.admit(auth) {
            return Box::pin(async move { Ok(Status::from(refusal).into_http()) });
        }
        let export = Export { fanout: self.fanout.clone(), admission: self.admission.clone(), recorded: Arc::default() };
        let max = self.max_message;
        Box::pin(async move {
            let mut accept = EnabledCompressionEncodings::default();
            accept.enable(CompressionEncoding::Gzip);
            accept.enable(CompressionEncoding::Zstd);
            let mut grpc = tonic::server::Grpc::new(RawRequestCodec)
                .apply_compression_config(accept, EnabledCompressionEncodings::default())
                .apply_max_message_size_config(Some(max), None);
            let (admission, recorded) = (export.admission.clone(), export.recorded.clone());
            let resp = grpc.unary(export, req).await;
            if recorded.load(Ordering::Relaxed) {
                return Ok(resp);
            }
            // tonic refused the message before `Export` ran; its answer is trailers-only, so the
            // status is in the headers. Answered from our refusal instead: tonic's codes for
            // these (OUT_OF_RANGE, INTERNAL) would make a collector retry data that can never
            // be taken, or misname a client's fault.
            match Status::from_header_map(resp.headers()).filter(|s| s.code() != Code::Ok) {
                Some(status) => {
                    let refusal = refused_by_tonic(&status);
                    admission.record(&Err(refusal.clone()));
                    Ok(Status::from(refusal).into_http())
                }
                None => Ok(resp),
            }
        })
    }
}

/// How long a client may take for the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves OTLP/gRPC on `listener` until `shutdown` resolves. `max_message` bounds a message
/// before and after decompression, bytes; `tls`, if set, is required of every connection;
/// `admission` checks every request first.
///
/// Errors: the TLS identity was refused or the transport failed (tonic's error).
pub async fn serve(
    listener: tokio::net::TcpListener,
    fanout: Fanout,
    max_message: usize,
    tls: Option<&TlsSettings>,
    admission: Admission,
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
        .add_service(MetricsServer { fanout, admission, max_message })
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), shutdown)
        .await
}
