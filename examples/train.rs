//! The main job: a real training run whose metrics go through a trainmetrics [`Pipeline`], or
//! over OTLP to an OpenTelemetry Collector and `trainmetrics serve` (`--otlp-endpoint`).
//!
//! An MLP (11 → hidden → hidden → 6) is trained with candle on the red wine-quality dataset
//! (1599 samples, 11 physico-chemical features, quality scores 3..=8 as 6 classes), with AdamW,
//! mini-batches, cross-entropy, and a learning rate with linear warmup then cosine decay. Every
//! step records `train.loss`, `train.lr`, `train.grad_norm` and `train.throughput`; every
//! `--eval-every` steps (and at the last step) it records `eval.loss` and `eval.accuracy` on a
//! held-out 20 % split, and the histogram `train.logits` (the current batch's logits).
//!
//! # In process (default)
//! The same recording goes to two exporters on their own cadences: TensorBoard event files every
//! step, and an MLflow tracking server every `--mlflow-every` steps with `train.loss` averaged
//! over the window and the other metrics taking the window's last value.
//!
//! ```text
//! cargo run --example train -- --no-mlflow --logdir runs          # TensorBoard only
//! tensorboard --logdir runs
//!
//! scripts/mlflow-server.sh start --port 5000                       # or any MLflow server
//! cargo run --example train -- --tracking-uri http://127.0.0.1:5000 --steps 2000
//! ```
//!
//! # Over OTLP (`--otlp-endpoint URL`)
//! The trainer runs no exporter of its own: it sends its metrics over OTLP/gRPC to a collector
//! (e.g. `collector-config/agent.yaml`) or straight to `trainmetrics serve`, and the backends,
//! their cadences and aggregations are whatever the service's config says
//! (`collector-config/trainmetrics.yaml`: the same TensorBoard-every-step and
//! MLflow-every-100-steps as above). So `--logdir`, `--tracking-uri`, `--no-mlflow`,
//! `--mlflow-every` and `--shutdown-timeout` mean nothing here and are refused with it.
//!
//! ```text
//! trainmetrics serve --config collector-config/trainmetrics.yaml   # gRPC on 127.0.0.1:14317
//! "$(scripts/build-collector.sh)" --config=collector-config/agent.yaml   # 4317 -> 14317
//! cargo run --example train -- --otlp-endpoint http://127.0.0.1:4317 --run-name mlp-1
//! ```
//! What goes over the wire: an `SdkMeterProvider` of its own with one `PeriodicReader` (every
//! 1 s) over the OTLP exporter of `opentelemetry-otlp` (tonic, gzip, delta temporality, its
//! default 10 s timeout and retries), whose resource is the run exactly as the in-process
//! pipeline describes it: `ml.experiment.name`, `ml.run.name`, `ml.run.id` (`--run-id`, default
//! a random hex id), `ml.param.<name>` per hyperparameter, the tag `source`, and
//! `service.name=trainmetrics-rust-example`. Recording goes through the same
//! [`StepRecorder`] (`StepRecorder::new(meter, "step")`), so the metric names, the `step`
//! attribute, the record time and the conventions for non-finite values and names are those of
//! the in-process route. Delta matters: every step is its own attribute set, and with cumulative
//! temporality the SDK would keep and resend every step ever recorded. A view raises the SDK's
//! cardinality limit to 20 000 attribute sets per instrument and collection, and, since a
//! standalone `StepRecorder` does not collect early, the trainer forces a collection and export
//! every 2000 steps (on its thread: one gRPC round trip, reported as `flush_time_ms`, not in
//! `step_time_ms`), so no step can fold into the SDK's overflow series whatever the export
//! timing (the SDK keeps a delta collection's sets until the next one: 2 × 2000 < 20 000).
//! At its end the trainer records the run-end gauge `trainmetrics.run.end` with `status`
//! FINISHED (FAILED when training failed; [`StepRecorder::record_run_end`]), so `serve` writes
//! the last partial windows and ends the MLflow run at once (README "Run end").
//! The tonic exporter needs a Tokio runtime: a one-worker runtime lives until after the
//! provider's shutdown. Every export's result is counted; any failed export makes the exit
//! status non-zero.
//!
//! `RUST_LOG=trainmetrics=debug` shows what the exporters do (on stderr); in OTLP mode
//! `RUST_LOG=opentelemetry=debug` shows the SDK's and the OTLP exporter's.
//!
//! `--record-csv FILE` writes every value the trainer recorded as `step,name,value` (values in
//! Rust's shortest round-trip form), so tests can compare what TensorBoard and MLflow show with
//! what was recorded, in both modes. A histogram is one row whose value is `sum / count` of its
//! finite measurements, summed in recording order as the OTel SDK does: that is exactly the
//! scalar the MLflow exporter logs for it (TensorBoard shows it under histograms, not scalars).
//! Each row is one OTLP data point (a histogram record is one data point of its own step), so
//! the exporters' `received` equals the number of rows.
//!
//! The run is deterministic for a given `--seed`: the split, the per-epoch shuffles and the
//! weight initialisation all come from one seeded generator (candle cannot seed its CPU RNG).
//!
//! At the end it prints the final numbers, the run's name and id, and `step_time_ms mean=… p50=…
//! p99=…`: the time of each step's training plus recording, without `--sleep-ms` and without the
//! periodic evaluation forward pass (that is reported separately, so p99 stays a property of the
//! training step). In process it then prints where TensorBoard and MLflow have the run and the
//! pipeline's shutdown report; over OTLP, `otlp: exported to <url> (…)` with the counts of data
//! points and requests exported.

