//! `mpi` backend: raw MPI (through rsmpi's `ffi`) on OpenMPI, initialised with
//! `MPI_THREAD_MULTIPLE`.
//!
//! - Every operation is non-blocking underneath (`MPI_I*`) and owns its buffers until it
//!   completes, so a timeout can return while MPI still holds them (they are parked, never
//!   freed under MPI's feet). Blocking calls are the same operation plus a wait.
//! - Progress: blocking calls, and every `wait`, poll MPI on the caller's thread (as a direct
//!   MPI call would). [`MpiProgress::Thread`] adds a background thread that drives MPI's
//!   progress engine only while non-blocking operations are posted and not yet waited for,
//!   so they advance while the caller computes; it is parked otherwise (waking every
//!   50 ms to answer diagnostic queries). `Poll` progresses only inside `test`/`wait`.
//!   `comm-bench a2a` and `comm-bench overlap-mpi` measure both.
//! - Timeouts: on expiry the waiting rank asks every member, over a private control
//!   communicator, how many operations it entered on this communicator and what it is doing;
//!   the error names the ranks that did not arrive (or did not answer).
//! - All-to-all(v) is point-to-point messages with each peer plus a copy of the own block
//!   (cheaper per call than `MPI_Ialltoallv`'s schedule; `comm-bench a2a` compares it with a
//!   direct `MPI_Alltoallv`).
//! - Counts beyond the 32-bit limit (`max_count`) are chunked: all-reduce and broadcast into
//!   several operations, all-to-all(v) and all-gather(v) into several point-to-point messages.
//! - `verify_collectives` exchanges a signature (operation, type, sizes, the full count
//!   matrix for all-to-all) before each collective, so mismatches are reported on every rank.
//!
//! Each foreign call goes through [`call`], which names the MPI function, the operation, the
//! communicator and the source location in its error.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::panic::Location;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mpi::ffi as sys;

use crate::config::{CommBackendConfig, CommConfig, MpiProgress};
use crate::{
    BackendKind, Buffer, Check, CommError, Communicator, DType, PendingOp, ReduceOp, Request,
    Result,
};

/// Options of the MPI world.
#[derive(Debug, Clone)]
pub struct MpiOptions {
    pub progress: MpiProgress,
    pub verify_collectives: bool,
    pub timeout: Duration,
    /// Largest element count passed to one MPI call (the C API takes `int` counts and
    /// displacements); lower it to exercise the chunked paths.
    pub max_count: usize,
}

impl Default for MpiOptions {
    fn default() -> Self {
        MpiOptions {
            progress: MpiProgress::default(),
            verify_collectives: false,
            timeout: CommConfig::default().timeout(),
            max_count: i32::MAX as usize,
        }
    }
}

impl MpiOptions {
    /// The options a `comm:` config node asks for (defaults where it names another backend).
    pub fn from_config(c: &CommConfig) -> MpiOptions {
        let mut o = MpiOptions {
            timeout: c.timeout(),
            ..MpiOptions::default()
        };
        if let CommBackendConfig::Mpi {
            progress,
            verify_collectives,
        } = &c.backend
        {
            o.progress = *progress;
            o.verify_collectives = *verify_collectives;
        }
        o
    }
}

#[derive(Clone, Copy)]
struct Raw(sys::MPI_Comm);
// SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE; handles may be used from any thread.
unsafe impl Send for Raw {}
// SAFETY: as above: MPI_THREAD_MULTIPLE makes the communicator handle safe to share between
// threads.
unsafe impl Sync for Raw {}

/// Calls one MPI function; a non-success return becomes an error naming the function, the
/// operation, the communicator and the caller's source location.
#[track_caller]
fn call(
    name: &'static str,
    op: &str,
    comm: &str,
    rank: usize,
    f: impl FnOnce() -> c_int,
) -> Result<()> {
    let rc = f();
    if rc == sys::MPI_SUCCESS as c_int {
        return Ok(());
    }
    let mut buf = vec![0u8; 512];
    let mut len: c_int = 0;
    // SAFETY: the buffer is larger than MPI_MAX_ERROR_STRING (256).
    unsafe { sys::MPI_Error_string(rc, buf.as_mut_ptr() as *mut _, &mut len) };
    buf.truncate(len.max(0) as usize);
    Err(CommError::Backend {
        backend: "MPI",
        call: name,
        op: op.to_string(),
        comm: comm.to_string(),
        rank,
        location: Location::caller().to_string(),
        detail: format!("error {rc}: {}", String::from_utf8_lossy(&buf)),
    })
}

fn datatype(dt: DType) -> sys::MPI_Datatype {
    // SAFETY: reading MPI's predefined datatype handles after initialisation.
    unsafe {
        match dt {
            DType::F32 => sys::RSMPI_FLOAT,
            DType::F64 => sys::RSMPI_DOUBLE,
            DType::I32 => sys::RSMPI_INT32_T,
            DType::I64 => sys::RSMPI_INT64_T,
            DType::U8 => sys::RSMPI_UINT8_T,
            // Moved as 16-bit words; reduced through f32 (see `reduce_view`).
            DType::BF16 | DType::F16 => sys::RSMPI_UINT16_T,
        }
    }
}

fn mpi_op(op: ReduceOp) -> sys::MPI_Op {
    // SAFETY: predefined operation handles.
    unsafe {
        match op {
            ReduceOp::Max => sys::RSMPI_MAX,
            ReduceOp::Sum | ReduceOp::Mean => sys::RSMPI_SUM,
        }
    }
}

/// Empty buffers get a real, aligned address: an empty `Vec<u8>`'s dangling pointer is
/// `0x1`, which OpenMPI reads as `MPI_IN_PLACE`.
static EMPTY: [u64; 2] = [0; 2];

fn sptr(b: &Buffer) -> *const u8 {
    if b.is_empty() {
        EMPTY.as_ptr() as *const u8
    } else {
        b.as_bytes().as_ptr()
    }
}

fn rptr(b: &mut Buffer) -> *mut u8 {
    if b.is_empty() {
        // MPI writes nothing into a zero-element receive buffer.
        EMPTY.as_ptr() as *mut u8
    } else {
        b.as_bytes_mut().as_mut_ptr()
    }
}

const TAG_QUERY: c_int = 1;
const TAG_REPLY: c_int = 2;

/// Process-wide MPI state shared by every communicator of this world.
struct Env {
    control: Raw,
    world_rank: usize,
    verify: bool,
    max_count: usize,
    /// Non-blocking operations posted and not yet waited for: while there are some, the
    /// progress thread drives MPI; otherwise it only answers diagnostic queries.
    background: AtomicUsize,
    progress_thread: OnceLock<std::thread::Thread>,
    stop: AtomicBool,
    service_lock: Mutex<()>,
    /// communicator name -> operations entered on it
    registry: Mutex<HashMap<String, Arc<AtomicU64>>>,
    activity: Mutex<Activity>,
    abandoned: Mutex<Vec<Parked>>,
}

/// What a rank is doing, as its diagnostic answer says.
#[derive(Default)]
struct Activity {
    state: State,
    op: String,
    comm: String,
}

#[derive(Default, Clone, Copy)]
enum State {
    #[default]
    Starting,
    Waiting,
    Failed,
    Outside,
}

