//! Context-parallel attention step (forward + backward of one long causal sequence) at
//! cp = 1, 2, 4, 8: ring attention vs TokenRing, with compute time, communication time and
//! how much of the communication the schedule hides.
//!
//! ```sh
//! cargo run --release -p switchyard-parallel --bin cp-bench -- \
//!     [--seq 4096] [--heads 4] [--head-dim 64] [--batch 1] [--ranks 1,2,4,8] \
//!     [--latency-us 10] [--bandwidth-gbps 1,10] [--reps 3]
//! ```
//!
//! # Honest compute on a small machine: measure, record, replay
//!
//! The ranks are threads of one process (`LocalWorld`). With 8 ranks on 2 cores, ranks that
//! compute at the same time slow each other down, and a wall-clock step (e.g. `LocalWorld`
//! with a sleeping `LinkModel`) would measure the oversubscribed machine, not the schedule.
//! So the benchmark separates the two:
//! 1. **Measure.** The real algorithm runs on `W` threads over `LocalWorld` (no link model:
//!    the data really moves, instantly). Each emulated machine is one core: a rank runs
//!    inside its own one-thread rayon pool, so its tensor kernels run on its own thread,
//!    and a compute segment (the work between two communication calls) is charged the CPU
//!    time of that thread (Linux `/proc/thread-self/schedstat`; wall time where that is
//!    unavailable). CPU time does not grow when other processes share the cores (this
//!    machine is shared), and a rank computes only while it holds the process's single
//!    CPU token, which it gives up whenever it blocks in `wait`, so the ranks do not
//!    compete for caches either. Each rank records its trace: compute segments, sends
//!    (peer, tag, bytes), waits. The algorithms never branch on timing, so the trace is
//!    the schedule itself.
//! 2. **Replay.** The traces are replayed on per-rank virtual clocks with the local
//!    backend's `LinkModel` cost (latency + bytes / bandwidth per message): a message sent
//!    at `t` arrives at `max(t, link free) + cost`; messages on one directed link queue
//!    (a fully connected network of full-duplex links, as NVLink/NVSwitch, the setting
//!    TokenRing targets); waiting for a receive (or for a send to be delivered) moves the
//!    clock to the arrival. The same traces are also replayed with free links (cost 0).
//!
//! Reported, for the rank that finishes last: step time; its compute; "comm", the summed
//! link cost of the messages it received (what it would pay with no overlap at all);
//! "exposed", step time minus the step time with free links (the communication the
//! schedule did not hide; waiting for slower peers is not counted); hidden =
//! 1 - exposed / comm. "Efficiency" is the summed compute of all ranks over W x step.
//! Each configuration is measured `--reps` times; the traces of the repetitions have the
//! same events, and each compute segment keeps its shortest measurement (on a shared
//! machine, noise only ever adds time: preemption, a busy sibling hyperthread). Every link
//! model is replayed from the same combined traces, so the columns of one row, and the
//! rows of one configuration under different links, compare like with like.
//!
//! cp = 1 is the same operation on one rank: one N x N tile (N = S), which materialises
//! the S x S scores; blockwise tiles at cp > 1 are smaller and cache-friendlier, so speedups
//! over cp = 1 can exceed cp. The efficiency column does not depend on that baseline.
//!
//! Shape legend: B batch, H heads, S sequence, N = S / W local tokens, Dh head dim.

// The recording communicator implements `Communicator`, whose methods return `comm`'s
// error type by value (see `switchyard_comm`'s own allowance).
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::{Device, Tensor, TensorData};
use switchyard_comm::{
    BackendKind, Buffer, CommError, Communicator, LinkModel, LocalWorld, PendingOp, ReduceOp,
    Request,
};
use switchyard_parallel::cp::{CpAlgorithm, CpAttention, Sharding, context_attention};
use switchyard_tools::clock::{Cpu, thread_cpu_time};

/// A message: (source, destination, tag, sequence number on that triple).
type MsgId = (usize, usize, u32, usize);

#[derive(Debug, Clone, Copy)]
enum Event {
    /// Seconds of exclusive compute.
    Compute(f64),
    Send {
        msg: MsgId,
        bytes: usize,
    },
    /// Blocks until the message has arrived (a receive, or a send's delivery).
    Wait(MsgId),
}

/// The compute clock: thread CPU time where available, else wall time since `origin`.
fn compute_clock(origin: Instant) -> f64 {
    thread_cpu_time().unwrap_or_else(|| origin.elapsed().as_secs_f64())
}

