//! Shared by the benchmarks that record and replay (through [`crate::trace`]): with
//! more emulated ranks than cores, each rank computes only while holding the process's one
//! CPU token and is charged its thread's CPU time, so ranks never compete for the cores.

use std::sync::{Condvar, Mutex};

/// The process's one CPU token: at most one rank computes at a time.
#[derive(Default)]
pub struct Cpu {
    busy: Mutex<bool>,
    cv: Condvar,
}

impl Cpu {
    pub fn acquire(&self) {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while *busy {
            busy = self.cv.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        *busy = true;
    }

    pub fn release(&self) {
        *self.busy.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.cv.notify_one();
    }
}

/// Seconds of CPU time of the calling thread (Linux `/proc/thread-self/schedstat`), or
/// `None` where that is unavailable.
pub fn thread_cpu_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 * 1e-9)
}
