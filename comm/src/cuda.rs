//! Whether CUDA can be used in this process (feature `cuda`). cudarc loads the driver
//! library at run time and panics on first use when it is missing, so anything that touches
//! a CUDA device (burn's CubeCL CUDA backend included) asks here first.

use cudarc::driver::CudaContext;

use crate::CommError;

fn unavailable(reason: impl Into<String>) -> CommError {
    CommError::Unavailable {
        backend: "cuda",
        reason: reason.into(),
        hint: "run on a machine with an NVIDIA GPU and its driver (libcuda.so), or use \
               `device: cpu`"
            .into(),
    }
}

/// The number of CUDA devices, or why CUDA cannot be used (no driver library, no device).
pub fn probe() -> crate::Result<usize> {
    // SAFETY: only tries to dlopen the driver library; a failure to load is a panic inside
    // cudarc, caught here.
    let present = std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() })
        .unwrap_or(false);
    if !present {
        return Err(unavailable(
            "the CUDA driver library (libcuda.so) was not found",
        ));
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Ok(_) => Err(unavailable("the CUDA driver reports no device")),
        Err(e) => Err(unavailable(format!("cuDeviceGetCount: {e:?}"))),
    }
}
