//! NCCL's point-to-point semantics on any communicator, so that CPU tests catch the orders
//! of sends and receives that only deadlock on NCCL.
//!
//! On MPI (and the local backend) a non-blocking send completes on its own. On NCCL a send
//! completes only once the peer has *issued* the matching receive, and the `nccl` backend
//! issues deferred sends and receives as one group whose completion is all or nothing (one
//! CUDA event). [`Rendezvous`] wraps a communicator with exactly that: `i_send` / `i_recv`
//! are deferred until one of them is tested or waited (or a collective is issued), then the
//! whole batch is issued as a group; a receive acknowledges its sender when issued; a group
//! completes when every receive has its data and every send its acknowledgement. An order
//! that would hang NCCL times out here instead.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{BackendKind, Buffer, Communicator, PendingOp, ReduceOp, Request, Result};

/// Tags of acknowledgements: the user's tag with this bit set.
const ACK_BIT: u32 = 1 << 30;

enum Kind {
    Send(Buffer),
    Recv(Buffer),
}

struct Deferred {
    kind: Kind,
    peer: usize,
    tag: u32,
    slot: Arc<Mutex<Slot>>,
}

#[derive(Default)]
enum Slot {
    #[default]
    Deferred,
    /// Issued in this group, at this position.
    Issued(Arc<Mutex<Group>>, usize),
}

/// One issued batch: the inner requests (data and acknowledgements) of every member, and
/// the members' outputs once the whole group completed.
struct Group {
    requests: Vec<Request>,
    /// Per member: which of `requests` is its data (a send's own buffer is handed back).
    data: Vec<Option<usize>>,
    sent: Vec<Option<Buffer>>,
    outputs: Option<Result<Vec<Buffer>>>,
}

impl Group {
    fn complete(&mut self) -> Result<Vec<Buffer>> {
        if self.outputs.is_none() {
            let mut done = Vec::with_capacity(self.requests.len());
            let mut failed = None;
            for r in self.requests.drain(..) {
                match r.wait() {
                    Ok(b) => done.push(b),
                    Err(e) => {
                        failed.get_or_insert(e);
                        done.push(Buffer::default());
                    }
                }
            }
            self.outputs = Some(match failed {
                Some(e) => Err(e),
                None => Ok(self
                    .data
                    .iter()
                    .zip(&mut self.sent)
                    .map(|(d, s)| match d {
                        Some(i) => std::mem::take(&mut done[*i]),
                        None => s.take().unwrap_or_default(),
                    })
                    .collect()),
            });
        }
        self.outputs.clone().expect("just set")
    }
}

/// The wrapped communicator and the batch not issued yet, shared with the requests (a
/// request's first `test` or `wait` issues the batch).
struct Shared {
    inner: Mutex<Box<dyn Communicator>>,
    deferred: Mutex<Vec<Deferred>>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Issues every deferred send and receive as one group.
    fn flush(&self) -> Result<()> {
        let batch = std::mem::take(&mut *lock(&self.deferred));
        if batch.is_empty() {
            return Ok(());
        }
        let inner = lock(&self.inner);
        let mut requests = Vec::new();
        let mut data = Vec::new();
        let mut sent = Vec::new();
        let mut slots = Vec::new();
        for d in batch {
            match d.kind {
                Kind::Send(buf) => {
                    requests.push(inner.i_send(buf.clone(), d.peer, d.tag)?);
                    // Complete only once the peer has issued its receive.
                    requests.push(inner.i_recv(Buffer::U8(vec![0]), d.peer, d.tag | ACK_BIT)?);
                    data.push(None);
                    sent.push(Some(buf));
                }
                Kind::Recv(buf) => {
                    requests.push(inner.i_send(Buffer::U8(vec![1]), d.peer, d.tag | ACK_BIT)?);
                    data.push(Some(requests.len()));
                    requests.push(inner.i_recv(buf, d.peer, d.tag)?);
                    sent.push(None);
                }
            }
            slots.push(d.slot);
        }
        let group = Arc::new(Mutex::new(Group {
            requests,
            data,
            sent,
            outputs: None,
        }));
        for (i, slot) in slots.into_iter().enumerate() {
            *lock(&slot) = Slot::Issued(group.clone(), i);
        }
        Ok(())
    }
}

/// A communicator with NCCL's point-to-point semantics (see the module docs).
pub struct Rendezvous {
    shared: Arc<Shared>,
    name: String,
    rank: usize,
    size: usize,
}

impl Rendezvous {
    pub fn new(inner: Box<dyn Communicator>) -> Rendezvous {
        Rendezvous {
            name: format!("rendezvous:{}", inner.name()),
            rank: inner.rank(),
            size: inner.size(),
            shared: Arc::new(Shared {
                inner: Mutex::new(inner),
                deferred: Mutex::new(Vec::new()),
            }),
        }
    }

