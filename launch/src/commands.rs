//! The subcommands. Each loads what it needs and hands components their config nodes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use switchyard_trainer::checkpoint::{self, resume_target};
use switchyard_trainer::config::Config;
use switchyard_trainer::data::{
    Corpus, InputFormat, PrepareOptions, Tokenizer, build_tokenizer, prepare_data,
};
use switchyard_trainer::device::DeviceConfig;
use switchyard_trainer::memory;
use switchyard_trainer::metrics::EvalReport;
use switchyard_trainer::{ablation, bench as bench_impl, train as train_impl};

use switchyard_comm::{CommBackendConfig, Communicator, LinkModel, LocalWorld};

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::tensor::Device;
use switchyard_trainer::train::RunOutcome;
use switchyard_trainer::{EXIT_PREEMPTED, StopSignal, TrainError};

use crate::config::loader::resolved_yaml;
use crate::launcher_env::{LaunchInfo, Launcher};

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

/// How the ranks of a run talk, resolved from `comm.backend` and the launcher.
enum Transport {
    /// One rank: no communicator at all.
    Single,
    /// Ranks as threads of this process.
    Threads(Option<LinkModel>),
    /// One MPI process per rank (started by mpirun / srun); `nccl`: the collectives run on
    /// NCCL (bootstrapped over MPI), on each rank's GPU.
    Mpi { nccl: bool },
}

/// Whether this binary can run NCCL (cargo feature `nccl`).
const NCCL_BUILT: bool = cfg!(feature = "nccl");

/// Tasks the launcher started and the variable that says so, when more than one (a bare
/// PMIx launcher exports no size: then its presence counts).
fn launched_tasks(launch: &LaunchInfo) -> Option<(usize, &'static str)> {
    match &launch.world_size {
        Some(w) if w.value > 1 => Some((w.value, w.var)),
        Some(_) => None,
        None => Some((0, launch.rank.var)).filter(|_| launch.launcher != Launcher::Single),
    }
}

fn transport(cfg: &Config, launch: &LaunchInfo) -> Result<Transport> {
    let world = cfg.parallel.world_size();
    let launched = launched_tasks(launch);
    let t = match (&cfg.comm.backend, launched) {
        (CommBackendConfig::Local { .. }, None) => Transport::Threads(cfg.comm.link_model()),
        (CommBackendConfig::Auto {}, None) => Transport::Threads(None),
        (CommBackendConfig::Local { .. }, Some((n, var))) => bail!(
            "comm.backend.type is `local` (ranks as threads of one process), but the launcher \
             started {n} processes ({var}={n}); use `comm.backend.type: auto` or `mpi`, or \
             start one process"
        ),
        // NCCL when each rank has a GPU of its own (`device: cuda`); ranks that share one
        // (`cuda:N`) stay on MPI, which NCCL cannot replace there.
        (CommBackendConfig::Auto {}, Some(_)) => Transport::Mpi {
            nccl: NCCL_BUILT
                && match cfg.device {
                    DeviceConfig::Cuda(None) => true,
                    DeviceConfig::Cuda(Some(_)) => world == 1,
                    DeviceConfig::Cpu => false,
                },
        },
        (CommBackendConfig::Mpi { .. }, _) => Transport::Mpi { nccl: false },
        (CommBackendConfig::Nccl {}, Some(_)) => Transport::Mpi { nccl: true },
        (CommBackendConfig::Nccl {}, None) if world == 1 => Transport::Single,
        (CommBackendConfig::Nccl {}, None) => bail!(
            "comm.backend.type is `nccl`, which runs one process per GPU, but this process was \
             not started by a launcher and the layout has {world} ranks; start it with \
             `mpirun -np {world}` (or `srun`), or use `comm.backend.type: auto` to run the \
             ranks as threads of this process"
        ),
    };
    Ok(match t {
        Transport::Threads(_) if world == 1 => Transport::Single,
        t => t,
    })
}

/// Ranks that share this process's memory: all of them as threads of the local backend,
/// one under MPI (see `switchyard_trainer::memory::memory_issue`). Unreadable launcher
/// variables count as one: `train` reports them.
pub fn ranks_in_process(cfg: &Config) -> usize {
    match LaunchInfo::from_process_env().and_then(|launch| transport(cfg, &launch)) {
        Ok(Transport::Threads(_)) => cfg.parallel.world_size(),
        Ok(Transport::Single | Transport::Mpi { .. }) | Err(_) => 1,
    }
}

/// One rank of a command run at the config's layout (see [`Ranks::run`]).
pub struct Rank {
    /// Its index in the world (0 with one rank).
    pub rank: usize,
    /// Its communicator; `None` when the layout has one rank.
    pub world: Option<Box<dyn Communicator>>,
    /// Its device (`device: cuda`: the GPU of its local rank).
    pub device: Device,
    /// Ranks that run as threads of this process (1 under MPI): they share its memory,
    /// threads and CPU time.
    pub in_process: usize,
}

/// What a run at the layout leaves this process: rank 0's result when the ranks are its
/// threads, its own rank's under MPI.
pub struct RanksDone<T> {
    pub result: T,
    pub is_rank0: bool,
}

impl<T> RanksDone<T> {
    /// The result where rank 0 prints and writes it; `None` on the other MPI ranks.
    pub fn on_rank0(self) -> Option<T> {
        self.is_rank0.then_some(self.result)
    }
}

/// The ranks of the config's layout in this process and how they talk: threads of this
/// process, or one MPI process each when launched by mpirun / srun (feature `mpi`). Every
/// command that builds a trainer runs through it, so whatever trains at a layout can be
/// evaluated and measured at it.
pub struct Ranks<'a> {
    cfg: &'a Config,
    launch: &'a LaunchInfo,
    transport: Transport,
}

