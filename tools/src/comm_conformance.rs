//! The conformance suite: one body of checks run unchanged against every backend — `local`
//! threads inside `cargo test`, `mpi` under `mpirun -np 2|3|4` and `nccl` on GPUs (both via
//! the `comm-conformance` binary).
//!
//! Every rank runs every case in the same order. A failed check is recorded and the suite
//! goes on (returning early would leave the other ranks waiting in the next collective);
//! only a communication error ends it. The final step agrees on the failure count across
//! ranks, so every rank reports a failure seen anywhere.

// The suite returns comm's error type by value, as comm does (see its crate allowance).
#![allow(clippy::result_large_err)]

use std::time::Duration;

use switchyard_comm::{Buffer, CommError, Communicator, DType, ReduceOp, Result};

/// What a run of the suite found on this rank.
#[derive(Debug, Default)]
pub struct Report {
    pub rank: usize,
    pub size: usize,
    pub passed: Vec<String>,
    /// (case, what was wrong)
    pub failed: Vec<(String, String)>,
    /// (case, why it did not run)
    pub skipped: Vec<(String, String)>,
    /// Failures summed over all ranks.
    pub failed_anywhere: usize,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && self.failed_anywhere == 0
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "rank {}/{}: {} passed, {} failed here, {} failed on any rank, {} skipped",
            self.rank,
            self.size,
            self.passed.len(),
            self.failed.len(),
            self.failed_anywhere,
            self.skipped.len()
        );
        for (c, m) in &self.failed {
            s += &format!("\n  FAILED {c}: {m}");
        }
        for (c, m) in &self.skipped {
            s += &format!("\n  skipped {c}: {m}");
        }
        s
    }
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Elements per peer in the large-message case.
    pub large_elems: usize,
    /// Timeout used by the timeout case.
    pub short_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            large_elems: 2 << 20,
            short_timeout: Duration::from_millis(300),
        }
    }
}

struct Checker {
    failures: Vec<String>,
}

impl Checker {
    fn expect(&mut self, cond: bool, msg: impl FnOnce() -> String) {
        if !cond && self.failures.len() < 5 {
            self.failures.push(msg());
        }
    }

    fn same(&mut self, what: &str, got: &Buffer, want: &Buffer) {
        if let Some(d) = diff(got, want) {
            self.expect(false, || format!("{what}: {d}"));
        }
    }
}

fn diff(got: &Buffer, want: &Buffer) -> Option<String> {
    if got.dtype() != want.dtype() || got.len() != want.len() {
        return Some(format!(
            "got {} {} elements, want {} {}",
            got.len(),
            got.dtype(),
            want.len(),
            want.dtype()
        ));
    }
    (0..got.len())
        .find(|&i| got.get_f64(i) != want.get_f64(i))
        .map(|i| {
            format!(
                "element {i}: got {}, want {}",
                got.get_f64(i),
                want.get_f64(i)
            )
        })
}

type Case = fn(&dyn Communicator, &Options, &mut Checker) -> Result<Option<String>>;

/// Runs every case on `comm` (all ranks must call it). `Err` only for communication errors.
pub fn run_all(comm: &dyn Communicator, opts: &Options) -> Result<Report> {
    let cases: [(&str, Case); 14] = [
        ("identity", identity),
        ("barrier", barrier),
        ("broadcast", broadcast),
        ("all_reduce", all_reduce),
        ("all_gather_v", all_gather_v),
        ("reduce_scatter", reduce_scatter),
        ("all_to_all_v", all_to_all_v),
        ("all_to_all_v_zero", all_to_all_v_zero),
        ("point_to_point", point_to_point),
        ("split", split),
        ("nonblocking_overlap", nonblocking_overlap),
        ("large_messages", large_messages),
        ("mismatch", mismatch),
        ("timeout", timeout),
    ];
    let mut report = Report {
        rank: comm.rank(),
        size: comm.size(),
        ..Default::default()
    };
    for (name, case) in cases {
        let mut ck = Checker { failures: vec![] };
        let skipped = case(comm, opts, &mut ck).map_err(|e| annotate(name, e))?;
        if let Some(why) = skipped {
            report.skipped.push((name.to_string(), why));
        } else if ck.failures.is_empty() {
            report.passed.push(name.to_string());
        } else {
            report
                .failed
                .push((name.to_string(), ck.failures.join("; ")));
        }
    }
    let mut n = Buffer::I64(vec![report.failed.len() as i64]);
    comm.all_reduce(&mut n, ReduceOp::Sum)?;
    report.failed_anywhere = n.get_f64(0) as usize;
    Ok(report)
}

