//! `switchyard`: the command-line entry point. Parses argv, loads and validates the config
//! (exit code 2 on any config error), sets up logging and threads, and hands each component
//! its node.

mod commands;
mod config;
mod config_change;
mod launcher_env;
mod logging;
mod run_dir;
mod slurm_script;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use switchyard_trainer::config::Config;
use switchyard_trainer::memory;

use crate::config::loader::{ConfigError, load_config_checked};

/// Freed large buffers are kept for the next step instead of going back to the OS (see
/// `switchyard_kernels::alloc`: the kernel re-zeroing them cost a quarter of a CPU step).
#[global_allocator]
static ALLOC: switchyard_kernels::alloc::ReuseLarge = switchyard_kernels::alloc::ReuseLarge::new();

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Distributed Mixture-of-Experts training"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ConfigArgs {
    /// YAML config file.
    #[arg(long)]
    config: PathBuf,
    /// Override a config value: `--set optim.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    overrides: Vec<String>,
}

/// `export-hf --format`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum HfFormatArg {
    /// MixtralForCausalLM.
    Mixtral,
    /// Qwen2MoeForCausalLM (gated shared expert, q/k/v biases, dense layers).
    #[value(name = "qwen2_moe")]
    Qwen2Moe,
    /// Qwen3MoeForCausalLM (per-head q/k norms, dense layers).
    #[value(name = "qwen3_moe")]
    Qwen3Moe,
}

/// `import-hf --upcycle-split`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum UpcycleSplitArg {
    /// Every expert a copy of the dense MLP, behind a freshly drawn router.
    Copy,
    /// Expert x keeps the x-th 1/N slice of the MLP's hidden units, behind a zero router.
    Partition,
}