impl Activity {
    fn describe(&self) -> String {
        let (op, comm) = (&self.op, &self.comm);
        match self.state {
            State::Starting => "starting".into(),
            State::Waiting => format!("waiting in {op} on `{comm}`"),
            State::Failed => format!("failed {op} on `{comm}`"),
            State::Outside => format!("outside Switchyard (last: {op} on `{comm}`)"),
        }
    }
}

/// Buffers and requests of an operation that was given up on (timeout, or a dropped
/// `Request`): kept alive until MPI is done with them.
#[allow(dead_code)]
struct Parked {
    reqs: Vec<sys::MPI_Request>,
    keep: Vec<Buffer>,
    ints: Vec<Vec<c_int>>,
    out: Option<Buffer>,
}
// SAFETY: only the raw MPI_Request handles are not Send; under MPI_THREAD_MULTIPLE they may be used
// from any thread, and a Parked is only moved into `Env::abandoned` (a Mutex) and never touched
// again.
unsafe impl Send for Parked {}

impl Env {
    fn background_started(&self) {
        if self.background.fetch_add(1, Ordering::SeqCst) == 0
            && let Some(t) = self.progress_thread.get()
        {
            t.unpark();
        }
    }

    /// Records what this rank is doing, for other ranks' diagnostics. Called twice per
    /// `wait`, so it reuses its strings instead of formatting new ones.
    fn set_activity(&self, state: State, op: &str, comm: &str) {
        let mut a = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        a.state = state;
        a.op.clear();
        a.op.push_str(op);
        a.comm.clear();
        a.comm.push_str(comm);
    }

    /// Answers diagnostic queries from other ranks; also drives MPI's progress engine.
    fn service(&self) {
        let Ok(_g) = self.service_lock.try_lock() else {
            return;
        };
        loop {
            let mut flag: c_int = 0;
            // SAFETY: MPI_Status is plain data; MPI fills it.
            let mut st: sys::MPI_Status = unsafe { std::mem::zeroed() };
            let r = call(
                "MPI_Iprobe",
                "service",
                "control",
                self.world_rank,
                // SAFETY: `self.control` is the live duplicate of world made in `init` (never
                // freed), MPI is initialised with MPI_THREAD_MULTIPLE, and `flag`/`st` are valid
                // locals MPI writes into.
                || unsafe {
                    sys::MPI_Iprobe(
                        sys::RSMPI_ANY_SOURCE,
                        TAG_QUERY,
                        self.control.0,
                        &mut flag,
                        &mut st,
                    )
                },
            );
            if r.is_err() || flag == 0 {
                return;
            }
            let mut n: c_int = 0;
            // SAFETY: `st` was filled by the successful MPI_Iprobe above (flag != 0); `n` is a
            // valid local.
            unsafe { sys::MPI_Get_count(&st, sys::RSMPI_UINT8_T, &mut n) };
            let mut q = vec![0u8; n.max(0) as usize];
            let src = st.MPI_SOURCE;
            let _ = call(
                "MPI_Recv",
                "service",
                "control",
                self.world_rank,
                // SAFETY: `q` holds `n` bytes and MPI writes at most `n` (a longer message is a
                // truncation error, not an overflow); `self.control` is live.
                || unsafe {
                    sys::MPI_Recv(
                        q.as_mut_ptr() as *mut c_void,
                        n,
                        sys::RSMPI_UINT8_T,
                        src,
                        TAG_QUERY,
                        self.control.0,
                        sys::RSMPI_STATUS_IGNORE,
                    )
                },
            );
            let q = String::from_utf8_lossy(&q).to_string();
            let name = q.split_once(' ').map_or("", |x| x.1);
            let entered = self
                .registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
                .map_or(0, |c| c.load(Ordering::SeqCst));
            let act = self
                .activity
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .describe();
            let reply = format!("{q}\n{entered}\n{act}").into_bytes();
            let _ = call(
                "MPI_Send",
                "service",
                "control",
                self.world_rank,
                // SAFETY: `reply` is alive and holds `reply.len()` bytes for the whole blocking
                // send; `self.control` is live.
                || unsafe {
                    sys::MPI_Send(
                        reply.as_ptr() as *const c_void,
                        reply.len() as c_int,
                        sys::RSMPI_UINT8_T,
                        src,
                        TAG_REPLY,
                        self.control.0,
                    )
                },
            );
        }
    }
}

/// Owns the MPI environment: finalises MPI (after stopping the progress thread) on drop.
/// Keep it alive longer than every communicator.
pub struct MpiEnv {
    env: Arc<Env>,
    thread: Option<JoinHandle<()>>,
    _universe: mpi::environment::Universe,
}

impl Drop for MpiEnv {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A panic (e.g. a timed-out collective inside a model seam that has no error
            // channel) is unwinding: MPI_Finalize would wait for the other ranks forever.
            eprintln!(
                "switchyard-comm: rank {} panicked; aborting the MPI job",
                self.env.world_rank
            );
            // SAFETY: MPI is initialised; MPI_Abort does not return.
            unsafe {
                sys::MPI_Abort(sys::RSMPI_COMM_WORLD, 1);
            }
        }
        self.env.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl MpiEnv {
    /// rsmpi's own world communicator (for side-by-side benchmarks against plain rsmpi).
    pub fn rsmpi_world(&self) -> mpi::topology::SimpleCommunicator {
        self._universe.world()
    }

    /// Initialises MPI with full thread support and returns the environment and `world`.
    pub fn init(opts: MpiOptions) -> Result<(MpiEnv, MpiComm)> {
        let unavailable = |reason: String| CommError::Unavailable {
            backend: "mpi",
            reason,
            hint: "launch with `mpirun` from an MPI built with thread support (OpenMPI from \
                   Debian is)"
                .into(),
        };
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Multiple)
            .ok_or_else(|| unavailable("MPI was already initialised".into()))?;
        if threading != mpi::Threading::Multiple {
            return Err(unavailable(format!(
                "MPI provides {threading:?} threading, Switchyard needs Multiple"
            )));
        }
        // SAFETY: plain MPI calls on valid handles after initialisation.
        let world = unsafe { sys::RSMPI_COMM_WORLD };
        let mut rank: c_int = 0;
        // SAFETY: reads rsmpi's immutable `const` C global holding MPI_COMM_NULL; MPI_Comm_dup
        // overwrites it.
        let mut control: sys::MPI_Comm = unsafe { sys::RSMPI_COMM_NULL };
        // SAFETY: as above: `world` is MPI_COMM_WORLD of the initialised MPI; `rank` is a valid
        // local.
        call("MPI_Comm_rank", "init", "world", 0, || unsafe {
            sys::MPI_Comm_rank(world, &mut rank)
        })?;
        // SAFETY: as above: `world` is a valid handle after initialisation; `control` is a valid
        // local that receives the new communicator.
        call("MPI_Comm_dup", "init", "world", rank as usize, || unsafe {
            sys::MPI_Comm_dup(world, &mut control)
        })?;
        let env = Arc::new(Env {
            control: Raw(control),
            world_rank: rank as usize,
            verify: opts.verify_collectives,
            max_count: opts.max_count.clamp(1, i32::MAX as usize),
            background: AtomicUsize::new(0),
            progress_thread: OnceLock::new(),
            stop: AtomicBool::new(false),
            service_lock: Mutex::new(()),
            registry: Mutex::new(HashMap::new()),
            activity: Mutex::new(Activity::default()),
            abandoned: Mutex::new(Vec::new()),
        });
        let thread = match opts.progress {
            MpiProgress::Poll => None,
            MpiProgress::Thread => {
                let e = env.clone();
                let t = std::thread::Builder::new()
                    .name("mpi-progress".into())
                    .spawn(move || {
                        while !e.stop.load(Ordering::SeqCst) {
                            e.service();
                            if e.background.load(Ordering::SeqCst) > 0 {
                                std::thread::sleep(Duration::from_micros(20));
                            } else {
                                // Woken by the next non-blocking operation; the timeout
                                // keeps diagnostic queries answered.
                                std::thread::park_timeout(Duration::from_millis(50));
                            }
                        }
                    })
                    .expect("spawn the MPI progress thread");
                let _ = env.progress_thread.set(t.thread().clone());
                Some(t)
            }
        };
        let comm = MpiComm::wrap(env.clone(), world, "world".into(), opts.timeout, false)?;
        Ok((
            MpiEnv {
                env,
                thread,
                _universe: universe,
            },
            comm,
        ))
    }
}