use std::f64::consts::PI;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Linear, Module, Optimizer, ParamsAdamW};
use clap::Parser;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Compression, MetricExporter, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{Instrument, PeriodicReader, SdkMeterProvider, Stream, Temporality};
use opentelemetry_sdk::Resource;
use tracing_subscriber::EnvFilter;
use trainmetrics::decode::{EndStatus, IdentityKeys};
use trainmetrics::cadence::Aggregation;
use trainmetrics::config::{default_run_name, DeliveryConfig, ExporterConfig, MlflowConfig, TensorBoardConfig};
use trainmetrics::{Pipeline, StepRecorder};

const DATASET: &str = "winequality-red";
const FEATURES: usize = 11;
/// Quality scores in the dataset run 3..=8.
const MIN_QUALITY: usize = 3;
const CLASSES: usize = 6;
const EVAL_FRACTION: f64 = 0.2;
/// Logits of a standardized-input MLP stay within a few units; unit buckets show their spread.
const LOGIT_BUCKETS: std::ops::RangeInclusive<i32> = -8..=8;
/// The run tag both modes attach (a resource attribute, so an MLflow run tag).
const SOURCE: &str = "trainmetrics/examples/train.rs";
/// OTLP mode: `service.name` of the resource.
const SERVICE_NAME: &str = "trainmetrics-rust-example";
/// OTLP mode: the SDK's attribute sets per instrument and collection (as the library's default).
const CARDINALITY_LIMIT: usize = 20_000;
/// OTLP mode: steps between forced collections. Each instrument gets at most one attribute set
/// per step, and a delta collection's sets stay until the next one, so at most 2 × 2000 sets
/// share the limit, whatever the export timing.
const FLUSH_EVERY: u64 = 2000;
/// OTLP mode: the periodic reader's interval.
const EXPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Trains an MLP on the wine-quality dataset and reports its metrics to TensorBoard and MLflow,
/// in process or over OTLP through `trainmetrics serve`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// Send the metrics over OTLP/gRPC (gzip, delta) to a collector or `trainmetrics serve` at
    /// URL (e.g. http://127.0.0.1:4317) instead of exporting in process; the backends and their
    /// cadences are then configured in `trainmetrics serve`.
    #[arg(
        long,
        value_name = "URL",
        conflicts_with_all = ["logdir", "tracking_uri", "no_mlflow", "mlflow_every", "shutdown_timeout"]
    )]
    otlp_endpoint: Option<String>,
    /// TensorBoard logdir (in process only).
    #[arg(long, default_value = "runs")]
    logdir: PathBuf,
    /// MLflow tracking URI, in process only [default: $MLFLOW_TRACKING_URI, else
    /// http://127.0.0.1:5000].
    #[arg(long)]
    tracking_uri: Option<String>,
    /// MLflow experiment name.
    #[arg(long, default_value = "trainmetrics-demo")]
    experiment: String,
    /// Run name [default: generated by trainmetrics, run-<UTC date>-<time>].
    #[arg(long)]
    run_name: Option<String>,
    /// Run id (`ml.run.id`), the run's identity: the same id continues the same MLflow run, so
    /// never reuse one [default: generated, unique per run].
    #[arg(long)]
    run_id: Option<String>,
    /// Write every recorded value to FILE as `step,name,value`.
    #[arg(long, value_name = "FILE")]
    record_csv: Option<PathBuf>,
    /// Sleep this long after each step (to watch a run live); not counted in step time.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    sleep_ms: u64,
    /// MLflow cadence in steps (in process only).
    #[arg(long, default_value_t = 100, value_name = "N")]
    mlflow_every: u64,
    /// TensorBoard only (in process only).
    #[arg(long)]
    no_mlflow: bool,
    /// Bound of the pipeline's shutdown, in seconds (in process only).
    #[arg(long, default_value_t = 15, value_name = "SECS")]
    shutdown_timeout: u64,
    /// Evaluate on the held-out split every N steps (and at the last step).
    #[arg(long, default_value_t = 50, value_name = "N")]
    eval_every: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Samples per mini-batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Width of both hidden layers.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Linear warmup steps before the cosine decay.
    #[arg(long, default_value_t = 50)]
    warmup: u64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Seed of the split, the shuffles and the initial weights.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

