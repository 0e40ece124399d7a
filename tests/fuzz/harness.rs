//! The harness: allocation accounting (per thread), case counts and the seed corpus, byte-level
//! mutations of valid requests, and the decoder check every target ends in.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use prost::Message;
use trainmetrics::decode::{count_data_points, DecodeSettings, Decoded, Decoder};


pub(crate) struct CountingAlloc;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

pub(crate) fn track(delta: isize) {
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
pub(crate) fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    (out, PEAK.with(Cell::get).saturating_sub(start))
}

/// The most a decode of `input` bytes may allocate: decoded structs are larger than their wire
/// form (a 2-byte empty message becomes a struct of ~200 bytes, Vecs grow by doubling; a data
/// point of ~11 bytes carries a series name of up to 1 KiB), but never more than this factor.
pub(crate) fn allocation_bound(input: usize) -> usize {
    512 * input + (1 << 20)
}


pub(crate) fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub(crate) fn runner(target: &'static str, default_cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases: cases(default_cases),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(target))),
        max_shrink_iters: 2000,
        ..Config::default()
    })
}

pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `examples/metrics.json` of opentelemetry-proto, from cargo's registry (not copied here).
pub(crate) fn official_example() -> Vec<u8> {
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
pub(crate) fn seeds() -> Vec<(Vec<u8>, Vec<u8>)> {
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


#[derive(Debug, Clone)]
pub(crate) enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    /// Overwrite with a large varint (a declared length or count that is not there).
    BigVarint(usize),
    Truncate(usize),
}

pub(crate) fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::BigVarint),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

pub(crate) fn mutate(mut data: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
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

/// Decodes a request twice with one decoder (the second pass exercises the decoder's state) and
/// checks that every data point is accounted for.
pub(crate) fn check_decoder(req: &ExportMetricsServiceRequest, settings: DecodeSettings) -> Vec<Decoded> {
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
