//! Delivery: what is wrapped once around every exporter. Each exporter gets its own thread with a
//! bounded queue of OTLP requests (parsed once for the pipeline) in front; the thread hands them
//! to the exporter's [`Stage`] (its decoding rules, cadence windows and job view), keeps the
//! batches the stage emits in order (bounded), and calls the exporter with a timeout, retrying per [`RetrySettings`]. Submitting
//! never blocks: a full queue drops the request and counts it (`queue_full`), so the trainer's
//! hot path and the SDK's reader thread never wait on disk or network.
//!
//! # Admission: room is checked before a request is taken
//! [`Delivery::room`] is the one check, made before a request is taken (by the service before it
//! answers, by [`Delivery::submit`] in process). It counts what the exporter holds in memory:
//! - requests in the queue (`queue_size`), and their data points;
//! - open windows: one entry per window and series, whatever its inputs (a window of
//!   `every_steps: 100` is one accumulator), so aggregation windows stay small;
//! - points of output batches in memory (a spooled batch whose memory was freed does not count).
//!
//! The points must stay within `max_pending_points`, and the queued requests' bytes plus
//! [`HELD_POINT_BYTES`] per held point within `max_queued_mib`. An exporter with an empty queue
//! and no batch in memory takes one request whatever its size (while its windows hold less than
//! the limit), so no request is refused forever. Points of reorder windows drain by time,
//! batches by delivery or, with a spool, by going to disk: the worker keeps the batches in
//! memory below half the limit by spooling the oldest, so a spool takes a backlog instead of the
//! door refusing it; a full spool leaves them in memory and the door refuses. A request whose
//! points are all at or below steps its run already brought (data a collector's consumer had in
//! flight, older than what was taken) gets twice the limits: refusing it would make it `late`.
//! Fairness between runs is first come, first served: no run has a reserved share.
//! After admission nothing is dropped for room (with `spool.when_full: drop_oldest`, a full spool
//! still drops its oldest batch, `spool_full`, as configured); the in-process route counts a
//! refused collection at the door (`queue_full`, `pending_full` or `spool_full`).
//!
//! With a spool ([`crate::spool`], `sending_queue.spool`), batches also go to disk: every batch of a
//! run whose backend is failing (write-ahead, so a crash in an outage loses nothing), batches past
//! `max_pending_points` (their memory is freed; they are read back when their turn comes), and at
//! shutdown whatever is left. Order per run is kept: a batch keeps its place in the queue whether
//! its points are in memory or on disk. A new worker adopts what an earlier process left and
//! delivers it first.
//!
//! Shutdown closes every window, delivers within its timeout, spools what could not be delivered
//! (or, without a spool, counts it `shutdown_timeout`), ends the exporter's runs, and returns a
//! report. It is idempotent: a second call returns the first report. A run of this process with
//! batches left in the spool also gets an end record there ([`Batch::ended`]: FINISHED or
//! FAILED; none for `Running`), so whoever delivers the batches later (the next start,
//! `trainmetrics sync`) ends the run as this process meant to.

pub mod config;

pub use config::{DeliveryConfig, FromBackend, QueueConfig, MAX_QUEUE_SIZE};

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

use crate::cadence::{Batch, CadenceSettings, Close, EndStatus, RunEnd};
use crate::decode::{parse, DecodeSettings, Parsed};
use crate::spool::{RecordRef, Spool, SpoolError, SpoolSettings, WhenFull};
use crate::exporter::{ExportError, Exported, Exporter, RunOutcome};
use crate::jobs::JobSettings;
use crate::retry::RetrySettings;
use crate::stage::Stage;
use crate::stats::{DropReason, ExporterReport, ExporterStats};

/// Validated settings of one exporter's delivery.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Requests the queue holds (`sending_queue.queue_size`). Default 1000.
    pub queue_size: usize,
    /// Bytes of requests (protobuf size) the queue holds (`sending_queue.max_queued_mib`),
    /// so a slow backend cannot make it hold `queue_size` requests of the largest size. A
    /// request is always admitted into an empty queue. Default 256 MiB.
    pub max_queued_bytes: u64,
    /// Data points the exporter may hold in memory (`sending_queue.max_pending_points`): queued,
    /// in open windows (one per window and series) and in output batches; see the module docs'
    /// "Admission". Default 100 000.
    pub max_pending_points: usize,
    /// Bound of one export call (`timeout`). Default 10 s.
    pub timeout: Duration,
    /// Retry policy (`retry_on_failure`).
    pub retry: RetrySettings,
    /// Cadence and aggregation.
    pub cadence: CadenceSettings,
    /// Step key, run identity keys, name prefix.
    pub decode: DecodeSettings,
    /// The on-disk spool (`sending_queue.spool`); `None`: memory only.
    pub spool: Option<SpoolSettings>,
    /// The job view of distributed jobs ([`crate::jobs`]); `None`: each rank is a run of its
    /// own (TensorBoard: `<run>/rank-N`).
    pub jobs: Option<JobSettings>,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            queue_size: 1000,
            max_queued_bytes: 256 << 20,
            max_pending_points: 100_000,
            timeout: Duration::from_secs(10),
            retry: RetrySettings::default(),
            cadence: CadenceSettings::default(),
            decode: DecodeSettings::default(),
            spool: None,
            jobs: None,
        }
    }
}

