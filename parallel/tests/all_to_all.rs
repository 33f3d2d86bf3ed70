//! The all-to-all autodiff op alone: forward and backward on 2 and 3 local ranks against a
//! hand-computed permutation, zero counts included; and the mesh's validation.

mod common;

use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use common::{run_world, to_vec};
use switchyard_comm::{Communicator, LocalWorld};
use switchyard_parallel::all_to_all::{RowExchange, all_to_all_rows};
use switchyard_parallel::{Mesh, ParallelError, Placement};

const D: usize = 3;

fn row_value(src: usize, dst: usize, k: usize, col: usize) -> f32 {
    (1000 * src + 100 * dst + 10 * k + col) as f32
}

fn probe_value(rank: usize, row: usize, col: usize) -> f32 {
    1.0 + 7.0 * rank as f32 + 0.5 * row as f32 + 0.01 * col as f32
}

/// `c[i][j]`: rows rank i sends to rank j.
#[allow(clippy::needless_range_loop)]
fn check_exchange(c: Vec<Vec<usize>>) {
    let p = c.len();
    let results = run_world(p, |world| {
        let me = world.rank();
        let comm: Arc<dyn Communicator> = Arc::from(world);
        let device = Device::flex().autodiff();
        let mut x = Vec::new();
        for (j, &rows) in c[me].iter().enumerate() {
            for k in 0..rows {
                x.extend((0..D).map(|col| row_value(me, j, k, col)));
            }
        }
        let sent: usize = c[me].iter().sum();
        let x = Tensor::<2>::from_data(TensorData::new(x, [sent, D]), &device).require_grad();
        let recv: Vec<usize> = (0..p).map(|i| c[i][me]).collect();
        let ex = RowExchange::new(comm, c[me].clone(), recv.clone()).unwrap();
        let y = all_to_all_rows(x.clone(), &ex).unwrap();
        let received: usize = recv.iter().sum();
        assert_eq!(y.dims(), [received, D]);
        let probe: Vec<f32> = (0..received)
            .flat_map(|r| (0..D).map(move |col| probe_value(me, r, col)))
            .collect();
        let probe = Tensor::<2>::from_data(TensorData::new(probe, [received, D]), &device);
        let loss = (y.clone() * probe).sum() + x.clone().sum() * 0.0;
        let grads = loss.backward();
        let dx = x.grad(&grads).map(to_vec).unwrap_or_default();
        (to_vec(y), dx)
    });
    for (j, (y, dx)) in results.iter().enumerate() {
        // Forward: blocks from ranks 0..p in order.
        let mut want = Vec::new();
        for (i, row) in c.iter().enumerate() {
            for k in 0..row[j] {
                want.extend((0..D).map(|col| row_value(i, j, k, col)));
            }
        }
        assert_eq!(y, &want, "forward on rank {j}");
        // Backward: input row (dst, k) of rank j gets the probe of rank dst at its position.
        let mut want_dx = Vec::new();
        for dst in 0..p {
            let before: usize = (0..j).map(|i| c[i][dst]).sum();
            for k in 0..c[j][dst] {
                want_dx.extend((0..D).map(|col| probe_value(dst, before + k, col)));
            }
        }
        assert_eq!(dx, &want_dx, "backward on rank {j}");
    }
}

#[test]
fn two_ranks_forward_and_backward() {
    check_exchange(vec![vec![1, 2], vec![3, 0]]);
}

#[test]
fn three_ranks_with_zero_counts() {
    check_exchange(vec![vec![0, 2, 1], vec![3, 0, 0], vec![1, 4, 2]]);
}

#[test]
fn a_rank_that_sends_and_receives_nothing_still_joins() {
    check_exchange(vec![vec![2, 0, 1], vec![0, 0, 0], vec![1, 0, 2]]);
}

#[test]
fn inner_device_exchange_without_autodiff() {
    let out = run_world(2, |world| {
        let me = world.rank();
        let comm: Arc<dyn Communicator> = Arc::from(world);
        let x = Tensor::<2>::from_data(
            TensorData::new(vec![me as f32; 2 * D], [2, D]),
            &Device::flex(),
        );
        let ex = RowExchange::new(comm, vec![1, 1], vec![1, 1]).unwrap();
        to_vec(all_to_all_rows(x, &ex).unwrap())
    });
    assert_eq!(out[0], vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    assert_eq!(out[1], vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
}

#[test]
fn mesh_rejects_bad_layouts_with_what_to_change() {
    let world = LocalWorld::new(4, std::time::Duration::from_secs(5), None);
    let mut it = world.into_iter();
    let c: Box<dyn Communicator> = Box::new(it.next().unwrap());
    let err = Mesh::new(c, 3, 2, 8).unwrap_err();
    assert!(
        matches!(err, ParallelError::WorldSize { world: 4, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("product is 4"), "{err}");
    let c: Box<dyn Communicator> = Box::new(it.next().unwrap());
    let err = Mesh::new(c, 1, 4, 6).unwrap_err();
    assert!(
        matches!(
            err,
            ParallelError::EpDoesNotDivide {
                ep: 4,
                experts: 6,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("[1, 2, 3, 6]"), "{err}");
    assert!(Placement::from_owners(vec![0, 2], 2).is_err());
    let p = Placement::contiguous(8, 4).unwrap();
    assert_eq!(p.experts_of(1), vec![2, 3]);
    assert_eq!(p.owner(7), 3);
}

#[test]
fn mesh_axes_are_consecutive_for_ep() {
    let out = run_world(4, |world| {
        let mesh = Mesh::new(world, 2, 2, 4).unwrap();
        (
            mesh.rank(),
            mesh.dp_rank(),
            mesh.ep_rank(),
            mesh.dp_comm().size(),
            mesh.ep_comm().size(),
        )
    });
    for (r, dp_rank, ep_rank, dp_size, ep_size) in out {
        assert_eq!((dp_rank, ep_rank, dp_size, ep_size), (r / 2, r % 2, 2, 2));
    }
}
