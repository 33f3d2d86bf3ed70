//! The root of the config tree. Each field is the node of one component, which receives
//! only that node. The binary loads it from YAML (file:line:column errors, `--set`
//! overrides) and calls `validate` before anything is allocated.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use switchyard_moe::{ActivationCheckpointing, ModelConfig, Precision};
use switchyard_parallel::{CommBackendConfig, CommConfig, ParallelConfig};
use switchyard_placement::{PlacementConfig, Strategy};

use crate::data::{DataConfig, Tokenizer, TokenizerConfig};
use crate::device::{CUDA_BUILT, DeviceConfig};
use crate::metrics::MetricsConfig;
use crate::optim::OptimConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Mesh layout (dp x ep); absent = one process.
    #[serde(default)]
    pub parallel: ParallelConfig,
    /// Transport between ranks (`type: auto` picks MPI under mpirun / srun, else threads).
    #[serde(default)]
    pub comm: CommConfig,
    /// Load-aware expert placement: routing statistics, the planner, live migration every
    /// `rebalance_every` steps (absent = contiguous, never rebalanced).
    #[serde(default)]
    pub placement: PlacementConfig,
    /// `cpu` (default), `cuda` (the rank's local rank picks the GPU) or `cuda:N`.
    #[serde(default)]
    pub device: DeviceConfig,
    /// `fp32` (default) or `bf16`: bf16 GEMMs with f32 master weights, router, softmax and
    /// loss (`switchyard_moe::precision`).
    #[serde(default)]
    pub precision: Precision,
}

/// The `run:` node: identity and placement of one training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub name: String,
    /// Directory for checkpoints, metrics and the resolved config (relative paths are
    /// relative to the working directory).
    pub output_dir: PathBuf,
    /// Seeds the weights and the data order.
    #[serde(default)]
    pub seed: u64,
    /// CPU threads for tensor kernels; absent = all cores. Exact loss replay across runs
    /// needs the same thread count.
    #[serde(default)]
    pub threads: Option<usize>,
}

