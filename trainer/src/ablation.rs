//! `switchyard ablate`: variants of the same size, trained on the same data for the same
//! steps, compared side by side in one run. Two studies:
//! - `routers`: vanilla top-k MoE, AdaMoE, MoE++ and RMoE: validation loss, FFN-expert
//!   FLOPs per token, and expert-layer forward throughput;
//! - `balancing`: the batch balance loss, auxiliary-loss-free balancing, sigmoid scores with
//!   it, and group-limited routing: validation loss, expert load (max/mean) over training,
//!   dropped fraction under the config's capacity, and the all-to-all traffic that would
//!   cross a node boundary at a two-node expert-parallel layout.
//!
//! With several seeds (`--seeds N`: `run.seed`, `run.seed + 1`, ...; the data order follows
//! the run seed unless `data.shuffle_seed` pins it) every variant is trained once per seed;
//! the table shows the means over the seeds and the validation loss's spread.
//!
//! Each variant's curves and a summary go to `<output_dir>/ablation-<study>.json`, with a
//! PNG plot of validation loss and expert load beside it.

use std::fmt;
use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::Device;
use serde::Serialize;
use switchyard_moe::config::{
    BalanceAnneal, BiasBalanceConfig, GroupLimitedConfig, MoeConfig, NullInit, NullNormalization,
    RouterConfig, ScoreFunction,
};
use switchyard_moe::{MoeStats, cross_entropy};
use switchyard_parallel::{Communicator, ParallelError};

use crate::config::Config;
use crate::data::Corpus;
use crate::error::TrainError;
use crate::plot::{Chart, Series, write_png};
use crate::trainer::Trainer;

/// Which comparison `ablate` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Study {
    Routers,
    Balancing,
}

impl Study {
    pub fn name(self) -> &'static str {
        match self {
            Study::Routers => "routers",
            Study::Balancing => "balancing",
        }
    }
}

impl std::str::FromStr for Study {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "routers" => Ok(Study::Routers),
            "balancing" => Ok(Study::Balancing),
            other => Err(format!(
                "unknown ablation study `{other}`; expected `routers` or `balancing`"
            )),
        }
    }
}

/// The hypothetical layout the traffic figures are measured at: 4 expert-parallel ranks,
/// 2 per node, links between nodes this many times slower than inside one.
pub const TRAFFIC_EP: usize = 4;
pub const TRAFFIC_RANKS_PER_NODE: usize = 2;
pub const INTER_NODE_SLOWDOWN: f64 = 4.0;

/// Expert-parallel all-to-all traffic of one forward over the validation batches, at
/// [`TRAFFIC_EP`] ranks in nodes of [`TRAFFIC_RANKS_PER_NODE`], contiguous placement, the
/// rows of each batch split over the ranks as the trainer splits them. Per token and MoE
/// layer.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Traffic {
    /// Rows sent to an expert on another node (Switchyard's all-to-all sends one row per
    /// kept assignment).
    pub cross_node_rows: f64,
    /// Other nodes a token's rows go to (what a hierarchical all-to-all, which sends a
    /// token once per node and fans it out inside the node, would send across nodes).
    pub cross_node_sends: f64,
    /// The busiest rank's send or receive time under the link model (a row inside a node
    /// costs 1, across nodes [`INTER_NODE_SLOWDOWN`]), summed over layers and batches.
    pub busiest_rank_time: f64,
}

/// One variant's figures: of one seed's run, or their means over the seeds.
#[derive(Debug, Clone, Serialize)]
pub struct VariantReport {
    pub name: &'static str,
    /// The run seed, or `None` for the means over several seeds.
    pub seed: Option<u64>,
    /// The variant's routing options, as config keys.
    pub router: String,
    pub valid_loss: f64,
    /// FFN-expert matmul FLOPs per token in the forward pass (routed experts only).
    pub ffn_flops_per_token: f64,
    /// Kept FFN-expert assignments per token, averaged over MoE layers.
    pub ffn_experts_per_token: f64,
    /// Tokens per second through the MoE layers' forward (router, dispatch, experts,
    /// combine, zero-computation experts), eval mode.
    pub moe_forward_tokens_per_sec: f64,
    pub train_seconds: f64,
    /// Max/mean expert load (mean over MoE layers) at every step.
    pub load_curve: Vec<f64>,
    /// Dropped fraction of the assignments (mean over MoE layers) at every step.
    pub dropped_curve: Vec<f64>,
    /// (step, validation loss) at every evaluation.
    pub valid_curve: Vec<(u64, f64)>,
    pub traffic: Traffic,
}

