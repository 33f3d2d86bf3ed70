//! `nccl` backend: NCCL through cudarc, loaded dynamically at run time (the build needs no
//! CUDA). One NCCL communicator per group of ranks; its unique id travels over an MPI
//! communicator of the same group (the *twin*), which also carries `split` and the census
//! after a timeout.
//!
//! - Host buffers (the [`Communicator`] methods) are staged: copied to the device, reduced
//!   or exchanged by NCCL on this communicator's stream, copied back when waited. The `i_*`
//!   methods return as soon as the work is enqueued; `test` asks the stream's event.
//! - Device buffers ([`DeviceCollectives`], what `parallel` uses for tensors already on the
//!   GPU) go to NCCL directly, with no copy.
//! - Point-to-point: NCCL's send and recv block until matched and have no tags, so `i_send`
//!   and `i_recv` are deferred and issued together, as one NCCL group, when the first of
//!   them is tested or waited (or the next collective is issued). A ring step that posts its
//!   receive and its send before waiting is then deadlock free, as on MPI.
//! - Timeout: every wait polls the operation's event and `ncclCommGetAsyncError` until the
//!   communicator's timeout; on expiry (or an asynchronous NCCL error) the communicator is
//!   aborted (`ncclCommAbort`), the ranks still alive hold a census on the MPI twin to name
//!   the ranks that never reached the operation, and the error says which operation, which
//!   communicator and which ranks. The communicator is unusable afterwards.
//!
//! Absent CUDA or NCCL gives [`CommError::Unavailable`], never a panic. NCCL needs one GPU
//! per rank: two ranks of one communicator on one GPU are refused before NCCL is asked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::result::{self as nccl, NcclError};
use cudarc::nccl::sys;

use crate::census::census;
use crate::{
    BackendKind, Buffer, Check, CommError, Communicator, DType, DeviceCollectives, PendingOp,
    ReduceOp, Request, Result,
};

/// How long the census after a timeout waits for the other ranks (at most).
const CENSUS_WAIT: Duration = Duration::from_secs(10);

fn unavailable(reason: impl Into<String>) -> CommError {
    CommError::Unavailable {
        backend: "nccl",
        reason: reason.into(),
        hint: "install the CUDA driver and NCCL (libnccl2) on a GPU machine, or use \
               `comm.backend.type: mpi`"
            .into(),
    }
}

fn nccl_type(dtype: DType) -> sys::ncclDataType_t {
    use sys::ncclDataType_t as T;
    match dtype {
        DType::F32 => T::ncclFloat32,
        DType::F64 => T::ncclFloat64,
        DType::BF16 => T::ncclBfloat16,
        DType::F16 => T::ncclFloat16,
        DType::I32 => T::ncclInt32,
        DType::I64 => T::ncclInt64,
        DType::U8 => T::ncclUint8,
    }
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        ReduceOp::Mean => sys::ncclRedOp_t::ncclAvg,
    }
}

/// The raw NCCL communicator; destroyed on drop unless it was aborted.
struct RawComm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; every call goes through `Shared::comm`'s mutex.
unsafe impl Send for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        // SAFETY: the handle came from ncclCommInitRank and is destroyed once, here.
        let _ = unsafe { nccl::comm_destroy(self.0) };
    }
}

/// What the communicator and its requests share.
struct Shared {
    /// `None` once aborted.
    comm: Mutex<Option<RawComm>>,
    stream: Arc<CudaStream>,
    name: String,
    rank: usize,
    size: usize,
    timeout_ms: AtomicU64,
    /// The MPI twin: splits and the census after a timeout (its timeout is the census wait).
    twin: Mutex<Box<dyn Communicator>>,
    /// Operations issued so far (a grouped exchange counts once).
    issued: AtomicU64,
    /// The first failure; every later operation reports it.
    poisoned: Mutex<Option<String>>,
    /// Deferred point-to-point operations, issued as one group when first needed.
    p2p: Mutex<Vec<DeferredP2p>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One enqueued NCCL operation: its event, the device buffers it uses, and its number.
struct InFlight {
    seq: u64,
    event: CudaEvent,
    /// Send-side staging buffers, kept alive until the operation completes.
    _keep: Vec<CudaSlice<u8>>,
    /// Receive-side staging buffers, copied back by `wait`.
    recv: Vec<Option<CudaSlice<u8>>>,
}

/// Where a deferred operation finds its group once issued.
type Slot = Arc<OnceLock<Arc<InFlight>>>;

struct DeferredP2p {
    kind: P2pKind,
    peer: usize,
    slot: Slot,
}

enum P2pKind {
    /// Host bytes, staged at issue.
    Send(Vec<u8>),
    /// Bytes received into a staging buffer, copied back by `wait`.
    Recv(usize),
    /// Bytes at a caller's device address (`DeviceCollectives::i_send` / `i_recv`).
    DeviceSend {
        ptr: u64,
        bytes: usize,
    },
    DeviceRecv {
        ptr: u64,
        bytes: usize,
    },
}

impl Shared {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    fn backend_err(&self, call: &'static str, op: &str, detail: String) -> CommError {
        CommError::Backend {
            backend: "NCCL",
            call,
            op: op.to_string(),
            comm: self.name.clone(),
            rank: self.rank,
            location: format!("{}:{}", file!(), line!()),
            detail,
        }
    }