fn annotate(case: &str, e: CommError) -> CommError {
    eprintln!("conformance case `{case}` hit a communication error");
    e
}

/// Small exact value of element `i` of a message from `src` to `dst` (fits u8 and bf16).
fn val(src: usize, dst: usize, i: usize) -> f64 {
    ((src * 16 + dst * 4 + i) % 101) as f64
}

fn identity(c: &dyn Communicator, _: &Options, ck: &mut Checker) -> Result<Option<String>> {
    let (r, n) = (c.rank(), c.size());
    ck.expect(r < n, || format!("rank {r} >= size {n}"));
    let got = c.all_gather_v(&Buffer::I64(vec![r as i64]), &vec![1; n])?;
    ck.same(
        "ranks gathered",
        &got,
        &Buffer::I64((0..n as i64).collect()),
    );
    Ok(None)
}

fn barrier(c: &dyn Communicator, _: &Options, ck: &mut Checker) -> Result<Option<String>> {
    for _ in 0..3 {
        c.barrier()?;
    }
    let out = c.i_barrier()?.wait()?;
    ck.expect(out.is_empty(), || "i_barrier returned data".into());
    Ok(None)
}

fn broadcast(c: &dyn Communicator, _: &Options, ck: &mut Checker) -> Result<Option<String>> {
    let (r, n) = (c.rank(), c.size());
    for dt in DType::ALL {
        for root in [0, n - 1] {
            for len in [0, 17] {
                let want = Buffer::from_fn(dt, len, |i| val(root, 0, i));
                let mut b = if r == root {
                    want.clone()
                } else {
                    Buffer::zeros(dt, len)
                };
                c.broadcast(&mut b, root)?;
                ck.same(&format!("{dt} root {root} len {len}"), &b, &want);
            }
        }
    }
    Ok(None)
}

fn all_reduce(c: &dyn Communicator, _: &Options, ck: &mut Checker) -> Result<Option<String>> {
    let (r, n) = (c.rank(), c.size());
    let s = (n * (n + 1) / 2) as f64;
    for dt in DType::ALL {
        for len in [0, 33] {
            let f = |i: usize| (i % 5 + 1) as f64;
            let mine = Buffer::from_fn(dt, len, |i| (r + 1) as f64 * f(i));
            let mut ops = vec![(ReduceOp::Sum, s), (ReduceOp::Max, n as f64)];
            if dt.is_float() {
                ops.push((ReduceOp::Mean, s / n as f64));
            }
            for (op, k) in ops {
                let mut b = mine.clone();
                c.all_reduce(&mut b, op)?;
                ck.same(
                    &format!("{dt} {op:?} len {len}"),
                    &b,
                    &Buffer::from_fn(dt, len, |i| k * f(i)),
                );
            }
        }
        if !dt.is_float() {
            // Rejected before any communication, identically on every rank.
            let mut b = Buffer::zeros(dt, 3);
            let e = c.all_reduce(&mut b, ReduceOp::Mean);
            ck.expect(matches!(e, Err(CommError::InvalidArgument { .. })), || {
                format!("mean of {dt} gave {e:?}, want InvalidArgument")
            });
        }
    }
    // Non-blocking version.
    let b = c
        .i_all_reduce(Buffer::F32(vec![r as f32; 5]), ReduceOp::Sum)?
        .wait()?;
    ck.same(
        "i_all_reduce",
        &b,
        &Buffer::F32(vec![(n * (n - 1) / 2) as f32; 5]),
    );
    Ok(None)
}

