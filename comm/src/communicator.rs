//! The `Communicator` trait: what every backend provides, and the handle of a non-blocking
//! operation.

use std::time::Duration;

use crate::{Buffer, CommError, DType, ReduceOp, Result};

/// Which backend a communicator belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Local,
    Mpi,
    Nccl,
}

/// A backend's in-flight operation. Implemented by backends; callers use [`Request`].
pub trait PendingOp: Send {
    /// `Ok(true)` once complete (the result is then kept for `wait`). Drives progress.
    fn test(&mut self) -> Result<bool>;
    /// Blocks until completion or the communicator's timeout; returns the operation's
    /// output buffer (see the `i_*` methods for what it holds).
    fn wait(self: Box<Self>) -> Result<Buffer>;
}

/// Handle of a non-blocking operation. Dropping it without `wait` leaks the operation's
/// buffers on purpose (the transfer may still be running); always `wait` it.
#[must_use = "a non-blocking operation must be waited for"]
pub struct Request {
    inner: Box<dyn PendingOp>,
}

impl Request {
    pub fn new(op: impl PendingOp + 'static) -> Request {
        Request {
            inner: Box::new(op),
        }
    }

    /// A request that is already complete with `out`.
    pub fn ready(out: Buffer) -> Request {
        Request::new(Ready(Some(out)))
    }

    /// Non-blocking completion check; also drives progress of the operation.
    pub fn test(&mut self) -> Result<bool> {
        self.inner.test()
    }

    /// Blocks until complete (or the communicator's timeout) and returns the output buffer.
    pub fn wait(self) -> Result<Buffer> {
        self.inner.wait()
    }
}

struct Ready(Option<Buffer>);

impl PendingOp for Ready {
    fn test(&mut self) -> Result<bool> {
        Ok(true)
    }
    fn wait(mut self: Box<Self>) -> Result<Buffer> {
        Ok(self.0.take().unwrap_or_default())
    }
}

/// A communicator: a group of ranks that run collectives together. Object safe, so the
/// mesh can hold `Box<dyn Communicator>` per axis.
///
/// Contract shared by every backend:
/// - collectives are issued in the same order by every rank of the communicator (non-blocking
///   ones included); their handles may be waited in any order;
/// - every blocking call and every `wait` gives up after the communicator's timeout with
///   [`CommError::Timeout`] naming the operation, the communicator and the ranks that did not
///   arrive; after a timeout or a mismatch the communicator is poisoned and the job should be
///   brought down with [`Communicator::abort`];
/// - counts are in elements; `counts[j]` is what goes to (or comes from) rank `j`; zero
///   counts are allowed everywhere.
pub trait Communicator: Send + Sync {
    /// This process's rank in the communicator, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Human-readable name (`world`, `world/split0:1`), used in errors.
    fn name(&self) -> &str;
    fn backend(&self) -> BackendKind;
    /// Current timeout of blocking calls and `wait`.
    fn timeout(&self) -> Duration;
    /// Changes the timeout of this communicator handle (not of its parent or children).
    fn set_timeout(&mut self, timeout: Duration);
    /// Whether mismatched collectives (different operations, types or sizes across ranks) are
    /// detected and reported as [`CommError::Mismatch`].
    fn detects_mismatch(&self) -> bool;

    // ----- non-blocking operations: every backend implements these -----

