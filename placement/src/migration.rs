//! Whether a re-plan is worth its migration: the predicted time the new placement saves per
//! step against the predicted time of moving the experts, both in seconds on the
//! `placement.migration` link and compute model.
//!
//! The time a placement decides, per step: in every MoE layer the busiest rank's routed
//! tokens (`load_max_over_mean` x the mean rank's tokens) through its experts (forward and
//! backward FLOPs at `rank_tflop_per_s`) and through the all-to-all (dispatch and combine,
//! forward and backward; the share from other ranks, at `link_gb_per_s` over the
//! topology's mean link cost). Tokens return to their rank after every layer in this
//! dispatcher, so the layer-to-layer transitions cost nothing extra. Migrating sends each
//! moved expert's weights and two AdamW moments (f32) from its old to its new owner; the
//! busiest rank's send or receive time bounds the exchange.

use serde::Serialize;

use crate::config::MigrationConfig;
use crate::evaluate::Metrics;
use crate::instance::Instance;

/// What one expert costs to run and to move.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertCost {
    /// Bytes sent per moved expert: weights and the two AdamW moments.
    pub bytes: f64,
    /// Training FLOPs of one routed token through one expert (forward and backward).
    pub flops_per_token: f64,
    /// Bytes one routed token sends through the all-to-all in a step.
    pub a2a_bytes_per_token: f64,
    /// Routed tokens of a step per token in the statistics (the statistics record one
    /// micro-batch per step).
    pub tokens_per_recorded: f64,
}

impl ExpertCost {
    /// A SwiGLU expert (`w_gate`, `w_up` [d, f], `w_down` [f, d]) trained in f32 with AdamW,
    /// over `micro_batches` micro-batches per step.
    pub fn swiglu(d_model: usize, ffn_dim: usize, micro_batches: usize) -> ExpertCost {
        let (d, f) = (d_model as f64, ffn_dim as f64);
        let params = 3.0 * d * f;
        ExpertCost {
            bytes: params * 3.0 * 4.0,
            // 2 FLOPs per multiply-add; backward twice the forward.
            flops_per_token: 3.0 * 2.0 * params,
            // Dispatch and combine, each in the forward and the backward: 4 rows of d f32.
            a2a_bytes_per_token: 4.0 * d * 4.0,
            tokens_per_recorded: micro_batches.max(1) as f64,
        }
    }
}

/// The numbers of one decision, for the log and the metrics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationDecision {
    /// Experts (over all layers) whose owner the plan changes.
    pub moved_experts: usize,
    /// Experts over all layers.
    pub total_experts: usize,
    /// Bytes sent by all ranks of one ep group together.
    pub moved_bytes: f64,
    /// Predicted time of the migration (the busiest rank's sends or receives), seconds.
    pub cost_s: f64,
    /// Predicted placement-dependent time per step (the busiest ranks' expert compute and
    /// all-to-all over the MoE layers) before and after, seconds.
    pub step_before_s: f64,
    pub step_after_s: f64,
    /// `step_before_s - step_after_s`.
    pub gain_per_step_s: f64,
    /// `cost_s / gain_per_step_s`; `None` when the plan saves nothing.
    pub payback_steps: Option<f64>,
    /// `placement.migration.payback_steps` (0: no threshold).
    pub threshold_steps: u64,
    pub migrate: bool,
}

impl MigrationDecision {
    /// The cost in units of the current predicted step time (`step_before_s`).
    pub fn cost_in_steps(&self) -> f64 {
        if self.step_before_s > 0.0 {
            self.cost_s / self.step_before_s
        } else {
            0.0
        }
    }

    /// The gain as a fraction of the current predicted step time.
    pub fn gain_fraction(&self) -> f64 {
        if self.step_before_s > 0.0 {
            self.gain_per_step_s / self.step_before_s
        } else {
            0.0
        }
    }

