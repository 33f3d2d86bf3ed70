//! `switchyard bench`: training throughput against the machine's peak, measured side by
//! side in one run (this machine is shared and noisy; absolute times mean little, ratios
//! taken in one run mean more).

use std::fmt;
use std::time::Instant;

use burn::tensor::{Device, Distribution, FloatDType, Tensor};
use switchyard_kernels::gemm::{Mat, gemm_parallel};
use switchyard_kernels::{Fused, fused, set_fused};
use switchyard_moe::Precision;
use switchyard_moe::profile;
use switchyard_parallel::Communicator;

use crate::config::Config;
use crate::data::Corpus;
use crate::device::DeviceConfig;
use crate::error::TrainError;
use crate::trainer::Trainer;

/// What `switchyard bench` runs.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    /// Timed optimizer steps (and as many profiled ones).
    pub steps: u64,
    /// Untimed steps first.
    pub warmup: u64,
    /// Also time steps with the fused CPU paths switched off (see [`run`]).
    pub compare: bool,
}

/// Figures of one benchmark run. Throughput, FLOP/s and CPU time are the whole world's
/// (every rank of the layout); the peaks are measured on rank 0's device and scaled by
/// `devices`; memory and the step breakdown are rank 0's.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// The training device (`device:`) and GEMM precision (`precision:`).
    pub device: String,
    pub precision: Precision,
    /// Ranks of the layout.
    pub ranks: usize,
    /// Devices the ranks compute on: rank threads of one process share its CPU (or its
    /// `cuda:N`); `device: cuda` and MPI processes count one each (processes that share a
    /// node's CPU are counted apart).
    pub devices: usize,
    /// Kernel threads of all ranks together.
    pub threads: usize,
    pub steps: u64,
    pub tokens_per_step: u64,
    pub seconds: f64,
    pub tokens_per_sec: f64,
    pub model_gflops_per_token: f64,
    pub achieved_gflops: f64,
    /// burn's matmul on the training device at the training precision (`device_gemm_n`^2):
    /// the peak MFU is taken against, measured in this run.
    pub device_gemm_gflops: f64,
    pub device_gemm_n: usize,
    /// CPU peaks (absent when training on a GPU).
    pub cpu_peaks: Option<CpuPeaks>,
    /// Peak resident memory of the process (Linux `VmHWM`), bytes.
    pub peak_rss_bytes: Option<u64>,
    /// The device allocator after the timed steps: (bytes in use, bytes reserved); `None`
    /// on the CPU backend, which does not report it.
    pub device_memory: Option<(u64, u64)>,
    pub final_loss: f64,
    /// CPU time of the process over the timed steps (all threads), when the OS reports it.
    pub cpu_seconds: Option<f64>,
    /// Step time by part over the profiled steps: (name, seconds per step); `None` with
    /// rank threads, whose steps the process-wide profiler cannot tell apart.
    pub breakdown: Option<Vec<(&'static str, f64)>>,
    /// With `compare`: the same with every fused path switched off (the burn-op references).
    pub breakdown_reference: Option<Vec<(&'static str, f64)>>,
    /// With `compare`: (what, mean step seconds without it, with it), measured interleaved;
    /// CPU seconds when the OS reports them (robust on a shared machine), else wall.
    pub comparisons: Vec<(String, f64, f64)>,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "device, precision            {}, {}",
            self.device,
            match self.precision {
                Precision::Fp32 => "fp32",
                Precision::Bf16 => "bf16",
            }
        )?;
        if self.ranks > 1 {
            writeln!(
                f,
                "ranks, devices               {}, {}",
                self.ranks, self.devices
            )?;
        }
        writeln!(f, "threads                      {}", self.threads)?;
        writeln!(f, "timed steps                  {}", self.steps)?;
        writeln!(f, "tokens per step              {}", self.tokens_per_step)?;
        writeln!(
            f,
            "step time (mean)             {:.3} s",
            self.seconds / self.steps as f64
        )?;
        writeln!(f, "tokens/s                     {:.0}", self.tokens_per_sec)?;
        if let Some(cpu) = self.cpu_seconds {
            // On a shared machine the wall clock includes waiting for a core; the CPU time
            // over the thread count is the step time had the cores been ours.
            let per_step = cpu / self.steps as f64;
            let tokens = self.tokens_per_step as f64 * self.steps as f64;
            let owned_cores_tps = tokens / (cpu / self.threads as f64);
            writeln!(
                f,
                "CPU time per step            {per_step:.3} s (all threads)"
            )?;
            writeln!(f, "tokens/s per CPU-s x threads {owned_cores_tps:.0}")?;
            writeln!(
                f,
                "GFLOP/s per CPU-s x threads  {:.1}",
                owned_cores_tps * self.model_gflops_per_token
            )?;
        }
        writeln!(
            f,
            "model GFLOP per token (f+b)  {:.4}",
            self.model_gflops_per_token
        )?;
        writeln!(
            f,
            "achieved GFLOP/s             {:.1}",
            self.achieved_gflops
        )?;
        let label = format!("device GEMM GFLOP/s ({}^2)", self.device_gemm_n);
        writeln!(f, "{label:<29}{:.1}", self.device_gemm_gflops)?;
        // Against the peaks of one device: the achieved FLOP/s of one.
        let per_device = self.achieved_gflops / self.devices as f64;
        writeln!(
            f,
            "MFU (achieved / device GEMM) {:.3}",
            per_device / self.device_gemm_gflops
        )?;
        if let Some(cpu) = &self.cpu_peaks {
            let (low, high) = cpu.fma_peak_range;
            writeln!(
                f,
                "FMA peak GFLOP/s (measured)  {:.1} (median of {}, one before each timed step; \
                 range {low:.1}-{high:.1})",
                cpu.fma_peak_gflops, cpu.fma_peak_samples
            )?;
            writeln!(f, "GEMM GFLOP/s (burn, 1024^2)  {:.1}", cpu.gemm_gflops)?;
            writeln!(f, "GEMM GFLOP/s (own, 1024^2)   {:.1}", cpu.own_gemm_gflops)?;
            let best_gemm = cpu.gemm_gflops.max(cpu.own_gemm_gflops);
            writeln!(
                f,
                "achieved / FMA peak          {:.3}",
                per_device / cpu.fma_peak_gflops
            )?;
            writeln!(
                f,
                "achieved / best GEMM         {:.3}",
                per_device / best_gemm
            )?;
        }
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        if let Some(rss) = self.peak_rss_bytes {
            writeln!(f, "peak RSS                     {:.2} GiB", gib(rss))?;
        }
        if let Some((used, reserved)) = self.device_memory {
            writeln!(
                f,
                "device memory                {:.2} GiB in use, {:.2} GiB reserved",
                gib(used),
                gib(reserved)
            )?;
        }
        writeln!(f, "last train loss              {:.4}", self.final_loss)?;
        let share = |t: f64, total: f64| 100.0 * t / total.max(f64::MIN_POSITIVE);
        let Some(breakdown) = &self.breakdown else {
            writeln!(
                f,
                "step time by part: not with rank threads (one rank per process: mpirun)"
            )?;
            return Ok(());
        };
        let total: f64 = breakdown.iter().map(|(_, t)| t).sum();
        match &self.breakdown_reference {
            None => {
                writeln!(f, "step time by part (profiled steps, {total:.3} s/step):")?;
                for (name, t) in breakdown {
                    writeln!(
                        f,
                        "  {name:<18} {:>6.1}%  {:>7.1} ms",
                        share(*t, total),
                        1e3 * t
                    )?;
                }
            }
            Some(reference) => {
                let ref_total: f64 = reference.iter().map(|(_, t)| t).sum();
                writeln!(
                    f,
                    "step time by part (profiled steps; wall): fused {total:.3} s/step, \
                     references {ref_total:.3} s/step"
                )?;
                writeln!(f, "  {:<18} {:>17} {:>17}", "part", "fused", "references")?;
                for ((name, t), (_, r)) in breakdown.iter().zip(reference) {
                    writeln!(
                        f,
                        "  {name:<18} {:>6.1}% {:>7.1} ms {:>6.1}% {:>7.1} ms",
                        share(*t, total),
                        1e3 * t,
                        share(*r, ref_total),
                        1e3 * r
                    )?;
                }
            }
        }
        if !self.comparisons.is_empty() {
            let clock = if self.cpu_seconds.is_some() {
                "CPU"
            } else {
                "wall"
            };
            writeln!(
                f,
                "side by side (interleaved steps, mean {clock} seconds per step):"
            )?;
            writeln!(
                f,
                "  {:<28} {:>10} {:>10} {:>8}",
                "change", "without", "with", "speedup"
            )?;
            for (what, without, with) in &self.comparisons {
                writeln!(
                    f,
                    "  {what:<28} {without:>10.3} {with:>10.3} {:>7.2}x",
                    without / with
                )?;
            }
        }
        Ok(())
    }
}

