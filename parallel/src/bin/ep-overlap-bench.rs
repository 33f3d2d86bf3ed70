//! One training step (forward + backward) of an MoE model under expert parallelism with the
//! pipelined expert block at overlap degrees d = 1, 2, 4, 8 and `auto`: step time,
//! communication time, compute time and the overlap efficiency
//! `(step at d=1 - step at d) / min(communication, expert compute)`.
//!
//! ```sh
//! # ranks as threads over the local backend, with the link model (and with free links):
//! cargo run --release -p switchyard-parallel --bin ep-overlap-bench -- \
//!     [--ranks 4] [--gbps 1] [--latency-us 5] [--steps 8] [--warmup 6] \
//!     [--batch 4] [--seq 128] [--d-model 256] [--experts 8] [--expert-ffn 256] [--layers 2]
//! # the same under MPI (real transport, no link model):
//! cargo build --release -p switchyard-parallel --features mpi --bin ep-overlap-bench
//! mpirun -np 4 target/release/ep-overlap-bench --mpi
//! ```
//!
//! Threads mode (the default) records and replays, as `cp-bench` and `placement-bench` do
//! (details at `Cpu` below): with 4 ranks on 2 shared cores a wall-clock step measures the
//! oversubscribed machine, not the schedule. Each rank computes on one core (one-thread pool,
//! one rank at a time, charged its thread's CPU time); its trace of compute, collective
//! posts and waits is replayed on virtual clocks with the link model, and again with free
//! links. Definitions (all from the same run):
//! - step: forward + loss + backward, the slowest rank's replayed end; the measured steps
//!   run the same schedule, so each compute segment keeps its fastest measurement.
//! - exposed comm: step with the link minus step with free links.
//! - communication: the exposed comm at d=1 (nothing overlaps there).
//! - expert compute: the block's grouped-GEMM time, forward and backward (slowest rank).
//! - efficiency(d) = (step(1) - step(d)) / min(communication, expert compute at d=1), the
//!   issue's definition. Chunking also changes the compute itself (smaller GEMMs, cache
//!   effects: the free-link column), which this definition counts too; the exposed-comm
//!   column isolates the overlap.
//!
//! MPI mode: wall-clock steps (fastest of the steps); communication = the block's waiting at
//! d=1 (slowest rank), which on one machine is mostly waiting for slower ranks.
//!
//! The link bandwidth is scaled to the CPU: a rank here computes about 10^4 times slower
//! than an H100, so the default 1 Gbit/s makes transfer and expert compute comparable, as
//! a 100-400 Gbit/s fabric does for fine-grained experts on GPUs (the regime where
//! overlap matters).
//!
//! Shape legend: B batch rows per rank, S sequence.

// The recording communicator implements `Communicator`, whose methods return `comm`'s
// error type by value (see `switchyard_comm`'s own allowance).
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::{Device, Int, Tensor, TensorData};
use switchyard_comm::{
    BackendKind, Buffer, Communicator, LinkModel, LocalWorld, PendingOp, ReduceOp, Request,
};
use switchyard_moe::config::CapacityConfig;
use switchyard_moe::{ModelConfig, MoeConfig, RouterConfig, Transformer, cross_entropy};
use switchyard_parallel::bench_clock::{Cpu, thread_cpu_time};
use switchyard_parallel::overlap::BlockTimes;
use switchyard_parallel::{AllToAllDispatcher, LossScale, Mesh, Overlap, parallelize};

#[derive(Clone, Debug)]
struct Args {
    ranks: usize,
    gbps: f64,
    latency_us: f64,
    steps: usize,
    warmup: usize,
    batch: usize,
    seq: usize,
    d_model: usize,
    experts: usize,
    expert_ffn: usize,
    layers: usize,
    mpi: bool,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            ranks: 4,
            gbps: 1.0,
            latency_us: 5.0,
            steps: 8,
            warmup: 6,
            batch: 4,
            seq: 128,
            d_model: 256,
            experts: 8,
            expert_ffn: 256,
            layers: 2,
            mpi: false,
        }
    }
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--mpi" {
            a.mpi = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<f64>().map_err(|e| format!("{flag} {v}: {e}"));
        let int = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--ranks" => a.ranks = int(&value)?,
            "--gbps" => a.gbps = num(&value)?,
            "--latency-us" => a.latency_us = num(&value)?,
            "--steps" => a.steps = int(&value)?,
            "--warmup" => a.warmup = int(&value)?,
            "--batch" => a.batch = int(&value)?,
            "--seq" => a.seq = int(&value)?,
            "--d-model" => a.d_model = int(&value)?,
            "--experts" => a.experts = int(&value)?,
            "--expert-ffn" => a.expert_ffn = int(&value)?,
            "--layers" => a.layers = int(&value)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

