//! How this process was launched: rank, local rank and world size as the launcher's
//! environment variables state them, checked against MPI's own view once MPI is up.
//!
//! Sources, most specific first (the first one present sets the rank):
//! - `mpirun` (Open MPI): `OMPI_COMM_WORLD_RANK`, `_SIZE`, `_LOCAL_RANK`;
//! - PMIx (`srun --mpi=pmix`, Open MPI's mpirun, prterun): `PMIX_RANK` (no size variable);
//! - PMI / PMI-2 (`srun --mpi=pmi2`, MPICH's hydra): `PMI_RANK`, `PMI_SIZE`;
//! - a Slurm job step (`srun`): `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`.
//!
//! Why this order: `mpirun` inside a Slurm allocation starts its daemons with `srun`, so its
//! ranks inherit a job step's `SLURM_*` variables that describe the daemons, not the ranks.
//! `SLURM_*` counts only inside a job step (`SLURM_STEP_ID` set): a batch script also has
//! `SLURM_PROCID=0` and `SLURM_NTASKS=<the allocation's tasks>`, yet a program it runs
//! directly is one process. Fields the chosen source lacks (PMIx has no size, PMI no local
//! rank) are taken from a less specific source that agrees on the rank.

use std::fmt;

use anyhow::{Result, bail};

/// Who started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: a plain single-process run, which needs no MPI.
    Single,
    OpenMpi,
    Pmix,
    Pmi,
    Slurm,
}

impl Launcher {
    fn describe(self) -> &'static str {
        match self {
            Launcher::Single => "no launcher (single process)",
            Launcher::OpenMpi => "mpirun (Open MPI)",
            Launcher::Pmix => "PMIx",
            Launcher::Pmi => "PMI",
            Launcher::Slurm => "srun (Slurm job step)",
        }
    }
}

/// One source's variable names; `None` where the launcher exports no such variable.
struct Source {
    launcher: Launcher,
    rank: &'static str,
    size: Option<&'static str>,
    local_rank: Option<&'static str>,
    /// Present only where the source applies (Slurm: inside a job step).
    requires: Option<&'static str>,
}

const SOURCES: [Source; 4] = [
    Source {
        launcher: Launcher::OpenMpi,
        rank: "OMPI_COMM_WORLD_RANK",
        size: Some("OMPI_COMM_WORLD_SIZE"),
        local_rank: Some("OMPI_COMM_WORLD_LOCAL_RANK"),
        requires: None,
    },
    Source {
        launcher: Launcher::Pmix,
        rank: "PMIX_RANK",
        size: None,
        local_rank: None,
        requires: None,
    },
    Source {
        launcher: Launcher::Pmi,
        rank: "PMI_RANK",
        size: Some("PMI_SIZE"),
        local_rank: None,
        requires: None,
    },
    Source {
        launcher: Launcher::Slurm,
        rank: "SLURM_PROCID",
        size: Some("SLURM_NTASKS"),
        local_rank: Some("SLURM_LOCALID"),
        requires: Some("SLURM_STEP_ID"),
    },
];

/// A value and the variable it came from (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FromVar {
    pub value: usize,
    pub var: &'static str,
}

/// Rank, local rank and world size as the launcher set them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchInfo {
    pub launcher: Launcher,
    pub rank: FromVar,
    /// `None` only under a bare PMIx launcher, which exports no size variable.
    pub world_size: Option<FromVar>,
    pub local_rank: Option<FromVar>,
}

/// One source's values, read and parsed.
struct Reading {
    launcher: Launcher,
    rank: FromVar,
    size: Option<FromVar>,
    local_rank: Option<FromVar>,
}

fn parse(env: &impl Fn(&str) -> Option<String>, var: &'static str) -> Result<Option<FromVar>> {
    let Some(raw) = env(var) else {
        return Ok(None);
    };
    match raw.trim().parse::<usize>() {
        Ok(value) => Ok(Some(FromVar { value, var })),
        Err(_) => bail!(
            "environment variable {var}={raw:?} is not a non-negative integer; it is set by the \
             launcher (mpirun, srun): unset it if it was inherited from somewhere else"
        ),
    }
}

impl LaunchInfo {
    /// Reads the launcher variables of this process.
    pub fn from_process_env() -> Result<Self> {
        Self::detect(|var| std::env::var(var).ok())
    }

