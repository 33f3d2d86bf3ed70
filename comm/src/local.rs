//! `local` backend: ranks are threads of one process, meeting at a rendezvous per
//! collective. For tests and single-machine runs.
//!
//! The optional [`LinkModel`] emulates a cluster interconnect: each operation completes no
//! earlier than the moment its last rank arrived plus the modelled transfer time
//! (latency + bytes / bandwidth per message, with a simple algorithm model per collective);
//! a point-to-point message is available at its post time plus its modelled time. That
//! deadline is fixed when the data is posted, and `wait` only sleeps until it (it does not
//! spin, and nothing is charged to the poster), so a rank that computes while a non-blocking
//! operation is in flight overlaps the two as on a real network. What cannot overlap is the
//! emulation's own memory copy into the result, done by the waiting rank at `wait`: a real
//! network card writes it without a CPU (`comm-bench overlap` shows its size).
//!
//! Every rank's contribution carries a description (operation, element type, sizes), so
//! mismatched collectives are detected at the rendezvous and reported on every rank, and a
//! timeout knows exactly which ranks did not arrive and what they last did.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{
    BackendKind, Buffer, Check, CommError, Communicator, PendingOp, ReduceOp, Request, Result,
};

/// Latency and bandwidth of the emulated interconnect, per message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkModel {
    pub latency: Duration,
    /// Bytes per second.
    pub bytes_per_sec: f64,
}

impl LinkModel {
    /// `latency_us` microseconds per message; `bandwidth_gbps` gigabits per second.
    pub fn new(latency_us: f64, bandwidth_gbps: f64) -> LinkModel {
        LinkModel {
            latency: crate::duration_from_secs(latency_us * 1e-6),
            bytes_per_sec: bandwidth_gbps * 1e9 / 8.0,
        }
    }

    /// Time of `messages` messages carrying `bytes` bytes in all, one after the other.
    pub fn cost(&self, messages: usize, bytes: usize) -> Duration {
        self.latency.saturating_mul(messages as u32)
            + crate::duration_from_secs(bytes as f64 / self.bytes_per_sec)
    }
}

/// Builds the communicators of an in-process world.
pub struct LocalWorld;

impl LocalWorld {
    /// `n` communicator handles named `world`, one per rank; hand each to its own thread.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(n: usize, timeout: Duration, link: Option<LinkModel>) -> Vec<LocalComm> {
        assert!(n > 0, "a local world needs at least one rank");
        let group = Group::new("world".to_string(), n, link);
        (0..n)
            .map(|rank| LocalComm::new(group.clone(), rank, timeout))
            .collect()
    }

    /// Runs `f` on `n` threads, one per rank, and returns the results in rank order.
    pub fn run<R: Send>(
        n: usize,
        timeout: Duration,
        link: Option<LinkModel>,
        f: impl Fn(&mut LocalComm) -> R + Sync,
    ) -> Vec<R> {
        LocalWorld::spawn(LocalWorld::new(n, timeout, link), None, |mut c| f(&mut c))
    }

    /// Runs `f(comm)` for every communicator of `comms` on its own thread (with a stack of
    /// `stack_bytes`, e.g. for deep autodiff graphs; `None`: the default) and returns the
    /// results in rank order.
    pub fn spawn<R: Send>(
        comms: Vec<LocalComm>,
        stack_bytes: Option<usize>,
        f: impl Fn(LocalComm) -> R + Sync,
    ) -> Vec<R> {
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let f = &f;
                    let mut builder =
                        std::thread::Builder::new().name(format!("local-rank-{}", c.rank));
                    if let Some(bytes) = stack_bytes {
                        builder = builder.stack_size(bytes);
                    }
                    builder
                        .spawn_scoped(s, move || f(c))
                        .expect("spawn rank thread")
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a rank thread panicked"))
                .collect()
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Barrier,
    Broadcast { root: usize },
    AllReduce { op: ReduceOp },
    AllGatherV,
    ReduceScatter { op: ReduceOp },
    AllToAllV,
    Split { color: u32, key: i32 },
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Barrier => "barrier",
            Kind::Broadcast { .. } => "broadcast",
            Kind::AllReduce { .. } => "all_reduce",
            Kind::AllGatherV => "all_gather_v",
            Kind::ReduceScatter { .. } => "reduce_scatter",
            Kind::AllToAllV => "all_to_all_v",
            Kind::Split { .. } => "split",
        }
    }
}

