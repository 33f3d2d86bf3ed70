//! The subcommands. Each loads what it needs and hands components their config nodes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use switchyard_trainer::checkpoint::{self, resume_target};
use switchyard_trainer::config::Config;
use switchyard_trainer::data::{Corpus, InputFormat, Tokenizer, build_tokenizer, prepare_data};
use switchyard_trainer::{ablation, bench as bench_impl, train as train_impl};

use crate::config::loader::resolved_yaml;

/// Thread count for tensor kernels: rayon's global pool, set once per process.
fn setup_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("configuring the tensor thread pool (run.threads)")?;
    }
    Ok(())
}

fn checkpoint_root(cfg: &Config) -> PathBuf {
    cfg.checkpoint
        .dir
        .clone()
        .unwrap_or_else(|| cfg.run.output_dir.join("checkpoints"))
}

/// Tokenizer and corpus for a run; a trained BPE is kept in the run directory for reuse.
fn load_data(cfg: &Config) -> Result<Corpus> {
    let tokenizer = build_tokenizer(&cfg.data, &cfg.run.output_dir.join("tokenizer.json"))?;
    if tokenizer.vocab_size() > cfg.model.vocab_size {
        bail!(
            "the tokenizer has {} tokens but model.vocab_size is {}; set model.vocab_size: {}",
            tokenizer.vocab_size(),
            cfg.model.vocab_size,
            tokenizer.vocab_size()
        );
    }
    Ok(Corpus::load(&cfg.data, &tokenizer)?)
}

pub fn train(cfg: &Config, resume: Option<&str>, init_from: Option<&Path>) -> Result<()> {
    setup_threads(cfg.run.threads)?;
    let out = &cfg.run.output_dir;
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating run.output_dir {}", out.display()))?;
    let resolved = resolved_yaml(cfg);
    std::fs::write(out.join("config.yaml"), &resolved)
        .with_context(|| format!("writing {}", out.join("config.yaml").display()))?;
    let corpus = load_data(cfg)?;
    let resume_path = match resume {
        Some(spec) => resume_target(&checkpoint_root(cfg), spec)?,
        None => None,
    };
    if resume == Some("auto") && resume_path.is_none() {
        tracing::info!("--resume auto: no complete checkpoint yet, starting fresh");
    }
    let device = Device::flex().autodiff();
    let start = match (&resume_path, init_from) {
        (Some(path), _) => train_impl::Start::Resume(path),
        (None, Some(path)) => train_impl::Start::InitFrom(path),
        (None, None) => train_impl::Start::Fresh,
    };
    let summary = train_impl::run(
        cfg,
        &corpus,
        start,
        &device,
        serde_json::to_value(cfg).expect("config serialises"),
    )?;
    if let Some(eval) = summary {
        println!(
            "final: step {} valid loss {:.4} perplexity {:.3}",
            cfg.train.steps, eval.loss, eval.perplexity
        );
    }
    Ok(())
}

pub fn eval(cfg: &Config, checkpoint: &str) -> Result<()> {
    setup_threads(cfg.run.threads)?;
    let corpus = load_data(cfg)?;
    let device = Device::flex().autodiff();
    let mut trainer = train_impl::Trainer::new(cfg, &corpus, &device)?;
    match resume_target(&checkpoint_root(cfg), checkpoint)? {
        Some(path) => {
            trainer.restore(&path)?;
            println!(
                "checkpoint: {} (step {})",
                path.display(),
                trainer.state_step
            );
        }
        None => println!(
            "no checkpoint under {}: evaluating freshly initialised weights",
            checkpoint_root(cfg).display()
        ),
    }
    let report = trainer.evaluate();
    println!(
        "valid loss {:.4} nats/token, perplexity {:.3} over {} tokens",
        report.loss, report.perplexity, report.tokens
    );
    Ok(())
}

pub fn prepare(
    inputs: &[PathBuf],
    format: &str,
    text_key: &str,
    tokenizer: &str,
    output: &Path,
) -> Result<()> {
    let format = match format {
        "text" => InputFormat::Text,
        "jsonl" => InputFormat::Jsonl {
            text_key: text_key.to_string(),
        },
        other => bail!("--format {other}: expected `text` or `jsonl`"),
    };
    let tokenizer = if tokenizer == "byte" {
        Tokenizer::Byte
    } else {
        Tokenizer::from_hf_file(Path::new(tokenizer), None)?
    };
    let report = prepare_data(inputs, format, &tokenizer, output)?;
    println!("{report}");
    Ok(())
}

