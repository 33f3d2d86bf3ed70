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

pub fn bench(cfg: &Config, steps: u64, warmup: u64, compare: bool) -> Result<()> {
    setup_threads(cfg.run.threads)?;
    let corpus = load_data(cfg)?;
    let report = bench_impl::run(cfg, &corpus, steps, warmup, compare)?;
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
