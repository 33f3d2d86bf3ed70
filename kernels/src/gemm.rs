//! f32 GEMM on slices: a packed micro-kernel GEMM in the BLIS style (a 6 x 16 register tile,
//! AVX2 + FMA where the CPU has them, a portable Rust tile elsewhere).
//!
//! Two properties the fused ops rely on:
//! - **Shape-independent rounding.** Every element of C is the sum over k in order, in
//!   blocks of `KC` (each block summed in a register, then added to C), whatever the number
//!   of rows or columns of the call, the operands' strides, or how the caller splits C into
//!   tasks. Splitting a GEMM into row or column blocks therefore gives the same bits as one
//!   call, which is what lets the pipelined expert block chunk its rows freely and lets the
//!   parallel drivers here pick any tiling.
//! - **B packed once.** B is copied into `NR`-column slivers (the layout the micro-kernel
//!   streams); A is read in place (6 rows at a time, any strides). A weight used by many row
//!   blocks is packed once per op ([`PackedB`]) instead of once per call.
//!
//! Callers parallelise over independent GEMMs (experts, heads) or use [`gemm_parallel`],
//! which tiles one GEMM over the thread pool.
//!
//! Shape legend: C [M, N] = A [M, K] B [K, N].

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

/// Rows of the register tile.
pub const MR: usize = 6;
/// Columns of the register tile (two 8-lane vectors).
const NR: usize = 16;
/// Depth of one block of k: a packed B sliver (KC x NR, 16 KiB) stays in L1 while the
/// kernel walks the rows.
const KC: usize = 256;
/// Rows per pass over a B block: MC x KC of A (144 KiB) stays in L2.
const MC: usize = 144;