fn all_gather_v(c: &dyn Communicator, _: &Options, ck: &mut Checker) -> Result<Option<String>> {
    let (r, n) = (c.rank(), c.size());
    let counts: Vec<usize> = (0..n).collect(); // rank 0 contributes nothing
    for dt in DType::ALL {
        let send = Buffer::from_fn(dt, counts[r], |i| val(r, 0, i));
        let got = c.all_gather_v(&send, &counts)?;
        let want: Vec<f64> = (0..n)
            .flat_map(|j| (0..counts[j]).map(move |i| val(j, 0, i)))
            .collect();
        ck.same(
            &format!("{dt}"),
            &got,
            &Buffer::from_fn(dt, want.len(), |i| want[i]),
        );
    }
    Ok(None)
}

fn reduce_scatter(c: &dyn Communicator, _: &Options, ck: &mut Checker) -> Result<Option<String>> {
    let (r, n) = (c.rank(), c.size());
    let counts: Vec<usize> = (0..n).map(|j| (j * 2 + 1) % 4).collect(); // includes zero for n=4? 1,3,1,3
    let mut counts = counts;
    counts[n - 1] = 0; // the last rank receives nothing
    if n == 1 {
        counts[0] = 3;
    }
    let total: usize = counts.iter().sum();
    let s = (n * (n + 1) / 2) as f64;
    let f = |i: usize| (i % 4 + 1) as f64;
    let off: usize = counts[..r].iter().sum();
    for dt in DType::ALL {
        let send = Buffer::from_fn(dt, total, |i| (r + 1) as f64 * f(i));
        for (op, k) in [(ReduceOp::Sum, s), (ReduceOp::Max, n as f64)] {
            let got = c.reduce_scatter(&send, &counts, op)?;
            ck.same(
                &format!("{dt} {op:?}"),
                &got,
                &Buffer::from_fn(dt, counts[r], |i| k * f(off + i)),
            );
        }
    }
    Ok(None)
}

fn a2a_counts(src: usize, dst: usize) -> usize {
    (src + 2 * dst) % 4 // uneven, with zeros
}

fn all_to_all_v(c: &dyn Communicator, _: &Options, ck: &mut Checker) -> Result<Option<String>> {
    let (r, n) = (c.rank(), c.size());
    let sc: Vec<usize> = (0..n).map(|j| a2a_counts(r, j)).collect();
    let rc: Vec<usize> = (0..n).map(|j| a2a_counts(j, r)).collect();
    for dt in DType::ALL {
        let sv: Vec<f64> = (0..n)
            .flat_map(|j| (0..sc[j]).map(move |i| val(r, j, i)))
            .collect();
        let rv: Vec<f64> = (0..n)
            .flat_map(|j| (0..rc[j]).map(move |i| val(j, r, i)))
            .collect();
        let send = Buffer::from_fn(dt, sv.len(), |i| sv[i]);
        let want = Buffer::from_fn(dt, rv.len(), |i| rv[i]);
        let mut got = Buffer::zeros(dt, rv.len());
        c.all_to_all_v(&send, &sc, &mut got, &rc)?;
        ck.same(&format!("{dt} blocking"), &got, &want);
        let got = c.i_all_to_all_v(send, sc.clone(), rc.clone())?.wait()?;
        ck.same(&format!("{dt} non-blocking"), &got, &want);
    }
    Ok(None)
}