    fn flush(&self) -> Result<()> {
        self.shared.flush()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Box<dyn Communicator>> {
        lock(&self.shared.inner)
    }

    fn defer(&self, kind: Kind, peer: usize, tag: u32) -> Request {
        let slot = Arc::new(Mutex::new(Slot::Deferred));
        lock(&self.shared.deferred).push(Deferred {
            kind,
            peer,
            tag,
            slot: slot.clone(),
        });
        Request::new(Member {
            shared: self.shared.clone(),
            slot,
        })
    }
}

/// A deferred send or receive of a [`Rendezvous`].
struct Member {
    shared: Arc<Shared>,
    slot: Arc<Mutex<Slot>>,
}

impl Member {
    fn group(&self) -> Result<(Arc<Mutex<Group>>, usize)> {
        let issued = |s: &Slot| match s {
            Slot::Issued(g, i) => Some((g.clone(), *i)),
            Slot::Deferred => None,
        };
        if let Some(found) = issued(&lock(&self.slot)) {
            return Ok(found);
        }
        self.shared.flush()?;
        Ok(issued(&lock(&self.slot)).expect("a flush issues every deferred operation"))
    }
}

impl PendingOp for Member {
    fn test(&mut self) -> Result<bool> {
        let (group, _) = self.group()?;
        let done = lock(&group).outputs.is_some();
        Ok(done)
    }
    fn wait(self: Box<Self>) -> Result<Buffer> {
        let (group, i) = self.group()?;
        let mut outputs = lock(&group).complete()?;
        Ok(std::mem::take(&mut outputs[i]))
    }
}

impl Communicator for Rendezvous {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn backend(&self) -> BackendKind {
        self.inner().backend()
    }
    fn timeout(&self) -> Duration {
        self.inner().timeout()
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.inner().set_timeout(timeout)
    }
    fn detects_mismatch(&self) -> bool {
        self.inner().detects_mismatch()
    }
    fn i_barrier(&self) -> Result<Request> {
        self.flush()?;
        self.inner().i_barrier()
    }
    fn i_broadcast(&self, buf: Buffer, root: usize) -> Result<Request> {
        self.flush()?;
        self.inner().i_broadcast(buf, root)
    }
    fn i_all_reduce(&self, buf: Buffer, op: ReduceOp) -> Result<Request> {
        self.flush()?;
        self.inner().i_all_reduce(buf, op)
    }
    fn i_all_gather_v(&self, send: Buffer, recv_counts: Vec<usize>) -> Result<Request> {
        self.flush()?;
        self.inner().i_all_gather_v(send, recv_counts)
    }
    fn i_reduce_scatter(
        &self,
        send: Buffer,
        recv_counts: Vec<usize>,
        op: ReduceOp,
    ) -> Result<Request> {
        self.flush()?;
        self.inner().i_reduce_scatter(send, recv_counts, op)
    }
    fn i_all_to_all_v(
        &self,
        send: Buffer,
        send_counts: Vec<usize>,
        recv_counts: Vec<usize>,
    ) -> Result<Request> {
        self.flush()?;
        self.inner().i_all_to_all_v(send, send_counts, recv_counts)
    }
    fn i_send(&self, buf: Buffer, dest: usize, tag: u32) -> Result<Request> {
        Ok(self.defer(Kind::Send(buf), dest, tag))
    }
    fn i_recv(&self, buf: Buffer, src: usize, tag: u32) -> Result<Request> {
        Ok(self.defer(Kind::Recv(buf), src, tag))
    }
    fn split(&self, color: u32, key: i32) -> Result<Box<dyn Communicator>> {
        self.flush()?;
        let sub = self.inner().split(color, key)?;
        Ok(Box::new(Rendezvous::new(sub)))
    }
    fn abort(&self, reason: &str, code: i32) -> ! {
        self.inner().abort(reason, code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CommError, DType, LocalWorld};

    fn ring(c: crate::local::LocalComm, post_both_then_wait: bool) -> Result<f64> {
        let c = Rendezvous::new(Box::new(c));
        let (n, r) = (c.size(), c.rank());
        let mine = Buffer::F64(vec![r as f64]);
        if post_both_then_wait {
            // Posts both, then waits: one group on every rank, matched.
            let recv = c.i_recv(Buffer::zeros(DType::F64, 1), (r + n - 1) % n, 3)?;
            let send = c.i_send(mine, (r + 1) % n, 3)?;
            let got = recv.wait()?;
            send.wait()?;
            Ok(got.get_f64(0))
        } else {
            // Waits for its send before posting the receive: fine on MPI, a hang on NCCL.
            c.i_send(mine, (r + 1) % n, 3)?.wait()?;
            let got = c
                .i_recv(Buffer::zeros(DType::F64, 1), (r + n - 1) % n, 3)?
                .wait()?;
            Ok(got.get_f64(0))
        }
    }

    fn world(n: usize, timeout: Duration) -> Vec<crate::local::LocalComm> {
        LocalWorld::new(n, timeout, None)
    }

    #[test]
    fn a_ring_step_posted_together_completes() {
        let got = LocalWorld::spawn(world(3, Duration::from_secs(20)), None, |c| ring(c, true));
        let got: Vec<f64> = got.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(got, vec![2.0, 0.0, 1.0]);
    }

    #[test]
    fn a_send_waited_before_its_peer_posts_the_receive_times_out_as_on_nccl() {
        let got = LocalWorld::spawn(world(3, Duration::from_millis(400)), None, |c| {
            ring(c, false)
        });
        for r in got {
            assert!(
                matches!(
                    r,
                    Err(CommError::Timeout { .. } | CommError::PeerExited { .. })
                ),
                "{:?}",
                r.map(|_| ())
            );
        }
    }
}
