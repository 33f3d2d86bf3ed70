//! Single-threaded f32 GEMM on slices, through the `gemm` crate (burn-flex's own kernel,
//! AVX2/AVX-512 micro-kernels picked at run time). Callers parallelise over independent
//! GEMMs (experts, heads, row blocks).

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

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `c = a b` (or `c += a b` with `accumulate`), `c` row-major `a.rows x b.cols` with
/// leading dimension `ldc`.
pub fn gemm(a: Mat, b: Mat, c: &mut [f32], ldc: usize, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: inner dimensions differ");
    assert!(a.fits() && b.fits(), "gemm: an operand is out of its slice");
    assert!(
        m == 0 || n == 0 || (m - 1) * ldc + n <= c.len(),
        "gemm: the output is out of its slice"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: every index the kernel touches lies inside the slices (checked above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Row-major `c[m, n] = a[m, k] b[k, n]` over `threads` row blocks in parallel.
pub fn gemm_rows_parallel(a: Mat, b: Mat, c: &mut [f32], accumulate: bool) {
    use rayon::prelude::*;
    let (m, n) = (a.rows, b.cols);
    let threads = rayon::current_num_threads().max(1);
    // Blocks of whole rows, a few per thread so a busy core does not hold up the step.
    let block = m.div_ceil(threads * 2).max(16);
    c[..m * n]
        .par_chunks_mut(block * n)
        .enumerate()
        .for_each(|(i, c_block)| {
            let r0 = i * block;
            let rows = c_block.len() / n;
            let a_block = Mat {
                data: &a.data[r0 * a.row_stride..],
                rows,
                ..a
            };
            gemm(a_block, b, c_block, n, accumulate);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: Mat, b: Mat) -> Vec<f32> {
        let mut c = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for l in 0..a.cols {
                    c[i * b.cols + j] += a.data[i * a.row_stride + l * a.col_stride]
                        * b.data[l * b.row_stride + j * b.col_stride];
                }
            }
        }
        c
    }

    #[test]
    fn matches_naive_with_transposes_and_accumulation() {
        let (m, k, n) = (37, 19, 23);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.5).collect();
        let expect = naive(Mat::new(&a, m, k), Mat::new(&b, k, n));
        let mut c = vec![0.0; m * n];
        gemm(
            Mat::new(&at, k, m).t(),
            Mat::new(&b, k, n),
            &mut c,
            n,
            false,
        );
        assert_eq!(c, expect);
        gemm_rows_parallel(Mat::new(&a, m, k), Mat::new(&b, k, n), &mut c, true);
        let doubled: Vec<f32> = expect.iter().map(|x| 2.0 * x).collect();
        assert_eq!(c, doubled);
    }
}