/// A matrix operand: `rows x cols` elements of `data`, element (i, j) at
/// `i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `rows x cols`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// Row-major with a leading dimension (`ld` elements from one row to the next).
    pub fn with_ld(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: ld,
            col_stride: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Rows `r0..r0 + rows` (no copy).
    pub fn rows(self, r0: usize, rows: usize) -> Self {
        assert!(r0 + rows <= self.rows, "gemm: row range out of the matrix");
        Self {
            data: if rows == 0 {
                &[]
            } else {
                &self.data[r0 * self.row_stride..]
            },
            rows,
            ..self
        }
    }

    /// Columns `c0..c0 + cols` (no copy).
    pub fn cols(self, c0: usize, cols: usize) -> Self {
        self.t().rows(c0, cols).t()
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// B [K, N] packed for the micro-kernel: per block of `KC` rows of k, `ceil(N / NR)`
/// slivers of `kc x NR` values (row p of a sliver holds B[p, j0..j0 + NR], zero-padded past
/// N). Pack a weight once and multiply many row blocks by it with [`gemm_packed`].
pub struct PackedB {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl PackedB {
    /// Packs `b`, its slivers spread over the thread pool.
    pub fn new(b: Mat) -> Self {
        assert!(b.fits(), "gemm: B is out of its slice");
        let (k, n) = (b.rows, b.cols);
        let slivers = n.div_ceil(NR);
        let len = k * slivers * NR;
        let mut data = Vec::with_capacity(len);
        if b.col_stride == 1 {
            // SAFETY: the buffer holds `len` values.
            unsafe { pack_rows(b, SharedOut(data.as_mut_ptr())) };
            // SAFETY: `pack_rows` wrote all of them.
            unsafe { data.set_len(len) };
            return Self { data, k, n };
        }
        // One task per (k block, sliver): chunks of the buffer in order, each written whole.
        let mut tasks = Vec::with_capacity(k.div_ceil(KC) * slivers);
        let mut rest = &mut data.spare_capacity_mut()[..len];
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            for s in 0..slivers {
                let (sliver, tail) = rest.split_at_mut(kc * NR);
                tasks.push((p0, kc, s * NR, sliver));
                rest = tail;
            }
        }
        tasks
            .into_par_iter()
            .for_each(|(p0, kc, j0, out)| pack_sliver(b, p0, kc, j0, out));
        // SAFETY: the slivers cover 0..len and `pack_sliver` writes every element of one.
        unsafe { data.set_len(len) };
        Self { data, k, n }
    }

    /// The packed block of k rows starting at `p0` (a multiple of `KC`).
    fn block(&self, p0: usize) -> &[f32] {
        let width = self.n.div_ceil(NR) * NR;
        let kc = KC.min(self.k - p0);
        &self.data[p0 * width..(p0 + kc) * width]
    }
}

/// Packs a B with contiguous rows into `out` (the whole [`PackedB`] layout), one task per
/// run of rows of a k block ([`pack_block_rows`]).
///
/// # Safety
/// `out` must be valid for writes of `b.rows * ceil(b.cols / NR) * NR` values, untouched by
/// anyone else during the call.
unsafe fn pack_rows(b: Mat, out: SharedOut) {
    const ROWS: usize = 32;
    let k = b.rows;
    let width = b.cols.div_ceil(NR) * NR;
    let tasks: Vec<(usize, usize, usize)> = (0..k)
        .step_by(KC)
        .flat_map(|p0| {
            let kc = KC.min(k - p0);
            (0..kc).step_by(ROWS).map(move |q0| (p0, kc, q0))
        })
        .collect();
    tasks.into_par_iter().for_each(|(p0, kc, q0)| {
        let rows = q0..(q0 + ROWS).min(kc);
        // SAFETY: the k block at p0 lies inside `out`; the tasks' row runs are disjoint.
        unsafe { pack_block_rows(b, p0, kc, rows, out.at(p0 * width)) }
    });
}

/// Packs rows `rows` of the k block B[p0..p0 + kc, ..] (B with contiguous rows) into the
/// block's sliver layout at `block` (`ceil(N / NR)` slivers of `kc x NR`, zero past N):
/// reads each row front to back and writes its `NR`-wide pieces into every sliver. (Going
/// sliver by sliver instead reads one cache line per row, rows apart, and waits on memory:
/// about 1.5x the time.)
///
/// # Safety
/// `block` must be valid for writes of those rows of every sliver, and no one else may
/// touch them during the call.
unsafe fn pack_block_rows(b: Mat, p0: usize, kc: usize, rows: Range<usize>, block: *mut f32) {
    debug_assert_eq!(b.col_stride, 1);
    let n = b.cols;
    for p in rows {
        let row = &b.data[(p0 + p) * b.row_stride..][..n];
        for (s, j0) in (0..n).step_by(NR).enumerate() {
            // SAFETY: row p of sliver s (caller's contract).
            let dst = unsafe { block.add((s * kc + p) * NR) };
            if j0 + NR <= n {
                let src: &[f32; NR] = row[j0..j0 + NR].try_into().expect("NR values");
                // SAFETY: as above; NR values.
                unsafe { dst.cast::<[f32; NR]>().write_unaligned(*src) };
            } else {
                for c in 0..NR {
                    let v = if j0 + c < n { row[j0 + c] } else { 0.0 };
                    // SAFETY: as above.
                    unsafe { dst.add(c).write(v) };
                }
            }
        }
    }
}

/// Packs B[p0..p0 + kc, j0..j0 + NR] (zero past N) into `out` (kc x NR, row-major),
/// writing every element of it; for a B without contiguous rows (those with contiguous
/// rows go through [`pack_block_rows`]).
fn pack_sliver(b: Mat, p0: usize, kc: usize, j0: usize, out: &mut [MaybeUninit<f32>]) {
    debug_assert_eq!(out.len(), kc * NR);
    let nr = NR.min(b.cols - j0);
    if b.row_stride == 1 {
        // B is a transposed view: column j is contiguous in k; write it down the sliver.
        for c in 0..NR {
            if c < nr {
                let start = (j0 + c) * b.col_stride + p0;
                for (p, &v) in b.data[start..start + kc].iter().enumerate() {
                    out[p * NR + c].write(v);
                }
            } else {
                for p in 0..kc {
                    out[p * NR + c].write(0.0);
                }
            }
        }
    } else {
        for (p, row) in out.chunks_exact_mut(NR).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                v.write(if c < nr { b.at(p0 + p, j0 + c) } else { 0.0 });
            }
        }
    }
}