fn model_cfg(a: &Args) -> ModelConfig {
    ModelConfig {
        vocab_size: 256,
        d_model: a.d_model,
        n_heads: 4,
        n_layers: a.layers,
        ffn_dim: 4 * a.d_model,
        max_seq_len: a.seq,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: true,
        init_std: 0.02,
        moe: MoeConfig {
            every: 1,
            num_experts: a.experts,
            top_k: 2,
            expert_ffn_dim: a.expert_ffn,
            router: RouterConfig::TopKSoftmax {
                normalize_weights: true,
            },
            capacity: CapacityConfig::Dropless,
            shared_expert: None,
            load_balance_coef: 0.01,
            z_loss_coef: 0.001,
        },
    }
}

// ---------------------------------------------------------------------------------------
// Record and replay (the threads mode): with 4 ranks on 2 shared cores a wall-clock step
// measures the oversubscribed machine (every extra exchange is a rendezvous of 4 threads
// fighting for 2 cores), not the schedule. As in `cp-bench`: each rank runs in its own
// one-thread pool and computes only while holding the process's single CPU token, its
// compute segments are charged the thread's CPU time, and its trace (compute, collective
// posts, waits) is replayed on virtual clocks with the link model: a collective completes
// for a rank at max(last member's post, the rank's link free) + its cost, and a rank's
// collectives queue on its link in post order.
// ---------------------------------------------------------------------------------------

/// A collective: (communicator name, its sequence number there).
type CollId = (String, u64);

#[derive(Debug, Clone)]
enum Event {
    /// Seconds of exclusive compute.
    Compute(f64),
    /// This rank posts a collective of `members` ranks costing it `messages` messages and
    /// `bytes` bytes on its link.
    Post {
        id: CollId,
        members: usize,
        messages: usize,
        bytes: usize,
    },
    Wait(CollId),
}

fn cpu_time() -> f64 {
    thread_cpu_time().expect("the replay needs /proc/thread-self/schedstat (Linux)")
}

struct Trace {
    running: bool,
    resumed: f64,
    events: Vec<Event>,
}

struct Recorder {
    cpu: Arc<Cpu>,
    st: Mutex<Trace>,
}

impl Recorder {
    fn checkpoint(st: &mut Trace) {
        if st.running {
            let now = cpu_time();
            st.events.push(Event::Compute((now - st.resumed).max(0.0)));
            st.resumed = now;
        }
    }

    fn start(&self) {
        self.cpu.acquire();
        let mut st = self.st.lock().unwrap();
        st.running = true;
        st.resumed = cpu_time();
        st.events.clear();
    }

    fn stop(&self) -> Vec<Event> {
        let mut st = self.st.lock().unwrap();
        Self::checkpoint(&mut st);
        st.running = false;
        self.cpu.release();
        std::mem::take(&mut st.events)
    }

    /// Records a post (when running).
    fn post(&self, id: &CollId, members: usize, messages: usize, bytes: usize) {
        let mut st = self.st.lock().unwrap();
        Self::checkpoint(&mut st);
        if st.running {
            st.events.push(Event::Post {
                id: id.clone(),
                members,
                messages,
                bytes,
            });
        }
    }

    /// Runs a blocking wait without the CPU token.
    fn blocking<T>(&self, id: &CollId, f: impl FnOnce() -> T) -> T {
        let running = {
            let mut st = self.st.lock().unwrap();
            Self::checkpoint(&mut st);
            if st.running {
                st.events.push(Event::Wait(id.clone()));
            }
            st.running
        };
        if !running {
            return f();
        }
        self.cpu.release();
        let out = f();
        self.cpu.acquire();
        self.st.lock().unwrap().resumed = cpu_time();
        out
    }
}

