//! Record and replay, for benchmarks that emulate more ranks than the machine has cores
//! (`cp-bench`, `ep-overlap-bench`, `placement-step-bench`): with 4-8 ranks on 2 shared cores
//! a wall-clock step measures the oversubscribed machine (every exchange is a rendezvous of
//! threads fighting for the cores), not the schedule. Instead each rank runs in its own
//! one-thread pool ([`run_ranks`]) and computes only while holding the process's single CPU
//! token ([`Cpu`]), which it gives up whenever it blocks in a wait; its compute segments (the
//! work between two communication calls) are charged the thread's CPU time (wall time where
//! Linux's `/proc/thread-self/schedstat` is unavailable). Its trace, recorded by a
//! [`RecordingComm`] into its [`Recorder`], is the schedule itself (the algorithms never
//! branch on timing): compute segments, collective posts, point-to-point sends, and waits
//! for either. [`replay`] runs the traces on per-rank virtual clocks with a [`LinkModel`]
//! (latency + bytes / bandwidth per message), or with free links:
//!
//! - **Collectives.** A collective completes for a rank at max(last member's post, the
//!   rank's link free) + its cost on the rank's link, and a rank's collectives queue on its
//!   link in post order. What a collective costs a rank (messages, bytes): a ring all-reduce
//!   `2(p-1)` steps of `1/p` of the data; all-gather / reduce-scatter the other ranks'
//!   shares; an all-to-all one message per non-empty peer and the busier direction's bytes
//!   (full duplex); broadcast and barrier `ceil(log2 p)` messages.
//! - **Point-to-point messages.** A fully connected network of full-duplex links (as
//!   NVLink/NVSwitch): a message sent at `t` arrives at max(t, its directed link free) + its
//!   cost (one message), and messages on one directed link queue in send order. Waiting for
//!   a receive, or for a send to be delivered, moves the clock to the arrival.
//!
//! The two rules keep their own link state: collectives and messages of one trace do not
//! queue behind each other. Waiting for slower peers is part of both the step with links and
//! the step with free links ([`replay`] with `None`), so their difference is the
//! communication the schedule did not hide.

// The recording communicator implements `Communicator`, whose methods return `comm`'s
// error type by value (see `switchyard_comm`'s own allowance).
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_comm::local::LocalComm;
use switchyard_comm::{
    BackendKind, Buffer, Communicator, LinkModel, LocalWorld, PendingOp, ReduceOp, Request,
};

use crate::clock::{Cpu, thread_cpu_time};

/// A collective: (communicator name, its sequence number there).
pub type CollId = (String, u64);

/// A point-to-point message: (communicator name, source, destination, tag, its sequence
/// number among that communicator's messages from source to destination with that tag).
/// Ranks are the communicator's. Receives match sends in posting order (the algorithms never
/// have two receives from one peer with one tag outstanding).
pub type MsgId = (String, usize, usize, u32, u64);

/// One entry of a rank's trace.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
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
    /// This rank sends a message of `bytes` bytes.
    Send { msg: MsgId, bytes: usize },
    /// Blocks until the operation has completed.
    Wait(Op),
}

/// What a [`Event::Wait`] waits for.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// A collective this rank posted.
    Collective(CollId),
    /// The delivery of a message this rank sent.
    Send(MsgId),
    /// The arrival of a message this rank receives.
    Recv(MsgId),
}

/// Seconds of compute so far: the thread's CPU time where available, else wall time since
/// `origin`.
fn compute_clock(origin: Instant) -> f64 {
    thread_cpu_time().unwrap_or_else(|| origin.elapsed().as_secs_f64())
}

struct Trace {
    /// Between `start` and `stop`: holding the CPU token and recording.
    running: bool,
    /// `compute_clock` when the rank last resumed computing.
    resumed: f64,
    events: Vec<Event>,
}

/// One rank's recorder: its trace and the shared CPU token.
pub struct Recorder {
    cpu: Arc<Cpu>,
    origin: Instant,
    st: Mutex<Trace>,
}