/// Why a request was not accepted by [`Delivery::submit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full; the request's data points were counted `queue_full`.
    #[error("the exporter's queue is full")]
    QueueFull,
    /// The exporter has shut down; the data points were counted `queue_full`.
    #[error("the exporter has shut down")]
    Closed,
    /// The exporter holds too much (see [`NoRoom`]); the data points were counted with
    /// [`NoRoom::drop_reason`].
    #[error("{0}")]
    NoRoom(NoRoom),
}

/// Estimated memory of one held data point, bytes: a window accumulator or an output point with
/// its share of map and vector overhead (about 200 to 250 bytes for a scalar). Histograms cost
/// 16 bytes more per bucket, which this does not count.
pub const HELD_POINT_BYTES: u64 = 256;

/// Why an exporter cannot take a request now ([`Delivery::room`]). The service answers
/// `UNAVAILABLE` / 503 with a retry delay; in process the request is dropped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoRoom {
    /// `queue_size` requests wait in the queue.
    #[error("its queue holds sending_queue.queue_size requests")]
    Requests,
    /// Queued request bytes plus held points ([`HELD_POINT_BYTES`] each) would pass
    /// `max_queued_mib`.
    #[error("it would hold more than sending_queue.max_queued_mib")]
    Bytes,
    /// Queued, windowed and batched points would pass `max_pending_points`.
    #[error("it would hold more than sending_queue.max_pending_points data points")]
    Points,
    /// As `Points`, and its spool, which takes batches out of memory, is full.
    #[error("it would hold more than sending_queue.max_pending_points data points and its spool is full")]
    Spool,
}

impl NoRoom {
    /// The reason a refused request's points are counted under on the in-process route.
    pub fn drop_reason(self) -> DropReason {
        match self {
            NoRoom::Requests | NoRoom::Bytes => DropReason::QueueFull,
            NoRoom::Points => DropReason::PendingFull,
            NoRoom::Spool => DropReason::SpoolFull,
        }
    }
}

/// Why [`Delivery::flush`] did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlushError {
    /// The worker did not answer in time (an export is slow or retrying).
    #[error("flush did not complete within {0:?}")]
    Timeout(Duration),
    /// Some ready points are still waiting (the backend is failing and being retried).
    #[error("{0} data points still wait for a retry")]
    Pending(u64),
    /// The exporter has shut down.
    #[error("the exporter has shut down")]
    Closed,
}

enum Msg {
    /// A request, parsed once for every exporter.
    Request(Arc<Parsed>),
    Flush(mpsc::Sender<u64>),
    Shutdown { outcome: RunOutcome, deadline: Instant, ack: mpsc::Sender<()> },
}

/// Handle of one exporter's delivery thread. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Delivery {
    name: String,
    /// The pipeline's step and identity keys, for [`Delivery::submit`]'s parse.
    decode: DecodeSettings,
    queue_size: usize,
    max_queued_bytes: u64,
    max_pending_points: u64,
    /// The spool's size limit, when there is one.
    spool_max_bytes: Option<u64>,
    tx: SyncSender<Msg>,
    stats: Arc<ExporterStats>,
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
    report: Mutex<Option<ExporterReport>>,
    /// Whether shutdown spools what it cannot deliver (a spool is configured).
    spooled_at_shutdown: bool,
}

/// How long shutdown waits past its deadline for the worker to spool what it could not deliver.
const SPOOL_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Shared {
    /// Requests sitting in the queue.
    queued_requests: AtomicU64,
    /// Data points in requests sitting in the queue.
    queued: AtomicU64,
    /// Bytes (protobuf size) of the requests sitting in the queue.
    queued_bytes: AtomicU64,
    /// Data points the worker holds (windows + batches awaiting delivery, spooled ones included).
    held: AtomicU64,
    /// Of those, data points whose batch is in the spool.
    spooled: AtomicU64,
    /// Bytes of the spool on disk.
    spool_bytes: AtomicU64,
    /// Open windows (entries, not inputs) the worker holds.
    window_entries: AtomicU64,
    /// Points of output batches in memory.
    batch_points: AtomicU64,
}

