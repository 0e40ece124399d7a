//! Fuzzing on stable Rust (proptest), bounded so it runs in CI: every OTLP entry point and the
//! mapping to TensorBoard and MLflow.
//!
//! Targets (one test each):
//! - `grpc_message_decode`: the receiver's gRPC path decodes the raw message with prost
//!   (`src/receiver/grpc.rs`); random bytes and mutated seeds go through that decode and, when it
//!   succeeds, through the decoder.
//! - `json_body_decode`: the HTTP receiver's JSON decode (serde), the same way.
//! - `http_receiver`: a real in-process OTLP/HTTP receiver (`receiver::http::serve`), bodies in
//!   protobuf or JSON, identity, gzip or zstd, mutated before and after compression.
//! - `grpc_receiver`: a real in-process OTLP/gRPC receiver (`receiver::grpc::serve`) with raw
//!   messages sent uncompressed, gzip and zstd.
//! - `generated_requests_to_tensorboard_and_mlflow`: generated `ExportMetricsServiceRequest`s
//!   (every data point type, wrong-length buckets, huge exponential scales/offsets, empty,
//!   unicode and 10 kB names, NaN/±Inf, steps of every type and range, times 0 and `u64::MAX`,
//!   huge attribute sets) through `decode::Decoder` → cadence `Windows` → the real TensorBoard
//!   exporter into a tempdir (event files checked frame by frame) and the MLflow request builder
//!   (keys, values, timestamps, JSON, entity counts and sizes checked against MLflow's rules).
//! - `generated_requests_load_in_tensorboard`: generated cases written into one logdir and read
//!   back with TensorBoard's Python loader and RustBoard: every scalar with its exact step and
//!   float32 value, every histogram point, both loaders agreeing.
//! - `generated_requests_land_in_mlflow`: generated cases through the real MLflow exporter into
//!   the real MLflow server (tests/common): every request accepted, every metric's history equal
//!   to what the cadence wrote (step, value, timestamp).
//!
//! Invariants: no panic; every input data point is accepted into a point or counted in a drop
//! reason (`count_data_points == Decoded::accounted`, and through the cadence `inputs + late`);
//! a decode allocates at most a fixed multiple of the bytes it was given (so nothing allocates
//! for a declared-but-absent length); a receiver answers every body with 200, 400, 413 or 415,
//! and 200 exactly when the body decodes.
//!
//! Bounded by case counts (defaults below; about a minute for all targets on 2 cores, with the
//! MLflow server's start).
//! Run longer: `PROPTEST_CASES=20000 cargo test --locked --test fuzz` (every target gets that
//! many cases). Seeds are `tests/fuzz-corpus/otlp/*.json` (written for this project) and their
//! protobuf encodings `*.binpb`, plus opentelemetry-proto's own `examples/metrics.json` read
//! from cargo's registry. Failures proptest finds are persisted in
//! `proptest-regressions/fuzz-<target>.txt` (commit them) and replayed first on every run;
//! inputs found so far are also named tests at the end of this file.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    exponential_histogram_data_point::Buckets, metric, number_data_point, summary_data_point::ValueAtQuantile,
    ExponentialHistogram, ExponentialHistogramDataPoint, Gauge, Histogram, HistogramDataPoint, Metric,
    NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, Summary, SummaryDataPoint,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use prost::Message;
use serde_json::Value;
use trainmetrics::decode::{count_data_points, DecodeSettings, Decoded, Decoder, NonFinitePolicy};
use trainmetrics::cadence::{Aggregation, CadenceSettings, Close, Windows};
use trainmetrics::delivery::{Delivery, DeliverySettings};
use trainmetrics::exporter::mlflow::request_builder::{self, MAX_BODY_BYTES, MAX_ENTITIES, MAX_METRICS};
use trainmetrics::exporter::tensorboard::{TensorBoardExporter, TensorBoardSettings};
use trainmetrics::exporter::{Exporter, RunOutcome};
use trainmetrics::names::{MlflowKeys, MLFLOW_MAX_KEY_CHARS};
use trainmetrics::receiver::Fanout;

// ---------------------------------------------------------------------------------------------
// Allocation accounting: per thread, so parallel tests do not disturb each other.

struct CountingAlloc;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add_signed(delta);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Runs `f` and returns its result and the most bytes it had allocated at once on this thread.
fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    (out, PEAK.with(Cell::get).saturating_sub(start))
}

/// The most a decode of `input` bytes may allocate: decoded structs are larger than their wire
/// form (a 2-byte empty message becomes a struct of ~200 bytes, Vecs grow by doubling; a data
/// point of ~11 bytes carries a series name of up to 1 KiB), but never more than this factor.
fn allocation_bound(input: usize) -> usize {
    512 * input + (1 << 20)
}

