//! [`StopSignal`]: what the process's signal handlers (SIGUSR1, SIGTERM, SIGINT) share with
//! the training loop.
//!
//! Two phases. Until the loop is about to take its first step there is nothing to save, so
//! a signal ends the process at once with [`crate::EXIT_PREEMPTED`] (the job is requeued and
//! `--resume auto` continues from the last checkpoint); the handler decides that from
//! [`StopSignal::request`]'s answer. From [`StopSignal::arm`] on, a signal is a request to
//! stop at the next step boundary with a committed checkpoint, and a rank that is waiting
//! for the others in a checkpoint agreement waits at most the communication timeout more.

use std::sync::atomic::{AtomicBool, Ordering};

/// A stop request, set from a signal handler (atomics only: async-signal-safe).
#[derive(Debug, Default)]
pub struct StopSignal {
    requested: AtomicBool,
    armed: AtomicBool,
}

impl StopSignal {
    pub const fn new() -> StopSignal {
        StopSignal {
            requested: AtomicBool::new(false),
            armed: AtomicBool::new(false),
        }
    }

    /// Records a stop request; returns whether the training loop will act on it (`false`
    /// before [`Self::arm`]: the caller ends the process itself).
    pub fn request(&self) -> bool {
        self.requested.store(true, Ordering::SeqCst);
        self.armed.load(Ordering::SeqCst)
    }

    /// Whether a stop was requested.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// The loop is about to step: from now on a request stops it at a step boundary. A
    /// request that arrived before (between the handler's check and this call) is kept.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }
}