impl<'a> Ranks<'a> {
    /// Resolves the transport and checks it against the launcher, before anything runs.
    pub fn of(cfg: &'a Config, launch: &'a LaunchInfo) -> Result<Self> {
        let transport = transport(cfg, launch)?;
        if !matches!(transport, Transport::Mpi { .. }) {
            // One process (with or without rank threads): rank 0 of 1, whatever started it
            // (srun -n4 of a local-backend run would run four copies writing one output).
            launch.check_against(0, 1)?;
        }
        if let DeviceConfig::Cuda(Some(gpu)) = cfg.device
            && cfg.parallel.world_size() > 1
        {
            tracing::warn!(
                "device `cuda:{gpu}`: all {} ranks share GPU {gpu} (for one GPU per rank, use \
                 `device: cuda`: each rank takes the GPU of its local rank)",
                cfg.parallel.world_size()
            );
        }
        Ok(Ranks {
            cfg,
            launch,
            transport,
        })
    }

    /// Runs `rank_run` on every rank (a rank thread's stack is main-thread-sized: deep
    /// autodiff graphs recurse in backward). An error is the first rank's own, not another
    /// rank's report of it; under MPI it brings the whole job down (MPI_Abort), never a hang
    /// in the next collective.
    pub fn run<T: Send>(
        &self,
        rank_run: impl Fn(Rank) -> Result<T> + Sync,
    ) -> Result<RanksDone<T>> {
        let cfg = self.cfg;
        let launch_local = self.launch.local_rank.map(|v| v.value);
        match self.transport {
            Transport::Single => {
                let device = cfg.device.resolve(launch_local.unwrap_or(0))?;
                let result = rank_run(Rank {
                    rank: 0,
                    world: None,
                    device,
                    in_process: 1,
                })?;
                Ok(RanksDone {
                    result,
                    is_rank0: true,
                })
            }
            Transport::Threads(link) => {
                let n = cfg.parallel.world_size();
                tracing::info!(ranks = n, "local backend: one thread per rank");
                let comms = LocalWorld::new(n, cfg.comm.timeout(), link);
                let results = LocalWorld::spawn(comms, Some(64 << 20), |comm| {
                    let rank = comm.rank();
                    // Its log lines speak for its rank (only rank 0 logs below warnings).
                    switchyard_trainer::console::set_thread_rank(Some(rank));
                    // `device: cuda`: rank threads share this node, each takes its GPU.
                    cfg.device
                        .resolve(rank)
                        .map_err(anyhow::Error::from)
                        .and_then(|device| {
                            rank_run(Rank {
                                rank,
                                world: Some(Box::new(comm)),
                                device,
                                in_process: n,
                            })
                        })
                        .map_err(|e| (rank, e))
                });
                let mut errors = Vec::new();
                let mut rank0 = None;
                for r in results {
                    match r {
                        Ok(result) => {
                            rank0.get_or_insert(result);
                        }
                        Err(e) => errors.push(e),
                    }
                }
                let cause = errors.iter().position(|(_, e)| !is_consequence(e));
                if let Some((rank, e)) = errors.into_iter().nth(cause.unwrap_or(0)) {
                    return Err(e.context(format!("rank {rank}")));
                }
                Ok(RanksDone {
                    result: rank0.expect("the layout has ranks"),
                    is_rank0: true,
                })
            }
            Transport::Mpi { nccl } => mpi_run(cfg, self.launch, nccl, &rank_run),
        }
    }
}

/// Whether a rank's error only reports another rank's failure (it waited for a rank that
/// failed): the failed rank's own error says more.
fn is_consequence(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<TrainError>()
            .is_some_and(TrainError::is_consequence)
    })
}

/// How `train` starts: its command-line choices.
pub struct Start<'a> {
    /// `--resume auto|DIR`.
    pub resume: Option<&'a str>,
    /// `--init-from DIR`.
    pub init_from: Option<&'a Path>,
    /// `--start-over`.
    pub start_over: bool,
    /// `--allow-config-change`.
    pub allow_config_change: bool,
}

pub fn train(
    cfg: &Config,
    launch: &LaunchInfo,
    start: &Start,
    stop: Arc<StopSignal>,
) -> Result<()> {
    let (resume, init_from) = (start.resume, start.init_from);
    setup_threads(cfg.run.threads)?;
    let ranks = Ranks::of(cfg, launch)?;
    // Before anything in the run directory is touched; one process per run does it.
    let _lock = (launch.rank.value == 0)
        .then(|| crate::run_dir::prepare(cfg, resume, start.start_over))
        .transpose()?;
    let out = &cfg.run.output_dir;
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating run.output_dir {}", out.display()))?;
    let resume_path = match resume {
        Some(spec) => resume_target(&checkpoint_root(cfg), spec)?,
        None => None,
    };
    if let Some(path) = &resume_path {
        let saved = checkpoint::read_manifest(path)?.config;
        let now = serde_json::to_value(cfg).expect("config serialises");
        crate::config_change::check(
            path,
            &saved,
            &now,
            start.allow_config_change,
            launch.rank.value == 0,
        )?;
    }
    let corpus = load_data(cfg)?;
    let start = match (&resume_path, init_from) {
        (Some(path), _) => train_impl::Start::Resume(path),
        (None, Some(path)) => train_impl::Start::InitFrom(path),
        (None, None) => train_impl::Start::Fresh,
    };
    let done = ranks.run(|rank| {
        if rank.rank == 0 {
            std::fs::write(out.join("config.yaml"), resolved_yaml(cfg))
                .with_context(|| format!("writing {}", out.join("config.yaml").display()))?;
            if resume == Some("auto") && resume_path.is_none() {
                tracing::info!("--resume auto: no complete checkpoint yet, starting fresh");
            }
        }
        Ok(train_impl::run(
            cfg,
            &corpus,
            start,
            &rank.device,
            train_impl::RunContext {
                resolved_config: serde_json::to_value(cfg).expect("config serialises"),
                resolved_yaml: resolved_yaml(cfg),
                world: rank.world,
                stop: Some(stop.clone()),
            },
        )?)
    })?;
    match done.result {
        RunOutcome::Finished(Some(eval)) if done.is_rank0 => println!(
            "final: step {} valid loss {:.4} perplexity {:.3}{}",
            cfg.train.steps,
            eval.loss,
            eval.perplexity,
            source_losses(&eval)
        ),
        RunOutcome::Finished(_) => {}
        // Every rank stopped at the same step: each exits with the preemption code.
        RunOutcome::Preempted { step, checkpoint } => {
            return Err(Preempted { step, checkpoint }.into());
        }
    }
    Ok(())
}