impl Args {
    /// Rejects values that would make training meaningless or panic deep inside candle.
    fn validate(&self) -> Result<()> {
        ensure!(self.steps >= 1, "--steps must be at least 1");
        ensure!(self.eval_every >= 1, "--eval-every must be at least 1");
        ensure!(self.mlflow_every >= 1, "--mlflow-every must be at least 1");
        ensure!(self.batch_size >= 1, "--batch-size must be at least 1");
        ensure!(self.hidden >= 1, "--hidden must be at least 1");
        ensure!(self.lr.is_finite() && self.lr > 0.0, "--lr must be a positive number");
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "--weight-decay must be a non-negative number"
        );
        // Steps travel as i64 (OTel attribute); refuse what would not fit rather than wrap.
        ensure!(i64::try_from(self.steps).is_ok(), "--steps is too large");
        if let Some(url) = &self.otlp_endpoint {
            // This build of the OTLP exporter has no TLS.
            ensure!(
                url.strip_prefix("http://").is_some_and(|rest| !rest.is_empty()),
                "--otlp-endpoint must be an http:// URL such as http://127.0.0.1:4317, got {url:?}"
            );
        }
        if let Some(id) = &self.run_id {
            ensure!(!id.trim().is_empty(), "--run-id must not be empty");
        }
        Ok(())
    }

    fn tracking_uri(&self) -> String {
        self.tracking_uri
            .clone()
            .or_else(|| std::env::var("MLFLOW_TRACKING_URI").ok().filter(|s| !s.trim().is_empty()))
            .unwrap_or_else(|| "http://127.0.0.1:5000".to_string())
    }
}

/// SplitMix64: a few lines, well distributed, and stable across crate versions, so a seed means
/// the same run forever (unlike an RNG crate's default generator).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) from the top 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n; the modulo bias is below 2^-50 for the sizes used here.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// One split on the device: standardized features and class labels.
struct Split {
    x: Tensor,
    y: Tensor,
    len: usize,
}

struct Data {
    train: Split,
    eval: Split,
}

/// Loads the dataset, splits it with `rng`, and standardizes with the train split's statistics
/// (fitting on all rows would leak the held-out split into training).
fn load_data(rng: &mut SplitMix64, device: &Device) -> Result<Data> {
    let ds = linfa_datasets::winequality();
    let (rows, cols) = (ds.records.nrows(), ds.records.ncols());
    ensure!(cols == FEATURES, "{DATASET}: expected {FEATURES} features, got {cols}");
    ensure!(ds.targets.len() == rows, "{DATASET}: {rows} rows but {} targets", ds.targets.len());
    // Row-major iteration over the records; no ndarray types are named, so the ndarray version
    // linfa was built against does not matter here.
    let features: Vec<f64> = ds.records.iter().copied().collect();
    let labels = ds
        .targets
        .iter()
        .map(|&q| match q.checked_sub(MIN_QUALITY) {
            Some(c) if c < CLASSES => Ok(c as u32),
            _ => bail!("{DATASET}: quality {q} outside {MIN_QUALITY}..={}", MIN_QUALITY + CLASSES - 1),
        })
        .collect::<Result<Vec<u32>>>()?;

    let mut order: Vec<usize> = (0..rows).collect();
    rng.shuffle(&mut order);
    let n_eval = ((rows as f64) * EVAL_FRACTION).round() as usize;
    let (eval_idx, train_idx) = order.split_at(n_eval);

    let mut mean = [0f64; FEATURES];
    let mut var = [0f64; FEATURES];
    for &r in train_idx {
        for (j, m) in mean.iter_mut().enumerate() {
            *m += features[r * FEATURES + j];
        }
    }
    mean.iter_mut().for_each(|m| *m /= train_idx.len() as f64);
    for &r in train_idx {
        for (j, v) in var.iter_mut().enumerate() {
            *v += (features[r * FEATURES + j] - mean[j]).powi(2);
        }
    }
    let std: Vec<f64> = var
        .iter()
        .map(|v| (v / train_idx.len() as f64).sqrt())
        // A constant feature carries no signal; dividing by 1 keeps it at 0 instead of NaN.
        .map(|s| if s > 1e-12 { s } else { 1.0 })
        .collect();

    let split = |idx: &[usize]| -> Result<Split> {
        let x: Vec<f32> = idx
            .iter()
            .flat_map(|&r| (0..FEATURES).map(move |j| r * FEATURES + j))
            .map(|k| ((features[k] - mean[k % FEATURES]) / std[k % FEATURES]) as f32)
            .collect();
        let y: Vec<u32> = idx.iter().map(|&r| labels[r]).collect();
        Ok(Split {
            x: Tensor::from_vec(x, (idx.len(), FEATURES), device)?,
            y: Tensor::from_vec(y, idx.len(), device)?,
            len: idx.len(),
        })
    };
    Ok(Data { train: split(train_idx)?, eval: split(eval_idx)? })
}

