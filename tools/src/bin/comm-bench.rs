//! Communication benchmarks. Each prints a table and the ratios the README quotes.
//!
//! ```sh
//! # all-to-all(v) bandwidth/latency, Switchyard vs a direct rsmpi MPI_Alltoallv, same run
//! cargo build --release -p switchyard-tools --features mpi --bin comm-bench
//! mpirun -np 2 --oversubscribe target/release/comm-bench a2a
//! mpirun -np 4 --oversubscribe target/release/comm-bench a2a
//! # non-blocking all-to-all overlapping compute on the local backend with a link model
//! cargo run --release -p switchyard-tools --bin comm-bench -- overlap
//! # the same on real MPI, progress thread vs polling (decides the default progress mode)
//! mpirun -np 2 target/release/comm-bench overlap-mpi --progress thread
//! mpirun -np 2 target/release/comm-bench overlap-mpi --progress poll
//! ```

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use switchyard_comm::{Buffer, Communicator, DType, LinkModel, LocalWorld};
use switchyard_tools::cli::Progress;

/// Communication benchmarks: all-to-all(v) against a direct MPI_Alltoallv, and a
/// non-blocking all-to-all overlapping compute. Each prints a table.
#[derive(Parser)]
#[command(name = "comm-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Non-blocking all-to-all overlapping compute on the local backend, without a link model
    /// and with one per bandwidth (rank 0 of a world of threads).
    Overlap(OverlapArgs),
    /// All-to-all(v) latency and bandwidth, 4 KiB to 64 MiB, Switchyard vs a direct rsmpi
    /// MPI_Alltoallv in the same run; under mpirun (`mpi` feature).
    A2a(A2aArgs),
    /// Non-blocking all-to-all overlapping compute on MPI, no MPI calls during the compute;
    /// under mpirun (`mpi` feature).
    OverlapMpi(OverlapMpiArgs),
}

#[derive(clap::Args)]
struct OverlapArgs {
    /// Ranks (threads, one single-threaded compute loop each).
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// MiB each rank sends per all-to-all (split evenly over the ranks).
    #[arg(long, default_value_t = 8)]
    mib: usize,
    /// Link latency per message, microseconds.
    #[arg(long, default_value_t = 5.0)]
    latency_us: f64,
    /// Link bandwidths, Gbit/s, comma-separated: one row each.
    #[arg(long, value_delimiter = ',', default_value = "10,25,50,100,200")]
    bandwidth_gbps: Vec<f64>,
}

#[derive(clap::Args)]
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
struct A2aArgs {
    /// Progress of non-blocking MPI operations.
    #[arg(long, value_enum, default_value_t)]
    progress: Progress,
    /// Rounds of paired timed blocks (Switchyard, direct) per size.
    #[arg(long, default_value_t = 101)]
    rounds: usize,
}

#[derive(clap::Args)]
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
struct OverlapMpiArgs {
    /// Progress of non-blocking MPI operations.
    #[arg(long, value_enum, default_value_t)]
    progress: Progress,
    /// MiB each rank sends per all-to-all (split evenly over the ranks).
    #[arg(long, default_value_t = 64)]
    mib: usize,
}