/// The run stopped on a preemption signal after committing a checkpoint; the binary exits
/// with `EXIT_PREEMPTED` (75) so a job script can requeue it.
#[derive(Debug)]
pub struct Preempted {
    pub step: u64,
    pub checkpoint: PathBuf,
}

impl std::fmt::Display for Preempted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "preempted at step {}: checkpoint {} committed; continue with `--resume auto` \
             (exit code {EXIT_PREEMPTED})",
            self.step,
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for Preempted {}

/// Installs the stop handlers of `train`, first thing (before the config is read): SIGUSR1,
/// SIGTERM or SIGINT before the first step end the process at once with `EXIT_PREEMPTED`
/// (there is nothing to save yet; a job script requeues on it); from the first step on they
/// stop the run at the next step boundary with a checkpoint (see `StopSignal`). Further
/// signals change nothing (a save in progress finishes), except a second SIGINT, which exits
/// at once (130) for an impatient Ctrl-C.
pub fn install_stop_handlers() -> Result<Arc<StopSignal>> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let stop = Arc::new(StopSignal::new());
    let interrupted = Arc::new(AtomicBool::new(false));
    // Conditional shutdown first: it sees the flag set by an earlier SIGINT.
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, interrupted.clone())
        .context("installing the SIGINT handler")?;
    signal_hook::flag::register(SIGINT, interrupted).context("installing the SIGINT handler")?;
    for signal in [SIGUSR1, SIGTERM, SIGINT] {
        let stop = stop.clone();
        let action = move || {
            if !stop.request() {
                exit_before_first_step();
            }
        };
        // SAFETY: the action is async-signal-safe: atomics, write(2) and _exit(2) only (no
        // allocation, no locks).
        unsafe { signal_hook::low_level::register(signal, action) }
            .with_context(|| format!("installing the handler of signal {signal}"))?;
    }
    Ok(stop)
}

/// A stop signal before the first step: say so on stderr and exit `EXIT_PREEMPTED`.
fn exit_before_first_step() {
    const MESSAGE: &[u8] = b"switchyard: stop signal before the first step: nothing to save; \
        exiting with 75 (requeue; `--resume auto` continues from the last checkpoint)\n";
    // SAFETY: write(2) on stderr from a valid buffer; async-signal-safe.
    unsafe { libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len()) };
    signal_hook::low_level::exit(i32::from(EXIT_PREEMPTED));
}

/// [`Ranks::run`] under MPI: this process is one rank.
#[cfg(feature = "mpi")]
fn mpi_run<T>(
    cfg: &Config,
    launch: &LaunchInfo,
    nccl: bool,
    rank_run: &dyn Fn(Rank) -> Result<T>,
) -> Result<RanksDone<T>> {
    use switchyard_comm::mpi::{MpiEnv, MpiOptions};
    let (env, world) = MpiEnv::init(MpiOptions::from_config(&cfg.comm))?;
    launch.check_against(world.rank(), world.size())?;
    let want = cfg.parallel.world_size();
    if world.size() != want {
        bail!(
            "mpirun started {} processes but parallel.dp x parallel.cp x parallel.ep = {} x {} \
             x {} = {want}; launch with `mpirun -np {want}` or change the layout",
            world.size(),
            cfg.parallel.dp,
            cfg.parallel.cp,
            cfg.parallel.ep
        );
    }
    let rank = world.rank();
    // The rank gets a duplicate; this handle stays here to abort the job.
    let rank_world = world.split(0, rank as i32)?;
    tracing::info!(
        backend = if nccl { "nccl" } else { "mpi" },
        ranks = world.size(),
        "collectives"
    );
    let rank_world = if nccl {
        nccl_world(cfg, launch, rank_world)?
    } else {
        rank_world
    };
    // The GPU of `device: cuda`: the launcher's local rank, else the rank.
    let device = cfg
        .device
        .resolve(launch.local_rank.map_or(rank, |v| v.value))
        .map_err(anyhow::Error::from);
    let result = device.and_then(|device| {
        rank_run(Rank {
            rank,
            world: Some(rank_world),
            device,
            in_process: 1,
        })
    });
    let result = match result {
        Ok(r) => r,
        Err(e) => world.abort(&format!("rank {rank}: {}", crate::error_chain(&e)), 1),
    };
    // MPI_Finalize waits for every rank without a timeout: meet in a timed barrier first,
    // so a rank that hangs at the very end still brings the job down.
    if let Err(e) = world.barrier() {
        world.abort(&format!("rank {rank}: the final barrier: {e}"), 1);
    }
    drop(world);
    drop(env);
    Ok(RanksDone {
        result,
        is_rank0: rank == 0,
    })
}

