//! burn tensors <-> `comm::Buffer`, on the inner (non-autodiff) device.
//!
//! Shape legend: R rows, D columns.

use burn::tensor::{Device, Tensor, TensorData};
use switchyard_comm::Buffer;

use crate::error::{ParallelError, Result};

/// [R, D] f32 tensor -> row-major f32 buffer of R * D elements. Reads the values only (no
/// gradient tracking).
pub fn tensor_to_buffer(t_rd: Tensor<2>) -> Result<Buffer> {
    let values = t_rd
        .inner()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| ParallelError::Shape {
            what: "tensor_to_buffer".into(),
            detail: format!("cannot read the tensor as f32: {e:?}"),
        })?;
    Ok(Buffer::F32(values))
}

/// f32 buffer of `rows * cols` elements -> [rows, cols] tensor on `device`.
pub fn buffer_to_tensor(
    buf: Buffer,
    rows: usize,
    cols: usize,
    device: &Device,
) -> Result<Tensor<2>> {
    let dtype = buf.dtype();
    let values = buf.into_vec::<f32>().map_err(|_| ParallelError::Shape {
        what: "buffer_to_tensor".into(),
        detail: format!("the buffer holds {dtype} elements; f32 is expected"),
    })?;
    if values.len() != rows * cols {
        return Err(ParallelError::Shape {
            what: "buffer_to_tensor".into(),
            detail: format!(
                "the buffer holds {} elements; [{rows}, {cols}] needs {}",
                values.len(),
                rows * cols
            ),
        });
    }
    Ok(Tensor::from_data(
        TensorData::new(values, [rows, cols]),
        device,
    ))
}