/// Busy work that cannot be optimised away; `iters` scales the time linearly.
fn compute(iters: usize) -> f64 {
    let mut x = 1.0f64;
    for i in 0..iters {
        x = std::hint::black_box(x * 1.000_000_1 + (i & 7) as f64 * 1e-9);
    }
    x
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Iterations of `compute` that take about `target` seconds on every rank of `c`, measured
/// while all ranks compute at once (so that the sharing of the cores is included).
fn calibrate(c: &dyn Communicator, target: f64) -> usize {
    let mut iters = 1_000_000usize;
    for _ in 0..3 {
        let took = median(
            (0..3)
                .map(|_| {
                    c.barrier().unwrap();
                    let t = Instant::now();
                    std::hint::black_box(compute(iters));
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        );
        iters = ((iters as f64 * target / took) as usize).max(1000);
    }
    iters
}

/// Times of one repetition: (comm alone, compute alone, both issued together).
type Times = (f64, f64, f64);

/// `reps` repetitions of [`Times`] on every rank of `c`.
fn overlap_round(
    c: &dyn Communicator,
    bytes_per_rank: usize,
    iters: usize,
    reps: usize,
) -> Vec<Times> {
    let n = c.size();
    let per = bytes_per_rank / 4 / n;
    let send = Buffer::zeros(DType::F32, per * n);
    let mut times = vec![];
    for _ in 0..reps {
        // Send copies are made and results freed outside the timed regions: only the
        // communication layer and the compute are timed.
        let s = send.clone();
        c.barrier().unwrap();
        let t = Instant::now();
        let out = c
            .i_all_to_all_v(s, vec![per; n], vec![per; n])
            .unwrap()
            .wait()
            .unwrap();
        let tc = t.elapsed().as_secs_f64();
        drop(out);
        c.barrier().unwrap();
        let t = Instant::now();
        std::hint::black_box(compute(iters));
        let tk = t.elapsed().as_secs_f64();
        let s = send.clone();
        c.barrier().unwrap();
        let t = Instant::now();
        let r = c.i_all_to_all_v(s, vec![per; n], vec![per; n]).unwrap();
        std::hint::black_box(compute(iters));
        let out = r.wait().unwrap();
        times.push((tc, tk, t.elapsed().as_secs_f64()));
        drop(out);
    }
    times
}

fn overlap_header() {
    println!(
        "| link | transfer (ms) | compute (ms) | together (ms) | together / max | together / sum | hidden |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
}

/// Medians of the times and, repetition by repetition (so that the machine's load drifts
/// cancel), of together / max, together / sum and `hidden`: the share of the shorter of
/// transfer and compute that disappeared when both were issued together (1 = perfect
/// overlap, 0 = none).
fn overlap_row(label: &str, times: &[Times]) {
    let m = |f: &dyn Fn(&Times) -> f64| median(times.iter().map(f).collect());
    println!(
        "| {label} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        m(&|t| t.0) * 1e3,
        m(&|t| t.1) * 1e3,
        m(&|t| t.2) * 1e3,
        m(&|&(tc, tk, tb)| tb / tc.max(tk)),
        m(&|&(tc, tk, tb)| tb / (tc + tk)),
        m(&|&(tc, tk, tb)| (tc + tk - tb) / tc.min(tk)),
    )
}

/// One row of the overlap table: the all-to-all alone, a compute sized to it alone, and both
/// issued together, on rank 0 of a local world of `ranks` threads.
fn overlap_local_row(ranks: usize, bytes: usize, link: Option<LinkModel>) -> Vec<Times> {
    LocalWorld::run(ranks, Duration::from_secs(60), link, |c| {
        let probe = median(overlap_round(c, bytes, 0, 5).iter().map(|t| t.0).collect());
        let iters = calibrate(c, probe);
        overlap_round(c, bytes, iters, 21)
    })
    .swap_remove(0)
}

fn overlap_local(args: &OverlapArgs) {
    // 8 MiB (the default) stays below glibc's largest mmap threshold, so buffers are reused,
    // not faulted in afresh each time.
    let (ranks, mib, lat) = (args.ranks, args.mib, args.latency_us);
    println!(
        "local backend, {ranks} ranks (threads; one single-threaded compute loop each), \
         all-to-all of {mib} MiB per rank, compute sized to the transfer; medians of 21"
    );
    overlap_header();
    // Without a link model the transfer is the backend's own memory copies, which need a
    // core like the compute does: the floor under every row below.
    overlap_row(
        "none (memory copies only)",
        &overlap_local_row(ranks, mib << 20, None),
    );
    for &gbps in &args.bandwidth_gbps {
        let link = LinkModel::new(lat, gbps);
        overlap_row(
            &format!("{lat} us + {gbps} Gbit/s"),
            &overlap_local_row(ranks, mib << 20, Some(link)),
        );
    }
}

#[cfg(feature = "mpi")]
mod with_mpi {
    use super::*;
    use mpi::collective::CommunicatorCollectives;
    use mpi::datatype::{Partition, PartitionMut};
    use switchyard_comm::ReduceOp;
    use switchyard_comm::mpi::{MpiEnv, MpiOptions};

    fn init(progress: Progress) -> (MpiEnv, Box<dyn Communicator>) {
        let (env, c) = MpiEnv::init(MpiOptions {
            progress: progress.mpi(),
            ..MpiOptions::default()
        })
        .expect("MPI init");
        (env, Box::new(c))
    }

    pub fn a2a(args: &A2aArgs) {
        let (env, c) = init(args.progress);
        let raw = env.rsmpi_world();
        let rounds = args.rounds;
        let (r, n) = (c.rank(), c.size());
        if r == 0 {
            println!(
                "all-to-all(v), {n} ranks, progress {}, f32; size = bytes each rank sends per call \
                 (split evenly over all ranks); {rounds} rounds of alternating timed blocks \
                 (Switchyard, direct), each block ~16 MiB of calls between barriers; \
                 latency = median block / calls; ratio = Switchyard GB/s / direct GB/s; slowest rank",
                args.progress.name()
            );
            println!(
                "| size | Switchyard latency (us) | direct rsmpi latency (us) | Switchyard GB/s | direct GB/s | ratio (median of paired blocks) | ratio (best blocks) |"
            );
            println!("|---:|---:|---:|---:|---:|---:|---:|");
        }
        let mut size = 4usize << 10;
        while size <= 64 << 20 {
            let per = size / 4 / n;
            let counts = vec![per; n];
            let displs: Vec<i32> = (0..n).map(|j| (j * per) as i32).collect();
            let icounts = vec![per as i32; n];
            // Both paths read and write the same memory, so page placement cannot favour one.
            let send = Buffer::F32((0..per * n).map(|i| (i + r) as f32).collect());
            let sendv = send.as_slice::<f32>().unwrap();
            let mut recv = Buffer::zeros(DType::F32, per * n);
            let calls = ((16usize << 20) / size).clamp(1, 1000);
            let block = |switchyard: bool, calls: usize, recv: &mut Buffer| {
                raw.barrier();
                let t = Instant::now();
                for _ in 0..calls {
                    if switchyard {
                        c.all_to_all_v(&send, &counts, recv, &counts).unwrap();
                    } else {
                        let Buffer::F32(v) = recv else { unreachable!() };
                        let sp = Partition::new(sendv, &icounts[..], &displs[..]);
                        let mut rp = PartitionMut::new(&mut v[..], &icounts[..], &displs[..]);
                        raw.all_to_all_varcount_into(&sp, &mut rp);
                    }
                }
                raw.barrier();
                t.elapsed().as_secs_f64() / calls as f64
            };
            let (sw, direct) = (true, false);
            let direct_out = {
                block(direct, 1, &mut recv); // warm-up
                recv.clone()
            };
            block(sw, 1, &mut recv);
            assert_eq!(recv, direct_out, "both paths deliver the same data");
            let (mut ts, mut td) = (vec![], vec![]);
            for round in 0..rounds {
                // Alternate which goes first, so neither always follows the other.
                if round % 2 == 0 {
                    ts.push(block(sw, calls, &mut recv));
                    td.push(block(direct, calls, &mut recv));
                } else {
                    td.push(block(direct, calls, &mut recv));
                    ts.push(block(sw, calls, &mut recv));
                }
            }
            // Slowest rank decides, round by round.
            let mut b = Buffer::F64([ts, td].concat());
            c.all_reduce(&mut b, ReduceOp::Max).unwrap();
            let b = b.into_vec::<f64>().unwrap();
            let (ts, td) = b.split_at(rounds);
            // Ratio of neighbouring blocks, so that slow drifts of the machine's load cancel.
            let paired = median(ts.iter().zip(td).map(|(s, d)| d / s).collect());
            let best = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
            let best_ratio = best(td) / best(ts);
            let (ts, td) = (median(ts.to_vec()), median(td.to_vec()));
            if r == 0 {
                let label = if size >= 1 << 20 {
                    format!("{} MiB", size >> 20)
                } else {
                    format!("{} KiB", size >> 10)
                };
                println!(
                    "| {label} | {:.1} | {:.1} | {:.2} | {:.2} | {:.3} | {:.3} |",
                    ts * 1e6,
                    td * 1e6,
                    size as f64 / ts / 1e9,
                    size as f64 / td / 1e9,
                    paired,
                    best_ratio
                );
            }
            size *= 4;
        }
    }

    pub fn overlap(args: &OverlapMpiArgs) {
        let (_env, c) = init(args.progress);
        let mib = args.mib;
        let probe = median(
            overlap_round(c.as_ref(), mib << 20, 0, 5)
                .iter()
                .map(|t| t.0)
                .collect(),
        );
        let mut b = Buffer::F64(vec![probe]);
        c.all_reduce(&mut b, ReduceOp::Max).unwrap();
        let iters = calibrate(c.as_ref(), b.get_f64(0));
        let res = overlap_round(c.as_ref(), mib << 20, iters, 21);
        if c.rank() == 0 {
            println!(
                "MPI, {} ranks, progress {:?}, all-to-all of {mib} MiB per rank, compute sized to the transfer, no MPI calls during compute",
                c.size(),
                args.progress.name()
            );
            overlap_header();
            overlap_row("shared memory (rank 0)", &res);
        }
    }
}

fn main() {
    match Cli::parse().command {
        Command::Overlap(args) => overlap_local(&args),
        #[cfg(feature = "mpi")]
        Command::A2a(args) => with_mpi::a2a(&args),
        #[cfg(feature = "mpi")]
        Command::OverlapMpi(args) => with_mpi::overlap(&args),
        #[cfg(not(feature = "mpi"))]
        Command::A2a(_) | Command::OverlapMpi(_) => {
            eprintln!(
                "comm-bench: a2a and overlap-mpi need the `mpi` feature (cargo build --features mpi)"
            );
            std::process::exit(2)
        }
    }
}