fn all_to_all_v_zero(
    c: &dyn Communicator,
    _: &Options,
    ck: &mut Checker,
) -> Result<Option<String>> {
    let n = c.size();
    for dt in [DType::F32, DType::U8] {
        let mut got = Buffer::zeros(dt, 0);
        c.all_to_all_v(&Buffer::zeros(dt, 0), &vec![0; n], &mut got, &vec![0; n])?;
        ck.expect(got.is_empty() && got.dtype() == dt, || {
            format!("{dt}: got {} {} elements", got.len(), got.dtype())
        });
    }
    Ok(None)
}

fn point_to_point(c: &dyn Communicator, _: &Options, ck: &mut Checker) -> Result<Option<String>> {
    let (r, n) = (c.rank(), c.size());
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    for dt in DType::ALL {
        let send = Buffer::from_fn(dt, 9 + r, |i| val(r, next, i));
        let mut recv = Buffer::zeros(dt, 9 + prev);
        c.send_recv(&send, next, &mut recv, prev, 3)?;
        ck.same(
            &format!("{dt} ring"),
            &recv,
            &Buffer::from_fn(dt, 9 + prev, |i| val(prev, r, i)),
        );
    }
    // Zero-length message, and tags matched out of order.
    let zr = c.i_recv(Buffer::zeros(DType::I64, 0), prev, 4)?;
    let a = c.i_recv(Buffer::zeros(DType::I64, 2), prev, 6)?;
    let b = c.i_recv(Buffer::zeros(DType::I64, 1), prev, 5)?;
    let s1 = c.i_send(Buffer::I64(vec![r as i64]), next, 5)?;
    let s2 = c.i_send(Buffer::I64(vec![r as i64, -1]), next, 6)?;
    let s0 = c.i_send(Buffer::I64(vec![]), next, 4)?;
    let (got_a, got_b) = (a.wait()?, b.wait()?);
    let z = zr.wait()?;
    ck.same("tag 6", &got_a, &Buffer::I64(vec![prev as i64, -1]));
    ck.same("tag 5", &got_b, &Buffer::I64(vec![prev as i64]));
    ck.expect(z.is_empty(), || "zero-length message".into());
    let back = s1.wait()?;
    ck.same(
        "i_send hands the buffer back",
        &back,
        &Buffer::I64(vec![r as i64]),
    );
    s2.wait()?;
    s0.wait()?;
    c.barrier()?;
    Ok(None)
}

fn split(c: &dyn Communicator, _: &Options, ck: &mut Checker) -> Result<Option<String>> {
    let (r, n) = (c.rank(), c.size());
    // Two colours (even / odd parent ranks), ordered by descending parent rank.
    let sub = c.split((r % 2) as u32, -(r as i32))?;
    let members: Vec<i64> = (0..n)
        .rev()
        .filter(|q| q % 2 == r % 2)
        .map(|q| q as i64)
        .collect();
    ck.expect(sub.size() == members.len(), || {
        format!("sub size {} want {}", sub.size(), members.len())
    });
    let pos = members.iter().position(|&q| q == r as i64).unwrap();
    ck.expect(sub.rank() == pos, || {
        format!("sub rank {} want {pos}", sub.rank())
    });
    let got = sub.all_gather_v(&Buffer::I64(vec![r as i64]), &vec![1; sub.size()])?;
    ck.same(
        "parent ranks of the sub-communicator",
        &got,
        &Buffer::I64(members.clone()),
    );
    // The sub-communicator is independent of its parent: interleave collectives on both.
    let pending = sub.i_all_reduce(Buffer::I64(vec![r as i64]), ReduceOp::Sum)?;
    let mut all = Buffer::I64(vec![1]);
    c.all_reduce(&mut all, ReduceOp::Sum)?;
    ck.same("parent all_reduce", &all, &Buffer::I64(vec![n as i64]));
    let s = pending.wait()?;
    ck.same(
        "sub all_reduce",
        &s,
        &Buffer::I64(vec![members.iter().sum()]),
    );
    // Nested split, and one communicator per rank.
    let nested = sub.split(0, 0)?;
    ck.expect(
        nested.size() == sub.size() && nested.rank() == sub.rank(),
        || "nested split changed the group".into(),
    );
    let mut b = Buffer::F32(vec![1.0]);
    nested.all_reduce(&mut b, ReduceOp::Sum)?;
    ck.same(
        "nested all_reduce",
        &b,
        &Buffer::F32(vec![sub.size() as f32]),
    );
    let alone = c.split(r as u32, 0)?;
    ck.expect(alone.size() == 1 && alone.rank() == 0, || {
        "singleton split".into()
    });
    let mut got = Buffer::zeros(DType::U8, 2);
    alone.all_to_all_v(&Buffer::U8(vec![7, 8]), &[2], &mut got, &[2])?;
    ck.same("singleton all_to_all_v", &got, &Buffer::U8(vec![7, 8]));
    Ok(None)
}