// ---------------------------------------------------------------------------------------------
// Config and corpus.

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn runner(target: &'static str, default_cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases: cases(default_cases),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(target))),
        max_shrink_iters: 2000,
        ..Config::default()
    })
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `examples/metrics.json` of opentelemetry-proto, from cargo's registry (not copied here).
fn official_example() -> Vec<u8> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .expect("CARGO_HOME or HOME");
    let src = home.join("registry/src");
    let path = std::fs::read_dir(&src)
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("opentelemetry-proto-0.33.1/src/proto/opentelemetry-proto/examples/metrics.json"))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("missing component: opentelemetry-proto 0.33.1's examples/metrics.json under {}", src.display()));
    std::fs::read(path).expect("read the official example")
}

/// Seeds: (JSON bytes, protobuf bytes) of every valid request in the corpus.
fn seeds() -> Vec<(Vec<u8>, Vec<u8>)> {
    let dir = root().join("tests/fuzz-corpus/otlp");
    let mut jsons = vec![official_example()];
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("missing component: the fuzz corpus {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "missing component: no seeds in {}", dir.display());
    for p in &names {
        jsons.push(std::fs::read(p).expect("read seed"));
    }
    jsons
        .into_iter()
        .map(|j| {
            let req: ExportMetricsServiceRequest = serde_json::from_slice(&j).expect("a seed is a valid OTLP JSON request");
            (j, req.encode_to_vec())
        })
        .collect()
}

/// Keeps `*.binpb` beside each JSON seed current (the protobuf seeds in the corpus), and checks
/// that the committed ones are what the JSON encodes to.
#[test]
fn corpus_protobuf_seeds_match_their_json() {
    let dir = root().join("tests/fuzz-corpus/otlp");
    for entry in std::fs::read_dir(&dir).expect("corpus dir").flatten() {
        let p = entry.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let req: ExportMetricsServiceRequest = serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("valid seed");
        let bin = p.with_extension("binpb");
        if std::env::var_os("FUZZ_WRITE_CORPUS").is_some() {
            std::fs::write(&bin, req.encode_to_vec()).expect("write seed");
        }
        let stored = std::fs::read(&bin).unwrap_or_else(|e| panic!("missing {} (FUZZ_WRITE_CORPUS=1 writes it): {e}", bin.display()));
        assert_eq!(ExportMetricsServiceRequest::decode(stored.as_slice()).expect("decodes"), req, "{}", bin.display());
    }
}

// ---------------------------------------------------------------------------------------------
// Byte-level mutations of valid requests.

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    /// Overwrite with a large varint (a declared length or count that is not there).
    BigVarint(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::BigVarint),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut data: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let n = data.len().max(1);
        match *m {
            Mutation::Flip(i, b) if !data.is_empty() => data[i % n] ^= b,
            Mutation::Insert(i, b) => data.insert(i % (data.len() + 1), b),
            Mutation::Delete(i) if !data.is_empty() => {
                data.remove(i % n);
            }
            Mutation::BigVarint(i) => {
                // 2^60 as a varint.
                let at = i % (data.len() + 1);
                let v = [0x80u8, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10];
                data.splice(at..(at + v.len()).min(data.len()), v);
            }
            Mutation::Truncate(i) => data.truncate(i % n),
            _ => {}
        }
    }
    data
}

/// Bytes: random, or a seed (protobuf when `json` is false) with a few mutations.
fn input_bytes(seeds: Arc<Vec<(Vec<u8>, Vec<u8>)>>, json: bool) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..512),
        4 => (0..n, prop::collection::vec(mutation(), 0..6)).prop_map(move |(i, ms)| {
            let seed = if json { &seeds[i].0 } else { &seeds[i].1 };
            mutate(seed.clone(), &ms)
        }),
        // Generated requests, whole (JSON cannot carry NaN/±Inf as numbers: those fail to
        // serialize and are sent as protobuf anyway, which the JSON decode then refuses).
        2 => request_strategy().prop_map(move |r| if json { serde_json::to_vec(&r).unwrap_or_else(|_| r.encode_to_vec()) } else { r.encode_to_vec() }),
    ]
}

