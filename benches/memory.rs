//! Memory benchmark, printed as table rows for `scripts/bench.sh`: the heap bytes that live data
//! holds in one exporter's pipeline (decode, windows, TensorBoard exporter), counted exactly by a
//! counting global allocator (bytes requested from the allocator, live = allocated - freed; the
//! allocator's own per-block overhead is not in it). `scripts/bench-series.sh` measures the same
//! from outside as RSS, which also holds what the allocator keeps of freed request buffers.
//! - per live series: 100 000 series (one gauge point each at step 1, requests of 10 000 series,
//!   as `scripts/bench-series.sh` sends them) delivered to TensorBoard every step; (live bytes
//!   after - live bytes before) / series. Also at 50 000, to show it is per series.
//! - per point in flight: 500 000 points (requests of 50 series x 100 steps, as
//!   `examples/otlp_load.rs` sends them) held in windows by a 10-minute reorder window;
//!   (live bytes holding them - live bytes before) / points.
//!
//! A binary of its own: the counting allocator would tax the other benchmarks' allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics};
use opentelemetry_proto::tonic::resource::v1::Resource;
use trainmetrics::cadence::CadenceSettings;
use trainmetrics::decode::DecodeSettings;
use trainmetrics::delivery::{Delivery, DeliverySettings};
use trainmetrics::exporter::tensorboard::{TensorBoardExporter, TensorBoardSettings};
use trainmetrics::exporter::RunOutcome;

/// The system allocator, counting the bytes it holds for the process.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call goes to `System` unchanged; the counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

/// One request of run `run`: `series` gauges `m/k=<first..>` × `steps` steps from `first_step`
/// (a series is an attribute set of one metric, as in `scripts/bench-series.sh`).
fn request(run: &str, first_series: usize, series: usize, first_step: i64, steps: usize) -> ExportMetricsServiceRequest {
    let points = (first_series..first_series + series)
        .flat_map(|k| {
            (0..steps).map(move |i| NumberDataPoint {
                attributes: vec![kv("step", any_value::Value::IntValue(first_step + i as i64)), kv("k", any_value::Value::IntValue(k as i64))],
                time_unix_nano: 1_790_000_000_000_000_000 + i as u64,
                value: Some(number_data_point::Value::AsDouble(k as f64)),
                ..Default::default()
            })
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource { attributes: vec![kv("ml.run.name", any_value::Value::StringValue(run.into()))], ..Default::default() }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric { name: "m".into(), data: Some(metric::Data::Gauge(Gauge { data_points: points })), ..Default::default() }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Waits until `done` holds for the delivery's report, then lets its worker settle.
fn wait(delivery: &Delivery, what: &str, done: impl Fn(&trainmetrics::stats::ExporterReport) -> bool) {
    let t = Instant::now();
    while !done(&delivery.report()) {
        assert!(t.elapsed() < Duration::from_secs(120), "memory bench: {what} did not happen within 120 s: {:?}", delivery.report());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
}

fn row(name: &str, value: f64, unit: &str, note: &str) {
    println!("| {name} | {value:.0} | {unit} | {note} |");
}

fn start(dir: &std::path::Path, cadence: CadenceSettings, max_pending_points: usize) -> Delivery {
    let exporter = TensorBoardExporter::new(TensorBoardSettings { logdir: dir.to_path_buf() });
    let decode = DecodeSettings { max_series_per_run: 1_000_000, ..Default::default() };
    let settings = DeliverySettings { cadence, decode, max_pending_points, queue_size: 10_000, max_queued_bytes: 4 << 30, ..Default::default() };
    Delivery::start("tensorboard", exporter, settings).expect("delivery")
}

fn main() {
    // `cargo test --all-targets` runs benches with --test: nothing to measure then.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("trainmetrics-bench-memory-{}", std::process::id()));

    // Per live series.
    let every_step = CadenceSettings { every_steps: Some(1), linger: Duration::from_millis(200), ..Default::default() };
    let delivery = start(&dir.join("series"), every_step, 1_000_000);
    std::thread::sleep(Duration::from_millis(200));
    let before = live();
    let mut at = Vec::new();
    for (first, n) in [(0, 50_000), (50_000, 50_000)] {
        for chunk in (first..first + n).step_by(10_000) {
            delivery.submit(Arc::new(request("many-series", chunk, 10_000, 1, 1))).expect("submit");
        }
        let want = (first + n) as u64;
        wait(&delivery, "delivery of every series", |r| r.delivered >= want && r.pending == 0);
        at.push((want, live() - before));
    }
    let report = delivery.shutdown(RunOutcome::Finished, Duration::from_secs(30));
    let [(n1, b1), (n2, b2)] = [at[0], at[1]];
    row(
        "heap per live series (TensorBoard every step)",
        b2 as f64 / n2 as f64,
        "B",
        &format!("{n2} series hold {:.1} MiB ({:.0} B each at {n1}; {} delivered); heap bytes requested, no allocator overhead; target <= 500 B", b2 as f64 / 1048576.0, b1 as f64 / n1 as f64, report.delivered),
    );

    // Per point in flight.
    let held = CadenceSettings { every_steps: Some(1), reorder_window: Duration::from_secs(600), ..Default::default() };
    let delivery = start(&dir.join("held"), held, 1_000_000);
    std::thread::sleep(Duration::from_millis(200));
    // Counted from before the requests are built: each is freed once its points are taken.
    let before = live();
    let requests: Vec<ExportMetricsServiceRequest> = (0..100).map(|r| request(&format!("held-{}", r % 2), 0, 50, 1 + (r / 2) as i64 * 100, 100)).collect();
    let request_bytes = live() - before;
    for req in requests {
        delivery.submit(Arc::new(req)).expect("submit");
    }
    wait(&delivery, "500 000 points held", |r| r.received >= 500_000);
    let flushed = delivery.flush(Duration::from_secs(60));
    let held_bytes = live() - before;
    let report = delivery.report();
    row(
        "heap per point in flight (500 000 held by a reorder window)",
        held_bytes as f64 / report.pending.max(1) as f64,
        "B",
        &format!("{} points held in {:.1} MiB (the requests as sent were {:.1} MiB, freed once taken); flush {flushed:?}; target <= 100 B", report.pending, held_bytes as f64 / 1048576.0, request_bytes as f64 / 1048576.0),
    );
    delivery.shutdown(RunOutcome::Finished, Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
}