    /// Reads the launcher variables through `env` (tests inject a map).
    pub fn detect(env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut readings = Vec::new();
        for source in &SOURCES {
            if source.requires.is_some_and(|var| env(var).is_none()) {
                continue;
            }
            let Some(rank) = parse(&env, source.rank)? else {
                continue;
            };
            let size = match source.size {
                Some(var) => parse(&env, var)?,
                None => None,
            };
            let local_rank = match source.local_rank {
                Some(var) => parse(&env, var)?,
                None => None,
            };
            readings.push(Reading {
                launcher: source.launcher,
                rank,
                size,
                local_rank,
            });
        }
        let Some((first, rest)) = readings.split_first() else {
            return Ok(LaunchInfo {
                launcher: Launcher::Single,
                rank: FromVar {
                    value: 0,
                    var: "(none)",
                },
                world_size: Some(FromVar {
                    value: 1,
                    var: "(none)",
                }),
                local_rank: Some(FromVar {
                    value: 0,
                    var: "(none)",
                }),
            });
        };
        let mut info = LaunchInfo {
            launcher: first.launcher,
            rank: first.rank,
            world_size: first.size,
            local_rank: first.local_rank,
        };
        // Fill gaps only from sources that describe the same process (same rank, and the
        // same size where both have one); others may be inherited from an outer launcher.
        for other in rest.iter().filter(|r| r.rank.value == info.rank.value) {
            if let (Some(a), Some(b)) = (info.world_size, other.size)
                && a.value != b.value
            {
                continue;
            }
            info.world_size = info.world_size.or(other.size);
            info.local_rank = info.local_rank.or(other.local_rank);
        }
        if let Some(size) = info.world_size
            && info.rank.value >= size.value
        {
            bail!(
                "the launcher set rank {} ({}) but world size {} ({}): a rank must be below the \
                 world size",
                info.rank.value,
                info.rank.var,
                size.value,
                size.var
            );
        }
        Ok(info)
    }

    /// Checks MPI's rank and size against the launcher's; a mismatch names both values and
    /// where each came from.
    pub fn check_against(&self, mpi_rank: usize, mpi_size: usize) -> Result<()> {
        let size_differs = self.world_size.is_some_and(|w| w.value != mpi_size);
        if self.rank.value == mpi_rank && !size_differs {
            return Ok(());
        }
        let launcher_view = match self.launcher {
            Launcher::Single => {
                "no launcher variables are set (a single process, rank 0 of 1)".to_string()
            }
            _ => format!(
                "{} set rank {} ({}) of {}",
                self.launcher.describe(),
                self.rank.value,
                self.rank.var,
                match self.world_size {
                    Some(w) => format!("{} ({})", w.value, w.var),
                    None => "an unstated world size".to_string(),
                }
            ),
        };
        let hint = if mpi_size == 1 && self.world_size.is_some_and(|w| w.value > 1) {
            "every process started MPI on its own: under srun pass the MPI plugin your MPI \
             library uses (`--mpi=pmix` for Open MPI; `srun --mpi=list` shows them)"
        } else {
            "the launcher's variables describe another job: were they inherited from an outer \
             launcher (e.g. mpirun started from inside srun)?"
        };
        bail!("MPI reports rank {mpi_rank} of {mpi_size}, but {launcher_view}; {hint}")
    }
}