impl VariantReport {
    /// Mean over the last quarter of training of `curve`.
    fn late_mean(curve: &[f64]) -> f64 {
        let tail = &curve[curve.len() - curve.len().div_ceil(4).min(curve.len())..];
        tail.iter().sum::<f64>() / tail.len().max(1) as f64
    }

    pub fn late_load(&self) -> f64 {
        Self::late_mean(&self.load_curve)
    }

    pub fn mean_load(&self) -> f64 {
        self.load_curve.iter().sum::<f64>() / self.load_curve.len().max(1) as f64
    }

    pub fn mean_dropped(&self) -> f64 {
        self.dropped_curve.iter().sum::<f64>() / self.dropped_curve.len().max(1) as f64
    }
}

/// Mean and spread of one figure over the seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub mean: f64,
    /// Sample standard deviation (n - 1); 0 with one seed.
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = if values.len() > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Spread {
            mean,
            std: var.sqrt(),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// A variant's spread over the seeds.
#[derive(Debug, Clone, Serialize)]
pub struct VariantSpread {
    pub name: &'static str,
    pub valid_loss: Spread,
    /// Max/mean load over the last quarter of training.
    pub late_load: Spread,
    pub mean_dropped: Spread,
}

#[derive(Debug, Clone, Serialize)]
pub struct AblationReport {
    pub study: &'static str,
    pub steps: u64,
    /// The run seeds every variant was trained with.
    pub seeds: Vec<u64>,
    /// Per variant: its figures, means over the seeds (curves step by step).
    pub variants: Vec<VariantReport>,
    /// Per variant: the spread over the seeds.
    pub spread: Vec<VariantSpread>,
    /// Every (variant, seed) run, when there is more than one seed.
    pub runs: Vec<VariantReport>,
    /// The summary JSON and the plot, once written.
    #[serde(skip)]
    pub files: Vec<PathBuf>,
}

impl fmt::Display for AblationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = &self.variants[0];
        if self.seeds.len() == 1 {
            writeln!(
                f,
                "ablation ({}): {} optimizer steps each, same data and seed ({})",
                self.study, self.steps, self.seeds[0]
            )?;
        } else {
            writeln!(
                f,
                "ablation ({}): {} optimizer steps each, same data; means over {} seeds ({})",
                self.study,
                self.steps,
                self.seeds.len(),
                self.seeds
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
        }
        let width = self
            .variants
            .iter()
            .map(|v| v.name.len())
            .max()
            .unwrap_or(8)
            .max(8);
        if self.study == Study::Balancing.name() {
            writeln!(
                f,
                "{:<width$} {:>9} {:>10} {:>12} {:>12} {:>9} {:>12} {:>12} {:>11} {:>8}",
                "variant",
                "val loss",
                "vs first",
                "load max/mn",
                "last 25%",
                "dropped",
                "x-node rows",
                "x-node sends",
                "a2a time",
                "train s"
            )?;
            for v in &self.variants {
                writeln!(
                    f,
                    "{:<width$} {:>9.4} {:>+9.2}% {:>12.3} {:>12.3} {:>8.2}% {:>12.3} {:>12.3} {:>10.2}x {:>8.0}",
                    v.name,
                    v.valid_loss,
                    100.0 * (v.valid_loss / base.valid_loss - 1.0),
                    v.mean_load(),
                    v.late_load(),
                    100.0 * v.mean_dropped(),
                    v.traffic.cross_node_rows,
                    v.traffic.cross_node_sends,
                    v.traffic.busiest_rank_time / base.traffic.busiest_rank_time.max(1e-12),
                    v.train_seconds,
                )?;
            }
            writeln!(
                f,
                "  load max/mn: mean over training (and its last 25%) of the busiest expert's \
                 load over the mean, averaged over MoE layers; dropped: mean over training"
            )?;
            writeln!(
                f,
                "  x-node: per token and MoE layer on the validation batches, at ep={TRAFFIC_EP} \
                 in nodes of {TRAFFIC_RANKS_PER_NODE} ranks (rows crossing a node; other nodes \
                 reached); a2a time: the busiest rank, links across nodes \
                 {INTER_NODE_SLOWDOWN}x slower, against the first variant"
            )?;
        } else {
            writeln!(
                f,
                "{:<width$} {:>10} {:>10} {:>14} {:>12} {:>10} {:>14} {:>12} {:>9}",
                "variant",
                "val loss",
                "vs first",
                "FFN MFLOP/tok",
                "vs first",
                "FFN exp/tok",
                "MoE fwd tok/s",
                "vs first",
                "train s"
            )?;
            for v in &self.variants {
                writeln!(
                    f,
                    "{:<width$} {:>10.4} {:>+9.2}% {:>14.3} {:>+11.1}% {:>10.2} {:>14.0} {:>11.2}x {:>9.0}",
                    v.name,
                    v.valid_loss,
                    100.0 * (v.valid_loss / base.valid_loss - 1.0),
                    v.ffn_flops_per_token / 1e6,
                    100.0 * (v.ffn_flops_per_token / base.ffn_flops_per_token - 1.0),
                    v.ffn_experts_per_token,
                    v.moe_forward_tokens_per_sec,
                    v.moe_forward_tokens_per_sec / base.moe_forward_tokens_per_sec,
                    v.train_seconds,
                )?;
            }
        }
        if self.seeds.len() > 1 {
            writeln!(f, "validation loss over the seeds:")?;
            for (spread, v) in self.spread.iter().zip(&self.variants) {
                let runs: Vec<String> = self
                    .runs
                    .iter()
                    .filter(|r| r.name == v.name)
                    .map(|r| format!("{:.4}", r.valid_loss))
                    .collect();
                let l = spread.valid_loss;
                writeln!(
                    f,
                    "  {:<width$} {:.4} +- {:.4} (min {:.4}, max {:.4}; {})",
                    v.name,
                    l.mean,
                    l.std,
                    l.min,
                    l.max,
                    runs.join(", ")
                )?;
            }
        }
        for v in &self.variants {
            writeln!(f, "  {}: {}", v.name, v.router)?;
        }
        for file in &self.files {
            writeln!(f, "wrote {}", file.display())?;
        }
        Ok(())
    }
}