struct TraceState {
    /// Between `start` and `stop`: holding the CPU token and recording.
    running: bool,
    origin: Instant,
    /// `compute_clock` when the rank last resumed computing.
    resumed: f64,
    events: Vec<Event>,
    sent: HashMap<(usize, u32), usize>,
    received: HashMap<(usize, u32), usize>,
}

/// One rank's recorder.
struct Recorder {
    rank: usize,
    cpu: Arc<Cpu>,
    st: Mutex<TraceState>,
}

impl Recorder {
    fn start(&self) {
        self.cpu.acquire();
        let mut st = self.st.lock().unwrap();
        st.running = true;
        st.resumed = compute_clock(st.origin);
        st.events.clear();
        st.sent.clear();
        st.received.clear();
    }

    /// Records the compute since the last checkpoint.
    fn checkpoint(st: &mut TraceState) {
        if st.running {
            let now = compute_clock(st.origin);
            st.events.push(Event::Compute((now - st.resumed).max(0.0)));
            st.resumed = now;
        }
    }

    /// Runs a blocking wait without the CPU token.
    fn blocking<T>(&self, msg: Option<MsgId>, f: impl FnOnce() -> T) -> T {
        let running = {
            let mut st = self.st.lock().unwrap();
            Self::checkpoint(&mut st);
            if let (true, Some(msg)) = (st.running, msg) {
                st.events.push(Event::Wait(msg));
            }
            st.running
        };
        if !running {
            return f();
        }
        self.cpu.release();
        let out = f();
        self.cpu.acquire();
        let mut st = self.st.lock().unwrap();
        st.resumed = compute_clock(st.origin);
        out
    }

    fn stop(&self) -> Vec<Event> {
        let mut st = self.st.lock().unwrap();
        Self::checkpoint(&mut st);
        st.running = false;
        self.cpu.release();
        std::mem::take(&mut st.events)
    }
}

/// A communicator that records the trace of its rank: every call is a checkpoint, every
/// wait gives the CPU token up.
struct RecordingComm {
    inner: Box<dyn Communicator>,
    rec: Arc<Recorder>,
}

struct Recorded {
    inner: Request,
    rec: Arc<Recorder>,
    msg: Option<MsgId>,
}

impl PendingOp for Recorded {
    fn test(&mut self) -> switchyard_comm::Result<bool> {
        self.inner.test()
    }

    fn wait(self: Box<Self>) -> switchyard_comm::Result<Buffer> {
        let Recorded { inner, rec, msg } = *self;
        rec.blocking(msg, || inner.wait())
    }
}

impl RecordingComm {
    fn wrap(&self, inner: Request, msg: Option<MsgId>) -> Request {
        Request::new(Recorded {
            inner,
            rec: self.rec.clone(),
            msg,
        })
    }

    fn collective(&self, r: switchyard_comm::Result<Request>) -> switchyard_comm::Result<Request> {
        Recorder::checkpoint(&mut self.rec.st.lock().unwrap());
        Ok(self.wrap(r?, None))
    }
}