/// Busy work that the optimiser cannot remove.
fn compute(iters: usize) -> f64 {
    let mut x = 1.0f64;
    for i in 0..iters {
        x = std::hint::black_box(x * 1.000_000_1 + (i & 7) as f64 * 1e-9);
    }
    x
}

fn nonblocking_overlap(
    c: &dyn Communicator,
    _: &Options,
    ck: &mut Checker,
) -> Result<Option<String>> {
    let (r, n) = (c.rank(), c.size());
    let per = 1 << 16;
    let send = Buffer::from_fn(DType::F32, per * n, |i| val(r, i / per, i % per));
    // Three operations in flight while we compute; waited in another order than issued.
    let mut a2a = c.i_all_to_all_v(send, vec![per; n], vec![per; n])?;
    let red = c.i_all_reduce(Buffer::F64(vec![r as f64; 1000]), ReduceOp::Max)?;
    let gat = c.i_all_gather_v(Buffer::U8(vec![r as u8; 3]), vec![3; n])?;
    let mut polls = 0usize;
    let mut acc = 0.0;
    while !a2a.test()? && polls < 100_000 {
        acc += compute(2_000);
        polls += 1;
    }
    ck.expect(acc.is_finite(), || "compute".into());
    let g = gat.wait()?;
    ck.same(
        "all_gather_v",
        &g,
        &Buffer::U8((0..n).flat_map(|j| [j as u8; 3]).collect()),
    );
    let m = red.wait()?;
    ck.same(
        "all_reduce max",
        &m,
        &Buffer::F64(vec![(n - 1) as f64; 1000]),
    );
    let got = a2a.wait()?;
    ck.same(
        "all_to_all_v",
        &got,
        &Buffer::from_fn(DType::F32, per * n, |i| val(i / per, r, i % per)),
    );
    Ok(None)
}

fn large_messages(c: &dyn Communicator, o: &Options, ck: &mut Checker) -> Result<Option<String>> {
    let (r, n) = (c.rank(), c.size());
    let per = o.large_elems;
    let v = |src: usize, dst: usize, i: usize| ((src * 7 + dst * 3 + i) % 1021) as f32;
    let send = Buffer::F32((0..per * n).map(|i| v(r, i / per, i % per)).collect());
    let mut got = Buffer::zeros(DType::F32, per * n);
    c.all_to_all_v(&send, &vec![per; n], &mut got, &vec![per; n])?;
    let want = Buffer::F32((0..per * n).map(|i| v(i / per, r, i % per)).collect());
    ck.same(
        &format!("all_to_all_v {} MiB per peer", (per * 4) >> 20),
        &got,
        &want,
    );
    drop((send, want));
    let mut b = Buffer::F32((0..per).map(|i| (i % 13) as f32).collect());
    c.all_reduce(&mut b, ReduceOp::Sum)?;
    ck.same(
        "all_reduce",
        &b,
        &Buffer::F32((0..per).map(|i| ((i % 13) * n) as f32).collect()),
    );
    let mut u = if r == 0 {
        Buffer::U8((0..per * 4).map(|i| (i % 251) as u8).collect())
    } else {
        Buffer::zeros(DType::U8, per * 4)
    };
    c.broadcast(&mut u, 0)?;
    ck.same(
        "broadcast",
        &u,
        &Buffer::U8((0..per * 4).map(|i| (i % 251) as u8).collect()),
    );
    Ok(None)
}