/// The routing options of a variant, as the config keys that set them.
pub fn describe(moe: &MoeConfig) -> String {
    let router = match &moe.router {
        RouterConfig::TopKSoftmax { normalize_weights } => {
            format!("router: top_k_softmax (normalize_weights: {normalize_weights})")
        }
        RouterConfig::NullExperts {
            num_null, anneal, ..
        } => {
            let anneal = anneal.map_or(String::new(), |a| {
                format!(", anneal to {} after step {}", a.loose_coef, a.after_step)
            });
            format!("router: null_experts (num_null: {num_null}{anneal})")
        }
        RouterConfig::MoePlusPlus {
            zero,
            copy,
            constant,
            tau,
            ..
        } => format!(
            "router: moe_plus_plus (zero: {zero}, copy: {copy}, constant: {constant}, tau: {tau})"
        ),
        RouterConfig::Recurrent { state_dim, .. } => {
            format!("router: recurrent (state_dim: {state_dim})")
        }
    };
    let mut parts = vec![
        router,
        format!("top_k: {}", moe.top_k),
        format!("score: {:?}", moe.score).to_lowercase(),
        format!("load_balance_coef: {}", moe.load_balance_coef),
    ];
    if moe.scaling_factor != 1.0 {
        parts.push(format!("scaling_factor: {}", moe.scaling_factor));
    }
    if let Some(b) = &moe.bias_balance {
        parts.push(format!("bias_balance: {{gamma: {}}}", b.gamma));
    }
    if let Some(g) = &moe.group_limited {
        parts.push(format!(
            "group_limited: {{groups: {}, top_groups: {}}}",
            g.groups, g.top_groups
        ));
    }
    parts.join(", ")
}