/// The NCCL communicator of the trainer's world, on this rank's GPU (`device: cuda`: the
/// GPU of its local rank; `cuda:N`: GPU N). Collective over `world`.
#[cfg(feature = "nccl")]
fn nccl_world(
    cfg: &Config,
    launch: &LaunchInfo,
    world: Box<dyn Communicator>,
) -> Result<Box<dyn Communicator>> {
    let local_rank = launch.local_rank.map_or(world.rank(), |v| v.value);
    let gpu = match cfg.device {
        DeviceConfig::Cuda(Some(gpu)) => gpu,
        _ => local_rank,
    };
    // The device checks of `train` (driver present, GPU index exists) before NCCL's.
    cfg.device.resolve(local_rank)?;
    let comm = switchyard_comm::nccl::NcclComm::new(world, Some(gpu))?;
    tracing::info!(gpu, comm = comm.name(), "NCCL communicator ready");
    Ok(Box::new(comm))
}

#[cfg(all(feature = "mpi", not(feature = "nccl")))]
fn nccl_world(
    _: &Config,
    _: &LaunchInfo,
    _: Box<dyn Communicator>,
) -> Result<Box<dyn Communicator>> {
    bail!(
        "comm.backend.type `nccl` needs a switchyard built with `--features nccl` (`cargo \
         build --release -p switchyard-launch --features nccl`)"
    )
}

#[cfg(not(feature = "mpi"))]
fn mpi_run<T>(
    _: &Config,
    launch: &LaunchInfo,
    _: bool,
    _: &dyn Fn(Rank) -> Result<T>,
) -> Result<RanksDone<T>> {
    let tasks = launched_tasks(launch).map_or(String::new(), |(n, var)| format!(" ({var}={n})"));
    bail!(
        "this run needs MPI{tasks}, but this switchyard was built without the `mpi` feature; \
         rebuild with `cargo build --release --features mpi`"
    )
}

/// `switchyard eval`: every rank restores the checkpoint's weights (saved at any layout; each
/// keeps the experts it owns; the optimizer's files are not read) and evaluates its rows;
/// the loss is summed over the ranks.
pub fn eval(
    cfg: &Config,
    launch: &LaunchInfo,
    checkpoint: &str,
    tokens_out: Option<&Path>,
) -> Result<()> {
    setup_threads(cfg.run.threads)?;
    let ranks = Ranks::of(cfg, launch)?;
    let corpus = load_data(cfg)?;
    let target = resume_target(&checkpoint_root(cfg), checkpoint)?;
    let done = ranks.run(|rank| {
        let mut trainer =
            switchyard_trainer::Trainer::new_on(cfg, &corpus, &rank.device, rank.world)?;
        if let Some(path) = &target {
            trainer.restore_weights(path)?;
        }
        let report = trainer.evaluate()?;
        Ok((trainer.counters.step, report, trainer.valid))
    })?;
    let Some((step, report, valid)) = done.on_rank0() else {
        return Ok(());
    };
    match &target {
        Some(path) => println!("checkpoint: {} (step {step})", path.display()),
        None => println!(
            "no checkpoint under {}: evaluating freshly initialised weights",
            checkpoint_root(cfg).display()
        ),
    }
    println!(
        "valid loss {:.6} nats/token, perplexity {:.4} over {} tokens{}",
        report.loss,
        report.perplexity,
        report.tokens,
        source_losses(&report)
    );
    if let Some(path) = tokens_out {
        // Every evaluated window (inputs and the next-token targets), one row each.
        let width = cfg.data.seq_len + 1;
        let tokens: Vec<i64> = valid
            .batches
            .iter()
            .flat_map(|b| b.tokens.iter().copied())
            .collect();
        let data = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        write_npy(path, "<i8", &[tokens.len() / width, width], data)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A blend's per-source validation losses for a summary line (` (web 4.1234, code 3.2100)`);
/// empty for a single source.
fn source_losses(eval: &EvalReport) -> String {
    if eval.sources.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = eval
        .sources
        .iter()
        .map(|(name, loss)| format!("{name} {loss:.4}"))
        .collect();
    format!(" ({})", parts.join(", "))
}

/// `switchyard generate`: the checkpoint's own config builds the model, its weights (saved
/// at any layout) fill it, the run's tokenizer encodes the prompt; tokens stream to stdout
/// as they are drawn.
pub fn generate(
    checkpoint: &Path,
    prompt: &str,
    max_new_tokens: usize,
    sampling: &switchyard_trainer::generate::Sampling,
    kv_cache: bool,
    logits_out: Option<&Path>,
) -> Result<()> {
    use std::io::Write;
    let problems = sampling.problems();
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    let (dir, loaded, cfg) = open_checkpoint(checkpoint)?;
    setup_threads(cfg.run.threads)?;
    let tokenizer = run_tokenizer(&cfg, &dir)?;
    let device = cfg.device.resolve(0)?.inner();
    let mut model = switchyard_moe::Transformer::new(&cfg.model, cfg.run.seed, &device)
        .with_precision(cfg.precision);
    let snapshot = checkpoint::Snapshot::of(&loaded)
        .map_err(|message| anyhow!("{}: {message}", dir.display()))?;
    checkpoint::init_weights(&mut model, &snapshot, &cfg.model.moe)
        .map_err(|message| anyhow!("loading the weights of {}: {message}", dir.display()))?;
    let prompt_ids = tokenizer.encode(prompt)?;
    if prompt_ids.is_empty() {
        bail!("--prompt is empty after tokenization; give at least one character");
    }
    if let Some(path) = logits_out {
        let ids: Vec<i64> = prompt_ids.iter().map(|&t| i64::from(t)).collect();
        let n = ids.len();
        let tokens = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(ids, [1, n]),
            &device,
        );
        let logits = model.forward_cached(tokens, &mut switchyard_moe::KvCache::default());
        let [_, p, v] = logits.dims();
        let values = logits
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| anyhow!("reading the logits: {e:?}"))?;
        write_npy_f32(path, &[p, v], &values)
            .with_context(|| format!("writing --logits-out {}", path.display()))?;
    }
    if let switchyard_moe::config::CapacityConfig::Drop { .. } = cfg.model.moe.capacity {
        tracing::info!(
            "model.moe.capacity is `drop`: capacity is counted over the tokens of each \
             forward call (the prompt, then one token per step)"
        );
    }
    let mut out = std::io::stdout().lock();
    write!(out, "{prompt}")?;
    out.flush()?;
    // Decoded text grows token by token; a byte token may end inside a UTF-8 character,
    // so what is printed waits for the character to complete.
    let mut generated = Vec::new();
    let mut printed = 0;
    let mut failure: Option<anyhow::Error> = None;
    switchyard_trainer::generate::generate(
        &model,
        &prompt_ids,
        max_new_tokens,
        sampling,
        kv_cache,
        tokenizer.vocab_size(),
        |id| {
            generated.push(id);
            let mut show = || -> Result<()> {
                let text = tokenizer.decode(&generated)?;
                if !text.ends_with('\u{FFFD}') && text.is_char_boundary(printed) {
                    write!(out, "{}", &text[printed..])?;
                    out.flush()?;
                    printed = text.len();
                }
                Ok(())
            };
            match show() {
                Ok(()) => true,
                Err(e) => {
                    failure = Some(e);
                    false
                }
            }
        },
    );
    if let Some(e) = failure {
        return Err(e);
    }
    // What was held back (a character still incomplete when generation ended).
    let text = tokenizer.decode(&generated)?;
    if text.is_char_boundary(printed) {
        write!(out, "{}", &text[printed..])?;
    }
    writeln!(out)?;
    Ok(())
}

