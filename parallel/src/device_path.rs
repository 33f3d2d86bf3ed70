//! Collectives on tensors in GPU memory. When a tensor lives on a CUDA device and the
//! communicator has device collectives (the `nccl` backend), its values go from the tensor's
//! own device memory to NCCL and the result comes back into a tensor on the same device:
//! no host round trip. Every other case (flex, wgpu, CUDA over MPI or threads, a non-f32
//! tensor) answers `None` and the caller takes the host path of [`crate::glue`], which is
//! what the parity suites pin; the GPU suite pins this path to it.
//!
//! Shape legend: R rows, D columns, N elements.

use std::any::Any;

use burn::tensor::Tensor;
use switchyard_comm::{Communicator, Request};

use crate::error::{ParallelError, Result};

/// `x_rd` [R_s, D] exchanged all-to-all (rows `send_rows[j]` to rank j, `recv_rows[j]`
/// from rank j) on the device: [R_r, D]. `None`: not a case for the device path.
pub fn all_to_all_rows(
    x_rd: &Tensor<2>,
    comm: &dyn Communicator,
    send_rows: &[usize],
    recv_rows: &[usize],
    what: &dyn Fn() -> String,
) -> Option<Result<Tensor<2>>> {
    imp::all_to_all_rows(x_rd, comm, send_rows, recv_rows, what)
}

/// `x_n` [N] summed over the ranks of `comm`, on the device. `None`: not a case for the
/// device path.
pub fn all_reduce_sum(
    x_n: &Tensor<1>,
    comm: &dyn Communicator,
    what: &dyn Fn() -> String,
) -> Option<Result<Tensor<1>>> {
    imp::all_reduce_sum(x_n, comm, what)
}

/// Sends `x_n` [N] to `dest` while receiving `recv_len` elements from `src`, on the device.
/// `None`: not a case for the device path.
pub fn send_recv(
    x_n: &Tensor<1>,
    comm: &dyn Communicator,
    dest: usize,
    recv_len: usize,
    src: usize,
    what: &dyn Fn() -> String,
) -> Option<Result<Tensor<1>>> {
    imp::send_recv(x_n, comm, dest, recv_len, src, what)
}

/// A send posted from device memory: the request, and the device memory it reads (kept
/// alive and in place until the send completes).
pub struct DeviceSend {
    request: Request,
    _keep: Box<dyn Any + Send>,
}

/// A receive posted into device memory: [N] f32 on the device once complete.
pub struct DeviceRecv {
    request: Request,
    buffer_n: Tensor<1>,
    _keep: Box<dyn Any + Send>,
}

impl DeviceSend {
    /// Waits for the send; `what` names it in errors.
    pub fn wait(self, what: String) -> Result<()> {
        self.request
            .wait()
            .map(|_| ())
            .map_err(ParallelError::comm(what))
    }
}

impl DeviceRecv {
    /// Waits for the receive; `what` names it in errors.
    pub fn wait(self, what: String) -> Result<Tensor<1>> {
        self.request.wait().map_err(ParallelError::comm(what))?;
        Ok(self.buffer_n)
    }
}

/// Posts the send of `parts` (each [B, H, M, X], flattened and concatenated) to `dest`
/// from device memory (deferred like `Communicator::i_send`). `None`: not a case for the
/// device path.
pub fn post_send(
    parts: &[Tensor<4>],
    comm: &dyn Communicator,
    dest: usize,
    what: &dyn Fn() -> String,
) -> Option<Result<DeviceSend>> {
    imp::post_send(parts, comm, dest, what)
}

/// Posts the receive of `len` f32 from `src` into device memory on `like`'s device.
/// `None`: not a case for the device path.
pub fn post_recv<const D: usize>(
    len: usize,
    like: &Tensor<D>,
    comm: &dyn Communicator,
    src: usize,
    what: &dyn Fn() -> String,
) -> Option<Result<DeviceRecv>> {
    imp::post_recv(len, like, comm, src, what)
}

#[cfg(feature = "cuda")]
mod imp {
    use std::any::Any;

    use burn::backend::Cube;
    use burn::tensor::{DType, Tensor};
    use burn_cubecl::CubeDevice;
    use burn_cubecl::cubecl::cuda::CudaRuntime;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl_runtime::runtime::Runtime;
    use switchyard_comm::{Communicator, DeviceCollectives, ReduceOp};

    use crate::error::{ParallelError, Result};

