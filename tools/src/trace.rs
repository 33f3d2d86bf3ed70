//! Record and replay, for benchmarks that emulate more ranks than the machine has cores
//! (`ep-overlap-bench`, `placement-bench --whole-step`): with 4-8 ranks on 2 shared cores a
//! wall-clock step measures the oversubscribed machine (every exchange is a rendezvous of
//! threads fighting for the cores), not the schedule. Instead each rank runs in its own
//! one-thread pool and computes only while holding the process's single CPU token
//! ([`Cpu`]); its compute segments are charged the thread's CPU time, and its trace
//! (compute, collective posts, waits) is replayed on virtual clocks with a [`LinkModel`]: a
//! collective completes for a rank at max(last member's post, the rank's link free) + its
//! cost, and a rank's collectives queue on its link in post order.
//!
//! What a collective costs a rank on its link (messages, bytes): a ring all-reduce
//! `2(p-1)` steps of `1/p` of the data; all-gather / reduce-scatter the other ranks'
//! shares; an all-to-all one message per non-empty peer and the busier direction's bytes
//! (full duplex); broadcast and barrier `ceil(log2 p)` messages. Point-to-point messages are
//! not recorded (`cp-bench` records those itself).

// The recording communicator implements `Communicator`, whose methods return `comm`'s
// error type by value (see `switchyard_comm`'s own allowance).
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_comm::{BackendKind, Buffer, Communicator, LinkModel, PendingOp, ReduceOp, Request};

use switchyard_comm::LocalWorld;
use switchyard_comm::local::LocalComm;

use crate::clock::{Cpu, thread_cpu_time};

/// A collective: (communicator name, its sequence number there).
pub type CollId = (String, u64);

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

/// One rank's recorder: its trace and the shared CPU token.
pub struct Recorder {
    cpu: Arc<Cpu>,
    st: Mutex<Trace>,
}

impl Recorder {
    pub fn new(cpu: Arc<Cpu>) -> Arc<Recorder> {
        Arc::new(Recorder {
            cpu,
            st: Mutex::new(Trace {
                running: false,
                resumed: 0.0,
                events: Vec::new(),
            }),
        })
    }

    fn checkpoint(st: &mut Trace) {
        if st.running {
            let now = cpu_time();
            st.events.push(Event::Compute((now - st.resumed).max(0.0)));
            st.resumed = now;
        }
    }

    /// Takes the CPU token and starts a new trace.
    pub fn start(&self) {
        self.cpu.acquire();
        let mut st = self.st.lock().unwrap();
        st.running = true;
        st.resumed = cpu_time();
        st.events.clear();
    }

    /// Ends the trace, releases the CPU token and returns the events.
    pub fn stop(&self) -> Vec<Event> {
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

/// A communicator that records its collectives into a [`Recorder`] (and releases the CPU
/// token while it waits); sub-communicators record into the same one.
pub struct RecordingComm {
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
    pub fn wrap(inner: Box<dyn Communicator>, rec: Arc<Recorder>) -> RecordingComm {
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
pub fn replay(traces: &[Vec<Event>], link: Option<LinkModel>) -> (f64, f64) {
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
    let mut queue: Vec<VecDeque<CollId>> = vec![Default::default(); w];
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

/// Runs `f(world, recorder)` for every rank of `comms` on its own thread (64 MiB stack) inside
/// a one-thread rayon pool, with one shared CPU token; returns the results in rank order.
/// `f` calls `recorder.start()` / `stop()` around what it wants traced.
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

    fn post(seq: u64, bytes: usize) -> Event {
        Event::Post {
            id: ("world".into(), seq),
            members: 2,
            messages: 1,
            bytes,
        }
    }

    fn wait(seq: u64) -> Event {
        Event::Wait(("world".into(), seq))
    }

    /// A latency-free link of 1000 bytes per second.
    fn link() -> LinkModel {
        LinkModel::new(0.0, 8.0 * 1000.0 / 1e9)
    }

    #[test]
    fn a_collective_waits_for_its_last_member_then_costs_the_link() {
        let traces = vec![
            vec![Event::Compute(1.0), post(1, 1000), wait(1)],
            vec![Event::Compute(2.0), post(1, 1000), wait(1)],
        ];
        let (end, comm) = replay(&traces, Some(link()));
        assert!((end - 3.0).abs() < 1e-9, "{end}");
        assert!((comm - 1.0).abs() < 1e-9, "{comm}");
        let (free, _) = replay(&traces, None);
        assert!((free - 2.0).abs() < 1e-9, "{free}");
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
        let (end, _) = replay(&[rank.clone(), rank], Some(link()));
        assert!((end - 2.0).abs() < 1e-9, "{end}");
    }
}
