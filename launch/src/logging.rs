//! The binary's log output on stderr: rank 0 speaks, the other ranks only warn (their lines
//! prefixed `[rank N]`), and lines go above the progress bar, never over it
//! (`switchyard_trainer::console`). `SWITCHYARD_LOG_ALL_RANKS=1` lets every rank log
//! everything; `RUST_LOG` picks the level as usual.

use std::io::{IsTerminal, Write};

use switchyard_trainer::console;
use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, dynamic_filter_fn};
use tracing_subscriber::prelude::*;

use crate::launcher_env::LaunchInfo;

/// Installs the subscriber. The process's rank comes from the launcher's variables (an
/// unreadable one counts as rank 0 here; `train` reports it); rank threads set theirs.
pub fn init() {
    if let Ok(launch) = LaunchInfo::from_process_env() {
        console::set_process_rank(launch.rank.value);
    }
    let all_ranks = std::env::var("SWITCHYARD_LOG_ALL_RANKS").is_ok_and(|v| v != "0");
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Dynamic: asked per event on the emitting thread (a plain `filter_fn` is asked once per
    // call site and cached, so the first rank to reach a line would decide for all).
    let ranks = dynamic_filter_fn(move |meta, _| {
        all_ranks || admits(console::current_rank(), *meta.level())
    });
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(RankWriter::default)
        // No colour codes in files (Slurm's output files, redirected logs).
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(ranks);
    tracing_subscriber::registry().with(env).with(lines).init();
}

/// Whether a line at `level` from `rank` is shown: everything from rank 0, warnings and
/// errors from the others (they would repeat rank 0's progress N times).
fn admits(rank: usize, level: Level) -> bool {
    rank == 0 || level <= Level::WARN
}

/// Collects one formatted event and writes it whole when dropped (the formatter makes one
/// writer per event).
#[derive(Default)]
struct RankWriter {
    event: Vec<u8>,
}

impl Write for RankWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.event.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RankWriter {
    fn drop(&mut self) {
        if !self.event.is_empty() {
            console::write_stderr(&prefixed(console::current_rank(), &self.event));
        }
    }
}

/// `event` with `[rank N] ` before each line when `rank` is not 0.
fn prefixed(rank: usize, event: &[u8]) -> Vec<u8> {
    if rank == 0 {
        return event.to_vec();
    }
    let prefix = format!("[rank {rank}] ");
    let mut out = Vec::with_capacity(event.len() + prefix.len());
    for line in event.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(prefix.as_bytes());
        out.extend_from_slice(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rank_0_logs_below_warnings() {
        assert!(admits(0, Level::INFO));
        assert!(admits(0, Level::DEBUG));
        assert!(admits(3, Level::WARN));
        assert!(admits(3, Level::ERROR));
        assert!(!admits(3, Level::INFO));
        assert!(!admits(1, Level::DEBUG));
    }

    #[test]
    fn other_ranks_lines_carry_their_rank() {
        assert_eq!(prefixed(0, b"a\n"), b"a\n");
        assert_eq!(prefixed(2, b"a\nb\n"), b"[rank 2] a\n[rank 2] b\n");
    }
}