    /// Barrier; `wait` returns an empty buffer.
    fn i_barrier(&self) -> Result<Request>;
    /// Broadcast from `root`; every rank passes a buffer of the same type and length;
    /// `wait` returns root's data.
    fn i_broadcast(&self, buf: Buffer, root: usize) -> Result<Request>;
    /// All-reduce; `wait` returns the reduced buffer.
    fn i_all_reduce(&self, buf: Buffer, op: ReduceOp) -> Result<Request>;
    /// All-gather with per-rank sizes: `recv_counts[j]` elements come from rank `j` (and
    /// `send.len() == recv_counts[rank]`); `wait` returns the concatenation in rank order.
    fn i_all_gather_v(&self, send: Buffer, recv_counts: Vec<usize>) -> Result<Request>;
    /// Reduce-scatter: `send` holds `sum(recv_counts)` elements; rank `j` receives the
    /// reduction of block `j` (`recv_counts[j]` elements).
    fn i_reduce_scatter(
        &self,
        send: Buffer,
        recv_counts: Vec<usize>,
        op: ReduceOp,
    ) -> Result<Request>;
    /// All-to-all with per-peer counts: `send` is the concatenation of blocks for ranks
    /// `0..size` (`send_counts[j]` elements for rank `j`); `wait` returns the concatenation of
    /// the blocks received from ranks `0..size` (`recv_counts[j]` from rank `j`).
    fn i_all_to_all_v(
        &self,
        send: Buffer,
        send_counts: Vec<usize>,
        recv_counts: Vec<usize>,
    ) -> Result<Request>;
    /// Sends `buf` to `dest` with `tag`; `wait` hands the buffer back.
    fn i_send(&self, buf: Buffer, dest: usize, tag: u32) -> Result<Request>;
    /// Receives into `buf` (its type and length are what is expected) from `src` with `tag`;
    /// `wait` returns the filled buffer.
    fn i_recv(&self, buf: Buffer, src: usize, tag: u32) -> Result<Request>;

    /// Splits into sub-communicators (collective): ranks with the same `color` form one,
    /// ordered by `(key, rank)`. Used for the mesh axes.
    fn split(&self, color: u32, key: i32) -> Result<Box<dyn Communicator>>;

    /// Brings the whole job down (MPI_Abort on MPI; the process on local). Prints `reason`.
    fn abort(&self, reason: &str, code: i32) -> !;

    /// The collectives on device memory of a backend that has them (NCCL), for data that
    /// already lives on the communicator's GPU; `None` (the default): host buffers only.
    fn device_collectives(&self) -> Option<&dyn DeviceCollectives> {
        None
    }

    // ----- blocking operations: defaults built on the non-blocking ones -----

    fn barrier(&self) -> Result<()> {
        self.i_barrier()?.wait().map(|_| ())
    }

    /// Broadcast in place from `root`.
    fn broadcast(&self, buf: &mut Buffer, root: usize) -> Result<()> {
        let b = std::mem::take(buf);
        *buf = self.i_broadcast(b, root)?.wait()?;
        Ok(())
    }

    /// All-reduce in place.
    fn all_reduce(&self, buf: &mut Buffer, op: ReduceOp) -> Result<()> {
        let b = std::mem::take(buf);
        *buf = self.i_all_reduce(b, op)?.wait()?;
        Ok(())
    }

    fn all_gather_v(&self, send: &Buffer, recv_counts: &[usize]) -> Result<Buffer> {
        self.i_all_gather_v(send.clone(), recv_counts.to_vec())?
            .wait()
    }

    fn reduce_scatter(&self, send: &Buffer, recv_counts: &[usize], op: ReduceOp) -> Result<Buffer> {
        self.i_reduce_scatter(send.clone(), recv_counts.to_vec(), op)?
            .wait()
    }

    /// All-to-all(v) into a caller-provided buffer of `sum(recv_counts)` elements.
    fn all_to_all_v(
        &self,
        send: &Buffer,
        send_counts: &[usize],
        recv: &mut Buffer,
        recv_counts: &[usize],
    ) -> Result<()> {
        let out = self
            .i_all_to_all_v(send.clone(), send_counts.to_vec(), recv_counts.to_vec())?
            .wait()?;
        *recv = out;
        Ok(())
    }

    fn send(&self, buf: &Buffer, dest: usize, tag: u32) -> Result<()> {
        self.i_send(buf.clone(), dest, tag)?.wait().map(|_| ())
    }

    fn recv(&self, buf: &mut Buffer, src: usize, tag: u32) -> Result<()> {
        let b = std::mem::take(buf);
        *buf = self.i_recv(b, src, tag)?.wait()?;
        Ok(())
    }

    /// Sends `send` to `dest` while receiving `recv` from `src` (the ring step); deadlock
    /// free whatever the order of the ranks.
    fn send_recv(
        &self,
        send: &Buffer,
        dest: usize,
        recv: &mut Buffer,
        src: usize,
        tag: u32,
    ) -> Result<()> {
        let r = self.i_recv(std::mem::take(recv), src, tag)?;
        let s = self.i_send(send.clone(), dest, tag)?;
        *recv = r.wait()?;
        s.wait()?;
        Ok(())
    }
}