/// This process's peak resident memory (VmHWM), for the summaries of one-shot commands.
fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or("unknown".into(), |kb| format!("{:.0} MB", kb / 1024.0))
}

/// A little-endian f32 array as a NumPy `.npy` file (format 1.0).
fn write_npy_f32(path: &Path, shape: &[usize], values: &[f32]) -> std::io::Result<()> {
    let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(path, "<f4", shape, data)
}

/// A little-endian array (`descr`: NumPy's type code) as a `.npy` file (format 1.0).
fn write_npy(path: &Path, descr: &str, shape: &[usize], data: Vec<u8>) -> std::io::Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    );
    // Magic (6) + version (2) + length (2) + header, padded with spaces to a multiple of 64,
    // ending in a newline.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + data.len());
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes)
}

/// A checkpoint directory (or the newest complete one under a checkpoints directory), read
/// and verified, with the config stored in it.
fn open_checkpoint(checkpoint: &Path) -> Result<(PathBuf, checkpoint::LoadedCheckpoint, Config)> {
    let (dir, _) = checkpoint_config(checkpoint)?;
    let loaded = checkpoint::load(&dir)?;
    let cfg = stored_config(&dir, &loaded.manifest)?;
    Ok((dir, loaded, cfg))
}

/// A checkpoint directory (as [`open_checkpoint`]) and its config, from the manifest only:
/// no tensor is read.
fn checkpoint_config(checkpoint: &Path) -> Result<(PathBuf, Config)> {
    let dir = if checkpoint.join("manifest.json").exists() {
        checkpoint.to_path_buf()
    } else {
        checkpoint::latest_complete(checkpoint)?.with_context(|| {
            format!(
                "{} is neither a checkpoint (no manifest.json) nor a directory of complete \
                 checkpoints; pass `.../checkpoints/step-N` or `.../checkpoints`",
                checkpoint.display()
            )
        })?
    };
    let manifest = checkpoint::read_manifest(&dir)?;
    let cfg = stored_config(&dir, &manifest)?;
    Ok((dir, cfg))
}

fn stored_config(dir: &Path, manifest: &checkpoint::Manifest) -> Result<Config> {
    serde_json::from_value(manifest.config.clone()).with_context(|| {
        format!(
            "the config stored in {}/manifest.json does not parse as this switchyard's config",
            dir.display()
        )
    })
}

/// `switchyard export-hf`: the checkpoint's weights in a Hugging Face format.
pub fn export_hf(
    checkpoint: &Path,
    format: switchyard_trainer::hf::HfFormat,
    dtype: switchyard_trainer::hf::HfDtype,
    out: &Path,
    shard_mib: usize,
) -> Result<()> {
    use switchyard_trainer::hf;
    let started = std::time::Instant::now();
    let (dir, cfg) = checkpoint_config(checkpoint)?;
    // Refused before the weights are even gathered.
    let problems = hf::unsupported(&cfg.model, format);
    if !problems.is_empty() {
        return Err(hf::ExportError::Unsupported {
            format: format.name(),
            problems,
        }
        .into());
    }
    let tokenizer = run_tokenizer(&cfg, &dir)?;
    // Tensor by tensor from disk: the export holds one tensor, never the model.
    let model = checkpoint::TensorReader::open(&dir, "model")?;
    let report = hf::export(
        &model,
        &cfg.model,
        &tokenizer,
        format,
        dtype,
        out,
        shard_mib << 20,
    )?;
    println!(
        "exported {} to {}: {} tensors, {} shard(s), {:.1} MB of weights, {:.1} s, peak \
         memory {}",
        dir.display(),
        out.display(),
        report.tensors,
        report.shards,
        report.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        peak_rss()
    );
    Ok(())
}

