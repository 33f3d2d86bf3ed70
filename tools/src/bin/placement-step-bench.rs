//! The measured training step under expert parallelism with contiguous, heuristic and ILP
//! placements, side by side: the real model of a trained checkpoint (its router decides the
//! routing), a whole `Trainer::step` (forward, loss, backward, gradient sync, optimizer,
//! routing statistics) on Tiny Shakespeare batches, on ep = 4 and 8 ranks.
//!
//! ```sh
//! switchyard train --config configs/placement-step.yaml       # once: checkpoint + statistics
//! cargo run --release -p switchyard-trainer --bin placement-step-bench -- \
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

use switchyard_comm::{LinkModel, LocalWorld};
use switchyard_parallel::Overlap;
use switchyard_placement::{Plan, RoutingStats, Strategy, Topology, plan};
use switchyard_tools::trace::{Event, replay, run_ranks};
use switchyard_trainer::config::Config;
use switchyard_trainer::data::{Corpus, build_tokenizer};
use switchyard_trainer::Trainer;

struct Args {
    config: PathBuf,
    checkpoint: PathBuf,
    stats: Option<PathBuf>,
    ranks: Vec<usize>,
    batch: Option<usize>,
    warmup: usize,
    steps: usize,
    gbps: Vec<f64>,
    latency_us: f64,
    time_limit: f64,
    mip_gap: f64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        config: PathBuf::new(),
        checkpoint: PathBuf::new(),
        stats: None,
        ranks: vec![4, 8],
        batch: None,
        warmup: 2,
        steps: 3,
        gbps: vec![1.0, 10.0, 100.0],
        latency_us: 5.0,
        time_limit: 1.0,
        mip_gap: 0.01,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let [flag, value] = pair else {
            return Err(format!("`{}` needs a value", pair[0]));
        };
        let num = |v: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("{flag}: not a number: {v}"))
        };
        let list = |v: &str| v.split(',').map(num).collect::<Result<Vec<f64>, String>>();
        match flag.as_str() {
            "--config" => a.config = value.into(),
            "--checkpoint" => a.checkpoint = value.into(),
            "--stats" => a.stats = Some(value.into()),
            "--ranks" => a.ranks = list(value)?.into_iter().map(|r| r as usize).collect(),
            "--batch" => a.batch = Some(num(value)? as usize),
            "--warmup" => a.warmup = num(value)? as usize,
            "--steps" => a.steps = (num(value)? as usize).max(1),
            "--gbps" => a.gbps = list(value)?,
            "--latency-us" => a.latency_us = num(value)?,
            "--time-limit" => a.time_limit = num(value)?,
            "--mip-gap" => a.mip_gap = num(value)?,
            other => return Err(format!("unknown flag `{other}`")),
        }
    }
    if a.config.as_os_str().is_empty() || a.checkpoint.as_os_str().is_empty() {
        return Err("--config FILE and --checkpoint DIR are required (see the docs)".into());
    }
    Ok(a)
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
    let a = parse().unwrap_or_else(|e| {
        eprintln!("placement-step-bench: {e}");
        std::process::exit(2);
    });
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
            let mut t: Vec<f64> = rounds.iter().map(|r| replay(r, link).0 * 1e3).collect();
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
