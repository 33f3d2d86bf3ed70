//! End-to-end tests of the binary's launcher check and of `switchyard slurm-script` (the
//! script running under a real Slurm is `scripts/slurm_test.sh`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const LAUNCHER_VARS: [&str; 11] = [
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMIX_RANK",
    "PMI_RANK",
    "PMI_SIZE",
    "SLURM_STEP_ID",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_ID",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs the binary in `cwd` with no launcher variables but `env`.
fn switchyard(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(args).current_dir(cwd).env("RUST_LOG", "warn");
    for var in LAUNCHER_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("running switchyard")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn quickstart() -> String {
    repo_root()
        .join("configs/quickstart.yaml")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn srun_without_an_mpi_plugin_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = format!("run.output_dir={}", dir.path().join("run").display());
    // Task 1 of an srun step of 2 whose MPI world is this process alone.
    let out = switchyard(
        dir.path(),
        &["train", "--config", &quickstart(), "--set", &out_dir],
        &[
            ("SLURM_JOB_ID", "9"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "1"),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A build with `mpi` finds an MPI world of 1 and names both views; this default build
    // says that the launch needs MPI.
    assert!(
        (stderr.contains("MPI reports rank 0 of 1")
            && stderr.contains("set rank 1 (SLURM_PROCID) of 2 (SLURM_NTASKS)"))
            || (stderr.contains("needs MPI (SLURM_NTASKS=2)")
                && stderr.contains("without the `mpi` feature")),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("run/metrics.jsonl").exists());
}

/// A stand-in for a switchyard binary whose `build-info` prints `output`.
fn stand_in(dir: &Path, name: &str, output: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\nprintf '{output}'\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn slurm_script_writes_a_script_bash_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // 8 tasks need an MPI build: a stand-in that says it is one.
    let binary = stand_in(dir.path(), "mpi-build", "switchyard 0\nfeatures: mpi\n");
    let out = switchyard(
        dir.path(),
        &[
            "slurm-script",
            "--config",
            &quickstart(),
            "--set",
            &format!("run.output_dir={}", run.display()),
            "--set",
            "train.steps=20",
            "--nodes",
            "2",
            "--tasks-per-node",
            "4",
            "--time",
            "01:00:00",
            "--binary",
            binary.to_str().unwrap(),
            "--",
            "--account=proj",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let script_path = run.join("quickstart.sbatch");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("wrote {}", script_path.display())),
        "{}",
        text(&out)
    );
    let script = std::fs::read_to_string(&script_path).unwrap();
    for line in [
        "#SBATCH --job-name=quickstart".to_string(),
        "#SBATCH --nodes=2".to_string(),
        format!("#SBATCH --chdir={}", dir.path().display()),
        format!("#SBATCH --output={}/slurm-%x-%j.out", run.display()),
        "#SBATCH --signal=USR1@300".to_string(),
        "#SBATCH --account=proj".to_string(),
        format!(
            "srun --mpi=pmix {} train --config {} --set run.output_dir={} --set train.steps=20 \
             --resume auto &",
            binary.display(),
            quickstart(),
            run.display()
        ),
    ] {
        assert!(
            script.lines().any(|l| l == line),
            "{line:?} missing from:\n{script}"
        );
    }
    let bash = Command::new("bash")
        .arg("-n")
        .arg(&script_path)
        .output()
        .unwrap();
    assert!(bash.status.success(), "bash -n: {}", text(&bash));
}

#[test]
fn slurm_script_rejects_bad_input_with_the_usual_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let set_out = format!("run.output_dir={}", dir.path().join("run").display());
    let base = ["slurm-script", "--config", &quickstart(), "--set", &set_out];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        switchyard(dir.path(), &args, &[])
    };
    // Invalid flags: exit 1, naming the flag.
    let out = run(&["--nodes", "1", "--tasks-per-node", "2", "--mpi", "none"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("--mpi none with 2 tasks"),
        "{}",
        text(&out)
    );
    let out = run(&[
        "--nodes",
        "1",
        "--tasks-per-node",
        "1",
        "--time",
        "00:01:00",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("--signal-lead-seconds 300"),
        "{}",
        text(&out)
    );
    // A config error: exit 2, as for every command.
    let out = run(&[
        "--nodes",
        "1",
        "--tasks-per-node",
        "1",
        "--set",
        "train.stepz=3",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        !dir.path().join("run").exists(),
        "nothing written on errors"
    );
}

/// A job of several tasks needs a binary built with `mpi`: one without it (this one, unless
/// the tests were built with the feature; a --binary that says so; one that cannot say) is
/// refused when the script is written, naming the binary and the build command.
#[test]
fn slurm_script_refuses_a_binary_without_mpi_for_several_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let set_out = format!("run.output_dir={}", dir.path().join("run").display());
    let run = |tasks: &str, binary: Option<&Path>| {
        let mut args = vec![
            "slurm-script".to_string(),
            "--config".into(),
            quickstart(),
            "--set".into(),
            set_out.clone(),
            "--nodes".into(),
            "1".into(),
            "--tasks-per-node".into(),
            tasks.into(),
        ];
        if let Some(b) = binary {
            args.extend(["--binary".into(), b.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        switchyard(dir.path(), &args, &[])
    };
    let info = switchyard(dir.path(), &["build-info"], &[]);
    assert!(info.status.success(), "{}", text(&info));
    let has_mpi = String::from_utf8_lossy(&info.stdout)
        .lines()
        .any(|l| l.starts_with("features:") && l.split_whitespace().any(|f| f == "mpi"));
    let out = run("2", None);
    if has_mpi {
        assert!(out.status.success(), "{}", text(&out));
    } else {
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        for want in [
            "2 tasks need a switchyard built with the `mpi` feature",
            env!("CARGO_BIN_EXE_switchyard"),
            "--features mpi",
        ] {
            assert!(text(&out).contains(want), "{want}: {}", text(&out));
        }
    }
    let cuda_only = stand_in(dir.path(), "cuda-build", "switchyard 0\nfeatures: cuda\n");
    let out = run("2", Some(&cuda_only));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("cuda-build was built without it (features: cuda)"),
        "{}",
        text(&out)
    );
    let mute = stand_in(dir.path(), "not-switchyard", "hello\n");
    let out = run("2", Some(&mute));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("did not say which features"),
        "{}",
        text(&out)
    );
    // One task needs no MPI: any binary will do.
    let out = run("1", Some(&cuda_only));
    assert!(out.status.success(), "{}", text(&out));
}