struct Contrib {
    kind: Kind,
    data: Buffer,
    /// all_gather_v / reduce_scatter: recv counts; all_to_all_v: send counts.
    counts: Vec<usize>,
    /// all_to_all_v: recv counts.
    counts2: Vec<usize>,
}

#[derive(Default)]
struct Slot {
    contribs: Vec<Option<Arc<Contrib>>>,
    arrived: usize,
    last_arrival: Option<Instant>,
    /// Per rank, when its part completes under the link model (the last arrival without one).
    ready: Vec<Instant>,
    /// Ranks that took their result (or gave up).
    done: usize,
    error: Option<CommError>,
    children: Option<Arc<Children>>,
}

/// Sub-groups of a split, by colour, with their members' parent ranks.
type Children = HashMap<u32, (Arc<Group>, Vec<usize>)>;

/// A posted message. Sender and receiver share the data: whichever of the two lets go of it
/// last gets it without a copy, so posting a send costs no copy.
struct Msg {
    data: Arc<Buffer>,
    ready: Instant,
}

/// The sole owner's buffer, or a copy while the other side still holds it.
fn unshare(b: Arc<Buffer>) -> Buffer {
    Arc::try_unwrap(b).unwrap_or_else(|b| (*b).clone())
}

/// A send: complete once posted (the receiver finds the message in its mailbox); `wait`
/// hands the buffer back.
struct SendPending(Arc<Buffer>);

impl PendingOp for SendPending {
    fn test(&mut self) -> Result<bool> {
        Ok(true)
    }
    fn wait(self: Box<Self>) -> Result<Buffer> {
        Ok(unshare(self.0))
    }
}

#[derive(Default)]
struct State {
    slots: HashMap<u64, Slot>,
    mail: HashMap<(usize, usize, u32), VecDeque<Msg>>,
    /// What each rank last entered, for timeout diagnostics.
    last_op: Vec<String>,
    /// Per rank, when its emulated link is next free: collectives in flight at the same time
    /// share the rank's link (one after the other, in the order they completed arrival)
    /// instead of each getting the full bandwidth.
    link_free: Vec<Option<Instant>>,
    /// Ranks whose handle was dropped (their thread returned or failed): a collective still
    /// missing one of them can never complete, so it fails at once on the ranks waiting.
    exited: Vec<bool>,
}

struct Group {
    name: String,
    size: usize,
    link: Option<LinkModel>,
    state: Mutex<State>,
    cv: Condvar,
}