struct RecordingComm {
    inner: Box<dyn Communicator>,
    rec: Arc<Recorder>,
    seq: Mutex<u64>,
}

struct Recorded {
    inner: Request,
    rec: Arc<Recorder>,
    id: CollId,
}

impl PendingOp for Recorded {
    fn test(&mut self) -> switchyard_comm::Result<bool> {
        self.inner.test()
    }

    fn wait(self: Box<Self>) -> switchyard_comm::Result<Buffer> {
        let Recorded { inner, rec, id } = *self;
        rec.blocking(&id, || inner.wait())
    }
}

impl RecordingComm {
    fn wrap(inner: Box<dyn Communicator>, rec: Arc<Recorder>) -> RecordingComm {
        RecordingComm {
            inner,
            rec,
            seq: Mutex::new(0),
        }
    }

    /// Posts a collective costing this rank `messages` messages and `bytes` bytes.
    fn collective(
        &self,
        messages: usize,
        bytes: usize,
        post: impl FnOnce() -> switchyard_comm::Result<Request>,
    ) -> switchyard_comm::Result<Request> {
        let id = {
            let mut seq = self.seq.lock().unwrap();
            *seq += 1;
            (self.inner.name().to_string(), *seq)
        };
        self.rec.post(&id, self.inner.size(), messages, bytes);
        Ok(Request::new(Recorded {
            inner: post()?,
            rec: self.rec.clone(),
            id,
        }))
    }
}

fn log2_ceil(p: usize) -> usize {
    (usize::BITS - (p.max(1) - 1).leading_zeros()) as usize
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
        let p = self.size();
        self.collective(log2_ceil(p), 0, || self.inner.i_barrier())
    }
    fn i_broadcast(&self, buf: Buffer, root: usize) -> switchyard_comm::Result<Request> {
        let (p, bytes) = (self.size(), buf.size_bytes());
        self.collective(log2_ceil(p), bytes, || self.inner.i_broadcast(buf, root))
    }
    fn i_all_reduce(&self, buf: Buffer, op: ReduceOp) -> switchyard_comm::Result<Request> {
        // Ring: reduce-scatter + all-gather, 2(p-1) steps of 1/p of the data.
        let (p, bytes) = (self.size(), buf.size_bytes());
        let steps = 2 * p.saturating_sub(1);
        self.collective(steps, steps * bytes / p.max(1), || {
            self.inner.i_all_reduce(buf, op)
        })
    }
    fn i_all_gather_v(
        &self,
        send: Buffer,
        recv_counts: Vec<usize>,
    ) -> switchyard_comm::Result<Request> {
        let (p, es) = (self.size(), send.dtype().size_bytes());
        let others: usize = recv_counts.iter().sum::<usize>() - recv_counts[self.rank()];
        self.collective(p - 1, others * es, || {
            self.inner.i_all_gather_v(send, recv_counts)
        })
    }
    fn i_reduce_scatter(
        &self,
        send: Buffer,
        recv_counts: Vec<usize>,
        op: ReduceOp,
    ) -> switchyard_comm::Result<Request> {
        let (p, es) = (self.size(), send.dtype().size_bytes());
        let others: usize = recv_counts.iter().sum::<usize>() - recv_counts[self.rank()];
        self.collective(p - 1, others * es, || {
            self.inner.i_reduce_scatter(send, recv_counts, op)
        })
    }
    fn i_all_to_all_v(
        &self,
        send: Buffer,
        send_counts: Vec<usize>,
        recv_counts: Vec<usize>,
    ) -> switchyard_comm::Result<Request> {
        // Full duplex: the busier direction sets the time; a message per non-empty peer.
        let (me, es) = (self.rank(), send.dtype().size_bytes());
        let peers = (0..self.size()).filter(|&q| q != me);
        let sent: usize = peers.clone().map(|q| send_counts[q]).sum();
        let recv: usize = peers.clone().map(|q| recv_counts[q]).sum();
        let messages = peers
            .filter(|&q| send_counts[q] > 0 || recv_counts[q] > 0)
            .count();
        self.collective(messages, sent.max(recv) * es, || {
            self.inner.i_all_to_all_v(send, send_counts, recv_counts)
        })
    }
    fn i_send(&self, buf: Buffer, dest: usize, tag: u32) -> switchyard_comm::Result<Request> {
        self.inner.i_send(buf, dest, tag)
    }
    fn i_recv(&self, buf: Buffer, src: usize, tag: u32) -> switchyard_comm::Result<Request> {
        self.inner.i_recv(buf, src, tag)
    }
    fn split(&self, color: u32, key: i32) -> switchyard_comm::Result<Box<dyn Communicator>> {
        Ok(Box::new(RecordingComm::wrap(
            self.inner.split(color, key)?,
            self.rec.clone(),
        )))
    }
    fn abort(&self, reason: &str, code: i32) -> ! {
        self.inner.abort(reason, code)
    }
}

