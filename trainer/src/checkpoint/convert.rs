//! Weights-only starts from another run's checkpoint (fine-tuning, conversion between
//! router kinds): names and shapes must match, except a router's gate that grows from a
//! vanilla router's `[D, n]` to a null-expert router's `[D, n + m]`.

use switchyard_moe::config::NullInit;
use switchyard_moe::{MoeConfig, RouterConfig, Transformer};

use super::{Snapshot, f32_values, load_weights, tensor_values};

/// Replaces every weight of `model` by the snapshot's. A vanilla router's `[D, n]` weights
/// fill a null-expert router's `[D, n + m]`: the true-expert columns are copied, and the
/// null columns too (cyclically) with `null_init: copy_true_rows`, so the expanded router
/// starts balanced (AdaMoE's conversion); with `random` they keep their fresh values. Any
/// other difference in names or shapes is an error naming the tensor.
pub fn init_weights(
    model: &mut Transformer,
    snapshot: &Snapshot,
    moe: &MoeConfig,
) -> Result<(), String> {
    let tensors = snapshot.tensors("model")?;
    let copy_nulls = match moe.router {
        RouterConfig::NullExperts { null_init, .. } => Some(null_init == NullInit::CopyTrueRows),
        _ => None,
    };
    load_weights(model, tensors, |key, stored, shape, current| {
        if stored.shape == shape {
            return f32_values(key, stored);
        }
        let expandable = key.is_router_gate()
            && copy_nulls.is_some()
            && stored.shape.len() == 2
            && shape.len() == 2
            && stored.shape[0] == shape[0]
            && stored.shape[1] == moe.num_experts
            && shape[1] == moe.num_slots();
        if !expandable {
            return Err(format!(
                "tensor `{key}` has shape {:?} in the checkpoint but {shape:?} in the model",
                stored.shape
            ));
        }
        let (rows, n, slots) = (shape[0], stored.shape[1], shape[1]);
        let old = f32_values(key, stored)?;
        let fresh = tensor_values(current);
        Ok((0..rows * slots)
            .map(|i| {
                let (row, col) = (i / slots, i % slots);
                if col < n || copy_nulls == Some(true) {
                    old[row * n + col % n]
                } else {
                    fresh[i]
                }
            })
            .collect())
    })
}

/// The auxiliary-loss-free router biases are part of the routing the weights were trained
/// with: a model with `bias_balance` takes the checkpoint's (per MoE layer, one per expert),
/// or starts them at zero when the checkpoint has none. A checkpoint's biases are dropped,
/// with a warning, when the new run has no `bias_balance`: its routing then changes.
pub fn init_router_biases(model: &mut Transformer, snapshot: &Snapshot) -> Result<(), String> {
    let saved: Option<Vec<(usize, Vec<f32>)>> = snapshot.get("router_bias")?;
    let biased = !model.router_biases().is_empty();
    match saved {
        Some(saved) if biased => {
            for (layer, bias) in saved {
                model
                    .set_router_bias(layer, bias)
                    .map_err(|e| format!("router_bias: {e}"))?;
            }
        }
        Some(_) => tracing::warn!(
            "--init-from: the checkpoint's auxiliary-loss-free router biases are dropped \
             (model.moe.bias_balance is not set), so tokens may route differently than in \
             the run that wrote it; set model.moe.bias_balance to keep them"
        ),
        None if biased => tracing::info!(
            "--init-from: the checkpoint holds no router biases; model.moe.bias_balance \
             starts them at zero"
        ),
        None => {}
    }
    Ok(())
}
