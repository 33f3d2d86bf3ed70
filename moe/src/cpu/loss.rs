//! Mean next-token cross-entropy as one op: a pass per row for the log-sum-exp forward,
//! one for `softmax - onehot` backward, instead of burn's log-softmax chain of full-size
//! temporaries over the [T, V] logits.
//!
//! Shape legend: T tokens (B*S), V vocabulary.

use burn::tensor::{Int, Tensor};
use rayon::prelude::*;

use super::{BackwardFn, Fused, custom_op, dims, exp, exp_sum, fused, prim, tensor, values, zeros};

/// logits: [T, V], targets: T ids -> mean over T of `logsumexp(logits_t) - logits_t[target_t]`:
/// [1]. `None` off the flex backend or when switched off.
pub fn cross_entropy(logits_tv: &Tensor<2>, targets: &Tensor<1, Int>) -> Option<Tensor<1>> {
    if !fused(Fused::Loss) {
        return None;
    }
    let logits = prim(logits_tv)?;
    let targets: Vec<usize> = targets
        .clone()
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .ok()?
        .into_iter()
        .map(|t| t as usize)
        .collect();
    custom_op([logits], move |[logits]| {
        let (t, v) = (dims(logits)[0], dims(logits)[1]);
        assert_eq!(targets.len(), t, "one target per row");
        let lv = values(logits);
        // Per row: log-sum-exp and the loss.
        let mut lse = zeros(t);
        let mut loss = zeros(t);
        lse.par_iter_mut()
            .zip(loss.par_iter_mut())
            .enumerate()
            .for_each(|(row, (lse, loss))| {
                let x = &lv[row * v..(row + 1) * v];
                let max = x.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a));
                let sum = exp_sum(x, max);
                *lse = max + sum.ln();
                *loss = *lse - x[targets[row]];
            });
        let mean = (loss.iter().map(|&l| l as f64).sum::<f64>() / t.max(1) as f64) as f32;
        let logits = logits.clone();
        let backward: BackwardFn<1> = Box::new(move |dy, _| {
            let scale = values(&dy)[0] / t.max(1) as f32;
            let lv = values(&logits);
            let mut dx = zeros(t * v);
            dx.par_chunks_mut(v).enumerate().for_each(|(row, d)| {
                let x = &lv[row * v..(row + 1) * v];
                let m = lse[row];
                for (di, &xi) in d.iter_mut().zip(x) {
                    *di = scale * exp(xi - m);
                }
                d[targets[row]] -= scale;
            });
            [Some(tensor(dx, &[t, v]))]
        });
        (tensor(vec![mean], &[1]), backward)
    })
}
