//! Targets: the receivers, in process, with a TensorBoard exporter behind them.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use proptest::prelude::*;
use prost::Message;
use trainmetrics::decode::{count_data_points, DecodeSettings};
use trainmetrics::delivery::{Delivery, DeliverySettings};
use trainmetrics::exporter::tensorboard::{TensorBoardExporter, TensorBoardSettings};
use trainmetrics::exporter::RunOutcome;
use trainmetrics::receiver::Fanout;
use crate::common;
use crate::harness::*;
use crate::strategies::*;


pub(crate) struct Receivers {
    rt: tokio::runtime::Runtime,
    http: String,
    grpc: String,
    delivery: Arc<Delivery>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _logdir: tempfile::TempDir,
}

impl Receivers {
    fn start() -> Receivers {
        let logdir = tempfile::tempdir().expect("tempdir");
        let exporter = TensorBoardExporter::new(TensorBoardSettings { logdir: logdir.path().to_path_buf() });
        let settings = DeliverySettings { queue_size: 1_000_000, ..Default::default() };
        let delivery = Arc::new(Delivery::start("tensorboard", exporter, settings).expect("delivery"));
        let fanout = Fanout::new(vec![delivery.clone()], DecodeSettings::default());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (http, grpc) = rt.block_on(async {
            let h = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let g = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addrs = (h.local_addr().expect("addr").to_string(), g.local_addr().expect("addr").to_string());
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let (mut wait_h, mut wait_g) = (stop_rx.clone(), stop_rx);
            let limit = 4 << 20;
            use trainmetrics::receiver::{Admission, Protocol};
            tokio::spawn(trainmetrics::receiver::http::serve(h, fanout.clone(), limit, None, Admission::open(Protocol::Http), async move {
                let _ = wait_h.changed().await;
            }));
            tokio::spawn(trainmetrics::receiver::grpc::serve(g, fanout, limit, None, Admission::open(Protocol::Grpc), async move {
                let _ = wait_g.changed().await;
            }));
            tokio::spawn(async move {
                let _ = rx.await;
                let _ = stop_tx.send(true);
            });
            addrs
        });
        Receivers { rt, http, grpc, delivery, stop: Some(tx), _logdir: logdir }
    }

    /// Stops the receivers and the exporter; checks that the report adds up.
    fn finish(mut self, expect_received: u64) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let report = self.delivery.shutdown(RunOutcome::Finished, Duration::from_secs(30));
        assert_eq!(report.received, expect_received, "{report}");
        assert_eq!(report.received, report.delivered + report.dropped_total(), "{report}");
        assert_eq!(report.pending, 0, "{report}");
        assert!(report.last_error.is_none(), "{report}");
        self.rt.shutdown_timeout(Duration::from_secs(5));
    }
}

pub(crate) fn compress(encoding: &str, data: &[u8]) -> Vec<u8> {
    match encoding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).expect("gzip");
            e.finish().expect("gzip")
        }
        "zstd" => zstd::stream::encode_all(data, 1).expect("zstd"),
        _ => data.to_vec(),
    }
}

#[derive(Debug, Clone)]
pub(crate) struct HttpCase {
    json: bool,
    encoding: &'static str,
    body: Vec<u8>,
    /// Mutations of the compressed body (corrupt gzip/zstd streams).
    after: Vec<Mutation>,
}

