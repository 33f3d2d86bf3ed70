//! `switchyard slurm-script`: writes an sbatch script that trains a config with preemption
//! signalling and automatic requeue.
//!
//! The protocol: `#SBATCH --signal=USR1@S` makes Slurm send SIGUSR1 to every task of the job
//! step S seconds before the time limit (without `B:` the signal goes to the srun'd tasks,
//! not to the batch shell). The trainer writes a checkpoint at the next step boundary and
//! exits with `EXIT_PREEMPTED` (75); the script then runs `scontrol requeue`, and the next run
//! continues from the newest committed checkpoint (`--resume auto`). `--open-mode=append`
//! keeps the output of every run in one file (Slurm would truncate it on requeue).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use switchyard_trainer::EXIT_PREEMPTED;
use switchyard_trainer::config::Config;

use crate::ConfigArgs;

/// The srun MPI plugin (`srun --mpi=...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MpiPlugin {
    /// PMIx: what Open MPI needs (Debian's Open MPI cannot be started with pmi2).
    Pmix,
    /// PMI-2 (MPICH, Intel MPI).
    Pmi2,
    /// No MPI wiring: only for a single task.
    None,
}

impl MpiPlugin {
    fn as_str(self) -> &'static str {
        match self {
            MpiPlugin::Pmix => "pmix",
            MpiPlugin::Pmi2 => "pmi2",
            MpiPlugin::None => "none",
        }
    }
}

#[derive(clap::Args)]
pub struct SlurmScriptArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Nodes (`#SBATCH --nodes`).
    #[arg(long)]
    nodes: u32,
    /// Tasks (ranks) per node (`#SBATCH --ntasks-per-node`).
    #[arg(long)]
    tasks_per_node: u32,
    /// Time limit, `[D-]HH:MM:SS` (or any form sbatch takes: `MM`, `MM:SS`, `D-HH`, ...).
    /// Without it the partition's default applies.
    #[arg(long)]
    time: Option<String>,
    /// Partition (`#SBATCH --partition`); the cluster's default without it.
    #[arg(long)]
    partition: Option<String>,
    /// Seconds before the time limit at which the tasks get SIGUSR1 to checkpoint and exit
    /// (Slurm may send it up to 60 s earlier). Leave room for one step and one save.
    #[arg(long, default_value_t = 300)]
    signal_lead_seconds: u32,
    /// Where to write the script [default: <run.output_dir>/<run.name>.sbatch].
    #[arg(long)]
    output: Option<PathBuf>,
    /// The switchyard binary the job runs, as the compute nodes see it [default: this one].
    #[arg(long)]
    binary: Option<PathBuf>,
    /// srun's MPI plugin.
    #[arg(long, value_enum, default_value = "pmix")]
    mpi: MpiPlugin,
    /// Extra sbatch options after `--`, each written as one `#SBATCH` line; a value given as
    /// a separate word joins its option: `-- --account=proj -q high --gres=gpu:4`.
    #[arg(last = true, value_name = "SBATCH_OPTION")]
    sbatch_options: Vec<String>,
}

/// Everything the script says, resolved to absolute paths and validated.
#[derive(Debug, Clone)]
pub struct ScriptSpec {
    pub job_name: String,
    pub nodes: u32,
    pub tasks_per_node: u32,
    pub time: Option<String>,
    pub partition: Option<String>,
    pub signal_lead_seconds: u32,
    /// The job's working directory: relative output paths of the config and relative paths
    /// given with `--set` resolve against it (input paths written in the config file
    /// resolve against the file's directory).
    pub workdir: PathBuf,
    /// Where Slurm writes the job's stdout and stderr.
    pub log_dir: PathBuf,
    pub binary: PathBuf,
    pub config: PathBuf,
    pub overrides: Vec<String>,
    pub mpi: MpiPlugin,
    /// One `#SBATCH` line each.
    pub extra: Vec<String>,
}

