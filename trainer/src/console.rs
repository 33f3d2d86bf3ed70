//! What a person watching a run sees on the terminal: which rank speaks, the progress line
//! and its compact numbers, and log lines that do not tear the progress bar.
//!
//! Rank: the process's rank under a launcher (set once by the binary) or, for ranks that
//! are threads of one process, the rank of the calling thread (set by the thread that runs
//! the rank, and inherited by the trainer's step pool). The binary's log filter asks
//! [`current_rank`] and lets only rank 0 say anything below a warning.
//!
//! Progress bar: the one bar of the process is registered here while it is shown;
//! [`write_stderr`] prints a finished log line above it (the bar is cleared, the line
//! written, the bar redrawn), so log lines never print over it.

use std::cell::Cell;
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::ProgressBar;

static PROCESS_RANK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD_RANK: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The progress bar on stderr, while one is shown.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// This process's rank in the world (a launcher's rank variable); 0 if never set.
pub fn set_process_rank(rank: usize) {
    PROCESS_RANK.store(rank, Ordering::Relaxed);
}

/// The rank the calling thread works for (a rank thread of the local backend, or a worker
/// of that rank's pool); `None` for a thread of no particular rank.
pub fn set_thread_rank(rank: Option<usize>) {
    THREAD_RANK.with(|r| r.set(rank));
}

/// The calling thread's rank, as set by [`set_thread_rank`] (`None` if never set).
pub fn thread_rank() -> Option<usize> {
    THREAD_RANK.with(Cell::get)
}

/// The rank a log line from this thread speaks for: the thread's, else the process's.
pub fn current_rank() -> usize {
    thread_rank().unwrap_or_else(|| PROCESS_RANK.load(Ordering::Relaxed))
}

fn bar_slot() -> std::sync::MutexGuard<'static, Option<ProgressBar>> {
    BAR.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Shows `bar` as the process's progress bar (log lines go above it) until
/// [`clear_bar`].
pub(crate) fn register_bar(bar: &ProgressBar) {
    *bar_slot() = Some(bar.clone());
}

pub(crate) fn clear_bar() {
    *bar_slot() = None;
}

/// Writes a finished line (or several) to stderr, above the progress bar when one is shown.
/// Errors writing stderr are ignored: there is nowhere left to report them.
pub fn write_stderr(bytes: &[u8]) {
    let slot = bar_slot();
    let write = || {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(bytes);
        let _ = err.flush();
    };
    match slot.as_ref() {
        Some(bar) if !bar.is_finished() => bar.suspend(write),
        _ => write(),
    }
}

/// What the progress line shows for one step.
#[derive(Debug, Clone, Default)]
pub struct ProgressLine {
    pub step: u64,
    pub total_steps: u64,
    pub loss: f64,
    /// The validation loss, when this step evaluated.
    pub valid_loss: Option<f64>,
    pub lr: f64,
    pub tokens_per_sec: f64,
    pub step_seconds: f64,
    /// Model FLOP utilisation in [0, 1], when the device's peak is known.
    pub mfu: Option<f64>,
    /// The most bytes any rank held at once during the step, when counted.
    pub peak_bytes: Option<u64>,
    pub eta: Option<Duration>,
}

impl std::fmt::Display for ProgressLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let width = self.total_steps.to_string().len();
        write!(
            f,
            "step {:>width$}/{} | loss {:.4}",
            self.step, self.total_steps, self.loss
        )?;
        if let Some(v) = self.valid_loss {
            write!(f, " | val {v:.4}")?;
        }
        write!(
            f,
            " | lr {} | {} | {}",
            compact_lr(self.lr),
            compact_rate(self.tokens_per_sec),
            compact_seconds(self.step_seconds)
        )?;
        if let Some(m) = self.mfu {
            write!(f, " | MFU {:.1}%", 100.0 * m)?;
        }
        if let Some(b) = self.peak_bytes {
            write!(f, " | mem {}", compact_bytes(b))?;
        }
        if let Some(eta) = self.eta {
            write!(f, " | ETA {}", compact_duration(eta))?;
        }
        Ok(())
    }
}

/// A learning rate with three significant digits: `3.00e-3`.
pub fn compact_lr(lr: f64) -> String {
    format!("{lr:.2e}")
}

/// Tokens per second: `950 tok/s`, `11.6k tok/s`, `1.25M tok/s`.
pub fn compact_rate(tokens_per_sec: f64) -> String {
    match tokens_per_sec {
        r if r >= 1e6 => format!("{:.2}M tok/s", r / 1e6),
        r if r >= 1e3 => format!("{:.1}k tok/s", r / 1e3),
        r => format!("{r:.0} tok/s"),
    }
}

/// A step time: `176 ms/step`, `2.41 s/step`.
pub fn compact_seconds(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{:.0} ms/step", seconds * 1e3)
    } else {
        format!("{seconds:.2} s/step")
    }
}

/// Bytes in binary units: `512 KiB`, `318 MiB`, `1.25 GiB`.
pub fn compact_bytes(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB * KIB {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.0} MiB", b / (KIB * KIB))
    } else {
        format!("{:.0} KiB", b / KIB)
    }
}

/// A duration to the second, largest units first: `49s`, `3m20s`, `2h05m`.
pub fn compact_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line_has_every_field_and_no_long_numbers() {
        let line = ProgressLine {
            step: 20,
            total_steps: 300,
            loss: 3.553815722465515,
            valid_loss: Some(3.4939123),
            lr: 0.0029876543,
            tokens_per_sec: 11628.743703834478,
            step_seconds: 0.1761234,
            mfu: Some(0.021234),
            peak_bytes: Some(330_000_000),
            eta: Some(Duration::from_secs(49)),
        }
        .to_string();
        assert_eq!(
            line,
            "step  20/300 | loss 3.5538 | val 3.4939 | lr 2.99e-3 | 11.6k tok/s | 176 ms/step \
             | MFU 2.1% | mem 315 MiB | ETA 49s"
        );
        let bare = ProgressLine {
            step: 1,
            total_steps: 5,
            loss: 5.5,
            lr: 1e-4,
            tokens_per_sec: 950.4,
            step_seconds: 2.5,
            ..Default::default()
        }
        .to_string();
        assert_eq!(
            bare,
            "step 1/5 | loss 5.5000 | lr 1.00e-4 | 950 tok/s | 2.50 s/step"
        );
    }

    #[test]
    fn compact_units() {
        assert_eq!(compact_rate(1_250_000.0), "1.25M tok/s");
        assert_eq!(compact_bytes(512 * 1024), "512 KiB");
        assert_eq!(compact_bytes(5 << 30), "5.00 GiB");
        assert_eq!(compact_duration(Duration::from_secs(200)), "3m20s");
        assert_eq!(compact_duration(Duration::from_secs(7500)), "2h05m");
    }

    #[test]
    fn a_thread_rank_overrides_the_process_rank_on_its_thread_only() {
        set_process_rank(0);
        std::thread::spawn(|| {
            assert_eq!(current_rank(), 0);
            set_thread_rank(Some(3));
            assert_eq!(current_rank(), 3);
            set_thread_rank(None);
            assert_eq!(current_rank(), 0);
        })
        .join()
        .unwrap();
        assert_eq!(thread_rank(), None);
    }
}