thread_local! {
    /// Per-thread buffer for the B block of [`gemm`] calls.
    static PACK_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Per-thread buffer for a packed block of A.
    static PACK_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Checks the operands against C's slice.
fn check(a: &Mat, b_rows: usize, n: usize, c_len: usize, ldc: usize) {
    assert_eq!(b_rows, a.cols, "gemm: inner dimensions differ");
    assert!(a.fits(), "gemm: A is out of its slice");
    assert!(
        a.rows == 0 || n == 0 || (a.rows - 1) * ldc + n <= c_len,
        "gemm: the output is out of its slice"
    );
}

/// `c = a b` (or `c += a b` with `accumulate`), `c` row-major `a.rows x b.cols` with
/// leading dimension `ldc`. Single-threaded; packs B block by block into a per-thread
/// buffer.
pub fn gemm(a: Mat, b: Mat, c: &mut [f32], ldc: usize, accumulate: bool) {
    check(&a, b.rows, b.cols, c.len(), ldc);
    assert!(b.fits(), "gemm: B is out of its slice");
    // SAFETY: C's extent was checked against its slice, which is borrowed mutably.
    unsafe { gemm_raw(a, Source::Plain(b), b.cols, c.as_mut_ptr(), ldc, accumulate) }
}

/// [`gemm`] with B packed beforehand.
pub fn gemm_packed(a: Mat, b: &PackedB, c: &mut [f32], ldc: usize, accumulate: bool) {
    check(&a, b.k, b.n, c.len(), ldc);
    // SAFETY: as in `gemm`.
    unsafe { gemm_raw(a, Source::Packed(b), b.n, c.as_mut_ptr(), ldc, accumulate) }
}

/// `c = a b`, B packed beforehand, into an uninitialised row-major C of exactly
/// `a.rows x b.cols`: every element is written before any read of it (later k blocks add
/// to what the first wrote), so a fresh buffer needs no zeroing. Returns C, initialised.
pub fn gemm_packed_into<'c>(a: Mat, b: &PackedB, c: &'c mut [MaybeUninit<f32>]) -> &'c mut [f32] {
    assert_eq!(
        c.len(),
        a.rows * b.n,
        "gemm: C must be exactly a.rows x b.cols"
    );
    check(&a, b.k, b.n, c.len(), b.n);
    // SAFETY: C's extent was checked against its slice, which is borrowed mutably; without
    // `accumulate` every element is written, so the slice is initialised afterwards.
    unsafe {
        gemm_raw(a, Source::Packed(b), b.n, c.as_mut_ptr().cast(), b.n, false);
        assume_init(c)
    }
}

/// `v` as the initialised values it holds.
///
/// # Safety
/// Every element of `v` must have been written.
pub(crate) unsafe fn assume_init(v: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: the caller's contract; MaybeUninit<f32> has f32's layout.
    unsafe { &mut *(v as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Where the B blocks come from: packed on the fly from a matrix, or packed beforehand.
#[derive(Clone, Copy)]
enum Source<'a> {
    Plain(Mat<'a>),
    Packed(&'a PackedB),
}

/// C[M, n] (+)= A B with C at `c` (leading dimension `ldc`).
///
/// # Safety
/// `c` must be valid for writes of rows `0..a.rows`, columns `0..n` with stride `ldc`, and
/// no other thread may touch those elements during the call.
unsafe fn gemm_raw(a: Mat, b: Source, n: usize, c: *mut f32, ldc: usize, accumulate: bool) {
    let (m, k) = (a.rows, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: (i, j) is C's (caller's contract); written, never read, so C
                    // may be uninitialised.
                    unsafe { c.add(i * ldc + j).write(0.0) };
                }
            }
        }
        return;
    }
    for p0 in (0..k).step_by(KC) {
        let kc = KC.min(k - p0);
        let add = accumulate || p0 > 0;
        let a_block = a.cols(p0, kc);
        match b {
            Source::Plain(b) => PACK_B.with_borrow_mut(|buf| {
                let len = kc * n.div_ceil(NR) * NR;
                buf.clear();
                buf.reserve(len);
                if b.col_stride == 1 {
                    // SAFETY: the buffer holds the block's `len` values.
                    unsafe { pack_block_rows(b, p0, kc, 0..kc, buf.as_mut_ptr()) };
                } else {
                    for (s, out) in buf.spare_capacity_mut()[..len]
                        .chunks_exact_mut(kc * NR)
                        .enumerate()
                    {
                        pack_sliver(b, p0, kc, s * NR, out);
                    }
                }
                // SAFETY: the slivers cover 0..len and each is written whole.
                unsafe { buf.set_len(len) };
                // SAFETY: passed on from the caller.
                unsafe { macro_kernel(a_block, buf, n, c, ldc, add) }
            }),
            Source::Packed(packed) => {
                let block = packed.block(p0);
                // SAFETY: passed on from the caller.
                unsafe { macro_kernel(a_block, block, n, c, ldc, add) }
            }
        }
    }
}