impl fmt::Display for LaunchInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: rank {}", self.launcher.describe(), self.rank.value)?;
        match self.world_size {
            Some(w) => write!(f, " of {}", w.value)?,
            None => write!(f, " of ? (size comes from MPI)")?,
        }
        if let Some(l) = self.local_rank {
            write!(f, ", local rank {}", l.value)?;
        }
        if self.launcher != Launcher::Single {
            let vars: Vec<&str> = [Some(self.rank), self.world_size, self.local_rank]
                .into_iter()
                .flatten()
                .map(|v| v.var)
                .collect();
            write!(f, " (from {})", vars.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn detect(vars: &[(&str, &str)]) -> Result<LaunchInfo> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchInfo::detect(|k| map.get(k).cloned())
    }

    fn values(info: &LaunchInfo) -> (Launcher, usize, Option<usize>, Option<usize>) {
        (
            info.launcher,
            info.rank.value,
            info.world_size.map(|w| w.value),
            info.local_rank.map(|l| l.value),
        )
    }

    #[test]
    fn no_variables_is_a_single_process() {
        let info = detect(&[("HOME", "/root")]).unwrap();
        assert_eq!(values(&info), (Launcher::Single, 0, Some(1), Some(0)));
        info.check_against(0, 1).unwrap();
    }

    #[test]
    fn open_mpi_mpirun() {
        // What Open MPI 4's mpirun sets (checked on this machine): OMPI_* and PMIX_RANK.
        let info = detect(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("PMIX_RANK", "3"),
        ])
        .unwrap();
        assert_eq!(values(&info), (Launcher::OpenMpi, 3, Some(4), Some(1)));
        info.check_against(3, 4).unwrap();
    }

    #[test]
    fn srun_with_pmix_fills_size_and_local_rank_from_the_job_step() {
        let info = detect(&[
            ("PMIX_RANK", "1"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap();
        assert_eq!(values(&info), (Launcher::Pmix, 1, Some(2), Some(1)));
        assert_eq!(info.world_size.unwrap().var, "SLURM_NTASKS");
        info.check_against(1, 2).unwrap();
    }

    #[test]
    fn srun_with_pmi2() {
        let info = detect(&[
            ("PMI_RANK", "0"),
            ("PMI_SIZE", "2"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
        ])
        .unwrap();
        assert_eq!(values(&info), (Launcher::Pmi, 0, Some(2), Some(0)));
        assert_eq!(info.world_size.unwrap().var, "PMI_SIZE");
    }

    #[test]
    fn bare_pmix_has_no_world_size() {
        let info = detect(&[("PMIX_RANK", "2")]).unwrap();
        assert_eq!(values(&info), (Launcher::Pmix, 2, None, None));
        // The size then comes from MPI alone; only the rank is checked.
        info.check_against(2, 8).unwrap();
        assert!(info.check_against(1, 8).is_err());
    }

    #[test]
    fn slurm_batch_shell_without_a_step_is_a_single_process() {
        // A program run directly from an sbatch script sees the allocation's task count.
        let info = detect(&[
            ("SLURM_JOB_ID", "7"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "0"),
        ])
        .unwrap();
        assert_eq!(info.launcher, Launcher::Single);
        info.check_against(0, 1).unwrap();
    }

    #[test]
    fn mpirun_inside_a_job_step_ignores_the_stale_slurm_variables() {
        // mpirun's daemon was srun task 1 of 2; its ranks carry that step's SLURM_* values.
        let info = detect(&[
            ("OMPI_COMM_WORLD_RANK", "5"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
        ])
        .unwrap();
        assert_eq!(values(&info), (Launcher::OpenMpi, 5, Some(8), Some(1)));
        info.check_against(5, 8).unwrap();
    }

    #[test]
    fn a_source_with_another_rank_fills_nothing() {
        let info = detect(&[
            ("PMIX_RANK", "3"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
        ])
        .unwrap();
        assert_eq!(values(&info), (Launcher::Pmix, 3, None, None));
    }

    #[test]
    fn mismatch_names_both_values_and_both_sources() {
        let info = detect(&[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap();
        // srun without an MPI plugin: each task is its own MPI world of one.
        let msg = info.check_against(0, 1).unwrap_err().to_string();
        for needle in [
            "MPI reports rank 0 of 1",
            "srun (Slurm job step) set rank 1 (SLURM_PROCID) of 2 (SLURM_NTASKS)",
            "--mpi=pmix",
        ] {
            assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
        }
        // Same size, other rank.
        let msg = info.check_against(0, 2).unwrap_err().to_string();
        assert!(msg.contains("MPI reports rank 0 of 2"), "{msg}");
        assert!(msg.contains("inherited"), "{msg}");
    }

    #[test]
    fn single_process_against_a_larger_mpi_world_is_an_error() {
        let info = detect(&[]).unwrap();
        let msg = info.check_against(2, 4).unwrap_err().to_string();
        assert!(
            msg.contains("MPI reports rank 2 of 4, but no launcher variables are set"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_and_inconsistent_variables_are_errors_naming_the_variable() {
        let msg = detect(&[("OMPI_COMM_WORLD_RANK", "one")])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("OMPI_COMM_WORLD_RANK=\"one\""), "{msg}");
        let msg = detect(&[("PMI_RANK", "4"), ("PMI_SIZE", "4")])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("rank 4 (PMI_RANK) but world size 4 (PMI_SIZE)"),
            "{msg}"
        );
    }

    #[test]
    fn display_names_the_launcher_and_the_variables() {
        let info = detect(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ])
        .unwrap();
        assert_eq!(
            info.to_string(),
            "mpirun (Open MPI): rank 1 of 2, local rank 1 (from OMPI_COMM_WORLD_RANK, \
             OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK)"
        );
        assert_eq!(
            detect(&[]).unwrap().to_string(),
            "no launcher (single process): rank 0 of 1, local rank 0"
        );
    }
}
