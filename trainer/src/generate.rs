//! Text generation from a trained model: the decoding loop (with the key/value cache, or
//! recomputing the whole sequence every step) and the sampling rule (greedy, temperature,
//! top-k, top-p), deterministic at a seed.
//!
//! Shape legend: T tokens, V vocabulary.

use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use switchyard_moe::{KvCache, Transformer};

/// How the next token is drawn from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0: greedy (the most likely token; ties to the lowest id); otherwise logits / T.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`.
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Sampling {
    /// What is wrong with the options, if anything (named by their flags).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            out.push(format!(
                "--temperature must be a finite number >= 0 (0: greedy), got {}",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            out.push("--top-k must be at least 1".into());
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            out.push(format!("--top-p must be in (0, 1], got {p}"));
        }
        out
    }

    /// The id drawn from `logits` (only ids below `limit` are candidates: the model's
    /// vocabulary may be larger than its tokenizer's).
    pub fn pick(&self, logits: &[f32], limit: usize, rng: &mut ChaCha8Rng) -> u32 {
        let logits = &logits[..limit.min(logits.len())];
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv { (i, v) } else { (bi, bv) }
                })
                .0 as u32
        };
        if self.temperature == 0.0 {
            return argmax();
        }
        // Candidates by decreasing logit (ties by id), cut by top-k, then by top-p.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = self.top_k {
            order.truncate(k.max(1));
        }
        let top = logits[order[0]] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - top) / self.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = self.top_p {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    cumulative += q;
                    cumulative >= p
                })
                .map_or(probs.len(), |i| i + 1);
            order.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = rng.random::<f64>() * total;
        for (&i, &q) in order.iter().zip(&probs) {
            if u < q {
                return i as u32;
            }
            u -= q;
        }
        *order.last().expect("at least one candidate") as u32
    }
}

/// Generates up to `max_new` tokens after `prompt` (not empty), calling `on_token` with each
/// new token as soon as it is drawn (it returns `false` to stop early). `kv_cache`: feed
/// only the new token each step; otherwise the whole sequence is recomputed every step
/// (the same arithmetic: a fresh cache over everything). Only ids below `vocab_limit` are
/// drawn. Returns the new tokens.
pub fn generate(
    model: &Transformer,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    kv_cache: bool,
    vocab_limit: usize,
    mut on_token: impl FnMut(u32) -> bool,
) -> Vec<u32> {
    assert!(
        !prompt.is_empty(),
        "generation needs at least one prompt token"
    );
    let device = model.embed.val().device();
    let as_tensor = |ids: &[u32]| -> Tensor<2, Int> {
        let ids: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
        let n = ids.len();
        Tensor::from_data(TensorData::new(ids, [1, n]), &device)
    };
    let last_logits = |logits_1tv: Tensor<3>| -> Vec<f32> {
        let [_, t, v] = logits_1tv.dims();
        logits_1tv
            .slice([0..1, t - 1..t, 0..v])
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("logits read as f32")
    };
    let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
    let mut cache = KvCache::default();
    let mut sequence = prompt.to_vec();
    let mut fresh = Vec::new();
    for step in 0..max_new {
        let logits = if !kv_cache {
            model.forward_cached(as_tensor(&sequence), &mut KvCache::default())
        } else if step == 0 {
            model.forward_cached(as_tensor(&sequence), &mut cache)
        } else {
            model.forward_cached(as_tensor(&sequence[sequence.len() - 1..]), &mut cache)
        };
        let next = sampling.pick(&last_logits(logits), vocab_limit, &mut rng);
        sequence.push(next);
        fresh.push(next);
        if !on_token(next) {
            break;
        }
    }
    fresh
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            seed: 7,
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit_below_the_limit() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let s = sampling(0.0, None, None);
        assert_eq!(s.pick(&[0.1, 3.0, 3.0, 9.0], 4, &mut rng), 3);
        // Id 3 is beyond the tokenizer's vocabulary: the best of the rest (tie: lowest id).
        assert_eq!(s.pick(&[0.1, 3.0, 3.0, 9.0], 3, &mut rng), 1);
    }

    #[test]
    fn top_k_one_and_a_tiny_top_p_are_greedy() {
        let logits = [0.5, 2.0, 1.9, -1.0];
        for s in [
            sampling(1.0, Some(1), None),
            sampling(1.0, None, Some(1e-9)),
        ] {
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            for _ in 0..50 {
                assert_eq!(s.pick(&logits, 4, &mut rng), 1, "{s:?}");
            }
        }
    }

    #[test]
    fn sampling_follows_the_softmax_and_the_cuts() {
        // Frequencies over many draws against the softmax probabilities.
        let logits = [0.0f32, 1.0, 2.0, 0.5];
        let draws = 40_000;
        let count = |s: &Sampling| {
            let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
            let mut n = [0usize; 4];
            for _ in 0..draws {
                n[s.pick(&logits, 4, &mut rng) as usize] += 1;
            }
            n.map(|c| c as f64 / draws as f64)
        };
        let e: Vec<f64> = logits.iter().map(|&l| (l as f64).exp()).collect();
        let z: f64 = e.iter().sum();
        let full = count(&sampling(1.0, None, None));
        for i in 0..4 {
            assert!((full[i] - e[i] / z).abs() < 0.01, "{full:?}");
        }
        // top-k 2: only ids 2 and 1, in proportion e^2 : e^1.
        let k2 = count(&sampling(1.0, Some(2), None));
        assert_eq!(k2[0] + k2[3], 0.0, "{k2:?}");
        assert!((k2[2] - e[2] / (e[1] + e[2])).abs() < 0.01, "{k2:?}");
        // top-p 0.6: id 2 alone has ~0.57 < 0.6, so ids 2 and 1 are kept.
        let p = count(&sampling(1.0, None, Some(0.6)));
        assert_eq!(p[0] + p[3], 0.0, "{p:?}");
        // A high temperature flattens the distribution.
        let hot = count(&sampling(100.0, None, None));
        assert!(hot.iter().all(|&f| (f - 0.25).abs() < 0.02), "{hot:?}");
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 13) % 7) as f32 * 0.3).collect();
        let draw = |seed| {
            let s = Sampling {
                seed,
                ..sampling(0.9, Some(20), Some(0.95))
            };
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..30)
                .map(|_| s.pick(&logits, 50, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn bad_options_are_named() {
        let s = sampling(-1.0, Some(0), Some(1.5));
        let p = s.problems();
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].contains("--temperature") && p[1].contains("--top-k") && p[2].contains("--top-p")
        );
        assert!(sampling(0.0, Some(5), Some(1.0)).problems().is_empty());
    }
}