/// The CPU's peaks, measured in the same run.
#[derive(Debug, Clone)]
pub struct CpuPeaks {
    /// The median of the FMA peaks measured just before each timed step (the host's load
    /// changes within seconds; a peak taken once, apart from the steps, is not their peak).
    pub fma_peak_gflops: f64,
    /// The lowest and highest of those measurements.
    pub fma_peak_range: (f64, f64),
    pub fma_peak_samples: usize,
    /// burn's matmul, 1024^2.
    pub gemm_gflops: f64,
    /// Switchyard's GEMM path (`kernels::gemm::gemm_parallel`, tiled over the pool), 1024^2.
    pub own_gemm_gflops: f64,
}

/// Trains `warmup` untimed and `steps` timed optimizer steps, then `steps` profiled steps
/// for the breakdown, and measures the peaks (rank 0). With `compare`, also runs interleaved
/// steps with every fused path switched off (the burn-op references) and with each one
/// switched off alone, against all on.
///
/// `world`: this rank's communicator when the layout has more than one rank (every rank
/// calls `run`; rank 0's report is the one to print); `in_process`: the ranks that are
/// threads of this process (they share its CPU time and its process-wide switches).
pub fn run(
    cfg: &Config,
    corpus: &Corpus,
    opts: &BenchOptions,
    device: &Device,
    world: Option<Box<dyn Communicator>>,
    in_process: usize,
) -> Result<BenchReport, TrainError> {
    let BenchOptions {
        steps,
        warmup,
        compare,
    } = *opts;
    let threads = rayon::current_num_threads();
    let on_gpu = cfg.device.is_cuda();
    if compare && on_gpu {
        return Err(TrainError::Io(
            "--compare switches the fused CPU paths on and off; use it with `device: cpu`".into(),
        ));
    }
    if compare && in_process > 1 {
        return Err(TrainError::Io(format!(
            "--compare switches the fused paths of the whole process, which holds {in_process} \
             rank threads here; run it at one rank (`--set parallel.dp=1` ... `parallel.ep=1`) \
             or one rank per process (mpirun)"
        )));
    }
    // Ranks that share this rank's device, in this process.
    let sharing = match cfg.device {
        DeviceConfig::Cuda(None) => 1,
        _ => in_process,
    };
    let rank0 = world.as_ref().is_none_or(|w| w.rank() == 0);
    // Peaks on rank 0 only: the ranks of one device would measure it at once.
    let gemm_peaks = (rank0 && !on_gpu).then(|| (gemm_gflops(1024, 3), own_gemm_gflops(1024, 3)));
    let device_gemm_n = if on_gpu { 8192 } else { 1024 };
    let device_gemm_gflops = if rank0 {
        device_gemm_gflops(device, cfg.precision, device_gemm_n, 5)?
    } else {
        f64::NAN
    };
    let mut cfg = cfg.clone();
    let compare_steps = if compare {
        2 * steps * (Fused::ALL.len() as u64 + 1)
    } else {
        0
    };
    cfg.train.steps = warmup + 3 * steps + compare_steps;
    let mut trainer = Trainer::new_on(&cfg, corpus, device, world)?;
    for _ in 0..warmup {
        trainer.step()?;
    }
    let (mut seconds, mut cpu_seconds) = (0.0, Some(0.0));
    let mut tokens = 0;
    let mut final_loss = f64::NAN;
    let mut fma_peaks = Vec::new();
    for _ in 0..steps {
        if rank0 && !on_gpu {
            // The device's threads: those of every rank on it.
            fma_peaks.push(fma_peak_gflops(threads * sharing));
        }
        let started = Instant::now();
        let cpu_started = process_cpu_seconds();
        let report = trainer.step()?;
        seconds += started.elapsed().as_secs_f64();
        let cpu = cpu_started.zip(process_cpu_seconds()).map(|(a, b)| b - a);
        cpu_seconds = cpu_seconds.zip(cpu).map(|(sum, c)| sum + c);
        tokens += report.tokens;
        final_loss = report.loss;
    }
    // Over the world: each rank's share of its process's CPU time and device, its threads.
    let (mut ranks, mut devices, mut all_threads) = (1, 1, threads);
    if let Some(l) = &trainer.layout {
        let sums = l.sum(
            vec![
                cpu_seconds.unwrap_or(f64::NAN) / in_process as f64,
                1.0 / sharing as f64,
                threads as f64,
            ],
            "bench: the ranks' figures",
        )?;
        cpu_seconds = Some(sums[0]).filter(|c| c.is_finite());
        (ranks, devices, all_threads) =
            (l.world_size(), sums[1].round() as usize, sums[2] as usize);
    }
    let cpu_peaks = gemm_peaks.map(|(gemm_gflops, own_gemm_gflops)| {
        fma_peaks.sort_by(f64::total_cmp);
        CpuPeaks {
            fma_peak_gflops: median(&fma_peaks),
            fma_peak_range: (
                fma_peaks.first().copied().unwrap_or(f64::NAN),
                fma_peaks.last().copied().unwrap_or(f64::NAN),
            ),
            fma_peak_samples: fma_peaks.len(),
            gemm_gflops,
            own_gemm_gflops,
        }
    });
    // The breakdown, from separate steps: the markers add graph nodes.
    let per_step = steps.max(1) as f64;
    let breakdown = if in_process == 1 {
        Some(profile_steps(&mut trainer, steps)?)
    } else {
        None
    };
    let mut comparisons = Vec::new();
    let mut breakdown_reference = None;
    if compare {
        let defaults = Fused::ALL.map(fused);
        let restore = || {
            for (op, on) in Fused::ALL.into_iter().zip(defaults) {
                set_fused(op, on);
            }
        };
        for op in Fused::ALL {
            set_fused(op, false);
        }
        breakdown_reference = Some(profile_steps(&mut trainer, steps)?);
        restore();
        // Every path on by default at once, then each path alone with the others at their
        // defaults.
        let on: Vec<Fused> = Fused::ALL.into_iter().filter(|&op| fused(op)).collect();
        let mut cases = vec![("fused paths on by default".to_string(), on)];
        cases.extend(Fused::ALL.map(|op| (op.name().to_string(), vec![op])));
        for (what, ops) in cases {
            let (mut without, mut with) = (0.0, 0.0);
            for _ in 0..steps {
                for &op in &ops {
                    set_fused(op, false);
                }
                without += timed_step(&mut trainer)?;
                for &op in &ops {
                    set_fused(op, true);
                }
                with += timed_step(&mut trainer)?;
            }
            restore();
            comparisons.push((what, without / per_step, with / per_step));
        }
    }
    let tokens_per_sec = tokens as f64 / seconds;
    let flops_per_token = trainer.train_flops_per_token();
    let device_memory = device
        .memory_pool_usage()
        .map(|u| (u.bytes_in_use, u.bytes_reserved));
    Ok(BenchReport {
        device: cfg.device.to_string(),
        precision: cfg.precision,
        ranks,
        devices,
        threads: all_threads,
        steps,
        tokens_per_step: tokens / steps.max(1),
        seconds,
        tokens_per_sec,
        model_gflops_per_token: flops_per_token / 1e9,
        achieved_gflops: tokens_per_sec * flops_per_token / 1e9,
        device_gemm_gflops,
        device_gemm_n,
        cpu_peaks,
        peak_rss_bytes: peak_rss_bytes(),
        device_memory,
        final_loss,
        cpu_seconds,
        breakdown,
        breakdown_reference,
        comparisons,
    })
}