impl Communicator for RecordingComm {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn backend(&self) -> BackendKind {
        self.inner.backend()
    }
    fn timeout(&self) -> Duration {
        self.inner.timeout()
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.inner.set_timeout(timeout)
    }
    fn detects_mismatch(&self) -> bool {
        self.inner.detects_mismatch()
    }
    fn i_barrier(&self) -> switchyard_comm::Result<Request> {
        self.collective(self.inner.i_barrier())
    }
    fn i_broadcast(&self, buf: Buffer, root: usize) -> switchyard_comm::Result<Request> {
        self.collective(self.inner.i_broadcast(buf, root))
    }
    fn i_all_reduce(&self, buf: Buffer, op: ReduceOp) -> switchyard_comm::Result<Request> {
        self.collective(self.inner.i_all_reduce(buf, op))
    }
    fn i_all_gather_v(
        &self,
        send: Buffer,
        recv_counts: Vec<usize>,
    ) -> switchyard_comm::Result<Request> {
        self.collective(self.inner.i_all_gather_v(send, recv_counts))
    }
    fn i_reduce_scatter(
        &self,
        send: Buffer,
        recv_counts: Vec<usize>,
        op: ReduceOp,
    ) -> switchyard_comm::Result<Request> {
        self.collective(self.inner.i_reduce_scatter(send, recv_counts, op))
    }
    fn i_all_to_all_v(
        &self,
        send: Buffer,
        send_counts: Vec<usize>,
        recv_counts: Vec<usize>,
    ) -> switchyard_comm::Result<Request> {
        self.collective(self.inner.i_all_to_all_v(send, send_counts, recv_counts))
    }
    fn i_send(&self, buf: Buffer, dest: usize, tag: u32) -> switchyard_comm::Result<Request> {
        let msg = {
            let mut st = self.rec.st.lock().unwrap();
            Recorder::checkpoint(&mut st);
            st.running.then(|| {
                let seq = st.sent.entry((dest, tag)).or_insert(0);
                let msg = (self.rec.rank, dest, tag, *seq);
                *seq += 1;
                let bytes = buf.size_bytes();
                st.events.push(Event::Send { msg, bytes });
                msg
            })
        };
        Ok(self.wrap(self.inner.i_send(buf, dest, tag)?, msg))
    }
    fn i_recv(&self, buf: Buffer, src: usize, tag: u32) -> switchyard_comm::Result<Request> {
        // Posting order is matching order: the algorithms never have two receives from one
        // peer with one tag outstanding.
        let msg = {
            let mut st = self.rec.st.lock().unwrap();
            Recorder::checkpoint(&mut st);
            st.running.then(|| {
                let seq = st.received.entry((src, tag)).or_insert(0);
                let msg = (src, self.rec.rank, tag, *seq);
                *seq += 1;
                msg
            })
        };
        Ok(self.wrap(self.inner.i_recv(buf, src, tag)?, msg))
    }
    fn split(&self, _: u32, _: i32) -> switchyard_comm::Result<Box<dyn Communicator>> {
        Err(CommError::InvalidArgument {
            op: "split".into(),
            comm: self.name().into(),
            rank: self.rank(),
            detail: "the benchmark's recording communicator does not split".into(),
        })
    }
    fn abort(&self, reason: &str, code: i32) -> ! {
        self.inner.abort(reason, code)
    }
}

/// Per-rank results of replaying the traces on a link model.
#[derive(Debug, Clone, Default)]
struct Replay {
    /// End time per rank (seconds).
    end: Vec<f64>,
    /// Compute per rank.
    compute: Vec<f64>,
    /// Summed link cost of the messages each rank received.
    comm: Vec<f64>,
    /// Bytes each rank sent.
    sent: Vec<usize>,
}

/// Replays `traces` on virtual clocks; `link: None` = free links.
fn replay(traces: &[Vec<Event>], link: Option<LinkModel>) -> Replay {
    let w = traces.len();
    let cost = |bytes: usize| link.map_or(0.0, |l| l.cost(1, bytes).as_secs_f64());
    let mut pc = vec![0usize; w];
    let mut out = Replay {
        end: vec![0.0; w],
        compute: vec![0.0; w],
        comm: vec![0.0; w],
        sent: vec![0; w],
    };
    let mut arrival: HashMap<MsgId, (f64, f64)> = HashMap::new();
    let mut link_free: HashMap<(usize, usize), f64> = HashMap::new();
    loop {
        let mut progressed = false;
        for r in 0..w {
            while let Some(&event) = traces[r].get(pc[r]) {
                let t = &mut out.end[r];
                match event {
                    Event::Compute(d) => {
                        *t += d;
                        out.compute[r] += d;
                    }
                    Event::Send { msg, bytes } => {
                        let free = link_free.entry((msg.0, msg.1)).or_insert(0.0);
                        let c = cost(bytes);
                        let at = t.max(*free) + c;
                        *free = at;
                        arrival.insert(msg, (at, c));
                        out.sent[r] += bytes;
                    }
                    Event::Wait(msg) => match arrival.get(&msg) {
                        // The sender has not reached this send yet: replay it first.
                        None => break,
                        Some(&(at, c)) => {
                            *t = t.max(at);
                            if msg.1 == r {
                                out.comm[r] += c;
                            }
                        }
                    },
                }
                pc[r] += 1;
                progressed = true;
            }
        }
        if (0..w).all(|r| pc[r] == traces[r].len()) {
            return out;
        }
        assert!(
            progressed,
            "the traces deadlock: a receive without its send"
        );
    }
}

#[derive(Debug, Clone)]
struct Args {
    seq: usize,
    heads: usize,
    head_dim: usize,
    batch: usize,
    ranks: Vec<usize>,
    latency_us: f64,
    bandwidths_gbps: Vec<f64>,
    reps: usize,
}

