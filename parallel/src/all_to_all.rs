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
//! Written against burn's backend-generic tensor API and made one autodiff node by
//! [`crate::autodiff::differentiable`], so it runs on every backend of the build; the data
//! itself travels through host buffers (`comm` moves host memory).
//!
//! Shape legend: R_s rows sent, R_r rows received, D row width.

use std::fmt;
use std::sync::Arc;

use burn::tensor::Tensor;
use switchyard_comm::Communicator;

use crate::autodiff::{GradFn, differentiable};
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

    /// The data movement on a non-autodiff tensor: [R_s, D] -> [R_r, D] on its device.
    fn exchange(&self, x_rd: Tensor<2>) -> Result<Tensor<2>> {
        let device = x_rd.device();
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
        if let Some(out) = crate::device_path::all_to_all_rows(
            &x_rd,
            self.comm.as_ref(),
            &self.send_rows,
            &self.recv_rows,
            &what,
        ) {
            return out;
        }
        let send = tensor_to_buffer(x_rd)?;
        let send_counts = self.send_rows.iter().map(|r| r * d).collect();
        let recv_counts = self.recv_rows.iter().map(|r| r * d).collect();
        let request = self
            .comm
            .i_all_to_all_v(send, send_counts, recv_counts)
            .map_err(ParallelError::comm(what()))?;
        let received = request.wait().map_err(ParallelError::comm(what()))?;
        buffer_to_tensor(received, self.rows_received(), d, &device)
    }
}

/// Exchanges rows: x [R_s, D] (blocks for ranks `0..size` in order) -> [R_r, D] (blocks from
/// ranks `0..size` in order). Differentiable on every autodiff backend of this build
/// ([`crate::autodiff`]); plain on any inner device. Every rank of the communicator must
/// call it, in the same order, with matching counts.
pub fn all_to_all_rows(x_rd: Tensor<2>, exchange: &RowExchange) -> Result<Tensor<2>> {
    let op = format!("all_to_all_rows on `{}`", exchange.comm.name());
    differentiable(&op, [x_rd], |[x_rd]| {
        let out_rd = exchange.exchange(x_rd)?;
        let transposed = exchange.transposed();
        let grad_fn: GradFn<1, 2, 2> = Box::new(move |grad_rd, _needed| {
            // Every rank runs the exchange, whether or not its input needs a gradient, so
            // the collective is never skipped on one rank only. The backward pass has no
            // error channel: a failed collective (timeout, poisoned communicator) ends the
            // rank here.
            [Some(
                transposed
                    .exchange(grad_rd)
                    .unwrap_or_else(crate::seam::fail),
            )]
        });
        Ok((out_rd, grad_fn))
    })
}