/// One member's post of a collective: (rank, its clock, messages, bytes).
type PostAt = (usize, f64, usize, usize);

/// Replays one step's traces; returns the step time (slowest rank) and the slowest
/// rank's summed link cost (`link: None` = free links).
fn replay(traces: &[Vec<Event>], link: Option<LinkModel>) -> (f64, f64) {
    let w = traces.len();
    let cost =
        |messages: usize, bytes: usize| link.map_or(0.0, |l| l.cost(messages, bytes).as_secs_f64());
    let mut pc = vec![0usize; w];
    let mut clock = vec![0.0f64; w];
    let mut comm = vec![0.0f64; w];
    let mut link_free = vec![0.0f64; w];
    // Per collective: the posts so far (rank, time, messages, bytes) and its member count.
    let mut posts: HashMap<CollId, (usize, Vec<PostAt>)> = HashMap::new();
    // Per rank: its posted collectives not yet resolved, in post order; resolved ready times.
    let mut queue: Vec<std::collections::VecDeque<CollId>> = vec![Default::default(); w];
    let mut ready: Vec<HashMap<CollId, f64>> = vec![HashMap::new(); w];
    loop {
        let mut progressed = false;
        for r in 0..w {
            while let Some(event) = traces[r].get(pc[r]) {
                match event {
                    Event::Compute(d) => clock[r] += d,
                    Event::Post {
                        id,
                        members,
                        messages,
                        bytes,
                    } => {
                        let entry = posts.entry(id.clone()).or_insert((*members, Vec::new()));
                        entry.1.push((r, clock[r], *messages, *bytes));
                        queue[r].push_back(id.clone());
                    }
                    Event::Wait(id) => {
                        // Resolve this rank's queued collectives in post order up to `id`.
                        let mut blocked = false;
                        while !ready[r].contains_key(id) {
                            let Some(head) = queue[r].front().cloned() else {
                                panic!("rank {r} waits for {id:?}, which it never posted");
                            };
                            let (members, list) = &posts[&head];
                            if list.len() < *members {
                                blocked = true;
                                break;
                            }
                            let last_post = list.iter().map(|p| p.1).fold(0.0, f64::max);
                            let &(_, _, messages, bytes) =
                                list.iter().find(|p| p.0 == r).expect("own post");
                            let c = cost(messages, bytes);
                            let done = last_post.max(link_free[r]) + c;
                            link_free[r] = done;
                            comm[r] += c;
                            ready[r].insert(head, done);
                            queue[r].pop_front();
                        }
                        if blocked {
                            break;
                        }
                        clock[r] = clock[r].max(ready[r][id]);
                    }
                }
                pc[r] += 1;
                progressed = true;
            }
        }
        if (0..w).all(|r| pc[r] == traces[r].len()) {
            let end = clock.iter().copied().fold(0.0, f64::max);
            return (end, comm.iter().copied().fold(0.0, f64::max));
        }
        assert!(
            progressed,
            "the traces deadlock: a collective some member never posts"
        );
    }
}

/// One rank's measured steps: (step seconds, block times of that step, recorded trace).
type Measured = Vec<(f64, BlockTimes, Vec<Event>)>;

