//! The measured training step under expert parallelism with contiguous, heuristic and ILP
//! placements, side by side: the real model of a trained checkpoint (its router decides the
//! routing), a whole `Trainer::step` (forward, loss, backward, gradient sync, optimizer,
//! routing statistics) on Tiny Shakespeare batches, on ep = 4 and 8 ranks.
//!
//! ```sh
//! switchyard train --config configs/placement-step.yaml       # once: checkpoint + statistics
//! cargo run --release -p switchyard-tools --bin placement-step-bench -- \
//!     --config configs/placement-step.yaml \
//!     --checkpoint runs/placement-step/checkpoints/step-00000400 \
//!     [--stats runs/placement-step/routing-stats.json] [--ranks 4,8] [--batch 64] \
//!     [--warmup 2] [--steps 3] [--gbps 1,10,100] [--latency-us 5] [--time-limit 1] [--mip-gap 0.01]
//! ```
//!
//! How it stays honest with 8 ranks on 2 shared cores: the ranks are threads of a local
//! world, each computing on one core and only while holding the process's CPU token, charged
//! its thread's CPU time; each rank's trace of compute and collectives is replayed on
//! virtual clocks with the link model (`switchyard_tools::trace`). The placements are
//! measured in one world, interleaved: each round installs every placement in turn (live
//! migration), runs one step and records the next. The step time is the slowest rank's end,
//! the median over the rounds (each step replayed on its own: the routing, so the
//! all-to-all sizes, changes from step to step); "free links" replays the same traces with
//! costless communication (compute and waiting for slower ranks only).
//!
//! The placements are planned from the routing statistics the training run recorded
//! (`routing-stats.json`, a moving average over its last steps) exactly as `train` does at a
//! rebalance, and installed with `Trainer::set_placement` (live migration).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use switchyard_comm::{LinkModel, LocalWorld};
use switchyard_parallel::Overlap;
use switchyard_placement::{Plan, RoutingStats, Strategy, Topology, plan};
use switchyard_tools::trace::{Event, replay, run_ranks};
use switchyard_trainer::Trainer;
use switchyard_trainer::config::Config;
use switchyard_trainer::data::{Corpus, build_tokenizer};

/// The measured training step of a trained checkpoint under expert parallelism with
/// contiguous, heuristic and ILP placements, side by side: ranks as threads (one core each),
/// traces replayed with the link model at each bandwidth and with free links.
#[derive(Parser)]
#[command(name = "placement-step-bench")]
struct Args {
    /// The run's YAML config (model, data, output directory).
    #[arg(long)]
    config: PathBuf,
    /// Checkpoint directory whose weights every placement starts from.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Routing statistics to plan from [default: routing-stats.json in the config's
    /// run.output_dir].
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Expert-parallel rank counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4,8")]
    ranks: Vec<usize>,
    /// Batch size (data.batch_size) instead of the config's.
    #[arg(long)]
    batch: Option<usize>,
    /// Unrecorded steps after loading the checkpoint.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Recorded rounds (at least 1; the median counts).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Link bandwidths, Gbit/s, comma-separated: one column each.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    gbps: Vec<f64>,
    /// Link latency per message, microseconds.
    #[arg(long, default_value_t = 5.0)]
    latency_us: f64,
    /// ILP wall-clock budget, seconds.
    #[arg(long, default_value_t = 1.0)]
    time_limit: f64,
    /// ILP relative gap at which a solve may stop.
    #[arg(long, default_value_t = 0.01)]
    mip_gap: f64,
}

fn load_config(a: &Args) -> Result<Config, String> {
    let text =
        std::fs::read_to_string(&a.config).map_err(|e| format!("{}: {e}", a.config.display()))?;
    let mut cfg: Config =
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", a.config.display()))?;
    if let Some(b) = a.batch {
        cfg.data.batch_size = b;
    }
    // A fixed schedule: `auto` would time chunk counts on the first steps.
    cfg.parallel.ep_overlap = Overlap::Chunks(1);
    cfg.parallel.dp = 1;
    cfg.run.threads = None;
    let issues = cfg.validate();
    if let Some((key, msg)) = issues.first() {
        return Err(format!("{}: {key}: {msg}", a.config.display()));
    }
    Ok(cfg)
}

/// The measured steps of every placement, interleaved (round after round, each placement in
/// turn, so load changes on the machine hit them alike): `[placement][round][rank]` traces.
/// Each placement is installed by live migration and gets one unrecorded step before its
/// recorded one.
fn measure(
    cfg: &Config,
    corpus: &Corpus,
    a: &Args,
    placements: &[Vec<Vec<usize>>],
) -> Result<Vec<Vec<Vec<Vec<Event>>>>, String> {
    let ranks = cfg.parallel.ep;
    let comms = LocalWorld::new(ranks, Duration::from_secs(600), None);
    let per_rank = run_ranks(
        comms,
        |world, rec| -> Result<Vec<Vec<Vec<Event>>>, String> {
            let err = |e: switchyard_trainer::TrainError| e.to_string();
            let device = cfg.device.resolve(0).map_err(|e| e.to_string())?;
            let mut t = Trainer::new_on(cfg, corpus, &device, Some(world)).map_err(err)?;
            t.init_from(&a.checkpoint).map_err(err)?;
            for _ in 0..a.warmup {
                t.step().map_err(err)?;
            }
            let mut traces = vec![Vec::new(); placements.len()];
            for _ in 0..a.steps {
                for (k, owners) in placements.iter().enumerate() {
                    t.set_placement(owners).map_err(err)?;
                    t.step().map_err(err)?;
                    rec.start();
                    let report = t.step().map_err(err);
                    traces[k].push(rec.stop());
                    report?;
                }
            }
            Ok(traces)
        },
    );
    let per_rank: Vec<Vec<Vec<Vec<Event>>>> = per_rank.into_iter().collect::<Result<_, _>>()?;
    Ok((0..placements.len())
        .map(|k| {
            (0..a.steps)
                .map(|i| per_rank.iter().map(|r| r[k][i].clone()).collect())
                .collect()
        })
        .collect())
}

