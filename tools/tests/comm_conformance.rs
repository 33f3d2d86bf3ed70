//! The conformance suite on the `local` backend, 1 to 4 ranks, with and without a link model.

use std::time::Duration;

use switchyard_comm::{LinkModel, LocalWorld};
use switchyard_tools::comm_conformance::{Options, run_all};

fn run(n: usize, link: Option<LinkModel>) {
    let opts = Options {
        large_elems: 1 << 20,
        ..Options::default()
    };
    let reports = LocalWorld::run(n, Duration::from_secs(60), link, |c| {
        run_all(c, &opts).unwrap_or_else(|e| panic!("rank {}: {e}", c_rank(c)))
    });
    for r in &reports {
        println!("{}", r.summary());
        assert!(r.ok(), "{}", r.summary());
        assert_eq!(r.passed.len() + r.skipped.len(), 14);
    }
}

fn c_rank(c: &switchyard_comm::local::LocalComm) -> usize {
    use switchyard_comm::Communicator;
    c.rank()
}

#[test]
fn local_1_rank() {
    run(1, None);
}

#[test]
fn local_2_ranks() {
    run(2, None);
}

#[test]
fn local_3_ranks() {
    run(3, None);
}

#[test]
fn local_4_ranks() {
    run(4, None);
}

#[test]
fn local_3_ranks_with_link_model() {
    run(3, Some(LinkModel::new(5.0, 100.0)));
}
