//! OTLP/HTTP load generator for `scripts/bench-ingest.sh`: the same protobuf requests, sent as
//! fast as the receiver takes them, to the Collector built here and to `trainmetrics serve`.
//!
//! Each request is one trainer's collection: `--series` gauges (`metric.00`, …) at `--steps`
//! consecutive steps, the step as the data point attribute `step`, one run per sender thread
//! (`ml.run.id = bench-<thread>`), so every run's steps arrive in order. Requests are encoded
//! before the clock starts, so the sender's own cost is only the HTTP round trip. A 429/503 is
//! retried after its `Retry-After` (capped at 100 ms) and counted.
//!
//! Prints `points <n>`, `seconds <s>`, `points_per_s <r>`, `retries <n>` (one per line).
//!
//!   otlp_load --endpoint http://127.0.0.1:4318/v1/metrics [--requests 400] [--series 50]
//!             [--steps 100] [--senders 2]

use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
}

/// One request: `series` gauges × `steps` steps starting at `first_step`, for run `run`.
fn request(run: &str, first_step: i64, series: usize, steps: usize) -> Vec<u8> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
    let metrics = (0..series)
        .map(|s| Metric {
            name: format!("metric.{s:02}"),
            data: Some(metric::Data::Gauge(Gauge {
                data_points: (0..steps)
                    .map(|i| {
                        let step = first_step + i as i64;
                        NumberDataPoint {
                            attributes: vec![kv("step", any_value::Value::IntValue(step))],
                            time_unix_nano: now + i as u64,
                            value: Some(number_data_point::Value::AsDouble(1.0 / (step as f64 + s as f64 + 1.0))),
                            ..Default::default()
                        }
                    })
                    .collect(),
            })),
            ..Default::default()
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", any_value::Value::StringValue("bench".into())),
                    kv("ml.experiment.name", any_value::Value::StringValue("bench".into())),
                    kv("ml.run.id", any_value::Value::StringValue(run.into())),
                ],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics { metrics, ..Default::default() }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let endpoint = arg(&args, "--endpoint", "http://127.0.0.1:4318/v1/metrics");
    let requests: usize = arg(&args, "--requests", "400").parse()?;
    let series: usize = arg(&args, "--series", "50").parse()?;
    let steps: usize = arg(&args, "--steps", "100").parse()?;
    let senders: usize = arg(&args, "--senders", "2").parse::<usize>()?.max(1);

    let per_sender = requests.div_ceil(senders);
    let bodies: Vec<Vec<Vec<u8>>> = (0..senders)
        .map(|t| (0..per_sender).map(|r| request(&format!("bench-{t}"), 1 + (r * steps) as i64, series, steps)).collect())
        .collect();
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let start = Instant::now();
    let retries: anyhow::Result<Vec<u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|mine| {
                let agent = agent.clone();
                let endpoint = endpoint.clone();
                scope.spawn(move || -> anyhow::Result<u64> {
                    let mut retries = 0;
                    for body in mine {
                        loop {
                            let resp = agent.post(&endpoint).header("Content-Type", "application/x-protobuf").send(&body[..])?;
                            let status = resp.status().as_u16();
                            if status == 200 {
                                break;
                            }
                            if status != 429 && status != 503 {
                                anyhow::bail!("{endpoint} answered {status}");
                            }
                            retries += 1;
                            let wait = resp
                                .headers()
                                .get("retry-after")
                                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                                .map_or(Duration::from_millis(10), |s| Duration::from_secs(s).min(Duration::from_millis(100)));
                            std::thread::sleep(wait);
                        }
                    }
                    Ok(retries)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().map_err(|_| anyhow::anyhow!("sender panicked"))?).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let points = senders * per_sender * series * steps;
    println!("points {points}");
    println!("seconds {seconds:.3}");
    println!("points_per_s {:.0}", points as f64 / seconds);
    println!("retries {}", retries?.iter().sum::<u64>());
    Ok(())
}
