//! switchyard-trainer: model assembly, data pipeline, optimizer and schedule, train loop,
//! evaluation, checkpoint/resume, metrics and the throughput benchmark.

pub mod ablation;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod console;
pub mod data;
pub mod device;
pub mod error;
pub mod generate;
pub mod hf;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod rebalance;
pub mod state;
pub mod stop;
pub mod train;
pub mod trainer;

pub use error::TrainError;
pub use stop::StopSignal;
pub use switchyard_parallel::seam::quiet_seam_failures;
pub use train::{RunContext, RunOutcome, Start, run};
pub use trainer::Trainer;

/// Exit status of a run that stopped on SIGUSR1 or SIGTERM after committing a checkpoint:
/// 75, `EX_TEMPFAIL` in sysexits.h ("temporary failure; try again"). The script written by
/// `switchyard slurm-script` requeues the job on it, and `--resume auto` continues the run.
pub const EXIT_PREEMPTED: u8 = 75;