impl Delivery {
    /// Starts the worker thread for `exporter`.
    ///
    /// Errors: the OS refused to spawn a thread.
    pub fn start<E: Exporter>(name: &str, mut exporter: E, settings: DeliverySettings) -> std::io::Result<Self> {
        let queue_size = settings.queue_size;
        let decode = settings.decode.clone();
        let max_queued_bytes = settings.max_queued_bytes;
        let max_pending_points = settings.max_pending_points as u64;
        let spool_max_bytes = settings.spool.as_ref().map(|s| s.max_bytes);
        let spooled_at_shutdown = settings.spool.is_some();
        let (tx, rx) = mpsc::sync_channel(queue_size.max(1));
        let stats = Arc::new(ExporterStats::default());
        exporter.attach_stats(stats.clone());
        let shared = Arc::new(Shared::default());
        let mut worker = Worker {
            name: name.to_string(),
            exporter,
            stage: Stage::new(name, settings.decode.clone(), settings.cadence.clone(), settings.jobs.clone(), stats.clone(), Instant::now()),
            out: VecDeque::new(),
            out_points: 0,
            failing: HashMap::new(),
            control: VecDeque::new(),
            spool: None,
            spooling_logged: false,
            own_runs: Default::default(),
            settings,
            stats: stats.clone(),
            shared: shared.clone(),
        };
        worker.open_spool();
        let handle = std::thread::Builder::new()
            .name(format!("trainmetrics-{name}"))
            .spawn(move || worker.run(rx))?;
        Ok(Self {
            name: name.to_string(),
            decode,
            queue_size: queue_size.max(1),
            max_queued_bytes: max_queued_bytes.max(1),
            max_pending_points: max_pending_points.max(1),
            spool_max_bytes,
            tx,
            stats,
            shared,
            worker: Mutex::new(Some(handle)),
            report: Mutex::new(None),
            spooled_at_shutdown,
        })
    }

    /// The exporter's configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hands a request to the exporter without blocking. Its data points count as received; if
    /// the exporter has no room ([`Delivery::room`]) or is closed they also count as dropped
    /// (`queue_full`, `pending_full` or `spool_full`; see [`NoRoom::drop_reason`]).
    pub fn submit(&self, req: Arc<ExportMetricsServiceRequest>) -> Result<(), SubmitError> {
        let parsed = parse(&req, &self.decode);
        let (n, bytes) = (parsed.data_points, parsed.bytes);
        if let Err(why) = self.room(n, bytes, false) {
            self.stats.add_received(n);
            self.stats.add_dropped(why.drop_reason(), n);
            return Err(if why == NoRoom::Requests { SubmitError::QueueFull } else { SubmitError::NoRoom(why) });
        }
        self.enqueue(Arc::new(parsed))
    }

    /// Hands over a request the caller parsed ([`parse`], once for every exporter) and found
    /// room for with [`Delivery::room`] (the receiver, which serialises check and hand-over): no
    /// second check, which could refuse a request already promised.
    pub(crate) fn submit_admitted(&self, parsed: Arc<Parsed>) -> Result<(), SubmitError> {
        self.enqueue(parsed)
    }