/// One rank's handle on an MPI communicator.
pub struct MpiComm {
    raw: Raw,
    /// A duplicate for the internal point-to-point of chunked collectives.
    p2p: Raw,
    name: String,
    rank: usize,
    size: usize,
    world_ranks: Arc<Vec<usize>>,
    timeout: Duration,
    entered: Arc<AtomicU64>,
    env: Arc<Env>,
    poisoned: Arc<Mutex<Option<String>>>,
    owned: bool,
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: we created these handles; MPI_Comm_free is collective-free in effect
            // (it only marks them for deallocation once pending operations complete).
            unsafe {
                sys::MPI_Comm_free(&mut self.raw.0);
            }
        }
        // SAFETY: as above: `p2p` is the duplicate made in `wrap`, always ours, and freed only
        // here.
        unsafe {
            sys::MPI_Comm_free(&mut self.p2p.0);
        }
    }
}

impl MpiComm {
    fn wrap(
        env: Arc<Env>,
        raw: sys::MPI_Comm,
        name: String,
        timeout: Duration,
        owned: bool,
    ) -> Result<MpiComm> {
        let (mut rank, mut size): (c_int, c_int) = (0, 0);
        // SAFETY: reads rsmpi's immutable `const` C global holding MPI_COMM_NULL; MPI_Comm_dup
        // overwrites it.
        let mut p2p: sys::MPI_Comm = unsafe { sys::RSMPI_COMM_NULL };
        let c = |f: &'static str, g: &mut dyn FnMut() -> c_int| {
            call(f, "create", &name, env.world_rank, g)
        };
        // SAFETY: `raw` is a valid communicator of the initialised MPI (world or fresh from
        // MPI_Comm_split); RSMPI_ERRORS_RETURN is a predefined handle.
        c("MPI_Comm_set_errhandler", &mut || unsafe {
            sys::MPI_Comm_set_errhandler(raw, sys::RSMPI_ERRORS_RETURN)
        })?;
        // SAFETY: as above: `raw` is valid; `rank` is a valid local out-parameter.
        c("MPI_Comm_rank", &mut || unsafe {
            sys::MPI_Comm_rank(raw, &mut rank)
        })?;
        // SAFETY: as above: `raw` is valid; `size` is a valid local out-parameter.
        c("MPI_Comm_size", &mut || unsafe {
            sys::MPI_Comm_size(raw, &mut size)
        })?;
        // SAFETY: as above: `raw` is valid; `p2p` receives the duplicate, which Drop frees.
        c("MPI_Comm_dup", &mut || unsafe {
            sys::MPI_Comm_dup(raw, &mut p2p)
        })?;
        let world_ranks = {
            // SAFETY: MPI_Group is a plain handle (a pointer in OpenMPI) for which all-zero is a
            // valid value; MPI_Comm_group overwrites both before use.
            let (mut g1, mut g2): (sys::MPI_Group, sys::MPI_Group) =
                unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
            let ranks: Vec<c_int> = (0..size).collect();
            let mut out = vec![0 as c_int; size as usize];
            // SAFETY: `raw` is valid; `g1` is a valid local out-parameter.
            c("MPI_Comm_group", &mut || unsafe {
                sys::MPI_Comm_group(raw, &mut g1)
            })?;
            // SAFETY: MPI_COMM_WORLD is predefined and MPI is initialised; `g2` is a valid local
            // out-parameter.
            c("MPI_Comm_group", &mut || unsafe {
                sys::MPI_Comm_group(sys::RSMPI_COMM_WORLD, &mut g2)
            })?;
            // SAFETY: `ranks` and `out` both hold `size` entries, as many as MPI reads and writes;
            // `g1`/`g2` were created just above.
            c("MPI_Group_translate_ranks", &mut || unsafe {
                sys::MPI_Group_translate_ranks(g1, size, ranks.as_ptr(), g2, out.as_mut_ptr())
            })?;
            // SAFETY: `g1` and `g2` are the groups created above, freed once here and not used
            // afterwards.
            unsafe {
                sys::MPI_Group_free(&mut g1);
                sys::MPI_Group_free(&mut g2);
            }
            out.into_iter().map(|r| r as usize).collect()
        };
        let entered = Arc::new(AtomicU64::new(0));
        env.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), entered.clone());
        Ok(MpiComm {
            raw: Raw(raw),
            p2p: Raw(p2p),
            name,
            rank: rank as usize,
            size: size as usize,
            world_ranks: Arc::new(world_ranks),
            timeout,
            entered,
            env,
            poisoned: Arc::new(Mutex::new(None)),
            owned,
        })
    }

    fn check<'a>(&'a self, op: &'a str) -> Check<'a> {
        Check {
            op,
            comm: &self.name,
            rank: self.rank,
            size: self.size,
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
                comm: self.name.clone(),
                rank: self.rank,
                first,
            });
        }
        Ok(())
    }

    /// Starts building the pending state of operation `op` (a collective when `coll`; a
    /// non-blocking call when `bg`).
    fn begin(&self, op: &str, coll: bool, peer: Option<usize>, bg: bool) -> Result<MpiPending> {
        self.check_poison()?;
        let seq = if coll {
            self.entered.fetch_add(1, Ordering::SeqCst)
        } else {
            u64::MAX
        };
        if bg {
            self.env.background_started();
        }
        Ok(MpiPending {
            op: if coll {
                format!("{op} #{seq}")
            } else {
                op.to_string()
            },
            comm: self.name.clone(),
            rank: self.rank,
            seq,
            peer,
            timeout: self.timeout,
            world_ranks: self.world_ranks.clone(),
            env: self.env.clone(),
            poisoned: self.poisoned.clone(),
            reqs: Vec::new(),
            keep: Vec::new(),
            ints: Vec::new(),
            out: None,
            post: None,
            done: false,
            bg,
        })
    }

    #[track_caller]
    fn ffi(&self, p: &MpiPending, name: &'static str, f: impl FnOnce() -> c_int) -> Result<()> {
        call(name, &p.op, &self.name, self.rank, f)
    }

    /// Posts a point-to-point transfer of `n` elements starting at `base` as chunks of at
    /// most `max_count` elements (MPI counts are 32-bit), one request per chunk.
    fn post_chunked(
        &self,
        p: &mut MpiPending,
        name: &'static str,
        base: *const u8,
        dt: DType,
        n: usize,
        post: impl Fn(*const c_void, c_int, &mut sys::MPI_Request) -> c_int,
    ) -> Result<()> {
        let chunks = n.div_ceil(self.env.max_count).max(1);
        for k in 0..chunks {
            let start = k * self.env.max_count;
            let count = self.env.max_count.min(n - start);
            // SAFETY: reads rsmpi's immutable `const` C global holding MPI_REQUEST_NULL; MPI
            // overwrites it.
            let mut req = unsafe { sys::RSMPI_REQUEST_NULL };
            // SAFETY: `start + count <= n` elements of `dt` lie inside the buffer at `base`.
            let ptr = unsafe { base.add(start * dt.size_bytes()) } as *const c_void;
            self.ffi(p, name, || post(ptr, count as c_int, &mut req))?;
            p.reqs.push(req);
        }
        Ok(())
    }

    /// Exchanges signatures so that every rank sees the same verdict on a mismatch.
    #[allow(clippy::too_many_arguments)]
    fn verify(
        &self,
        op: &str,
        code: i64,
        dtype: Option<DType>,
        param: i64,
        len: usize,
        c1: &[usize],
        c2: &[usize],
    ) -> Result<()> {
        if !self.env.verify {
            return Ok(());
        }
        let n = self.size;
        let w = 4 + 2 * n;
        let mut sig = vec![
            code,
            dtype.map_or(-1, |d| d.code() as i64),
            param,
            len as i64,
        ];
        sig.extend((0..n).map(|i| c1.get(i).map_or(-1, |&c| c as i64)));
        sig.extend((0..n).map(|i| c2.get(i).map_or(-1, |&c| c as i64)));
        let mut p = self.begin(&format!("{op} (signature check)"), true, None, false)?;
        let mut out = Buffer::zeros(DType::I64, w * n);
        let send = Buffer::I64(sig);
        // SAFETY: reads rsmpi's immutable `const` C global holding MPI_REQUEST_NULL; MPI overwrites
        // it.
        let mut req = unsafe { sys::RSMPI_REQUEST_NULL };
        // SAFETY: `send` holds `w` i64s and `out` `w * n`, as the counts say; both move into `p`
        // (heap data unmoved) and live until the request completes or is parked.
        self.ffi(&p, "MPI_Iallgather", || unsafe {
            sys::MPI_Iallgather(
                sptr(&send) as *const c_void,
                w as c_int,
                sys::RSMPI_INT64_T,
                rptr(&mut out) as *mut c_void,
                w as c_int,
                sys::RSMPI_INT64_T,
                self.raw.0,
                &mut req,
            )
        })?;
        p.reqs.push(req);
        p.keep.push(send);
        p.out = Some(out);
        let all = Box::new(p).wait()?.into_vec::<i64>().unwrap();
        let s = |q: usize| &all[q * w..(q + 1) * w];
        let names = [
            "barrier",
            "broadcast",
            "all_reduce",
            "all_gather_v",
            "reduce_scatter",
            "all_to_all_v",
        ];
        let nm = |c: i64| names.get(c as usize).copied().unwrap_or("?");
        let mut problem = None;
        for q in 1..n {
            let (a, b) = (s(0), s(q));
            if a[0] != b[0] || a[1] != b[1] || a[2] != b[2] {
                problem = Some(format!(
                    "rank 0 called {} (type code {}, root/op {}) while rank {q} called {} (type code {}, root/op {})",
                    nm(a[0]),
                    a[1],
                    a[2],
                    nm(b[0]),
                    b[1],
                    b[2]
                ));
            } else if (a[0] == 1 || a[0] == 2) && a[3] != b[3] {
                problem = Some(format!(
                    "rank 0 passed {} elements while rank {q} passed {}",
                    a[3], b[3]
                ));
            } else if (a[0] == 3 || a[0] == 4) && a[4..4 + n] != b[4..4 + n] {
                problem = Some(format!(
                    "rank 0 passed counts {:?} while rank {q} passed {:?}",
                    &a[4..4 + n],
                    &b[4..4 + n]
                ));
            }
            if problem.is_some() {
                break;
            }
        }
        if problem.is_none() && s(0)[0] == 5 {
            'outer: for a in 0..n {
                for b in 0..n {
                    let sends = s(a)[4 + b];
                    let expects = s(b)[4 + n + a];
                    if sends != expects {
                        problem = Some(format!(
                            "rank {b} expects {expects} elements from rank {a}, which sends {sends}"
                        ));
                        break 'outer;
                    }
                }
            }
        }
        if let Some(detail) = problem {
            let e = CommError::Mismatch {
                op: op.to_string(),
                comm: self.name.clone(),
                rank: self.rank,
                detail,
            };
            self.poisoned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| e.to_string());
            return Err(e);
        }
        Ok(())
    }

    /// Point-to-point exchange in chunks of at most `max_count` elements, on the private
    /// duplicate communicator. The tag is the collective's sequence number (mod 2^15, the
    /// smallest tag bound MPI allows), so that a message of a mismatched collective cannot
    /// be taken by a later one; the chunks of one message match in order (MPI does not
    /// overtake messages of one sender, tag and communicator).
    fn p2p_exchange(
        &self,
        p: &mut MpiPending,
        dt: DType,
        send: *const u8,
        sends: &[(usize, usize, usize)],
        recv: *mut u8,
        recvs: &[(usize, usize, usize)],
    ) -> Result<()> {
        let es = dt.size_bytes();
        let m = self.env.max_count;
        let tag = (p.seq % 32768) as c_int;
        for &(peer, off, cnt) in recvs {
            for start in (0..cnt).step_by(m) {
                let c = m.min(cnt - start);
                // SAFETY: reads rsmpi's immutable `const` C global holding MPI_REQUEST_NULL; MPI
                // overwrites it.
                let mut req = unsafe { sys::RSMPI_REQUEST_NULL };
                // SAFETY: `recv` points at the receive buffer the caller moves into `p.out`; each
                // (off, cnt) comes from the checked counts, so `off + start + c` elements lie
                // inside it.
                self.ffi(p, "MPI_Irecv", || unsafe {
                    sys::MPI_Irecv(
                        recv.add((off + start) * es) as *mut c_void,
                        c as c_int,
                        datatype(dt),
                        peer as c_int,
                        tag,
                        self.p2p.0,
                        &mut req,
                    )
                })?;
                p.reqs.push(req);
            }
        }
        for &(peer, off, cnt) in sends {
            for start in (0..cnt).step_by(m) {
                let c = m.min(cnt - start);
                // SAFETY: reads rsmpi's immutable `const` C global holding MPI_REQUEST_NULL; MPI
                // overwrites it.
                let mut req = unsafe { sys::RSMPI_REQUEST_NULL };
                // SAFETY: as above for the send buffer, which the caller keeps alive (`p.keep`, or
                // the borrow of the blocking all_to_all_v).
                self.ffi(p, "MPI_Isend", || unsafe {
                    sys::MPI_Isend(
                        send.add((off + start) * es) as *const c_void,
                        c as c_int,
                        datatype(dt),
                        peer as c_int,
                        tag,
                        self.p2p.0,
                        &mut req,
                    )
                })?;
                p.reqs.push(req);
            }
        }
        Ok(())
    }

    /// All-to-all(v) from `send_ptr` (kept alive by the caller or by `p.keep`) into `out`:
    /// a memory copy of our own block, then point-to-point messages with every peer (chunked
    /// beyond the `int` range). Against a direct `MPI_Alltoallv` this measured faster than
    /// `MPI_Ialltoallv` (whose per-call schedule costs microseconds), and copying before
    /// posting faster than after at 64 MiB.
    fn start_a2a(
        &self,
        p: &mut MpiPending,
        dt: DType,
        send_ptr: *const u8,
        sc: &[usize],
        mut out: Buffer,
        rc: &[usize],
    ) -> Result<()> {
        let (n, me) = (self.size, self.rank);
        let off = |c: &[usize]| {
            c.iter()
                .scan(0usize, |a, &x| {
                    let o = *a;
                    *a += x;
                    Some(o)
                })
                .collect::<Vec<_>>()
        };
        let (sd, rd) = (off(sc), off(rc));
        let recv_ptr = rptr(&mut out);
        let peers = |c: &[usize], d: &[usize]| -> Vec<_> {
            (0..n)
                .filter(|&j| j != me && c[j] > 0)
                .map(|j| (j, d[j], c[j]))
                .collect()
        };
        let es = dt.size_bytes();
        // SAFETY: the counts were checked against both buffers' lengths; distinct buffers.
        unsafe {
            std::ptr::copy_nonoverlapping(
                send_ptr.add(sd[me] * es),
                recv_ptr.add(rd[me] * es),
                sc[me] * es,
            )
        };
        self.p2p_exchange(p, dt, send_ptr, &peers(sc, &sd), recv_ptr, &peers(rc, &rd))?;
        p.out = Some(out);
        Ok(())
    }

    /// Start of a reduction: bf16/f16 are reduced as f32 and converted back afterwards.
    fn reduce_view(buf: Buffer) -> (Buffer, Option<DType>) {
        match buf.dtype() {
            DType::BF16 | DType::F16 => {
                let dt = buf.dtype();
                (
                    Buffer::from_fn(DType::F32, buf.len(), |i| buf.get_f64(i)),
                    Some(dt),
                )
            }
            _ => (buf, None),
        }
    }

    fn reduce_post(
        orig: Option<DType>,
        mean_over: Option<usize>,
    ) -> Box<dyn FnOnce(Buffer) -> Buffer + Send> {
        Box::new(move |mut b: Buffer| {
            if let Some(n) = mean_over {
                b.scale_inv(n);
            }
            match orig {
                Some(dt) => Buffer::from_fn(dt, b.len(), |i| b.get_f64(i)),
                None => b,
            }
        })
    }
}