/// `switchyard import-hf`: a Hugging Face Mixtral / Qwen-MoE model (or an upcycled Llama) as a Switchyard checkpoint
/// (`OUT/checkpoints/step-00000000`), the config it implies (`OUT/config.yaml`: the model,
/// its tokenizer; data and optimizer to adapt) and its tokenizer (`OUT/tokenizer.json`).
pub fn import_hf(
    model_dir: &Path,
    out: &Path,
    upcycle: Option<&switchyard_trainer::hf::Upcycle>,
) -> Result<()> {
    use switchyard_trainer::hf;
    let started = std::time::Instant::now();
    let config_path = model_dir.join("config.json");
    let config_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?,
    )
    .with_context(|| format!("parsing {}", config_path.display()))?;
    let model_cfg = match upcycle {
        Some(u) => hf::upcycled_config_of(&config_json, &config_path, u)?,
        None => hf::model_config_of(&config_json, &config_path)?,
    };
    if out.exists() && std::fs::read_dir(out).map_or(true, |mut d| d.next().is_some()) {
        bail!(
            "{} already exists and is not empty; choose a new --out directory",
            out.display()
        );
    }
    let tensors = match upcycle {
        Some(u) => hf::upcycle_weights(model_dir, &model_cfg, u)?,
        None => {
            let format =
                hf::HfFormat::of_model_type(config_json["model_type"].as_str().unwrap_or(""))
                    .expect("model_config_of accepted the model type");
            hf::import_weights(model_dir, &model_cfg, format)?
        }
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let out = out
        .canonicalize()
        .with_context(|| format!("resolving {}", out.display()))?;
    let source_tokenizer = model_dir.join("tokenizer.json");
    let tokenizer = if source_tokenizer.exists() {
        let dest = out.join("tokenizer.json");
        std::fs::copy(&source_tokenizer, &dest)
            .with_context(|| format!("copying {}", source_tokenizer.display()))?;
        serde_json::json!({"type": "huggingface", "path": dest})
    } else {
        bail!(
            "{} has no tokenizer.json; Switchyard needs the tokenizer the model was trained with",
            model_dir.display()
        );
    };
    let config = serde_json::json!({
        "run": {"name": "imported", "output_dir": out.join("run"), "seed": 1},
        "model": model_cfg,
        "data": {
            "tokenizer": tokenizer,
            "source": {"type": "synthetic", "seed": 1, "bytes": 100000},
            "seq_len": model_cfg.max_seq_len.min(512),
            "batch_size": 8,
        },
        "optim": {"lr": 1.0e-4},
        "train": {"steps": 100},
    });
    let cfg: Config = serde_json::from_value(config.clone())
        .context("the config implied by the import does not parse (a bug: please report it)")?;
    let yaml = format!(
        "# Written by `switchyard import-hf --model {}`: the model and its tokenizer as imported.\n\
         # Point data.source at your corpus and adjust optim/train before training with\n\
         # `switchyard train --config this.yaml --init-from {}`.\n{}",
        model_dir.display(),
        out.join("checkpoints").join("step-00000000").display(),
        resolved_yaml(&cfg)
    );
    std::fs::write(out.join("config.yaml"), yaml).context("writing config.yaml")?;
    let signature = switchyard_moe::params::signature(&switchyard_moe::Transformer::new(
        &model_cfg,
        0,
        &burn::tensor::Device::flex(),
    ));
    let count = tensors.len();
    let root = out.join("checkpoints");
    let dir = checkpoint::CheckpointManager::new(&root, 1)?.save(
        0,
        &[("model.safetensors", tensors)],
        checkpoint::ManifestMeta {
            tokens_seen: 0,
            model_signature: signature,
            trainer_state: serde_json::json!({}),
            config: serde_json::to_value(&cfg).expect("config serialises"),
        },
    )?;
    println!(
        "imported {} ({} tensors) to {} with {}, {:.1} s, peak memory {}",
        model_dir.display(),
        count,
        dir.display(),
        out.join("config.yaml").display(),
        started.elapsed().as_secs_f64(),
        peak_rss()
    );
    Ok(())
}

/// The tokenizer a run trained with: bytes, the configured `tokenizer.json`, or the BPE the
/// run trained (`<output_dir>/tokenizer.json`, else next to the checkpoints directory).
fn run_tokenizer(cfg: &Config, checkpoint: &Path) -> Result<Tokenizer> {
    use switchyard_trainer::data::TokenizerConfig;
    Ok(match &cfg.data.tokenizer {
        TokenizerConfig::Byte {} => Tokenizer::Byte,
        TokenizerConfig::HuggingFace { path, eod_token } => {
            Tokenizer::from_hf_file(path, eod_token.as_deref())?
        }
        TokenizerConfig::Bpe { .. } => {
            let candidates = [
                Some(cfg.run.output_dir.join("tokenizer.json")),
                checkpoint
                    .parent()
                    .and_then(Path::parent)
                    .map(|run| run.join("tokenizer.json")),
            ];
            let found = candidates.iter().flatten().find(|p| p.exists()).with_context(|| {
                format!(
                    "the run trained a BPE tokenizer, but its tokenizer.json is in neither                      {}; copy it there",
                    candidates
                        .iter()
                        .flatten()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" nor ")
                )
            })?;
            Tokenizer::from_hf_file(found, Some(switchyard_trainer::data::BPE_EOD_TOKEN))?
        }
    })
}

/// What `prepare-data` appends after each document.
pub enum EodChoice {
    /// The tokenizer's own ([`Tokenizer::document_separator`]).
    Default,
    /// `--eod-token`: a token of the tokenizer.json.
    Named(String),
    /// `--no-eod`: nothing.
    None,
}

/// `switchyard prepare-data`'s arguments.
pub struct PrepareRequest {
    pub inputs: Vec<PathBuf>,
    pub format: String,
    pub text_key: String,
    pub tokenizer: String,
    pub eod: EodChoice,
    pub workers: Option<usize>,
    pub output: PathBuf,
}

