//! `switchyard`: the command-line entry point. Parses argv, loads and validates the config
//! (exit code 2 on any config error), sets up logging and threads, and hands each component
//! its node.

mod commands;
mod config;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use switchyard_trainer::config::Config;

use crate::config::loader::{ConfigError, load_config_checked};

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
    },
    /// Validation loss and perplexity of a checkpoint (or of fresh weights).
    Eval {
        #[command(flatten)]
        config: ConfigArgs,
        /// `auto` (newest complete checkpoint) or a checkpoint directory.
        #[arg(long, default_value = "auto")]
        checkpoint: String,
    },
    /// Tokenize text or JSONL files into a Megatron-LM indexed dataset (PREFIX.bin/.idx).
    PrepareData(PrepareArgs),
    /// Load and validate a config, print the resolved tree.
    ValidateConfig {
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
    },
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
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// Input files (one document per text file, one per JSONL line).
    #[arg(long = "input", required = true)]
    inputs: Vec<PathBuf>,
    /// `text` or `jsonl`.
    #[arg(long, default_value = "text")]
    format: String,
    /// JSONL field holding the text.
    #[arg(long, default_value = "text")]
    text_key: String,
    /// `byte`, or the path of a Hugging Face tokenizer.json.
    #[arg(long, default_value = "byte")]
    tokenizer: String,
    /// Output prefix: writes PREFIX.bin and PREFIX.idx.
    #[arg(long)]
    output: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(config_err) = err.downcast_ref::<ConfigError>() {
                eprintln!("error: invalid config\n{config_err}");
                return ExitCode::from(config_err.exit_code() as u8);
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads, deserializes and validates the config; any problem is a `ConfigError` (exit 2).
fn load(args: &ConfigArgs) -> Result<Config> {
    let cfg: Config = load_config_checked(&args.config, &args.overrides, |cfg: &Config| {
        let mut issues = cfg.validate();
        issues.extend(
            cfg.data
                .check_paths()
                .into_iter()
                .map(|(path, msg)| (format!("data.{path}"), msg)),
        );
        issues
    })?;
    Ok(cfg)
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Train {
            config,
            resume,
            init_from,
        } => {
            let cfg = load(&config)?;
            commands::train(&cfg, resume.as_deref(), init_from.as_deref())
        }
        Command::Eval { config, checkpoint } => {
            let cfg = load(&config)?;
            commands::eval(&cfg, &checkpoint)
        }
        Command::PrepareData(args) => commands::prepare(
            &args.inputs,
            &args.format,
            &args.text_key,
            &args.tokenizer,
            &args.output,
        ),
        Command::ValidateConfig { config } => {
            let cfg = load(&config)?;
            print!("{}", config::loader::resolved_yaml(&cfg));
            eprintln!("{}: OK", config.config.display());
            Ok(())
        }
        Command::InspectCheckpoint { path } => commands::inspect(&path),
        Command::Ablate { config } => {
            let cfg = load(&config)?;
            commands::ablate(&cfg)
        }
        Command::Bench {
            config,
            steps,
            warmup,
            compare,
        } => {
            let cfg = load(&config)?;
            commands::bench(&cfg, steps, warmup, compare)
        }
    }
}