/// The operations; `bg` marks a non-blocking call (an `i_*` method), whose request the
/// progress thread drives until the caller waits for it.
impl MpiComm {
    fn barrier_op(&self, bg: bool) -> Result<Request> {
        if self.env.verify {
            // The signature exchange is itself a barrier (blocking, in this debug mode).
            self.verify("barrier", 0, None, 0, 0, &[], &[])?;
            return Ok(Request::ready(Buffer::default()));
        }
        let mut p = self.begin("barrier", true, None, bg)?;
        // SAFETY: reads rsmpi's immutable `const` C global holding MPI_REQUEST_NULL; MPI overwrites
        // it.
        let mut req = unsafe { sys::RSMPI_REQUEST_NULL };
        // SAFETY: `self.raw` is a live communicator (freed only on drop of `self`); `req` is a
        // valid local out-parameter.
        self.ffi(&p, "MPI_Ibarrier", || unsafe {
            sys::MPI_Ibarrier(self.raw.0, &mut req)
        })?;
        p.reqs.push(req);
        p.out = Some(Buffer::default());
        Ok(Request::new(p))
    }

    fn broadcast_op(&self, bg: bool, mut buf: Buffer, root: usize) -> Result<Request> {
        self.check("broadcast").peer("root", root)?;
        self.verify(
            "broadcast",
            1,
            Some(buf.dtype()),
            root as i64,
            buf.len(),
            &[],
            &[],
        )?;
        let mut p = self.begin("broadcast", true, None, bg)?;
        let (dt, n, es) = (buf.dtype(), buf.len(), buf.dtype().size_bytes());
        let ptr = rptr(&mut buf);
        for start in (0..n).step_by(self.env.max_count) {
            let c = self.env.max_count.min(n - start);
            // SAFETY: reads rsmpi's immutable `const` C global holding MPI_REQUEST_NULL; MPI
            // overwrites it.
            let mut req = unsafe { sys::RSMPI_REQUEST_NULL };
            // SAFETY: `ptr` is `buf`'s data of `n` elements and `start + c <= n`; `buf` moves into
            // `p.out` (heap data unmoved) and lives until the requests complete or are parked.
            self.ffi(&p, "MPI_Ibcast", || unsafe {
                sys::MPI_Ibcast(
                    ptr.add(start * es) as *mut c_void,
                    c as c_int,
                    datatype(dt),
                    root as c_int,
                    self.raw.0,
                    &mut req,
                )
            })?;
            p.reqs.push(req);
        }
        p.out = Some(buf);
        Ok(Request::new(p))
    }