fn parse_args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let get = |k: &str| -> Option<String> {
        argv.iter().position(|a| a == k).map(|i| {
            argv.get(i + 1)
                .cloned()
                .unwrap_or_else(|| panic!("{k} needs a value"))
        })
    };
    let num = |k: &str, default: usize| get(k).map_or(default, |v| v.parse().expect(k));
    let list = |k: &str, default: &str| -> Vec<f64> {
        get(k)
            .unwrap_or_else(|| default.to_string())
            .split(',')
            .map(|v| v.parse().expect(k))
            .collect()
    };
    Args {
        seq: num("--seq", 4096),
        heads: num("--heads", 4),
        head_dim: num("--head-dim", 64),
        batch: num("--batch", 1),
        ranks: list("--ranks", "1,2,4,8")
            .into_iter()
            .map(|w| w as usize)
            .collect(),
        latency_us: get("--latency-us").map_or(10.0, |v| v.parse().expect("--latency-us")),
        bandwidths_gbps: list("--bandwidth-gbps", "1,10"),
        reps: num("--reps", 3).max(1),
    }
}

/// Deterministic inputs in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Measures one attention step (forward + backward) on `w` ranks: the per-rank traces.
fn measure(args: &Args, w: usize, algorithm: CpAlgorithm) -> Vec<Vec<Event>> {
    let (b, h, dh) = (args.batch, args.heads, args.head_dim);
    let n = args.seq / w;
    let cpu = Arc::new(Cpu::default());
    let comms = LocalWorld::new(w, Duration::from_secs(600), None);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let cpu = cpu.clone();
                // One machine = one core: the rank's kernels run on its pool's one thread.
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .stack_size(64 << 20)
                    .build()
                    .expect("a one-thread pool");
                std::thread::Builder::new()
                    .spawn_scoped(s, move || {
                        pool.install(move || {
                            let rank = comm.rank();
                            let rec = Arc::new(Recorder {
                                rank,
                                cpu,
                                st: Mutex::new(TraceState {
                                    running: false,
                                    origin: Instant::now(),
                                    resumed: 0.0,
                                    events: Vec::new(),
                                    sent: HashMap::new(),
                                    received: HashMap::new(),
                                }),
                            });
                            let comm: Arc<dyn Communicator> = Arc::new(RecordingComm {
                                inner: Box::new(comm),
                                rec: rec.clone(),
                            });
                            let attn = CpAttention::new(comm.clone(), Sharding::Zigzag, algorithm);
                            let device = Device::flex().autodiff();
                            let input = |seed: u64| {
                                let data = values(b * h * n * dh, seed * 64 + rank as u64);
                                Tensor::<4>::from_data(
                                    TensorData::new(data, [b, h, n, dh]),
                                    &device,
                                )
                            };
                            let (q, k, v, g) = (
                                input(1).require_grad(),
                                input(2).require_grad(),
                                input(3).require_grad(),
                                input(4),
                            );
                            let step = || {
                                let out = context_attention(q.clone(), k.clone(), v.clone(), &attn)
                                    .expect("attention");
                                let grads = (out * g.clone()).sum().backward();
                                q.grad(&grads).expect("dq")
                            };
                            // Warm-up (thread pools, kernel scratch, mailboxes), not recorded.
                            drop(step());
                            comm.barrier().expect("barrier");
                            rec.start();
                            let dq = step();
                            let trace = rec.stop();
                            drop(dq);
                            comm.barrier().expect("barrier");
                            trace
                        })
                    })
                    .expect("spawn rank thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank thread panicked"))
            .collect()
    })
}

/// Combines the traces of several repetitions: each compute segment keeps its minimum.
fn fastest(reps: Vec<Vec<Vec<Event>>>) -> Vec<Vec<Event>> {
    let mut reps = reps.into_iter();
    let mut best = reps.next().expect("at least one repetition");
    for traces in reps {
        for (b, t) in best.iter_mut().zip(traces) {
            assert_eq!(b.len(), t.len(), "the schedule does not depend on timing");
            for (be, te) in b.iter_mut().zip(t) {
                match (be, te) {
                    (Event::Compute(b), Event::Compute(t)) => *b = b.min(t),
                    (Event::Send { msg: m1, .. }, Event::Send { msg: m2, .. })
                    | (Event::Wait(m1), Event::Wait(m2)) => {
                        assert_eq!(*m1, m2, "the schedule does not depend on timing")
                    }
                    _ => panic!("the schedule does not depend on timing"),
                }
            }
        }
    }
    best
}