/// The variants of `study` at the size of `base` (which must use the vanilla top-k router
/// with softmax scores).
///
/// `routers`: AdaMoE with as many null experts as true ones and top-(k+1) (the paper's main
/// Mixtral setting, m = 8 / k = 3 for 8 experts top-2), tight-then-loose balancing switched
/// half way; MoE++ with 1 zero, 1 copy and 2 constant experts, tau = 0.75, top-k; RMoE with
/// a 128-dim GRU, top-k.
///
/// `balancing`: the base's batch balance loss; auxiliary-loss-free balancing (gamma 0.001,
/// no balance loss: DeepSeek-V3); the same with sigmoid scores; and with group-limited
/// routing on top, one group per node of the traffic layout, each token keeping one.
pub fn variants(base: &Config, study: Study) -> Vec<(&'static str, Config)> {
    let moe = &base.model.moe;
    let with = |edit: &dyn Fn(&mut MoeConfig)| {
        let mut cfg = base.clone();
        edit(&mut cfg.model.moe);
        cfg
    };
    match study {
        Study::Routers => vec![
            ("vanilla", base.clone()),
            (
                "adamoe",
                with(&|m| {
                    m.router = RouterConfig::NullExperts {
                        num_null: moe.num_experts,
                        normalize: NullNormalization::TrueExperts,
                        null_init: NullInit::Random,
                        anneal: Some(BalanceAnneal {
                            loose_coef: moe.load_balance_coef / 200.0,
                            after_step: base.train.steps / 2,
                        }),
                    };
                    m.top_k = moe.top_k + 1;
                }),
            ),
            (
                "moe++",
                with(&|m| {
                    m.router = RouterConfig::MoePlusPlus {
                        zero: 1,
                        copy: 1,
                        constant: 2,
                        tau: 0.75,
                        gating_residual: true,
                        normalize_weights: false,
                    }
                }),
            ),
            (
                "rmoe",
                with(&|m| {
                    m.router = RouterConfig::Recurrent {
                        state_dim: 128,
                        detach_state: false,
                        normalize_weights: true,
                    }
                }),
            ),
        ],
        Study::Balancing => {
            let aux_free = |m: &mut MoeConfig| {
                m.bias_balance = Some(BiasBalanceConfig { gamma: 1e-3 });
                m.load_balance_coef = 0.0;
            };
            let nodes = TRAFFIC_EP / TRAFFIC_RANKS_PER_NODE;
            vec![
                ("aux-loss", base.clone()),
                ("aux-free", with(&aux_free)),
                (
                    "sigmoid+aux-free",
                    with(&|m| {
                        aux_free(m);
                        m.score = ScoreFunction::Sigmoid;
                    }),
                ),
                (
                    "group-limited",
                    with(&|m| {
                        aux_free(m);
                        m.score = ScoreFunction::Sigmoid;
                        m.group_limited = Some(GroupLimitedConfig {
                            groups: nodes,
                            top_groups: 1,
                        });
                    }),
                ),
            ]
        }
    }
}

/// Checks that `base` can be the base of `study`: every variant is a valid config.
pub fn check_base(base: &Config, study: Study) -> Result<(), String> {
    let moe = &base.model.moe;
    let vanilla = matches!(moe.router, RouterConfig::TopKSoftmax { .. })
        && moe.score == ScoreFunction::Softmax
        && moe.bias_balance.is_none()
        && moe.group_limited.is_none();
    if !vanilla {
        return Err(
            "the base config must use the vanilla router (model.moe.router.type: \
             top_k_softmax, score: softmax, no bias_balance or group_limited); the variants \
             are derived from it"
                .into(),
        );
    }
    if study == Study::Balancing
        && !moe
            .num_experts
            .is_multiple_of(TRAFFIC_EP.max(TRAFFIC_EP / TRAFFIC_RANKS_PER_NODE))
    {
        return Err(format!(
            "the balancing study measures traffic at ep={TRAFFIC_EP}: model.moe.num_experts \
             ({}) must be a multiple of it",
            moe.num_experts
        ));
    }
    for (name, cfg) in variants(base, study) {
        let issues = cfg.model.validate();
        if let Some((key, msg)) = issues.first() {
            return Err(format!("variant {name}: model.{key}: {msg}"));
        }
    }
    Ok(())
}