/// sbatch options the script sets itself, and the flag that sets each.
const MANAGED: [(&str, &str); 15] = [
    ("--job-name", "run.name"),
    ("-J", "run.name"),
    ("--nodes", "--nodes"),
    ("-N", "--nodes"),
    ("--ntasks-per-node", "--tasks-per-node"),
    ("--ntasks", "--nodes and --tasks-per-node"),
    ("-n", "--nodes and --tasks-per-node"),
    ("--time", "--time"),
    ("-t", "--time"),
    ("--partition", "--partition"),
    ("-p", "--partition"),
    ("--signal", "--signal-lead-seconds"),
    ("--output", "run.output_dir"),
    ("-o", "run.output_dir"),
    ("--chdir", "the directory you run slurm-script from"),
];
/// Options the preemption protocol depends on.
const REQUIRED: [&str; 5] = ["--requeue", "--no-requeue", "--open-mode", "--error", "-e"];

/// Slurm's time formats: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`.
/// Returns the limit in seconds.
pub fn parse_time_limit(text: &str) -> Result<u64> {
    let bad = || {
        anyhow::anyhow!(
            "--time {text:?}: expected HH:MM:SS or D-HH:MM:SS (sbatch also takes MM, MM:SS, \
             D-HH, D-HH:MM), for example 04:00:00"
        )
    };
    let number = |s: &str| -> Result<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let (days, rest) = match text.split_once('-') {
        Some((d, rest)) => (Some(number(d)?), rest),
        None => (None, text),
    };
    let parts = rest.split(':').map(number).collect::<Result<Vec<u64>>>()?;
    let below_60 = |v: &[u64]| v.iter().all(|&x| x < 60);
    let seconds = match (days, parts.as_slice()) {
        (None, [m]) => m * 60,
        (None, [m, s]) if below_60(&[*s]) => m * 60 + s,
        (None, [h, m, s]) if below_60(&[*m, *s]) => h * 3600 + m * 60 + s,
        (Some(d), [h]) => d * 86400 + h * 3600,
        (Some(d), [h, m]) if below_60(&[*m]) => d * 86400 + h * 3600 + m * 60,
        (Some(d), [h, m, s]) if below_60(&[*m, *s]) => d * 86400 + h * 3600 + m * 60 + s,
        _ => return Err(bad()),
    };
    if seconds == 0 {
        bail!("--time {text:?}: the time limit must be positive");
    }
    Ok(seconds)
}

/// Quotes a word for bash (single quotes unless it is plainly safe).
fn sh_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A job name Slurm and file names take: the run name with anything unusual replaced.
fn job_name(run_name: &str) -> String {
    let name: String = run_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "switchyard".into()
    } else {
        name
    }
}

/// Groups trailing words into options: a word that does not start with `-` is the value of
/// the option before it.
fn group_sbatch_options(words: &[String]) -> Result<Vec<String>> {
    let mut options: Vec<String> = Vec::new();
    for word in words {
        if word.starts_with('-') {
            options.push(word.clone());
        } else if let Some(last) = options.last_mut() {
            last.push(' ');
            last.push_str(word);
        } else {
            bail!("extra sbatch option {word:?}: options after `--` must start with `-`");
        }
    }
    Ok(options)
}

/// An `#SBATCH` line is parsed by sbatch, not by bash: paths in it must be plain.
fn check_directive_path(path: &Path, what: &str) -> Result<()> {
    let text = path.to_string_lossy();
    if text
        .chars()
        .any(|c| c.is_whitespace() || "\"'\\%".contains(c))
    {
        bail!(
            "{what} {text:?} contains whitespace, a quote, a backslash or `%`, which an \
             `#SBATCH` line cannot carry; use a path without them"
        );
    }
    Ok(())
}