fn main() {
    let mut a = Args::parse();
    a.steps = a.steps.max(1);
    let fail = |e: String| -> ! {
        eprintln!("placement-step-bench: {e}");
        std::process::exit(1)
    };
    let base = load_config(&a).unwrap_or_else(|e| fail(e));
    let stats_path = a
        .stats
        .clone()
        .unwrap_or_else(|| base.run.output_dir.join("routing-stats.json"));
    let stats = RoutingStats::load(&stats_path).unwrap_or_else(|e| fail(e.to_string()));
    let tokenizer = build_tokenizer(&base.data, &base.run.output_dir.join("tokenizer.json"))
        .unwrap_or_else(|e| fail(e.to_string()));
    let corpus = Corpus::load(&base.data, &tokenizer).unwrap_or_else(|e| fail(e.to_string()));
    let m = &base.model;
    println!(
        "checkpoint {} ({} layers, d_model {}, {} experts top-{} of ffn {}), routing statistics \
         {} ({} steps recorded); global batch {} x {} tokens; median of {} interleaved \
         rounds after {} warm-up steps; links {} us + [{}] Gbit/s",
        a.checkpoint.display(),
        m.n_layers,
        m.d_model,
        m.moe.num_experts,
        m.moe.top_k,
        m.moe.expert_ffn_dim,
        stats_path.display(),
        stats.records,
        base.data.batch_size,
        base.data.seq_len,
        a.steps,
        a.warmup,
        a.latency_us,
        a.gbps
            .iter()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for &ranks in &a.ranks {
        let mut cfg = base.clone();
        cfg.parallel.ep = ranks;
        let instance = stats
            .instance(Topology::uniform(ranks))
            .unwrap_or_else(|e| fail(e.to_string()));
        let strategies = [
            Strategy::Contiguous {},
            Strategy::Heuristic {},
            Strategy::Ilp {
                time_limit_s: a.time_limit,
                mip_gap: a.mip_gap,
                solver: Default::default(),
            },
        ];
        let plans: Vec<Plan> = strategies
            .iter()
            .map(|s| plan(&instance, s).unwrap_or_else(|e| fail(e.to_string())))
            .collect();
        eprintln!("ep={ranks}: measuring ...");
        let owners: Vec<Vec<Vec<usize>>> = plans.iter().map(|p| p.owners.clone()).collect();
        let measured = measure(&cfg, &corpus, &a, &owners).unwrap_or_else(|e| fail(e));
        // Routing (so the all-to-all sizes) changes from step to step: each measured step is
        // replayed on its own and the median counts.
        let median_ms = |rounds: &[Vec<Vec<Event>>], link: Option<LinkModel>| {
            let mut t: Vec<f64> = rounds
                .iter()
                .map(|r| replay(r, link).step() * 1e3)
                .collect();
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        };
        let rows: Vec<(Plan, Vec<f64>, f64)> = plans
            .into_iter()
            .zip(&measured)
            .map(|(p, rounds)| {
                let steps = a
                    .gbps
                    .iter()
                    .map(|&g| median_ms(rounds, Some(LinkModel::new(a.latency_us, g))))
                    .collect();
                let free = median_ms(rounds, None);
                (p, steps, free)
            })
            .collect();
        println!(
            "\nep={ranks} ({} experts per rank and layer): step ms by link (ratio to contiguous)",
            m.moe.num_experts / ranks
        );
        let head: Vec<String> = a.gbps.iter().map(|g| format!("{g} Gbit/s")).collect();
        println!(
            "| placement | load max/mean (stats) | plan s | free links | {} |",
            head.join(" | ")
        );
        println!("|---|---|---|---|{}", "---|".repeat(a.gbps.len()));
        let (base_steps, base_free) = (rows[0].1.clone(), rows[0].2);
        for (p, steps, free) in &rows {
            let cells: Vec<String> = steps
                .iter()
                .zip(&base_steps)
                .map(|(s, b)| format!("{s:.1} ({:.3})", s / b))
                .collect();
            println!(
                "| {} | {:.3} | {:.3} | {:.1} ({:.3}) | {} |",
                p.strategy,
                p.metrics.mean_load_max_over_mean,
                p.report.seconds,
                free,
                free / base_free,
                cells.join(" | ")
            );
        }
    }
}
