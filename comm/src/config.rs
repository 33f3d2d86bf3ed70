//! The `comm:` config node. The root config embeds it; the integrator wires it in.
//!
//! `validate` reports issues as `(key path relative to this node, message with a hint)`, the
//! convention of every config node (see `moe/src/config.rs`).

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Issues found by a `validate` call: (key path relative to the node, message).
pub type ConfigIssues = Vec<(String, String)>;

/// The longest timeout a config may set, seconds (a week): longer is a typo or a unit
/// mistake, and a deadline must stay representable as an `Instant`.
pub const MAX_TIMEOUT_S: f64 = 604_800.0;

/// Whether `secs` is a timeout a config may set: finite, > 0 and at most [`MAX_TIMEOUT_S`].
pub fn valid_timeout_s(secs: f64) -> bool {
    secs.is_finite() && secs > 0.0 && secs <= MAX_TIMEOUT_S
}

/// `secs` as a `Duration`, never panicking: NaN and negatives are zero, values past what a
/// `Duration` holds are `Duration::MAX` (validation keeps configs far below either).
pub fn duration_from_secs(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX)
}

/// `timeout` from now as an `Instant`; a timeout past what an `Instant` holds is a deadline
/// a century away (never reached), not a panic.
pub fn deadline_after(timeout: Duration) -> std::time::Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let now = std::time::Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(CENTURY))
        .unwrap_or(now)
}

/// Communication settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommConfig {
    #[serde(default)]
    pub backend: CommBackendConfig,
    /// Seconds a collective (or a `wait`) may take before it fails with an error naming the
    /// operation and the ranks that did not arrive.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
}

impl Default for CommConfig {
    fn default() -> Self {
        CommConfig {
            backend: CommBackendConfig::default(),
            timeout_s: default_timeout_s(),
        }
    }
}

/// Which transport carries the bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CommBackendConfig {
    /// `mpi` when the process was started by an MPI launcher (mpirun, srun) with more than
    /// one task, otherwise `local`. What a config should say unless it needs a link model
    /// or MPI options. A struct variant, not a unit one: serde ignores unknown keys next to
    /// the tag of a unit variant (serde issue 2123).
    Auto {},
    /// Ranks as threads of one process.
    Local {
        /// Emulated interconnect; absent = as fast as memory.
        #[serde(default)]
        link: Option<LinkConfig>,
    },
    /// MPI (build with `--features mpi`; launch with `mpirun`).
    Mpi {
        /// How non-blocking operations progress while the caller computes.
        #[serde(default)]
        progress: MpiProgress,
        /// Exchange a small signature before each collective so that mismatched operations
        /// or sizes are reported instead of corrupting data (one extra small collective).
        #[serde(default)]
        verify_collectives: bool,
    },
    /// NCCL on the GPUs of the root `device:` (one per rank), bootstrapped over MPI: build
    /// with `--features nccl`, launch with `mpirun` or `srun`. `auto` picks it under a
    /// launcher when the device is CUDA and the build has NCCL.
    Nccl {},
}

impl Default for CommBackendConfig {
    fn default() -> Self {
        CommBackendConfig::Auto {}
    }
}

/// Progress of non-blocking MPI operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MpiProgress {
    /// A background thread drives MPI's progress engine (measured default, see README).
    #[default]
    Thread,
    /// Only `test`/`wait` calls drive progress.
    Poll,
}

/// Latency and bandwidth of an emulated interconnect.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Per-message latency, microseconds.
    pub latency_us: f64,
    /// Per-link bandwidth, gigabits per second (e.g. 200 for HDR InfiniBand).
    pub bandwidth_gbps: f64,
}

impl CommConfig {
    pub fn timeout(&self) -> Duration {
        duration_from_secs(self.timeout_s)
    }

    /// The emulated interconnect of the `local` backend (`None`: as fast as memory, or
    /// another backend).
    pub fn link_model(&self) -> Option<crate::LinkModel> {
        match &self.backend {
            CommBackendConfig::Local { link: Some(l) } => {
                Some(crate::LinkModel::new(l.latency_us, l.bandwidth_gbps))
            }
            _ => None,
        }
    }

