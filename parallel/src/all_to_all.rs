//! The row all-to-all as a custom autodiff operation.
//!
//! Forward: `all_to_all_v` of row blocks (rank `j` gets `send_rows[j]` rows, rank `i`'s
//! block arrives as `recv_rows[i]` rows, rank order). Backward: the same exchange with the
//! send and receive counts swapped (the transpose of a permutation is its inverse), run
//! by burn's backward pass as the `Backward` step of the operation — a true graph node,
//! not a hook: the gradient of the input is exactly the transposed exchange of the
//! gradient of the output.
//!
//! The backward pass needs no special order: burn's backward order is a function of the
//! graph, every rank builds the same graph around the collectives, and a rank that sends
//! or receives zero rows still takes part (with `[0, D]` tensors), forward and backward.
//!
//! Implemented with burn-autodiff's `Backward` / `OpsKind` API on `Autodiff<Flex>` (the
//! CPU backend); the data itself travels through host buffers (`comm` moves host memory
//! on every backend today). Another autodiff backend gets `UnsupportedBackend`.
//!
//! Shape legend: R_s rows sent, R_r rows received, D row width.

use std::fmt;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Device, Tensor};
use switchyard_comm::Communicator;

use crate::error::{ParallelError, Result};
use crate::glue::{buffer_to_tensor, tensor_to_buffer};

/// The counts of one row exchange over a communicator.
#[derive(Clone)]
pub struct RowExchange {
    comm: Arc<dyn Communicator>,
    /// Rows sent to each rank.
    pub send_rows: Vec<usize>,
    /// Rows received from each rank.
    pub recv_rows: Vec<usize>,
}

impl fmt::Debug for RowExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RowExchange")
            .field("comm", &self.comm.name())
            .field("send_rows", &self.send_rows)
            .field("recv_rows", &self.recv_rows)
            .finish()
    }
}

impl RowExchange {
    /// `send_rows` / `recv_rows`: one entry per rank of `comm`.
    pub fn new(
        comm: Arc<dyn Communicator>,
        send_rows: Vec<usize>,
        recv_rows: Vec<usize>,
    ) -> Result<RowExchange> {
        let size = comm.size();
        if send_rows.len() != size || recv_rows.len() != size {
            return Err(ParallelError::Shape {
                what: format!("all_to_all_rows on `{}`", comm.name()),
                detail: format!(
                    "send_rows has {} entries and recv_rows {}; the communicator has {size} \
                     ranks and each needs one entry per rank",
                    send_rows.len(),
                    recv_rows.len()
                ),
            });
        }
        Ok(RowExchange {
            comm,
            send_rows,
            recv_rows,
        })
    }

    /// The exchange that undoes this one (counts swapped).
    pub fn transposed(&self) -> RowExchange {
        RowExchange {
            comm: self.comm.clone(),
            send_rows: self.recv_rows.clone(),
            recv_rows: self.send_rows.clone(),
        }
    }

    pub fn rows_sent(&self) -> usize {
        self.send_rows.iter().sum()
    }

    pub fn rows_received(&self) -> usize {
        self.recv_rows.iter().sum()
    }

    /// The data movement on a non-autodiff tensor: [R_s, D] -> [R_r, D] on `device`.
    fn exchange(&self, x_rd: Tensor<2>, device: &Device) -> Result<Tensor<2>> {
        let [rows, d] = x_rd.dims();
        let what = || format!("all_to_all_rows on `{}`", self.comm.name());
        if rows != self.rows_sent() {
            return Err(ParallelError::Shape {
                what: what(),
                detail: format!(
                    "the tensor has {rows} rows; the send counts {:?} add up to {}",
                    self.send_rows,
                    self.rows_sent()
                ),
            });
        }
        let send = tensor_to_buffer(x_rd)?;
        let send_counts = self.send_rows.iter().map(|r| r * d).collect();
        let recv_counts = self.recv_rows.iter().map(|r| r * d).collect();
        let request = self
            .comm
            .i_all_to_all_v(send, send_counts, recv_counts)
            .map_err(ParallelError::comm(what()))?;
        let received = request.wait().map_err(ParallelError::comm(what()))?;
        buffer_to_tensor(received, self.rows_received(), d, device)
    }
}

/// Exchanges rows: x [R_s, D] (blocks for ranks `0..size` in order) -> [R_r, D] (blocks from
/// ranks `0..size` in order). Differentiable on `Autodiff<Flex>`; plain on any inner device.
/// Every rank of the communicator must call it, in the same order, with matching counts.
pub fn all_to_all_rows(x_rd: Tensor<2>, exchange: &RowExchange) -> Result<Tensor<2>> {
    let device = x_rd.device();
    if !device.is_autodiff() {
        return exchange.exchange(x_rd, &device);
    }
    let primitive = x_rd.try_into_primitive::<Autodiff<Flex>>().map_err(|e| {
        ParallelError::UnsupportedBackend {
            op: format!("all_to_all_rows on `{}`", exchange.comm.name()),
            detail: format!("{e:?}"),
        }
    })?;
    let (inner, guard) = primitive.into_parts();
    let inner_rd = Tensor::<2>::from_primitive::<Flex>(inner);
    let inner_device = inner_rd.device();
    let out_rd = exchange.exchange(inner_rd, &inner_device)?;
    let out =
        out_rd
            .try_into_primitive::<Flex>()
            .map_err(|e| ParallelError::UnsupportedBackend {
                op: "all_to_all_rows".into(),
                detail: format!("{e:?}"),
            })?;
    let tracked = match AllToAllBackward
        .prepare::<NoCheckpointing>([guard])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(exchange.transposed(), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(Tensor::<2>::from_primitive::<Autodiff<Flex>>(tracked))
}

/// Backward of `all_to_all_rows`: the transposed exchange of the output gradient.
#[derive(Debug)]
struct AllToAllBackward;

impl Backward<Flex, 1> for AllToAllBackward {
    /// The transposed exchange.
    type State = RowExchange;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let grad_rd = Tensor::<2>::from_primitive::<Flex>(grad);
        let device = grad_rd.device();
        // Every rank runs the exchange, whether or not its input needs a gradient, so the
        // collective is never skipped on one rank only. The backward pass has no error
        // channel: a failed collective (timeout, poisoned communicator) ends the rank here.
        let grad_in = ops
            .state
            .exchange(grad_rd, &device)
            .unwrap_or_else(crate::seam::fail);
        let [parent] = ops.parents;
        if let Some(parent) = parent {
            let grad_in = grad_in
                .try_into_primitive::<Flex>()
                .unwrap_or_else(|e| panic!("backward of all_to_all_rows: {e:?}"));
            grads.register::<Flex>(parent.id, grad_in);
        }
    }
}