/// Runs the warm-up and the measured steps on this rank; with `rec`, records each measured
/// step's trace (the world must be wrapped in a `RecordingComm` on the same recorder).
fn rank_run(
    world: Box<dyn Communicator>,
    a: &Args,
    overlap: Overlap,
    rec: Option<&Recorder>,
) -> Measured {
    let cfg = model_cfg(a);
    let rank = world.rank();
    let mesh = Mesh::new(world, 1, a.ranks, cfg.moe.num_experts)
        .expect("mesh")
        .with_ep_overlap(overlap);
    let device = Device::flex().autodiff();
    let mut model = parallelize(Transformer::new(&cfg, 7, &device), &mesh).expect("parallelize");
    // Our own handle on the dispatcher, to read the block's timers.
    let dispatcher = Arc::new(AllToAllDispatcher::new(&mesh));
    for block in &mut model.layers {
        if let Some(moe) = block.moe.take() {
            block.moe = Some(moe.with_dispatcher(dispatcher.clone()));
        }
    }
    // Every rank its own tokens (a fixed pseudo-random stream).
    let mut state = 0x9e37_79b9_u64 ^ (rank as u64 * 0x1234_5678_9abc);
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % cfg.vocab_size as u64) as i64
    };
    let (b, s) = (a.batch, a.seq);
    let tokens: Vec<i64> = (0..b * (s + 1)).map(|_| next()).collect();
    let batch = |offset: usize| {
        let v: Vec<i64> = (0..b)
            .flat_map(|r| tokens[r * (s + 1) + offset..r * (s + 1) + offset + s].to_vec())
            .collect();
        Tensor::<2, Int>::from_data(TensorData::new(v, [b, s]), &device)
    };
    let scale = LossScale::new(&mesh, b * s).expect("loss scale");
    let world = mesh.world().clone();
    let mut out = Vec::new();
    for step in 0..a.warmup + a.steps {
        world.barrier().expect("barrier");
        dispatcher.take_block_times();
        let recording = rec.filter(|_| step >= a.warmup);
        if let Some(r) = recording {
            r.start();
        }
        let started = Instant::now();
        let output = model.forward(batch(0));
        let loss = cross_entropy(output.logits.clone(), batch(1)) * scale.ce_weight()
            + output.aux_loss(&cfg, 0);
        drop(loss.backward());
        let events = recording.map(Recorder::stop).unwrap_or_default();
        world.barrier().expect("barrier");
        let seconds = started.elapsed().as_secs_f64();
        if step >= a.warmup {
            out.push((seconds, dispatcher.take_block_times(), events));
        }
    }
    if rank == 0
        && let Overlap::Auto = overlap
    {
        eprintln!("  auto chose d = {:?}", dispatcher.auto_choice());
    }
    out
}