impl Config {
    /// Every issue as (full dotted key path, message), across all components.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        let mut add = |prefix: &str, found: Vec<(String, String)>| {
            issues.extend(
                found
                    .into_iter()
                    .map(|(path, msg)| (format!("{prefix}.{path}"), msg)),
            );
        };
        let mut run = Vec::new();
        if self.run.name.trim().is_empty() {
            run.push(("name".to_string(), "must not be empty".to_string()));
        }
        if self.run.threads == Some(0) {
            run.push((
                "threads".to_string(),
                "must be at least 1; remove it to use all cores".to_string(),
            ));
        }
        add("run", run);
        add("model", self.model.validate());
        add("data", self.data.validate());
        add("optim", self.optim.validate());
        add("train", self.train.validate());
        add("checkpoint", self.checkpoint.validate());
        add("metrics", self.metrics.validate());
        add(
            "parallel",
            self.parallel.validate(self.model.moe.num_experts),
        );
        add("comm", self.comm.validate());
        add("placement", self.placement.validate());
        if self.placement.rebalance_every > 0 && self.parallel.ep < 2 {
            issues.push((
                "placement.rebalance_every".to_string(),
                format!(
                    "is {} but parallel.ep is {}: with one ep rank every expert is local and \
                     there is nothing to place; set parallel.ep >= 2 or rebalance_every: 0",
                    self.placement.rebalance_every, self.parallel.ep
                ),
            ));
        }
        if let Strategy::Ilp { time_limit_s, .. } = self.placement.strategy
            && self.placement.rebalance_every > 0
            && time_limit_s <= 0.0
        {
            issues.push((
                "placement.strategy.time_limit_s".to_string(),
                format!(
                    "is {time_limit_s} but every rank waits for the plan during training; \
                     give the ILP a budget > 0 seconds (e.g. 1.0)"
                ),
            ));
        }
        let shards = self.parallel.batch_shards();
        if shards > 1 && !self.data.batch_size.is_multiple_of(shards) {
            issues.push((
                "data.batch_size".to_string(),
                format!(
                    "is {} but the layout parallel.dp x parallel.ep has {shards} ranks, each \
                     taking an equal share of the global batch's rows; use a multiple of \
                     {shards}",
                    self.data.batch_size
                ),
            ));
        }
        let cp = self.parallel.cp;
        if cp > 1 && !self.data.seq_len.is_multiple_of(2 * cp) {
            issues.push((
                "data.seq_len".to_string(),
                format!(
                    "is {} but parallel.cp = {cp} splits each sequence into {} zigzag chunks; \
                     use a multiple of {}",
                    self.data.seq_len,
                    2 * cp,
                    2 * cp
                ),
            ));
        }
        issues.extend(self.device_issues());
        if self.device.is_cuda()
            && self.train.activation_checkpointing != ActivationCheckpointing::None
        {
            issues.push((
                "train.activation_checkpointing".to_string(),
                format!(
                    "is `{}` but device is `{}`: activation recomputation runs on the CPU \
                     backend only so far; use `none` on GPUs",
                    serde_json::to_value(self.train.activation_checkpointing)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    self.device
                ),
            ));
        }
        // Combinations that span components.
        if self.data.seq_len > self.model.max_seq_len {
            issues.push((
                "data.seq_len".to_string(),
                format!(
                    "is {} but model.max_seq_len is {}; raise max_seq_len or shorten seq_len",
                    self.data.seq_len, self.model.max_seq_len
                ),
            ));
        }
        let tokenizer_vocab = match &self.data.tokenizer {
            TokenizerConfig::Byte {} => Some(256),
            TokenizerConfig::Bpe { vocab_size } => Some(*vocab_size),
            // Known once the tokenizer file is loaded; checked then.
            TokenizerConfig::HuggingFace { .. } => None,
        };
        if let Some(vocab) = tokenizer_vocab
            && self.model.vocab_size < vocab
        {
            issues.push((
                "model.vocab_size".to_string(),
                format!(
                    "is {} but the tokenizer has up to {vocab} tokens; set model.vocab_size: {vocab}",
                    self.model.vocab_size
                ),
            ));
        }
        issues
    }

    /// Model layer indices of the MoE layers.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.model.n_layers)
            .filter(|&l| self.model.is_moe_layer(l))
            .collect()
    }

    /// What only the `placement.plan` file can tell (run after [`Self::validate`]): a file
    /// that does not read as a plan, or a plan for another ep size, model or layer set.
    pub fn placement_plan_issues(&self) -> Vec<(String, String)> {
        let Some(path) = &self.placement.plan else {
            return Vec::new();
        };
        let key = || "placement.plan".to_string();
        let file = match switchyard_placement::PlanFile::load(path) {
            Ok(file) => file,
            Err(e) => return vec![(key(), e.to_string())],
        };
        file.check(
            self.parallel.ep,
            &self.moe_layers(),
            self.model.moe.num_experts,
        )
        .into_iter()
        .map(|msg| (key(), format!("{}: {msg}", path.display())))
        .collect()
    }

    /// What only the tokenizer file can tell (run after [`Self::validate`] and the path
    /// checks): a `tokenizer.json` that does not load, or has more tokens than
    /// `model.vocab_size`.
    pub fn tokenizer_issues(&self) -> Vec<(String, String)> {
        let TokenizerConfig::HuggingFace { path, eod_token } = &self.data.tokenizer else {
            return Vec::new(); // byte and bpe: sizes known from the config (`validate`)
        };
        match Tokenizer::from_hf_file(path, eod_token.as_deref()) {
            Err(e) => vec![("data.tokenizer.path".to_string(), e.to_string())],
            Ok(t) if t.vocab_size() > self.model.vocab_size => vec![(
                "model.vocab_size".to_string(),
                format!(
                    "is {} but the tokenizer {} (data.tokenizer.path) has {} tokens (largest id \
                     + 1); set model.vocab_size: {} or more",
                    self.model.vocab_size,
                    path.display(),
                    t.vocab_size(),
                    t.vocab_size()
                ),
            )],
            Ok(_) => Vec::new(),
        }
    }

    fn device_issues(&self) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        let device = self.device;
        if !device.is_cuda() {
            if matches!(self.comm.backend, CommBackendConfig::Nccl { .. }) {
                issues.push((
                    "comm.backend.type".to_string(),
                    format!(
                        "is `nccl`, which runs collectives on GPU memory, but device is \
                         `{device}`; use `device: cuda`, or `comm.backend.type: auto` (MPI \
                         under mpirun/srun, threads otherwise) for CPU training"
                    ),
                ));
            }
            return issues;
        }
        let mut add = |msg: String| issues.push(("device".to_string(), msg));
        if !CUDA_BUILT {
            add(format!(
                "is `{device}` but this switchyard was built without the CUDA backend; \
                 rebuild with `cargo build --release --features cuda` or use `device: cpu`"
            ));
        }
        issues
    }
}

