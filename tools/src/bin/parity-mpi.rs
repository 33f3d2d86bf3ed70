//! The layout-parity matrix of `switchyard_tools::parity` under MPI: run with
//! `mpirun -np N parity-mpi`; every case whose layout has N ranks runs (each on a duplicate
//! of the world communicator). Prints one line per case; exits 1 on any mismatch.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use switchyard_comm::Communicator;
use switchyard_comm::mpi::{MpiEnv, MpiOptions};
use switchyard_tools::parity::{TOL, all_cases, check_case};

/// The layout-parity matrix under mpirun: every case whose layout has as many ranks as the
/// world runs against one process (loss, gradients, weights); exit status 1 on any mismatch.
/// No options.
#[derive(Parser)]
#[command(name = "parity-mpi")]
struct Args {}

fn main() -> ExitCode {
    Args::parse();
    let (env, world) = match MpiEnv::init(MpiOptions {
        timeout: Duration::from_secs(120),
        ..MpiOptions::default()
    }) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("parity-mpi: {e}");
            return ExitCode::from(2);
        }
    };
    let (rank, n) = (world.rank(), world.size());
    let cases: Vec<_> = all_cases()
        .into_iter()
        .filter(|c| c.world_size() == n)
        .collect();
    let mut failed = 0;
    for case in &cases {
        let dup = world
            .split(0, rank as i32)
            .unwrap_or_else(|e| world.abort(&format!("split: {e}"), 1));
        match check_case(case, dup) {
            Ok(worst) if worst <= TOL => {
                if rank == 0 {
                    println!(
                        "ok   {} {}: max relative error {worst:e}",
                        case.label,
                        case.layout()
                    );
                }
            }
            Ok(worst) => {
                failed += 1;
                if rank == 0 {
                    println!("FAIL {} {}: {worst:e}", case.label, case.layout());
                }
            }
            Err(e) => {
                failed += 1;
                println!("FAIL rank {rank}: {e}");
            }
        }
    }
    if rank == 0 {
        println!(
            "parity-mpi: {} cases on {n} ranks, {failed} failed",
            cases.len()
        );
    }
    drop(world);
    drop(env);
    if failed > 0 || cases.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