/// Whether A is copied into 6-row slivers before the kernel walks it: a transposed view
/// (each k a new cache line for the same 6 rows) or rows 4 KiB apart or more (the 6 rows
/// fall into the same L1 sets) would be re-read from L2 for every sliver of B. Row-major A
/// with short rows is read in place.
fn pack_a_first(a: &Mat) -> bool {
    a.col_stride != 1 || a.row_stride >= 1024
}

/// Packs A[mc, kc] into 6-row slivers (row p of a sliver holds A[r0..r0 + 6, p], zero past
/// the last row).
fn pack_a(a: Mat, out: &mut Vec<f32>) {
    let (mc, kc) = (a.rows, a.cols);
    // Every element is written below (the buffer keeps its old values until then).
    out.resize(mc.div_ceil(MR) * MR * kc, 0.0);
    for (s, sliver) in out.chunks_exact_mut(MR * kc).enumerate() {
        let rows = MR.min(mc - s * MR);
        let first = s * MR * a.row_stride;
        for (p, out) in sliver.chunks_exact_mut(MR).enumerate() {
            let out: &mut [f32; MR] = out.try_into().expect("slivers of MR");
            let at = first + p * a.col_stride;
            if rows == MR && a.row_stride == 1 {
                // A fixed-size copy: a variable-length one is a `memcpy` call per 24 bytes
                // (two thirds of the time of packing a transposed A).
                *out = a.data[at..at + MR].try_into().expect("MR values");
            } else {
                for (r, v) in out.iter_mut().enumerate() {
                    *v = if r < rows {
                        a.data[at + r * a.row_stride]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// C[M, n] (+)= A[M, kc] B, B as `ceil(n / NR)` packed slivers of `kc x NR`.
///
/// # Safety
/// As [`gemm_raw`].
unsafe fn macro_kernel(a: Mat, b: &[f32], n: usize, c: *mut f32, ldc: usize, add: bool) {
    let (m, kc) = (a.rows, a.cols);
    let avx2 = has_avx2_fma();
    let packing = pack_a_first(&a);
    let mut a_pad = [0f32; MR * KC];
    for i0 in (0..m).step_by(MC) {
        let mc = MC.min(m - i0);
        let block = a.rows(i0, mc);
        let edge = mc / MR * MR;
        if !packing && edge < mc {
            // The last rows of an in-place A, copied once into a zero-padded block.
            a_pad[..MR * kc].fill(0.0);
            for r in edge..mc {
                for p in 0..kc {
                    a_pad[(r - edge) * kc + p] = block.at(r, p);
                }
            }
        }
        PACK_A.with_borrow_mut(|packed| {
            if packing {
                pack_a(block, packed);
            }
            for j0 in (0..n).step_by(NR) {
                let nr = NR.min(n - j0);
                let sliver = &b[j0 / NR * kc * NR..][..kc * NR];
                for r0 in (0..mc).step_by(MR) {
                    let mr = MR.min(mc - r0);
                    let rows = if packing {
                        Mat {
                            data: &packed[r0 * kc..(r0 + MR) * kc],
                            rows: MR,
                            cols: kc,
                            row_stride: 1,
                            col_stride: MR,
                        }
                    } else if mr == MR {
                        block.rows(r0, MR)
                    } else {
                        Mat::new(&a_pad[..MR * kc], MR, kc)
                    };
                    // SAFETY: the tile (i0 + r0.., j0..) of mr x nr lies inside C (caller's
                    // contract).
                    let tile = unsafe { c.add((i0 + r0) * ldc + j0) };
                    if mr == MR && nr == NR {
                        // SAFETY: as above: a full MR x NR tile of C at stride `ldc`; `rows` has MR
                        // rows, `sliver` kc x NR values; `avx2` was detected at runtime.
                        unsafe { tile_kernel(avx2, rows, sliver, tile, ldc, add) };
                        continue;
                    }
                    // An edge: the whole register tile goes to scratch, its valid part to C.
                    let mut scratch = [0f32; MR * NR];
                    // SAFETY: `scratch` is a local MR x NR array, valid at stride NR; `rows` has MR
                    // rows, `sliver` kc x NR values; `avx2` comes from runtime detection.
                    unsafe { tile_kernel(avx2, rows, sliver, scratch.as_mut_ptr(), NR, false) };
                    for r in 0..mr {
                        for q in 0..nr {
                            let v = scratch[r * NR + q];
                            // SAFETY: (r, q) is inside the tile's valid part.
                            unsafe {
                                let dst = tile.add(r * ldc + q);
                                *dst = if add { *dst + v } else { v };
                            }
                        }
                    }
                }
            }
        });
    }
}

pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One 6 x 16 tile: C (+)= A[6, kc] B_sliver[kc, 16].
///
/// # Safety
/// `c` valid for 6 rows x 16 columns with stride `ldc`; `a` has 6 rows and `b` kc x 16.
unsafe fn tile_kernel(avx2: bool, a: Mat, b: &[f32], c: *mut f32, ldc: usize, add: bool) {
    debug_assert!(a.rows == MR && a.fits() && b.len() >= a.cols * NR);
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the CPU has AVX2 and FMA (checked by the caller); bounds as above.
        unsafe { tile_avx2(a, b.as_ptr(), c, ldc, add) };
        return;
    }
    let _ = avx2;
    // SAFETY: passed on.
    unsafe { tile_portable(a, b, c, ldc, add) }
}

/// The AVX2 + FMA tile: 12 accumulators (6 rows x 2 vectors), A broadcast from memory.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(a: Mat, b: *const f32, c: *mut f32, ldc: usize, add: bool) {
    use std::arch::x86_64::*;
    let kc = a.cols;
    let base = a.data.as_ptr();
    let rows: [*const f32; MR] = std::array::from_fn(|r| base.wrapping_add(r * a.row_stride));
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let mut b = b;
    let mut off = 0;
    // SAFETY: element (r, p) of A is at rows[r] + p * col_stride, inside A's slice; B's
    // sliver holds kc x NR values; C's tile is valid (caller's contract).
    unsafe {
        for _ in 0..kc {
            let b0 = _mm256_loadu_ps(b);
            let b1 = _mm256_loadu_ps(b.add(8));
            for r in 0..MR {
                let av = _mm256_broadcast_ss(&*rows[r].add(off));
                acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
            }
            b = b.add(NR);
            off += a.col_stride;
        }
        for (r, [lo, hi]) in acc.into_iter().enumerate() {
            let p = c.add(r * ldc);
            if add {
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), lo));
                _mm256_storeu_ps(p.add(8), _mm256_add_ps(_mm256_loadu_ps(p.add(8)), hi));
            } else {
                _mm256_storeu_ps(p, lo);
                _mm256_storeu_ps(p.add(8), hi);
            }
        }
    }
}

/// The tile in portable Rust (CPUs without AVX2 + FMA): the same order of summation,
/// multiply and add rounded separately.
unsafe fn tile_portable(a: Mat, b: &[f32], c: *mut f32, ldc: usize, add: bool) {
    let mut acc = [[0f32; NR]; MR];
    for (p, b_row) in b.chunks_exact(NR).take(a.cols).enumerate() {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = a.at(r, p);
            for (x, &bv) in acc_r.iter_mut().zip(b_row) {
                *x += av * bv;
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (q, &v) in acc_r.iter().enumerate() {
            // SAFETY: C's tile is valid (caller's contract); read only when adding.
            unsafe {
                let dst = c.add(r * ldc + q);
                dst.write(if add { *dst + v } else { v });
            }
        }
    }
}

/// A raw pointer to C shared by tasks that write disjoint tiles of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the tasks given one write disjoint elements (see `gemm_parallel`).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// `offset` elements past the start (a method, so closures capture the whole wrapper).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Row-major `c[m, n] = a[m, k] b[k, n]` (or `+=`) tiled over the thread pool: B is packed
/// once and the tasks are row blocks; when C has fewer rows than columns (a weight
/// gradient) the tasks are column blocks, each packing its own columns of B. Same bits as [`gemm`] (see the module
/// note), whatever the tiling.
pub fn gemm_parallel(a: Mat, b: Mat, c: &mut [f32], accumulate: bool) {
    check(&a, b.rows, b.cols, c.len(), b.cols);
    assert!(b.fits(), "gemm: B is out of its slice");
    // SAFETY: C's extent was checked against its slice, which is borrowed mutably.
    unsafe { gemm_parallel_raw(a, b, c.as_mut_ptr(), accumulate) }
}

/// `a b` as a new row-major `a.rows x b.cols` buffer, tiled like [`gemm_parallel`]. Every
/// element is written once before it is read, so the buffer is not zeroed first (the LM
/// head's logits are 32 MiB a step in `bench-small`).
pub fn gemm_parallel_new(a: Mat, b: Mat) -> Vec<f32> {
    let len = a.rows * b.cols;
    check(&a, b.rows, b.cols, len, b.cols);
    assert!(b.fits(), "gemm: B is out of its slice");
    let mut c = Vec::with_capacity(len);
    // SAFETY: the capacity holds C; without `accumulate` the kernel writes each element
    // before any read of it (later k blocks add to what the first wrote).
    unsafe {
        gemm_parallel_raw(a, b, c.spare_capacity_mut().as_mut_ptr().cast(), false);
        c.set_len(len);
    }
    c
}

/// [`gemm_parallel`] on a raw C of `a.rows x b.cols`, leading dimension `b.cols`.
///
/// # Safety
/// As [`gemm_raw`]; C may be uninitialised when `accumulate` is false.
unsafe fn gemm_parallel_raw(a: Mat, b: Mat, c: *mut f32, accumulate: bool) {
    let (m, n) = (a.rows, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // Several tasks per thread so that a core held up elsewhere does not hold up the op.
    let tasks = threads * 4;
    let out = SharedOut(c);
    if m >= n || n < tasks * NR {
        let packed = PackedB::new(b);
        let block = m.div_ceil(tasks).next_multiple_of(MR).max(4 * MR);
        (0..m.div_ceil(block)).into_par_iter().for_each(|t| {
            let r0 = t * block;
            let rows = block.min(m - r0);
            // SAFETY: rows r0..r0 + rows of C, disjoint between tasks, inside C (checked).
            unsafe {
                gemm_raw(
                    a.rows(r0, rows),
                    Source::Packed(&packed),
                    n,
                    out.at(r0 * n),
                    n,
                    accumulate,
                )
            }
        });
    } else {
        let slivers = n.div_ceil(NR);
        let per_task = slivers.div_ceil(tasks);
        (0..slivers.div_ceil(per_task))
            .into_par_iter()
            .for_each(|t| {
                let j0 = t * per_task * NR;
                let cols = (per_task * NR).min(n - j0);
                // SAFETY: columns j0..j0 + cols of every row, disjoint between tasks. Each
                // task packs its own columns of B, block by block.
                unsafe {
                    gemm_raw(
                        a,
                        Source::Plain(b.cols(j0, cols)),
                        cols,
                        out.at(j0),
                        n,
                        accumulate,
                    )
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: Mat, b: Mat) -> Vec<f32> {
        let mut c = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0f64;
                for l in 0..a.cols {
                    s += a.at(i, l) as f64 * b.at(l, j) as f64;
                }
                c[i * b.cols + j] = s as f32;
            }
        }
        c
    }

    fn close(x: &[f32], y: &[f32], tol: f32) {
        assert_eq!(x.len(), y.len());
        for (i, (a, b)) in x.iter().zip(y).enumerate() {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "element {i}: {a} vs {b}"
            );
        }
    }

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7 + seed * 13) % 23) as f32 - 11.0) * 0.093)
            .collect()
    }

    /// Every stride combination, edges in all three dimensions (k over two KC blocks), and
    /// accumulation, against a float64 reference.
    #[test]
    fn matches_naive_with_transposes_edges_and_accumulation() {
        for &(m, k, n) in &[
            (37, 19, 23),
            (13, 300, 45),
            (6, 256, 16),
            (150, 520, 33),
            (1, 1, 1),
        ] {
            let a = data(m * k, 1);
            let b = data(k * n, 2);
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let expect = naive(Mat::new(&a, m, k), Mat::new(&b, k, n));
            for a_op in [Mat::new(&a, m, k), Mat::new(&at, k, m).t()] {
                for b_op in [Mat::new(&b, k, n), Mat::new(&bt, n, k).t()] {
                    let mut c = vec![f32::NAN; m * n];
                    gemm(a_op, b_op, &mut c, n, false);
                    close(&c, &expect, 1e-4);
                    gemm_parallel(a_op, b_op, &mut c, true);
                    let doubled: Vec<f32> = expect.iter().map(|x| 2.0 * x).collect();
                    close(&c, &doubled, 1e-4);
                }
            }
        }
    }

    /// The property the fused ops rely on: the bits of an element do not depend on the
    /// call's shape, tiling, strides or packing.
    #[test]
    fn same_bits_for_any_split_stride_or_packing() {
        let (m, k, n) = (97, 600, 70);
        let a = data(m * k, 3);
        let b = data(k * n, 4);
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let (a_m, b_m) = (Mat::new(&a, m, k), Mat::new(&b, k, n));
        let mut whole = vec![0f32; m * n];
        gemm(a_m, b_m, &mut whole, n, false);
        // Row blocks of uneven sizes, with the transposed-view B.
        let mut rows = vec![0f32; m * n];
        let mut r0 = 0;
        for len in [1, 5, 6, 7, 13, 65] {
            let len = len.min(m - r0);
            gemm(
                a_m.rows(r0, len),
                Mat::new(&bt, n, k).t(),
                &mut rows[r0 * n..],
                n,
                false,
            );
            r0 += len;
        }
        assert_eq!(whole, rows);
        // Column blocks through a packed B.
        let mut cols = vec![0f32; m * n];
        for (j0, len) in [(0, 17), (17, 16), (33, 37)] {
            let packed = PackedB::new(b_m.cols(j0, len));
            gemm_packed(a_m, &packed, &mut cols[j0..], n, false);
        }
        assert_eq!(whole, cols);
        // The parallel driver, both tilings.
        let mut par = vec![0f32; m * n];
        gemm_parallel(a_m, b_m, &mut par, false);
        assert_eq!(whole, par);
        assert_eq!(whole, gemm_parallel_new(a_m, b_m));
        let wide = data(k * 900, 5);
        let mut one = vec![0f32; 8 * 900];
        let mut tiled = vec![0f32; 8 * 900];
        gemm(
            a_m.rows(0, 8),
            Mat::new(&wide, k, 900),
            &mut one,
            900,
            false,
        );
        gemm_parallel(a_m.rows(0, 8), Mat::new(&wide, k, 900), &mut tiled, false);
        assert_eq!(one, tiled);
    }

    #[test]
    fn portable_tile_matches_naive() {
        let kc = 40;
        let a = data(MR * kc, 6);
        let b = data(kc * NR, 7);
        let expect = naive(Mat::new(&a, MR, kc), Mat::new(&b, kc, NR));
        let mut c = vec![1f32; MR * NR];
        // SAFETY: C is 6 x 16 with stride 16; A 6 x kc; B kc x 16.
        unsafe { tile_portable(Mat::new(&a, MR, kc), &b, c.as_mut_ptr(), NR, true) };
        let plus_one: Vec<f32> = expect.iter().map(|x| x + 1.0).collect();
        close(&c, &plus_one, 1e-5);
    }

    #[test]
    fn empty_inner_dimension_zeroes_or_keeps() {
        let mut c = vec![3f32; 4];
        gemm(Mat::new(&[], 2, 0), Mat::new(&[], 0, 2), &mut c, 2, true);
        assert_eq!(c, vec![3.0; 4]);
        gemm(Mat::new(&[], 2, 0), Mat::new(&[], 0, 2), &mut c, 2, false);
        assert_eq!(c, vec![0.0; 4]);
    }
}