pub fn prepare(req: &PrepareRequest) -> Result<()> {
    // No steps to reuse buffers across: freed blocks go back to the system, so memory
    // follows the items in flight.
    crate::ALLOC.set_cache_limit(0);
    let text_key = req.text_key.clone();
    let format = match req.format.as_str() {
        "auto" => None,
        "text" => Some(InputFormat::Text),
        "jsonl" => Some(InputFormat::Jsonl { text_key }),
        "parquet" => Some(InputFormat::Parquet { text_key }),
        other => bail!("--format {other}: expected `auto`, `text`, `jsonl` or `parquet`"),
    };
    let named = match &req.eod {
        EodChoice::Named(token) => Some(token.as_str()),
        EodChoice::Default | EodChoice::None => None,
    };
    let tokenizer = match (req.tokenizer.as_str(), named) {
        ("byte", Some(token)) => bail!(
            "--eod-token {token:?} with the byte tokenizer, whose separator is byte 0xFF; \
             --eod-token names a token of a tokenizer.json (leave it out, or --no-eod)"
        ),
        ("byte", None) => Tokenizer::Byte,
        (path, named) => Tokenizer::from_hf_file(Path::new(path), named)?,
    };
    let eod = match req.eod {
        EodChoice::None => {
            tracing::info!("--no-eod: the documents follow each other without a separator");
            None
        }
        EodChoice::Default | EodChoice::Named(_) => {
            let (id, how) = tokenizer.document_separator()?;
            tracing::info!("end-of-document token: {how}, after every document (--no-eod: none)");
            Some(id)
        }
    };
    let mut opts = PrepareOptions {
        format,
        text_key: req.text_key.clone(),
        ..PrepareOptions::new(eod)
    };
    if let Some(workers) = req.workers {
        if workers == 0 {
            bail!("--workers 0: at least one tokenizer thread is needed");
        }
        opts.workers = workers;
    }
    let report = prepare_data(&req.inputs, &opts, &tokenizer, &req.output)?;
    println!("{report}");
    Ok(())
}

