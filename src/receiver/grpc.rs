//! OTLP/gRPC receiver (tonic): `opentelemetry.proto.collector.metrics.v1.MetricsService/Export`,
//! accepting gzip and zstd (collectors send gzip by default; without it tonic answers
//! `UNIMPLEMENTED`, which the collector treats as permanent and drops the data).
//!
//! The method is served by our own service with a codec that hands over the raw message, so a
//! body that is not an `ExportMetricsServiceRequest` is answered `INVALID_ARGUMENT` with the
//! decode error (the OTLP spec's code for bad data; tonic's prost codec would say `INTERNAL`).

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

use super::{Fanout, RETRY_AFTER};

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
}

impl tonic::server::UnaryService<Vec<u8>> for Export {
    type Response = ExportMetricsServiceResponse;
    type Future = BoxFuture<Response<Self::Response>, Status>;
    fn call(&mut self, request: Request<Vec<u8>>) -> Self::Future {
        let fanout = self.fanout.clone();
        Box::pin(async move {
            let req = ExportMetricsServiceRequest::decode(request.get_ref().as_slice())
                .map_err(|e| Status::invalid_argument(format!("cannot decode ExportMetricsServiceRequest: {e}")))?;
            match fanout.accept(req) {
                Ok(partial_success) => Ok(Response::new(ExportMetricsServiceResponse { partial_success })),
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
        let (export, max) = (self.export.clone(), self.max_message);
        Box::pin(async move {
            let mut accept = EnabledCompressionEncodings::default();
            accept.enable(CompressionEncoding::Gzip);
            accept.enable(CompressionEncoding::Zstd);
            let mut grpc = tonic::server::Grpc::new(RawRequestCodec)
                .apply_compression_config(accept, EnabledCompressionEncodings::default())
                .apply_max_message_size_config(Some(max), None);
            Ok(grpc.unary(export, req).await)
        })
    }
}

/// Serves OTLP/gRPC on `listener` until `shutdown` resolves. `max_message` bounds a decoded
/// message, bytes.
///
/// Errors: the transport failed (tonic's error).
pub async fn serve(
    listener: tokio::net::TcpListener,
    fanout: Fanout,
    max_message: usize,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(MetricsServer { export: Export { fanout }, max_message })
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), shutdown)
        .await
}
