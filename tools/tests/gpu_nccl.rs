//! NCCL on one GPU (features `cuda` and `nccl`): a one-rank NCCL communicator (MPI
//! singleton bootstrap) under the device path of `parallel` (tensors exchanged straight
//! from CUDA memory: all-to-all, all-reduce, grouped and deferred point-to-point) and the
//! host-staged path, their results against the tensor they must reproduce, the two paths'
//! speed side by side, and the watchdog: a receive nobody sends times out, the communicator
//! is aborted and reports itself unusable. One GPU cannot hold a multi-rank NCCL job (NCCL
//! needs a GPU per rank), so the data only travels from a rank to itself here; what that
//! pins is the plumbing (device addresses, offsets inside the memory pool, stream order,
//! element types). Without a GPU, NCCL or MPI every test prints `skipped: <reason>` and
//! passes; `scripts/gpu_check.sh` runs it on a GPU machine.
#![cfg(all(feature = "cuda", feature = "nccl"))]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use burn::tensor::{Device, Tensor, TensorData};
use switchyard_comm::mpi::{MpiEnv, MpiOptions};
use switchyard_comm::nccl::NcclComm;
use switchyard_comm::{Buffer, CommError, Communicator, ReduceOp};
use switchyard_parallel::device_path;
use switchyard_trainer::device::DeviceConfig;

