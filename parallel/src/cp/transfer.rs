//! One point-to-point message of ring attention and TokenRing: a few [B, H, M, X] tensors
//! sent to, or received from, one peer. On a communicator with device collectives (NCCL)
//! and tensors on its GPU the message goes from device memory to device memory
//! ([`crate::device_path`]); everywhere else it is packed into a host buffer
//! ([`tile::pack`] / [`tile::unpack`]). Both are posted at once and waited later, so the
//! transfer overlaps the compute in between (on NCCL, the sends and receives posted before
//! a wait are issued together at that wait: see `comm::rendezvous`).
//!
//! Shape legend: B batch, H heads, M rows, X width of one part.

use burn::tensor::{Device, Tensor};
use switchyard_comm::Request;

use super::CpAttention;
use super::tile::{pack, recv_buffer, unpack};
use crate::device_path::{self, DeviceRecv, DeviceSend};
use crate::error::{ParallelError, Result};

enum Out {
    Host(Request),
    Device(Box<DeviceSend>),
}

/// A posted send.
pub struct Outgoing {
    what: String,
    out: Out,
}

enum In {
    Host(Request),
    Device(Box<DeviceRecv>),
}

/// A posted receive of tensors of known shapes.
pub struct Incoming {
    what: String,
    shapes: Vec<[usize; 4]>,
    device: Device,
    incoming: In,
}

/// Posts the send of `parts` to `dest`; `what` names the message in errors.
pub fn send(
    attn: &CpAttention,
    parts: &[Tensor<4>],
    dest: usize,
    tag: u32,
    what: String,
) -> Result<Outgoing> {
    let name = || what.clone();
    if let Some(sent) = device_path::post_send(parts, attn.comm.as_ref(), dest, &name) {
        return Ok(Outgoing {
            out: Out::Device(Box::new(sent?)),
            what,
        });
    }
    let request = attn
        .comm
        .i_send(pack(parts)?, dest, tag)
        .map_err(ParallelError::comm(what.clone()))?;
    Ok(Outgoing {
        out: Out::Host(request),
        what,
    })
}

/// Posts the receive of tensors of `shapes` from `src`, to land on `like`'s device.
pub fn recv(
    attn: &CpAttention,
    shapes: Vec<[usize; 4]>,
    src: usize,
    tag: u32,
    like: &Tensor<4>,
    what: String,
) -> Result<Incoming> {
    let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let name = || what.clone();
    let device = like.device();
    let incoming = match device_path::post_recv(total, like, attn.comm.as_ref(), src, &name) {
        Some(posted) => In::Device(Box::new(posted?)),
        None => In::Host(
            attn.comm
                .i_recv(recv_buffer(&shapes), src, tag)
                .map_err(ParallelError::comm(what.clone()))?,
        ),
    };
    Ok(Incoming {
        what,
        shapes,
        device,
        incoming,
    })
}

impl Outgoing {
    pub fn wait(self) -> Result<()> {
        match self.out {
            Out::Host(r) => r.wait().map(|_| ()).map_err(ParallelError::comm(self.what)),
            Out::Device(d) => d.wait(self.what),
        }
    }
}

impl Incoming {
    pub fn wait(self) -> Result<Vec<Tensor<4>>> {
        match self.incoming {
            In::Host(r) => {
                let buf = r.wait().map_err(ParallelError::comm(self.what))?;
                unpack(buf, &self.shapes, &self.device)
            }
            In::Device(d) => {
                let flat_n = d.wait(self.what)?;
                let mut at = 0;
                Ok(self
                    .shapes
                    .iter()
                    .map(|&shape| {
                        let n: usize = shape.iter().product();
                        let part = flat_n.clone().slice(at..at + n).reshape(shape);
                        at += n;
                        part
                    })
                    .collect())
            }
        }
    }
}