    /// The tensor's CUDA primitive and the communicator's device collectives, when both exist
    /// and the tensor is f32 on the communicator's GPU.
    fn eligible<'c, const D: usize>(
        t: &Tensor<D>,
        comm: &'c dyn Communicator,
    ) -> Option<(CubeTensor, &'c dyn DeviceCollectives)> {
        let dc = comm.device_collectives()?;
        let cube = t.clone().try_into_primitive::<Cube>().ok()?;
        match &cube.device {
            CubeDevice::Cuda(d) if d.index == dc.device_ordinal() && cube.dtype == DType::F32 => {
                Some((into_contiguous(cube), dc))
            }
            _ => None,
        }
    }

    fn device_err(what: &dyn Fn() -> String, detail: String) -> ParallelError {
        ParallelError::Shape {
            what: what(),
            detail,
        }
    }

    /// The device addresses of `tensors` (0 for an empty one) and the guards that keep
    /// their allocations in place, after the device has finished the work that produces
    /// them (NCCL runs on a stream of its own).
    fn pin(
        tensors: &[&CubeTensor],
        what: &dyn Fn() -> String,
    ) -> Result<(Vec<u64>, Box<dyn Any + Send>)> {
        let mut pinned = Vec::with_capacity(tensors.len());
        let mut addresses = Vec::with_capacity(tensors.len());
        for t in tensors {
            if t.meta.shape().num_elements() == 0 {
                addresses.push(0);
                continue;
            }
            let resource = t
                .client
                .get_resource::<<CudaRuntime as Runtime>::Server>(t.handle.clone())
                .map_err(|e| device_err(what, format!("the tensor's device memory: {e:?}")))?;
            addresses.push(resource.resource().ptr);
            pinned.push(resource);
        }
        if let Some(t) = tensors.first() {
            burn_cubecl::cubecl::future::block_on(t.client.sync())
                .map_err(|e| device_err(what, format!("synchronising the device: {e:?}")))?;
        }
        Ok((addresses, Box::new(pinned)))
    }

    /// Runs `f` with the device addresses of `tensors`, pinned until it returns (see [`pin`]).
    fn with_addresses<R>(
        tensors: &[&CubeTensor],
        what: &dyn Fn() -> String,
        f: impl FnOnce(&[u64]) -> Result<R>,
    ) -> Result<R> {
        let (addresses, pinned) = pin(tensors, what)?;
        let out = f(&addresses);
        drop(pinned);
        out
    }

    fn zeros<const D: usize>(shape: [usize; D], like: &CubeTensor) -> CubeTensor {
        let device = burn::tensor::Device::from(like.device.clone());
        into_contiguous(
            Tensor::<D>::zeros(shape, &device)
                .try_into_primitive::<Cube>()
                .expect("a tensor made on a cube device is a cube tensor"),
        )
    }

    pub fn all_to_all_rows(
        x_rd: &Tensor<2>,
        comm: &dyn Communicator,
        send_rows: &[usize],
        recv_rows: &[usize],
        what: &dyn Fn() -> String,
    ) -> Option<Result<Tensor<2>>> {
        let (x, dc) = eligible(x_rd, comm)?;
        let d = x_rd.dims()[1];
        let out = zeros([recv_rows.iter().sum(), d], &x);
        let send: Vec<usize> = send_rows.iter().map(|r| r * d).collect();
        let recv: Vec<usize> = recv_rows.iter().map(|r| r * d).collect();
        Some(
            with_addresses(&[&x, &out], what, |a| {
                // SAFETY: both are contiguous f32 buffers of this GPU sized by the counts,
                // their producers synchronised, pinned until this returns.
                unsafe { dc.all_to_all_v(a[0], &send, a[1], &recv, switchyard_comm::DType::F32) }
                    .map_err(ParallelError::comm(what()))
            })
            .map(|()| Tensor::<2>::from_primitive::<Cube>(out)),
        )
    }

    pub fn all_reduce_sum(
        x_n: &Tensor<1>,
        comm: &dyn Communicator,
        what: &dyn Fn() -> String,
    ) -> Option<Result<Tensor<1>>> {
        let (x, dc) = eligible(x_n, comm)?;
        // Out of place: the input may be shared (with the autodiff graph, with the optimizer).
        let sum = zeros([x_n.dims()[0]], &x);
        let n = x_n.dims()[0];
        Some(
            with_addresses(&[&x, &sum], what, |a| {
                // SAFETY: contiguous f32 buffers of n elements on this GPU, producers
                // synchronised, pinned until this returns.
                unsafe { dc.all_reduce(a[0], a[1], n, switchyard_comm::DType::F32, ReduceOp::Sum) }
                    .map_err(ParallelError::comm(what()))
            })
            .map(|()| Tensor::<1>::from_primitive::<Cube>(sum)),
        )
    }

    pub fn send_recv(
        x_n: &Tensor<1>,
        comm: &dyn Communicator,
        dest: usize,
        recv_len: usize,
        src: usize,
        what: &dyn Fn() -> String,
    ) -> Option<Result<Tensor<1>>> {
        let (x, dc) = eligible(x_n, comm)?;
        let got = zeros([recv_len], &x);
        let n = x_n.dims()[0];
        Some(
            with_addresses(&[&x, &got], what, |a| {
                // SAFETY: contiguous f32 buffers of this GPU of n and recv_len elements,
                // producers synchronised, pinned until this returns.
                unsafe {
                    dc.send_recv(
                        a[0],
                        n,
                        dest,
                        a[1],
                        recv_len,
                        src,
                        switchyard_comm::DType::F32,
                    )
                }
                .map_err(ParallelError::comm(what()))
            })
            .map(|()| Tensor::<1>::from_primitive::<Cube>(got)),
        )
    }

    pub fn post_send(
        parts: &[Tensor<4>],
        comm: &dyn Communicator,
        dest: usize,
        what: &dyn Fn() -> String,
    ) -> Option<Result<super::DeviceSend>> {
        let first = parts.first()?;
        eligible(first, comm)?;
        let flat_n = Tensor::cat(
            parts.iter().map(|t| t.clone().flatten::<1>(0, 3)).collect(),
            0,
        );
        let (x, dc) = eligible(&flat_n, comm)?;
        let bytes = flat_n.dims()[0] * 4;
        Some(pin(&[&x], what).and_then(|(a, pinned)| {
            // SAFETY: a contiguous f32 buffer of `bytes` bytes on this GPU, its producer
            // synchronised, pinned (with the tensor) until the send completes.
            let request =
                unsafe { dc.i_send(a[0], bytes, dest) }.map_err(ParallelError::comm(what()))?;
            Ok(super::DeviceSend {
                request,
                _keep: Box::new((pinned, x)),
            })
        }))
    }

    pub fn post_recv<const D: usize>(
        len: usize,
        like: &Tensor<D>,
        comm: &dyn Communicator,
        src: usize,
        what: &dyn Fn() -> String,
    ) -> Option<Result<super::DeviceRecv>> {
        let (like, dc) = eligible(like, comm)?;
        let got = zeros([len], &like);
        Some(pin(&[&got], what).and_then(|(a, pinned)| {
            // SAFETY: a contiguous f32 buffer of `len` elements on this GPU, written by its
            // fill before, pinned until the receive completes.
            let request =
                unsafe { dc.i_recv(a[0], len * 4, src) }.map_err(ParallelError::comm(what()))?;
            Ok(super::DeviceRecv {
                request,
                buffer_n: Tensor::<1>::from_primitive::<Cube>(got.clone()),
                _keep: Box::new(pinned),
            })
        }))
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use burn::tensor::Tensor;
    use switchyard_comm::Communicator;

    use crate::error::Result;

    pub fn all_to_all_rows(
        _: &Tensor<2>,
        _: &dyn Communicator,
        _: &[usize],
        _: &[usize],
        _: &dyn Fn() -> String,
    ) -> Option<Result<Tensor<2>>> {
        None
    }

    pub fn all_reduce_sum(
        _: &Tensor<1>,
        _: &dyn Communicator,
        _: &dyn Fn() -> String,
    ) -> Option<Result<Tensor<1>>> {
        None
    }

    pub fn send_recv(
        _: &Tensor<1>,
        _: &dyn Communicator,
        _: usize,
        _: usize,
        _: usize,
        _: &dyn Fn() -> String,
    ) -> Option<Result<Tensor<1>>> {
        None
    }

    pub fn post_send(
        _: &[Tensor<4>],
        _: &dyn Communicator,
        _: usize,
        _: &dyn Fn() -> String,
    ) -> Option<Result<super::DeviceSend>> {
        None
    }

    pub fn post_recv<const D: usize>(
        _: usize,
        _: &Tensor<D>,
        _: &dyn Communicator,
        _: usize,
        _: &dyn Fn() -> String,
    ) -> Option<Result<super::DeviceRecv>> {
        None
    }
}