/// Trains every variant and measures it, as one rank of `world` when the layout has more
/// than one (every rank calls `run`; the figures are the world's on every rank). Rank 0
/// writes the summary and the plot.
pub fn run(
    base: &Config,
    study: Study,
    seeds: usize,
    corpus: &Corpus,
    device: &Device,
    world: Option<Box<dyn Communicator>>,
) -> Result<AblationReport, TrainError> {
    let seeds: Vec<u64> = (0..seeds.max(1) as u64)
        .map(|i| base.run.seed + i)
        .collect();
    let mut runs = Vec::new();
    let mut logger = true;
    let seeded = seeds.iter().flat_map(|&seed| {
        variants(base, study)
            .into_iter()
            .map(move |(name, mut cfg)| {
                cfg.run.seed = seed;
                (name, seed, cfg)
            })
    });
    for (name, seed, cfg) in seeded {
        // Each variant's trainer takes a communicator of its own: a duplicate of the world.
        let variant_world = match &world {
            Some(w) => Some(
                w.split(0, w.rank() as i32)
                    .map_err(|e| ParallelError::Comm {
                        op: format!("ablation: the communicator of {name}"),
                        source: Box::new(e),
                    })?,
            ),
            None => None,
        };
        let started = std::time::Instant::now();
        let mut trainer = Trainer::new_on(&cfg, corpus, device, variant_world)?;
        logger = trainer.is_logger();
        if logger {
            tracing::info!("ablation: training {name} (seed {seed})");
        }
        let (mut load_curve, mut dropped_curve, mut valid_curve) = (vec![], vec![], vec![]);
        while trainer.counters.step < cfg.train.steps {
            trainer.step()?;
            let (load, dropped) = layer_means(&trainer.last_moe_stats);
            load_curve.push(load);
            dropped_curve.push(dropped);
            let step = trainer.counters.step;
            if cfg.train.eval_every > 0
                && step % cfg.train.eval_every == 0
                && step < cfg.train.steps
            {
                valid_curve.push((step, trainer.evaluate()?.loss));
            }
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let mut report = measure(name, &cfg, &trainer)?;
        report.seed = Some(seed);
        report.train_seconds = train_seconds;
        report.valid_curve = valid_curve;
        report
            .valid_curve
            .push((cfg.train.steps, report.valid_loss));
        (report.load_curve, report.dropped_curve) = (load_curve, dropped_curve);
        runs.push(report);
    }
    let names: Vec<&'static str> = variants(base, study).iter().map(|(n, _)| *n).collect();
    let of =
        |name: &str| -> Vec<&VariantReport> { runs.iter().filter(|r| r.name == name).collect() };
    let spread = names
        .iter()
        .map(|&name| {
            let figures = |f: &dyn Fn(&VariantReport) -> f64| {
                Spread::of(&of(name).into_iter().map(f).collect::<Vec<_>>())
            };
            VariantSpread {
                name,
                valid_loss: figures(&|r| r.valid_loss),
                late_load: figures(&VariantReport::late_load),
                mean_dropped: figures(&VariantReport::mean_dropped),
            }
        })
        .collect();
    let variants = names
        .iter()
        .map(|&name| mean_over_seeds(&of(name)))
        .collect();
    let mut report = AblationReport {
        study: study.name(),
        steps: base.train.steps,
        variants,
        spread,
        runs: if seeds.len() > 1 { runs } else { Vec::new() },
        seeds,
        files: Vec::new(),
    };
    if logger {
        report.files = write_files(base, &report)?;
    }
    Ok(report)
}

/// One variant's runs (one per seed, the same steps and evaluations) as one report: every
/// figure and every curve point the mean over the runs. One run is returned as it is.
fn mean_over_seeds(runs: &[&VariantReport]) -> VariantReport {
    let mut mean = runs[0].clone();
    if runs.len() == 1 {
        return mean;
    }
    let n = runs.len() as f64;
    let avg = |f: &dyn Fn(&VariantReport) -> f64| runs.iter().map(|r| f(r)).sum::<f64>() / n;
    let avg_curve = |f: &dyn Fn(&VariantReport) -> &Vec<f64>| -> Vec<f64> {
        (0..f(runs[0]).len())
            .map(|i| runs.iter().map(|r| f(r)[i]).sum::<f64>() / n)
            .collect()
    };
    mean.seed = None;
    mean.valid_loss = avg(&|r| r.valid_loss);
    mean.ffn_flops_per_token = avg(&|r| r.ffn_flops_per_token);
    mean.ffn_experts_per_token = avg(&|r| r.ffn_experts_per_token);
    mean.moe_forward_tokens_per_sec = avg(&|r| r.moe_forward_tokens_per_sec);
    mean.train_seconds = avg(&|r| r.train_seconds);
    mean.load_curve = avg_curve(&|r| &r.load_curve);
    mean.dropped_curve = avg_curve(&|r| &r.dropped_curve);
    for (i, point) in mean.valid_curve.iter_mut().enumerate() {
        point.1 = runs.iter().map(|r| r.valid_curve[i].1).sum::<f64>() / n;
    }
    mean.traffic = Traffic {
        cross_node_rows: avg(&|r| r.traffic.cross_node_rows),
        cross_node_sends: avg(&|r| r.traffic.cross_node_sends),
        busiest_rank_time: avg(&|r| r.traffic.busiest_rank_time),
    };
    mean
}

/// Max/mean load and dropped fraction of one step, means over the MoE layers.
fn layer_means(stats: &[(usize, MoeStats)]) -> (f64, f64) {
    let n = stats.len().max(1) as f64;
    let load = stats
        .iter()
        .map(|(_, s)| s.max_over_mean_load())
        .sum::<f64>()
        / n;
    let dropped = stats.iter().map(|(_, s)| s.dropped_fraction).sum::<f64>() / n;
    (load, dropped)
}

/// `<output_dir>/ablation-<study>.json` and `.png` (validation loss and max/mean load).
fn write_files(base: &Config, report: &AblationReport) -> Result<Vec<PathBuf>, TrainError> {
    let dir = &base.run.output_dir;
    let io = |what: &str, path: &PathBuf, e: std::io::Error| {
        TrainError::Metrics(format!("ablation: writing {what} {}: {e}", path.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| io("the directory", dir, e))?;
    let json = dir.join(format!("ablation-{}.json", report.study));
    let text = serde_json::to_string_pretty(report).expect("the report serialises");
    std::fs::write(&json, text).map_err(|e| io("the summary", &json, e))?;
    let png = dir.join(format!("ablation-{}.png", report.study));
    let series = |points: &dyn Fn(&VariantReport) -> Vec<(f64, f64)>| -> Vec<Series> {
        report
            .variants
            .iter()
            .map(|v| Series {
                label: v.name.to_string(),
                points: points(v),
            })
            .collect()
    };
    let charts = [
        Chart {
            title: "validation loss".into(),
            x_label: "step".into(),
            y_label: "loss (nats)".into(),
            series: series(&|v| v.valid_curve.iter().map(|&(s, l)| (s as f64, l)).collect()),
        },
        Chart {
            title: "expert load max/mean (mean over MoE layers, 20-step average)".into(),
            x_label: "step".into(),
            y_label: "max/mean".into(),
            series: series(&|v| smoothed(&v.load_curve, 20)),
        },
    ];
    write_png(&png, &charts).map_err(|e| io("the plot", &png, e))?;
    Ok(vec![json, png])
}

/// (step, trailing mean over `window` steps) of a per-step curve (steps from 1).
fn smoothed(curve: &[f64], window: usize) -> Vec<(f64, f64)> {
    (0..curve.len())
        .map(|i| {
            let from = (i + 1).saturating_sub(window);
            let mean = curve[from..=i].iter().sum::<f64>() / (i + 1 - from) as f64;
            ((i + 1) as f64, mean)
        })
        .collect()
}

/// Timed passes over the validation batches; the fastest MoE time is kept, because on a
/// shared machine noise only ever adds time.
const TIMED_PASSES: usize = 3;

/// Validation loss, the expert-layer figures and the traffic over the fixed validation
/// batches (each rank its rows; the sums are over the world, the MoE throughput is the
/// ranks' together).
fn measure(
    name: &'static str,
    cfg: &Config,
    trainer: &Trainer,
) -> Result<VariantReport, TrainError> {
    let model = trainer.model.valid();
    let device = trainer.device.clone().inner();
    let (mut loss_sum, mut tokens) = (0.0, 0.0);
    let (mut flops, mut ffn_per_token, mut layer_samples) = (0.0, 0.0, 0.0);
    let mut traffic = Traffic::default();
    let mut best_moe_seconds = f64::MAX;
    for pass in 0..TIMED_PASSES {
        let mut moe_seconds = 0.0;
        for batch in &trainer.valid.batches {
            let (inputs, targets) = trainer.valid_tensors(batch, &device);
            let rows = inputs.dims()[0];
            let out = model.forward(inputs);
            moe_seconds += out.moe_stats.iter().map(|(_, s)| s.seconds).sum::<f64>();
            if pass > 0 {
                continue;
            }
            let n = targets.dims().iter().product::<usize>() as f64;
            loss_sum += cross_entropy(out.logits, targets).into_scalar::<f32>() as f64 * n;
            tokens += n;
            for (_, stats) in &out.moe_stats {
                flops += stats.expert_flops as f64;
                ffn_per_token += stats.ffn_experts_per_token;
                layer_samples += 1.0;
                add_traffic(&mut traffic, stats, rows, cfg.model.moe.num_experts);
            }
        }
        best_moe_seconds = best_moe_seconds.min(moe_seconds);
    }
    let moe_layers = (layer_samples / trainer.valid.batches.len().max(1) as f64).max(1.0);
    // Tokens pass through every MoE layer: per-layer throughput is tokens * layers / time.
    let moe_tokens_per_sec = tokens * moe_layers / best_moe_seconds.max(1e-12);
    let mut figures = [
        loss_sum,
        tokens,
        flops,
        ffn_per_token,
        layer_samples,
        moe_tokens_per_sec,
        traffic.cross_node_rows,
        traffic.cross_node_sends,
        traffic.busiest_rank_time,
    ];
    if let Some(l) = &trainer.layout {
        let sums = l.sum(figures.to_vec(), "ablation: the ranks' figures")?;
        figures = sums[..].try_into().expect("the sum has as many values");
    }
    let [
        loss_sum,
        tokens,
        flops,
        ffn_per_token,
        layer_samples,
        moe_tokens_per_sec,
        rows,
        sends,
        time,
    ] = figures;
    let per = (tokens * moe_layers).max(1.0);
    Ok(VariantReport {
        name,
        seed: None,
        router: describe(&cfg.model.moe),
        valid_loss: loss_sum / tokens.max(1.0),
        ffn_flops_per_token: flops / tokens.max(1.0),
        ffn_experts_per_token: ffn_per_token / layer_samples.max(1.0),
        moe_forward_tokens_per_sec: moe_tokens_per_sec,
        train_seconds: 0.0,
        load_curve: Vec::new(),
        dropped_curve: Vec::new(),
        valid_curve: Vec::new(),
        traffic: Traffic {
            cross_node_rows: rows / per,
            cross_node_sends: sends / per,
            busiest_rank_time: time / per,
        },
    })
}

/// Adds one MoE layer's forward over `rows` rows to the traffic sums (not yet per token):
/// the rows split over [`TRAFFIC_EP`] home ranks in order, expert `e` on rank
/// `e / (experts / TRAFFIC_EP)`.
fn add_traffic(traffic: &mut Traffic, stats: &MoeStats, rows: usize, experts: usize) {
    let k = stats.top_k.max(1);
    let tokens = stats.dispatched_tk.len() / k;
    let per_row = tokens / rows.max(1);
    let experts_per_rank = (experts / TRAFFIC_EP).max(1);
    let node = |rank: usize| rank / TRAFFIC_RANKS_PER_NODE;
    let (mut sent, mut received) = (vec![0.0; TRAFFIC_EP], vec![0.0; TRAFFIC_EP]);
    for (t, choices) in stats.dispatched_tk.chunks(k).enumerate() {
        let home = (t / per_row.max(1)) * TRAFFIC_EP / rows.max(1);
        let mut nodes_reached = Vec::new();
        for &e in choices.iter().flatten() {
            let owner = e as usize / experts_per_rank;
            if owner == home {
                continue;
            }
            let cost = if node(owner) == node(home) {
                1.0
            } else {
                traffic.cross_node_rows += 1.0;
                if !nodes_reached.contains(&node(owner)) {
                    nodes_reached.push(node(owner));
                }
                INTER_NODE_SLOWDOWN
            };
            sent[home] += cost;
            received[owner] += cost;
        }
        traffic.cross_node_sends += nodes_reached.len() as f64;
    }
    let busiest = sent.iter().chain(&received).cloned().fold(0.0, f64::max);
    traffic.busiest_rank_time += busiest;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_the_mean_over_seeds() {
        let s = Spread::of(&[1.0, 2.0, 4.0]);
        assert!((s.mean - 7.0 / 3.0).abs() < 1e-12);
        // Sample variance: ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 21/9.
        assert!((s.std - (21.0f64 / 9.0).sqrt()).abs() < 1e-12, "{s:?}");
        assert_eq!((s.min, s.max), (1.0, 4.0));
        assert_eq!(Spread::of(&[3.0]).std, 0.0);

        let run = |seed: u64, loss: f64| VariantReport {
            name: "v",
            seed: Some(seed),
            router: String::new(),
            valid_loss: loss,
            ffn_flops_per_token: 10.0,
            ffn_experts_per_token: 2.0,
            moe_forward_tokens_per_sec: 100.0 * seed as f64,
            train_seconds: 1.0,
            load_curve: vec![loss, 2.0 * loss],
            dropped_curve: vec![0.0, 0.1],
            valid_curve: vec![(5, loss + 1.0), (10, loss)],
            traffic: Traffic::default(),
        };
        let (a, b) = (run(1, 1.0), run(2, 2.0));
        let mean = mean_over_seeds(&[&a, &b]);
        assert_eq!(mean.seed, None);
        assert_eq!(mean.valid_loss, 1.5);
        assert_eq!(mean.moe_forward_tokens_per_sec, 150.0);
        assert_eq!(mean.load_curve, vec![1.5, 3.0]);
        assert_eq!(mean.valid_curve, vec![(5, 2.5), (10, 1.5)]);
        assert_eq!(mean_over_seeds(&[&a]).seed, Some(1));
    }

    fn stats(dispatched: Vec<Option<u32>>, k: usize) -> MoeStats {
        MoeStats {
            dispatched_tk: dispatched,
            top_k: k,
            ..Default::default()
        }
    }

    #[test]
    fn traffic_counts_rows_and_nodes_across_the_boundary() {
        // 8 experts on 4 ranks (2 each), nodes {0, 1} and {2, 3}; 4 rows of one token,
        // row r at home rank r.
        let s = stats(
            vec![
                Some(0),
                Some(2), // home 0: expert 2 on rank 1, same node
                Some(4),
                Some(6), // home 1: ranks 2 and 3, both on the other node
                Some(4),
                None, // home 2: its own rank; a dropped assignment
                Some(0),
                Some(3), // home 3: ranks 0 and 1, the other node
            ],
            2,
        );
        let mut t = Traffic::default();
        add_traffic(&mut t, &s, 4, 8);
        assert_eq!(t.cross_node_rows, 4.0);
        assert_eq!(t.cross_node_sends, 2.0);
        // Rank 3 sends 2 rows across nodes: 2 x 4; rank 0 receives 1 inside + 1 across.
        assert_eq!(t.busiest_rank_time, 8.0);
    }

    #[test]
    fn the_balancing_variants_are_valid_and_named_by_their_keys() {
        let text = include_str!("../../configs/ablation.yaml");
        let base: Config = serde_yaml::from_str(text).expect("the shipped ablation config parses");
        check_base(&base, Study::Balancing).unwrap();
        let variants = variants(&base, Study::Balancing);
        assert_eq!(variants.len(), 4);
        let described: Vec<String> = variants
            .iter()
            .map(|(_, c)| describe(&c.model.moe))
            .collect();
        assert!(
            described[3].contains("group_limited: {groups: 2, top_groups: 1}"),
            "{described:?}"
        );
        assert!(described[2].contains("score: sigmoid"), "{described:?}");
        assert!(
            !described.iter().any(|d| d.contains("TopKSoftmax")),
            "{described:?}"
        );
    }
}