    /// `migrate 55 of 256 experts (12.3 MB, 1.2 ms = 0.40 steps) for 0.030 ms/step
    /// (1.2%): payback 41 steps <= 100: migrate`
    pub fn describe(&self) -> String {
        let payback = match self.payback_steps {
            Some(p) => format!("{p:.1} steps"),
            None => "never".to_string(),
        };
        let rule = if self.threshold_steps == 0 {
            "no threshold (payback_steps: 0)".to_string()
        } else {
            let cmp = if self
                .payback_steps
                .is_some_and(|p| p <= self.threshold_steps as f64)
            {
                "<="
            } else {
                ">"
            };
            format!(
                "{cmp} {} (placement.migration.payback_steps)",
                self.threshold_steps
            )
        };
        format!(
            "migration of {} of {} experts ({:.3} MB, predicted {:.3} ms = {:.3} steps of \
             {:.3} ms) for a predicted gain of {:.4} ms/step ({:.2}%, {:.3} -> {:.3} ms): \
             payback {payback} {rule}: {}",
            self.moved_experts,
            self.total_experts,
            self.moved_bytes / 1e6,
            1e3 * self.cost_s,
            self.cost_in_steps(),
            1e3 * self.step_before_s,
            1e3 * self.gain_per_step_s,
            100.0 * self.gain_fraction(),
            1e3 * self.step_before_s,
            1e3 * self.step_after_s,
            if self.migrate { "migrate" } else { "keep" }
        )
    }
}

/// The predicted placement-dependent time per step of a placement with `metrics` on
/// `instance` (see the module docs), seconds.
pub fn step_seconds(
    instance: &Instance,
    metrics: &Metrics,
    expert: &ExpertCost,
    cfg: &MigrationConfig,
) -> f64 {
    let n = instance.ranks();
    let link = cfg.link_gb_per_s * 1e9;
    let flops = cfg.rank_tflop_per_s * 1e12;
    // A token's rows come from every rank alike (rows are sharded evenly): (n-1)/n of a
    // rank's tokens cross a link, at the mean cost of the links into it.
    let links = (n * n.saturating_sub(1)) as f64;
    let mean_cost = if links > 0.0 {
        (0..n)
            .flat_map(|a| (0..n).map(move |b| (a, b)))
            .map(|(a, b)| instance.topology.cost(a, b))
            .sum::<f64>()
            / links
    } else {
        0.0
    };
    let per_token = expert.flops_per_token / flops
        + expert.a2a_bytes_per_token * mean_cost * (n as f64 - 1.0) / n as f64 / link;
    instance
        .loads
        .iter()
        .zip(&metrics.load_max_over_mean)
        .map(|(loads, max_over_mean)| {
            let mean_rank_tokens =
                loads.iter().sum::<f64>() * expert.tokens_per_recorded / n as f64;
            max_over_mean * mean_rank_tokens * per_token
        })
        .sum()
}

/// The predicted time of moving every expert whose owner differs between `before` and
/// `after` ([L][E]), seconds, with the experts moved and the bytes sent.
pub fn migration_seconds(
    instance: &Instance,
    before: &[Vec<usize>],
    after: &[Vec<usize>],
    expert: &ExpertCost,
    cfg: &MigrationConfig,
) -> (usize, f64, f64) {
    let n = instance.ranks();
    let (mut send, mut recv) = (vec![0.0; n], vec![0.0; n]);
    let mut moved = 0;
    for (old, new) in before.iter().zip(after) {
        for (&from, &to) in old.iter().zip(new) {
            if from != to {
                moved += 1;
                let time = expert.bytes * instance.topology.cost(from, to);
                send[from] += time;
                recv[to] += time;
            }
        }
    }
    let busiest = send.into_iter().chain(recv).fold(0.0, f64::max);
    (
        moved,
        moved as f64 * expert.bytes,
        busiest / (cfg.link_gb_per_s * 1e9),
    )
}

/// Weighs the plan `after` against the current `before` ([L][E] owners; `metrics` of
/// each on `instance`): migrate when it moves an expert and, unless `payback_steps` is 0,
/// saves time per step and pays its migration back within `payback_steps` steps.
pub fn decide(
    instance: &Instance,
    before: (&[Vec<usize>], &Metrics),
    after: (&[Vec<usize>], &Metrics),
    expert: &ExpertCost,
    cfg: &MigrationConfig,
) -> MigrationDecision {
    let (moved_experts, moved_bytes, cost_s) =
        migration_seconds(instance, before.0, after.0, expert, cfg);
    let step_before_s = step_seconds(instance, before.1, expert, cfg);
    let step_after_s = step_seconds(instance, after.1, expert, cfg);
    let gain_per_step_s = step_before_s - step_after_s;
    let payback_steps = (gain_per_step_s > 0.0).then(|| cost_s / gain_per_step_s);
    let migrate = moved_experts > 0
        && (cfg.payback_steps == 0 || payback_steps.is_some_and(|p| p <= cfg.payback_steps as f64));
    MigrationDecision {
        moved_experts,
        total_experts: instance.layers() * instance.experts(),
        moved_bytes,
        cost_s,
        step_before_s,
        step_after_s,
        gain_per_step_s,
        payback_steps,
        threshold_steps: cfg.payback_steps,
        migrate,
    }
}
