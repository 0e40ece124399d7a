//! OTLP/gRPC receiver (tonic): `opentelemetry.proto.collector.metrics.v1.MetricsService/Export`,
//! accepting gzip and zstd (collectors send gzip by default; without it tonic answers
//! `UNIMPLEMENTED`, which the collector treats as permanent and drops the data).

use std::future::Future;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{MetricsService, MetricsServiceServer};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use tonic::codec::CompressionEncoding;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::{Fanout, RETRY_AFTER};

#[derive(Debug)]
struct Receiver {
    fanout: Fanout,
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        match self.fanout.accept(request.into_inner()) {
            Ok(partial_success) => Ok(Response::new(ExportMetricsServiceResponse { partial_success })),
            Err(busy) => Err(Status::with_error_details(
                Code::Unavailable,
                busy.to_string(),
                ErrorDetails::with_retry_info(Some(RETRY_AFTER)),
            )),
        }
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
    let service = MetricsServiceServer::new(Receiver { fanout })
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(max_message);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), shutdown)
        .await
}
