//! `nccl` backend: NCCL through cudarc, loaded dynamically at run time (the build needs no
//! CUDA). The NCCL unique id travels over an MPI communicator of the same group, which also
//! carries `split`.
//!
//! Status: host-staged. Each operation copies its host buffer to the device, runs NCCL on the
//! communicator's stream and copies back; the `i_*` methods complete before returning (no
//! overlap yet, and NCCL waits are not bounded by the timeout: a hung NCCL collective needs
//! `ncclCommAbort` from a watchdog, not implemented). All-to-all(v) and all-gather(v) are
//! grouped send/recv. Device-resident buffers are the next step, with `parallel`.
//! Absent CUDA or NCCL gives [`CommError::Unavailable`], never a panic.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp as NcclOp};

use crate::{
    BackendKind, Buffer, Check, CommError, Communicator, Element, ReduceOp, Request, Result,
    with_buffer,
};

struct Inner {
    comm: Comm,
    stream: Arc<CudaStream>,
}
// SAFETY: the NCCL communicator and stream are only used under the `Mutex` below.
unsafe impl Send for Inner {}

/// One rank's NCCL communicator (with its MPI twin for ids and splits).
pub struct NcclComm {
    mpi: Box<dyn Communicator>,
    inner: Mutex<Inner>,
    name: String,
    device: usize,
}

fn unavailable(reason: impl Into<String>) -> CommError {
    CommError::Unavailable {
        backend: "nccl",
        reason: reason.into(),
        hint: "install the CUDA driver and NCCL (libnccl2) on a GPU machine, or use \
               `backend: {type: mpi}`"
            .into(),
    }
}

