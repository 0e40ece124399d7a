//! Benchmarks, printed as table rows (`scripts/bench.sh` adds the peers and the trainer's step
//! times). Each number is the median of its rounds; peers run in the same process and round.
//! - record: ns per `StepRecorder::record` vs the OTel SDK's own `Gauge::record` with the same
//!   attributes (the step and the record time `trainmetrics.time_unix_nano`, which is what the
//!   trainer would pay with plain OTel to keep each value's time), in bursts of 8000
//!   records with a reader collection between bursts (a trainer's pace, and within the SDK's
//!   cardinality limit, where the peer loses nothing either).
//! - tensorboard: scalar points per second through `TensorBoardExporter::export` (encode, frame,
//!   write, flush), 1000 steps × 100 tags per round.
//! - first write: ms from handing a delivery a request whose first window can close (no reorder
//!   window) until its run's event file holds it, a new run each of 20 rounds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::KeyValue;
use trainmetrics::decode::RunInfo;
use trainmetrics::cadence::{Batch, OutPoint};
use trainmetrics::config::{DeliveryConfig, ExporterConfig, TensorBoardConfig};
use trainmetrics::exporter::tensorboard::{TensorBoardExporter, TensorBoardSettings};
use trainmetrics::exporter::{Exporter, RunOutcome};
use trainmetrics::Pipeline;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn row(name: &str, value: f64, unit: &str, note: &str) {
    println!("| {name} | {value:.1} | {unit} | {note} |");
}

fn main() {
    // `cargo test --all-targets` runs benches with --test: nothing to measure then.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("trainmetrics-bench-{}", std::process::id()));
    let p = Pipeline::builder()
        .run_name("bench")
        .exporter(
            "tensorboard",
            ExporterConfig { backend: TensorBoardConfig { logdir: Some(dir.join("runs")) }, delivery: DeliveryConfig { reader_interval: Some(Duration::from_millis(200)), ..Default::default() } },
        )
        .build()
        .expect("pipeline");
    let rec = p.recorder();
    let gauge = p.meter_provider().meter("peer").f64_gauge("peer.loss").build();
    const N: i64 = 8_000;
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    let mut step = 0;
    for _ in 0..15 {
        let t = Instant::now();
        for _ in 0..N {
            step += 1;
            rec.record(step, "train.loss", 0.5);
        }
        ours.push(t.elapsed().as_nanos() as f64 / N as f64);
        let t = Instant::now();
        for _ in 0..N {
            step += 1;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
            gauge.record(0.5, &[KeyValue::new("step", step), KeyValue::new("trainmetrics.time_unix_nano", now)]);
        }
        peer.push(t.elapsed().as_nanos() as f64 / N as f64);
        // Let the reader collect between bursts so both loops see the same SDK state.
        std::thread::sleep(Duration::from_millis(450));
    }
    let (ours, peer) = (median(ours), median(peer));
    row("StepRecorder::record", ours, "ns/call", &format!("{:.2}x the OTel SDK peer", ours / peer));
    row("peer: opentelemetry_sdk Gauge::record, step and record-time attributes", peer, "ns/call", "same provider, same run, same attributes");
    let report = p.shutdown();
    let e = &report.exporters[0];
    row("record loop points dropped", e.dropped_total() as f64, "points", &format!("of {} received", e.received));

    let run = Arc::new(RunInfo { key: "tb".into(), run_name: Some("tb".into()), ..Default::default() });
    // Series names are shared `Arc<str>`s from the decoder on (as in the pipeline), so they are
    // built once here, outside the timing.
    let tags: Vec<Arc<str>> = (0..100).map(|i| Arc::from(format!("tag{i:03}"))).collect();
    let mut rates = Vec::new();
    for round in 0..5 {
        let mut exporter = TensorBoardExporter::new(TensorBoardSettings { logdir: dir.join(format!("tb{round}")) });
        let t = Instant::now();
        for s in 1..=1000i64 {
            let points = tags
                .iter()
                .map(|tag| OutPoint {
                    series: tag.clone(),
                    step: s,
                    time_unix_nano: 1_790_000_000_000_000_000,
                    scalar: s as f64 * 0.001,
                    histogram: None,
                    inputs: 1,
                })
                .collect();
            let _ = exporter.export(&Batch { run: run.clone(), points, ..Default::default() }, Duration::from_secs(5));
        }
        rates.push(100_000.0 / t.elapsed().as_secs_f64());
    }
    row("TensorBoardExporter::export", median(rates), "points/s", "100 tags × 1000 steps, one export per step");
    let latencies: Vec<f64> = (0..20).map(|round| first_write_ms(&dir.join(format!("latency{round}")))).collect();
    let worst = latencies.iter().copied().fold(0.0, f64::max);
    row("first TensorBoard write after a window can close", median(latencies), "ms", &format!("reorder_window 0, every step; worst of 20: {worst:.1} ms"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Milliseconds from handing a delivery one request with steps 1 and 2 of a new run (step 1's
/// window can close at once: no reorder window, a later step arrived) until the run's event file
/// holds bytes (its first write holds the file version, the session start and step 1).
fn first_write_ms(logdir: &std::path::Path) -> f64 {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue as Kv};
    use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use trainmetrics::cadence::CadenceSettings;
    use trainmetrics::delivery::{Delivery, DeliverySettings};

    let kv = |k: &str, v: any_value::Value| Kv { key: k.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() };
    let point = |step: i64| NumberDataPoint {
        attributes: vec![kv("step", any_value::Value::IntValue(step))],
        time_unix_nano: 1_790_000_000_000_000_000 + step as u64,
        value: Some(number_data_point::Value::AsDouble(step as f64)),
        ..Default::default()
    };
    let req = ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource { attributes: vec![kv("ml.run.name", any_value::Value::StringValue("latency".into()))], ..Default::default() }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "loss".into(),
                    data: Some(metric::Data::Gauge(Gauge { data_points: vec![point(1), point(2)] })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let cadence = CadenceSettings { every_steps: Some(1), reorder_window: Duration::ZERO, ..Default::default() };
    let exporter = TensorBoardExporter::new(TensorBoardSettings { logdir: logdir.to_path_buf() });
    let delivery = Delivery::start("tensorboard", exporter, DeliverySettings { cadence, ..Default::default() }).expect("delivery");
    let written = || {
        let runs = std::fs::read_dir(logdir).into_iter().flatten().flatten();
        let files = runs.flat_map(|run| std::fs::read_dir(run.path()).into_iter().flatten().flatten());
        files.filter_map(|f| f.metadata().ok()).any(|m| m.len() > 0)
    };
    let t = Instant::now();
    delivery.submit(Arc::new(req)).expect("submit");
    while !written() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_micros(200));
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    delivery.shutdown(RunOutcome::Finished, Duration::from_secs(5));
    ms
}
