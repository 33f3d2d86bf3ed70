//! SwiGLU feed-forward experts.
//!
//! Shape legend: N rows (token copies routed to one expert), D model dim, F ffn dim.

use burn::module::{Module, Param};
use burn::tensor::Tensor;

use crate::init::Initializer;
use switchyard_kernels::grouped::{SwiGluWeights, swiglu};

/// `down(silu(x @ gate) * (x @ up))`, the feed-forward block of LLaMA and Mixtral.
#[derive(Module, Debug)]
pub struct SwiGlu {
    /// [D, F]
    pub w_gate: Param<Tensor<2>>,
    /// [D, F]
    pub w_up: Param<Tensor<2>>,
    /// [F, D]
    pub w_down: Param<Tensor<2>>,
}

impl SwiGlu {
    pub fn new(d_model: usize, ffn_dim: usize, init: &mut Initializer) -> Self {
        Self {
            w_gate: init.normal([d_model, ffn_dim]),
            w_up: init.normal([d_model, ffn_dim]),
            w_down: init.normal([ffn_dim, d_model]),
        }
    }

    /// x: [N, D] -> [N, D]; GEMMs at the forward pass's precision (`crate::precision`).
    pub fn forward(&self, x_nd: Tensor<2>) -> Tensor<2> {
        swiglu(x_nd, self)
    }

    /// Matmul FLOPs of the forward pass for `rows` rows.
    pub fn forward_flops(&self, rows: usize) -> u64 {
        let [d, f] = self.w_gate.val().dims();
        3 * 2 * (rows * d * f) as u64
    }
}

impl SwiGluWeights for SwiGlu {
    fn w_gate(&self) -> Tensor<2> {
        self.w_gate.val()
    }
    fn w_up(&self) -> Tensor<2> {
        self.w_up.val()
    }
    fn w_down(&self) -> Tensor<2> {
        self.w_down.val()
    }
}