/// The row of one configuration on one link, from its traces.
#[derive(Debug, Clone, Copy)]
struct Row {
    step: f64,
    compute: f64,
    comm: f64,
    exposed: f64,
    efficiency: f64,
    mib_sent: f64,
}

fn row(traces: &[Vec<Event>], link: LinkModel) -> Row {
    let w = traces.len();
    let real = replay(traces, Some(link));
    let free = replay(traces, None);
    let last = (0..w)
        .max_by(|&a, &b| real.end[a].total_cmp(&real.end[b]))
        .expect("at least one rank");
    let step = real.end[last];
    let step_free = free.end.iter().copied().fold(0.0, f64::max);
    Row {
        step,
        compute: real.compute[last],
        comm: real.comm[last],
        exposed: (step - step_free).max(0.0),
        efficiency: real.compute.iter().sum::<f64>() / (w as f64 * step),
        mib_sent: real.sent.iter().copied().max().unwrap_or(0) as f64 / (1 << 20) as f64,
    }
}

fn main() {
    let args = parse_args();
    for &w in &args.ranks {
        assert!(
            w > 0 && args.seq.is_multiple_of(2 * w),
            "--seq {} must be a multiple of 2 x {w} (zigzag chunks)",
            args.seq
        );
    }
    let links: Vec<LinkModel> = args
        .bandwidths_gbps
        .iter()
        .map(|&g| LinkModel::new(args.latency_us, g))
        .collect();
    println!(
        "cp-bench: causal attention forward + backward, B={} H={} S={} Dh={} fp32, zigzag; one \
         core per rank, compute = {}, links replayed; fastest of {} runs per compute segment",
        args.batch,
        args.heads,
        args.seq,
        args.head_dim,
        if thread_cpu_time().is_some() {
            "thread CPU time"
        } else {
            "wall time (no /proc/thread-self/schedstat)"
        },
        args.reps
    );
    // Measure every configuration first, then print one table per link.
    let mut results: Vec<(usize, CpAlgorithm, Vec<Row>)> = Vec::new();
    for &w in &args.ranks {
        let algorithms: &[CpAlgorithm] = if w == 1 {
            &[CpAlgorithm::Ring]
        } else {
            &[CpAlgorithm::Ring, CpAlgorithm::TokenRing]
        };
        for &algorithm in algorithms {
            let traces = fastest(
                (0..args.reps)
                    .map(|_| measure(&args, w, algorithm))
                    .collect(),
            );
            let rows = links.iter().map(|&link| row(&traces, link)).collect();
            results.push((w, algorithm, rows));
        }
    }
    for (i, gbps) in args.bandwidths_gbps.iter().enumerate() {
        println!(
            "\nlink: {} us latency, {gbps} Gbit/s per direction per peer",
            args.latency_us
        );
        println!(
            "| cp | algorithm | step ms | vs cp=1 | compute ms | comm ms | exposed comm ms | \
             comm hidden | efficiency | MiB sent / rank | TokenRing / ring |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        let base = results[0].2[i].step;
        let mut ring_step = None;
        for (w, algorithm, rows) in &results {
            let r = rows[i];
            let hidden = if r.comm > 0.0 {
                format!("{:.0}%", 100.0 * (1.0 - r.exposed / r.comm).clamp(0.0, 1.0))
            } else {
                "-".into()
            };
            let (name, ratio) = match (*w, algorithm) {
                (1, _) => ("one rank", "-".to_string()),
                (_, CpAlgorithm::Ring) => {
                    ring_step = Some(r.step);
                    ("ring", "-".to_string())
                }
                (_, CpAlgorithm::TokenRing) => (
                    "token_ring",
                    ring_step.map_or("-".into(), |s| format!("{:.2}", r.step / s)),
                ),
            };
            println!(
                "| {w} | {name} | {:.1} | {:.2}x | {:.1} | {:.1} | {:.1} | {hidden} | {:.0}% | \
                 {:.1} | {ratio} |",
                r.step * 1e3,
                base / r.step,
                r.compute * 1e3,
                r.comm * 1e3,
                r.exposed * 1e3,
                100.0 * r.efficiency,
                r.mib_sent,
            );
        }
    }
}