/// `switchyard estimate-memory`: [`memory::MemoryEstimate`] of one rank as a table, and
/// whether the ranks this process would hold fit this machine.
pub fn estimate_memory(cfg: &Config) -> Result<()> {
    let e = memory::MemoryEstimate::per_rank(cfg);
    let p = &cfg.parallel;
    let counts = memory::param_counts(&cfg.model, p.ep);
    let mib = |b: f64| format!("{:>12.1} MiB", b / f64::from(1 << 20));
    let name = |v: serde_json::Value| v.as_str().unwrap_or("?").to_string();
    println!(
        "memory per rank: dp={} cp={} ep={} ({} ranks), {} rows x {} tokens per micro-batch, \
         {} micro-batch(es), precision {}, shard_optimizer {}, activation_checkpointing {}",
        p.dp,
        p.cp,
        p.ep,
        p.world_size(),
        cfg.data.batch_size / p.batch_shards().max(1),
        cfg.data.seq_len / p.cp.max(1),
        cfg.train.grad_accum_steps,
        name(serde_json::to_value(cfg.precision)?),
        name(serde_json::to_value(p.shard_optimizer)?),
        name(serde_json::to_value(cfg.train.activation_checkpointing)?),
    );
    println!(
        "  parameters held      {:>12.0}     (replicated {:.0}, routed experts {:.0})",
        counts.total(),
        counts.dense,
        counts.experts
    );
    println!("  weights (f32)      {}", mib(e.weights));
    println!("  gradients          {}   most held at once", mib(e.grads));
    println!(
        "  optimizer (AdamW)  {}   moments of the owned parameters",
        mib(e.optimizer)
    );
    println!(
        "  activations        {}   one micro-batch; {} without recomputation",
        mib(e.activations),
        mib(e.activations_kept).trim()
    );
    for (layer, bytes) in e.per_layer.iter().enumerate() {
        println!(
            "    layer {layer:<3}        {}   kept without recomputation",
            mib(*bytes)
        );
    }
    println!(
        "  communication      {}   gradient buckets in flight, expert rows",
        mib(e.comm)
    );
    for (phase, bytes) in e.phases.iter().filter(|(_, b)| *b > 0.0) {
        println!("    {phase:<22}{}", mib(*bytes));
    }
    println!(
        "  peak (estimate)    {}   the largest phase of a step",
        mib(e.total)
    );
    let ranks = ranks_in_process(cfg);
    match memory::available_memory() {
        Some((available, source)) => {
            let need = e.total * ranks as f64;
            println!(
                "this machine: {} ({source}); {ranks} rank(s) in one process need {}: {}",
                memory::gib(available),
                memory::gib(need),
                if need <= available {
                    "fits"
                } else {
                    "does not fit"
                }
            );
        }
        None => println!("this machine's memory is unknown"),
    }
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

/// `switchyard bench`: timed steps at the layout; rank 0 prints the report.
pub fn bench(cfg: &Config, launch: &LaunchInfo, opts: &bench_impl::BenchOptions) -> Result<()> {
    setup_threads(cfg.run.threads)?;
    let ranks = Ranks::of(cfg, launch)?;
    let corpus = load_data(cfg)?;
    let done = ranks.run(|rank| {
        Ok(bench_impl::run(
            cfg,
            &corpus,
            opts,
            &rank.device,
            rank.world,
            rank.in_process,
        )?)
    })?;
    if let Some(report) = done.on_rank0() {
        println!("{report}");
    }
    Ok(())
}

/// `switchyard ablate`: every variant trained and measured at the layout.
pub fn ablate(
    cfg: &Config,
    study: ablation::Study,
    seeds: usize,
    launch: &LaunchInfo,
) -> Result<()> {
    if let Err(e) = ablation::check_base(cfg, study) {
        bail!("ablate --study {}: {e}", study.name());
    }
    setup_threads(cfg.run.threads)?;
    let ranks = Ranks::of(cfg, launch)?;
    let corpus = load_data(cfg)?;
    let done = ranks.run(|rank| {
        Ok(ablation::run(
            cfg,
            study,
            seeds,
            &corpus,
            &rank.device,
            rank.world,
        )?)
    })?;
    if let Some(report) = done.on_rank0() {
        println!("{report}");
    }
    Ok(())
}

/// `record-routing`: train at the layout and save the moving-average routing statistics,
/// summed over the ranks at every step (the statistics the rebalancer keeps in training).
pub fn record_routing(
    cfg: &Config,
    launch: &LaunchInfo,
    config_path: &Path,
    steps: Option<u64>,
    decay: f64,
    out: &Path,
) -> Result<()> {
    if !(0.0..1.0).contains(&decay) {
        bail!("--decay {decay}: expected a moving-average decay per step in [0, 1)");
    }
    setup_threads(cfg.run.threads)?;
    let mut cfg = cfg.clone();
    if let Some(steps) = steps {
        cfg.train.steps = steps;
    }
    cfg.placement.stats_decay = decay;
    let cfg = &cfg;
    let ranks = Ranks::of(cfg, launch)?;
    let corpus = load_data(cfg)?;
    let started = std::time::Instant::now();
    let done = ranks.run(|rank| {
        let mut trainer =
            switchyard_trainer::Trainer::new_on(cfg, &corpus, &rank.device, rank.world)?;
        trainer.record_routing = true;
        let mut loss = f64::NAN;
        while trainer.counters.step < cfg.train.steps {
            let report = trainer.step()?;
            loss = report.loss;
            if trainer.is_logger() && (report.step % 50 == 0 || report.step == cfg.train.steps) {
                tracing::info!(step = report.step, loss, "recording routing");
            }
        }
        let rebalancer = trainer
            .rebalancer
            .context("the model has no MoE layers: there is no routing to record")?;
        Ok((rebalancer.stats, loss))
    })?;
    let Some((mut stats, loss)) = done.on_rank0() else {
        return Ok(());
    };
    stats.source = format!(
        "switchyard record-routing --config {} --steps {} --decay {decay}",
        config_path.display(),
        cfg.train.steps
    );
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
                            | switchyard_placement::ilp::Outcome::Exact
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
        switchyard_placement::PlanFileOut {
            format: switchyard_placement::PLAN_FORMAT,
            ep: opts.ranks,
            moe_layers: &stats.moe_layers,
            num_experts: stats.num_experts,
            stats: opts.stats.clone(),
            stats_source: &stats.source,
            plans: &plans,
        }
        .save(out)?;
        match plans.as_slice() {
            [_] => println!(
                "plan written to {} (start a run from it with placement.plan: {}; \
                 parallel.ep: {})",
                out.display(),
                out.display(),
                opts.ranks,
            ),
            _ => println!(
                "plans written to {} (placement.plan takes a file of one plan: add \
                 --strategy NAME)",
                out.display()
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher_env::{FromVar, Launcher};

    fn config(yaml: &str) -> Config {
        let base = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/quickstart.yaml"),
        )
        .unwrap();
        let mut value: serde_yaml::Value = serde_yaml::from_str(&base).unwrap();
        let over: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        for (k, v) in over.as_mapping().unwrap() {
            value[k.as_str().unwrap()] = v.clone();
        }
        serde_yaml::from_value(value).unwrap()
    }

    fn launched(n: usize) -> LaunchInfo {
        LaunchInfo {
            launcher: Launcher::OpenMpi,
            rank: FromVar {
                value: 0,
                var: "OMPI_COMM_WORLD_RANK",
            },
            world_size: Some(FromVar {
                value: n,
                var: "OMPI_COMM_WORLD_SIZE",
            }),
            local_rank: None,
        }
    }

    fn alone() -> LaunchInfo {
        LaunchInfo {
            launcher: Launcher::Single,
            rank: FromVar { value: 0, var: "" },
            world_size: None,
            local_rank: None,
        }
    }

    #[test]
    fn nccl_is_chosen_only_where_it_can_run() {
        let t = |yaml: &str, launch: LaunchInfo| match transport(&config(yaml), &launch) {
            Ok(Transport::Mpi { nccl }) => format!("mpi nccl={nccl}"),
            Ok(Transport::Threads(_)) => "threads".into(),
            Ok(Transport::Single) => "single".into(),
            Err(e) => format!("error: {e}"),
        };
        let nccl = |on: bool| format!("mpi nccl={}", on && NCCL_BUILT);
        let ep2 = "parallel: {ep: 2}";
        // auto under a launcher: NCCL with one GPU per rank (and the feature), else MPI.
        assert_eq!(
            t(&format!("{{device: cuda, {ep2}}}"), launched(2)),
            nccl(true)
        );
        assert_eq!(
            t(&format!("{{device: 'cuda:0', {ep2}}}"), launched(2)),
            nccl(false)
        );
        assert_eq!(
            t(&format!("{{device: cpu, {ep2}}}"), launched(2)),
            nccl(false)
        );
        assert_eq!(t(&format!("{{device: cuda, {ep2}}}"), alone()), "threads");
        // nccl named: under a launcher always; alone only with one rank.
        let named = format!("{{device: cuda, comm: {{backend: {{type: nccl}}}}, {ep2}}}");
        assert_eq!(t(&named, launched(2)), "mpi nccl=true");
        let err = t(&named, alone());
        assert!(
            err.contains("not started by a launcher") && err.contains("mpirun -np 2"),
            "{err}"
        );
        let one = "{device: cuda, comm: {backend: {type: nccl}}}";
        assert_eq!(t(one, alone()), "single");
        // mpi named stays MPI whatever the device.
        let mpi = format!("{{device: cuda, comm: {{backend: {{type: mpi}}}}, {ep2}}}");
        assert_eq!(t(&mpi, launched(2)), "mpi nccl=false");
    }
}