impl ScriptSpec {
    pub fn validate(&self) -> Result<()> {
        if self.nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        if self.tasks_per_node == 0 {
            bail!("--tasks-per-node must be at least 1");
        }
        let tasks = u64::from(self.nodes) * u64::from(self.tasks_per_node);
        if self.mpi == MpiPlugin::None && tasks > 1 {
            bail!(
                "--mpi none with {tasks} tasks: every task would be a separate one-process run; \
                 use --mpi pmix (Open MPI) or --mpi pmi2"
            );
        }
        if self.signal_lead_seconds == 0 || self.signal_lead_seconds > 65535 {
            bail!(
                "--signal-lead-seconds {}: must be between 1 and 65535 (Slurm's limit)",
                self.signal_lead_seconds
            );
        }
        if let Some(time) = &self.time {
            let limit = parse_time_limit(time)?;
            if u64::from(self.signal_lead_seconds) >= limit {
                bail!(
                    "--signal-lead-seconds {} is not below --time {time} ({limit} s): the job \
                     would be told to stop before it starts; lower it or raise --time",
                    self.signal_lead_seconds
                );
            }
        }
        if let Some(p) = &self.partition
            && (p.is_empty() || p.contains(|c: char| c.is_whitespace()))
        {
            bail!("--partition {p:?}: expected a partition name (see `sinfo`)");
        }
        check_directive_path(&self.workdir, "the working directory")?;
        check_directive_path(&self.log_dir, "run.output_dir")?;
        for option in &self.extra {
            if option.contains(['\n', '\r']) {
                bail!("extra sbatch option {option:?} contains a line break");
            }
            let name = option
                .split(['=', ' '])
                .next()
                .unwrap_or(option)
                .to_string();
            let name = if !name.starts_with("--") && name.len() > 2 {
                name[..2].to_string() // `-N2`
            } else {
                name
            };
            if let Some((_, flag)) = MANAGED.iter().find(|(opt, _)| *opt == name) {
                bail!("extra sbatch option {option:?}: the script sets {name} itself from {flag}");
            }
            if REQUIRED.contains(&name.as_str()) {
                bail!(
                    "extra sbatch option {option:?}: the script sets {name} itself; preemption \
                     and requeue depend on it"
                );
            }
        }
        Ok(())
    }

    /// The script's text.
    pub fn render(&self) -> String {
        let lead = self.signal_lead_seconds;
        let mut s = String::new();
        let mut line = |text: &str| {
            s.push_str(text);
            s.push('\n');
        };
        line("#!/bin/bash");
        line(&format!(
            "# Written by `switchyard slurm-script` (switchyard {}). Submit: sbatch THIS_FILE",
            env!("CARGO_PKG_VERSION")
        ));
        line(&format!("#SBATCH --job-name={}", self.job_name));
        line(&format!("#SBATCH --nodes={}", self.nodes));
        line(&format!(
            "#SBATCH --ntasks-per-node={}",
            self.tasks_per_node
        ));
        if let Some(time) = &self.time {
            line(&format!("#SBATCH --time={time}"));
        }
        if let Some(partition) = &self.partition {
            line(&format!("#SBATCH --partition={partition}"));
        }
        line(&format!("#SBATCH --chdir={}", self.workdir.display()));
        // %x: job name, %j: job id (the same across requeues, so runs append to one file).
        line(&format!(
            "#SBATCH --output={}/slurm-%x-%j.out",
            self.log_dir.display()
        ));
        line(&format!(
            "#SBATCH --error={}/slurm-%x-%j.err",
            self.log_dir.display()
        ));
        line("#SBATCH --open-mode=append");
        line("#SBATCH --requeue");
        line(&format!("#SBATCH --signal=USR1@{lead}"));
        for option in &self.extra {
            line(&format!("#SBATCH {option}"));
        }
        let mut srun = format!(
            "srun --mpi={} {} train --config {}",
            self.mpi.as_str(),
            sh_quote(&self.binary.to_string_lossy()),
            sh_quote(&self.config.to_string_lossy())
        );
        for o in &self.overrides {
            let _ = write!(srun, " --set {}", sh_quote(o));
        }
        srun.push_str(" --resume auto");
        s.push_str(&format!(
            r#"
# Preemption: {lead} s before the time limit Slurm sends SIGUSR1 to every task (the srun'd
# ranks, not this shell); `scancel --signal=USR1 JOB` does the same at any time. The trainer
# writes a checkpoint at the next step boundary and exits {EXIT_PREEMPTED} (EX_TEMPFAIL); this
# script then requeues the job, and the next run resumes from the newest committed checkpoint
# (`--resume auto`). Each run appends to the same output files.
readonly EXIT_PREEMPTED={EXIT_PREEMPTED}
echo "switchyard: job $SLURM_JOB_ID, run $((${{SLURM_RESTART_COUNT:-0}} + 1)), nodes $SLURM_JOB_NODELIST, $(date -Is)"

# A SIGUSR1 sent to this shell (`--signal=B:USR1`, `scancel -b` or `--full`) is passed to
# srun, which forwards it to the tasks. A SIGTERM means Slurm itself is ending the job
# (scancel, preemption, time limit; the tasks get it directly): no requeue from here then.
srun_pid=
signalled=0
terminating=0
trap 'signalled=1; [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null' USR1
trap 'signalled=1; terminating=1' TERM

{srun} &
srun_pid=$!
# `wait` returns early (128 + signal) when a trapped signal arrives: wait until srun exits.
status=
while :; do
  signalled=0
  wait "$srun_pid"
  rc=$?
  # 127: srun's status was collected by the previous wait (bash < 5 forgets it).
  if [ "$rc" -ne 127 ] || [ -z "$status" ]; then status=$rc; fi
  [ "$signalled" -eq 1 ] || break
done
echo "switchyard: srun exited with $status, $(date -Is)"

if [ "$status" -eq "$EXIT_PREEMPTED" ]; then
  if [ "$terminating" -eq 1 ]; then
    echo "switchyard: checkpoint written; Slurm is ending the job, so no requeue from here"
  else
    echo "switchyard: checkpoint written; requeueing job $SLURM_JOB_ID"
    # Slurm ends this run at once (SIGTERM to this shell) and queues the job again.
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    echo "switchyard: scontrol requeue failed; submit this script again to resume" >&2
  fi
fi
exit "$status"
"#
        ));
        s
    }
}