    fn all_reduce_op(&self, bg: bool, buf: Buffer, op: ReduceOp) -> Result<Request> {
        self.check("all_reduce").reduce(buf.dtype(), op)?;
        self.verify(
            "all_reduce",
            2,
            Some(buf.dtype()),
            op as i64,
            buf.len(),
            &[],
            &[],
        )?;
        let mut p = self.begin("all_reduce", true, None, bg)?;
        let (send, orig) = MpiComm::reduce_view(buf);
        let (dt, n, es) = (send.dtype(), send.len(), send.dtype().size_bytes());
        let mut out = Buffer::zeros(dt, n);
        let (sp, rp) = (sptr(&send), rptr(&mut out));
        for start in (0..n).step_by(self.env.max_count) {
            let c = self.env.max_count.min(n - start);
            // SAFETY: reads rsmpi's immutable `const` C global holding MPI_REQUEST_NULL; MPI
            // overwrites it.
            let mut req = unsafe { sys::RSMPI_REQUEST_NULL };
            // SAFETY: `send` and `out` are distinct buffers of `n` elements of `dt`, and each
            // chunk ends by `start + c <= n`; both stay in `p` until completion or parking.
            self.ffi(&p, "MPI_Iallreduce", || unsafe {
                sys::MPI_Iallreduce(
                    sp.add(start * es) as *const c_void,
                    rp.add(start * es) as *mut c_void,
                    c as c_int,
                    datatype(dt),
                    mpi_op(op),
                    self.raw.0,
                    &mut req,
                )
            })?;
            p.reqs.push(req);
        }
        p.keep.push(send);
        p.out = Some(out);
        p.post = Some(MpiComm::reduce_post(
            orig,
            (op == ReduceOp::Mean).then_some(self.size),
        ));
        Ok(Request::new(p))
    }