/// Collectives on raw device memory (the `nccl` backend): what `parallel` uses when a tensor
/// already lives on the communicator's GPU, so it never makes a round trip through the host.
/// Same ordering and timeout contract as [`Communicator`]; each call returns when the
/// operation has completed on the device.
///
/// # Safety (every method)
/// Each pointer is device memory of GPU [`DeviceCollectives::device_ordinal`] holding the
/// given number of elements of `dtype`; the memory a call reads is completely written (its
/// producer's stream synchronised) and no other work touches these buffers until the call
/// returns.
pub trait DeviceCollectives: Send + Sync {
    /// The CUDA device ordinal the communicator runs on.
    fn device_ordinal(&self) -> usize;

    /// All-reduce of `count` elements from `send` into `recv` (the same address: in place).
    ///
    /// # Safety
    /// See the trait.
    unsafe fn all_reduce(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()>;

    /// All-to-all with per-peer counts (elements) from `send` into `recv` (the layouts of
    /// [`Communicator::i_all_to_all_v`]).
    ///
    /// # Safety
    /// See the trait.
    unsafe fn all_to_all_v(
        &self,
        send: u64,
        send_counts: &[usize],
        recv: u64,
        recv_counts: &[usize],
        dtype: DType,
    ) -> Result<()>;

    /// Posts the send of `bytes` bytes at `ptr` to `dest`, deferred like
    /// [`Communicator::i_send`] (issued with the point-to-point operations posted before the
    /// first test or wait of one of them) and matched in order with the peer's receives.
    ///
    /// # Safety
    /// See the trait; the memory stays valid and unchanged until the request completes.
    unsafe fn i_send(&self, ptr: u64, bytes: usize, dest: usize) -> Result<Request>;

    /// Posts the receive of `bytes` bytes from `src` into `ptr` (see [`Self::i_send`]).
    ///
    /// # Safety
    /// See the trait; the memory stays valid and untouched until the request completes.
    unsafe fn i_recv(&self, ptr: u64, bytes: usize, src: usize) -> Result<Request>;

    /// Sends `send_count` elements to `dest` while receiving `recv_count` from `src`.
    ///
    /// # Safety
    /// See the trait.
    #[allow(clippy::too_many_arguments)]
    unsafe fn send_recv(
        &self,
        send: u64,
        send_count: usize,
        dest: usize,
        recv: u64,
        recv_count: usize,
        src: usize,
        dtype: DType,
    ) -> Result<()>;
}

/// Checks shared by the backends: argument validation with errors naming the operation.
pub(crate) struct Check<'a> {
    pub op: &'a str,
    pub comm: &'a str,
    pub rank: usize,
    pub size: usize,
}

impl Check<'_> {
    pub fn invalid(&self, detail: impl Into<String>) -> CommError {
        CommError::InvalidArgument {
            op: self.op.to_string(),
            comm: self.comm.to_string(),
            rank: self.rank,
            detail: detail.into(),
        }
    }

    pub fn peer(&self, what: &str, r: usize) -> Result<()> {
        if r >= self.size {
            return Err(self.invalid(format!(
                "{what} {r} is out of range (the communicator has {} ranks)",
                self.size
            )));
        }
        Ok(())
    }

    pub fn counts(&self, what: &str, counts: &[usize]) -> Result<usize> {
        if counts.len() != self.size {
            return Err(self.invalid(format!(
                "{what} has {} entries; it needs one per rank ({})",
                counts.len(),
                self.size
            )));
        }
        Ok(counts.iter().sum())
    }

    pub fn len(&self, what: &str, got: usize, want: usize) -> Result<()> {
        if got != want {
            return Err(self.invalid(format!("{what} has {got} elements; the counts say {want}")));
        }
        Ok(())
    }

    pub fn reduce(&self, dtype: DType, op: ReduceOp) -> Result<()> {
        if op == ReduceOp::Mean && !dtype.is_float() {
            return Err(self.invalid(format!(
                "mean of {dtype} elements is not defined; use sum and divide, or a float type"
            )));
        }
        Ok(())
    }
}