impl NcclComm {
    /// Creates the NCCL communicator of `mpi`'s group on `device` (default: rank modulo
    /// the number of devices). Collective over `mpi`.
    pub fn new(mpi: Box<dyn Communicator>, device: Option<usize>) -> Result<NcclComm> {
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
        let ctx =
            CudaContext::new(device).map_err(|e| unavailable(format!("device {device}: {e:?}")))?;
        let stream = ctx.default_stream();
        let mut raw = Buffer::U8(vec![0; 128]);
        if mpi.rank() == 0 {
            let id = Id::new().map_err(|e| unavailable(format!("ncclGetUniqueId: {e:?}")))?;
            raw = Buffer::U8(id.internal().iter().map(|&c| c as u8).collect());
        }
        mpi.broadcast(&mut raw, 0)?;
        let bytes = raw.as_slice::<u8>().unwrap();
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(bytes) {
            *d = *s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(stream.clone(), mpi.rank(), mpi.size(), Id::uninit(internal))
            .map_err(|e| CommError::Backend {
                backend: "NCCL",
                call: "ncclCommInitRank",
                op: "create".into(),
                comm: mpi.name().to_string(),
                rank: mpi.rank(),
                location: format!("{}:{}", file!(), line!()),
                detail: format!("{e:?}"),
            })?;
        Ok(NcclComm {
            name: format!("nccl:{}", mpi.name()),
            mpi,
            inner: Mutex::new(Inner { comm, stream }),
            device,
        })
    }

    /// Whether the CUDA driver and NCCL libraries can be loaded (cudarc panics on first use
    /// otherwise, so this must come first).
    pub fn probe() -> Result<()> {
        // SAFETY: only tries to dlopen the libraries.
        let cuda = std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() })
            .unwrap_or(false);
        if !cuda {
            return Err(unavailable(
                "the CUDA driver library (libcuda.so) was not found",
            ));
        }
        // SAFETY: as above: only tries to dlopen the NCCL library names (running a system library's
        // initialisers) and drops the handle; a panic is caught.
        let nccl = std::panic::catch_unwind(|| unsafe { cudarc::nccl::sys::is_culib_present() })
            .unwrap_or(false);
        if !nccl {
            return Err(unavailable("the NCCL library (libnccl.so) was not found"));
        }
        match CudaContext::device_count() {
            Ok(n) if n > 0 => Ok(()),
            Ok(_) => Err(unavailable("no CUDA device")),
            Err(e) => Err(unavailable(format!("cuDeviceGetCount: {e:?}"))),
        }
    }

    pub fn device(&self) -> usize {
        self.device
    }

    fn err(&self, call: &'static str, op: &str, e: &dyn std::fmt::Debug) -> CommError {
        CommError::Backend {
            backend: "NCCL",
            call,
            op: op.to_string(),
            comm: self.name.clone(),
            rank: self.rank(),
            location: format!("{}:{}", file!(), line!()),
            detail: format!("{e:?}"),
        }
    }

    fn check<'a>(&'a self, op: &'a str) -> Check<'a> {
        Check {
            op,
            comm: &self.name,
            rank: self.rank(),
            size: self.size(),
        }
    }

    fn all_reduce_t<T>(&self, v: &mut Vec<T>, op: ReduceOp) -> Result<()>
    where
        T: NcclType + DeviceRepr + ValidAsZeroBits + Element,
    {
        if v.is_empty() {
            return self.mpi.barrier();
        }
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let d = g
            .stream
            .clone_htod(v.as_slice())
            .map_err(|e| self.err("cuMemcpyHtoD", "all_reduce", &e))?;
        let mut r = g
            .stream
            .alloc_zeros::<T>(v.len())
            .map_err(|e| self.err("cuMemAlloc", "all_reduce", &e))?;
        let nop = match op {
            ReduceOp::Sum => NcclOp::Sum,
            ReduceOp::Max => NcclOp::Max,
            ReduceOp::Mean => NcclOp::Avg,
        };
        g.comm
            .all_reduce(&d, &mut r, &nop)
            .map_err(|e| self.err("ncclAllReduce", "all_reduce", &e))?;
        *v = g
            .stream
            .clone_dtoh(&r)
            .map_err(|e| self.err("cuMemcpyDtoH", "all_reduce", &e))?;
        Ok(())
    }

    /// Grouped send/recv: `sends[j]` goes to rank j, `recv_counts[j]` elements come from j.
    fn exchange_t<T>(
        &self,
        op: &str,
        sends: Vec<&[T]>,
        recv_counts: &[usize],
    ) -> Result<Vec<Vec<T>>>
    where
        T: NcclType + DeviceRepr + ValidAsZeroBits + Element,
    {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let e = |c, x: &dyn std::fmt::Debug| self.err(c, op, x);
        let dsend = sends
            .iter()
            .map(|s| {
                if s.is_empty() {
                    Ok(None)
                } else {
                    g.stream.clone_htod(*s).map(Some)
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|x| e("cuMemcpyHtoD", &x))?;
        let mut drecv = recv_counts
            .iter()
            .map(|&c| {
                if c == 0 {
                    Ok(None)
                } else {
                    g.stream.alloc_zeros::<T>(c).map(Some)
                }
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|x| e("cuMemAlloc", &x))?;
        cudarc::nccl::result::group_start().map_err(|x| e("ncclGroupStart", &x))?;
        for (j, s) in dsend.iter().enumerate() {
            if let Some(s) = s {
                g.comm.send(s, j as i32).map_err(|x| e("ncclSend", &x))?;
            }
        }
        for (j, r) in drecv.iter_mut().enumerate() {
            if let Some(r) = r {
                g.comm.recv(r, j as i32).map_err(|x| e("ncclRecv", &x))?;
            }
        }
        cudarc::nccl::result::group_end().map_err(|x| e("ncclGroupEnd", &x))?;
        drecv
            .iter()
            .map(|r| match r {
                Some(r) => g.stream.clone_dtoh(r).map_err(|x| e("cuMemcpyDtoH", &x)),
                None => Ok(Vec::new()),
            })
            .collect()
    }

    fn exchange(
        &self,
        op: &str,
        send: &Buffer,
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> Result<Buffer> {
        macro_rules! go {
            ($v:ident, $variant:ident) => {{
                let mut off = 0;
                let sends: Vec<_> = send_counts
                    .iter()
                    .map(|&c| {
                        let s = &$v[off..off + c];
                        off += c;
                        s
                    })
                    .collect();
                Buffer::$variant(self.exchange_t(op, sends, recv_counts)?.concat())
            }};
        }
        Ok(match send {
            Buffer::F32(v) => go!(v, F32),
            Buffer::F64(v) => go!(v, F64),
            Buffer::BF16(v) => go!(v, BF16),
            Buffer::F16(v) => go!(v, F16),
            Buffer::I32(v) => go!(v, I32),
            Buffer::I64(v) => go!(v, I64),
            Buffer::U8(v) => go!(v, U8),
        })
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn size(&self) -> usize {
        self.mpi.size()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn backend(&self) -> BackendKind {
        BackendKind::Nccl
    }
    fn timeout(&self) -> Duration {
        self.mpi.timeout()
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.mpi.set_timeout(timeout)
    }
    fn detects_mismatch(&self) -> bool {
        false
    }

    fn i_barrier(&self) -> Result<Request> {
        let mut v = vec![0f32];
        self.all_reduce_t(&mut v, ReduceOp::Sum)?;
        Ok(Request::ready(Buffer::default()))
    }

    fn i_broadcast(&self, buf: Buffer, root: usize) -> Result<Request> {
        self.check("broadcast").peer("root", root)?;
        let n = self.size();
        let sc: Vec<usize> = (0..n)
            .map(|j| {
                if self.rank() == root && j != root {
                    buf.len()
                } else {
                    0
                }
            })
            .collect();
        let send = if self.rank() == root {
            Buffer::zeros(buf.dtype(), 0)
        } else {
            buf.slice(0..0)
        };
        let full_send = if self.rank() == root {
            let mut s = Buffer::zeros(buf.dtype(), buf.len() * (n - 1));
            for k in 0..n - 1 {
                s.copy_from(k * buf.len(), &buf, 0..buf.len());
            }
            s
        } else {
            send
        };
        let rc: Vec<usize> = (0..n)
            .map(|j| {
                if j == root && self.rank() != root {
                    buf.len()
                } else {
                    0
                }
            })
            .collect();
        let got = self.exchange("broadcast", &full_send, &sc, &rc)?;
        Ok(Request::ready(if self.rank() == root { buf } else { got }))
    }

    fn i_all_reduce(&self, mut buf: Buffer, op: ReduceOp) -> Result<Request> {
        self.check("all_reduce").reduce(buf.dtype(), op)?;
        with_buffer!(&mut buf, v => self.all_reduce_t(v, op))?;
        Ok(Request::ready(buf))
    }

    fn i_all_gather_v(&self, send: Buffer, recv_counts: Vec<usize>) -> Result<Request> {
        let ck = self.check("all_gather_v");
        let total = ck.counts("recv_counts", &recv_counts)?;
        ck.len("send", send.len(), recv_counts[self.rank()])?;
        let n = self.size();
        let me = self.rank();
        let mut rep = Buffer::zeros(send.dtype(), send.len() * (n - 1));
        for k in 0..n - 1 {
            rep.copy_from(k * send.len(), &send, 0..send.len());
        }
        let sc: Vec<usize> = (0..n)
            .map(|j| if j == me { 0 } else { send.len() })
            .collect();
        let rc: Vec<usize> = (0..n)
            .map(|j| if j == me { 0 } else { recv_counts[j] })
            .collect();
        let got = self.exchange("all_gather_v", &rep, &sc, &rc)?;
        let mut out = Buffer::zeros(send.dtype(), total);
        let (mut o, mut g) = (0, 0);
        for (j, &c) in recv_counts.iter().enumerate() {
            if j == me {
                out.copy_from(o, &send, 0..c);
            } else {
                out.copy_from(o, &got, g..g + c);
                g += c;
            }
            o += c;
        }
        Ok(Request::ready(out))
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
        let off: usize = recv_counts[..self.rank()].iter().sum();
        let all = self.i_all_reduce(send, op)?.wait()?;
        Ok(Request::ready(
            all.slice(off..off + recv_counts[self.rank()]),
        ))
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
        Ok(Request::ready(self.exchange(
            "all_to_all_v",
            &send,
            &send_counts,
            &recv_counts,
        )?))
    }

    fn i_send(&self, buf: Buffer, dest: usize, _tag: u32) -> Result<Request> {
        self.check("send").peer("dest", dest)?;
        let mut sc = vec![0; self.size()];
        sc[dest] = buf.len();
        self.exchange("send", &buf, &sc, &vec![0; self.size()])?;
        Ok(Request::ready(buf))
    }

    fn i_recv(&self, buf: Buffer, src: usize, _tag: u32) -> Result<Request> {
        self.check("recv").peer("src", src)?;
        let mut rc = vec![0; self.size()];
        rc[src] = buf.len();
        let got = self.exchange(
            "recv",
            &Buffer::zeros(buf.dtype(), 0),
            &vec![0; self.size()],
            &rc,
        )?;
        Ok(Request::ready(got))
    }

    /// NCCL point-to-point has no tags and blocks until matched: `send_recv` must be used
    /// for ring steps (it is one grouped exchange here).
    fn send_recv(
        &self,
        send: &Buffer,
        dest: usize,
        recv: &mut Buffer,
        src: usize,
        _tag: u32,
    ) -> Result<()> {
        let n = self.size();
        let mut sc = vec![0; n];
        sc[dest] = send.len();
        let mut rc = vec![0; n];
        rc[src] = recv.len();
        *recv = self.exchange("send_recv", send, &sc, &rc)?;
        Ok(())
    }

    fn split(&self, color: u32, key: i32) -> Result<Box<dyn Communicator>> {
        let sub = self.mpi.split(color, key)?;
        Ok(Box::new(NcclComm::new(sub, Some(self.device))?))
    }

    fn abort(&self, reason: &str, code: i32) -> ! {
        self.mpi.abort(reason, code)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_reports_instead_of_panicking() {
        // On a machine without CUDA this is the clean `Unavailable` error; with a GPU, Ok.
        match super::NcclComm::probe() {
            Ok(()) => println!("CUDA and NCCL present"),
            Err(e) => println!("SKIPPED nccl: {e}"),
        }
    }
}
