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
//! inputs found so far are also named tests ([`regressions`]).
//!
//! Layout: [`harness`] (allocation accounting, corpus, mutations), the targets by entry point
//! ([`decode`], [`receivers`], [`generated`] with its [`strategies`]), and [`regressions`].

#[path = "../common/mod.rs"]
mod common;
mod decode;
mod generated;
mod harness;
mod receivers;
mod regressions;
mod strategies;
