//! Context attention (ring and TokenRing) vs dense attention on the MPI backend, forward
//! and backward: the cases of `cp::conformance` (causal zigzag, causal contiguous,
//! non-causal). Launch under mpirun (2 and 4 ranks in `scripts/test.sh`):
//!
//! ```sh
//! cargo build --release -p switchyard-tools --features mpi --bin cp-parity
//! mpirun -np 4 --oversubscribe target/release/cp-parity
//! ```
//! Exit status 0 when every case is within 1e-5 (max abs) on every rank; 2 otherwise.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use switchyard_comm::mpi::{MpiEnv, MpiOptions};
use switchyard_comm::{Buffer, Communicator, ReduceOp};
use switchyard_tools::cp_conformance::{cases, check};

const TOL: f32 = 1e-5;

/// Context attention (ring and TokenRing) against dense attention on the MPI backend, forward
/// and backward, under mpirun: exit status 0 when every case is within 1e-5 (max abs) on every
/// rank, 2 otherwise. No options.
#[derive(Parser)]
#[command(name = "cp-parity")]
struct Args {}

fn main() {
    Args::parse();
    let (_env, world) = MpiEnv::init(MpiOptions {
        timeout: Duration::from_secs(120),
        ..MpiOptions::default()
    })
    .unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let comm: Arc<dyn Communicator> = Arc::new(world);
    let (rank, size) = (comm.rank(), comm.size());
    let mut failed = 0;
    for case in cases(size) {
        let errors = match check(comm.clone(), &case) {
            Ok(e) => e,
            Err(e) => comm.abort(&format!("cp-parity {case:?}: {e}"), 1),
        };
        // The worst error over the ranks, as every rank sees it.
        let mut worst = Buffer::F32(vec![errors.out, errors.dq, errors.dk, errors.dv]);
        if let Err(e) = comm.all_reduce(&mut worst, ReduceOp::Max) {
            comm.abort(&format!("cp-parity: all-reduce of the errors: {e}"), 1);
        }
        let worst = worst.into_vec::<f32>().unwrap_or_default();
        let max = worst.iter().copied().fold(0f32, f32::max);
        let ok = max <= TOL;
        failed += usize::from(!ok);
        if rank == 0 {
            println!(
                "[mpi W={size}] {:?} {:?} causal={}: max abs error out {:.1e} dq {:.1e} dk {:.1e} \
                 dv {:.1e} {}",
                case.algorithm,
                case.sharding,
                case.causal,
                worst[0],
                worst[1],
                worst[2],
                worst[3],
                if ok { "ok" } else { "FAILED" }
            );
        }
    }
    if rank == 0 {
        println!(
            "[mpi W={size}] cp-parity: {} cases, {failed} failed",
            cases(size).len()
        );
    }
    if failed > 0 {
        std::process::exit(2);
    }
}