/// Runs every rank as a thread of a local world, each in its own one-thread pool under the
/// CPU token, recording its measured steps. The world has the link model too, so `auto`'s
/// trials (wall-clock) see the link; the recorded traces do not depend on it.
fn threads(a: &Args, overlap: Overlap, link: LinkModel) -> Vec<Measured> {
    let comms = LocalWorld::new(a.ranks, Duration::from_secs(600), Some(link));
    let cpu = Arc::new(Cpu::default());
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let cpu = cpu.clone();
                std::thread::Builder::new()
                    .stack_size(64 << 20)
                    .spawn_scoped(s, move || {
                        let pool = rayon::ThreadPoolBuilder::new()
                            .num_threads(1)
                            .stack_size(64 << 20)
                            .build()
                            .expect("one-thread pool");
                        pool.install(|| {
                            let rec = Arc::new(Recorder {
                                cpu,
                                st: Mutex::new(Trace {
                                    running: false,
                                    resumed: 0.0,
                                    events: Vec::new(),
                                }),
                            });
                            let world = RecordingComm::wrap(Box::new(c), rec.clone());
                            rank_run(Box::new(world), a, overlap, Some(&rec))
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

/// Replayed step times (ms, from the combined traces) with the link and with free links, the
/// slowest rank's link cost and the block's expert compute per step (ms, slowest rank).
#[derive(Clone, Copy, Debug)]
struct Replayed {
    step: f64,
    free: f64,
    link_cost: f64,
    compute: f64,
}

/// Combines a rank's measured steps into one trace: the steps run the same schedule (same
/// batch, fixed chunk count), so each compute segment keeps its shortest measurement (noise
/// on a shared machine only ever adds time), as `cp-bench` does with its repetitions.
fn combined(steps: &[(f64, BlockTimes, Vec<Event>)]) -> Vec<Event> {
    let mut out = steps[0].2.clone();
    for (_, _, events) in &steps[1..] {
        assert_eq!(
            events.len(),
            out.len(),
            "every measured step runs the same schedule"
        );
        for (kept, e) in out.iter_mut().zip(events) {
            if let (Event::Compute(k), Event::Compute(x)) = (kept, e) {
                *k = k.min(*x);
            }
        }
    }
    out
}

fn replay_all(per_rank: &[Measured], link: LinkModel) -> Replayed {
    let traces: Vec<Vec<Event>> = per_rank.iter().map(|r| combined(r)).collect();
    let (step, link_cost) = replay(&traces, Some(link));
    let (free, _) = replay(&traces, None);
    // The block's expert compute: the slowest rank's fastest step.
    let compute = per_rank
        .iter()
        .map(|r| {
            r.iter()
                .map(|s| s.1.compute.as_secs_f64())
                .fold(f64::INFINITY, f64::min)
        })
        .fold(0.0, f64::max);
    Replayed {
        step: step * 1e3,
        free: free * 1e3,
        link_cost: link_cost * 1e3,
        compute: compute * 1e3,
    }
}

/// Summary over steps and ranks (MPI mode): the fastest step (on a shared machine noise only ever
/// adds time), and the block's waiting and compute per step (slowest rank, mean over
/// steps), in milliseconds.
#[cfg(feature = "mpi")]
#[derive(Clone, Copy, Debug)]
struct Summary {
    step: f64,
    waiting: f64,
    compute: f64,
}

#[cfg(feature = "mpi")]
fn summarize(per_rank: &[Measured]) -> Summary {
    let steps = per_rank[0].len();
    let mut step: Vec<f64> = (0..steps)
        .map(|i| per_rank.iter().map(|r| r[i].0).fold(0.0, f64::max))
        .collect();
    step.sort_by(f64::total_cmp);
    let per_step_max = |f: fn(&BlockTimes) -> Duration| {
        (0..steps)
            .map(|i| {
                per_rank
                    .iter()
                    .map(|r| f(&r[i].1).as_secs_f64())
                    .fold(0.0, f64::max)
            })
            .sum::<f64>()
            / steps as f64
    };
    Summary {
        step: step[0] * 1e3,
        waiting: per_step_max(|t| t.waiting()) * 1e3,
        compute: per_step_max(|t| t.compute) * 1e3,
    }
}

const DEGREES: [Overlap; 5] = [
    Overlap::Chunks(1),
    Overlap::Chunks(2),
    Overlap::Chunks(4),
    Overlap::Chunks(8),
    Overlap::Auto,
];

fn name(o: Overlap) -> String {
    match o {
        Overlap::Chunks(d) => d.to_string(),
        Overlap::Auto => "auto".into(),
    }
}

#[cfg(feature = "mpi")]
fn print_table(rows: &[(Overlap, Summary, Option<Summary>)], comm: f64, compute: f64) {
    let base = rows[0].1.step;
    let hideable = comm.min(compute);
    println!(
        "communication {comm:.1} ms, expert compute {compute:.1} ms per step (at d=1) -> \
         hideable min = {hideable:.1} ms"
    );
    println!(
        "| d | step ms | free-link step ms | block waiting ms | block expert compute ms | \
         saved vs d=1 ms | efficiency |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (o, s, free) in rows {
        let saved = base - s.step;
        println!(
            "| {} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {:.2} |",
            name(*o),
            s.step,
            free.map_or("-".into(), |f| format!("{:.1}", f.step)),
            s.waiting,
            s.compute,
            saved,
            saved / hideable
        );
    }
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ep-overlap-bench: {e}");
            std::process::exit(2);
        }
    };
    if a.mpi {
        mpi_main(&a);
        return;
    }
    let link = LinkModel::new(a.latency_us, a.gbps);
    println!(
        "ep={} ranks as threads, recorded (one core each, CPU time) and replayed with a link \
         of {} Gbit/s + {} us per message; {} layers (all MoE), d_model {}, {} experts top-2 \
         (expert ffn {}), {} x {} tokens per rank; fastest segments of {} steps after {} warm-up",
        a.ranks,
        a.gbps,
        a.latency_us,
        a.layers,
        a.d_model,
        a.experts,
        a.expert_ffn,
        a.batch,
        a.seq,
        a.steps,
        a.warmup
    );
    let rows: Vec<(Overlap, Replayed)> = DEGREES
        .iter()
        .map(|&o| {
            eprintln!("d = {} ...", name(o));
            (o, replay_all(&threads(&a, o, link), link))
        })
        .collect();
    let (_, at1) = rows[0];
    let comm = at1.step - at1.free;
    let hideable = comm.min(at1.compute);
    println!(
        "communication {comm:.1} ms (step at d=1 with the link minus with free links), expert \
         compute {:.1} ms per step (at d=1) -> hideable min = {hideable:.1} ms",
        at1.compute
    );
    println!(
        "| d | step ms | free-link step ms | exposed comm ms | link cost ms | expert compute ms | \
         saved vs d=1 ms | efficiency |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (o, r) in &rows {
        let saved = at1.step - r.step;
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            name(*o),
            r.step,
            r.free,
            r.step - r.free,
            r.link_cost,
            r.compute,
            saved,
            saved / hideable
        );
    }
}

#[cfg(feature = "mpi")]
fn mpi_main(a: &Args) {
    use switchyard_comm::mpi::{MpiEnv, MpiOptions};
    let (env, world) = MpiEnv::init(MpiOptions {
        timeout: Duration::from_secs(600),
        ..MpiOptions::default()
    })
    .unwrap_or_else(|e| {
        eprintln!("ep-overlap-bench: {e}");
        std::process::exit(2)
    });
    let mut a = a.clone();
    a.ranks = world.size();
    let rank = world.rank();
    let mut rows = Vec::new();
    for o in DEGREES {
        let dup = world.split(0, rank as i32).expect("split");
        let mine = rank_run(dup, &a, o, None);
        // Every rank's measurements to rank 0.
        let flat: Vec<f64> = mine
            .iter()
            .flat_map(|(s, t, _)| {
                [
                    *s,
                    t.wait_dispatch.as_secs_f64(),
                    t.wait_return.as_secs_f64(),
                    t.compute.as_secs_f64(),
                ]
            })
            .collect();
        let n = flat.len();
        let all = world
            .all_gather_v(&switchyard_comm::Buffer::F64(flat), &vec![n; a.ranks])
            .expect("gather")
            .into_vec::<f64>()
            .expect("f64");
        let per_rank: Vec<Measured> = all
            .chunks(n)
            .map(|r| {
                r.chunks(4)
                    .map(|v| {
                        (
                            v[0],
                            BlockTimes {
                                wait_dispatch: Duration::from_secs_f64(v[1]),
                                wait_return: Duration::from_secs_f64(v[2]),
                                compute: Duration::from_secs_f64(v[3]),
                            },
                            Vec::new(),
                        )
                    })
                    .collect()
            })
            .collect();
        rows.push((o, summarize(&per_rank), None));
    }
    if rank == 0 {
        println!(
            "ep={} MPI ranks (real transport), {} layers, d_model {}, {} experts top-2 (expert \
             ffn {}), {} x {} tokens per rank",
            a.ranks, a.layers, a.d_model, a.experts, a.expert_ffn, a.batch, a.seq
        );
        let (_, at1, _) = rows[0];
        print_table(&rows, at1.waiting, at1.compute);
    }
    drop(world);
    drop(env);
}

#[cfg(not(feature = "mpi"))]
fn mpi_main(_: &Args) {
    eprintln!("ep-overlap-bench: --mpi needs the `mpi` feature (cargo build --features mpi)");
    std::process::exit(2);
}
