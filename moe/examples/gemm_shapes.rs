use std::time::Instant;
use switchyard_moe::cpu::gemm::{Mat, gemm, gemm_rows_parallel};

fn time(f: &mut dyn FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..7 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn gemm_par(a: Mat, b: Mat, c: &mut [f32], ldc: usize, threads: usize) {
    unsafe {
        gemm::gemm(a.rows, b.cols, a.cols, c.as_mut_ptr(), 1, ldc as isize, false,
            a.data.as_ptr(), a.col_stride as isize, a.row_stride as isize,
            b.data.as_ptr(), b.col_stride as isize, b.row_stride as isize,
            0.0, 1.0, false, false, false, gemm::Parallelism::Rayon(threads));
    }
}

fn main() {
    rayon::ThreadPoolBuilder::new().num_threads(2).build_global().unwrap();
    let shapes: &[(&str, usize, usize, usize, bool)] = &[
        ("lmhead fwd", 2048, 256, 4096, false),
        ("lmhead dx", 2048, 4096, 256, false),
        ("lmhead dW (A^T)", 256, 2048, 4096, true),
        ("proj fwd", 2048, 256, 256, false),
        ("proj dW (A^T)", 256, 2048, 256, true),
        ("expert blk", 256, 256, 512, false),
        ("expert blk down", 256, 512, 256, false),
        ("expert dW (A^T)", 256, 512, 512, true),
        ("expert full", 512, 256, 512, false),
        ("sq1024", 1024, 1024, 1024, false),
    ];
    for &(name, m, k, n, at) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.1 - 0.8).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let mut c = vec![0f32; m * n];
        let am = if at { Mat::new(&a, k, m).t() } else { Mat::new(&a, m, k) };
        let bm = Mat::new(&b, k, n);
        let fl = 2.0 * (m * k * n) as f64 / 1e9;
        let t1 = time(&mut || gemm(am, bm, &mut c, n, false));
        let t_rows = time(&mut || gemm_rows_parallel(am, bm, &mut c, false));
        let t_par = time(&mut || gemm_par(am, bm, &mut c, n, 2));
        println!("{name:<18} {m}x{k}x{n}: 1 thread {:.1} GF/s | rows x2 {:.1} | gemm-par x2 {:.1}", fl / t1, fl / t_rows, fl / t_par);
    }
}