/// Runs `steps` steps with the profiler on: seconds per step by part.
fn profile_steps(
    trainer: &mut Trainer,
    steps: u64,
) -> Result<Vec<(&'static str, f64)>, TrainError> {
    profile::enable(true);
    let started = Instant::now();
    for _ in 0..steps {
        trainer.step()?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let totals = profile::snapshot();
    profile::enable(false);
    let per_step = steps.max(1) as f64;
    Ok(totals
        .table(seconds)
        .into_iter()
        .map(|(name, t)| (name, t / per_step))
        .collect())
}

/// One step's CPU seconds (all threads), or its wall seconds where the OS does not say.
fn timed_step(trainer: &mut Trainer) -> Result<f64, TrainError> {
    let cpu = process_cpu_seconds();
    let wall = trainer.step()?.seconds;
    Ok(cpu.zip(process_cpu_seconds()).map_or(wall, |(a, b)| b - a))
}

/// CPU time of every thread of this process so far (Linux: the first field of each
/// `/proc/self/task/*/schedstat`, in nanoseconds); `None` elsewhere.
fn process_cpu_seconds() -> Option<f64> {
    let mut nanos = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        nanos += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(nanos as f64 * 1e-9)
}

/// Best of `repeats` square f32 matmuls of size `n` through `kernels::gemm` (the kernel
/// the fused ops use), tiled over the thread pool by `gemm_parallel`.
pub fn own_gemm_gflops(n: usize, repeats: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 17) as f32 * 0.1 - 0.8).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
    let mut c = vec![0f32; n * n];
    let mut best = f64::MAX;
    for _ in 0..repeats {
        let started = Instant::now();
        gemm_parallel(Mat::new(&a, n, n), Mat::new(&b, n, n), &mut c, false);
        std::hint::black_box(&c);
        best = best.min(started.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// Best of `repeats` square matmuls of size `n` on `device` (without autodiff) with bf16 or
/// f32 operands, waiting for the device after each.
pub fn device_gemm_gflops(
    device: &Device,
    precision: Precision,
    n: usize,
    repeats: usize,
) -> Result<f64, TrainError> {
    let device = device.clone().inner();
    let operand = || {
        let t = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
        match precision {
            Precision::Fp32 => t,
            Precision::Bf16 => t.cast(FloatDType::BF16),
        }
    };
    let (a, b) = (operand(), operand());
    let sync = || {
        device
            .sync()
            .map_err(|e| TrainError::Io(format!("device sync: {e:?}")))
    };
    let mut best = f64::MAX;
    // One untimed product first: kernel compilation and autotuning on a GPU.
    for round in 0..=repeats {
        sync()?;
        let started = Instant::now();
        let c = a.clone().matmul(b.clone());
        sync()?;
        let elapsed = started.elapsed().as_secs_f64();
        drop(c);
        if round > 0 {
            best = best.min(elapsed);
        }
    }
    Ok(2.0 * (n * n * n) as f64 / best / 1e9)
}

/// The FLOP/s one rank can do, for a training run's MFU: on the CPU the FMA peak over the
/// rank's threads (~40 ms; the hardware's limit, so MFU stays below 1 — the bench's
/// "achieved / FMA peak"), on a GPU the matmul at the training precision (8192^2). Every
/// rank measures at once (`train::run`), so ranks sharing cores each see their share.
pub fn rank_peak_gflops(cfg: &Config, device: &Device) -> Result<f64, TrainError> {
    if cfg.device.is_cuda() {
        device_gemm_gflops(device, cfg.precision, 8192, 3)
    } else {
        Ok(fma_peak_gflops(rayon::current_num_threads()))
    }
}

/// Peak resident set size of this process (Linux `/proc/self/status` `VmHWM`), bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Best of `repeats` square f32 matmuls of size `n` through burn's CPU backend.
pub fn gemm_gflops(n: usize, repeats: usize) -> f64 {
    let device = Device::flex();
    let a = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
    let b = Tensor::<2>::random([n, n], Distribution::Normal(0.0, 1.0), &device);
    let mut best = f64::MAX;
    for _ in 0..repeats {
        let started = Instant::now();
        let c = a.clone().matmul(b.clone());
        let _ = c.into_data();
        best = best.min(started.elapsed().as_secs_f64());
    }
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// The middle value of sorted `xs` (the mean of the middle two for an even count; NaN when
/// empty).
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Peak f32 FMA throughput over `threads` threads: independent FMA chains on the widest
/// vectors this CPU has (AVX2+FMA: 8 lanes; otherwise the scalar `mul_add` loop).
pub fn fma_peak_gflops(threads: usize) -> f64 {
    const ITERS: u64 = 20_000_000;
    let started = Instant::now();
    let flops_per_thread: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| scope.spawn(|| fma_kernel(ITERS)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("fma thread"))
            .sum()
    });
    flops_per_thread as f64 / started.elapsed().as_secs_f64() / 1e9
}

/// Returns the number of FLOPs performed.
fn fma_kernel(iters: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features the function is compiled for were detected at run time.
            return unsafe { fma_kernel_avx2(iters) };
        }
    }
    let mut acc = [1.0f32; 8];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    iters * 8 * 2
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_kernel_avx2(iters: u64) -> u64 {
    use std::arch::x86_64::*;
    // 12 independent accumulators in registers cover the FMA latency (4 cycles) on 2 ports;
    // written out so no accumulator ever goes through memory.
    let mul = _mm256_set1_ps(0.999_999);
    let add = _mm256_set1_ps(1e-7);
    let one = _mm256_set1_ps(1.0);
    let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5) = (one, one, one, one, one, one);
    let (mut a6, mut a7, mut a8, mut a9, mut a10, mut a11) = (one, one, one, one, one, one);
    for _ in 0..iters {
        a0 = _mm256_fmadd_ps(a0, mul, add);
        a1 = _mm256_fmadd_ps(a1, mul, add);
        a2 = _mm256_fmadd_ps(a2, mul, add);
        a3 = _mm256_fmadd_ps(a3, mul, add);
        a4 = _mm256_fmadd_ps(a4, mul, add);
        a5 = _mm256_fmadd_ps(a5, mul, add);
        a6 = _mm256_fmadd_ps(a6, mul, add);
        a7 = _mm256_fmadd_ps(a7, mul, add);
        a8 = _mm256_fmadd_ps(a8, mul, add);
        a9 = _mm256_fmadd_ps(a9, mul, add);
        a10 = _mm256_fmadd_ps(a10, mul, add);
        a11 = _mm256_fmadd_ps(a11, mul, add);
    }
    let sum = [a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11]
        .into_iter()
        .fold(_mm256_setzero_ps(), |acc, a| _mm256_add_ps(acc, a));
    std::hint::black_box(sum);
    iters * 12 * 8 * 2
}