    fn enqueue(&self, parsed: Arc<Parsed>) -> Result<(), SubmitError> {
        let (n, bytes) = (parsed.data_points, parsed.bytes);
        self.stats.add_received(n);
        self.shared.queued.fetch_add(n, Ordering::Relaxed);
        self.shared.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.shared.queued_requests.fetch_add(1, Ordering::Relaxed);
        let err = match self.tx.try_send(Msg::Request(parsed)) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(_)) => SubmitError::QueueFull,
            Err(TrySendError::Disconnected(_)) => SubmitError::Closed,
        };
        self.shared.queued_requests.fetch_sub(1, Ordering::Relaxed);
        self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.shared.queued.fetch_sub(n, Ordering::Relaxed);
        self.stats.add_dropped(DropReason::QueueFull, n);
        Err(err)
    }

    /// Whether the exporter can take a request of `points` data points and `bytes` (protobuf
    /// size) now, by the rules of the module docs' "Admission". `older` says every point of the
    /// request is at or below a step its run already brought (the limits are doubled for it).
    pub fn room(&self, points: u64, bytes: u64, older: bool) -> Result<(), NoRoom> {
        let requests = self.shared.queued_requests.load(Ordering::Relaxed);
        if requests >= self.queue_size as u64 {
            return Err(NoRoom::Requests);
        }
        let windows = self.shared.window_entries.load(Ordering::Relaxed);
        let batches = self.shared.batch_points.load(Ordering::Relaxed);
        if requests == 0 && batches == 0 && windows < self.max_pending_points {
            // Nothing waits for delivery: one request of any size, so none is refused forever.
            return Ok(());
        }
        let scale = if older { 2 } else { 1 };
        let held = self.shared.queued.load(Ordering::Relaxed) + windows + batches;
        let held_bytes = self.shared.queued_bytes.load(Ordering::Relaxed) + (windows + batches) * HELD_POINT_BYTES;
        if held_bytes.saturating_add(bytes) > self.max_queued_bytes.saturating_mul(scale) {
            return Err(NoRoom::Bytes);
        }
        if held.saturating_add(points) > self.max_pending_points.saturating_mul(scale) {
            let spool_full =
                self.spool_max_bytes.is_some_and(|max| self.shared.spool_bytes.load(Ordering::Relaxed) >= max);
            return Err(if spool_full { NoRoom::Spool } else { NoRoom::Points });
        }
        Ok(())
    }

    /// Delivers what the cadence has made ready, waiting at most `timeout`. Windows that are
    /// still open stay open.
    pub fn flush(&self, timeout: Duration) -> Result<(), FlushError> {
        let deadline = Instant::now() + timeout;
        let (ack, done) = mpsc::channel();
        match self.send_until(Msg::Flush(ack), deadline) {
            Sent::Yes => {}
            Sent::Closed => return Err(FlushError::Closed),
            Sent::TimedOut => return Err(FlushError::Timeout(timeout)),
        }
        match done.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(0) => Ok(()),
            Ok(n) => Err(FlushError::Pending(n)),
            Err(_) => Err(FlushError::Timeout(timeout)),
        }
    }

    /// A live snapshot of the counters.
    pub fn report(&self) -> ExporterReport {
        // `try_lock`: a shutdown in progress holds the lock until it is done, and `/health` and
        // `/metrics` must answer meanwhile, with the live counts.
        if let Ok(r) = self.report.try_lock() {
            if let Some(r) = r.as_ref() {
                return r.clone();
            }
        }
        let pending = self.shared.queued.load(Ordering::Relaxed) + self.shared.held.load(Ordering::Relaxed);
        self.with_spool(self.stats.report(&self.name, pending))
    }

    fn with_spool(&self, mut r: ExporterReport) -> ExporterReport {
        r.spooled = self.shared.spooled.load(Ordering::Relaxed);
        r.spool_bytes = self.shared.spool_bytes.load(Ordering::Relaxed);
        r
    }

    /// Shuts the exporter down within `timeout` (see the module docs) and returns its report.
    /// Idempotent: later calls return the first report at once.
    pub fn shutdown(&self, outcome: RunOutcome, timeout: Duration) -> ExporterReport {
        let Ok(mut cached) = self.report.lock() else {
            return self.with_spool(self.stats.report(&self.name, 0));
        };
        if let Some(r) = cached.as_ref() {
            return r.clone();
        }
        let started = Instant::now();
        let deadline = started.checked_add(timeout).unwrap_or_else(|| started + Duration::from_secs(3600));
        let alive = self.worker.lock().ok().and_then(|w| w.as_ref().map(|h| !h.is_finished())).unwrap_or(false);
        let (ack, done) = mpsc::channel();
        let sent = alive && self.send_until(Msg::Shutdown { outcome, deadline, ack }, deadline) == Sent::Yes;
        let mut finished = sent && done.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok();
        if sent && !finished && self.spooled_at_shutdown {
            // Past the deadline the worker spools what it could not deliver (one disk flush):
            // a moment more makes those points "spooled" in the report rather than "lost".
            finished = done.recv_timeout(SPOOL_GRACE).is_ok();
        }
        if finished {
            if let Ok(mut w) = self.worker.lock() {
                if let Some(h) = w.take() {
                    let _ = h.join();
                }
            }
        } else {
            // The worker is stuck in an export (or died): whatever is neither delivered nor
            // dropped yet is reported as not delivered, so the report still adds up. The thread
            // is left to finish on its own.
            let now = self.stats.report(&self.name, 0);
            let spooled = self.shared.spooled.load(Ordering::Relaxed);
            let left = now.received.saturating_sub(now.delivered + now.dropped_total() + spooled);
            self.stats.add_dropped(DropReason::ShutdownTimeout, left);
            let why = if alive { format!("shutdown timed out after {timeout:?}") } else { "the exporter's worker thread has died".to_string() };
            tracing::warn!(exporter = %self.name, not_delivered = left, "{why}");
            self.stats.set_last_error(why);
        }
        // What the spool keeps for the next start is still pending (received = delivered +
        // dropped + pending holds).
        let report = self.with_spool(self.stats.report(&self.name, self.shared.spooled.load(Ordering::Relaxed)));
        *cached = Some(report.clone());
        report
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Sent {
    Yes,
    Closed,
    TimedOut,
}

impl Delivery {
    /// Sends a control message; the queue may be full while the worker exports, so this retries
    /// until `deadline` rather than blocking without bound.
    fn send_until(&self, mut msg: Msg, deadline: Instant) -> Sent {
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => return Sent::Yes,
                Err(TrySendError::Disconnected(_)) => return Sent::Closed,
                Err(TrySendError::Full(m)) => {
                    if Instant::now() >= deadline {
                        return Sent::TimedOut;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

struct Failing {
    since: Instant,
    attempts: u32,
    next_at: Instant,
}

/// A batch awaiting delivery: its points in memory, on disk, or both.
struct Queued {
    key: String,
    inputs: u64,
    /// `None` while only the spool has it (read back when its turn comes).
    batch: Option<Batch>,
    spooled: Option<RecordRef>,
}

impl Queued {
    fn points_in_memory(&self) -> usize {
        self.batch.as_ref().map_or(0, |b| b.points.len())
    }
}

struct Worker<E: Exporter> {
    name: String,
    exporter: E,
    /// Decoding, windows and job view: requests in, batches out.
    stage: Stage,
    out: VecDeque<Queued>,
    /// Points of the batches in `out` that are in memory (what `max_pending_points` bounds).
    out_points: usize,
    /// Runs whose head batch failed with a retryable error, until when they wait. Other runs'
    /// batches go on: one run's broken directory or rejected run must not stall the rest.
    failing: HashMap<String, Failing>,
    /// Control messages found while draining batches, handled in arrival order.
    control: VecDeque<Msg>,
    spool: Option<Spool>,
    /// Whether "spooling to disk" was logged for the current stretch of spooling.
    spooling_logged: bool,
    /// With a spool: run keys whose data this process received (not only adopted), the runs
    /// whose end this process's outcome decides.
    own_runs: std::collections::HashSet<String>,
    settings: DeliverySettings,
    stats: Arc<ExporterStats>,
    shared: Arc<Shared>,
}

/// How often the worker wakes without input, to close windows whose linger or interval passed.
const TICK: Duration = Duration::from_millis(200);
/// Longest stretch of exporting before the worker looks at its queue again (so a large backlog
/// never hides a shutdown or fills the queue).
const DELIVER_SLICE: Duration = Duration::from_millis(200);

impl<E: Exporter> Worker<E> {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let msg = match self.control.pop_front() {
                Some(m) => Some(m),
                None => match rx.recv_timeout(self.wait(Instant::now())) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        // Every handle is gone without a shutdown call: finish as cleanly as we can.
                        self.finish(&rx, RunOutcome::Finished, Instant::now() + Duration::from_secs(5));
                        return;
                    }
                },
            };
            match msg {
                Some(Msg::Request(parsed)) => self.ingest(&parsed),
                Some(Msg::Flush(ack)) => {
                    self.drain_queue(&rx);
                    self.close_windows(Close::Due);
                    self.deliver(None);
                    let _ = ack.send(self.out.iter().map(|q| q.inputs).sum());
                }
                Some(Msg::Shutdown { outcome, deadline, ack }) => {
                    self.finish(&rx, outcome, deadline);
                    let _ = ack.send(());
                    return;
                }
                None => {}
            }
            self.close_windows(Close::Due);
            self.deliver(None);
            self.publish_held();
        }
    }

    /// How long to wait for input: until the next window may close or a failing run may retry.
    fn wait(&self, now: Instant) -> Duration {
        let mut wake = now + TICK;
        if let Some(due) = self.stage.next_due(now) {
            wake = wake.min(due);
        }
        for b in &self.out {
            match self.failing.get(&b.key) {
                Some(f) => wake = wake.min(f.next_at.max(now)),
                // A batch that is not waiting for a retry is deliverable now.
                None => return Duration::ZERO,
            }
        }
        wake.saturating_duration_since(now)
    }

    fn publish_held(&self) {
        let held = self.stage.pending_inputs() + self.out.iter().map(|q| q.inputs).sum::<u64>();
        self.shared.held.store(held, Ordering::Relaxed);
        self.shared.window_entries.store(self.stage.held_entries(), Ordering::Relaxed);
        self.shared.batch_points.store(self.out_points as u64, Ordering::Relaxed);
        let spooled = self.out.iter().filter(|q| q.spooled.is_some()).map(|q| q.inputs).sum();
        self.shared.spooled.store(spooled, Ordering::Relaxed);
        self.shared.spool_bytes.store(self.spool.as_ref().map_or(0, Spool::bytes), Ordering::Relaxed);
    }

    /// Opens the spool and queues what earlier processes left (before anything new). A spool
    /// that cannot be opened is reported and the exporter goes on in memory.
    fn open_spool(&mut self) {
        let Some(settings) = self.settings.spool.clone() else { return };
        let dir = settings.directory.clone();
        let (spool, opened) = match Spool::open(&self.name, settings) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(exporter = %self.name, "spool disabled: {e}");
                self.stats.set_last_error(format!("spool disabled: {e}"));
                return;
            }
        };
        self.spool = Some(spool);
        if opened.corrupt_bytes > 0 {
            tracing::warn!(exporter = %self.name, bytes = opened.corrupt_bytes, "spool: torn or damaged records skipped");
            self.stats.add_event("spool_corrupt_bytes", opened.corrupt_bytes);
        }
        let mut inputs = 0;
        let mut seen = std::collections::HashSet::new();
        for r in opened.replayed {
            if seen.insert(r.batch.run.key.clone()) {
                self.exporter.observe_run(&r.batch.run);
            }
            let n = r.batch.inputs();
            inputs += n;
            let points = r.batch.points.len();
            // Keep in memory what fits; the rest is read back when its turn comes.
            let keep = self.out_points + points <= self.settings.max_pending_points;
            if keep {
                self.out_points += points;
            }
            self.out.push_back(Queued { key: r.batch.run.process_key().into_owned(), inputs: n, batch: keep.then_some(r.batch), spooled: Some(r.at) });
        }
        if inputs > 0 {
            self.stats.add_received(inputs);
            self.stats.add_event("replayed_from_spool", inputs);
            tracing::info!(exporter = %self.name, points = inputs, batches = self.out.len(), dir = %dir.display(), "replaying what an earlier process left in the spool");
        }
        self.publish_held();
    }

    /// Writes the batch at `i` to the spool if it is not there yet. False if it could not be.
    fn persist(&mut self, i: usize) -> Result<(), SpoolError> {
        let (Some(spool), Some(q)) = (self.spool.as_mut(), self.out.get_mut(i)) else {
            return Err(SpoolError::Full { max_bytes: 0 });
        };
        if q.spooled.is_some() {
            return Ok(());
        }
        let Some(batch) = q.batch.as_ref() else { return Ok(()) };
        match spool.append(batch) {
            Ok(at) => {
                q.spooled = Some(at);
                if !self.spooling_logged {
                    self.spooling_logged = true;
                    tracing::info!(exporter = %self.name, dir = %spool.directory().display(), "spooling batches to disk");
                }
                Ok(())
            }
            Err(e) => {
                if !matches!(e, SpoolError::Full { .. }) {
                    tracing::warn!(exporter = %self.name, "could not spool a batch: {e}");
                }
                self.stats.set_last_error(e.to_string());
                Err(e)
            }
        }
    }

    /// Spools every queued batch of `key` (its backend is failing).
    fn persist_run(&mut self, key: &str) {
        if self.spool.is_none() {
            return;
        }
        let idx: Vec<usize> = (0..self.out.len()).filter(|&i| self.out[i].key == key && self.out[i].spooled.is_none()).collect();
        for i in idx {
            if let Err(SpoolError::Full { .. }) = self.persist(i) {
                break;
            }
        }
    }

    fn ingest(&mut self, parsed: &Parsed) {
        let (n, bytes) = (parsed.data_points, parsed.bytes);
        for run in self.stage.ingest(parsed, Instant::now()) {
            if self.spool.is_some() {
                // Batches are queued under the process (a rank) or, after a job view, the job.
                for key in [run.process_key().into_owned(), run.key.clone()] {
                    if !self.own_runs.contains(&key) {
                        self.own_runs.insert(key);
                    }
                }
            }
            self.exporter.observe_run(&run);
        }
        // Publish before the queue count drops, so the points are always counted somewhere.
        self.publish_held();
        self.shared.queued.fetch_sub(n, Ordering::Relaxed);
        self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.shared.queued_requests.fetch_sub(1, Ordering::Relaxed);
    }

    fn drain_queue(&mut self, rx: &Receiver<Msg>) {
        while let Ok(m) = rx.try_recv() {
            match m {
                Msg::Request(parsed) => self.ingest(&parsed),
                m => self.control.push_back(m),
            }
        }
    }

    fn close_windows(&mut self, close: Close) {
        let now = Instant::now();
        for b in self.stage.take_ready(now, close) {
            self.out_points += b.points.len();
            let key = b.run.process_key().into_owned();
            let failing = self.failing.contains_key(&key);
            self.out.push_back(Queued { key, inputs: b.inputs(), batch: Some(b), spooled: None });
            if failing && self.spool.is_some() {
                // Write-ahead while the backend is down: a crash now loses nothing. A full spool
                // keeps the batch in memory (the door refuses once memory is full), unless the
                // user chose to trade the oldest batch for it.
                if let Err(SpoolError::Full { .. }) = self.persist(self.out.len() - 1) {
                    if self.drops_oldest() {
                        self.spool_full_newest();
                    }
                }
            }
        }
        self.fit_memory();
    }

    /// With a spool, keeps the batches in memory (with the windows' entries) below half of
    /// `max_pending_points`, so the door keeps room: spooled batches give up their memory
    /// first, then the oldest batches are spooled (oldest first keeps the spool in queue order
    /// for a replay). Without a spool, or with a full one, nothing is dropped here: admission
    /// bounds memory (see the module docs' "Admission"), except that `when_full: drop_oldest`
    /// drops the oldest batch when the spool is full, as configured.
    fn fit_memory(&mut self) {
        if self.spool.is_none() {
            return;
        }
        let target = self.settings.max_pending_points / 2;
        let windows = self.stage.window_entries() as usize;
        let mut i = 0;
        while self.out_points + windows > target && i < self.out.len() {
            if self.out[i].spooled.is_none() && self.persist(i).is_err() {
                break;
            }
            if self.out[i].spooled.is_some() {
                self.out_points -= self.out[i].points_in_memory();
                self.out[i].batch = None;
            }
            i += 1;
        }
        while self.drops_oldest() && self.out_points + windows > self.settings.max_pending_points {
            if !self.spool_full_newest() {
                break;
            }
        }
    }

    fn drops_oldest(&self) -> bool {
        self.settings.spool.as_ref().is_some_and(|s| s.when_full == WhenFull::DropOldest)
    }

    /// The spool is full: applies `when_full` once (drops one batch, counted `spool_full`).
    /// False if there was nothing to drop.
    fn spool_full_newest(&mut self) -> bool {
        let policy = self.settings.spool.as_ref().map_or(WhenFull::DropNewest, |s| s.when_full);
        let i = match policy {
            WhenFull::DropNewest => self.out.iter().rposition(|q| q.spooled.is_none() && q.batch.is_some()),
            WhenFull::DropOldest => (!self.out.is_empty()).then_some(0),
        };
        let Some(i) = i else { return false };
        let inputs = self.out[i].inputs;
        let key = self.out[i].key.clone();
        self.remove(i);
        self.stats.add_dropped(DropReason::SpoolFull, inputs);
        tracing::warn!(exporter = %self.name, run = %key, dropped = inputs, ?policy, "the spool is full; a batch was dropped");
        true
    }

    /// Calls the exporter, turning a panic into a permanent error: a bug or hostile input in one
    /// batch must not kill the worker (and with it every later batch).
    fn export_guarded(&mut self, i: usize, timeout: Duration) -> Result<Exported, ExportError> {
        self.load(i)?;
        let Some(batch) = self.out.get(i).and_then(|q| q.batch.as_ref()) else {
            return Err(ExportError::Permanent { message: "batch vanished".into() });
        };
        let exporter = &mut self.exporter;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exporter.export(batch, timeout))).unwrap_or_else(|_| {
            Err(ExportError::Permanent { message: "the exporter panicked on this batch".into() })
        })
    }

    /// Reads a spooled batch back into memory for its export.
    fn load(&mut self, i: usize) -> Result<(), ExportError> {
        let Some(q) = self.out.get_mut(i) else { return Ok(()) };
        if q.batch.is_some() {
            return Ok(());
        }
        let (Some(spool), Some(at)) = (self.spool.as_mut(), q.spooled) else {
            return Err(ExportError::Permanent { message: "batch vanished".into() });
        };
        match spool.read(at) {
            Ok(b) => {
                self.out_points += b.points.len();
                q.batch = Some(b);
                Ok(())
            }
            Err(e) => Err(ExportError::Permanent { message: format!("cannot read the batch back from the spool: {e}") }),
        }
    }

    /// One pass over the waiting batches in order, skipping runs that wait for a retry (a run's
    /// later batches wait behind its failed one, so each run stays in order). Stops after
    /// [`DELIVER_SLICE`]. With a deadline (shutdown), calls are bounded by it and
    /// `max_elapsed_time` does not apply.
    fn deliver(&mut self, deadline: Option<Instant>) {
        let started = Instant::now();
        let mut i = 0;
        while i < self.out.len() && started.elapsed() < DELIVER_SLICE {
            let now = Instant::now();
            let key = self.out[i].key.clone();
            if self.failing.get(&key).is_some_and(|f| now < f.next_at) {
                i += 1;
                continue;
            }
            let mut timeout = self.settings.timeout;
            if let Some(d) = deadline {
                timeout = timeout.min(d.saturating_duration_since(now));
                if timeout.is_zero() {
                    return;
                }
            }
            let result = self.export_guarded(i, timeout);
            let inputs = self.out[i].inputs;
            match result {
                Ok(exported) => {
                    let mut refused = 0;
                    for (j, reason) in exported.refused {
                        if let Some(p) = self.out[i].batch.as_ref().and_then(|b| b.points.get(j)) {
                            self.stats.add_dropped(reason, p.inputs);
                            refused += p.inputs;
                        }
                    }
                    self.stats.add_delivered(inputs.saturating_sub(refused));
                    if let Some(f) = self.failing.remove(&key) {
                        tracing::info!(exporter = %self.name, run = %key, attempts = f.attempts, down_for = ?f.since.elapsed(), "export recovered");
                    }
                    self.remove(i);
                }
                Err(ExportError::Permanent { message }) => {
                    self.stats.add_dropped(DropReason::Rejected, inputs);
                    tracing::error!(exporter = %self.name, run = %key, points = inputs, "batch rejected: {message}");
                    self.stats.set_last_error(message);
                    self.failing.remove(&key);
                    self.remove(i);
                }
                Err(ExportError::Retryable { message, retry_after }) => {
                    self.stats.add_retry();
                    let now = Instant::now();
                    if !self.failing.contains_key(&key) {
                        tracing::warn!(exporter = %self.name, run = %key, "export failing, will retry: {message}");
                        self.failing.insert(key.clone(), Failing { since: now, attempts: 0, next_at: now });
                        self.persist_run(&key);
                    }
                    let retry = &self.settings.retry;
                    let Some(f) = self.failing.get_mut(&key) else {
                        i += 1;
                        continue;
                    };
                    f.attempts += 1;
                    // With a spool, a batch waits as long as the spool has room for it (its limit
                    // and `when_full` bound the wait); `max_elapsed_time` bounds memory-only ones.
                    let exhausted = !retry.enabled
                        || (deadline.is_none()
                            && self.spool.is_none()
                            && now.saturating_duration_since(f.since) >= retry.max_elapsed_time);
                    self.stats.set_last_error(message);
                    if exhausted {
                        self.stats.add_dropped(DropReason::RetryExhausted, inputs);
                        tracing::error!(exporter = %self.name, run = %key, points = inputs, "giving up on a batch after retries");
                        self.failing.remove(&key);
                        self.remove(i);
                    } else {
                        let delay = retry.delay(f.attempts, retry_after);
                        f.next_at = now.checked_add(delay).unwrap_or(now + retry.max_elapsed_time);
                        i += 1;
                    }
                }
            }
        }
    }

    /// Takes the batch at `i` out of the queue (delivered or dropped), freeing its spool record.
    fn remove(&mut self, i: usize) {
        if let Some(q) = self.out.remove(i) {
            self.out_points -= q.points_in_memory();
            if let (Some(spool), Some(at)) = (self.spool.as_mut(), q.spooled) {
                spool.ack(at);
            }
        }
        if self.out.iter().all(|q| q.spooled.is_none()) {
            self.spooling_logged = false;
        }
    }

    /// At shutdown, after the last batches went to the spool: one end record per run that still
    /// has batches there, so whoever delivers them later (the next start, `trainmetrics sync`)
    /// also ends the run as this process would have (`Running`: none, the run goes on).
    fn spool_run_ends(&mut self, outcome: RunOutcome) {
        let status = match outcome {
            RunOutcome::Finished => EndStatus::Finished,
            RunOutcome::Failed => EndStatus::Failed,
            RunOutcome::Running => return,
        };
        let Some(spool) = self.spool.as_mut() else { return };
        let time_unix_nano = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let mut done = std::collections::HashSet::new();
        for q in self.out.iter().rev() {
            let Some(at) = q.spooled else { continue };
            // Batches adopted from an earlier process carry that process's own end record.
            if !self.own_runs.contains(&q.key) || !done.insert(q.key.clone()) {
                continue;
            }
            let run = match q.batch.as_ref() {
                Some(b) => b.run.clone(),
                None => match spool.read(at) {
                    Ok(b) => b.run,
                    Err(e) => {
                        tracing::warn!(exporter = %self.name, run = %q.key, "could not spool the run's end: {e}");
                        continue;
                    }
                },
            };
            let end = Batch { run, ended: Some(RunEnd { status, time_unix_nano }), ..Default::default() };
            if let Err(e) = spool.append(&end) {
                tracing::warn!(exporter = %self.name, run = %q.key, "could not spool the run's end ({}): {e}", status.as_str());
            }
        }
    }

    fn finish(&mut self, rx: &Receiver<Msg>, outcome: RunOutcome, deadline: Instant) {
        self.drain_queue(rx);
        for m in self.control.drain(..) {
            // Flushes queued behind the shutdown are answered; the shutdown itself delivers.
            if let Msg::Flush(ack) = m {
                let _ = ack.send(0);
            }
        }
        self.close_windows(Close::All);
        // Keep a slice of the time for ending runs (MLflow run status) after delivery.
        let total = deadline.saturating_duration_since(Instant::now());
        let reserve = (total / 5).min(Duration::from_secs(2));
        let until = deadline - reserve;
        while !self.out.is_empty() && Instant::now() < until {
            self.deliver(Some(until));
            let next = self.out.iter().filter_map(|b| self.failing.get(&b.key).map(|f| f.next_at)).min();
            match next {
                Some(t) if t < until => std::thread::sleep(t.saturating_duration_since(Instant::now())),
                Some(_) if self.out.iter().all(|b| self.failing.contains_key(&b.key)) => break,
                _ => {}
            }
        }
        // What is left goes to the spool for the next start (one disk flush for all of it);
        // what cannot is not delivered.
        if let Some(spool) = self.spool.as_mut() {
            spool.defer_sync();
        }
        let mut lost = 0;
        for i in 0..self.out.len() {
            if self.out[i].spooled.is_none() && (self.spool.is_none() || self.persist(i).is_err()) {
                lost += self.out[i].inputs;
            }
        }
        self.spool_run_ends(outcome);
        if let Some(Err(e)) = self.spool.as_mut().map(Spool::sync) {
            tracing::warn!(exporter = %self.name, "spool: {e}");
            self.stats.set_last_error(e.to_string());
        }
        let spooled: u64 = self.out.iter().filter(|q| q.spooled.is_some()).map(|q| q.inputs).sum();
        self.stage.flush_log();
        if lost > 0 {
            self.stats.add_dropped(DropReason::ShutdownTimeout, lost);
            tracing::warn!(exporter = %self.name, not_delivered = lost, "shutdown deadline reached before delivery");
        }
        if spooled > 0 {
            tracing::warn!(exporter = %self.name, points = spooled,
                dir = %self.spool.as_ref().map(|s| s.directory().display().to_string()).unwrap_or_default(),
                "not delivered before shutdown; kept in the spool for the next start");
        }
        self.shared.spooled.store(spooled, Ordering::Relaxed);
        self.shared.spool_bytes.store(self.spool.as_ref().map_or(0, Spool::bytes), Ordering::Relaxed);
        // Spooled records stay on disk (not acknowledged) for the next process.
        self.out.clear();
        self.out_points = 0;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let exporter = &mut self.exporter;
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            exporter.end_runs(outcome, remaining.max(Duration::from_millis(100)))
        }));
        match ended {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(exporter = %self.name, "could not end runs: {e}");
                self.stats.set_last_error(e.to_string());
            }
            Err(_) => self.stats.set_last_error("the exporter panicked while ending runs".into()),
        }
        self.shared.held.store(0, Ordering::Relaxed);
        self.shared.queued.store(0, Ordering::Relaxed);
        self.shared.queued_requests.store(0, Ordering::Relaxed);
        self.shared.queued_bytes.store(0, Ordering::Relaxed);
        self.shared.window_entries.store(0, Ordering::Relaxed);
        self.shared.batch_points.store(0, Ordering::Relaxed);
    }
}