/// `export-hf --dtype`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum HfDtypeArg {
    Fp32,
    Bf16,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model.
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Resume: `auto` (newest complete checkpoint, if any) or a checkpoint directory.
        #[arg(long, conflicts_with = "init_from")]
        resume: Option<String>,
        /// Start from another run's weights only (fresh optimizer, data and step); a vanilla
        /// router fills a null-expert router (AdaMoE conversion).
        #[arg(long)]
        init_from: Option<PathBuf>,
        /// When run.output_dir (or checkpoint.dir) holds a previous run: rename it to
        /// `<dir>.previous-<time>` (nothing is deleted) and start fresh.
        #[arg(long, conflicts_with = "resume")]
        start_over: bool,
        /// With --resume: continue even though the config changes what the checkpoint was
        /// trained with in a way that changes the trajectory (schedule, model, optimizer,
        /// data, seed, precision); every difference is still listed in the log.
        #[arg(long, requires = "resume")]
        allow_config_change: bool,
    },
    /// Validation loss and perplexity of a checkpoint (or of fresh weights).
    Eval {
        #[command(flatten)]
        config: ConfigArgs,
        /// `auto` (newest complete checkpoint) or a checkpoint directory.
        #[arg(long, default_value = "auto")]
        checkpoint: String,
        /// Also write the evaluated token windows as an int64 `.npy` array [N, seq_len + 1]
        /// (inputs, then the next-token targets), to check the loss elsewhere (a blend's
        /// loss is the weighted mean of its sources' means, not the mean over the windows).
        #[arg(long)]
        tokens_out: Option<PathBuf>,
    },
    /// Generate text from a checkpoint (its config and the run's tokenizer come with it),
    /// streaming tokens to stdout; deterministic at a seed.
    Generate {
        /// A checkpoint directory (`.../checkpoints/step-N`), or a checkpoints directory
        /// (its newest complete checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        /// The text to continue.
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// 0: greedy decoding.
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// Sample only among the K most likely tokens.
        #[arg(long)]
        top_k: Option<usize>,
        /// Sample only among the most likely tokens whose probability reaches P.
        #[arg(long)]
        top_p: Option<f64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Recompute the whole sequence at every step instead of keeping a key/value cache
        /// (the same result, slower: a check of the cache).
        #[arg(long)]
        no_kv_cache: bool,
        /// Also write the logits of the prompt's positions, [P, V] f32, as a NumPy `.npy`
        /// file (for checks against other implementations).
        #[arg(long)]
        logits_out: Option<PathBuf>,
    },
    /// Write a checkpoint (saved at any layout) as a Hugging Face model directory that
    /// `transformers` loads: config, sharded safetensors, tokenizer, generation config.
    ExportHf {
        /// A checkpoint directory, or a checkpoints directory (its newest).
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, value_enum)]
        format: HfFormatArg,
        /// A new (absent or empty) directory.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = HfDtypeArg::Fp32)]
        dtype: HfDtypeArg,
        /// Largest shard, MiB.
        #[arg(long, default_value_t = 2048)]
        shard_size_mib: usize,
    },
    /// Import a Hugging Face Mixtral, Qwen2-MoE or Qwen3-MoE model (safetensors: sharded or
    /// not; f32, bf16 or f16)
    /// as a Switchyard checkpoint, with the config it implies and its tokenizer.
    ImportHf {
        /// The Hugging Face model directory (config.json, safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// A new (absent or empty) directory.
        #[arg(long)]
        out: PathBuf,
        /// Upcycle a dense Llama model into an MoE of N experts made from its MLP (Sparse
        /// Upcycling; see --upcycle-split).
        #[arg(long, requires = "upcycle_top_k")]
        upcycle_experts: Option<usize>,
        /// Experts per token of the upcycled MoE.
        #[arg(long, requires = "upcycle_experts")]
        upcycle_top_k: Option<usize>,
        /// Gaussian noise (std) added to each expert copy; 0 keeps exact copies.
        #[arg(long, default_value_t = 0.0, requires = "upcycle_experts")]
        upcycle_noise: f64,
        /// Seed of the router draw and the noise.
        #[arg(long, default_value_t = 0, requires = "upcycle_experts")]
        upcycle_seed: u64,
        /// How the dense MLP becomes experts.
        #[arg(long, value_enum, default_value_t = UpcycleSplitArg::Copy, requires = "upcycle_experts")]
        upcycle_split: UpcycleSplitArg,
    },
    /// Tokenize text, JSONL or Parquet files (plain, gzip or zstd) into a Megatron-LM indexed
    /// dataset (PREFIX.bin/.idx), an end-of-document token after each document.
    PrepareData(PrepareArgs),
    /// Load and validate a config, print the resolved tree.
    ValidateConfig {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print the memory one rank of the config's layout needs: weights, gradients,
    /// optimizer state, activations (per layer and per micro-batch, with and without
    /// recomputation), communication buffers and the peak, against this machine's memory.
    EstimateMemory {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print a checkpoint's contents and verify its checksums.
    InspectCheckpoint {
        /// Checkpoint directory (`.../step-00000100`).
        path: PathBuf,
    },
    /// Train vanilla top-k MoE, AdaMoE, MoE++ and RMoE of the same size on the same data and
    /// compare validation loss, FFN-expert FLOPs per token and MoE-layer throughput.
    Ablate {
        #[command(flatten)]
        config: ConfigArgs,
        /// `routers` (vanilla top-k, AdaMoE, MoE++, RMoE) or `balancing` (batch balance
        /// loss, auxiliary-loss-free, sigmoid + auxiliary-loss-free, group-limited).
        #[arg(long, default_value = "routers")]
        study: switchyard_trainer::ablation::Study,
        /// Train every variant with this many seeds (`run.seed`, `run.seed + 1`, ...) and
        /// report the means and the validation loss's spread.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
        seeds: u64,
    },
    /// Write an sbatch script that trains CONFIG with preemption signalling and requeue.
    SlurmScript(slurm_script::SlurmScriptArgs),
    /// Print the version and the cargo features this binary was built with (`features: mpi
    /// ...`; `slurm-script` reads it to check a --binary).
    BuildInfo,
    /// Train for a fixed number of steps and report tokens/s and FLOP/s against the
    /// machine's measured peak.
    Bench {
        #[command(flatten)]
        config: ConfigArgs,
        /// Timed optimizer steps.
        #[arg(long, default_value_t = 10)]
        steps: u64,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        /// Also time steps with the fused CPU paths switched off (all, then each alone),
        /// interleaved with steps that have them on.
        #[arg(long)]
        compare: bool,
    },
    /// Train at the config's layout and save routing statistics (tokens per expert,
    /// layer-to-layer transitions, summed over the ranks; a moving average) for
    /// `plan-placement`. No checkpoints or metrics.
    RecordRouting {
        #[command(flatten)]
        config: ConfigArgs,
        /// Optimizer steps (default: train.steps).
        #[arg(long)]
        steps: Option<u64>,
        /// Moving-average decay per step, in [0, 1).
        #[arg(long, default_value_t = 0.99)]
        decay: f64,
        /// Output JSON file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Plan expert placement from routing statistics: predicted per-rank load and
    /// cross-rank traffic of each strategy, solve time, and the ILP's objective, bound, gap.
    PlanPlacement(PlanPlacementArgs),
}

#[derive(clap::Args)]
struct PlanPlacementArgs {
    /// Routing statistics written by `record-routing` (or the trainer).
    #[arg(long)]
    stats: PathBuf,
    /// Expert-parallel ranks (must divide the number of experts).
    #[arg(long)]
    ranks: usize,
    /// `contiguous`, `heuristic` or `ilp`; default: all three, side by side.
    #[arg(long)]
    strategy: Option<String>,
    /// ILP wall-clock budget, seconds (both stages).
    #[arg(long, default_value_t = 1.0)]
    time_limit: f64,
    /// ILP relative gap at which a solve may stop (0 = prove optimality).
    #[arg(long, default_value_t = 0.01)]
    mip_gap: f64,
    /// ILP solver: `microlp`, or `highs` (built with the `highs` feature).
    #[arg(long, default_value = "microlp")]
    solver: String,
    /// Ranks per node; links between nodes are `--inter-node-slowdown` times slower
    /// (default: one node, all links equal).
    #[arg(long)]
    ranks_per_node: Option<usize>,
    #[arg(long, default_value_t = 9.0)]
    inter_node_slowdown: f64,
    /// Write the plans (owner vectors per layer, metrics, reports) as JSON; with one
    /// --strategy, the file `placement.plan` starts a run from.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// Input files: text (one document per file), JSON Lines (one per line) or Parquet (one
    /// per row); plain, gzip or zstd.
    #[arg(long = "input", required = true)]
    inputs: Vec<PathBuf>,
    /// `auto` (each file's from its name: .jsonl / .json / .ndjson, .parquet, else text;
    /// after a .gz / .zst suffix), `text`, `jsonl` or `parquet`.
    #[arg(long, default_value = "auto")]
    format: String,
    /// JSONL field or Parquet column holding the text.
    #[arg(long, default_value = "text")]
    text_key: String,
    /// `byte`, or the path of a Hugging Face tokenizer.json.
    #[arg(long, default_value = "byte")]
    tokenizer: String,
    /// The end-of-document token appended after every document [default: the byte
    /// tokenizer's 0xFF; a tokenizer.json's eos_token from the tokenizer_config.json beside
    /// it, else its special token <|endoftext|>, <|end_of_text|>, </s>, <eos> or <|eos|>].
    #[arg(long, conflicts_with = "no_eod")]
    eod_token: Option<String>,
    /// Append nothing between documents (Megatron's default without --append-eod).
    #[arg(long)]
    no_eod: bool,
    /// Tokenizer threads [default: one per core].
    #[arg(long)]
    workers: Option<usize>,
    /// Output prefix: writes PREFIX.bin and PREFIX.idx.
    #[arg(long)]
    output: PathBuf,
}

fn main() -> ExitCode {
    logging::init();
    let cli = Cli::parse();
    switchyard_trainer::quiet_seam_failures();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(config_err) = err.downcast_ref::<ConfigError>() {
                eprintln!("error: invalid config\n{config_err}");
                return ExitCode::from(config_err.exit_code() as u8);
            }
            // A model the chosen Hugging Face format cannot hold (or the reverse): a usage
            // error like a bad config, not a failure of the run.
            if matches!(
                err.downcast_ref::<switchyard_trainer::hf::ExportError>(),
                Some(switchyard_trainer::hf::ExportError::Unsupported { .. })
            ) || matches!(
                err.downcast_ref::<switchyard_trainer::hf::ImportError>(),
                Some(switchyard_trainer::hf::ImportError::Unsupported { .. })
            ) {
                eprintln!("error: {}", error_chain(&err));
                return ExitCode::from(2);
            }
            if let Some(refused) = err.downcast_ref::<config_change::ConfigChangeRefused>() {
                eprintln!("error: {refused}");
                return ExitCode::from(2);
            }
            if let Some(preempted) = err.downcast_ref::<commands::Preempted>() {
                eprintln!("{preempted}");
                return ExitCode::from(switchyard_trainer::EXIT_PREEMPTED);
            }
            eprintln!("error: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// The cargo features of this binary that change what it can run.
pub(crate) fn built_features() -> Vec<&'static str> {
    [
        ("mpi", cfg!(feature = "mpi")),
        ("cuda", cfg!(feature = "cuda")),
        ("nccl", cfg!(feature = "nccl")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect()
}

/// The error and its causes, each said once: a cause whose text its parent already shows
/// (errors that format their source) is not repeated.
fn error_chain(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let line = cause.to_string();
        if text.is_empty() {
            text = line;
        } else if !text.contains(&line) {
            text = format!("{text}: {line}");
        }
    }
    text
}

/// Loads, deserializes and validates the config; any problem is a `ConfigError` (exit 2).
/// A config that cannot fit in this machine's memory is one too
/// (`switchyard_trainer::memory`), checked once the config itself is valid.
fn load(args: &ConfigArgs) -> Result<Config> {
    load_with(args, true)
}

/// [`load`]; `check_memory: false` leaves out the memory refusal (for `estimate-memory`,
/// which reports the estimate whatever it is).
fn load_with(args: &ConfigArgs, check_memory: bool) -> Result<Config> {
    // Relative input paths written in the file are relative to the file; those given with
    // `--set`, like any command-line path, to the working directory. Output paths
    // (run.output_dir, checkpoint.dir) stay relative to the working directory.
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let config_dir = cwd.join(args.config.parent().unwrap_or(Path::new("")));
    let cfg: Config =
        load_config_checked(&args.config, &args.overrides, |cfg: &mut Config, set| {
            cfg.data.resolve_paths(|key| {
                if set(&format!("data.{key}")) {
                    &cwd
                } else {
                    &config_dir
                }
            });
            if let Some(plan) = &mut cfg.placement.plan
                && plan.is_relative()
            {
                let base = if set("placement.plan") {
                    &cwd
                } else {
                    &config_dir
                };
                *plan = switchyard_trainer::data::normalize(&base.join(&*plan));
            }
            let mut issues = cfg.validate();
            issues.extend(
                cfg.data
                    .check_paths()
                    .into_iter()
                    .map(|(path, msg)| (format!("data.{path}"), msg)),
            );
            if issues.is_empty() {
                issues.extend(cfg.tokenizer_issues());
                issues.extend(cfg.placement_plan_issues());
            }
            if issues.is_empty()
                && check_memory
                && let Some((available, source)) = memory::available_memory()
            {
                let ranks = commands::ranks_in_process(cfg);
                issues.extend(memory::memory_issue(cfg, ranks, available, source));
            }
            issues
        })?;
    Ok(cfg)
}

/// How this process was started (mpirun, srun, or alone), for the commands that run at the
/// config's layout.
fn launch() -> Result<launcher_env::LaunchInfo> {
    let launch = launcher_env::LaunchInfo::from_process_env()?;
    tracing::info!("launch: {launch}");
    Ok(launch)
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Train {
            config,
            resume,
            init_from,
            start_over,
            allow_config_change,
        } => {
            // First: a stop signal from now on is handled (see `install_stop_handlers`).
            let stop = commands::install_stop_handlers()?;
            let cfg = load(&config)?;
            commands::train(
                &cfg,
                &launch()?,
                &commands::Start {
                    resume: resume.as_deref(),
                    init_from: init_from.as_deref(),
                    start_over,
                    allow_config_change,
                },
                stop,
            )
        }
        Command::Eval {
            config,
            checkpoint,
            tokens_out,
        } => {
            let cfg = load(&config)?;
            commands::eval(&cfg, &launch()?, &checkpoint, tokens_out.as_deref())
        }
        Command::Generate {
            checkpoint,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            no_kv_cache,
            logits_out,
        } => commands::generate(
            &checkpoint,
            &prompt,
            max_new_tokens,
            &switchyard_trainer::generate::Sampling {
                temperature,
                top_k,
                top_p,
                seed,
            },
            !no_kv_cache,
            logits_out.as_deref(),
        ),
        Command::ExportHf {
            checkpoint,
            format,
            out,
            dtype,
            shard_size_mib,
        } => commands::export_hf(
            &checkpoint,
            match format {
                HfFormatArg::Mixtral => switchyard_trainer::hf::HfFormat::Mixtral,
                HfFormatArg::Qwen2Moe => switchyard_trainer::hf::HfFormat::Qwen2Moe,
                HfFormatArg::Qwen3Moe => switchyard_trainer::hf::HfFormat::Qwen3Moe,
            },
            match dtype {
                HfDtypeArg::Fp32 => switchyard_trainer::hf::HfDtype::F32,
                HfDtypeArg::Bf16 => switchyard_trainer::hf::HfDtype::Bf16,
            },
            &out,
            shard_size_mib,
        ),
        Command::ImportHf {
            model,
            out,
            upcycle_experts,
            upcycle_top_k,
            upcycle_noise,
            upcycle_seed,
            upcycle_split,
        } => {
            let upcycle = upcycle_experts
                .zip(upcycle_top_k)
                .map(|(num_experts, top_k)| switchyard_trainer::hf::Upcycle {
                    num_experts,
                    top_k,
                    noise_std: upcycle_noise,
                    seed: upcycle_seed,
                    split: match upcycle_split {
                        UpcycleSplitArg::Copy => switchyard_trainer::hf::UpcycleSplit::Copy,
                        UpcycleSplitArg::Partition => {
                            switchyard_trainer::hf::UpcycleSplit::Partition
                        }
                    },
                });
            commands::import_hf(&model, &out, upcycle.as_ref())
        }
        Command::PrepareData(args) => commands::prepare(&commands::PrepareRequest {
            inputs: args.inputs,
            format: args.format,
            text_key: args.text_key,
            tokenizer: args.tokenizer,
            eod: match (args.no_eod, args.eod_token) {
                (true, _) => commands::EodChoice::None,
                (false, Some(token)) => commands::EodChoice::Named(token),
                (false, None) => commands::EodChoice::Default,
            },
            workers: args.workers,
            output: args.output,
        }),
        Command::ValidateConfig { config } => {
            let cfg = load(&config)?;
            print!("{}", config::loader::resolved_yaml(&cfg));
            eprintln!("{}: OK", config.config.display());
            Ok(())
        }
        Command::EstimateMemory { config } => {
            let cfg = load_with(&config, false)?;
            commands::estimate_memory(&cfg)
        }
        Command::InspectCheckpoint { path } => commands::inspect(&path),
        Command::BuildInfo => {
            println!("switchyard {}", env!("CARGO_PKG_VERSION"));
            println!("features: {}", built_features().join(" "));
            Ok(())
        }
        Command::Ablate {
            config,
            study,
            seeds,
        } => {
            let cfg = load(&config)?;
            commands::ablate(&cfg, study, seeds as usize, &launch()?)
        }
        Command::SlurmScript(args) => {
            let cfg = load(&args.config)?;
            let path = slurm_script::write(&args, &cfg)?;
            println!(
                "wrote {}\nsubmit it with: sbatch {}",
                path.display(),
                path.display()
            );
            Ok(())
        }
        Command::Bench {
            config,
            steps,
            warmup,
            compare,
        } => {
            let cfg = load(&config)?;
            commands::bench(
                &cfg,
                &launch()?,
                &switchyard_trainer::bench::BenchOptions {
                    steps,
                    warmup,
                    compare,
                },
            )
        }
        Command::RecordRouting {
            config,
            steps,
            decay,
            out,
        } => {
            let cfg = load(&config)?;
            commands::record_routing(&cfg, &launch()?, &config.config, steps, decay, &out)
        }
        Command::PlanPlacement(args) => commands::plan_placement(&commands::PlanPlacementOptions {
            stats: args.stats,
            ranks: args.ranks,
            strategy: args.strategy,
            time_limit: args.time_limit,
            mip_gap: args.mip_gap,
            solver: args.solver,
            ranks_per_node: args.ranks_per_node,
            inter_node_slowdown: args.inter_node_slowdown,
            out: args.out,
        }),
    }
}