/// Decodes a request twice with one decoder (the second pass exercises the decoder's state) and
/// checks that every data point is accounted for.
fn check_decoder(req: &ExportMetricsServiceRequest, settings: DecodeSettings) -> Vec<Decoded> {
    let mut d = Decoder::new(settings);
    let total = count_data_points(req);
    (0..2)
        .map(|_| {
            let out = d.decode(req);
            assert_eq!(out.accounted(), total, "accepted + dropped {:?} = data points", out.dropped);
            for rp in &out.runs {
                for p in &rp.points {
                    assert!(p.series.len() <= trainmetrics::names::MAX_SERIES_NAME_BYTES, "series name of {} bytes", p.series.len());
                    assert_ne!(p.time_unix_nano, 0, "time 0 becomes the receive time");
                }
            }
            out
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Targets: decode paths.

#[test]
fn grpc_message_decode() {
    let seeds = Arc::new(seeds());
    runner("proptest-regressions/fuzz-grpc_message_decode.txt", 50_000)
        .run(&input_bytes(seeds, false), |bytes| {
            let (req, peak) = peak_allocation(|| ExportMetricsServiceRequest::decode(bytes.as_slice()));
            prop_assert!(peak <= allocation_bound(bytes.len()), "decode of {} bytes allocated {peak}", bytes.len());
            if let Ok(req) = req {
                let (_, peak) = peak_allocation(|| check_decoder(&req, DecodeSettings::default()));
                prop_assert!(peak <= allocation_bound(bytes.len()), "batch decode of {} bytes allocated {peak}", bytes.len());
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn json_body_decode() {
    let seeds = Arc::new(seeds());
    runner("proptest-regressions/fuzz-json_body_decode.txt", 50_000)
        .run(&input_bytes(seeds, true), |bytes| {
            let (req, peak) = peak_allocation(|| trainmetrics::receiver::http::decode_json(&bytes).map(|(r, _)| r));
            prop_assert!(peak <= allocation_bound(bytes.len()), "JSON decode of {} bytes allocated {peak}", bytes.len());
            if let Ok(req) = req {
                check_decoder(&req, DecodeSettings::default());
            }
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Targets: the receivers, in process, with a TensorBoard exporter behind them.

struct Receivers {
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

fn compress(encoding: &str, data: &[u8]) -> Vec<u8> {
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
struct HttpCase {
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

fn decompress(encoding: &str, data: &[u8]) -> Vec<u8> {
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

// ---------------------------------------------------------------------------------------------
// Generated requests through decode, cadence, TensorBoard and the MLflow request builder.

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("loss".to_string()),
        2 => "[a-z]{1,3}(\\.[a-z]{1,3}){0,2}".prop_map(|s| s),
        1 => Just(String::new()),
        2 => prop::collection::vec(any::<char>(), 0..12).prop_map(|v| v.into_iter().collect()),
        1 => prop::sample::select(vec!["acc@1", "a/../b", "./x", "//", "..", "é\u{301}", "x/split=val", "%2F", "\0"]).prop_map(str::to_string),
        1 => prop::sample::select(vec![10_000usize, 300, 251, 1025]).prop_map(|n| "λ".repeat(n / 2)),
    ]
}

fn any_value() -> impl Strategy<Value = any_value::Value> {
    use any_value::Value as V;
    prop_oneof![
        any::<i64>().prop_map(V::IntValue),
        special_f64().prop_map(V::DoubleValue),
        text().prop_map(V::StringValue),
        any::<bool>().prop_map(V::BoolValue),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(V::BytesValue),
    ]
}

fn special_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => -1e6..1e6f64,
        2 => any::<f64>(),
        1 => prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, f64::MAX, f64::MIN, -0.0, 1e30, f64::MIN_POSITIVE, 3.5e38]),
    ]
}

fn step() -> impl Strategy<Value = Option<any_value::Value>> {
    use any_value::Value as V;
    prop_oneof![
        6 => (0..50i64).prop_map(|s| Some(V::IntValue(s))),
        1 => Just(None),
        1 => any::<i64>().prop_map(|s| Some(V::IntValue(s))),
        1 => (-5..5i64).prop_map(|s| Some(V::IntValue(s))),
        1 => prop::sample::select(vec![1e30, -1e30, 7.0, 7.5, f64::NAN, 9.3e18, -9_223_372_036_854_775_808.0]).prop_map(|d| Some(V::DoubleValue(d))),
        1 => prop::sample::select(vec!["99999999999999999999", "-99999999999999999999", " 42 ", "7.0", "1e30", "abc", "", "-3"])
            .prop_map(|s| Some(V::StringValue(s.into()))),
        1 => any::<bool>().prop_map(|b| Some(V::BoolValue(b))),
    ]
}

fn kv(key: impl Into<String>, v: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

fn attributes() -> impl Strategy<Value = Vec<KeyValue>> {
    use any_value::Value as V;
    let special = prop_oneof![
        Just(kv("trainmetrics.nonfinite", V::StringValue("NaN".into()))),
        Just(kv("trainmetrics.nonfinite", V::StringValue("-Infinity".into()))),
        Just(kv("trainmetrics.nonfinite", V::StringValue("bogus".into()))),
        text().prop_map(|n| kv("trainmetrics.name", V::StringValue(n))),
        prop::sample::select(vec![0i64, -1, i64::MAX, 1_700_000_000_000_000_000]).prop_map(|t| kv("trainmetrics.time_unix_nano", V::IntValue(t))),
        Just(kv("otel.metric.overflow", V::BoolValue(true))),
    ];
    let extra = prop::collection::vec((text(), any_value()).prop_map(|(k, v)| kv(k, v)), 0..3);
    let huge = prop_oneof![9 => Just(0usize), 1 => Just(500usize)];
    (step(), prop::option::weighted(0.15, special), extra, huge).prop_map(|(step, special, mut extra, huge)| {
        if let Some(s) = step {
            extra.push(kv("step", s));
        }
        extra.extend(special);
        extra.extend((0..huge).map(|i| kv(format!("k{i}"), V::IntValue(i as i64))));
        extra
    })
}

fn time() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0..1_000_000_000u64).prop_map(|d| 1_790_000_000_000_000_000 + d),
        1 => Just(0u64),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn flags() -> impl Strategy<Value = u32> {
    prop_oneof![9 => Just(0u32), 1 => Just(1u32)]
}

fn number_points() -> impl Strategy<Value = Vec<NumberDataPoint>> {
    let value = prop_oneof![
        4 => special_f64().prop_map(|d| Some(number_data_point::Value::AsDouble(d))),
        1 => any::<i64>().prop_map(|i| Some(number_data_point::Value::AsInt(i))),
        1 => Just(None),
    ];
    prop::collection::vec(
        (attributes(), time(), value, flags()).prop_map(|(attributes, time_unix_nano, value, flags)| NumberDataPoint {
            attributes,
            time_unix_nano,
            value,
            flags,
            ..Default::default()
        }),
        0..4,
    )
}

fn count() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0..10u64, 1 => Just(u64::MAX), 1 => any::<u64>()]
}

fn histogram_points() -> impl Strategy<Value = Vec<HistogramDataPoint>> {
    let dp = (
        attributes(),
        time(),
        flags(),
        prop::collection::vec(count(), 0..6),
        prop::collection::vec(special_f64(), 0..6),
        any::<bool>(),
        prop::option::of(special_f64()),
        prop::option::of(special_f64()),
    )
        .prop_map(|(attributes, time_unix_nano, flags, counts, mut bounds, consistent, sum, min)| {
            let mut count = counts.iter().fold(0u64, |a, c| a.wrapping_add(*c));
            if consistent {
                // Valid shape: bounds + 1 counts, strictly increasing, count = Σ counts.
                let n = counts.len().saturating_sub(1);
                bounds = (0..n).map(|i| i as f64 * 1.5).collect();
                if counts.iter().try_fold(0u64, |a, c| a.checked_add(*c)).is_none() {
                    count = 0;
                }
            }
            HistogramDataPoint {
                attributes,
                time_unix_nano,
                flags,
                count,
                sum,
                bucket_counts: counts,
                explicit_bounds: bounds,
                min,
                max: None,
                ..Default::default()
            }
        });
    prop::collection::vec(dp, 0..3)
}

fn exponential_points() -> impl Strategy<Value = Vec<ExponentialHistogramDataPoint>> {
    let scale = prop_oneof![4 => -10..=20i32, 1 => any::<i32>(), 1 => prop::sample::select(vec![i32::MIN, i32::MAX, 21, -11])];
    let offset = prop_oneof![4 => -50..50i32, 1 => any::<i32>(), 1 => prop::sample::select(vec![i32::MIN, i32::MAX])];
    let buckets = (offset, prop_oneof![9 => prop::collection::vec(0..4u64, 0..6), 1 => Just(vec![0u64; 20_000])])
        .prop_map(|(offset, bucket_counts)| Buckets { offset, bucket_counts });
    let dp = (attributes(), time(), flags(), scale, prop::option::of(buckets.clone()), prop::option::of(buckets), 0..3u64, special_f64(), any::<bool>())
        .prop_map(|(attributes, time_unix_nano, flags, scale, positive, negative, zero_count, zero_threshold, consistent)| {
            let sum_of = |b: &Option<Buckets>| b.as_ref().map_or(0u64, |b| b.bucket_counts.iter().sum());
            let count = if consistent { zero_count + sum_of(&positive) + sum_of(&negative) } else { zero_count };
            ExponentialHistogramDataPoint {
                attributes,
                time_unix_nano,
                flags,
                scale,
                positive,
                negative,
                zero_count,
                zero_threshold,
                count,
                sum: Some(1.0),
                ..Default::default()
            }
        });
    prop::collection::vec(dp, 0..3)
}

fn summary_points() -> impl Strategy<Value = Vec<SummaryDataPoint>> {
    let dp = (attributes(), time(), flags(), count(), special_f64(), prop::collection::vec((special_f64(), special_f64()), 0..3))
        .prop_map(|(attributes, time_unix_nano, flags, count, sum, q)| SummaryDataPoint {
            attributes,
            time_unix_nano,
            flags,
            count,
            sum,
            quantile_values: q.into_iter().map(|(quantile, value)| ValueAtQuantile { quantile, value }).collect(),
            ..Default::default()
        });
    prop::collection::vec(dp, 0..3)
}

fn metric_strategy() -> impl Strategy<Value = Metric> {
    let data = prop_oneof![
        3 => number_points().prop_map(|data_points| metric::Data::Gauge(Gauge { data_points })),
        1 => number_points().prop_map(|data_points| metric::Data::Sum(Sum { data_points, ..Default::default() })),
        1 => histogram_points().prop_map(|data_points| metric::Data::Histogram(Histogram { data_points, ..Default::default() })),
        1 => exponential_points().prop_map(|data_points| metric::Data::ExponentialHistogram(ExponentialHistogram { data_points, ..Default::default() })),
        1 => summary_points().prop_map(|data_points| metric::Data::Summary(Summary { data_points })),
    ];
    (text(), prop::option::weighted(0.95, data)).prop_map(|(name, data)| Metric { name, data, ..Default::default() })
}

fn request_strategy() -> impl Strategy<Value = ExportMetricsServiceRequest> {
    use any_value::Value as V;
    let run = prop_oneof![
        3 => prop::sample::select(vec!["a", "b"]).prop_map(|n| vec![kv("ml.run.name", V::StringValue(n.into()))]),
        1 => text().prop_map(|n| vec![kv("ml.run.id", V::StringValue(n)), kv("ml.param.lr", V::DoubleValue(0.1))]),
        1 => Just(vec![]),
        1 => Just((0..300).map(|i| kv(format!("attr.{i}"), V::StringValue("x".repeat(40)))).collect()),
        1 => prop::collection::vec((text(), any_value()), 0..4).prop_map(|ps| {
            let mut attrs = vec![kv("ml.run.name", V::StringValue("p".into()))];
            attrs.extend(ps.iter().map(|(k, v)| kv(format!("ml.param.{k}"), v.clone())));
            attrs.extend(ps.into_iter().map(|(k, v)| kv(&k, v)));
            attrs
        }),
    ];
    let resource = (run, prop::collection::vec(prop::collection::vec(metric_strategy(), 0..4), 1..3)).prop_map(|(attributes, scopes)| {
        ResourceMetrics {
            resource: Some(Resource { attributes, ..Default::default() }),
            scope_metrics: scopes.into_iter().map(|metrics| ScopeMetrics { metrics, ..Default::default() }).collect(),
            ..Default::default()
        }
    });
    prop::collection::vec(resource, 0..3).prop_map(|resource_metrics| ExportMetricsServiceRequest { resource_metrics })
}

fn settings_strategy() -> impl Strategy<Value = (DecodeSettings, CadenceSettings)> {
    (
        prop::sample::select(vec![NonFinitePolicy::Keep, NonFinitePolicy::Drop, NonFinitePolicy::Clamp]),
        prop::sample::select(vec![2usize, 10_000]),
        prop::sample::select(vec![1usize, 1_000]),
        prop::sample::select(vec![Some(1u64), Some(100), None]),
        prop::sample::select(vec![Aggregation::Last, Aggregation::Mean, Aggregation::Min, Aggregation::Max, Aggregation::Sum]),
    )
        .prop_map(|(nonfinite, max_series_per_run, max_runs, every_steps, aggregation)| {
            let decode = DecodeSettings { nonfinite, max_series_per_run, max_runs, ..Default::default() };
            let interval = every_steps.is_none().then(|| Duration::from_secs(30));
            (decode, CadenceSettings { every_steps, interval, aggregation, ..Default::default() })
        })
}

/// MLflow's key rules (mlflow/utils/validation.py): `^[/\w.\- :]*$` with Unicode `\w`, at most
/// 250 characters, a normalized relative path.
fn valid_mlflow_key(k: &str) -> bool {
    use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};
    let chars_ok = k.chars().all(|c| {
        if c.is_ascii() {
            c.is_ascii_alphanumeric() || "_-. :/".contains(c)
        } else {
            matches!(c.general_category_group(), GeneralCategoryGroup::Letter | GeneralCategoryGroup::Number)
        }
    });
    let path_ok = !k.is_empty()
        && !k.starts_with('/')
        && !k.starts_with("..")
        && k.split('/').all(|s| !s.is_empty() && s != "." && s != "..");
    chars_ok && path_ok && k.chars().count() <= MLFLOW_MAX_KEY_CHARS
}

/// Checks the TFRecord framing and CRCs of every event file under `dir`; returns records read.
fn check_event_files(dir: &Path) -> usize {
    use trainmetrics::exporter::tensorboard::record::masked_crc32c;
    let mut records = 0;
    // An exporter that wrote nothing has not created its logdir.
    let mut stack: Vec<PathBuf> = dir.exists().then(|| dir.to_path_buf()).into_iter().collect();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if !p.file_name().is_some_and(|n| n.to_string_lossy().contains("tfevents")) {
                continue;
            }
            let data = std::fs::read(&p).expect("read event file");
            let mut at = 0;
            while at < data.len() {
                assert!(at + 12 <= data.len(), "truncated header in {}", p.display());
                let len_bytes = &data[at..at + 8];
                let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
                let crc = u32::from_le_bytes(data[at + 8..at + 12].try_into().expect("4 bytes"));
                assert_eq!(crc, masked_crc32c(len_bytes), "length CRC in {}", p.display());
                let body = &data[at + 12..at + 12 + len];
                let crc = u32::from_le_bytes(data[at + 12 + len..at + 16 + len].try_into().expect("4 bytes"));
                assert_eq!(crc, masked_crc32c(body), "data CRC in {}", p.display());
                at += 16 + len;
                records += 1;
            }
        }
    }
    records
}

/// What one case wrote to TensorBoard: scalar and histogram points (one per window).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Shown {
    scalars: usize,
    histograms: usize,
}

/// Scalars as TensorBoard should show them: (run dir relative to the root, tag) → [(step,
/// float32 value as `{:?}` of f64)].
type Expected = BTreeMap<(String, String), Vec<(i64, String)>>;

/// One generated case through decode (twice, as a collector's retry), cadence, the TensorBoard exporter into `logdir`
/// and the MLflow request builder, with every check; returns what TensorBoard should show.
fn pipeline_case(
    req: &ExportMetricsServiceRequest,
    decode: DecodeSettings,
    cadence: CadenceSettings,
    logdir: &Path,
    root: &Path,
    expected: &mut Expected,
) -> Result<Shown, TestCaseError> {
    // The protobuf form decodes back to a request with the same encoding (proto3 writes
    // -0.0 as the default 0.0, so the structs may differ in the sign of a zero).
    let bin = req.encode_to_vec();
    let again = ExportMetricsServiceRequest::decode(bin.as_slice()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(again.encode_to_vec() == bin);

    let mut tb = TensorBoardExporter::new(TensorBoardSettings { logdir: logdir.to_path_buf() });
    let mut windows = Windows::new(cadence, Instant::now());
    let mut decoder = Decoder::new(decode);
    let mut keys: BTreeMap<String, MlflowKeys> = BTreeMap::new();
    let (mut accepted, mut late, mut written, mut duplicate) = (0u64, 0u64, 0u64, 0u64);
    let mut shown = Shown::default();
    for _ in 0..2 {
        let out = decoder.decode(req);
        prop_assert_eq!(out.accounted(), count_data_points(req));
        for rp in out.runs {
            accepted += rp.points.len() as u64;
            tb.observe_run(&rp.run);
            late += windows.push(rp, Instant::now());
        }
        // The second decode is a retried request: its points repeat the first's.
        duplicate += windows.take_duplicates();
    }
    for batch in windows.take_ready(Instant::now(), Close::All) {
        written += batch.inputs();
        let exported = tb.export(&batch, Duration::from_secs(10)).map_err(|e| TestCaseError::fail(format!("TensorBoard export: {e}")))?;
        prop_assert!(exported.refused.is_empty(), "{:?}", exported.refused);
        let run = tb.run_dir(&batch.run).strip_prefix(root).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        for p in &batch.points {
            if p.histogram.is_some() {
                shown.histograms += 1;
            } else {
                shown.scalars += 1;
                // TensorBoard's scalars are float32 (the exporter's documented conversion).
                let shown_value = format!("{:?}", f64::from(p.scalar as f32));
                expected.entry((run.clone(), p.series.to_string())).or_default().push((p.step, shown_value));
            }
        }
        // What the MLflow exporter sends for this batch, built the same way.
        let run_keys = keys.entry(batch.run.key.clone()).or_default();
        let metrics: Vec<Value> = batch
            .points
            .iter()
            .map(|p| {
                let key = run_keys.key_for(&p.series).key;
                let ts = i64::try_from(p.time_unix_nano / 1_000_000).unwrap_or(i64::MAX);
                request_builder::metric(&key, p.scalar, ts, p.step)
            })
            .collect();
        // Params and tags as the MLflow exporter maps them: keys valid, values cut.
        let mut param_keys = MlflowKeys::default();
        let mut tag_keys = MlflowKeys::default();
        let params: Vec<Value> = batch
            .run
            .params
            .iter()
            .map(|(k, v)| request_builder::key_value(&param_keys.key_for(k).key, &request_builder::truncate_chars(v, request_builder::MAX_PARAM_VALUE_CHARS).0))
            .collect();
        let tags: Vec<Value> = batch
            .run
            .tags
            .iter()
            .map(|(k, v)| request_builder::key_value(&tag_keys.key_for(k).key, &request_builder::truncate_chars(v, request_builder::MAX_TAG_VALUE_CHARS).0))
            .collect();
        for body in request_builder::split_log_batch(vec![], params, tags) {
            let json = serde_json::to_string(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(json.len() <= MAX_BODY_BYTES, "body of {} bytes", json.len());
            for kind in ["params", "tags"] {
                for e in body[kind].as_array().into_iter().flatten() {
                    let key = e["key"].as_str().unwrap_or_default();
                    prop_assert!(valid_mlflow_key(key), "invalid MLflow {} key {:?}", kind, key);
                }
            }
        }
        let n = metrics.len();
        let bodies = request_builder::split_log_batch(metrics, vec![], vec![]);
        let mut sent = 0;
        for body in &bodies {
            let ms = body["metrics"].as_array().cloned().unwrap_or_default();
            prop_assert!(ms.len() <= MAX_METRICS && ms.len() <= MAX_ENTITIES);
            let json = serde_json::to_string(body).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(json.len() <= MAX_BODY_BYTES, "body of {} bytes", json.len());
            for m in &ms {
                let key = m["key"].as_str().unwrap_or_default();
                prop_assert!(valid_mlflow_key(key), "invalid MLflow key {:?}", key);
                let v = &m["value"];
                prop_assert!(
                    v.as_f64().is_some_and(f64::is_finite) || ["NaN", "Infinity", "-Infinity"].contains(&v.as_str().unwrap_or("")),
                    "value {}", v
                );
                prop_assert!(m["timestamp"].as_i64().is_some_and(|t| t >= 0), "timestamp {}", m["timestamp"]);
                prop_assert!(m["step"].as_i64().is_some(), "step {}", m["step"]);
            }
            sent += ms.len();
        }
        prop_assert_eq!(sent, n);
    }
    prop_assert_eq!(written + late + duplicate, accepted, "every accepted point is written or counted late or duplicate");
    tb.end_runs(RunOutcome::Finished, Duration::from_secs(10)).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let records = check_event_files(logdir);
    prop_assert!(written == 0 || records > 0, "{} points written but no event records", written);
    Ok(shown)
}

#[test]
fn generated_requests_to_tensorboard_and_mlflow() {
    runner("proptest-regressions/fuzz-generated.txt", 3000)
        .run(&(request_strategy(), settings_strategy()), |(req, (decode, cadence))| {
            let logdir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
            pipeline_case(&req, decode, cadence, logdir.path(), logdir.path(), &mut Expected::new()).map(|_| ())
        })
        .unwrap();
}

/// Generated cases read back with TensorBoard's own loaders (Python and RustBoard): every scalar
/// and histogram point written is shown, scalars with their exact steps and float32 values, and
/// both loaders agree.
#[test]
fn generated_requests_load_in_tensorboard() {
    use proptest::strategy::ValueTree;
    let root = tempfile::tempdir().expect("tempdir");
    let mut runner = TestRunner::deterministic();
    let strategy = (request_strategy(), settings_strategy());
    let mut expected = Shown::default();
    let mut scalars_expected = Expected::new();
    for i in 0..cases(40) {
        let (req, (decode, cadence)) = strategy.new_tree(&mut runner).expect("value").current();
        let dir = root.path().join(format!("case-{i}"));
        let shown = pipeline_case(&req, decode, cadence, &dir, root.path(), &mut scalars_expected).unwrap_or_else(|e| panic!("case {i}: {e}"));
        expected.scalars += shown.scalars;
        expected.histograms += shown.histograms;
    }
    let tb = common::read_tb_both(root.path());
    let scalars: usize = tb.scalars.values().flat_map(|tags| tags.values()).map(Vec::len).sum();
    let histograms: usize = tb.histograms.values().flat_map(|tags| tags.values()).map(Vec::len).sum();
    assert!(expected.scalars > 0 && expected.histograms > 0, "{expected:?}");
    assert_eq!(Shown { scalars, histograms }, expected);
    let mut got = Expected::new();
    for (run, tags) in &tb.scalars {
        for (tag, points) in tags {
            got.insert((run.clone(), tag.clone()), points.iter().map(|(s, v)| (*s, format!("{v:?}"))).collect());
        }
    }
    for points in scalars_expected.values_mut() {
        points.sort_by_key(|p| p.0);
    }
    for points in got.values_mut() {
        points.sort_by_key(|p| p.0);
    }
    assert_eq!(got, scalars_expected);
}

/// A metric value as comparable text, as MLflow's SQL store gives it back: ±Inf as ±f64::MAX
/// (README "Values"), -0.0 as 0.0.
fn mlflow_shown(v: f64) -> String {
    let v = if v == f64::INFINITY {
        f64::MAX
    } else if v == f64::NEG_INFINITY {
        f64::MIN
    } else if v == 0.0 {
        0.0
    } else {
        v
    };
    format!("{v:?}")
}

/// (run key, MLflow key) → {(step, value as [`mlflow_shown`], timestamp ms)}.
type MlflowExpected = BTreeMap<(String, String), std::collections::BTreeSet<(i64, String, i64)>>;

/// Generated cases through the real MLflow exporter into a real MLflow server: every export is
/// accepted (keys, values, steps, timestamps, params and tags within the server's rules), and the
/// history of every metric is what the cadence wrote, exactly.
#[test]
fn generated_requests_land_in_mlflow() {
    use proptest::strategy::ValueTree;
    use std::collections::BTreeSet;
    use trainmetrics::exporter::mlflow::{MlflowExporter, MlflowSettings};
    let uri = common::mlflow_uri();
    let mut runner = TestRunner::deterministic();
    let strategy = (request_strategy(), settings_strategy());
    let mut compared = 0;
    for i in 0..cases(25) {
        let (req, (decode, cadence)) = strategy.new_tree(&mut runner).expect("value").current();
        let experiment = common::unique(&format!("fuzz-{i}"));
        let mut exporter =
            MlflowExporter::new(MlflowSettings { tracking_uri: uri.clone(), authorization: None, experiment, run_id: None, credential_file: None });
        let mut windows = Windows::new(cadence, Instant::now());
        let mut decoder = Decoder::new(decode);
        for _ in 0..2 {
            for rp in decoder.decode(&req).runs {
                exporter.observe_run(&rp.run);
                windows.push(rp, Instant::now());
            }
        }
        let mut expected: MlflowExpected = BTreeMap::new();
        let mut keys: BTreeMap<String, MlflowKeys> = BTreeMap::new();
        for batch in windows.take_ready(Instant::now(), Close::All) {
            if let Err(e) = exporter.export(&batch, Duration::from_secs(30)) {
                panic!("case {i}: MLflow refused a batch of run {:?}: {e}\n{req:?}", batch.run.key);
            }
            let run_keys = keys.entry(batch.run.key.clone()).or_default();
            for p in &batch.points {
                let ts = i64::try_from(p.time_unix_nano / 1_000_000).unwrap_or(i64::MAX);
                expected
                    .entry((batch.run.key.clone(), run_keys.key_for(&p.series).key))
                    .or_default()
                    .insert((p.step, mlflow_shown(p.scalar), ts));
            }
        }
        exporter.end_runs(RunOutcome::Finished, Duration::from_secs(30)).unwrap_or_else(|e| panic!("case {i}: ending runs: {e}"));
        let ids: BTreeMap<String, String> = exporter
            .run_ids()
            .lock()
            .map(|m| m.iter().map(|(k, r)| (k.clone(), r.run_id.clone())).collect())
            .unwrap_or_default();
        for ((run, key), points) in &expected {
            let id = ids.get(run).unwrap_or_else(|| panic!("case {i}: no MLflow run for {run:?}"));
            let got: BTreeSet<(i64, String, i64)> =
                common::history(&uri, id, key).into_iter().map(|(s, v, t)| (s, mlflow_shown(v), t)).collect();
            assert_eq!(&got, points, "case {i}: run {run:?} metric {key:?}");
            compared += 1;
        }
    }
    assert!(compared > 0);
}

// ---------------------------------------------------------------------------------------------
// Named regressions: inputs the targets above are built around, replayed on every run.

/// A histogram whose packed `bucket_counts` declare 2^60 bytes that are not there: refused
/// without allocating for the declared length.
#[test]
fn regression_histogram_declaring_2_pow_60_bucket_bytes() {
    // HistogramDataPoint field 6 (bucket_counts, packed) with length 2^60 and 3 bytes present.
    let mut dp = vec![0x32u8];
    dp.extend([0x80u8, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10, 1, 2, 3]);
    // Histogram.data_points (1) ← Metric.histogram (9) ← ScopeMetrics.metrics (2) ←
    // ResourceMetrics.scope_metrics (2) ← ExportMetricsServiceRequest.resource_metrics (1).
    let wrap = |tag: u8, inner: Vec<u8>| {
        let mut v = vec![tag, inner.len() as u8];
        v.extend(inner);
        v
    };
    let bytes = wrap(0x0a, wrap(0x12, wrap(0x12, wrap(0x4a, wrap(0x0a, dp)))));
    let (res, peak) = peak_allocation(|| ExportMetricsServiceRequest::decode(bytes.as_slice()));
    assert!(res.is_err(), "{res:?}");
    assert!(peak <= allocation_bound(bytes.len()), "allocated {peak}");
}

/// Exponential histograms with extreme scales and offsets are refused (`invalid_histogram`) or
/// converted to finite, increasing bounds; never a panic or a huge allocation.
#[test]
fn regression_exponential_histogram_extremes() {
    for (scale, offset, n) in [(20, i32::MAX, 3usize), (20, i32::MIN, 3), (-10, i32::MAX, 2), (i32::MIN, 0, 1), (i32::MAX, 0, 1), (0, -1100, 2), (0, 1020, 8)] {
        let dp = ExponentialHistogramDataPoint {
            count: n as u64,
            scale,
            positive: Some(Buckets { offset, bucket_counts: vec![1; n] }),
            attributes: vec![kv("step", any_value::Value::IntValue(1))],
            time_unix_nano: 1,
            ..Default::default()
        };
        let req = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: "e".into(),
                        data: Some(metric::Data::ExponentialHistogram(ExponentialHistogram { data_points: vec![dp], ..Default::default() })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let outs = check_decoder(&req, DecodeSettings::default());
        for rp in &outs[0].runs {
            for p in &rp.points {
                if let trainmetrics::decode::PointValue::Histogram(h) = &p.value {
                    assert!(h.bounds.iter().all(|b| b.is_finite()) && h.bounds.windows(2).all(|w| w[0] < w[1]), "{scale} {offset}: {:?}", h.bounds);
                }
            }
        }
    }
}

/// One 64 KiB metric name shared by 10 000 data points (about 200 kB on the wire): each point's
/// series and metric name are bounded (1 KiB), so the decode allocates a bounded multiple of the
/// input instead of 10 000 copies of the name (1.3 GB before the bound).
#[test]
fn regression_long_metric_name_is_not_copied_per_data_point() {
    let name = "n".repeat(64 << 10);
    let points = (0..10_000)
        .map(|i| NumberDataPoint {
            attributes: vec![kv("step", any_value::Value::IntValue(i))],
            value: Some(number_data_point::Value::AsDouble(1.0)),
            ..Default::default()
        })
        .collect();
    let req = ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric { name, data: Some(metric::Data::Gauge(Gauge { data_points: points })), ..Default::default() }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let bytes = req.encode_to_vec();
    let (outs, peak) = peak_allocation(|| check_decoder(&req, DecodeSettings::default()));
    assert_eq!(outs[0].runs[0].points.len(), 10_000);
    assert!(peak <= allocation_bound(bytes.len()), "{} bytes in, {peak} allocated", bytes.len());
}
