//! The `parallel:` config node: the mesh layout and the knobs of expert / data parallelism.
//! Validated against the model and the world size at launch (`Mesh::new`).

use serde::{Deserialize, Serialize};

use crate::cp::CpAlgorithm;
use crate::overlap::Overlap;

/// world = dp x cp x ep. The dp x ep ranks of one cp position each hold `1/(dp·ep)` of the
/// global batch's rows, split along the sequence over the cp ranks; the ep ranks of one
/// (dp, cp) group together hold every expert once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    /// Data-parallel degree: replicas of each expert.
    #[serde(default = "one")]
    pub dp: usize,
    /// Context-parallel degree: ranks that split each sequence (zigzag; the sequence length
    /// must be a multiple of 2·cp).
    #[serde(default = "one")]
    pub cp: usize,
    /// Context-parallel attention: `ring` (key/value blocks travel) or `token_ring` (queries
    /// travel, partial outputs return).
    #[serde(default)]
    pub cp_algorithm: CpAlgorithm,
    /// Expert-parallel degree: ranks that split the experts (must divide
    /// `model.moe.num_experts`).
    #[serde(default = "one")]
    pub ep: usize,
    /// Chunks of the expert-parallel exchange whose transfers overlap the expert compute,
    /// forward and backward: a count (1 = no overlap) or `auto` (measured on the first
    /// step, then chosen from a cost model; `overlap.rs`).
    #[serde(default)]
    pub ep_overlap: Overlap,
    /// Gradient all-reduce bucket size, MiB of f32.
    #[serde(default = "default_bucket_mib")]
    pub grad_bucket_mib: f64,
    /// Where the AdamW state and the gradients live (ZeRO-style sharding over the ranks that
    /// replicate each parameter; `shard.rs`).
    #[serde(default)]
    pub shard_optimizer: ShardOptimizer,
}

/// `parallel.shard_optimizer`: what is split over the replicas of each parameter (dense
/// parameters over the whole world, expert parameters over their dp x cp replicas).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardOptimizer {
    /// Every replica holds every moment; gradients are all-reduced.
    #[default]
    None,
    /// Each parameter's AdamW moments live on one replica (its owner): gradients are
    /// reduce-scattered once per step, the owner updates, the new weights are all-gathered.
    /// A rank still accumulates full gradients over its micro-batches.
    States,
    /// As `states`, and the gradients are reduce-scattered after every micro-batch: a rank
    /// keeps only the accumulated gradients of the parameters it owns.
    StatesAndGrads,
}

impl ShardOptimizer {
    pub fn is_sharded(self) -> bool {
        self != ShardOptimizer::None
    }
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            dp: 1,
            cp: 1,
            cp_algorithm: CpAlgorithm::default(),
            ep: 1,
            ep_overlap: Overlap::default(),
            grad_bucket_mib: default_bucket_mib(),
            shard_optimizer: ShardOptimizer::None,
        }
    }
}

fn one() -> usize {
    1
}

fn default_bucket_mib() -> f64 {
    16.0
}

impl ParallelConfig {
    /// Ranks the layout needs.
    pub fn world_size(&self) -> usize {
        self.dp * self.cp * self.ep
    }

    /// Ranks that split the rows of the global batch (dp x ep).
    pub fn batch_shards(&self) -> usize {
        self.dp * self.ep
    }

    /// Bucket size in f32 elements.
    pub fn bucket_elems(&self) -> usize {
        ((self.grad_bucket_mib * (1 << 20) as f64) / 4.0).max(1.0) as usize
    }

    /// Issues as (key relative to this node, message). `num_experts`: routed experts per
    /// MoE layer of the model.
    pub fn validate(&self, num_experts: usize) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        if self.dp == 0 {
            issues.push(("dp".into(), "must be at least 1".into()));
        }
        if self.cp == 0 {
            issues.push(("cp".into(), "must be at least 1".into()));
        }
        if self.ep == 0 {
            issues.push(("ep".into(), "must be at least 1".into()));
        } else if !num_experts.is_multiple_of(self.ep) {
            let divisors: Vec<usize> = (1..=num_experts)
                .filter(|d| num_experts.is_multiple_of(*d))
                .collect();
            issues.push((
                "ep".into(),
                format!(
                    "is {} but must divide model.moe.num_experts ({num_experts}); choose one of \
                     {divisors:?}",
                    self.ep
                ),
            ));
        }
        if !(self.grad_bucket_mib.is_finite() && self.grad_bucket_mib > 0.0) {
            issues.push((
                "grad_bucket_mib".into(),
                format!(
                    "must be a positive size in MiB, got {}",
                    self.grad_bucket_mib
                ),
            ));
        }
        issues
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let c: ParallelConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(c, ParallelConfig::default());
        assert_eq!(c.world_size(), 1);
        let c: ParallelConfig = serde_yaml::from_str("{dp: 2, ep: 3}").unwrap();
        assert_eq!(c.world_size(), 6);
        let keys: Vec<String> = c.validate(8).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["ep"]);
        assert!(c.validate(6).is_empty());
        assert!(serde_yaml::from_str::<ParallelConfig>("{tp: 2}").is_err());
    }

    #[test]
    fn ep_overlap_is_a_count_or_auto() {
        let c: ParallelConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(c.ep_overlap, Overlap::Auto);
        let c: ParallelConfig = serde_yaml::from_str("{ep_overlap: 4}").unwrap();
        assert_eq!(c.ep_overlap, Overlap::Chunks(4));
        let c: ParallelConfig = serde_yaml::from_str("{ep_overlap: auto}").unwrap();
        assert_eq!(c.ep_overlap, Overlap::Auto);
        for bad in ["{ep_overlap: 0}", "{ep_overlap: fast}", "{ep_overlap: -1}"] {
            let err = serde_yaml::from_str::<ParallelConfig>(bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("ep_overlap"), "{bad}: {err}");
        }
    }
}
