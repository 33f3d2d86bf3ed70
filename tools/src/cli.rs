//! Command-line values shared by the binaries (each parses its flags with `clap`).

use switchyard_comm::MpiProgress;

/// `--progress`: what drives non-blocking MPI operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Progress {
    /// A background thread drives MPI's progress engine (the default).
    #[default]
    Thread,
    /// Only `test` / `wait` calls drive progress.
    Poll,
}

impl Progress {
    pub fn mpi(self) -> MpiProgress {
        match self {
            Progress::Thread => MpiProgress::Thread,
            Progress::Poll => MpiProgress::Poll,
        }
    }

    /// As written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Progress::Thread => "thread",
            Progress::Poll => "poll",
        }
    }
}