pub fn inspect(path: &Path) -> Result<()> {
    let report = checkpoint::inspect(path)?;
    println!("{report}");
    if !report.all_ok() {
        bail!(
            "{}: checksum verification failed (see above)",
            path.display()
        );
    }
    Ok(())
}

pub fn bench(cfg: &Config, steps: u64, warmup: u64) -> Result<()> {
    setup_threads(cfg.run.threads)?;
    let corpus = load_data(cfg)?;
    let report = bench_impl::run(cfg, &corpus, steps, warmup)?;
    println!("{report}");
    Ok(())
}

pub fn ablate(cfg: &Config) -> Result<()> {
    if !matches!(
        cfg.model.moe.router,
        switchyard_moe::RouterConfig::TopKSoftmax { .. }
    ) {
        bail!(
            "ablate: the base config must use the vanilla router (model.moe.router.type: top_k_softmax); the variants are derived from it"
        );
    }
    setup_threads(cfg.run.threads)?;
    let corpus = load_data(cfg)?;
    let report = ablation::run(cfg, &corpus, &Device::flex().autodiff())?;
    println!("{report}");
    Ok(())
}

/// `record-routing`: train in one process and save the moving-average routing statistics.
pub fn record_routing(
    cfg: &Config,
    config_path: &Path,
    steps: Option<u64>,
    decay: f64,
    out: &Path,
) -> Result<()> {
    use switchyard_placement::{BatchCounts, RoutingStats};
    setup_threads(cfg.run.threads)?;
    let mut cfg = cfg.clone();
    if let Some(steps) = steps {
        cfg.train.steps = steps;
    }
    let corpus = load_data(&cfg)?;
    let device = Device::flex().autodiff();
    let mut trainer = train_impl::Trainer::new(&cfg, &corpus, &device)?;
    let mut stats = RoutingStats::new(decay)?;
    stats.source = format!(
        "switchyard record-routing --config {} --steps {} --decay {decay}",
        config_path.display(),
        cfg.train.steps
    );
    let started = std::time::Instant::now();
    let mut loss = f64::NAN;
    while trainer.state_step < cfg.train.steps {
        let report = trainer.step()?;
        loss = report.loss;
        stats.record(&BatchCounts::from_moe_stats(&trainer.last_moe_stats)?)?;
        if report.step % 50 == 0 || report.step == cfg.train.steps {
            tracing::info!(step = report.step, loss, "recording routing");
        }
    }
    stats.save(out)?;
    println!(
        "recorded {} steps ({:.0} s, last loss {loss:.4}) of {} MoE layers x {} experts to {}",
        stats.records,
        started.elapsed().as_secs_f64(),
        stats.moe_layers.len(),
        stats.num_experts,
        out.display()
    );
    for (layer, tokens) in stats.moe_layers.iter().zip(&stats.tokens) {
        let total: f64 = tokens.iter().sum();
        let max = tokens.iter().cloned().fold(0.0, f64::max);
        println!(
            "  layer {layer}: hottest expert {:.2}x the mean",
            max * tokens.len() as f64 / total.max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}

pub struct PlanPlacementOptions {
    pub stats: PathBuf,
    pub ranks: usize,
    pub strategy: Option<String>,
    pub time_limit: f64,
    pub mip_gap: f64,
    pub solver: String,
    pub ranks_per_node: Option<usize>,
    pub inter_node_slowdown: f64,
    pub out: Option<PathBuf>,
}

/// `plan-placement`: every strategy (or one) on recorded statistics, side by side.
pub fn plan_placement(opts: &PlanPlacementOptions) -> Result<()> {
    use switchyard_placement::{IlpSolver, RoutingStats, Strategy, Topology, plan};
    let stats = RoutingStats::load(&opts.stats)?;
    let topology = match opts.ranks_per_node {
        Some(per_node) => Topology::two_level(opts.ranks, per_node, opts.inter_node_slowdown)?,
        None => Topology::uniform(opts.ranks),
    };
    let instance = stats.instance(topology)?;
    let solver = match opts.solver.as_str() {
        "microlp" => IlpSolver::Microlp,
        "highs" => IlpSolver::Highs,
        other => bail!("--solver {other}: expected `microlp` or `highs`"),
    };
    if !(opts.time_limit.is_finite() && opts.time_limit >= 0.0) {
        bail!("--time-limit {}: expected seconds >= 0", opts.time_limit);
    }
    if !(0.0..1.0).contains(&opts.mip_gap) {
        bail!(
            "--mip-gap {}: expected a relative gap in [0, 1)",
            opts.mip_gap
        );
    }
    let ilp = Strategy::Ilp {
        time_limit_s: opts.time_limit,
        mip_gap: opts.mip_gap,
        solver,
    };
    let strategies = match opts.strategy.as_deref() {
        None => vec![Strategy::Contiguous {}, Strategy::Heuristic {}, ilp],
        Some("contiguous") => vec![Strategy::Contiguous {}],
        Some("heuristic") => vec![Strategy::Heuristic {}],
        Some("ilp") => vec![ilp],
        Some(other) => bail!("--strategy {other}: expected `contiguous`, `heuristic` or `ilp`"),
    };
    println!(
        "routing statistics: {} ({} MoE layers x {} experts, {} steps recorded)",
        opts.stats.display(),
        instance.layers(),
        instance.experts(),
        stats.records
    );
    match opts.ranks_per_node {
        Some(k) => println!(
            "{} ranks, {k} per node, inter-node links {}x slower",
            opts.ranks, opts.inter_node_slowdown
        ),
        None => println!("{} ranks, all links equal", opts.ranks),
    }
    println!(
        "lower bound on load max/mean (mean over layers): {:.4}\n",
        switchyard_placement::plan::load_bound(&instance)
    );
    println!(
        "{:<11} {:>14} {:>11} {:>16} {:>15} {:>9}",
        "strategy",
        "load max/mean",
        "worst layer",
        "cross-rank trans",
        "busiest traffic",
        "solve s"
    );
    let mut plans = Vec::new();
    for strategy in &strategies {
        let plan = plan(&instance, strategy)?;
        let m = &plan.metrics;
        println!(
            "{:<11} {:>14.4} {:>11.4} {:>16.4} {:>15.4} {:>9.3}",
            plan.strategy,
            m.mean_load_max_over_mean,
            m.worst_load_max_over_mean,
            m.cross_rank_fraction,
            m.mean_boundary_traffic,
            plan.report.seconds
        );
        plans.push(plan);
    }
    for plan in &plans {
        let stages = [
            ("stage 1 (load balance, max/mean)", &plan.report.stage1),
            ("stage 2 (busiest-rank traffic)", &plan.report.stage2),
        ];
        for (name, stage) in stages {
            let Some(s) = stage else { continue };
            let proven = s
                .solves
                .iter()
                .filter(|x| {
                    matches!(
                        x.outcome,
                        switchyard_placement::ilp::Outcome::Optimal
                            | switchyard_placement::ilp::Outcome::StartProven
                    )
                })
                .count();
            println!(
                "{} {name}: objective {:.4} (heuristic {:.4}), bound {:.4}, gap {:.2}%, {:?}, \
                 {proven}/{} solves proven, {:.3} s",
                plan.strategy,
                s.objective,
                s.start_objective,
                s.bound,
                100.0 * s.gap,
                s.status,
                s.solves.len(),
                s.seconds
            );
        }
    }
    for plan in &plans {
        let per_layer: Vec<String> = plan
            .metrics
            .load_max_over_mean
            .iter()
            .map(|x| format!("{x:.3}"))
            .collect();
        println!(
            "{} load max/mean per layer: {}",
            plan.strategy,
            per_layer.join(" ")
        );
    }
    if let Some(out) = &opts.out {
        let json = serde_json::to_string_pretty(&plans)?;
        std::fs::write(out, json).with_context(|| format!("writing {}", out.display()))?;
        println!("plans written to {}", out.display());
    }
    Ok(())
}