/// GPU 0 (inner device) and a one-rank NCCL communicator on it, or why not. MPI can be
/// initialised once per process: the tests share it (and run on one thread).
fn setup() -> Option<(Device, &'static NcclComm)> {
    static ENV: OnceLock<Result<(MpiEnv, NcclComm), String>> = OnceLock::new();
    let device = match DeviceConfig::Cuda(Some(0)).resolve(0) {
        Ok(d) => d.inner(),
        Err(e) => {
            println!("skipped: {e}");
            return None;
        }
    };
    let made = ENV.get_or_init(|| {
        NcclComm::probe().map_err(|e| e.to_string())?;
        let (env, world) = MpiEnv::init(MpiOptions {
            timeout: Duration::from_secs(60),
            ..MpiOptions::default()
        })
        .map_err(|e| e.to_string())?;
        let comm = NcclComm::new(Box::new(world), Some(0)).map_err(|e| e.to_string())?;
        Ok((env, comm))
    });
    match made {
        Ok((_, comm)) => Some((device, comm)),
        Err(e) => {
            println!("skipped: {e}");
            None
        }
    }
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// A [rows, cols] tensor that is a transposed slice of a larger one: an offset inside the
/// memory pool and a non-contiguous layout, as the expert and attention paths produce.
fn awkward(rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    let big: Vec<f32> = (0..(cols + 3) * (rows + 1))
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    Tensor::<2>::from_data(TensorData::new(big, [cols + 3, rows + 1]), device)
        .slice([3..cols + 3, 1..rows + 1])
        .transpose()
}

#[test]
fn device_path_moves_cuda_tensors_through_nccl_unchanged() {
    let Some((gpu, comm)) = setup() else { return };
    let x = awkward(37, 24, &gpu);
    let want = values(x.clone());
    let what = || "gpu_nccl".to_string();

    let moved = device_path::all_to_all_rows(&x, comm, &[37], &[37], &what)
        .expect("a CUDA f32 tensor on an NCCL communicator takes the device path")
        .unwrap();
    assert_eq!(moved.dims(), [37, 24]);
    assert_eq!(values(moved), want, "all_to_all_rows");

    let flat = x.clone().flatten::<1>(0, 1);
    let summed = device_path::all_reduce_sum(&flat, comm, &what)
        .unwrap()
        .unwrap();
    assert_eq!(values(summed), want, "all_reduce_sum over one rank");

    let got = device_path::send_recv(&flat, comm, 0, want.len(), 0, &what)
        .unwrap()
        .unwrap();
    assert_eq!(values(got), want, "send_recv to itself");

    // Deferred point-to-point from device memory (ring attention's path): a receive and a
    // send of two parts posted, then waited: one NCCL group.
    let x4 = x.clone().reshape([1, 1, 37, 24]);
    let incoming = device_path::post_recv(2 * want.len(), &x4, comm, 0, &what)
        .unwrap()
        .unwrap();
    let sent = device_path::post_send(&[x4.clone(), x4 * 2.0], comm, 0, &what)
        .unwrap()
        .unwrap();
    let got = values(incoming.wait("recv".into()).unwrap());
    sent.wait("send".into()).unwrap();
    let doubled: Vec<f32> = want.iter().map(|v| v * 2.0).collect();
    assert_eq!(
        got,
        [want.clone(), doubled].concat(),
        "post_send / post_recv"
    );

    // The same tensor on the CPU never takes the device path.
    let cpu = Tensor::<2>::from_data(TensorData::new(want.clone(), [37, 24]), &Device::flex());
    assert!(device_path::all_to_all_rows(&cpu, comm, &[37], &[37], &what).is_none());
    println!("device path: all_to_all_rows, all_reduce_sum, send_recv, post_send/post_recv exact");
}

#[test]
fn host_staged_operations_and_deferred_point_to_point() {
    let Some((_, comm)) = setup() else { return };
    let data: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
    let mut b = Buffer::F32(data.clone());
    comm.all_reduce(&mut b, ReduceOp::Sum).unwrap();
    assert_eq!(b.as_slice::<f32>().unwrap(), &data[..]);
    let g = comm
        .all_gather_v(&Buffer::F32(data.clone()), &[1000])
        .unwrap();
    assert_eq!(g.as_slice::<f32>().unwrap(), &data[..]);
    let mut r = Buffer::F32(Vec::new());
    comm.all_to_all_v(&Buffer::F32(data.clone()), &[1000], &mut r, &[1000])
        .unwrap();
    assert_eq!(r.as_slice::<f32>().unwrap(), &data[..]);
    // Posted receive then send, waited afterwards: one NCCL group, no deadlock.
    let recv = comm
        .i_recv(Buffer::zeros(switchyard_comm::DType::F32, 1000), 0, 7)
        .unwrap();
    let send = comm.i_send(Buffer::F32(data.clone()), 0, 7).unwrap();
    let got = recv.wait().unwrap();
    send.wait().unwrap();
    assert_eq!(got.as_slice::<f32>().unwrap(), &data[..]);
    println!("host staged: all_reduce, all_gather_v, all_to_all_v, i_recv + i_send exact");
}

#[test]
fn device_path_against_host_staging_speed() {
    let Some((gpu, comm)) = setup() else { return };
    const N: usize = 16 << 20; // 64 MiB of f32
    const ROUNDS: usize = 10;
    let x = Tensor::<1>::ones([N], &gpu);
    let what = || "gpu_nccl bench".to_string();
    let mut device_s = 0.0;
    let mut staged_s = 0.0;
    for round in 0..=ROUNDS {
        // Alternating, the first round of each discarded (warm-up).
        let t = Instant::now();
        let out = device_path::all_reduce_sum(&x, comm, &what)
            .unwrap()
            .unwrap();
        let _ = values(out.slice(0..1));
        let d = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let buf = Buffer::F32(values(x.clone()));
        let mut buf = comm
            .i_all_reduce(buf, ReduceOp::Sum)
            .unwrap()
            .wait()
            .unwrap();
        let back = Tensor::<1>::from_data(
            TensorData::new(std::mem::take(&mut buf).into_vec::<f32>().unwrap(), [N]),
            &gpu,
        );
        let _ = values(back.slice(0..1));
        let s = t.elapsed().as_secs_f64();
        if round > 0 {
            device_s += d;
            staged_s += s;
        }
    }
    let gb = (N * 4 * ROUNDS) as f64 / 1e9;
    println!(
        "all-reduce of 64 MiB, {ROUNDS} rounds: device path {:.2} GB/s ({:.2} ms each), host \
         staged {:.2} GB/s ({:.2} ms each): device path {:.1}x",
        gb / device_s,
        device_s * 1e3 / ROUNDS as f64,
        gb / staged_s,
        staged_s * 1e3 / ROUNDS as f64,
        staged_s / device_s
    );
}

/// Last (the test names sort it last); on a communicator of its own, split from the shared
/// one, with a 2 s timeout.
#[test]
fn zz_a_receive_nobody_sends_times_out_and_aborts_the_communicator() {
    let Some((_, comm)) = setup() else { return };
    let mut c = comm.split(0, 0).unwrap();
    c.set_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let r = c
        .i_recv(Buffer::zeros(switchyard_comm::DType::F32, 16), 0, 1)
        .unwrap()
        .wait();
    let waited = started.elapsed();
    match &r {
        Err(CommError::Timeout { op, detail, .. }) => {
            assert_eq!(op, "recv");
            assert!(detail.contains("ncclCommAbort"), "{detail}");
            println!(
                "watchdog: timeout after {waited:?}: {}",
                r.as_ref().unwrap_err()
            );
            let after = c.barrier();
            assert!(
                matches!(after, Err(CommError::Poisoned { .. })),
                "after the abort: {after:?}"
            );
        }
        // NCCL may refuse an unmatched receive from itself when the group is issued instead
        // of hanging: a clean error too, but the watchdog was not exercised.
        Err(CommError::Backend { call, .. }) if call.starts_with("nccl") => {
            println!(
                "watchdog not exercised: NCCL refused the unmatched receive: {}",
                r.as_ref().unwrap_err()
            );
        }
        other => panic!("expected a timeout (or NCCL's refusal), got {other:?}"),
    }
}