    pub fn validate(&self) -> ConfigIssues {
        let mut issues = ConfigIssues::new();
        if !valid_timeout_s(self.timeout_s) {
            issues.push((
                "timeout_s".into(),
                format!(
                    "must be in (0, {MAX_TIMEOUT_S}] seconds (a week at most), got {}; the \
                     default is {}",
                    self.timeout_s,
                    default_timeout_s()
                ),
            ));
        }
        if let CommBackendConfig::Local { link: Some(l) } = &self.backend {
            if !(l.latency_us.is_finite() && l.latency_us >= 0.0) {
                issues.push((
                    "backend.link.latency_us".into(),
                    format!("must be >= 0 microseconds, got {}", l.latency_us),
                ));
            }
            if !(l.bandwidth_gbps.is_finite() && l.bandwidth_gbps > 0.0) {
                issues.push((
                    "backend.link.bandwidth_gbps".into(),
                    format!(
                        "must be > 0 gigabits per second, got {}; remove `link` for no emulation",
                        l.bandwidth_gbps
                    ),
                ));
            }
        }
        if let CommBackendConfig::Mpi { .. } = &self.backend
            && !cfg!(feature = "mpi")
        {
            issues.push((
                "backend.type".into(),
                "`mpi` needs a build with `--features mpi`; or use `type: local`".into(),
            ));
        }
        if let CommBackendConfig::Nccl { .. } = &self.backend
            && !cfg!(feature = "nccl")
        {
            issues.push((
                "backend.type".into(),
                "`nccl` is not available in this build; rebuild with `cargo build --release \
                 -p switchyard-launch --features nccl` (it needs no CUDA to build; NCCL and the \
                 driver are loaded at run time), or use `type: mpi` or `type: auto`"
                    .into(),
            ));
        }
        issues
    }
}

fn default_timeout_s() -> f64 {
    300.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_defaults_and_link() {
        let c: CommConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(c, CommConfig::default());
        let c: CommConfig = serde_yaml::from_str(
            "backend: {type: local, link: {latency_us: 2, bandwidth_gbps: 100}}\ntimeout_s: 5",
        )
        .unwrap();
        assert_eq!(c.timeout(), Duration::from_secs(5));
        assert!(c.validate().is_empty());
        let link = c.link_model().unwrap();
        assert_eq!(link.latency, Duration::from_micros(2));
        assert_eq!(link.bytes_per_sec, 12.5e9);
        let c: CommConfig = serde_yaml::from_str("backend: {type: mpi, progress: poll}").unwrap();
        assert!(matches!(
            c.backend,
            CommBackendConfig::Mpi {
                progress: MpiProgress::Poll,
                ..
            }
        ));
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(serde_yaml::from_str::<CommConfig>("timeout: 5").is_err());
        assert!(serde_yaml::from_str::<CommConfig>("backend: {type: local, lnk: {}}").is_err());
        assert!(serde_yaml::from_str::<CommConfig>("backend: {type: gloo}").is_err());
        let c: CommConfig = serde_yaml::from_str(
            "backend: {type: local, link: {latency_us: -1, bandwidth_gbps: 0}}\ntimeout_s: 0",
        )
        .unwrap();
        let keys: Vec<_> = c.validate().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "timeout_s",
                "backend.link.latency_us",
                "backend.link.bandwidth_gbps"
            ]
        );
        for bad in [1e20, 604_801.0, f64::INFINITY, f64::NAN, -1.0] {
            let c = CommConfig {
                timeout_s: bad,
                ..CommConfig::default()
            };
            let issues = c.validate();
            assert_eq!(issues.len(), 1, "{bad}");
            assert!(issues[0].1.contains("(0, 604800] seconds"), "{issues:?}");
        }
    }

    /// Whatever a config says, converting it to a duration and a deadline does not panic.
    #[test]
    fn any_timeout_converts_without_panicking() {
        for secs in [
            1e20,
            1e19,
            f64::MAX,
            f64::INFINITY,
            f64::NAN,
            -5.0,
            0.0,
            300.0,
        ] {
            let c = CommConfig {
                timeout_s: secs,
                ..CommConfig::default()
            };
            let d = c.timeout();
            assert!(deadline_after(d) >= std::time::Instant::now() - Duration::from_secs(1));
        }
        assert_eq!(duration_from_secs(1e20), Duration::MAX);
        assert_eq!(duration_from_secs(f64::NAN), Duration::ZERO);
        assert_eq!(duration_from_secs(2.5), Duration::from_millis(2500));
    }

    /// `nccl` parses everywhere; a build without the feature refuses it naming the rebuild,
    /// and the old per-backend `device` key (the root `device:` decides) is unknown.
    #[test]
    fn nccl_names_the_feature_that_enables_it() {
        let c: CommConfig = serde_yaml::from_str("backend: {type: nccl}").unwrap();
        assert_eq!(c.backend, CommBackendConfig::Nccl {});
        let issues = c.validate();
        if cfg!(feature = "nccl") {
            assert!(issues.is_empty(), "{issues:?}");
        } else {
            assert_eq!(issues.len(), 1, "{issues:?}");
            assert_eq!(issues[0].0, "backend.type");
            assert!(issues[0].1.contains("--features nccl"), "{issues:?}");
        }
        assert!(serde_yaml::from_str::<CommConfig>("backend: {type: nccl, device: 1}").is_err());
    }
}