    fn all_gather_v_op(&self, bg: bool, send: Buffer, recv_counts: Vec<usize>) -> Result<Request> {
        let ck = self.check("all_gather_v");
        let total = ck.counts("recv_counts", &recv_counts)?;
        ck.len("send", send.len(), recv_counts[self.rank])?;
        self.verify(
            "all_gather_v",
            3,
            Some(send.dtype()),
            0,
            send.len(),
            &recv_counts,
            &[],
        )?;
        let mut p = self.begin("all_gather_v", true, None, bg)?;
        let dt = send.dtype();
        let mut out = Buffer::zeros(dt, total);
        let displs: Vec<usize> = recv_counts
            .iter()
            .scan(0usize, |a, &x| {
                let o = *a;
                *a += x;
                Some(o)
            })
            .collect();
        if total > self.env.max_count {
            let s: Vec<_> = (0..self.size)
                .filter(|&j| j != self.rank && !send.is_empty())
                .map(|j| (j, 0, send.len()))
                .collect();
            let r: Vec<_> = (0..self.size)
                .filter(|&j| j != self.rank && recv_counts[j] > 0)
                .map(|j| (j, displs[j], recv_counts[j]))
                .collect();
            out.copy_from(displs[self.rank], &send, 0..send.len());
            let rp = rptr(&mut out);
            self.p2p_exchange(&mut p, dt, sptr(&send), &s, rp, &r)?;
        } else {
            let ints: Vec<Vec<c_int>> = vec![
                recv_counts.iter().map(|&x| x as c_int).collect(),
                displs.iter().map(|&x| x as c_int).collect(),
            ];
            // SAFETY: reads rsmpi's immutable `const` C global holding MPI_REQUEST_NULL; MPI
            // overwrites it.
            let mut req = unsafe { sys::RSMPI_REQUEST_NULL };
            let rp = rptr(&mut out);
            // SAFETY: `send` holds recv_counts[rank] elements (checked), `out` their sum, which
            // is at most max_count, so the int counts and displacements are exact; send, out and
            // ints stay in `p` until the request completes or is parked.
            self.ffi(&p, "MPI_Iallgatherv", || unsafe {
                sys::MPI_Iallgatherv(
                    sptr(&send) as *const c_void,
                    send.len() as c_int,
                    datatype(dt),
                    rp as *mut c_void,
                    ints[0].as_ptr(),
                    ints[1].as_ptr(),
                    datatype(dt),
                    self.raw.0,
                    &mut req,
                )
            })?;
            p.reqs.push(req);
            p.ints = ints;
        }
        p.keep.push(send);
        p.out = Some(out);
        Ok(Request::new(p))
    }

    fn reduce_scatter_op(
        &self,
        bg: bool,
        send: Buffer,
        recv_counts: Vec<usize>,
        op: ReduceOp,
    ) -> Result<Request> {
        let ck = self.check("reduce_scatter");
        ck.reduce(send.dtype(), op)?;
        let total = ck.counts("recv_counts", &recv_counts)?;
        ck.len("send", send.len(), total)?;
        self.verify(
            "reduce_scatter",
            4,
            Some(send.dtype()),
            op as i64,
            send.len(),
            &recv_counts,
            &[],
        )?;
        if total > self.env.max_count {
            // Beyond the int range: a chunked all-reduce, keeping our block.
            let off: usize = recv_counts[..self.rank].iter().sum();
            let mine = recv_counts[self.rank];
            let r = self.all_reduce_op(false, send, op)?;
            let b = r.wait()?;
            return Ok(Request::ready(b.slice(off..off + mine)));
        }
        let mut p = self.begin("reduce_scatter", true, None, bg)?;
        let (send, orig) = MpiComm::reduce_view(send);
        let dt = send.dtype();
        let mut out = Buffer::zeros(dt, recv_counts[self.rank]);
        let ints = vec![recv_counts.iter().map(|&x| x as c_int).collect::<Vec<_>>()];
        // SAFETY: reads rsmpi's immutable `const` C global holding MPI_REQUEST_NULL; MPI overwrites
        // it.
        let mut req = unsafe { sys::RSMPI_REQUEST_NULL };
        let rp = rptr(&mut out);
        // SAFETY: `send` holds sum(recv_counts) elements (checked; at most max_count, so the int
        // counts are exact), `out` recv_counts[rank]; send, out and ints stay in `p` until the
        // request completes or is parked.
        self.ffi(&p, "MPI_Ireduce_scatter", || unsafe {
            sys::MPI_Ireduce_scatter(
                sptr(&send) as *const c_void,
                rp as *mut c_void,
                ints[0].as_ptr(),
                datatype(dt),
                mpi_op(op),
                self.raw.0,
                &mut req,
            )
        })?;
        p.reqs.push(req);
        p.ints = ints;
        p.keep.push(send);
        p.out = Some(out);
        p.post = Some(MpiComm::reduce_post(
            orig,
            (op == ReduceOp::Mean).then_some(self.size),
        ));
        Ok(Request::new(p))
    }

    fn all_to_all_v_op(
        &self,
        bg: bool,
        send: Buffer,
        send_counts: Vec<usize>,
        recv_counts: Vec<usize>,
    ) -> Result<Request> {
        let ck = self.check("all_to_all_v");
        let total = ck.counts("send_counts", &send_counts)?;
        let rtotal = ck.counts("recv_counts", &recv_counts)?;
        ck.len("send", send.len(), total)?;
        self.verify(
            "all_to_all_v",
            5,
            Some(send.dtype()),
            0,
            send.len(),
            &send_counts,
            &recv_counts,
        )?;
        let mut p = self.begin("all_to_all_v", true, None, bg)?;
        let out = Buffer::zeros(send.dtype(), rtotal);
        self.start_a2a(
            &mut p,
            send.dtype(),
            sptr(&send),
            &send_counts,
            out,
            &recv_counts,
        )?;
        p.keep.push(send);
        Ok(Request::new(p))
    }

    fn send_op(&self, bg: bool, buf: Buffer, dest: usize, tag: u32) -> Result<Request> {
        self.check("send").peer("dest", dest)?;
        let mut p = self.begin(
            &format!("send(to {dest}, tag {tag})"),
            false,
            Some(dest),
            bg,
        )?;
        let (dt, n) = (buf.dtype(), buf.len());
        self.post_chunked(
            &mut p,
            "MPI_Isend",
            sptr(&buf),
            dt,
            n,
            // SAFETY: `post_chunked` passes chunks inside `buf` (sptr, `n` elements), which moves
            // into `p.out` and lives until the requests complete or are parked; `req` is valid.
            |ptr, count, req| unsafe {
                sys::MPI_Isend(
                    ptr,
                    count,
                    datatype(dt),
                    dest as c_int,
                    tag as c_int,
                    self.raw.0,
                    req,
                )
            },
        )?;
        p.out = Some(buf);
        Ok(Request::new(p))
    }

