//! Peer benchmark for `scripts/bench.sh`: the `tensorboard-rs` crate (0.5.9) writing the same
//! scalars as the `TensorBoardExporter` row of `benches/throughput.rs` and the Python peer
//! (`tests/support/bench_tb_writer.py`): tags `tag000`..`tag099` × steps 1..=1000, value
//! `step * 0.001`, one `SummaryWriter::add_scalar(tag, value, step)` per (tag, step), then
//! `flush`; 5 rounds, each in a fresh temp dir; prints one table row with the median points/s.
//!
//! It is a package of its own (its own `[workspace]`, not a member of the trainmetrics build)
//! because tensorboard-rs pulls in `image` and `protobuf` 2: they must not slow the main
//! crate's test build. Built and run by `scripts/bench-peer-tbrs.sh`.
//!
//! What the crate does (read from its source): every `add_scalar` builds a one-value
//! `Summary`, wraps it in its own `Event` (wall time set, event cloned), encodes it and sends the
//! bytes over a channel to a writer thread, which writes each record with four unbuffered
//! `write` calls to a plain `File` (length, length CRC, data, data CRC). `flush()` only queues a
//! flush signal and returns at once (it does not wait for the thread, and `File::flush` is a
//! no-op); the writes are done only when the writer is dropped (`Drop` sends stop and joins the
//! thread). So each round's time runs until the drop returns: only then is everything in the
//! file, as after our exporter's `export` or the Python writer's `flush`. Neither side fsyncs
//! here. Values are `f32` and steps `usize` in this API.
//!
//! `--logdir DIR`: write one round into `DIR` and keep it (no row), to read it back with
//! TensorBoard's own loader.

use std::path::Path;
use std::time::Instant;

use tensorboard_rs::summary_writer::SummaryWriter;

const TAGS: usize = 100;
const STEPS: usize = 1000;

/// One round into `dir`: seconds from the first `add_scalar` until the writer thread has
/// written everything (flush, then drop joins it). Creating the writer is outside the timing,
/// as for the other rows.
fn round(dir: &Path, tags: &[String]) -> f64 {
    let mut writer = SummaryWriter::new(dir);
    let t = Instant::now();
    for step in 1..=STEPS {
        let value = (step as f64 * 0.001) as f32;
        for tag in tags {
            writer.add_scalar(tag, value, step);
        }
    }
    writer.flush();
    drop(writer);
    t.elapsed().as_secs_f64()
}

fn main() {
    let tags: Vec<String> = (0..TAGS).map(|i| format!("tag{i:03}")).collect();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, dir] = args.as_slice() {
        if flag == "--logdir" {
            round(Path::new(dir), &tags);
            return;
        }
    }
    if !args.is_empty() {
        eprintln!("usage: bench-peer-tensorboard-rs [--logdir DIR]");
        std::process::exit(2);
    }
    let base = std::env::temp_dir().join(format!("trainmetrics-peer-tbrs-{}", std::process::id()));
    let mut rates = Vec::new();
    for r in 0..5 {
        let dir = base.join(format!("round{r}"));
        let secs = round(&dir, &tags);
        rates.push((TAGS * STEPS) as f64 / secs);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&base);
    rates.sort_by(|a, b| a.total_cmp(b));
    let median = rates[rates.len() / 2];
    println!(
        "| peer: tensorboard-rs SummaryWriter::add_scalar (Rust) | {median:.1} | points/s | same 100 tags x 1000 steps; one event per add_scalar (100 events per step), f32 values; its flush only signals the writer thread, so timed until drop joins it |"
    );
}
