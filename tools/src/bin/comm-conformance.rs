//! Runs the conformance suite on the MPI (or NCCL) backend; launch under mpirun:
//!
//! ```sh
//! cargo build --release -p switchyard-tools --features mpi --bin comm-conformance
//! mpirun -np 3 --oversubscribe target/release/comm-conformance [--backend mpi|nccl]
//!        [--progress thread|poll] [--max-count N] [--no-verify]
//! ```
//! Exit status 0 when every case passed on every rank; 2 when a check failed; 3 when the
//! backend is unavailable (NCCL without CUDA: the reason is printed, the run is skipped).

use std::time::Duration;

use clap::{Parser, ValueEnum};
use switchyard_comm::Communicator;
use switchyard_comm::mpi::{MpiEnv, MpiOptions};
use switchyard_tools::cli::Progress;
use switchyard_tools::comm_conformance::{Options, run_all};

/// The communicator conformance suite on the MPI (or NCCL) backend, under mpirun: exit status
/// 0 when every case passed on every rank, 2 when a check failed, 3 when the backend is
/// unavailable.
#[derive(Parser)]
#[command(name = "comm-conformance")]
struct Args {
    /// Backend under test.
    #[arg(long, value_enum, default_value_t = Backend::Mpi)]
    backend: Backend,
    /// Progress of non-blocking MPI operations.
    #[arg(long, value_enum, default_value_t)]
    progress: Progress,
    /// Largest element count of one MPI call; lower it to exercise the chunked paths.
    #[arg(long, default_value_t = i32::MAX as usize)]
    max_count: usize,
    /// Without the collective signature check (the mismatch case is skipped).
    #[arg(long)]
    no_verify: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// MPI.
    Mpi,
    /// NCCL over MPI's bootstrap (built with the `nccl` feature; needs CUDA).
    Nccl,
}

fn main() {
    let args = Args::parse();
    let backend = match args.backend {
        Backend::Mpi => "mpi",
        Backend::Nccl => "nccl",
    };
    let progress = args.progress.mpi();
    let max_count = args.max_count;
    // Without the signature check (the default of `CommConfig`) the mismatch case is skipped.
    let verify_collectives = !args.no_verify;
    let (_env, world) = MpiEnv::init(MpiOptions {
        progress,
        verify_collectives,
        timeout: Duration::from_secs(120),
        max_count,
    })
    .unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let comm: Box<dyn Communicator> = match args.backend {
        Backend::Mpi => Box::new(world),
        #[cfg(feature = "nccl")]
        Backend::Nccl => {
            let rank0 = world.rank() == 0;
            match switchyard_comm::nccl::NcclComm::new(Box::new(world), None) {
                Ok(c) => Box::new(c),
                Err(e) => {
                    if rank0 {
                        println!("SKIPPED: nccl conformance: {e}");
                    }
                    std::process::exit(3)
                }
            }
        }
        #[cfg(not(feature = "nccl"))]
        Backend::Nccl => {
            eprintln!("--backend nccl needs the `nccl` feature (cargo build --features nccl)");
            std::process::exit(1)
        }
    };
    let opts = Options::default();
    let report = match run_all(comm.as_ref(), &opts) {
        Ok(r) => r,
        Err(e) => comm.abort(&format!("conformance suite: {e}"), 1),
    };
    println!(
        "[{backend} progress={progress:?} max_count={max_count} verify={verify_collectives}] {}",
        report.summary()
    );
    if !report.ok() {
        std::process::exit(2);
    }
}