    fn recv_op(&self, bg: bool, mut buf: Buffer, src: usize, tag: u32) -> Result<Request> {
        self.check("recv").peer("src", src)?;
        let mut p = self.begin(
            &format!("recv(from {src}, tag {tag})"),
            false,
            Some(src),
            bg,
        )?;
        let (dt, n) = (buf.dtype(), buf.len());
        let base = rptr(&mut buf) as *const u8;
        // SAFETY: `post_chunked` passes chunks inside `buf` (rptr, `n` elements), which moves into
        // `p.out` and lives until the requests complete or are parked; `req` is valid.
        self.post_chunked(&mut p, "MPI_Irecv", base, dt, n, |ptr, count, req| unsafe {
            sys::MPI_Irecv(
                ptr as *mut c_void,
                count,
                datatype(dt),
                src as c_int,
                tag as c_int,
                self.raw.0,
                req,
            )
        })?;
        p.out = Some(buf);
        Ok(Request::new(p))
    }
}

/// An in-flight MPI operation; owns every buffer MPI may touch until it completes.
struct MpiPending {
    op: String,
    comm: String,
    rank: usize,
    seq: u64,
    peer: Option<usize>,
    timeout: Duration,
    world_ranks: Arc<Vec<usize>>,
    env: Arc<Env>,
    poisoned: Arc<Mutex<Option<String>>>,
    reqs: Vec<sys::MPI_Request>,
    keep: Vec<Buffer>,
    ints: Vec<Vec<c_int>>,
    out: Option<Buffer>,
    post: Option<Box<dyn FnOnce(Buffer) -> Buffer + Send>>,
    done: bool,
    /// Counted in `Env::background` (a non-blocking operation nobody waits for yet).
    bg: bool,
}
// SAFETY: MPI_THREAD_MULTIPLE; request handles may be tested from any thread.
unsafe impl Send for MpiPending {}

impl Drop for MpiPending {
    fn drop(&mut self) {
        self.attend();
        if !self.done {
            // Abandoned (timeout or dropped handle): MPI may still use the buffers.
            let parked = Parked {
                reqs: std::mem::take(&mut self.reqs),
                keep: std::mem::take(&mut self.keep),
                ints: std::mem::take(&mut self.ints),
                out: self.out.take(),
            };
            self.env
                .abandoned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(parked);
        }
    }
}

