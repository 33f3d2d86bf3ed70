//! Runs the conformance suite on the MPI (or NCCL) backend; launch under mpirun:
//!
//! ```sh
//! cargo build --release -p switchyard-comm --features mpi --bin comm-conformance
//! mpirun -np 3 --oversubscribe target/release/comm-conformance [--backend mpi|nccl]
//!        [--progress thread|poll] [--max-count N] [--no-verify]
//! ```
//! Exit status 0 when every case passed on every rank; 2 when a check failed; 3 when the
//! backend is unavailable (NCCL without CUDA: the reason is printed, the run is skipped).

use std::time::Duration;

use switchyard_comm::mpi::{MpiEnv, MpiOptions};
use switchyard_comm::{Communicator, MpiProgress};
use switchyard_tools::comm_conformance::{Options, run_all};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .map(|i| args[i + 1].clone())
    };
    let backend = get("--backend").unwrap_or_else(|| "mpi".into());
    let progress = match get("--progress").as_deref() {
        Some("poll") => MpiProgress::Poll,
        _ => MpiProgress::Thread,
    };
    let max_count =
        get("--max-count").map_or(i32::MAX as usize, |s| s.parse().expect("--max-count N"));
    // Without the signature check (the default of `CommConfig`) the mismatch case is skipped.
    let verify_collectives = !args.iter().any(|a| a == "--no-verify");
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
    let comm: Box<dyn Communicator> = match backend.as_str() {
        "mpi" => Box::new(world),
        #[cfg(feature = "nccl")]
        "nccl" => {
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
        other => {
            eprintln!("unknown --backend {other} (mpi, or nccl with --features nccl)");
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