impl Group {
    fn new(name: String, size: usize, link: Option<LinkModel>) -> Arc<Group> {
        Arc::new(Group {
            name,
            size,
            link,
            state: Mutex::new(State {
                last_op: vec!["nothing yet".to_string(); size],
                link_free: vec![None; size],
                exited: vec![false; size],
                ..Default::default()
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank thread that panicked while holding the lock leaves valid data behind.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One rank's handle on a local communicator.
pub struct LocalComm {
    group: Arc<Group>,
    rank: usize,
    seq: AtomicU64,
    timeout: Duration,
    poisoned: Arc<Mutex<Option<String>>>,
}

impl LocalComm {
    fn new(group: Arc<Group>, rank: usize, timeout: Duration) -> LocalComm {
        LocalComm {
            group,
            rank,
            seq: AtomicU64::new(0),
            timeout,
            poisoned: Arc::new(Mutex::new(None)),
        }
    }

    fn check<'a>(&'a self, op: &'a str) -> Check<'a> {
        Check {
            op,
            comm: &self.group.name,
            rank: self.rank,
            size: self.group.size,
        }
    }

    fn check_poison(&self) -> Result<()> {
        if let Some(first) = self
            .poisoned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(CommError::Poisoned {
                comm: self.group.name.clone(),
                rank: self.rank,
                first,
            });
        }
        Ok(())
    }

    /// Deposits this rank's contribution and returns the pending collective.
    fn enter(
        &self,
        kind: Kind,
        data: Buffer,
        counts: Vec<usize>,
        counts2: Vec<usize>,
    ) -> Result<Pending> {
        self.check_poison()?;
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let n = self.group.size;
        let c = Arc::new(Contrib {
            kind,
            data,
            counts,
            counts2,
        });
        let mut st = self.group.lock();
        st.last_op[self.rank] = format!("{} #{seq}", c.kind.name());
        let slot = st.slots.entry(seq).or_default();
        if slot.contribs.is_empty() {
            slot.contribs = vec![None; n];
        }
        if slot.error.is_none() {
            for (q, other) in slot.contribs.iter().enumerate() {
                if let Some(other) = other
                    && let Some(detail) = mismatch(self.rank, &c, q, other)
                {
                    slot.error = Some(CommError::Mismatch {
                        op: format!("{} #{seq}", c.kind.name()),
                        comm: self.group.name.clone(),
                        rank: self.rank,
                        detail,
                    });
                    break;
                }
            }
        }
        slot.contribs[self.rank] = Some(c.clone());
        slot.arrived += 1;
        if slot.arrived == n {
            let now = Instant::now();
            slot.last_arrival = Some(now);
            slot.ready = vec![now; n];
            if let Some(link) = &self.group.link
                && slot.error.is_none()
            {
                let contribs: Vec<_> = slot.contribs.iter().map(|c| c.clone().unwrap()).collect();
                let State {
                    slots, link_free, ..
                } = &mut *st;
                let slot = slots.get_mut(&seq).expect("the slot just entered");
                for (rank, (ready, free)) in slot.ready.iter_mut().zip(link_free).enumerate() {
                    let start = free.map_or(now, |f| f.max(now));
                    *ready = start + modelled_cost(link, &c.kind, rank, &contribs);
                    *free = Some(*ready);
                }
            }
        }
        drop(st);
        self.group.cv.notify_all();
        Ok(Pending {
            group: self.group.clone(),
            rank: self.rank,
            seq,
            kind: c.kind.clone(),
            timeout: self.timeout,
            poisoned: self.poisoned.clone(),
            result: None,
        })
    }
}

/// Why contributions `a` (from rank `ra`) and `b` (from rank `rb`) cannot belong to the same
/// collective, if they cannot.
fn mismatch(ra: usize, a: &Contrib, rb: usize, b: &Contrib) -> Option<String> {
    if std::mem::discriminant(&a.kind) != std::mem::discriminant(&b.kind) {
        return Some(format!(
            "rank {ra} called {} while rank {rb} called {}",
            a.kind.name(),
            b.kind.name()
        ));
    }
    if !matches!(a.kind, Kind::Split { .. }) && a.kind != b.kind {
        return Some(format!(
            "rank {ra} called {:?} while rank {rb} called {:?}",
            a.kind, b.kind
        ));
    }
    if matches!(a.kind, Kind::Barrier | Kind::Split { .. }) {
        return None;
    }
    if a.data.dtype() != b.data.dtype() {
        return Some(format!(
            "rank {ra} passed {} elements while rank {rb} passed {}",
            a.data.dtype(),
            b.data.dtype()
        ));
    }
    match a.kind {
        Kind::Broadcast { .. } | Kind::AllReduce { .. } if a.data.len() != b.data.len() => {
            Some(format!(
                "rank {ra} passed {} elements while rank {rb} passed {}",
                a.data.len(),
                b.data.len()
            ))
        }
        Kind::AllGatherV | Kind::ReduceScatter { .. } if a.counts != b.counts => Some(format!(
            "rank {ra} passed counts {:?} while rank {rb} passed {:?}",
            a.counts, b.counts
        )),
        Kind::AllToAllV if a.counts[rb] != b.counts2[ra] => Some(format!(
            "rank {ra} sends {} elements to rank {rb}, which expects {}",
            a.counts[rb], b.counts2[ra]
        )),
        Kind::AllToAllV if a.counts2[rb] != b.counts[ra] => Some(format!(
            "rank {ra} expects {} elements from rank {rb}, which sends {}",
            a.counts2[rb], b.counts[ra]
        )),
        _ => None,
    }
}

struct Pending {
    group: Arc<Group>,
    rank: usize,
    seq: u64,
    kind: Kind,
    timeout: Duration,
    poisoned: Arc<Mutex<Option<String>>>,
    result: Option<Buffer>,
}

enum Taken {
    Data(Vec<Arc<Contrib>>, Instant, Option<Arc<Children>>),
    Err(CommError),
}

impl Pending {
    fn op_name(&self) -> String {
        format!("{} #{}", self.kind.name(), self.seq)
    }

    /// Takes the contributions if everyone arrived (`None` if not yet).
    fn try_take(&self, st: &mut State) -> Option<Taken> {
        let n = self.group.size;
        let State { slots, exited, .. } = st;
        let slot = slots.get_mut(&self.seq).expect("slot exists while pending");
        if slot.error.is_none() {
            let gone: Vec<usize> = (0..n)
                .filter(|&q| slot.contribs[q].is_none() && exited[q])
                .collect();
            if !gone.is_empty() {
                slot.error = Some(CommError::PeerExited {
                    op: self.op_name(),
                    comm: self.group.name.clone(),
                    rank: self.rank,
                    size: n,
                    exited: gone,
                });
            }
        }
        if let Some(e) = &slot.error {
            let e = e.clone();
            slot.done += 1;
            if slot.done == n {
                slots.remove(&self.seq);
            }
            return Some(Taken::Err(e));
        }
        if slot.arrived < n {
            return None;
        }
        if let Kind::Split { .. } = self.kind
            && slot.children.is_none()
        {
            slot.children = Some(Arc::new(split_groups(
                &self.group,
                self.seq,
                &slot.contribs,
            )));
        }
        let contribs: Vec<_> = slot.contribs.iter().map(|c| c.clone().unwrap()).collect();
        let t = Taken::Data(contribs, slot.ready[self.rank], slot.children.clone());
        slot.done += 1;
        if slot.done == n {
            slots.remove(&self.seq);
        }
        Some(t)
    }

    fn poison(&self, e: &CommError) {
        let mut p = self.poisoned.lock().unwrap_or_else(|e| e.into_inner());
        p.get_or_insert_with(|| e.to_string());
    }

    fn finish(&mut self, taken: Taken, sleep: bool) -> Result<Buffer> {
        let (contribs, ready, children) = match taken {
            Taken::Data(c, l, ch) => (c, l, ch),
            Taken::Err(e) => {
                self.poison(&e);
                return Err(e);
            }
        };
        let out = compute(&self.kind, self.rank, &contribs, children.as_deref());
        if sleep && self.group.link.is_some() {
            let now = Instant::now();
            if ready > now {
                std::thread::sleep(ready - now);
            }
        }
        Ok(out)
    }
}

impl PendingOp for Pending {
    fn test(&mut self) -> Result<bool> {
        if self.result.is_some() {
            return Ok(true);
        }
        let mut st = self.group.lock();
        // Not complete until everyone arrived and the modelled transfer time has passed.
        {
            let slot = &st.slots[&self.seq];
            if slot.error.is_none() {
                let waits_for_exited =
                    (0..self.group.size).any(|q| slot.contribs[q].is_none() && st.exited[q]);
                if slot.arrived < self.group.size {
                    if !waits_for_exited {
                        return Ok(false);
                    }
                } else if Instant::now() < slot.ready[self.rank] {
                    return Ok(false);
                }
            }
        }
        let taken = self
            .try_take(&mut st)
            .expect("everyone arrived, or a missing rank exited");
        drop(st);
        let out = self.finish(taken, false)?;
        self.result = Some(out);
        Ok(true)
    }

    fn wait(mut self: Box<Self>) -> Result<Buffer> {
        if let Some(out) = self.result.take() {
            return Ok(out);
        }
        let taken = self.wait_take()?;
        self.finish(taken, true)
    }
}

impl Pending {
    /// Blocks until everyone arrived (or the timeout) and takes the contributions.
    fn wait_take(&self) -> Result<Taken> {
        let deadline = crate::deadline_after(self.timeout);
        let mut st = self.group.lock();
        loop {
            if let Some(t) = self.try_take(&mut st) {
                return Ok(t);
            }
            let now = Instant::now();
            if now >= deadline {
                let n = self.group.size;
                let slot = st.slots.get_mut(&self.seq).unwrap();
                let missing: Vec<usize> = (0..n).filter(|&q| slot.contribs[q].is_none()).collect();
                // Give up our read: a late rank can still complete and clean the slot.
                slot.done += 1;
                let detail = missing
                    .iter()
                    .map(|&q| format!("; rank {q} last entered {}", st.last_op[q]))
                    .collect::<String>();
                let e = CommError::Timeout {
                    op: self.op_name(),
                    comm: self.group.name.clone(),
                    rank: self.rank,
                    size: n,
                    timeout: self.timeout,
                    missing,
                    detail,
                };
                drop(st);
                self.poison(&e);
                return Err(e);
            }
            st = self
                .group
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

fn split_groups(
    parent: &Arc<Group>,
    seq: u64,
    contribs: &[Option<Arc<Contrib>>],
) -> HashMap<u32, (Arc<Group>, Vec<usize>)> {
    let mut members: HashMap<u32, Vec<(i32, usize)>> = HashMap::new();
    for (r, c) in contribs.iter().enumerate() {
        if let Kind::Split { color, key } = c.as_ref().unwrap().kind {
            members.entry(color).or_default().push((key, r));
        }
    }
    members
        .into_iter()
        .map(|(color, mut m)| {
            m.sort();
            let ranks: Vec<usize> = m.into_iter().map(|(_, r)| r).collect();
            let name = format!("{}/split{seq}:{color}", parent.name);
            (color, (Group::new(name, ranks.len(), parent.link), ranks))
        })
        .collect()
}

fn offsets(counts: &[usize]) -> Vec<usize> {
    let mut o = Vec::with_capacity(counts.len() + 1);
    let mut acc = 0;
    o.push(0);
    for c in counts {
        acc += c;
        o.push(acc);
    }
    o
}

fn compute(
    kind: &Kind,
    rank: usize,
    contribs: &[Arc<Contrib>],
    _children: Option<&Children>,
) -> Buffer {
    let n = contribs.len();
    let me = &contribs[rank];
    match kind {
        Kind::Barrier | Kind::Split { .. } => Buffer::default(),
        Kind::Broadcast { root } => contribs[*root].data.clone(),
        Kind::AllReduce { op } => {
            let mut acc = contribs[0].data.clone();
            for c in &contribs[1..] {
                acc.reduce_assign(&c.data, *op);
            }
            if *op == ReduceOp::Mean {
                acc.scale_inv(n);
            }
            acc
        }
        Kind::AllGatherV => {
            let parts: Vec<_> = contribs
                .iter()
                .map(|c| (&c.data, 0..c.data.len()))
                .collect();
            Buffer::concat(me.data.dtype(), &parts)
        }
        Kind::ReduceScatter { op } => {
            let off = offsets(&me.counts);
            let r = off[rank]..off[rank + 1];
            let mut acc = contribs[0].data.slice(r.clone());
            for c in &contribs[1..] {
                acc.reduce_assign(&c.data.slice(r.clone()), *op);
            }
            if *op == ReduceOp::Mean {
                acc.scale_inv(n);
            }
            acc
        }
        Kind::AllToAllV => {
            let parts: Vec<_> = contribs
                .iter()
                .map(|c| {
                    let soff = offsets(&c.counts);
                    (&c.data, soff[rank]..soff[rank + 1])
                })
                .collect();
            Buffer::concat(me.data.dtype(), &parts)
        }
    }
}

fn log2_ceil(p: usize) -> usize {
    (usize::BITS - (p.max(1) - 1).leading_zeros()) as usize
}

/// Modelled time from the last arrival to completion on `rank`.
fn modelled_cost(
    link: &LinkModel,
    kind: &Kind,
    rank: usize,
    contribs: &[Arc<Contrib>],
) -> Duration {
    let p = contribs.len();
    if p == 1 {
        return Duration::ZERO;
    }
    let me = &contribs[rank];
    let es = me.data.dtype().size_bytes();
    match kind {
        Kind::Barrier | Kind::Split { .. } => link.cost(log2_ceil(p), 0),
        Kind::Broadcast { .. } => link.cost(log2_ceil(p), me.data.size_bytes()),
        Kind::AllReduce { .. } => {
            // ring: reduce-scatter + all-gather, 2(p-1) steps of 1/p of the data
            let step = link.cost(1, me.data.size_bytes() / p);
            step * (2 * (p - 1)) as u32
        }
        Kind::AllGatherV | Kind::ReduceScatter { .. } => {
            let total: usize = me.counts.iter().sum();
            link.cost(p - 1, (total - me.counts[rank]) * es)
        }
        Kind::AllToAllV => {
            // full duplex: the busier direction sets the time; one message per non-empty peer
            let sent: usize = (0..p).filter(|&q| q != rank).map(|q| me.counts[q]).sum();
            let recv: usize = (0..p).filter(|&q| q != rank).map(|q| me.counts2[q]).sum();
            let msgs = (0..p)
                .filter(|&q| q != rank && (me.counts[q] > 0 || me.counts2[q] > 0))
                .count();
            link.cost(msgs, sent.max(recv) * es)
        }
    }
}

struct RecvPending {
    group: Arc<Group>,
    rank: usize,
    src: usize,
    tag: u32,
    expect: Buffer,
    timeout: Duration,
    poisoned: Arc<Mutex<Option<String>>>,
    result: Option<Buffer>,
}

impl RecvPending {
    fn take(
        &mut self,
        st: &mut State,
        honour_ready: bool,
    ) -> Option<Result<(Arc<Buffer>, Instant)>> {
        let queued = st
            .mail
            .get(&(self.src, self.rank, self.tag))
            .is_some_and(|q| !q.is_empty());
        if !queued && st.exited[self.src] {
            let e = CommError::PeerExited {
                op: format!("recv(from {}, tag {})", self.src, self.tag),
                comm: self.group.name.clone(),
                rank: self.rank,
                size: self.group.size,
                exited: vec![self.src],
            };
            let mut p = self.poisoned.lock().unwrap_or_else(|e| e.into_inner());
            p.get_or_insert_with(|| e.to_string());
            return Some(Err(e));
        }
        let q = st.mail.get_mut(&(self.src, self.rank, self.tag))?;
        let front = q.front()?;
        if honour_ready && Instant::now() < front.ready {
            return None;
        }
        let m = q.pop_front().unwrap();
        if m.data.dtype() != self.expect.dtype() || m.data.len() != self.expect.len() {
            let e = CommError::Mismatch {
                op: format!("recv(from {}, tag {})", self.src, self.tag),
                comm: self.group.name.clone(),
                rank: self.rank,
                detail: format!(
                    "rank {} sent {} {} elements; rank {} expected {} {}",
                    self.src,
                    m.data.len(),
                    m.data.dtype(),
                    self.rank,
                    self.expect.len(),
                    self.expect.dtype()
                ),
            };
            let mut p = self.poisoned.lock().unwrap_or_else(|e| e.into_inner());
            p.get_or_insert_with(|| e.to_string());
            return Some(Err(e));
        }
        Some(Ok((m.data, m.ready)))
    }
}

impl PendingOp for RecvPending {
    fn test(&mut self) -> Result<bool> {
        if self.result.is_some() {
            return Ok(true);
        }
        let group = self.group.clone();
        let mut st = group.lock();
        match self.take(&mut st, true) {
            None => Ok(false),
            Some(r) => {
                drop(st);
                self.result = Some(unshare(r?.0));
                Ok(true)
            }
        }
    }

    fn wait(mut self: Box<Self>) -> Result<Buffer> {
        if let Some(out) = self.result.take() {
            return Ok(out);
        }
        let deadline = crate::deadline_after(self.timeout);
        let group = self.group.clone();
        let mut st = group.lock();
        loop {
            if let Some(r) = self.take(&mut st, false) {
                drop(st);
                let (data, ready) = r?;
                let data = unshare(data);
                let now = Instant::now();
                if ready > now {
                    std::thread::sleep(ready - now);
                }
                return Ok(data);
            }
            let now = Instant::now();
            if now >= deadline {
                let e = CommError::Timeout {
                    op: format!("recv(from {}, tag {})", self.src, self.tag),
                    comm: group.name.clone(),
                    rank: self.rank,
                    size: group.size,
                    timeout: self.timeout,
                    missing: vec![self.src],
                    detail: format!("; rank {} last entered {}", self.src, st.last_op[self.src]),
                };
                let mut p = self.poisoned.lock().unwrap_or_else(|e| e.into_inner());
                p.get_or_insert_with(|| e.to_string());
                return Err(e);
            }
            st = group
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A rank's handle going away means the rank is gone (finished, failed or panicked): the
/// ranks still waiting for it learn so at once instead of at their timeout.
impl Drop for LocalComm {
    fn drop(&mut self) {
        self.group.lock().exited[self.rank] = true;
        self.group.cv.notify_all();
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.group.size
    }
    fn name(&self) -> &str {
        &self.group.name
    }
    fn backend(&self) -> BackendKind {
        BackendKind::Local
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }
    fn detects_mismatch(&self) -> bool {
        true
    }

    fn i_barrier(&self) -> Result<Request> {
        Ok(Request::new(self.enter(
            Kind::Barrier,
            Buffer::default(),
            vec![],
            vec![],
        )?))
    }

    fn i_broadcast(&self, buf: Buffer, root: usize) -> Result<Request> {
        self.check("broadcast").peer("root", root)?;
        Ok(Request::new(self.enter(
            Kind::Broadcast { root },
            buf,
            vec![],
            vec![],
        )?))
    }

    fn i_all_reduce(&self, buf: Buffer, op: ReduceOp) -> Result<Request> {
        self.check("all_reduce").reduce(buf.dtype(), op)?;
        Ok(Request::new(self.enter(
            Kind::AllReduce { op },
            buf,
            vec![],
            vec![],
        )?))
    }

    fn i_all_gather_v(&self, send: Buffer, recv_counts: Vec<usize>) -> Result<Request> {
        let ck = self.check("all_gather_v");
        ck.counts("recv_counts", &recv_counts)?;
        ck.len("send", send.len(), recv_counts[self.rank])?;
        Ok(Request::new(self.enter(
            Kind::AllGatherV,
            send,
            recv_counts,
            vec![],
        )?))
    }

    fn i_reduce_scatter(
        &self,
        send: Buffer,
        recv_counts: Vec<usize>,
        op: ReduceOp,
    ) -> Result<Request> {
        let ck = self.check("reduce_scatter");
        ck.reduce(send.dtype(), op)?;
        let total = ck.counts("recv_counts", &recv_counts)?;
        ck.len("send", send.len(), total)?;
        Ok(Request::new(self.enter(
            Kind::ReduceScatter { op },
            send,
            recv_counts,
            vec![],
        )?))
    }

    fn i_all_to_all_v(
        &self,
        send: Buffer,
        send_counts: Vec<usize>,
        recv_counts: Vec<usize>,
    ) -> Result<Request> {
        let ck = self.check("all_to_all_v");
        let total = ck.counts("send_counts", &send_counts)?;
        ck.counts("recv_counts", &recv_counts)?;
        ck.len("send", send.len(), total)?;
        Ok(Request::new(self.enter(
            Kind::AllToAllV,
            send,
            send_counts,
            recv_counts,
        )?))
    }

    fn i_send(&self, buf: Buffer, dest: usize, tag: u32) -> Result<Request> {
        self.check("send").peer("dest", dest)?;
        self.check_poison()?;
        let ready = Instant::now()
            + self
                .group
                .link
                .filter(|_| dest != self.rank)
                .map_or(Duration::ZERO, |l| l.cost(1, buf.size_bytes()));
        let data = Arc::new(buf);
        let mut st = self.group.lock();
        st.last_op[self.rank] = format!("send(to {dest}, tag {tag})");
        st.mail
            .entry((self.rank, dest, tag))
            .or_default()
            .push_back(Msg {
                data: data.clone(),
                ready,
            });
        drop(st);
        self.group.cv.notify_all();
        Ok(Request::new(SendPending(data)))
    }

    fn i_recv(&self, buf: Buffer, src: usize, tag: u32) -> Result<Request> {
        self.check("recv").peer("src", src)?;
        self.check_poison()?;
        self.group.lock().last_op[self.rank] = format!("recv(from {src}, tag {tag})");
        Ok(Request::new(RecvPending {
            group: self.group.clone(),
            rank: self.rank,
            src,
            tag,
            expect: buf,
            timeout: self.timeout,
            poisoned: self.poisoned.clone(),
            result: None,
        }))
    }

    fn split(&self, color: u32, key: i32) -> Result<Box<dyn Communicator>> {
        let p = self.enter(
            Kind::Split { color, key },
            Buffer::default(),
            vec![],
            vec![],
        )?;
        let taken = p.wait_take()?;
        match taken {
            Taken::Err(e) => {
                p.poison(&e);
                Err(e)
            }
            Taken::Data(_, _, children) => {
                let children = children.expect("split computes its groups");
                let (group, ranks) = &children[&color];
                let new_rank = ranks.iter().position(|&r| r == self.rank).unwrap();
                Ok(Box::new(LocalComm::new(
                    group.clone(),
                    new_rank,
                    self.timeout,
                )))
            }
        }
    }

    fn abort(&self, reason: &str, code: i32) -> ! {
        eprintln!(
            "switchyard-comm: rank {} of `{}` aborts the job: {reason}",
            self.rank, self.group.name
        );
        std::process::exit(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    /// The link model's deadline runs from the post, not from `wait`: an operation left alone
    /// for longer than its modelled time is complete when first tested (so compute issued
    /// meanwhile overlaps it), and not before.
    /// A rank that leaves (its thread returns or fails) ends the others' waits for it at
    /// once, blocking or polled, collective or point-to-point, instead of at the timeout;
    /// a collective it took part in still completes.
    #[test]
    fn a_rank_that_leaves_fails_the_waits_for_it_at_once() {
        let timeout = Duration::from_secs(600);
        let started = Instant::now();
        let results = LocalWorld::spawn(LocalWorld::new(3, timeout, None), None, |c| {
            let mut one = Buffer::I64(vec![1]);
            c.all_reduce(&mut one, ReduceOp::Sum).unwrap();
            if c.rank() == 2 {
                return Ok(Vec::new()); // leaves: drops its handle
            }
            let mut errors = Vec::new();
            let mut polled = c.i_all_reduce(Buffer::I64(vec![1]), ReduceOp::Max).unwrap();
            while !polled.test().map_err(|e| errors.push(e)).unwrap_or(true) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if errors.is_empty() {
                return Err("the polled all-reduce completed without rank 2".to_string());
            }
            let recv = c.recv(&mut Buffer::I64(vec![0]), 2, 7).unwrap_err();
            errors.push(recv);
            Ok(errors)
        });
        assert!(
            started.elapsed() < timeout / 2,
            "the waits ended by the timeout"
        );
        for (rank, r) in results.into_iter().enumerate().take(2) {
            let errors = r.unwrap();
            match &errors[0] {
                CommError::PeerExited { exited, .. } => assert_eq!(exited, &[2]),
                other => panic!("rank {rank}: {other:?}"),
            }
            assert!(errors.iter().all(CommError::is_consequence), "{errors:?}");
            assert!(errors[0].to_string().contains("[2]"), "{}", errors[0]);
        }
    }

    #[test]
    fn link_deadline_runs_from_the_post() {
        let latency = Duration::from_millis(400);
        let link = LinkModel {
            latency,
            bytes_per_sec: 1e12,
        };
        LocalWorld::run(2, Duration::from_secs(30), Some(link), |c| {
            let n = c.size();
            // Both ranks leave the barrier at its common deadline, so they post together.
            c.barrier().unwrap();
            let posted = Instant::now();
            let mut a2a = c
                .i_all_to_all_v(
                    Buffer::F32(vec![c.rank() as f32; n]),
                    vec![1; n],
                    vec![1; n],
                )
                .unwrap();
            let peer = 1 - c.rank();
            let mut recv = c.i_recv(Buffer::zeros(DType::U8, 3), peer, 7).unwrap();
            let send = c.i_send(Buffer::U8(vec![1, 2, 3]), peer, 7).unwrap();
            // One message per peer: one latency for either operation.
            if posted.elapsed() < latency / 2 {
                assert!(
                    !recv.test().unwrap(),
                    "a message arrived before its latency"
                );
            }
            std::thread::sleep(2 * latency);
            assert!(
                a2a.test().unwrap(),
                "all-to-all not complete after its modelled time"
            );
            assert!(
                recv.test().unwrap(),
                "message not there after its modelled time"
            );
            assert_eq!(
                a2a.wait().unwrap(),
                Buffer::F32((0..n).map(|q| q as f32).collect())
            );
            assert_eq!(recv.wait().unwrap(), Buffer::U8(vec![1, 2, 3]));
            assert_eq!(send.wait().unwrap(), Buffer::U8(vec![1, 2, 3]));
        });
    }
}