impl MpiPending {
    /// The caller drives this operation from now on (it waits, or it completed).
    fn attend(&mut self) {
        if std::mem::take(&mut self.bg) {
            self.env.background.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn test_raw(&mut self) -> Result<bool> {
        if self.done {
            return Ok(true);
        }
        let mut flag: c_int = 0;
        let n = self.reqs.len() as c_int;
        // SAFETY: `self.reqs` holds exactly `n` requests of this operation (MPI may null them in
        // place); `flag` is a valid local; no status array is needed.
        call("MPI_Testall", &self.op, &self.comm, self.rank, || unsafe {
            sys::MPI_Testall(
                n,
                self.reqs.as_mut_ptr(),
                &mut flag,
                sys::RSMPI_STATUSES_IGNORE,
            )
        })?;
        if flag != 0 {
            self.done = true;
            self.attend();
            if let Some(post) = self.post.take() {
                let out = self.out.take().unwrap_or_default();
                self.out = Some(post(out));
            }
        }
        Ok(flag != 0)
    }

    /// Asks the members what they are doing; returns (missing ranks, detail).
    fn diagnose(&self) -> (Vec<usize>, String) {
        if let Some(peer) = self.peer {
            return (vec![peer], String::new());
        }
        let env = &self.env;
        let query = format!("{} {}", self.seq, self.comm).into_bytes();
        let others: Vec<usize> = (0..self.world_ranks.len())
            .filter(|&q| q != self.rank)
            .collect();
        for &q in &others {
            let w = self.world_ranks[q] as c_int;
            let _ = call(
                "MPI_Send",
                "diagnose",
                "control",
                env.world_rank,
                // SAFETY: `query` is alive and holds `query.len()` bytes for the whole blocking
                // send; `env.control` is live and `w` a world rank.
                || unsafe {
                    sys::MPI_Send(
                        query.as_ptr() as *const c_void,
                        query.len() as c_int,
                        sys::RSMPI_UINT8_T,
                        w,
                        TAG_QUERY,
                        env.control.0,
                    )
                },
            );
        }
        let mut replies: HashMap<usize, (u64, String)> = HashMap::new();
        let grace = (self.timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
        let end = Instant::now() + grace;
        while Instant::now() < end && replies.len() < others.len() {
            env.service();
            let mut flag: c_int = 0;
            // SAFETY: MPI_Status is a plain C struct of integers, valid all-zero; MPI fills it.
            let mut st: sys::MPI_Status = unsafe { std::mem::zeroed() };
            // SAFETY: `env.control` is live; `flag` and `st` are valid locals MPI writes into.
            unsafe {
                sys::MPI_Iprobe(
                    sys::RSMPI_ANY_SOURCE,
                    TAG_REPLY,
                    env.control.0,
                    &mut flag,
                    &mut st,
                )
            };
            if flag == 0 {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            let mut n: c_int = 0;
            // SAFETY: `st` was filled by the successful MPI_Iprobe above (flag != 0); `n` is a
            // valid local.
            unsafe { sys::MPI_Get_count(&st, sys::RSMPI_UINT8_T, &mut n) };
            let mut b = vec![0u8; n.max(0) as usize];
            // SAFETY: `b` holds `n` bytes and MPI writes at most `n` (a longer message is a
            // truncation error, not an overflow); `env.control` is live.
            unsafe {
                sys::MPI_Recv(
                    b.as_mut_ptr() as *mut c_void,
                    n,
                    sys::RSMPI_UINT8_T,
                    st.MPI_SOURCE,
                    TAG_REPLY,
                    env.control.0,
                    sys::RSMPI_STATUS_IGNORE,
                )
            };
            let text = String::from_utf8_lossy(&b).to_string();
            let mut lines = text.splitn(3, '\n');
            if lines.next() != Some(&String::from_utf8_lossy(&query)) {
                continue; // a late reply to an earlier diagnosis
            }
            let entered = lines.next().and_then(|x| x.parse().ok()).unwrap_or(0);
            let act = lines.next().unwrap_or("").to_string();
            if let Some(q) = self
                .world_ranks
                .iter()
                .position(|&w| w == st.MPI_SOURCE as usize)
            {
                replies.insert(q, (entered, act));
            }
        }
        let mut missing = vec![];
        let mut detail = String::new();
        for q in others {
            match replies.get(&q) {
                Some((entered, _)) if *entered > self.seq => {}
                Some((entered, act)) => {
                    missing.push(q);
                    detail += &format!(
                        "; rank {q} (world {}) entered {entered} operations on `{}`, now {act}",
                        self.world_ranks[q], self.comm
                    );
                }
                None => {
                    missing.push(q);
                    detail += &format!(
                        "; rank {q} (world {}) did not answer (busy outside Switchyard, stuck or dead)",
                        self.world_ranks[q]
                    );
                }
            }
        }
        (missing, detail)
    }
}

impl PendingOp for MpiPending {
    fn test(&mut self) -> Result<bool> {
        self.test_raw()
    }

    fn wait(mut self: Box<Self>) -> Result<Buffer> {
        self.attend();
        let deadline = crate::deadline_after(self.timeout);
        self.env.set_activity(State::Waiting, &self.op, &self.comm);
        let mut last_service = Instant::now();
        let mut polls = 0u32;
        // No yield between polls: MPI_Testall runs OpenMPI's progress engine, which yields
        // by itself when the ranks oversubscribe the cores, exactly as a blocking MPI call.
        while !self.test_raw()? {
            // The clock is read every 64 polls: often enough for the timeout and the
            // diagnostic service, rarely enough not to show in small messages' latency.
            polls = polls.wrapping_add(1);
            if !polls.is_multiple_of(64) {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                let (missing, detail) = self.diagnose();
                let e = CommError::Timeout {
                    op: self.op.clone(),
                    comm: self.comm.clone(),
                    rank: self.rank,
                    size: self.world_ranks.len(),
                    timeout: self.timeout,
                    missing,
                    detail,
                };
                self.poisoned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(|| e.to_string());
                self.env.set_activity(State::Failed, &self.op, &self.comm);
                return Err(e); // drop parks the buffers
            }
            if now - last_service > Duration::from_millis(1) {
                self.env.service();
                last_service = now;
            }
        }
        self.env.set_activity(State::Outside, &self.op, &self.comm);
        Ok(self.out.take().unwrap_or_default())
    }
}

impl Communicator for MpiComm {
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
        BackendKind::Mpi
    }
    fn timeout(&self) -> Duration {
        self.timeout
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }
    fn detects_mismatch(&self) -> bool {
        self.env.verify
    }

    fn i_barrier(&self) -> Result<Request> {
        self.barrier_op(true)
    }
    fn i_broadcast(&self, buf: Buffer, root: usize) -> Result<Request> {
        self.broadcast_op(true, buf, root)
    }
    fn i_all_reduce(&self, buf: Buffer, op: ReduceOp) -> Result<Request> {
        self.all_reduce_op(true, buf, op)
    }
    fn i_all_gather_v(&self, send: Buffer, recv_counts: Vec<usize>) -> Result<Request> {
        self.all_gather_v_op(true, send, recv_counts)
    }
    fn i_reduce_scatter(
        &self,
        send: Buffer,
        recv_counts: Vec<usize>,
        op: ReduceOp,
    ) -> Result<Request> {
        self.reduce_scatter_op(true, send, recv_counts, op)
    }
    fn i_all_to_all_v(
        &self,
        send: Buffer,
        send_counts: Vec<usize>,
        recv_counts: Vec<usize>,
    ) -> Result<Request> {
        self.all_to_all_v_op(true, send, send_counts, recv_counts)
    }
    fn i_send(&self, buf: Buffer, dest: usize, tag: u32) -> Result<Request> {
        self.send_op(true, buf, dest, tag)
    }
    fn i_recv(&self, buf: Buffer, src: usize, tag: u32) -> Result<Request> {
        self.recv_op(true, buf, src, tag)
    }

    // Blocking calls: the same operations, waited at once on the caller's thread (which
    // drives MPI itself), so the progress thread stays out of their way.

    fn barrier(&self) -> Result<()> {
        self.barrier_op(false)?.wait().map(|_| ())
    }
    fn broadcast(&self, buf: &mut Buffer, root: usize) -> Result<()> {
        *buf = self
            .broadcast_op(false, std::mem::take(buf), root)?
            .wait()?;
        Ok(())
    }
    fn all_reduce(&self, buf: &mut Buffer, op: ReduceOp) -> Result<()> {
        *buf = self.all_reduce_op(false, std::mem::take(buf), op)?.wait()?;
        Ok(())
    }
    fn all_gather_v(&self, send: &Buffer, recv_counts: &[usize]) -> Result<Buffer> {
        self.all_gather_v_op(false, send.clone(), recv_counts.to_vec())?
            .wait()
    }
    fn reduce_scatter(&self, send: &Buffer, recv_counts: &[usize], op: ReduceOp) -> Result<Buffer> {
        self.reduce_scatter_op(false, send.clone(), recv_counts.to_vec(), op)?
            .wait()
    }
    fn send(&self, buf: &Buffer, dest: usize, tag: u32) -> Result<()> {
        self.send_op(false, buf.clone(), dest, tag)?
            .wait()
            .map(|_| ())
    }
    fn recv(&self, buf: &mut Buffer, src: usize, tag: u32) -> Result<()> {
        *buf = self.recv_op(false, std::mem::take(buf), src, tag)?.wait()?;
        Ok(())
    }

    /// Blocking all-to-all(v) without copying the send buffer. On a timeout MPI may still
    /// read `send`: treat the error as fatal (`abort`), as the trait documents.
    fn all_to_all_v(
        &self,
        send: &Buffer,
        send_counts: &[usize],
        recv: &mut Buffer,
        recv_counts: &[usize],
    ) -> Result<()> {
        let ck = self.check("all_to_all_v");
        let total = ck.counts("send_counts", send_counts)?;
        let rtotal = ck.counts("recv_counts", recv_counts)?;
        ck.len("send", send.len(), total)?;
        self.verify(
            "all_to_all_v",
            5,
            Some(send.dtype()),
            0,
            send.len(),
            send_counts,
            recv_counts,
        )?;
        let mut p = self.begin("all_to_all_v", true, None, false)?;
        let mut out = std::mem::take(recv);
        if out.dtype() != send.dtype() || out.len() != rtotal {
            out = Buffer::zeros(send.dtype(), rtotal);
        }
        self.start_a2a(
            &mut p,
            send.dtype(),
            sptr(send),
            send_counts,
            out,
            recv_counts,
        )?;
        *recv = Box::new(p).wait()?;
        Ok(())
    }

    fn split(&self, color: u32, key: i32) -> Result<Box<dyn Communicator>> {
        // A barrier with the timeout first, so a missing rank is named instead of a hang.
        let seq = self.entered.load(Ordering::SeqCst);
        self.barrier()?;
        // SAFETY: reads rsmpi's immutable `const` C global holding MPI_COMM_NULL; MPI_Comm_split
        // overwrites it.
        let mut new: sys::MPI_Comm = unsafe { sys::RSMPI_COMM_NULL };
        call(
            "MPI_Comm_split",
            "split",
            &self.name,
            self.rank,
            // SAFETY: `self.raw` is live; `new` is a valid local that receives the new
            // communicator, which `wrap` owns (freed on drop).
            || unsafe { sys::MPI_Comm_split(self.raw.0, color as c_int, key as c_int, &mut new) },
        )?;
        let name = format!("{}/split{seq}:{color}", self.name);
        Ok(Box::new(MpiComm::wrap(
            self.env.clone(),
            new,
            name,
            self.timeout,
            true,
        )?))
    }

    fn abort(&self, reason: &str, code: i32) -> ! {
        eprintln!(
            "switchyard-comm: rank {} of `{}` aborts the job: {reason}",
            self.rank, self.name
        );
        // SAFETY: MPI_Abort on a valid communicator; it does not return.
        unsafe {
            sys::MPI_Abort(sys::RSMPI_COMM_WORLD, code as c_int);
        }
        std::process::exit(code)
    }
}