#[test]
fn http_receiver() {
    let seeds = Arc::new(seeds());
    let rx = Receivers::start();
    let agent = ureq::Agent::new_with_config(ureq::Agent::config_builder().http_status_as_error(false).build());
    let url = format!("http://{}/v1/metrics", rx.http);
    let strategy = (any::<bool>(), prop::sample::select(vec!["", "gzip", "zstd"]))
        .prop_flat_map(move |(json, encoding)| {
            let after = if encoding.is_empty() { Just(vec![]).boxed() } else { prop::collection::vec(mutation(), 0..2).boxed() };
            (input_bytes(seeds.clone(), json), after).prop_map(move |(body, after)| HttpCase { json, encoding, body, after })
        });
    // Shrinking replays cases, but only after a failure, so the count is exact when all pass.
    let expect_received = Cell::new(0u64);
    let statuses = std::cell::RefCell::new(BTreeMap::<u16, u64>::new());
    runner("proptest-regressions/fuzz-http_receiver.txt", 5000)
        .run(&strategy, |case| {
            let wire = mutate(compress(case.encoding, &case.body), &case.after);
            let content_type = if case.json { "application/json" } else { "application/x-protobuf" };
            let mut req = agent.post(&url).header("Content-Type", content_type);
            if !case.encoding.is_empty() {
                req = req.header("Content-Encoding", case.encoding);
            }
            let mut resp = req.send(&wire[..]).map_err(|e| TestCaseError::fail(format!("no answer (did the receiver panic?): {e}")))?;
            let status = resp.status().as_u16();
            statuses.borrow_mut().entry(status).and_modify(|n| *n += 1).or_insert(1u64);
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            let decoded = if case.after.is_empty() {
                let local = if case.json {
                    trainmetrics::receiver::http::decode_json(&case.body).ok().map(|(r, _)| r)
                } else {
                    ExportMetricsServiceRequest::decode(case.body.as_slice()).ok()
                };
                Some(local)
            } else {
                None // a corrupted stream may still decompress to something decodable
            };
            match decoded {
                Some(Some(req)) => {
                    prop_assert_eq!(status, 200, "{}", text);
                    expect_received.set(expect_received.get() + count_data_points(&req));
                }
                Some(None) => prop_assert_eq!(status, 400, "{}", text),
                None => {
                    prop_assert!(matches!(status, 200 | 400 | 413), "status {} {}", status, text);
                    if status == 200 {
                        // Count what the receiver took: decompress and decode as it does.
                        let raw = decompress(case.encoding, &wire);
                        let req = if case.json {
                            trainmetrics::receiver::http::decode_json(&raw).ok().map(|(r, _)| r)
                        } else {
                            ExportMetricsServiceRequest::decode(raw.as_slice()).ok()
                        };
                        expect_received.set(expect_received.get() + req.map(|r| count_data_points(&r)).unwrap_or(0));
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    // A run where every body was refused (or accepted) would not test the receiver.
    let statuses = statuses.into_inner();
    assert!(statuses.get(&200).is_some_and(|n| *n > 0) && statuses.get(&400).is_some_and(|n| *n > 0), "{statuses:?}");
    assert!(expect_received.get() > 0);
    rx.finish(expect_received.get());
}

pub(crate) fn decompress(encoding: &str, data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    let _ = match encoding {
        "gzip" => flate2::read::MultiGzDecoder::new(data).take(8 << 20).read_to_end(&mut out),
        "zstd" => zstd::stream::read::Decoder::new(data).and_then(|d| d.take(8 << 20).read_to_end(&mut out)),
        _ => {
            out = data.to_vec();
            Ok(0)
        }
    };
    out
}


#[test]
fn grpc_receiver() {
    use tonic::codec::CompressionEncoding;
    let seeds = Arc::new(seeds());
    let rx = Receivers::start();
    let channel = rx.rt.block_on(async {
        tonic::transport::Channel::from_shared(format!("http://{}", rx.grpc)).expect("uri").connect().await.expect("connect")
    });
    let strategy = (prop::sample::select(vec![0u8, 1, 2]), input_bytes(seeds, false));
    let (accepted, refused) = (Cell::new(0u64), Cell::new(0u64));
    // Shrinking replays cases, but only after a failure, so the count is exact when all pass.
    let expect_received = Cell::new(0u64);
    runner("proptest-regressions/fuzz-grpc_receiver.txt", 5000)
        .run(&strategy, |(compression, bytes)| {
            let answer = rx.rt.block_on(async {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc = match compression {
                    1 => grpc.send_compressed(CompressionEncoding::Gzip),
                    2 => grpc.send_compressed(CompressionEncoding::Zstd),
                    _ => grpc,
                };
                grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
                );
                grpc.unary(tonic::Request::new(bytes.clone()), path, common::RawCodec).await
            });
            match ExportMetricsServiceRequest::decode(bytes.as_slice()) {
                Ok(req) => {
                    accepted.set(accepted.get() + 1);
                    prop_assert!(answer.is_ok(), "a decodable message was refused: {:?}", answer.err());
                    expect_received.set(expect_received.get() + count_data_points(&req));
                }
                Err(_) => {
                    refused.set(refused.get() + 1);
                    let code = answer.as_ref().err().map(|s| s.code());
                    prop_assert_eq!(code, Some(tonic::Code::InvalidArgument), "{:?}", answer);
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(accepted.get() > 0 && refused.get() > 0, "accepted {} refused {}", accepted.get(), refused.get());
    assert!(expect_received.get() > 0);
    rx.finish(expect_received.get());
}