impl Recorder {
    pub fn new(cpu: Arc<Cpu>) -> Arc<Recorder> {
        Arc::new(Recorder {
            cpu,
            origin: Instant::now(),
            st: Mutex::new(Trace {
                running: false,
                resumed: 0.0,
                events: Vec::new(),
            }),
        })
    }

    /// Records the compute since the rank last resumed (when running).
    fn checkpoint(&self, st: &mut Trace) {
        if st.running {
            let now = compute_clock(self.origin);
            st.events.push(Event::Compute((now - st.resumed).max(0.0)));
            st.resumed = now;
        }
    }

    /// Takes the CPU token and starts a new trace.
    pub fn start(&self) {
        self.cpu.acquire();
        let mut st = self.st.lock().unwrap();
        st.running = true;
        st.resumed = compute_clock(self.origin);
        st.events.clear();
    }

    /// Ends the trace, releases the CPU token and returns the events.
    pub fn stop(&self) -> Vec<Event> {
        let mut st = self.st.lock().unwrap();
        self.checkpoint(&mut st);
        st.running = false;
        self.cpu.release();
        std::mem::take(&mut st.events)
    }

    /// A communication call: records the compute before it and then `event` (when running
    /// and there is one).
    fn record(&self, event: Option<Event>) {
        let mut st = self.st.lock().unwrap();
        self.checkpoint(&mut st);
        if let (true, Some(event)) = (st.running, event) {
            st.events.push(event);
        }
    }

    /// Runs a blocking wait for `op` without the CPU token.
    fn blocking<T>(&self, op: Op, f: impl FnOnce() -> T) -> T {
        let running = {
            let mut st = self.st.lock().unwrap();
            self.checkpoint(&mut st);
            if st.running {
                st.events.push(Event::Wait(op));
            }
            st.running
        };
        if !running {
            return f();
        }
        self.cpu.release();
        let out = f();
        self.cpu.acquire();
        self.st.lock().unwrap().resumed = compute_clock(self.origin);
        out
    }
}

/// Sequence numbers of one communicator's operations (never reset: every member numbers
/// the same operations alike, recorded or not).
#[derive(Default)]
struct Seqs {
    collectives: u64,
    /// Per (destination, tag).
    sent: HashMap<(usize, u32), u64>,
    /// Per (source, tag).
    received: HashMap<(usize, u32), u64>,
}

/// A communicator that records its collectives and point-to-point messages into a
/// [`Recorder`] (every call is a checkpoint; every wait gives the CPU token up);
/// sub-communicators record into the same one.
pub struct RecordingComm {
    inner: Box<dyn Communicator>,
    rec: Arc<Recorder>,
    seqs: Mutex<Seqs>,
}

struct Recorded {
    inner: Request,
    rec: Arc<Recorder>,
    op: Op,
}

impl PendingOp for Recorded {
    fn test(&mut self) -> switchyard_comm::Result<bool> {
        self.inner.test()
    }

    fn wait(self: Box<Self>) -> switchyard_comm::Result<Buffer> {
        let Recorded { inner, rec, op } = *self;
        rec.blocking(op, || inner.wait())
    }
}

impl RecordingComm {
    pub fn wrap(inner: Box<dyn Communicator>, rec: Arc<Recorder>) -> RecordingComm {
        RecordingComm {
            inner,
            rec,
            seqs: Mutex::new(Seqs::default()),
        }
    }

    fn pending(&self, inner: Request, op: Op) -> Request {
        Request::new(Recorded {
            inner,
            rec: self.rec.clone(),
            op,
        })
    }

    /// Posts a collective costing this rank `messages` messages and `bytes` bytes.
    fn collective(
        &self,
        messages: usize,
        bytes: usize,
        post: impl FnOnce() -> switchyard_comm::Result<Request>,
    ) -> switchyard_comm::Result<Request> {
        let id = {
            let mut seqs = self.seqs.lock().unwrap();
            seqs.collectives += 1;
            (self.inner.name().to_string(), seqs.collectives)
        };
        self.rec.record(Some(Event::Post {
            id: id.clone(),
            members: self.inner.size(),
            messages,
            bytes,
        }));
        Ok(self.pending(post()?, Op::Collective(id)))
    }