/// A job of `tasks` > 1 ranks needs a binary built with the `mpi` feature (without it every
/// task stops at start: "needs MPI"). `own`: the binary is this one; another is asked with
/// `BINARY build-info`. One that is not here (it exists only on the compute nodes) cannot be
/// checked: a warning says so.
fn check_mpi_feature(binary: &Path, own: bool, tasks: u64) -> Result<()> {
    let features: Vec<String> = if own {
        crate::built_features()
            .iter()
            .map(|f| f.to_string())
            .collect()
    } else if !binary.is_file() {
        tracing::warn!(
            binary = %binary.display(),
            "--binary does not exist here, so whether it has the `mpi` feature is not \
             checked; it must exist on the compute nodes and be built with --features mpi"
        );
        return Ok(());
    } else {
        let out = std::process::Command::new(binary)
            .arg("build-info")
            .output()
            .with_context(|| format!("running `{} build-info`", binary.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().find_map(|l| l.strip_prefix("features:"));
        match line {
            Some(line) if out.status.success() => {
                line.split_whitespace().map(str::to_string).collect()
            }
            _ => bail!(
                "--binary {}: `{} build-info` did not say which features it was built with \
                 ({}); give a switchyard binary of this version, built with \
                 `cargo build --release --features mpi`",
                binary.display(),
                binary.display(),
                out.status
            ),
        }
    };
    if !features.iter().any(|f| f == "mpi") {
        bail!(
            "{tasks} tasks need a switchyard built with the `mpi` feature, but {} was built \
             without it (features: {}); every task would stop at start. Build one with \
             `cargo build --release --features mpi` and pass it with --binary, or write a \
             one-task job (--nodes 1 --tasks-per-node 1)",
            binary.display(),
            if features.is_empty() {
                "none".to_string()
            } else {
                features.join(" ")
            }
        );
    }
    Ok(())
}

/// Builds the spec from the arguments and the loaded config, validates it, creates the log
/// directory (Slurm cannot open output files in a missing one) and writes the script.
pub fn write(args: &SlurmScriptArgs, cfg: &Config) -> Result<PathBuf> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let absolute = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            cwd.join(p)
        }
    };
    let binary = match &args.binary {
        Some(p) => absolute(p),
        None => std::env::current_exe().context("locating the switchyard binary")?,
    };
    let spec = ScriptSpec {
        job_name: job_name(&cfg.run.name),
        nodes: args.nodes,
        tasks_per_node: args.tasks_per_node,
        time: args.time.clone(),
        partition: args.partition.clone(),
        signal_lead_seconds: args.signal_lead_seconds,
        workdir: cwd.clone(),
        log_dir: absolute(&cfg.run.output_dir),
        binary,
        config: absolute(&args.config.config),
        overrides: args.config.overrides.clone(),
        mpi: args.mpi,
        extra: group_sbatch_options(&args.sbatch_options)?,
    };
    spec.validate()?;
    let tasks = u64::from(args.nodes) * u64::from(args.tasks_per_node);
    if tasks > 1 {
        check_mpi_feature(&spec.binary, args.binary.is_none(), tasks)?;
    }
    let path = match &args.output {
        Some(p) => absolute(p),
        None => spec.log_dir.join(format!("{}.sbatch", spec.job_name)),
    };
    std::fs::create_dir_all(&spec.log_dir)
        .with_context(|| format!("creating run.output_dir {}", spec.log_dir.display()))?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&path, spec.render()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ScriptSpec {
        ScriptSpec {
            job_name: "quickstart".into(),
            nodes: 2,
            tasks_per_node: 4,
            time: Some("04:00:00".into()),
            partition: Some("gpu".into()),
            signal_lead_seconds: 300,
            workdir: "/work/repo".into(),
            log_dir: "/work/repo/runs/quickstart".into(),
            binary: "/opt/switchyard/bin/switchyard".into(),
            config: "/work/repo/configs/quickstart.yaml".into(),
            overrides: vec![
                "train.steps=20".into(),
                "data.source={type: synthetic}".into(),
            ],
            mpi: MpiPlugin::Pmix,
            extra: vec!["--account=proj".into(), "-q high".into()],
        }
    }

    fn directives(script: &str) -> Vec<&str> {
        script
            .lines()
            .filter_map(|l| l.strip_prefix("#SBATCH "))
            .collect()
    }

    #[test]
    fn script_has_the_directives_in_sbatch_order() {
        let script = spec().render();
        assert!(script.starts_with("#!/bin/bash\n"));
        assert_eq!(
            directives(&script),
            [
                "--job-name=quickstart",
                "--nodes=2",
                "--ntasks-per-node=4",
                "--time=04:00:00",
                "--partition=gpu",
                "--chdir=/work/repo",
                "--output=/work/repo/runs/quickstart/slurm-%x-%j.out",
                "--error=/work/repo/runs/quickstart/slurm-%x-%j.err",
                "--open-mode=append",
                "--requeue",
                // No `B:`: the signal must reach the srun'd tasks, not the batch shell.
                "--signal=USR1@300",
                "--account=proj",
                "-q high",
            ]
        );
        // sbatch stops reading directives at the first command.
        let last_directive = script.rfind("#SBATCH").unwrap();
        let first_command = script.find("\nreadonly").unwrap();
        assert!(last_directive < first_command);
    }

    #[test]
    fn srun_line_resumes_and_quotes_overrides() {
        let script = spec().render();
        let srun = script
            .lines()
            .find(|l| l.starts_with("srun "))
            .expect("an srun line");
        assert_eq!(
            srun,
            "srun --mpi=pmix /opt/switchyard/bin/switchyard train --config \
             /work/repo/configs/quickstart.yaml --set train.steps=20 \
             --set 'data.source={type: synthetic}' --resume auto &"
        );
    }

    #[test]
    fn requeue_happens_on_the_preemption_exit_code_only() {
        let script = spec().render();
        assert_eq!(EXIT_PREEMPTED, 75);
        assert!(script.contains("readonly EXIT_PREEMPTED=75\n"));
        assert!(script.contains(r#"if [ "$status" -eq "$EXIT_PREEMPTED" ]; then"#));
        assert!(script.contains(r#"scontrol requeue "$SLURM_JOB_ID""#));
        assert!(script.trim_end().ends_with(r#"exit "$status""#));
    }

    #[test]
    fn optional_directives_are_left_out() {
        let mut s = spec();
        s.time = None;
        s.partition = None;
        s.extra.clear();
        s.mpi = MpiPlugin::Pmi2;
        let script = s.render();
        let d = directives(&script);
        assert!(
            !d.iter()
                .any(|l| l.starts_with("--time") || l.starts_with("--partition"))
        );
        assert!(script.contains("\nsrun --mpi=pmi2 "));
    }

    /// bash parses the script (syntax only).
    #[test]
    fn script_is_valid_bash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.sbatch");
        std::fs::write(&path, spec().render()).unwrap();
        let out = std::process::Command::new("bash")
            .arg("-n")
            .arg(&path)
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "bash -n: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn quoting_survives_bash() {
        for word in ["plain", "a b", "it's", "$HOME", "x{y: 1}", ""] {
            let out = std::process::Command::new("bash")
                .arg("-c")
                .arg(format!("printf %s {}", sh_quote(word)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), word);
        }
    }

    #[test]
    fn time_limits_in_slurm_formats() {
        assert_eq!(parse_time_limit("04:00:00").unwrap(), 4 * 3600);
        assert_eq!(parse_time_limit("1-02:03:04").unwrap(), 93784);
        assert_eq!(parse_time_limit("90").unwrap(), 5400);
        assert_eq!(parse_time_limit("10:30").unwrap(), 630);
        assert_eq!(parse_time_limit("2-12").unwrap(), 216_000);
        for bad in [
            "", "1:2:3:4", "00:61:00", "abc", "-1", "1-", "00:00:00", "1h",
        ] {
            assert!(parse_time_limit(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn invalid_inputs_are_rejected_naming_the_flag() {
        type Edit = fn(&mut ScriptSpec);
        let cases: Vec<(Edit, &str)> = vec![
            (|s| s.nodes = 0, "--nodes must be at least 1"),
            (|s| s.tasks_per_node = 0, "--tasks-per-node"),
            (|s| s.mpi = MpiPlugin::None, "--mpi none with 8 tasks"),
            (
                |s| s.time = Some("00:04:00".into()),
                "--signal-lead-seconds 300 is not below --time 00:04:00 (240 s)",
            ),
            (|s| s.time = Some("4h".into()), "--time \"4h\""),
            (|s| s.signal_lead_seconds = 0, "--signal-lead-seconds 0"),
            (|s| s.signal_lead_seconds = 70000, "65535"),
            (|s| s.partition = Some("a b".into()), "--partition"),
            (
                |s| s.log_dir = "/runs/my run".into(),
                "run.output_dir \"/runs/my run\"",
            ),
            (
                |s| s.extra = vec!["--time=1:00:00".into()],
                "sets --time itself from --time",
            ),
            (
                |s| s.extra = vec!["-N2".into()],
                "sets -N itself from --nodes",
            ),
            (
                |s| s.extra = vec!["--no-requeue".into()],
                "preemption and requeue depend on it",
            ),
            (|s| s.extra = vec!["--comment=a\nb".into()], "line break"),
        ];
        for (edit, needle) in cases {
            let mut s = spec();
            edit(&mut s);
            let msg = s.validate().unwrap_err().to_string();
            assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
        }
        spec().validate().unwrap();
        let mut single = spec();
        single.nodes = 1;
        single.tasks_per_node = 1;
        single.mpi = MpiPlugin::None;
        single.validate().unwrap();
    }

    #[test]
    fn extra_options_group_values_with_their_option() {
        let words: Vec<String> = ["--account=proj", "-q", "high", "--exclusive"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            group_sbatch_options(&words).unwrap(),
            ["--account=proj", "-q high", "--exclusive"]
        );
        assert!(group_sbatch_options(&["proj".to_string()]).is_err());
    }

    #[test]
    fn job_names_are_sanitised() {
        assert_eq!(job_name("moe run/1"), "moe_run_1");
        assert_eq!(job_name("ok.name-2"), "ok.name-2");
        assert_eq!(job_name(""), "switchyard");
    }
}