    fn nccl_err(&self, call: &'static str, op: &str, e: NcclError) -> CommError {
        self.backend_err(call, op, format!("{:?}", e.0))
    }

    fn cuda_err(&self, call: &'static str, op: &str, e: impl std::fmt::Debug) -> CommError {
        self.backend_err(call, op, format!("{e:?}"))
    }

    /// Marks the communicator unusable (first failure wins) and returns `e`.
    fn poison(&self, e: CommError) -> CommError {
        lock(&self.poisoned).get_or_insert_with(|| e.to_string());
        e
    }

    fn check_usable(&self) -> Result<()> {
        match lock(&self.poisoned).as_ref() {
            Some(first) => Err(CommError::Poisoned {
                comm: self.name.clone(),
                rank: self.rank,
                first: first.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Aborts the NCCL communicator (its kernels stop waiting for peers).
    fn abort_nccl(&self) {
        if let Some(raw) = lock(&self.comm).take() {
            // SAFETY: a live handle; aborting instead of destroying is what NCCL asks for a
            // communicator whose operations may never complete.
            let _ = unsafe { nccl::comm_abort(raw.0) };
            std::mem::forget(raw);
        }
    }

    /// NCCL's asynchronous error of the communicator, if any (a peer's failure, a network
    /// error): then the communicator is aborted.
    fn check_async(&self, op: &str) -> Result<()> {
        let result = {
            let guard = lock(&self.comm);
            let Some(raw) = guard.as_ref() else {
                return Ok(());
            };
            let mut result = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live handle and a valid out pointer.
            let call = unsafe { sys::ncclCommGetAsyncError(raw.0, &mut result) };
            if call != sys::ncclResult_t::ncclSuccess {
                result = call;
            }
            result
        };
        match result {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
            e => {
                self.abort_nccl();
                Err(self.poison(self.backend_err(
                    "ncclCommGetAsyncError",
                    op,
                    format!(
                        "{e:?}: NCCL reported an asynchronous error (a peer failed or the \
                         network broke); the communicator was aborted"
                    ),
                )))
            }
        }
    }

    /// Enqueues one NCCL operation (or group) on the stream: `launch` gets the raw
    /// communicator and stream. Returns the operation's number and its completion event.
    fn enqueue(
        &self,
        op: &str,
        launch: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> std::result::Result<(), CommError>,
    ) -> Result<(u64, CudaEvent)> {
        self.check_usable()?;
        let guard = lock(&self.comm);
        let Some(raw) = guard.as_ref() else {
            return Err(self.poison(self.backend_err(
                "ncclCommAbort",
                op,
                "the communicator was aborted".into(),
            )));
        };
        let seq = self.issued.fetch_add(1, Ordering::SeqCst);
        launch(raw.0, self.stream.cu_stream() as sys::cudaStream_t).map_err(|e| self.poison(e))?;
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| self.poison(self.cuda_err("cuEventRecord", op, e)))?;
        Ok((seq, event))
    }

    /// Whether operation `seq` is complete; NCCL's asynchronous errors are checked first.
    fn poll(&self, op: &str, event: &CudaEvent) -> Result<bool> {
        self.check_async(op)?;
        event
            .try_is_complete()
            .map_err(|e| self.poison(self.cuda_err("cuEventQuery", op, e)))
    }

    /// Waits for operation `seq` until the timeout; on expiry aborts the communicator and
    /// names the ranks that never reached the operation.
    fn await_done(&self, op: &str, seq: u64, event: &CudaEvent) -> Result<()> {
        let timeout = self.timeout();
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(2);
        loop {
            if self.poll(op, event)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.expire(op, seq, timeout));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    fn expire(&self, op: &str, seq: u64, timeout: Duration) -> CommError {
        self.abort_nccl();
        let twin = lock(&self.twin);
        let found = census(&**twin, self.issued.load(Ordering::SeqCst), seq);
        self.poison(CommError::Timeout {
            op: op.to_string(),
            comm: self.name.clone(),
            rank: self.rank,
            size: self.size,
            timeout,
            missing: found.missing,
            detail: format!(
                " (operation #{seq} of this NCCL communicator; it was aborted with \
                 ncclCommAbort; {})",
                found.how
            ),
        })
    }

    /// Issues the deferred point-to-point operations as one NCCL group.
    fn flush_p2p(&self) -> Result<()> {
        let pending = std::mem::take(&mut *lock(&self.p2p));
        if pending.is_empty() {
            return Ok(());
        }
        let op = "send/recv";
        let mut keep = Vec::new();
        let mut recv = Vec::new();
        let mut launches = Vec::new();
        for p in &pending {
            match &p.kind {
                P2pKind::Send(bytes) => {
                    let d = self
                        .stream
                        .clone_htod(bytes.as_slice())
                        .map_err(|e| self.poison(self.cuda_err("cuMemcpyHtoD", op, e)))?;
                    launches.push((true, ptr(&d, &self.stream), bytes.len(), p.peer));
                    keep.push(d);
                    recv.push(None);
                }
                P2pKind::Recv(len) => {
                    let d = self
                        .stream
                        .alloc_zeros::<u8>(*len)
                        .map_err(|e| self.poison(self.cuda_err("cuMemAlloc", op, e)))?;
                    launches.push((false, ptr(&d, &self.stream), *len, p.peer));
                    recv.push(Some(d));
                }
                &P2pKind::DeviceSend { ptr, bytes } => {
                    launches.push((true, ptr, bytes, p.peer));
                    recv.push(None);
                }
                &P2pKind::DeviceRecv { ptr, bytes } => {
                    launches.push((false, ptr, bytes, p.peer));
                    recv.push(None);
                }
            }
        }
        let (seq, event) = self.enqueue(op, |comm, stream| {
            self.grouped(op, || {
                for &(is_send, p, bytes, peer) in &launches {
                    // SAFETY: `bytes` bytes on this communicator's device: staging buffers
                    // kept alive by the in-flight record, or a caller's memory that stays
                    // valid until its request completes (`DeviceCollectives` contract).
                    let r = unsafe {
                        if is_send {
                            nccl::send(
                                p as *const _,
                                bytes,
                                sys::ncclDataType_t::ncclUint8,
                                peer as i32,
                                comm,
                                stream,
                            )
                        } else {
                            nccl::recv(
                                p as *mut _,
                                bytes,
                                sys::ncclDataType_t::ncclUint8,
                                peer as i32,
                                comm,
                                stream,
                            )
                        }
                    };
                    r.map_err(|e| {
                        self.nccl_err(if is_send { "ncclSend" } else { "ncclRecv" }, op, e)
                    })?;
                }
                Ok(())
            })
        })?;
        let flight = Arc::new(InFlight {
            seq,
            event,
            _keep: keep,
            recv,
        });
        for p in pending {
            let _ = p.slot.set(flight.clone());
        }
        Ok(())
    }

    /// Runs `body` between ncclGroupStart and ncclGroupEnd.
    fn grouped(&self, op: &str, body: impl FnOnce() -> Result<()>) -> Result<()> {
        nccl::group_start().map_err(|e| self.nccl_err("ncclGroupStart", op, e))?;
        let r = body();
        let end = nccl::group_end().map_err(|e| self.nccl_err("ncclGroupEnd", op, e));
        r.and(end.map(|_| ()))
    }

    /// Grouped send/recv of raw device pointers: `sends[j]` (pointer, elements) to rank j,
    /// `recvs[j]` from rank j; zero counts skipped.
    fn exchange_raw(
        &self,
        op: &str,
        dtype: DType,
        sends: &[(u64, usize)],
        recvs: &[(u64, usize)],
    ) -> Result<(u64, CudaEvent)> {
        self.flush_p2p()?;
        self.enqueue(op, |comm, stream| {
            // SAFETY: the caller's device buffers of the given counts (DeviceCollectives).
            unsafe { self.launch_exchange(op, dtype, sends, recvs, comm, stream) }
        })
    }

    /// Grouped ncclSend / ncclRecv: `sends[j]` (address, elements) to rank j, `recvs[j]` from
    /// rank j; zero counts skipped.
    ///
    /// # Safety
    /// Every address holds its count of `dtype` elements on this device and stays valid
    /// until the operation completes.
    unsafe fn launch_exchange(
        &self,
        op: &str,
        dtype: DType,
        sends: &[(u64, usize)],
        recvs: &[(u64, usize)],
        comm: sys::ncclComm_t,
        stream: sys::cudaStream_t,
    ) -> Result<()> {
        let t = nccl_type(dtype);
        self.grouped(op, || {
            for (j, &(p, n)) in sends.iter().enumerate().filter(|(_, s)| s.1 > 0) {
                // SAFETY: see the function's contract.
                unsafe { nccl::send(p as *const _, n, t, j as i32, comm, stream) }
                    .map_err(|e| self.nccl_err("ncclSend", op, e))?;
            }
            for (j, &(p, n)) in recvs.iter().enumerate().filter(|(_, r)| r.1 > 0) {
                // SAFETY: as above.
                unsafe { nccl::recv(p as *mut _, n, t, j as i32, comm, stream) }
                    .map_err(|e| self.nccl_err("ncclRecv", op, e))?;
            }
            Ok(())
        })
    }

    /// ncclAllReduce of `count` elements from `send` into `recv` (the same address: in place).
    ///
    /// # Safety
    /// Both addresses hold `count` elements of `dtype` on this device, valid until the
    /// operation completes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn launch_all_reduce(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
        op: ReduceOp,
        comm: sys::ncclComm_t,
        stream: sys::cudaStream_t,
    ) -> Result<()> {
        // SAFETY: see the function's contract.
        unsafe {
            nccl::all_reduce(
                send as *const _,
                recv as *mut _,
                count,
                nccl_type(dtype),
                nccl_op(op),
                comm,
                stream,
            )
        }
        .map(|_| ())
        .map_err(|e| self.nccl_err("ncclAllReduce", "all_reduce", e))
    }
}

/// The device address of a staging buffer (same stream: no cross-stream wait needed).
fn ptr(d: &CudaSlice<u8>, stream: &CudaStream) -> u64 {
    let (p, _sync) = d.device_ptr(stream);
    p
}

/// A staged host operation: in flight on the device, copied back into a host buffer by
/// `finish` when waited.
struct Staged {
    shared: Arc<Shared>,
    op: &'static str,
    flight: InFlight,
    dtype: DType,
    finish: Box<dyn FnOnce(Vec<Buffer>) -> Buffer + Send>,
}

/// A received staging buffer back in host memory (`None`: nothing was received).
fn copy_back(shared: &Shared, op: &str, dtype: DType, d: Option<&CudaSlice<u8>>) -> Result<Buffer> {
    let Some(d) = d else {
        return Ok(Buffer::zeros(dtype, 0));
    };
    let bytes: Vec<u8> = shared
        .stream
        .clone_dtoh(d)
        .map_err(|e| shared.poison(shared.cuda_err("cuMemcpyDtoH", op, e)))?;
    let mut b = Buffer::zeros(dtype, bytes.len() / dtype.size_bytes());
    b.as_bytes_mut().copy_from_slice(&bytes);
    Ok(b)
}

// SAFETY: the CUDA event and device buffers are plain handles of this process's context;
// they are only used by the thread that owns the request.
unsafe impl Send for Staged {}

impl PendingOp for Staged {
    fn test(&mut self) -> Result<bool> {
        self.shared.poll(self.op, &self.flight.event)
    }
    fn wait(self: Box<Self>) -> Result<Buffer> {
        let s = *self;
        s.shared.await_done(s.op, s.flight.seq, &s.flight.event)?;
        let parts = s
            .flight
            .recv
            .iter()
            .map(|d| copy_back(&s.shared, s.op, s.dtype, d.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        Ok((s.finish)(parts))
    }
}

/// A deferred send or receive: issued with the others of its group on first use.
struct P2pRequest {
    shared: Arc<Shared>,
    op: &'static str,
    dtype: DType,
    /// Its place in the group (the group's receive buffers are in this order).
    index: usize,
    slot: Slot,
    /// What a send hands back.
    sent: Option<Buffer>,
}

impl P2pRequest {
    fn flight(&self) -> Result<Arc<InFlight>> {
        if self.slot.get().is_none() {
            self.shared.flush_p2p()?;
        }
        self.slot.get().cloned().ok_or_else(|| {
            self.shared.backend_err(
                "ncclGroupEnd",
                self.op,
                "the deferred operation was not issued".into(),
            )
        })
    }
}

// SAFETY: as for `Staged`.
unsafe impl Send for P2pRequest {}

impl PendingOp for P2pRequest {
    fn test(&mut self) -> Result<bool> {
        let f = self.flight()?;
        self.shared.poll(self.op, &f.event)
    }
    fn wait(self: Box<Self>) -> Result<Buffer> {
        let f = self.flight()?;
        self.shared.await_done(self.op, f.seq, &f.event)?;
        if let Some(sent) = self.sent {
            return Ok(sent);
        }
        copy_back(
            &self.shared,
            self.op,
            self.dtype,
            f.recv[self.index].as_ref(),
        )
    }
}

/// One rank's NCCL communicator (with its MPI twin for ids, splits and the census).
pub struct NcclComm {
    shared: Arc<Shared>,
    device: usize,
}

impl NcclComm {
    /// Creates the NCCL communicator of `mpi`'s group on `device` (default: rank modulo
    /// the number of devices). Collective over `mpi`, which becomes the twin.
    pub fn new(mut mpi: Box<dyn Communicator>, device: Option<usize>) -> Result<NcclComm> {
        // Every rank checks, then all agree, so no rank is left waiting in the id broadcast.
        let local = Self::probe();
        let mut ok = Buffer::I32(vec![i32::from(local.is_err())]);
        mpi.all_reduce(&mut ok, ReduceOp::Max)?;
        local?;
        if ok.get_f64(0) != 0.0 {
            return Err(unavailable("CUDA or NCCL is missing on another rank"));
        }
        let count =
            CudaContext::device_count().map_err(|e| unavailable(format!("{e:?}")))? as usize;
        let device = device.unwrap_or(mpi.rank() % count.max(1));
        refuse_shared_gpus(&*mpi, device)?;
        let ctx =
            CudaContext::new(device).map_err(|e| unavailable(format!("device {device}: {e:?}")))?;
        // Its own stream: NCCL kernels never queue behind (or block) the compute stream.
        let stream = ctx
            .new_stream()
            .map_err(|e| unavailable(format!("creating a stream on device {device}: {e:?}")))?;
        let mut raw = Buffer::U8(vec![0; 128]);
        let mut id_err = Buffer::I32(vec![0]);
        if mpi.rank() == 0 {
            match nccl::get_uniqueid() {
                Ok(id) => raw = Buffer::U8(id.internal.iter().map(|&c| c as u8).collect()),
                Err(_) => id_err = Buffer::I32(vec![1]),
            }
        }
        mpi.broadcast(&mut id_err, 0)?;
        if id_err.get_f64(0) != 0.0 {
            return Err(unavailable("ncclGetUniqueId failed on rank 0"));
        }
        mpi.broadcast(&mut raw, 0)?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(raw.as_bytes()) {
            *d = *s as std::ffi::c_char;
        }
        let name = format!("nccl:{}", mpi.name());
        let (rank, size) = (mpi.rank(), mpi.size());
        let mut comm = std::mem::MaybeUninit::<sys::ncclComm_t>::uninit();
        // SAFETY: `comm` is a valid out pointer; rank and size come from the MPI group, and
        // every rank passes the id rank 0 created.
        unsafe { nccl::comm_init_rank(comm.as_mut_ptr(), size as i32, id, rank as i32) }.map_err(
            |e| CommError::Backend {
                backend: "NCCL",
                call: "ncclCommInitRank",
                op: "create".into(),
                comm: name.clone(),
                rank,
                location: format!("{}:{}", file!(), line!()),
                detail: format!("{:?}", e.0),
            },
        )?;
        // SAFETY: initialised by the successful call above.
        let comm = RawComm(unsafe { comm.assume_init() });
        let timeout = mpi.timeout();
        mpi.set_timeout(timeout.min(CENSUS_WAIT));
        Ok(NcclComm {
            shared: Arc::new(Shared {
                comm: Mutex::new(Some(comm)),
                stream,
                name,
                rank,
                size,
                timeout_ms: AtomicU64::new(timeout.as_millis() as u64),
                twin: Mutex::new(mpi),
                issued: AtomicU64::new(0),
                poisoned: Mutex::new(None),
                p2p: Mutex::new(Vec::new()),
            }),
            device,
        })
    }

    /// Whether the CUDA driver and NCCL libraries can be loaded (cudarc panics on first use
    /// otherwise, so this must come first).
    pub fn probe() -> Result<()> {
        crate::cuda::probe().map_err(|e| match e {
            CommError::Unavailable { reason, .. } => unavailable(reason),
            e => e,
        })?;
        // SAFETY: only tries to dlopen the NCCL library names (running a system library's
        // initialisers) and drops the handle; a panic is caught.
        let nccl = std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
        if !nccl {
            return Err(unavailable("the NCCL library (libnccl.so) was not found"));
        }
        Ok(())
    }

    pub fn device(&self) -> usize {
        self.device
    }

    fn check<'a>(&'a self, op: &'a str) -> Check<'a> {
        Check {
            op,
            comm: &self.shared.name,
            rank: self.shared.rank,
            size: self.shared.size,
        }
    }

    /// A staged operation: `sends` (host bytes) and `recv_elems` (per receive buffer) on
    /// the device; `launch` gets their device pointers.
    fn staged(
        &self,
        op: &'static str,
        dtype: DType,
        sends: &[&[u8]],
        recv_elems: &[usize],
        launch: impl FnOnce(&[u64], &[u64], sys::ncclComm_t, sys::cudaStream_t) -> Result<()>,
        finish: impl FnOnce(Vec<Buffer>) -> Buffer + Send + 'static,
    ) -> Result<Request> {
        let s = &self.shared;
        s.flush_p2p()?;
        s.check_usable()?;
        let mut keep = Vec::new();
        let mut send_ptrs = Vec::new();
        for bytes in sends {
            if bytes.is_empty() {
                send_ptrs.push(0);
                continue;
            }
            let d = s
                .stream
                .clone_htod(*bytes)
                .map_err(|e| s.poison(s.cuda_err("cuMemcpyHtoD", op, e)))?;
            send_ptrs.push(ptr(&d, &s.stream));
            keep.push(d);
        }
        let mut recv = Vec::new();
        let mut recv_ptrs = Vec::new();
        for &n in recv_elems {
            if n == 0 {
                recv_ptrs.push(0);
                recv.push(None);
                continue;
            }
            let d = s
                .stream
                .alloc_zeros::<u8>(n * dtype.size_bytes())
                .map_err(|e| s.poison(s.cuda_err("cuMemAlloc", op, e)))?;
            recv_ptrs.push(ptr(&d, &s.stream));
            recv.push(Some(d));
        }
        let (seq, event) = s.enqueue(op, |comm, stream| {
            launch(&send_ptrs, &recv_ptrs, comm, stream)
        })?;
        Ok(Request::new(Staged {
            shared: s.clone(),
            op,
            flight: InFlight {
                seq,
                event,
                _keep: keep,
                recv,
            },
            dtype,
            finish: Box::new(finish),
        }))
    }

    /// Staged grouped send/recv of host blocks: `send_counts[j]` elements of `send` go to
    /// rank j, `recv_counts[j]` come from j; `wait` returns them concatenated.
    fn staged_exchange(
        &self,
        op: &'static str,
        send: &Buffer,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Request> {
        let dtype = send.dtype();
        let width = dtype.size_bytes();
        let bytes = send.as_bytes();
        let mut off = 0;
        let blocks: Vec<&[u8]> = send_counts
            .iter()
            .map(|&c| {
                let b = &bytes[off..off + c * width];
                off += c * width;
                b
            })
            .collect();
        let (sc, rc) = (send_counts.to_vec(), recv_counts.to_vec());
        let shared = self.shared.clone();
        self.staged(
            op,
            dtype,
            &blocks,
            recv_counts,
            move |sp, rp, comm, stream| {
                let sends: Vec<(u64, usize)> = sp.iter().copied().zip(sc).collect();
                let recvs: Vec<(u64, usize)> = rp.iter().copied().zip(rc).collect();
                // SAFETY: staging buffers of these counts, alive until completion.
                unsafe { shared.launch_exchange(op, dtype, &sends, &recvs, comm, stream) }
            },
            move |parts| {
                let refs: Vec<_> = parts.iter().map(|p| (p, 0..p.len())).collect();
                Buffer::concat(dtype, &refs)
            },
        )
    }

    fn defer(
        &self,
        op: &'static str,
        kind: P2pKind,
        peer: usize,
        dtype: DType,
        sent: Option<Buffer>,
    ) -> Request {
        let slot = Slot::default();
        let mut p2p = lock(&self.shared.p2p);
        let index = p2p.len();
        p2p.push(DeferredP2p {
            kind,
            peer,
            slot: slot.clone(),
        });
        Request::new(P2pRequest {
            shared: self.shared.clone(),
            op,
            dtype,
            index,
            slot,
            sent,
        })
    }
}

/// Two ranks of one communicator on one GPU: NCCL refuses it with "Duplicate GPU detected";
/// say which ranks and what to change instead. Collective over `mpi`.
fn refuse_shared_gpus(mpi: &dyn Communicator, device: usize) -> Result<()> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut key = [0u8; 72];
    key[..8].copy_from_slice(&(device as u64).to_le_bytes());
    for (d, s) in key[8..].iter_mut().zip(host.bytes()) {
        *d = s;
    }
    let n = mpi.size();
    let all = mpi.all_gather_v(&Buffer::U8(key.to_vec()), &vec![key.len(); n])?;
    let all = all.as_bytes();
    let me = &all[mpi.rank() * key.len()..(mpi.rank() + 1) * key.len()];
    let sharing: Vec<usize> = (0..n)
        .filter(|&j| &all[j * key.len()..(j + 1) * key.len()] == me)
        .collect();
    if sharing.len() > 1 {
        return Err(unavailable(format!(
            "ranks {sharing:?} of `{}` are all on GPU {device} of host `{host}`; NCCL needs one \
             GPU per rank (use `device: cuda`, which gives each rank the GPU of its local rank, \
             and start at most one rank per GPU on each node)",
            mpi.name()
        )));
    }
    Ok(())
}

impl DeviceCollectives for NcclComm {
    fn device_ordinal(&self) -> usize {
        self.device
    }

    unsafe fn all_reduce(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let s = &self.shared;
        self.check("all_reduce").reduce(dtype, op)?;
        if count == 0 {
            return Ok(());
        }
        s.flush_p2p()?;
        let (seq, event) = s.enqueue("all_reduce", |comm, stream| {
            // SAFETY: the caller's device buffers of `count` elements (trait contract).
            unsafe { s.launch_all_reduce(send, recv, count, dtype, op, comm, stream) }
        })?;
        s.await_done("all_reduce", seq, &event)
    }

    unsafe fn all_to_all_v(
        &self,
        send: u64,
        send_counts: &[usize],
        recv: u64,
        recv_counts: &[usize],
        dtype: DType,
    ) -> Result<()> {
        let ck = self.check("all_to_all_v");
        ck.counts("send_counts", send_counts)?;
        ck.counts("recv_counts", recv_counts)?;
        let width = dtype.size_bytes() as u64;
        let blocks = |base: u64, counts: &[usize]| {
            let mut off = 0u64;
            counts
                .iter()
                .map(|&c| {
                    let b = (base + off * width, c);
                    off += c as u64;
                    b
                })
                .collect::<Vec<_>>()
        };
        let (seq, event) = self.shared.exchange_raw(
            "all_to_all_v",
            dtype,
            &blocks(send, send_counts),
            &blocks(recv, recv_counts),
        )?;
        self.shared.await_done("all_to_all_v", seq, &event)
    }

    unsafe fn i_send(&self, ptr: u64, bytes: usize, dest: usize) -> Result<Request> {
        self.check("send").peer("dest", dest)?;
        self.shared.check_usable()?;
        let kind = P2pKind::DeviceSend { ptr, bytes };
        Ok(self.defer("send", kind, dest, DType::U8, Some(Buffer::default())))
    }

    unsafe fn i_recv(&self, ptr: u64, bytes: usize, src: usize) -> Result<Request> {
        self.check("recv").peer("src", src)?;
        self.shared.check_usable()?;
        let kind = P2pKind::DeviceRecv { ptr, bytes };
        Ok(self.defer("recv", kind, src, DType::U8, None))
    }

    unsafe fn send_recv(
        &self,
        send: u64,
        send_count: usize,
        dest: usize,
        recv: u64,
        recv_count: usize,
        src: usize,
        dtype: DType,
    ) -> Result<()> {
        let ck = self.check("send_recv");
        ck.peer("dest", dest)?;
        ck.peer("src", src)?;
        let n = self.shared.size;
        let mut sends = vec![(0, 0); n];
        sends[dest] = (send, send_count);
        let mut recvs = vec![(0, 0); n];
        recvs[src] = (recv, recv_count);
        let (seq, event) = self
            .shared
            .exchange_raw("send_recv", dtype, &sends, &recvs)?;
        self.shared.await_done("send_recv", seq, &event)
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.shared.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn name(&self) -> &str {
        &self.shared.name
    }
    fn backend(&self) -> BackendKind {
        BackendKind::Nccl
    }
    fn timeout(&self) -> Duration {
        self.shared.timeout()
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.shared
            .timeout_ms
            .store(timeout.as_millis() as u64, Ordering::Relaxed);
        lock(&self.shared.twin).set_timeout(timeout.min(CENSUS_WAIT));
    }
    fn detects_mismatch(&self) -> bool {
        false
    }
    fn device_collectives(&self) -> Option<&dyn DeviceCollectives> {
        Some(self)
    }

    fn i_barrier(&self) -> Result<Request> {
        let one = Buffer::F32(vec![0.0]);
        let r = self.i_all_reduce(one, ReduceOp::Sum)?;
        Ok(Request::new(Barrier(Some(r))))
    }

    fn i_broadcast(&self, buf: Buffer, root: usize) -> Result<Request> {
        self.check("broadcast").peer("root", root)?;
        let dtype = buf.dtype();
        let n = buf.len();
        let shared = self.shared.clone();
        let is_root = self.rank() == root;
        let kept = is_root.then(|| buf.clone());
        let bytes = if is_root {
            buf.as_bytes().to_vec()
        } else {
            Vec::new()
        };
        self.staged(
            "broadcast",
            dtype,
            &[if is_root { &bytes[..] } else { &[] }],
            &[if is_root { 0 } else { n }],
            move |sp, rp, comm, stream| {
                if n == 0 {
                    return Ok(());
                }
                let (src, dst) = if is_root { (sp[0], sp[0]) } else { (0, rp[0]) };
                // SAFETY: staging buffers of `n` elements (root sends its own in place).
                unsafe {
                    nccl::broadcast(
                        src as *const _,
                        dst as *mut _,
                        n,
                        nccl_type(dtype),
                        root as i32,
                        comm,
                        stream,
                    )
                }
                .map(|_| ())
                .map_err(|e| shared.nccl_err("ncclBroadcast", "broadcast", e))
            },
            move |mut parts| kept.unwrap_or_else(|| parts.swap_remove(0)),
        )
    }

    fn i_all_reduce(&self, buf: Buffer, op: ReduceOp) -> Result<Request> {
        self.check("all_reduce").reduce(buf.dtype(), op)?;
        let dtype = buf.dtype();
        let n = buf.len();
        let shared = self.shared.clone();
        self.staged(
            "all_reduce",
            dtype,
            &[buf.as_bytes()],
            &[n],
            move |sp, rp, comm, stream| {
                if n == 0 {
                    return Ok(());
                }
                // SAFETY: staging buffers of `n` elements each.
                unsafe { shared.launch_all_reduce(sp[0], rp[0], n, dtype, op, comm, stream) }
            },
            |mut parts| parts.swap_remove(0),
        )
    }

    fn i_all_gather_v(&self, send: Buffer, recv_counts: Vec<usize>) -> Result<Request> {
        let ck = self.check("all_gather_v");
        ck.counts("recv_counts", &recv_counts)?;
        ck.len("send", send.len(), recv_counts[self.rank()])?;
        // Every rank sends its block to every rank (itself included): grouped send/recv.
        let n = self.size();
        let mut rep = Buffer::zeros(send.dtype(), send.len() * n);
        for k in 0..n {
            rep.copy_from(k * send.len(), &send, 0..send.len());
        }
        self.staged_exchange("all_gather_v", &rep, &vec![send.len(); n], &recv_counts)
    }

    fn i_reduce_scatter(
        &self,
        send: Buffer,
        recv_counts: Vec<usize>,
        op: ReduceOp,
    ) -> Result<Request> {
        let ck = self.check("reduce_scatter");
        let total = ck.counts("recv_counts", &recv_counts)?;
        ck.len("send", send.len(), total)?;
        ck.reduce(send.dtype(), op)?;
        // ncclReduceScatter needs equal blocks: an all-reduce, then this rank's block.
        let off: usize = recv_counts[..self.rank()].iter().sum();
        let mine = recv_counts[self.rank()];
        let all = self.i_all_reduce(send, op)?;
        Ok(Request::new(Then {
            inner: Some(all),
            then: Some(Box::new(move |b: Buffer| b.slice(off..off + mine))),
        }))
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
        self.staged_exchange("all_to_all_v", &send, &send_counts, &recv_counts)
    }

    fn i_send(&self, buf: Buffer, dest: usize, _tag: u32) -> Result<Request> {
        self.check("send").peer("dest", dest)?;
        self.shared.check_usable()?;
        let dtype = buf.dtype();
        Ok(self.defer(
            "send",
            P2pKind::Send(buf.as_bytes().to_vec()),
            dest,
            dtype,
            Some(buf),
        ))
    }

    fn i_recv(&self, buf: Buffer, src: usize, _tag: u32) -> Result<Request> {
        self.check("recv").peer("src", src)?;
        self.shared.check_usable()?;
        Ok(self.defer(
            "recv",
            P2pKind::Recv(buf.size_bytes()),
            src,
            buf.dtype(),
            None,
        ))
    }

    fn split(&self, color: u32, key: i32) -> Result<Box<dyn Communicator>> {
        self.shared.flush_p2p()?;
        let mut sub = lock(&self.shared.twin).split(color, key)?;
        sub.set_timeout(self.timeout());
        Ok(Box::new(NcclComm::new(sub, Some(self.device))?))
    }

    fn abort(&self, reason: &str, code: i32) -> ! {
        self.shared.abort_nccl();
        let twin = lock(&self.shared.twin);
        twin.abort(reason, code)
    }
}

/// A barrier: an all-reduce whose value is dropped.
struct Barrier(Option<Request>);

impl PendingOp for Barrier {
    fn test(&mut self) -> Result<bool> {
        self.0.as_mut().map_or(Ok(true), Request::test)
    }
    fn wait(mut self: Box<Self>) -> Result<Buffer> {
        if let Some(r) = self.0.take() {
            r.wait()?;
        }
        Ok(Buffer::default())
    }
}

/// A request whose output is transformed when waited.
struct Then {
    inner: Option<Request>,
    then: Option<Box<dyn FnOnce(Buffer) -> Buffer + Send>>,
}

impl PendingOp for Then {
    fn test(&mut self) -> Result<bool> {
        self.inner.as_mut().map_or(Ok(true), Request::test)
    }
    fn wait(mut self: Box<Self>) -> Result<Buffer> {
        let out = self
            .inner
            .take()
            .map_or(Ok(Buffer::default()), Request::wait)?;
        Ok(match self.then.take() {
            Some(f) => f(out),
            None => out,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_reports_instead_of_panicking() {
        // On a machine without CUDA this is the clean `Unavailable` error; with a GPU, Ok.
        match super::NcclComm::probe() {
            Ok(()) => println!("CUDA and NCCL present"),
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("nccl backend is not available"), "{text}");
                println!("SKIPPED nccl: {text}");
            }
        }
    }
}