    /// The next message from `src` to `dest` with `tag` on this communicator; `sent`: this
    /// rank is the source.
    fn message(&self, src: usize, dest: usize, tag: u32, sent: bool) -> MsgId {
        let mut seqs = self.seqs.lock().unwrap();
        let seq = if sent {
            seqs.sent.entry((dest, tag)).or_insert(0)
        } else {
            seqs.received.entry((src, tag)).or_insert(0)
        };
        let msg = (self.inner.name().to_string(), src, dest, tag, *seq);
        *seq += 1;
        msg
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
        let msg = self.message(self.rank(), dest, tag, true);
        self.rec.record(Some(Event::Send {
            msg: msg.clone(),
            bytes: buf.size_bytes(),
        }));
        Ok(self.pending(self.inner.i_send(buf, dest, tag)?, Op::Send(msg)))
    }
    fn i_recv(&self, buf: Buffer, src: usize, tag: u32) -> switchyard_comm::Result<Request> {
        // Posting a receive is a checkpoint; its wait is what the trace keeps.
        let msg = self.message(src, self.rank(), tag, false);
        self.rec.record(None);
        Ok(self.pending(self.inner.i_recv(buf, src, tag)?, Op::Recv(msg)))
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

/// Per-rank results of replaying traces ([`replay`]); ranks in trace order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replay {
    /// The rank's clock at the end of its trace (seconds).
    pub end: Vec<f64>,
    /// The rank's summed compute.
    pub compute: Vec<f64>,
    /// The summed link cost of the rank's collectives and of the messages it received: what
    /// it would pay with no overlap at all.
    pub comm: Vec<f64>,
    /// Bytes of the point-to-point messages the rank sent.
    pub sent: Vec<usize>,
}

impl Replay {
    /// The step time: the slowest rank's end.
    pub fn step(&self) -> f64 {
        self.end.iter().copied().fold(0.0, f64::max)
    }

    /// The rank that finishes last (of several, the highest).
    pub fn last(&self) -> usize {
        (0..self.end.len())
            .max_by(|&a, &b| self.end[a].total_cmp(&self.end[b]))
            .expect("at least one rank")
    }