struct Mlp {
    layers: Vec<Linear>,
    vars: Vec<Var>,
}

impl Mlp {
    /// PyTorch's default `Linear` init, U(±1/√fan_in) for weights and biases, drawn from our own
    /// seeded generator so the run is reproducible.
    fn new(sizes: &[usize], rng: &mut SplitMix64, device: &Device) -> Result<Self> {
        let mut layers = Vec::new();
        let mut vars = Vec::new();
        for w in sizes.windows(2) {
            let (fan_in, fan_out) = (w[0], w[1]);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let mut uniform =
                |n: usize| -> Vec<f32> { (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect() };
            let weight = Var::from_vec(uniform(fan_out * fan_in), (fan_out, fan_in), device)?;
            let bias = Var::from_vec(uniform(fan_out), fan_out, device)?;
            // The Linear holds the same tensors (same ids) as the Vars, so the gradients of the
            // forward pass are found under the Vars the optimizer updates.
            layers.push(Linear::new(weight.as_tensor().clone(), Some(bias.as_tensor().clone())));
            vars.extend([weight, bias]);
        }
        Ok(Self { layers, vars })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// Linear warmup to `peak` over `warmup` steps, then cosine decay towards 0 at `total`. Steps are
/// 1-based; the decay starts one step late so the first step after warmup runs at `peak` and no
/// step is spent at exactly lr = 0.
fn learning_rate(step: u64, peak: f64, warmup: u64, total: u64) -> f64 {
    if step <= warmup {
        return peak * step as f64 / warmup as f64;
    }
    let progress = (step - warmup - 1) as f64 / (total - warmup) as f64;
    peak * 0.5 * (1.0 + (PI * progress).cos())
}

/// Cross-entropy and accuracy of `logits` against `y`.
fn loss_and_accuracy(logits: &Tensor, y: &Tensor) -> Result<(f64, f64)> {
    let loss = candle_nn::loss::cross_entropy(logits, y)?.to_scalar::<f32>()?;
    let acc = logits.argmax(D::Minus1)?.eq(y)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
    Ok((f64::from(loss), f64::from(acc)))
}

/// Everything the trainer records goes through here, so the CSV is exactly what the exporters got.
struct Recorder {
    rec: StepRecorder,
    csv: Option<BufWriter<File>>,
    /// Data points recorded (one per scalar, one per histogram record).
    recorded: u64,
    /// OTLP mode: the provider to collect every [`FLUSH_EVERY`] steps (a standalone
    /// `StepRecorder` does not collect early, unlike a pipeline's).
    flush: Option<SdkMeterProvider>,
}

impl Recorder {
    fn scalar(&mut self, step: i64, name: &str, value: f64) -> Result<()> {
        self.rec.record(step, name, value);
        self.recorded += 1;
        if let Some(w) = &mut self.csv {
            writeln!(w, "{step},{name},{value}").context("writing --record-csv")?;
        }
        Ok(())
    }

    fn histogram(&mut self, step: i64, name: &str, values: &[f64], bounds: &[f64]) -> Result<()> {
        self.rec.record_histogram(step, name, values, Some(bounds.to_vec()));
        self.recorded += 1;
        if let Some(w) = &mut self.csv {
            // Same rule and summation order as the SDK's histogram (non-finite values are
            // dropped), so the row equals the scalar MLflow logs for this histogram.
            let (mut sum, mut count) = (0.0f64, 0u64);
            for v in values.iter().filter(|v| v.is_finite()) {
                sum += v;
                count += 1;
            }
            let mean = if count == 0 { f64::NAN } else { sum / count as f64 };
            writeln!(w, "{step},{name},{mean}").context("writing --record-csv")?;
        }
        Ok(())
    }

    /// OTLP mode: collects and exports now every [`FLUSH_EVERY`] steps (blocking until the
    /// export is done); returns how long that took. A failure is counted by the exporter.
    fn after_step(&self, step: u64) -> Option<Duration> {
        let provider = self.flush.as_ref().filter(|_| step.is_multiple_of(FLUSH_EVERY))?;
        let t = Instant::now();
        if let Err(e) = provider.force_flush() {
            tracing::warn!("forced export at step {step}: {e}");
        }
        Some(t.elapsed())
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(w) = &mut self.csv {
            w.flush().context("writing --record-csv")?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Summary {
    last_train_loss: f64,
    first_eval: Option<(u64, f64, f64)>,
    last_eval: Option<(u64, f64, f64)>,
    full_train: (f64, f64),
    step_ms: Vec<f64>,
    record_us: Vec<f64>,
    eval_ms: Vec<f64>,
    /// OTLP mode: forced collections and exports.
    flush_ms: Vec<f64>,
    wall: Duration,
}

fn train(args: &Args, data: &Data, model: &Mlp, rec: &mut Recorder) -> Result<Summary> {
    let mut opt = AdamW::new(
        model.vars.clone(),
        ParamsAdamW { lr: args.lr, weight_decay: args.weight_decay, ..Default::default() },
    )?;
    // A separate stream from the init's, so changing the model size does not change the batches.
    let mut rng = SplitMix64(args.seed ^ 0x5EED_BA7C_4E5F_0000);
    let mut order: Vec<u32> = (0..data.train.len as u32).collect();
    let mut cursor = order.len();
    let device = data.train.x.device().clone();
    let bounds: Vec<f64> = LOGIT_BUCKETS.map(f64::from).collect();
    let mut s = Summary { step_ms: Vec::with_capacity(args.steps as usize), ..Default::default() };
    let started = Instant::now();

    for step in 1..=args.steps {
        let t0 = Instant::now();
        // Epoch-wise sampling without replacement; a partial tail batch is skipped so every
        // step sees the same batch size and the loss curve is comparable across steps.
        if cursor + args.batch_size > order.len() {
            rng.shuffle(&mut order);
            cursor = 0;
        }
        let take = args.batch_size.min(order.len());
        let idx = Tensor::from_slice(&order[cursor..cursor + take], take, &device)?;
        cursor += take;
        let x = data.train.x.index_select(&idx, 0)?;
        let y = data.train.y.index_select(&idx, 0)?;

        let lr = learning_rate(step, args.lr, args.warmup, args.steps);
        opt.set_learning_rate(lr);
        let logits = model.forward(&x)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        // backward + step instead of backward_step: the gradients are needed for the norm.
        let grads = loss.backward()?;
        let mut sq = 0f64;
        for v in &model.vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
            }
        }
        opt.step(&grads)?;
        let loss_v = f64::from(loss.to_scalar::<f32>()?);
        let train_secs = t0.elapsed().as_secs_f64();

        let step_i = step as i64; // validated to fit
        let t_rec = Instant::now();
        rec.scalar(step_i, "train.loss", loss_v)?;
        rec.scalar(step_i, "train.lr", lr)?;
        rec.scalar(step_i, "train.grad_norm", sq.sqrt())?;
        rec.scalar(step_i, "train.throughput", take as f64 / train_secs.max(1e-9))?;
        let mut record_secs = t_rec.elapsed().as_secs_f64();
        s.last_train_loss = loss_v;

        if step % args.eval_every == 0 || step == args.steps {
            let t_eval = Instant::now();
            let eval_logits = model.forward(&data.eval.x)?;
            let (eval_loss, eval_acc) = loss_and_accuracy(&eval_logits, &data.eval.y)?;
            let batch_logits: Vec<f64> = logits.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
            s.eval_ms.push(t_eval.elapsed().as_secs_f64() * 1e3);

            let t_rec = Instant::now();
            rec.scalar(step_i, "eval.loss", eval_loss)?;
            rec.scalar(step_i, "eval.accuracy", eval_acc)?;
            rec.histogram(step_i, "train.logits", &batch_logits, &bounds)?;
            record_secs += t_rec.elapsed().as_secs_f64();

            s.first_eval.get_or_insert((step, eval_loss, eval_acc));
            s.last_eval = Some((step, eval_loss, eval_acc));
            println!(
                "step {step:>5}/{}  lr {lr:.2e}  train.loss {loss_v:.4}  eval.loss {eval_loss:.4}  eval.accuracy {eval_acc:.4}",
                args.steps
            );
        }
        s.step_ms.push((train_secs + record_secs) * 1e3);
        s.record_us.push(record_secs * 1e6);
        if let Some(t) = rec.after_step(step) {
            s.flush_ms.push(t.as_secs_f64() * 1e3);
        }

        if args.sleep_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.sleep_ms));
        }
    }
    s.wall = started.elapsed();
    s.full_train = loss_and_accuracy(&model.forward(&data.train.x)?, &data.train.y)?;
    rec.finish()?;
    Ok(s)
}

/// `mean=… p50=… p99=…` (nearest-rank percentiles).
fn stats(values: &[f64], precision: usize) -> String {
    if values.is_empty() {
        return "mean=NaN p50=NaN p99=NaN".into();
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    format!("mean={mean:.precision$} p50={:.precision$} p99={:.precision$}", rank(0.5), rank(0.99))
}

/// The run's hyperparameters, the same in both modes (MLflow params, TensorBoard hparams).
fn params(args: &Args) -> Vec<(&'static str, String)> {
    vec![
        ("lr", args.lr.to_string()),
        ("batch_size", args.batch_size.to_string()),
        ("hidden", args.hidden.to_string()),
        ("steps", args.steps.to_string()),
        ("warmup", args.warmup.to_string()),
        ("weight_decay", args.weight_decay.to_string()),
        ("seed", args.seed.to_string()),
        ("dataset", DATASET.to_string()),
        ("eval_every", args.eval_every.to_string()),
        ("model", format!("mlp-{FEATURES}-{h}-{h}-{CLASSES}", h = args.hidden)),
        ("optimizer", "adamw".to_string()),
        ("schedule", "linear-warmup-cosine".to_string()),
    ]
}

fn build_pipeline(args: &Args) -> Result<Pipeline> {
    let mut b = Pipeline::builder().experiment(&args.experiment);
    for (k, v) in params(args) {
        b = b.param(k, v);
    }
    b = b
        .tag("source", SOURCE)
        .exporter(
            "tensorboard",
            ExporterConfig {
                backend: TensorBoardConfig { logdir: Some(args.logdir.clone()) },
                delivery: DeliveryConfig { every_steps: Some(1), aggregation: Some(Aggregation::Last), ..Default::default() },
            },
        )
        .shutdown_timeout(Duration::from_secs(args.shutdown_timeout));
    if let Some(name) = &args.run_name {
        b = b.run_name(name);
    }
    if let Some(id) = &args.run_id {
        b = b.run_id(id);
    }
    if !args.no_mlflow {
        b = b.exporter(
            "mlflow",
            ExporterConfig {
                backend: MlflowConfig { tracking_uri: Some(args.tracking_uri()), ..Default::default() },
                delivery: DeliveryConfig {
                    every_steps: Some(args.mlflow_every),
                    aggregation: Some(Aggregation::Last),
                    // Per-step batch losses are noisy; the window mean is the honest number at the
                    // coarser cadence, while lr, eval.* etc. are meaningful as of the window's end.
                    metrics: [("train.loss".to_string(), Aggregation::Mean)].into(),
                    ..Default::default()
                },
            },
        );
    }
    Ok(b.build()?)
}

/// OTLP mode: what was exported, counted by [`CountingExporter`].
#[derive(Debug, Default)]
struct ExportCounts {
    requests: AtomicU64,
    points: AtomicU64,
    failed_requests: AtomicU64,
    failed_points: AtomicU64,
}

/// OTLP mode: the OTLP exporter, counting every export's data points and result (the periodic
/// reader only logs a failed export; the trainer's exit status should show it).
#[derive(Debug)]
struct CountingExporter {
    inner: MetricExporter,
    counts: Arc<ExportCounts>,
}

/// Data points in one collection, as OTLP counts them (a histogram point is one).
fn data_points(metrics: &ResourceMetrics) -> u64 {
    fn count<T>(d: &MetricData<T>) -> usize {
        match d {
            MetricData::Gauge(g) => g.data_points().count(),
            MetricData::Sum(s) => s.data_points().count(),
            MetricData::Histogram(h) => h.data_points().count(),
            MetricData::ExponentialHistogram(h) => h.data_points().count(),
        }
    }
    metrics
        .scope_metrics()
        .flat_map(|s| s.metrics())
        .map(|m| match m.data() {
            AggregatedMetrics::F64(d) => count(d),
            AggregatedMetrics::U64(d) => count(d),
            AggregatedMetrics::I64(d) => count(d),
        } as u64)
        .sum()
}

impl PushMetricExporter for CountingExporter {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let n = data_points(metrics);
        let result = self.inner.export(metrics).await;
        let c = &self.counts;
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.points.fetch_add(n, Ordering::Relaxed);
        if result.is_err() {
            c.failed_requests.fetch_add(1, Ordering::Relaxed);
            c.failed_points.fetch_add(n, Ordering::Relaxed);
        }
        result
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// OTLP mode: the run's identity, as the in-process pipeline would put it on its resource.
struct OtlpRun {
    name: String,
    id: String,
}

/// OTLP mode: a meter provider of our own over the OTLP/gRPC exporter. The exporter is built
/// inside `rt` (tonic spawns its connection there), which must outlive the provider.
fn build_otlp_provider(
    args: &Args,
    url: &str,
    run: &OtlpRun,
    rt: &tokio::runtime::Runtime,
) -> Result<(SdkMeterProvider, Arc<ExportCounts>)> {
    let exporter = rt
        .block_on(async {
            MetricExporter::builder()
                .with_tonic()
                .with_endpoint(url)
                .with_compression(Compression::Gzip)
                .with_temporality(Temporality::Delta)
                .build()
        })
        .with_context(|| format!("building the OTLP exporter for {url}"))?;
    let counts = Arc::new(ExportCounts::default());
    let reader = PeriodicReader::builder(CountingExporter { inner: exporter, counts: counts.clone() })
        .with_interval(EXPORT_INTERVAL)
        .build();
    let keys = IdentityKeys::default();
    let mut attrs = vec![
        KeyValue::new("service.name", SERVICE_NAME),
        KeyValue::new(keys.experiment, args.experiment.clone()),
        KeyValue::new(keys.run_name, run.name.clone()),
        KeyValue::new(keys.run_id, run.id.clone()),
        KeyValue::new("source", SOURCE),
    ];
    for (k, v) in params(args) {
        attrs.push(KeyValue::new(format!("{}{k}", keys.param_prefix), v));
    }
    let provider = SdkMeterProvider::builder()
        .with_resource(Resource::builder_empty().with_attributes(attrs).build())
        .with_view(|_: &Instrument| Stream::builder().with_cardinality_limit(CARDINALITY_LIMIT).build().ok())
        .with_reader(reader)
        .build();
    Ok((provider, counts))
}

fn print_summary(args: &Args, s: &Summary) {
    println!();
    println!("final train.loss (last batch) {:.4}", s.last_train_loss);
    println!("final train split: loss {:.4} accuracy {:.4}", s.full_train.0, s.full_train.1);
    if let (Some(first), Some(last)) = (s.first_eval, s.last_eval) {
        println!("eval.loss     {:.4} (step {}) -> {:.4} (step {})", first.1, first.0, last.1, last.0);
        println!("eval.accuracy {:.4} (step {}) -> {:.4} (step {})", first.2, first.0, last.2, last.0);
    }
    println!("train_time_s {:.2} ({} steps)", s.wall.as_secs_f64(), args.steps);
    println!("step_time_ms {}", stats(&s.step_ms, 3));
    println!("record_time_us {}", stats(&s.record_us, 1));
    println!("eval_time_ms {} ({} evaluations, not in step_time_ms)", stats(&s.eval_ms, 3), s.eval_ms.len());
}

fn print_data(args: &Args, data: &Data) {
    println!(
        "data: {DATASET}, {} train / {} eval samples; model mlp-{FEATURES}-{h}-{h}-{CLASSES}; {} steps",
        data.train.len,
        data.eval.len,
        args.steps,
        h = args.hidden
    );
}

fn run_in_process(args: &Args, data: &Data, model: &Mlp, csv: Option<BufWriter<File>>) -> Result<()> {
    let pipeline = build_pipeline(args).context("building the metrics pipeline")?;
    println!("run: {} (id {})", pipeline.run().name, pipeline.run().id);
    print_data(args, data);

    let mut rec = Recorder { rec: pipeline.recorder(), csv, recorded: 0, flush: None };
    let s = match train(args, data, model, &mut rec) {
        Ok(s) => s,
        Err(e) => {
            // Keep what was recorded so far, and end the run FAILED rather than FINISHED.
            let _ = rec.finish();
            pipeline.fail();
            eprint!("{}", pipeline.shutdown());
            return Err(e.context("training failed"));
        }
    };
    print_summary(args, &s);

    // After shutdown the MLflow run id is known even when its first batch went out only then.
    let report = pipeline.shutdown();
    println!();
    for loc in pipeline.run_destinations() {
        println!("{loc}");
    }
    print!("{report}");
    Ok(())
}

fn run_otlp(args: &Args, url: &str, data: &Data, model: &Mlp, csv: Option<BufWriter<File>>) -> Result<()> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let run = OtlpRun {
        name: args.run_name.clone().unwrap_or_else(|| default_run_name(now.as_secs())),
        id: args.run_id.clone().unwrap_or_else(|| format!("{:032x}", rand::random::<u128>())),
    };
    // Drives tonic's connection; one worker is plenty for one export a second.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .context("starting the Tokio runtime of the OTLP exporter")?;
    let (provider, counts) = build_otlp_provider(args, url, &run, &rt)?;
    println!("run: {} (id {})", run.name, run.id);
    print_data(args, data);

    let mut rec = Recorder {
        rec: StepRecorder::new(provider.meter("train"), "step"),
        csv,
        recorded: 0,
        flush: Some(provider.clone()),
    };
    let trained = train(args, data, model, &mut rec);
    // The run-end convention (README "Run end"): `serve` ends the MLflow run on it.
    rec.rec.record_run_end(if trained.is_ok() { EndStatus::Finished } else { EndStatus::Failed });
    // One OTLP data point of its own (which `serve` takes as the end, not as a metric point).
    rec.recorded += 1;
    let csv_done = rec.finish();
    // Whatever happened, what was recorded goes out: a last collection, then the shutdown
    // (which collects once more, finds nothing, and shuts the exporter down).
    let t = Instant::now();
    let flushed = provider.force_flush();
    let shut = provider.shutdown();
    let shutdown_time = t.elapsed();
    let recorded = rec.recorded;
    drop(rec);
    drop(provider);
    rt.shutdown_timeout(Duration::from_secs(1));
    let s = trained.context("training failed")?;
    csv_done?;

    print_summary(args, &s);
    if s.flush_ms.is_empty() {
        println!("flush_time_ms none (a forced export every {FLUSH_EVERY} steps)");
    } else {
        println!("flush_time_ms {} ({} forced exports, not in step_time_ms)", stats(&s.flush_ms, 3), s.flush_ms.len());
    }
    println!();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "otlp: exported to {url} ({} of {} recorded data points in {} requests, {} failed; shutdown {:.2}s)",
        load(&counts.points) - load(&counts.failed_points),
        recorded,
        load(&counts.requests),
        load(&counts.failed_requests),
        shutdown_time.as_secs_f64()
    );
    ensure!(
        load(&counts.failed_requests) == 0,
        "{} of {} OTLP exports to {url} failed ({} data points lost; RUST_LOG=opentelemetry=debug shows why)",
        load(&counts.failed_requests),
        load(&counts.requests),
        load(&counts.failed_points)
    );
    flushed.context("final OTLP export")?;
    shut.context("shutting the meter provider down")?;
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    let args = Args::parse();
    args.validate()?;

    // Everything that can fail on bad input happens before the pipeline exists, so a typo does
    // not leave an empty run behind in TensorBoard or MLflow.
    let device = Device::Cpu;
    let mut rng = SplitMix64(args.seed);
    let data = load_data(&mut rng, &device).context("loading the dataset")?;
    let model = Mlp::new(&[FEATURES, args.hidden, args.hidden, CLASSES], &mut rng, &device)?;
    let csv = match &args.record_csv {
        Some(path) => {
            let mut w = BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
            writeln!(w, "step,name,value").with_context(|| format!("writing {}", path.display()))?;
            Some(w)
        }
        None => None,
    };

    match &args.otlp_endpoint {
        Some(url) => run_otlp(&args, url, &data, &model, csv),
        None => run_in_process(&args, &data, &model, csv),
    }
}
