//! Mean next-token cross-entropy as one op: one pass per row for the softmax (kept) and the
//! loss forward, one scaling pass for `softmax - onehot` backward, instead of burn's
//! log-softmax chain of full-size temporaries over the [T, V] logits.
//!
//! Shape legend: T tokens (B*S), V vocabulary.

use burn::tensor::{Int, Tensor};
use rayon::prelude::*;

use super::{
    BackwardFn, Fused, custom_op, dims, exp, fused, prim, sum, tensor, values, wide, zeros,
};

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
        // Per row: the softmax (kept: the backward is `softmax - onehot`, so it needs no
        // second pass of exponentials) and the loss `log-sum-exp - logit[target]`.
        let mut probs = zeros(t * v);
        let mut loss = zeros(t);
        probs
            .par_chunks_mut(v)
            .zip(loss.par_iter_mut())
            .enumerate()
            .for_each(|(row, (p, loss))| {
                wide(
                    #[inline(always)]
                    || {
                        let x = &lv[row * v..(row + 1) * v];
                        let max = x.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a));
                        for (p, &xi) in p.iter_mut().zip(x) {
                            *p = exp(xi - max);
                        }
                        let sum = sum(p);
                        *loss = max + sum.ln() - x[targets[row]];
                        let inv = 1.0 / sum;
                        p.iter_mut().for_each(|p| *p *= inv);
                    },
                )
            });
        let mean = (loss.iter().map(|&l| l as f64).sum::<f64>() / t.max(1) as f64) as f32;
        let backward: BackwardFn<1> = Box::new(move |dy, _| {
            let scale = values(&dy)[0] / t.max(1) as f32;
            // In place on the kept probabilities.
            let mut dx = probs;
            dx.par_chunks_mut(v).enumerate().for_each(|(row, d)| {
                wide(
                    #[inline(always)]
                    || d.iter_mut().for_each(|p| *p *= scale),
                );
                d[targets[row]] -= scale;
            });
            [Some(tensor(dx, &[t, v]))]
        });
        (tensor(vec![mean], &[1]), backward)
    })
}