/// The `train:` node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps of the whole run.
    pub steps: u64,
    /// Micro-batches summed into one optimizer step.
    #[serde(default = "default_one")]
    pub grad_accum_steps: usize,
    /// Evaluate every this many steps (and after the last step); 0 = only after the last.
    #[serde(default)]
    pub eval_every: u64,
    /// Validation batches per evaluation.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// What to do when the loss or a gradient is NaN or infinite.
    #[serde(default)]
    pub nonfinite: NonFinitePolicy,
    /// What the backward recomputes instead of keeping: `none`, `full` (every block from
    /// its input) or `selective` (the attention sub-blocks); `switchyard_moe::recompute`.
    #[serde(default)]
    pub activation_checkpointing: ActivationCheckpointing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NonFinitePolicy {
    /// Stop the run with an error naming the step (the last checkpoint stays valid).
    #[default]
    Stop,
    /// Skip the update (weights and optimizer state unchanged) and go on; logged.
    Skip,
}

/// The `checkpoint:` node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many steps; 0 = only at the end of the run.
    #[serde(default)]
    pub every: u64,
    /// Committed checkpoints to keep; older ones are deleted.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Where checkpoints go; defaults to `<run.output_dir>/checkpoints`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Save after the last step.
    #[serde(default = "default_true")]
    pub save_final: bool,
    /// Seconds the ranks of a multi-rank save wait for each other (writing a large shard
    /// can take longer than `comm.timeout_s`). Unset: derived from the size of a rank's
    /// shard and a minimum write bandwidth (`memory::save_timeout_s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_timeout_s: Option<f64>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: 0,
            keep_last: default_keep_last(),
            dir: None,
            save_final: true,
            save_timeout_s: None,
        }
    }
}

fn default_one() -> usize {
    1
}
fn default_eval_batches() -> usize {
    20
}
fn default_keep_last() -> usize {
    3
}
fn default_true() -> bool {
    true
}

impl TrainConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        if self.steps == 0 {
            issues.push(("steps".into(), "must be at least 1".into()));
        }
        if self.grad_accum_steps == 0 {
            issues.push(("grad_accum_steps".into(), "must be at least 1".into()));
        }
        if self.eval_batches == 0 {
            issues.push(("eval_batches".into(), "must be at least 1".into()));
        }
        issues
    }
}

impl CheckpointConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        if self.keep_last == 0 {
            issues.push((
                "keep_last".into(),
                "must be at least 1 (the newest checkpoint is always kept)".into(),
            ));
        }
        if let Some(secs) = self.save_timeout_s
            && !switchyard_parallel::valid_timeout_s(secs)
        {
            issues.push((
                "save_timeout_s".into(),
                format!(
                    "must be in (0, {}] seconds (a week at most), got {secs}; leave it out to \
                     derive it from the checkpoint's size",
                    switchyard_parallel::MAX_TIMEOUT_S,
                ),
            ));
        }
        issues
    }
}