    /// The largest link cost of any rank.
    pub fn max_comm(&self) -> f64 {
        self.comm.iter().copied().fold(0.0, f64::max)
    }
}

/// One member's post of a collective: (rank, its clock, messages, bytes).
type PostAt = (usize, f64, usize, usize);

/// Replays the traces of one step, one per rank (a message's receiver is the trace that
/// waits for its arrival, whatever communicator carried it), on virtual clocks with `link`'s
/// costs (`None`: free links).
pub fn replay(traces: &[Vec<Event>], link: Option<LinkModel>) -> Replay {
    let w = traces.len();
    let cost =
        |messages: usize, bytes: usize| link.map_or(0.0, |l| l.cost(messages, bytes).as_secs_f64());
    let mut receiver: HashMap<&MsgId, usize> = HashMap::new();
    for (r, trace) in traces.iter().enumerate() {
        for event in trace {
            if let Event::Wait(Op::Recv(msg)) = event {
                receiver.insert(msg, r);
            }
        }
    }
    let mut out = Replay {
        end: vec![0.0; w],
        compute: vec![0.0; w],
        comm: vec![0.0; w],
        sent: vec![0; w],
    };
    let mut pc = vec![0usize; w];
    // Collectives. Per collective: its member count and the posts so far. Per rank: its
    // posted collectives not yet resolved, in post order; resolved ready times; when its
    // link is free.
    let mut posts: HashMap<&CollId, (usize, Vec<PostAt>)> = HashMap::new();
    let mut queue: Vec<VecDeque<&CollId>> = vec![VecDeque::new(); w];
    let mut ready: Vec<HashMap<&CollId, f64>> = vec![HashMap::new(); w];
    let mut link_free = vec![0.0f64; w];
    // Messages: (arrival, link cost) per sent message; when each directed link (sender,
    // receiver) is free. A message no trace receives gets a link of its own destination
    // (numbered past the traces).
    let mut arrival: HashMap<&MsgId, (f64, f64)> = HashMap::new();
    let mut directed_free: HashMap<(usize, usize), f64> = HashMap::new();
    loop {
        let mut progressed = false;
        for r in 0..w {
            while let Some(event) = traces[r].get(pc[r]) {
                let clock = &mut out.end[r];
                match event {
                    Event::Compute(d) => {
                        *clock += d;
                        out.compute[r] += d;
                    }
                    Event::Post {
                        id,
                        members,
                        messages,
                        bytes,
                    } => {
                        let entry = posts.entry(id).or_insert((*members, Vec::new()));
                        entry.1.push((r, *clock, *messages, *bytes));
                        queue[r].push_back(id);
                    }
                    Event::Send { msg, bytes } => {
                        let to = receiver.get(msg).copied().unwrap_or(w + msg.2);
                        let free = directed_free.entry((r, to)).or_insert(0.0);
                        let c = cost(1, *bytes);
                        let at = clock.max(*free) + c;
                        *free = at;
                        arrival.insert(msg, (at, c));
                        out.sent[r] += bytes;
                    }
                    Event::Wait(Op::Collective(id)) => {
                        // Resolve this rank's queued collectives in post order up to `id`.
                        let mut blocked = false;
                        while !ready[r].contains_key(id) {
                            let Some(&head) = queue[r].front() else {
                                panic!("rank {r} waits for {id:?}, which it never posted");
                            };
                            let (members, list) = &posts[head];
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
                            out.comm[r] += c;
                            ready[r].insert(head, done);
                            queue[r].pop_front();
                        }
                        if blocked {
                            break;
                        }
                        *clock = clock.max(ready[r][id]);
                    }
                    Event::Wait(op @ (Op::Send(msg) | Op::Recv(msg))) => match arrival.get(msg) {
                        // The sender has not reached this send yet: replay it first.
                        None => break,
                        Some(&(at, c)) => {
                            *clock = clock.max(at);
                            if matches!(op, Op::Recv(_)) {
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
            "the traces deadlock: a collective some member never posts, or a receive without \
             its send"
        );
    }
}

/// Combines repetitions of one schedule (traces of the same events): each compute segment
/// keeps its shortest measurement (on a shared machine, noise only ever adds time).
pub fn fastest(reps: impl IntoIterator<Item = Vec<Vec<Event>>>) -> Vec<Vec<Event>> {
    let mut reps = reps.into_iter();
    let mut best = reps.next().expect("at least one repetition");
    for traces in reps {
        assert_eq!(
            best.len(),
            traces.len(),
            "the same ranks in every repetition"
        );
        for (b, t) in best.iter_mut().zip(traces) {
            assert_eq!(b.len(), t.len(), "the schedule does not depend on timing");
            for (be, te) in b.iter_mut().zip(t) {
                match (be, te) {
                    (Event::Compute(b), Event::Compute(t)) => *b = b.min(t),
                    (be, te) => assert_eq!(*be, te, "the schedule does not depend on timing"),
                }
            }
        }
    }
    best
}

/// Runs `f(world, recorder)` for every rank of `comms` on its own thread (64 MiB stack) inside
/// a one-thread rayon pool, with one shared CPU token; returns the results in rank order.
/// `world` records into `recorder`; `f` calls `recorder.start()` / `stop()` around what it
/// wants traced.
pub fn run_ranks<T: Send>(
    comms: Vec<LocalComm>,
    f: impl Fn(Box<dyn Communicator>, Arc<Recorder>) -> T + Sync,
) -> Vec<T> {
    const STACK: usize = 64 << 20;
    let cpu = Arc::new(Cpu::default());
    LocalWorld::spawn(comms, Some(STACK), |c| {
        let rec = Recorder::new(cpu.clone());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .stack_size(STACK)
            .build()
            .expect("one-thread pool");
        pool.install(|| {
            let world = RecordingComm::wrap(Box::new(c), rec.clone());
            f(Box::new(world), rec)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coll(seq: u64) -> CollId {
        ("world".into(), seq)
    }

    fn post(seq: u64, bytes: usize) -> Event {
        Event::Post {
            id: coll(seq),
            members: 2,
            messages: 1,
            bytes,
        }
    }

    fn wait(seq: u64) -> Event {
        Event::Wait(Op::Collective(coll(seq)))
    }

    fn msg(comm: &str, src: usize, dest: usize, seq: u64) -> MsgId {
        (comm.into(), src, dest, 7, seq)
    }

    fn send(msg: &MsgId, bytes: usize) -> Event {
        Event::Send {
            msg: msg.clone(),
            bytes,
        }
    }

    fn recv(msg: &MsgId) -> Event {
        Event::Wait(Op::Recv(msg.clone()))
    }

    fn delivered(msg: &MsgId) -> Event {
        Event::Wait(Op::Send(msg.clone()))
    }

    /// A latency-free link of 1000 bytes per second.
    fn link() -> LinkModel {
        LinkModel {
            latency: Duration::ZERO,
            bytes_per_sec: 1000.0,
        }
    }

    #[test]
    fn a_collective_waits_for_its_last_member_then_costs_the_link() {
        let traces = vec![
            vec![Event::Compute(1.0), post(1, 1000), wait(1)],
            vec![Event::Compute(2.0), post(1, 1000), wait(1)],
        ];
        let linked = replay(&traces, Some(link()));
        assert_eq!(linked.end, [3.0, 3.0]);
        assert_eq!(linked.comm, [1.0, 1.0]);
        assert_eq!((linked.step(), linked.max_comm()), (3.0, 1.0));
        assert_eq!(replay(&traces, None).step(), 2.0);
    }

    #[test]
    fn compute_between_post_and_wait_hides_the_transfer() {
        // Transfer 1 s under compute 1.5 s: hidden; a second transfer queues behind it.
        let rank = vec![
            post(1, 1000),
            post(2, 1000),
            Event::Compute(1.5),
            wait(1),
            wait(2),
        ];
        assert_eq!(replay(&[rank.clone(), rank], Some(link())).step(), 2.0);
    }

    /// Messages both ways, queueing on one directed link but not on the reverse one, and a
    /// collective after them; every clock checked exactly (binary fractions of seconds).
    #[test]
    fn messages_and_collectives_replay_to_exact_clocks() {
        let link = LinkModel {
            latency: Duration::from_millis(125),
            bytes_per_sec: 1000.0,
        };
        let (m0, m1, back) = (
            msg("world", 0, 1, 0),
            msg("world", 0, 1, 1),
            msg("world", 1, 0, 0),
        );
        let collective = Event::Post {
            id: coll(1),
            members: 2,
            messages: 2,
            bytes: 250,
        };
        let traces = vec![
            vec![
                Event::Compute(1.0),
                send(&m0, 1000),      // arrives 1 + 1.125 = 2.125
                send(&m1, 500),       // queues: 2.125 + 0.625 = 2.75
                Event::Compute(0.25), // 1.25
                recv(&back),          // arrived 1.125: no wait
                delivered(&m0),       // 2.125
                delivered(&m1),       // 2.75
                collective.clone(),   // posted at 2.75
                wait(1),              // max(3.5, link free 0) + 0.5 = 4.0
            ],
            vec![
                send(&back, 1000),     // reverse link, free: 0 + 1.125
                recv(&m0),             // 2.125
                Event::Compute(1.375), // 3.5
                recv(&m1),             // arrived 2.75: no wait
                collective,            // posted at 3.5
                delivered(&back),      // delivered long ago
                wait(1),               // 4.0
            ],
        ];
        let linked = replay(&traces, Some(link));
        assert_eq!(
            linked,
            Replay {
                end: vec![4.0, 4.0],
                compute: vec![1.25, 1.375],
                // Rank 0: the collective + the message it received; rank 1: two messages +
                // the collective.
                comm: vec![0.5 + 1.125, 1.125 + 0.625 + 0.5],
                sent: vec![1500, 1000],
            }
        );
        assert_eq!(linked.last(), 1);
        // Free links: compute and waiting for the peer only.
        let free = replay(&traces, None);
        assert_eq!(free.end, [2.375, 2.375]);
        assert_eq!(free.comm, [0.0, 0.0]);
    }

    /// The link of a message joins the trace that sends it and the trace that receives it,
    /// whatever communicator (and ranks there) carried it.
    #[test]
    fn messages_between_two_ranks_share_their_link_across_communicators() {
        let (a, b) = (msg("world", 0, 2, 0), msg("world/split1:0", 0, 1, 0));
        let traces = vec![
            vec![send(&a, 1000), send(&b, 1000), delivered(&a), delivered(&b)],
            vec![],
            vec![recv(&a), recv(&b)],
        ];
        let r = replay(&traces, Some(link()));
        assert_eq!(r.end, [2.0, 0.0, 2.0]);
        assert_eq!(r.comm, [0.0, 0.0, 2.0]);
    }

    #[test]
    fn fastest_keeps_each_compute_segments_minimum() {
        let m = msg("world", 0, 1, 0);
        let rep = |a: f64, b: f64| {
            vec![
                vec![Event::Compute(a), send(&m, 8), Event::Compute(b)],
                vec![recv(&m), Event::Compute(b)],
            ]
        };
        let best = fastest([rep(2.0, 1.0), rep(1.0, 3.0), rep(4.0, 0.5)]);
        assert_eq!(best, rep(1.0, 0.5));
    }

    /// What a recording communicator records: sends with their sizes, receives and
    /// collectives, ids that match across ranks, compute between every two calls.
    #[test]
    fn recording_comm_records_messages_and_collectives() {
        use switchyard_comm::DType;
        let comms = LocalWorld::new(2, Duration::from_secs(60), None);
        let traces = run_ranks(comms, |world, rec| {
            // Unrecorded operations still number the communicator's messages.
            let peer = 1 - world.rank();
            world
                .send_recv(
                    &Buffer::zeros(DType::F32, 4),
                    peer,
                    &mut Buffer::zeros(DType::F32, 4),
                    peer,
                    3,
                )
                .unwrap();
            world.barrier().unwrap();
            rec.start();
            if world.rank() == 0 {
                world.send(&Buffer::zeros(DType::F32, 16), 1, 3).unwrap();
            } else {
                world
                    .recv(&mut Buffer::zeros(DType::F32, 16), 0, 3)
                    .unwrap();
            }
            world
                .all_reduce(&mut Buffer::zeros(DType::F64, 8), ReduceOp::Sum)
                .unwrap();
            rec.stop()
        });
        let kinds: Vec<Vec<Event>> = traces
            .iter()
            .map(|t| {
                t.iter()
                    .filter(|e| !matches!(e, Event::Compute(_)))
                    .cloned()
                    .collect()
            })
            .collect();
        let m: MsgId = ("world".into(), 0, 1, 3, 1);
        let all_reduce = Event::Post {
            id: coll(2),
            members: 2,
            messages: 2,
            bytes: 64,
        };
        assert_eq!(
            kinds,
            [
                vec![send(&m, 64), delivered(&m), all_reduce.clone(), wait(2)],
                vec![recv(&m), all_reduce, wait(2)],
            ]
        );
        // A compute segment before every call and after the last.
        assert_eq!(traces[0].len(), 2 * kinds[0].len() + 1);
        assert_eq!(traces[1].len(), 2 * kinds[1].len() + 2);
        // 64 bytes each way: the all-reduce on both ranks, the message on its receiver.
        assert_eq!(replay(&traces, Some(link())).comm, [0.064, 0.128]);
    }
}