fn mismatch(c: &dyn Communicator, _: &Options, ck: &mut Checker) -> Result<Option<String>> {
    let (r, n) = (c.rank(), c.size());
    if n < 2 {
        return Ok(Some("needs two ranks".into()));
    }
    if !c.detects_mismatch() {
        return Ok(Some(format!("{} does not detect mismatches", c.name())));
    }
    // A throw-away communicator each: a mismatch poisons it.
    let sub = c.split(0, r as i32)?;
    let mut b = Buffer::F32(vec![0.0; if r == 0 { 3 } else { 4 }]);
    let e = sub.all_reduce(&mut b, ReduceOp::Sum);
    ck.expect(matches!(e, Err(CommError::Mismatch { .. })), || {
        format!("all_reduce of 3 vs 4 elements gave {e:?}")
    });
    let sub = c.split(0, r as i32)?;
    let mut rc = vec![1; n];
    if r == 0 {
        rc[1] = 2; // expects one more element from rank 1 than rank 1 sends
    }
    let total = rc.iter().sum();
    let mut got = Buffer::zeros(DType::I64, total);
    let e = sub.all_to_all_v(&Buffer::I64(vec![0; n]), &vec![1; n], &mut got, &rc);
    let ok =
        matches!(&e, Err(CommError::Mismatch { detail, .. }) if r > 1 || detail.contains("rank 1"));
    ck.expect(ok, || format!("all_to_all_v count mismatch gave {e:?}"));
    let sub = c.split(0, r as i32)?;
    let e = if r == 0 {
        sub.barrier()
    } else {
        sub.all_reduce(&mut Buffer::F32(vec![1.0]), ReduceOp::Sum)
    };
    ck.expect(matches!(e, Err(CommError::Mismatch { .. })), || {
        format!("barrier vs all_reduce gave {e:?}")
    });
    c.barrier()?;
    Ok(None)
}

fn timeout(c: &dyn Communicator, o: &Options, ck: &mut Checker) -> Result<Option<String>> {
    let (r, n) = (c.rank(), c.size());
    if n < 2 {
        return Ok(Some("needs two ranks".into()));
    }
    let last = n - 1;
    let mut sub = c.split(0, r as i32)?;
    sub.set_timeout(o.short_timeout);
    if r != last {
        // The last rank stays away until everyone else has timed out.
        let e = sub.barrier();
        match &e {
            Err(
                err @ CommError::Timeout {
                    op, comm, missing, ..
                },
            ) => {
                ck.expect(op.contains("barrier"), || format!("op {op:?}"));
                ck.expect(comm == sub.name(), || format!("comm {comm:?}"));
                ck.expect(missing == &vec![last], || format!("missing {missing:?}"));
                let msg = err.to_string();
                ck.expect(
                    msg.contains("did not arrive") && msg.contains(&format!("[{last}]")),
                    || format!("message {msg:?}"),
                );
            }
            other => ck.expect(false, || format!("want a timeout, got {other:?}")),
        }
        // A poisoned communicator refuses further work.
        let again = sub.barrier();
        ck.expect(again.is_err(), || {
            "poisoned communicator accepted a barrier".into()
        });
        c.send(&Buffer::U8(vec![1]), last, 99)?;
    } else {
        for q in 0..last {
            let mut t = Buffer::zeros(DType::U8, 1);
            c.recv(&mut t, q, 99)?;
        }
        // Arriving late completes the abandoned barrier instead of hanging.
        sub.set_timeout(c.timeout());
        sub.barrier()?;
    }
    c.barrier()?;
    Ok(None)
}
