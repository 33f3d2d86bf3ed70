//! End-to-end tests of the `switchyard` binary (one process; multi-rank layouts run as
//! threads on the local backend — the MPI runs are in scripts/mpi_train_test.sh).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn switchyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .current_dir(repo_root())
        .env("RUST_LOG", "warn")
        .output()
        .expect("running switchyard")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A small valid config whose run directory is `dir`.
fn tiny_config(dir: &Path) -> String {
    format!(
        r#"run:
  name: tiny
  output_dir: {out}
  seed: 5
  threads: 1
model:
  vocab_size: 256
  d_model: 32
  n_heads: 2
  n_layers: 2
  ffn_dim: 64
  max_seq_len: 32
  moe:
    every: 1
    num_experts: 4
    top_k: 2
    expert_ffn_dim: 32
data:
  tokenizer: {{type: byte}}
  source: {{type: synthetic, seed: 3, bytes: 40000}}
  valid_fraction: 0.1
  seq_len: 16
  batch_size: 4
optim:
  lr: 3.0e-3
  warmup_steps: 2
  decay_steps: 12
  grad_clip: 1.0
train:
  steps: 12
  eval_every: 6
  eval_batches: 2
checkpoint:
  every: 3
  keep_last: 3
metrics:
  progress: false
"#,
        out = dir.join("run").display()
    )
}

/// (step, train loss) of every line of a run's metrics.jsonl, in file order.
fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["train/loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Runs the binary in `cwd`.
fn switchyard_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running switchyard")
}

/// Every shipped config validates and trains 2 steps from a directory that is not the
/// repository's: its data (the corpus shipped in data/, read gzip-compressed) is found
/// relative to the config file. A path given with --set is relative to the working
/// directory.
#[test]
fn every_shipped_config_validates_and_runs_two_steps_from_another_directory() {
    let configs = std::fs::read_dir(repo_root().join("configs")).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let corpus = repo_root().join("data/tinyshakespeare/input.txt.gz");
    let mut seen = 0;
    let mut shakespeare = 0;
    for entry in configs {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        seen += 1;
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        // A relative config path from another directory of the repository.
        let rel = format!("../configs/{name}");
        let out = switchyard_in(
            &repo_root().join("docs"),
            &["validate-config", "--config", &rel],
        );
        assert!(out.status.success(), "{rel}: {}", text(&out));
        if String::from_utf8_lossy(&out.stdout).contains(corpus.to_str().unwrap()) {
            shakespeare += 1;
        }
        let abs = path.to_str().unwrap();
        let run_dir = tempfile::tempdir().unwrap();
        let out_dir = format!("run.output_dir={}", run_dir.path().display());
        let out = switchyard_in(
            elsewhere.path(),
            &[
                "train",
                "--config",
                abs,
                "--set",
                &out_dir,
                "--set",
                "train.steps=2",
                "--set",
                "train.eval_batches=1",
                "--set",
                "train.eval_every=0",
                "--set",
                "checkpoint.every=0",
                "--set",
                "metrics.progress=false",
            ],
        );
        assert!(out.status.success(), "{name}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("final: step 2 valid loss"),
            "{name}: {}",
            text(&out)
        );
    }
    assert!(seen >= 3, "expected the shipped configs, found {seen}");
    assert!(
        shakespeare >= 3,
        "{shakespeare} configs read the shipped corpus"
    );
    assert!(
        std::fs::read_dir(elsewhere.path())
            .unwrap()
            .next()
            .is_none(),
        "nothing is written into the working directory"
    );

    // A relative path set on the command line is the working directory's.
    let mine = elsewhere.path().join("mine.txt");
    std::fs::write(&mine, "a corpus of my own\n".repeat(500)).unwrap();
    let ep2 = repo_root().join("configs/ep2.yaml");
    let ep2 = ep2.to_str().unwrap();
    let out = switchyard_in(
        elsewhere.path(),
        &[
            "validate-config",
            "--config",
            ep2,
            "--set",
            "data.source.path=mine.txt",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(mine.to_str().unwrap()),
        "{}",
        text(&out)
    );
    let out = switchyard_in(
        &repo_root(),
        &[
            "validate-config",
            "--config",
            ep2,
            "--set",
            "data.source.path=mine.txt",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--set data.source.path=mine.txt"),
        "{}",
        text(&out)
    );
}

#[test]
fn config_errors_exit_2_with_file_line_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tiny_config(tmp.path());
    let cases = [
        // (mutation, expected key path, expected line, extra text)
        (
            good.replace("top_k: 2", "top_kk: 2"),
            "model.moe.top_kk",
            16,
            "did you mean `top_k`",
        ),
        (
            good.replace("lr: 3.0e-3", "lr: fast"),
            "optim.lr",
            25,
            "expected f64",
        ),
        (
            good.replace("top_k: 2", "top_k: 9"),
            "model.moe.top_k",
            16,
            "num_experts",
        ),
    ];
    for (i, (yaml, key, line, extra)) in cases.iter().enumerate() {
        let file = write(tmp.path(), &format!("bad{i}.yaml"), yaml);
        let out = switchyard(&["train", "--config", file.to_str().unwrap()]);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{all}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let location = format!("{}:{line}:", file.display());
        assert!(stderr.contains(&location), "expected `{location}` in {all}");
        assert!(stderr.contains(key), "expected `{key}` in {all}");
        assert!(stderr.contains(extra), "expected `{extra}` in {all}");
        assert!(
            !tmp.path().join("run").exists(),
            "nothing may be written for a bad config"
        );
    }
    // An override error names the override.
    let file = write(tmp.path(), "good.yaml", &good);
    let out = switchyard(&[
        "validate-config",
        "--config",
        file.to_str().unwrap(),
        "--set",
        "model.moe.top_k=many",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--set model.moe.top_k=many"),
        "{}",
        text(&out)
    );
}

/// A tokenizer.json whose vocabulary (300 word-level tokens) is larger than the model's:
/// a config error (exit 2) naming the key and both sizes, for validate-config and train.
#[test]
fn a_tokenizer_larger_than_the_model_vocabulary_is_a_config_error() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = (0..300)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    write(tmp.path(), "tokenizer.json", &tokenizer.to_string());
    // Relative to the config file.
    let cfg = tiny_config(tmp.path()).replace(
        "tokenizer: {type: byte}",
        "tokenizer: {type: huggingface, path: tokenizer.json}",
    );
    let cfg = write(tmp.path(), "c.yaml", &cfg);
    for command in ["validate-config", "train"] {
        let out = switchyard(&[command, "--config", cfg.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{command}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        for want in [
            "c.yaml:7:3: model.vocab_size: is 256",
            "has 300 tokens",
            "set model.vocab_size: 300",
        ] {
            assert!(stderr.contains(want), "{command}: {want}: {}", text(&out));
        }
    }
    assert!(!tmp.path().join("run").exists());
    let out = switchyard(&[
        "validate-config",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "model.vocab_size=300",
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

/// A resume whose config changes the trajectory (here train.steps, which the cosine
/// schedule decays over) is refused with exit 2 and the list of differences; one that
/// changes only what is logged is accepted with a note; --allow-config-change overrides.
#[test]
fn a_resume_with_a_changed_schedule_is_refused_and_a_changed_log_interval_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path()).replace("  decay_steps: 12\n", "");
    let cfg = write(tmp.path(), "c.yaml", &cfg);
    let cfg = cfg.to_str().unwrap();
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--config", cfg, "--set", "train.steps=6"];
        // One checkpoint, at step 4: each resume below starts there.
        args.extend([
            "--set",
            "checkpoint.every=4",
            "--set",
            "checkpoint.save_final=false",
        ]);
        args.extend(extra);
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(&args)
            .env("RUST_LOG", "info")
            .output()
            .unwrap()
    };
    let out = train(&[]);
    assert!(out.status.success(), "{}", text(&out));
    let run = tmp.path().join("run");
    assert_eq!(steps(&run), [1, 2, 3, 4, 5, 6]);
    let before = tree(&run);

    let out = train(&[
        "--set",
        "train.steps=9",
        "--set",
        "optim.lr=1e-3",
        "--resume",
        "auto",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        "step-00000004 was trained with, in what sets the training trajectory:",
        "  train.steps: 6 -> 9 (the cosine schedule",
        "  optim.lr: 0.003 -> 0.001",
        "--allow-config-change",
    ] {
        assert!(stderr.contains(want), "{want}: {}", text(&out));
    }
    assert!(tree(&run) == before, "a refused resume touches nothing");

    let out = train(&["--set", "metrics.log_every=2", "--resume", "auto"]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("config changed, accepted (same trajectory): metrics.log_every: 1 -> 2"),
        "{}",
        text(&out)
    );
    assert!(
        !stderr.contains("checkpoint.every"),
        "the same on both: {stderr}"
    );

    let out = train(&[
        "--set",
        "train.steps=9",
        "--resume",
        "auto",
        "--allow-config-change",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("allowed by --allow-config-change"),
        "{}",
        text(&out)
    );
    assert_eq!(*steps(&run).last().unwrap(), 9);
}

#[test]
fn resumed_run_continues_the_same_loss_curve_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    // Uninterrupted: 12 steps.
    let full_dir = tmp.path().join("full");
    std::fs::create_dir_all(&full_dir).unwrap();
    let full_cfg = write(&full_dir, "c.yaml", &tiny_config(&full_dir));
    let out = switchyard(&["train", "--config", full_cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    // Interrupted: 6 steps (same schedule: decay_steps pins it), then resume to 12.
    let part_dir = tmp.path().join("part");
    std::fs::create_dir_all(&part_dir).unwrap();
    let part_cfg = write(&part_dir, "c.yaml", &tiny_config(&part_dir));
    let part = part_cfg.to_str().unwrap();
    let out = switchyard(&["train", "--config", part, "--set", "train.steps=6"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = switchyard(&["train", "--config", part, "--resume", "auto"]);
    assert!(out.status.success(), "{}", text(&out));

    let full = losses(&full_dir.join("run"));
    let resumed = losses(&part_dir.join("run"));
    assert_eq!(full.len(), 12);
    assert_eq!(resumed.len(), 12, "6 steps, then 6 more after the resume");
    for ((s1, l1), (s2, l2)) in full.iter().zip(&resumed) {
        assert_eq!(s1, s2);
        assert_eq!(l1.to_bits(), l2.to_bits(), "step {s1}: {l1} vs {l2}");
    }
    // The loss actually fell, so the comparison is about a real curve.
    assert!(full[11].1 < full[0].1, "{full:?}");
}

/// Expert + data parallelism on the local backend (ranks as threads) follows the
/// single-process loss curve, and a checkpoint written at one layout resumes at another:
/// 6 steps at ep=2, then 6 more at dp=2 x ep=2, against 12 steps in one process.
/// Trains `config(dir)` for its 12 steps in one process (in `root/one`), and in `root/par`
/// 6 steps at ep=2 then, resumed, 6 at dp=2 x ep=2; asserts both succeed and the curves
/// agree within 1e-5 relative at every step. Returns (one process, layouts) run dirs.
fn one_process_and_across_layouts(
    root: &Path,
    config: impl Fn(&Path) -> String,
) -> (PathBuf, PathBuf) {
    let one_dir = root.join("one");
    std::fs::create_dir_all(&one_dir).unwrap();
    let one_cfg = write(&one_dir, "c.yaml", &config(&one_dir));
    let out = switchyard(&["train", "--config", one_cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));

    let par_dir = root.join("par");
    std::fs::create_dir_all(&par_dir).unwrap();
    let par_cfg = write(&par_dir, "c.yaml", &config(&par_dir));
    let par = par_cfg.to_str().unwrap();
    let out = switchyard(&[
        "train",
        "--config",
        par,
        "--set",
        "train.steps=6",
        "--set",
        "parallel.ep=2",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let shard = par_dir.join("run/checkpoints/step-00000006/model.rank-0001.safetensors");
    assert!(
        shard.exists(),
        "ep rank 1 wrote its experts: {}",
        shard.display()
    );
    let out = switchyard(&[
        "train",
        "--config",
        par,
        "--set",
        "parallel.dp=2",
        "--set",
        "parallel.ep=2",
        "--resume",
        "auto",
    ]);
    assert!(out.status.success(), "{}", text(&out));

    let one = losses(&one_dir.join("run"));
    let par = losses(&par_dir.join("run"));
    assert_eq!(one.len(), 12);
    assert_eq!(par.len(), 12, "6 steps at ep=2, then 6 at dp=2 x ep=2");
    for ((s1, l1), (s2, l2)) in one.iter().zip(&par) {
        assert_eq!(s1, s2);
        let rel = ((l1 - l2) / l1).abs();
        assert!(
            rel <= 1e-5,
            "step {s1}: one process {l1}, layouts {l2} (rel {rel:e})"
        );
    }
    assert!(one[11].1 < one[0].1, "{one:?}");
    (one_dir, par_dir)
}

#[test]
fn layouts_follow_the_single_process_curve_and_resume_across_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, par_dir) = one_process_and_across_layouts(tmp.path(), tiny_config);

    // A sharded checkpoint with a shard missing is rejected, naming the file.
    let broken_dir = tmp.path().join("broken");
    let broken_ckpt = broken_dir.join("run/checkpoints/step-00000006");
    std::fs::create_dir_all(&broken_ckpt).unwrap();
    for entry in std::fs::read_dir(par_dir.join("run/checkpoints/step-00000006")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), broken_ckpt.join(entry.file_name())).unwrap();
    }
    std::fs::remove_file(broken_ckpt.join("model.rank-0001.safetensors")).unwrap();
    let broken_cfg = write(&broken_dir, "c.yaml", &tiny_config(&broken_dir));
    let out = switchyard(&[
        "train",
        "--config",
        broken_cfg.to_str().unwrap(),
        "--set",
        "parallel.ep=2",
        "--resume",
        "auto",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("model.rank-0001.safetensors"),
        "{}",
        text(&out)
    );
}

/// Sharded optimizer state and gradients follow the one-process loss curve (clipping and
/// two accumulation micro-batches on) and their checkpoints resume at other layouts and
/// settings: dp=2 `states` -> dp=4 `states_and_grads` -> dp=2 x ep=2 unsharded, and an
/// unsharded one-process checkpoint -> dp=2 x ep=2 `states_and_grads`.
#[test]
fn sharded_optimizer_follows_the_single_process_curve_and_resumes_at_other_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let accum = ["--set", "train.grad_accum_steps=2"];
    let run = |dir: &Path, sets: &[&str], resume: bool| {
        std::fs::create_dir_all(dir).unwrap();
        let cfg = write(dir, "c.yaml", &tiny_config(dir));
        let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
        args.extend(accum);
        for set in sets {
            args.extend(["--set", set]);
        }
        if resume {
            args.extend(["--resume", "auto"]);
        }
        let out = switchyard(&args);
        assert!(out.status.success(), "{sets:?}: {}", text(&out));
    };
    let one_dir = tmp.path().join("one");
    run(&one_dir, &[], false);

    let sharded = tmp.path().join("sharded");
    run(
        &sharded,
        &[
            "train.steps=4",
            "parallel.dp=2",
            "parallel.shard_optimizer=states",
        ],
        false,
    );
    // Every rank wrote the moments it owns.
    let ckpt = sharded.join("run/checkpoints/step-00000004");
    for rank in 0..2 {
        let file = ckpt.join(format!("optimizer.rank-{rank:04}.safetensors"));
        assert!(file.exists(), "{}", file.display());
    }
    run(
        &sharded,
        &[
            "train.steps=8",
            "parallel.dp=4",
            "parallel.shard_optimizer=states_and_grads",
        ],
        true,
    );
    run(&sharded, &["parallel.dp=2", "parallel.ep=2"], true);

    // An unsharded checkpoint of one process, continued sharded at dp=2 x ep=2.
    let mixed = tmp.path().join("mixed");
    let from = one_dir.join("run/checkpoints/step-00000006");
    let to = mixed.join("run/checkpoints/step-00000006");
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    run(
        &mixed,
        &[
            "parallel.dp=2",
            "parallel.ep=2",
            "parallel.shard_optimizer=states_and_grads",
        ],
        true,
    );

    let one = losses(&one_dir.join("run"));
    assert_eq!(one.len(), 12);
    for (name, got) in [
        ("sharded", losses(&sharded.join("run"))),
        ("one process -> sharded", losses(&mixed.join("run"))),
    ] {
        assert!(!got.is_empty(), "{name}");
        for (step, loss) in &got {
            let (_, want) = one[(*step - 1) as usize];
            let rel = ((loss - want) / want).abs();
            assert!(
                rel <= 1e-5,
                "{name}, step {step}: {loss} vs one process {want} (rel {rel:e})"
            );
        }
    }
    assert_eq!(losses(&sharded.join("run")).len(), 12);
    assert_eq!(losses(&mixed.join("run")).len(), 6, "steps 7..12");
}

/// SIGUSR1 (twice, the second one during the stop) makes the run checkpoint at the next
/// step boundary and exit 75; `--resume auto` then finishes the same loss curve exactly.
/// At ep=2 (rank threads) the signal reaches every rank at once; the stop is collective.
#[test]
fn preemption_signal_checkpoints_exits_75_and_the_resumed_curve_is_unchanged() {
    for layout in ["parallel.ep=1", "parallel.ep=2"] {
        let tmp = tempfile::tempdir().unwrap();
        let full_dir = tmp.path().join("full");
        std::fs::create_dir_all(&full_dir).unwrap();
        let full_cfg = write(&full_dir, "c.yaml", &tiny_config(&full_dir));
        let full_cfg = full_cfg.to_str().unwrap();
        let common = [
            "--set",
            "train.steps=60",
            "--set",
            "optim.decay_steps=60",
            "--set",
            layout,
        ];
        let mut args = vec!["train", "--config", full_cfg];
        args.extend(common);
        let out = switchyard(&args);
        assert!(out.status.success(), "{layout}: {}", text(&out));

        let part_dir = tmp.path().join("part");
        std::fs::create_dir_all(&part_dir).unwrap();
        let part_cfg = write(&part_dir, "c.yaml", &tiny_config(&part_dir));
        let part_cfg = part_cfg.to_str().unwrap();
        let mut args = vec!["train", "--config", part_cfg];
        args.extend(common);
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(&args)
            .current_dir(repo_root())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let metrics = part_dir.join("run/metrics.jsonl");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "{layout}: no progress"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let pid = child.id().to_string();
        for _ in 0..2 {
            let kill = Command::new("kill").args(["-USR1", &pid]).status().unwrap();
            assert!(kill.success());
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(75), "{layout}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("preempted at step"),
            "{layout}: {}",
            text(&out)
        );
        let stopped = losses(&part_dir.join("run")).len();
        assert!(stopped < 60, "{layout}: stopped after {stopped} steps");

        let mut args = vec!["train", "--config", part_cfg, "--resume", "auto"];
        args.extend(common);
        let out = switchyard(&args);
        assert!(out.status.success(), "{layout}: {}", text(&out));
        let full = losses(&full_dir.join("run"));
        let resumed = losses(&part_dir.join("run"));
        assert_eq!(full.len(), 60);
        assert_eq!(
            resumed, full,
            "{layout}: stopped after {stopped} steps, then resumed"
        );
    }
}

/// A layout that does not fit the model or the batch is a config error (exit 2) naming the
/// key, before anything runs.
#[test]
fn a_layout_that_does_not_fit_is_a_config_error() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.yaml", &tiny_config(tmp.path()));
    let cfg = cfg.to_str().unwrap();
    for (set, key) in [
        ("parallel.ep=3", "parallel.ep"),
        ("parallel.dp=3", "data.batch_size"),
    ] {
        let out = switchyard(&["validate-config", "--config", cfg, "--set", set]);
        assert_eq!(out.status.code(), Some(2), "{set}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(key),
            "{set}: {}",
            text(&out)
        );
    }
}

#[test]
fn inspect_checkpoint_verifies_and_detects_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.yaml", &tiny_config(tmp.path()));
    let out = switchyard(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.steps=3",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let ckpt = tmp.path().join("run/checkpoints/step-00000003");
    let out = switchyard(&["inspect-checkpoint", ckpt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("layers.0.moe.experts.3.w_down"),
        "{}",
        text(&out)
    );
    assert!(stdout.contains("exp_avg_sq"), "{}", text(&out));

    // The checkpoint converts into an AdaMoE model (weights only; fresh run).
    let converted = format!("run.output_dir={}", tmp.path().join("adamoe").display());
    let out = switchyard(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        &converted,
        "--set",
        "model.moe.router={type: null_experts, num_null: 4, null_init: copy_true_rows}",
        "--set",
        "model.moe.top_k=3",
        "--set",
        "train.steps=2",
        "--init-from",
        ckpt.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("final: step 2"),
        "{}",
        text(&out)
    );

    // Flip one byte of the model file: inspect fails and resume refuses it.
    let model = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&model, bytes).unwrap();
    let out = switchyard(&["inspect-checkpoint", ckpt.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    let out = switchyard(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--resume",
        ckpt.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("model.safetensors"),
        "{}",
        text(&out)
    );
}

/// Issue #19: one flipped bit in a committed manifest (`tokens_seen` 384 -> 284, still
/// valid JSON) is caught: inspect-checkpoint fails naming manifest.json, an explicit resume
/// refuses it, and `--resume auto` skips it with a warning, resumes from the newest
/// verified checkpoint and moves the damaged one aside when it saves that step again.
#[test]
fn a_flipped_manifest_byte_is_detected_and_never_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.yaml", &tiny_config(tmp.path()));
    let cfg = cfg.to_str().unwrap();
    let out = switchyard(&["train", "--config", cfg, "--set", "train.steps=6"]);
    assert!(out.status.success(), "{}", text(&out));
    let ckpts = tmp.path().join("run/checkpoints");
    let step6 = ckpts.join("step-00000006");
    let manifest = step6.join("manifest.json");
    let mut bytes = std::fs::read(&manifest).unwrap();
    let key = b"\"tokens_seen\": ";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    bytes[at] ^= 0x01;
    std::fs::write(&manifest, &bytes).unwrap();

    let out = switchyard(&["inspect-checkpoint", step6.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("manifest.json") && stderr.contains("corrupt"),
        "{}",
        text(&out)
    );
    let out = switchyard(&[
        "train",
        "--config",
        cfg,
        "--resume",
        step6.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("manifest.json"),
        "{}",
        text(&out)
    );

    let out = switchyard(&[
        "train",
        "--config",
        cfg,
        "--resume",
        "auto",
        "--set",
        "train.steps=9",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("step-00000006"),
        "{}",
        text(&out)
    );
    let out = switchyard(&["inspect-checkpoint", step6.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "the step was saved again: {}",
        text(&out)
    );
    let aside = std::fs::read_dir(&ckpts)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .filter(|n| n.starts_with(".step-00000006.incomplete-"))
        .count();
    assert_eq!(aside, 1, "the damaged checkpoint is kept aside");
}

/// Issue #19: a step directory without its manifest (deleted, or lost by a crash on a
/// filesystem that reorders writes) never blocks `--resume auto`: the resumed run
/// recomputes that step and moves the incomplete directory aside instead of failing with
/// "already exists".
#[test]
fn resume_auto_is_not_blocked_by_a_step_dir_without_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.yaml", &tiny_config(tmp.path()));
    let cfg = cfg.to_str().unwrap();
    let every2 = "checkpoint.every=2";
    let out = switchyard(&[
        "train",
        "--config",
        cfg,
        "--set",
        every2,
        "--set",
        "train.steps=6",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let ckpts = tmp.path().join("run/checkpoints");
    std::fs::remove_file(ckpts.join("step-00000006/manifest.json")).unwrap();

    let out = switchyard(&[
        "train",
        "--config",
        cfg,
        "--set",
        every2,
        "--set",
        "train.steps=8",
        "--resume",
        "auto",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("moved aside"), "{}", text(&out));
    for step in ["step-00000006", "step-00000008"] {
        let out = switchyard(&["inspect-checkpoint", ckpts.join(step).to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let names: Vec<String> = std::fs::read_dir(&ckpts)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().into_string().ok())
        .collect();
    let aside: Vec<_> = names
        .iter()
        .filter(|n| n.starts_with(".step-00000006.incomplete-"))
        .collect();
    assert_eq!(aside.len(), 1, "{names:?}");
    assert!(ckpts.join(aside[0]).join("model.safetensors").exists());
}

#[test]
fn prepare_data_then_train_and_eval_on_the_indexed_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let docs: String = (0..200)
        .map(|i| {
            format!(
                "{{\"text\": \"document {i}: the quick brown fox jumps over the lazy dog {i}\"}}\n"
            )
        })
        .collect();
    let jsonl = write(tmp.path(), "docs.jsonl", &docs);
    let shakespeare = repo_root().join("data/tinyshakespeare/input.txt.gz");
    // (.bin as u16 ids, log) of prepare-data on the JSONL file and the gzip-compressed text
    // (formats from the names).
    let prepare = |prefix: &Path, extra: &[&str]| {
        let mut args = vec![
            "prepare-data",
            "--input",
            jsonl.to_str().unwrap(),
            "--input",
            shakespeare.to_str().unwrap(),
            "--output",
            prefix.to_str().unwrap(),
        ];
        args.extend(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(&args)
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("201 documents"),
            "{}",
            text(&out)
        );
        let bin = std::fs::read(prefix.with_extension("bin")).unwrap();
        let ids: Vec<u16> = bin
            .chunks(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        (ids, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // By default every document ends with the byte tokenizer's separator 0xFF, named in the
    // log; --no-eod writes the documents back to back.
    let (ids, log) = prepare(&tmp.path().join("plain"), &["--no-eod"]);
    assert_eq!(ids.iter().filter(|&&t| t == 0xff).count(), 0);
    assert!(
        log.contains("--no-eod: the documents follow each other"),
        "{log}"
    );
    let (with_eod, log) = prepare(&tmp.path().join("corpus"), &[]);
    assert_eq!(with_eod.iter().filter(|&&t| t == 0xff).count(), 201);
    assert_eq!(with_eod.len(), ids.len() + 201);
    assert_eq!(*with_eod.last().unwrap(), 0xff);
    assert!(log.contains("end-of-document token: byte 0xFF"), "{log}");
    // The shipped corpus, decompressed, is the last document.
    assert!(ids.len() > 1_115_394, "{}", ids.len());
    let prefix = tmp.path().join("corpus");

    let cfg = tiny_config(tmp.path()).replace(
        "source: {type: synthetic, seed: 3, bytes: 40000}",
        &format!("source: {{type: indexed, prefix: {}}}", prefix.display()),
    );
    let cfg = write(tmp.path(), "c.yaml", &cfg);
    let out = switchyard(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.steps=3",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = switchyard(&["eval", "--config", cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("step 3") && stdout.contains("perplexity"),
        "{}",
        text(&out)
    );
}

/// Runs `prepare-data` (byte tokenizer) on `docs` (the text of each JSONL document) into
/// `prefix`.
fn prepare_jsonl(prefix: &Path, docs: impl Iterator<Item = String>) {
    let lines: String = docs.map(|d| format!("{{\"text\": \"{d}\"}}\n")).collect();
    let jsonl = prefix.with_extension("jsonl");
    std::fs::write(&jsonl, lines).unwrap();
    let out = switchyard(&[
        "prepare-data",
        "--input",
        jsonl.to_str().unwrap(),
        "--output",
        prefix.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

/// `(step, value of key)` of every line of a run's metrics.jsonl that has the key.
fn metric(run_dir: &Path, key: &str) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            Some((v["step"].as_u64()?, v[key].as_f64()?))
        })
        .collect()
}

/// A blend of two prepared datasets, 0.7 / 0.3, by relative prefixes (resolved against the
/// config file): the per-source token counts in metrics.jsonl stay within one sequence of
/// the weights at every step (within 1% at the end), the curve is the same in one process
/// and across layouts with a resume in between (the blend's position is in the
/// checkpoint), and the small source's repetition is warned about at start.
#[test]
fn a_blend_follows_its_weights_and_resumes_across_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    prepare_jsonl(
        &data.join("web"),
        (0..300).map(|i| format!("page {i}: the quick brown fox jumps over the lazy dog")),
    );
    // 14 training documents, about 17 sequences: read ~7 times by 0.3 of 384 sequences.
    prepare_jsonl(
        &data.join("code"),
        (0..16).map(|i| format!("def f{i}(): return {i}")),
    );
    let (seq_len, batch_size, steps) = (16.0, 32.0, 12.0);
    let config = |dir: &Path| {
        tiny_config(dir)
            .replace(
                "source: {type: synthetic, seed: 3, bytes: 40000}",
                "source:\n    type: blend\n    sources:\n      \
                 - {prefix: ../data/web, weight: 7}\n      \
                 - {prefix: ../data/code, weight: 3, name: code}",
            )
            .replace("batch_size: 4", "batch_size: 32")
    };
    let (one, par) = one_process_and_across_layouts(tmp.path(), config);
    let (one, par) = (one.join("run"), par.join("run"));
    for (name, weight) in [("web", 0.7), ("code", 0.3)] {
        let key = format!("data/{name}/tokens_seen");
        let counts = metric(&one, &key);
        assert_eq!(counts.len(), 12, "{key}");
        assert_eq!(
            counts,
            metric(&par, &key),
            "{key}: the same at every layout"
        );
        for &(step, tokens) in &counts {
            let share = weight * step as f64 * batch_size * seq_len;
            assert!(
                (tokens - share).abs() < seq_len,
                "{key} at step {step}: {tokens} tokens, weight share {share}"
            );
        }
        let last = counts[11].1 / (steps * batch_size * seq_len);
        assert!(
            ((last - weight) / weight).abs() < 0.01,
            "{name}: {last} of the tokens for weight {weight}"
        );
    }
    let epochs = metric(&one, "data/code/epochs");
    assert!(epochs[11].1 > 4.0, "{epochs:?}");
    // Each source's validation loss; valid/loss is their 0.7 / 0.3 mean, and all three are
    // the same at every layout.
    for run in [&one, &par] {
        let (web, code) = (
            metric(run, "valid/web/loss"),
            metric(run, "valid/code/loss"),
        );
        let overall = metric(run, "valid/loss");
        assert_eq!(
            overall.len(),
            2,
            "evaluations at steps 6 and 12: {overall:?}"
        );
        for i in 0..2 {
            let mean = 0.7 * web[i].1 + 0.3 * code[i].1;
            assert!(
                (overall[i].1 - mean).abs() <= 1e-9 * mean,
                "{overall:?} {web:?} {code:?}"
            );
            assert!(web[i].1 != code[i].1, "two sources, two losses");
        }
    }
    for key in ["valid/web/loss", "valid/code/loss"] {
        for ((s1, l1), (s2, l2)) in metric(&one, key).iter().zip(&metric(&par, key)) {
            assert_eq!(s1, s2);
            assert!(
                ((l1 - l2) / l1).abs() <= 1e-5,
                "{key} at step {s1}: {l1} vs {l2}"
            );
        }
    }
    // The start-up warning about a repeated source (logged at warn level): one step of 256
    // sequences reads 0.3 of them from code's ~17, more than 4 epochs.
    let cfg = write(
        &tmp.path().join("one"),
        "c.yaml",
        &config(&tmp.path().join("one")),
    );
    let other = tmp.path().join("warn");
    let out = switchyard(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        &format!("run.output_dir={}", other.display()),
        "--set",
        "train.steps=1",
        "--set",
        "data.batch_size=256",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("blend source code is read") && !stderr.contains("source web is read"),
        "{}",
        text(&out)
    );

    // A zero weight and a missing dataset are config errors naming the key.
    let bad = config(&tmp.path().join("bad"))
        .replace("weight: 3,", "weight: 0,")
        .replace("../data/web", "../data/nothing");
    std::fs::create_dir_all(tmp.path().join("bad")).unwrap();
    let bad = write(&tmp.path().join("bad"), "c.yaml", &bad);
    let out = switchyard(&["validate-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("data.source.sources[1].weight") && stderr.contains("positive"),
        "{}",
        text(&out)
    );
}

/// `record-routing` of 3 steps of `cfg` into `stats`.
fn record_routing(cfg: &Path, stats: &Path) -> Output {
    switchyard(&[
        "record-routing",
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        "3",
        "--out",
        stats.to_str().unwrap(),
    ])
}

#[test]
fn record_routing_then_plan_placement() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "tiny.yaml", &tiny_config(tmp.path()));
    let stats = tmp.path().join("stats.json");
    let out = record_routing(&cfg, &stats);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("recorded 3 steps"),
        "{}",
        text(&out)
    );
    let plans = tmp.path().join("plans.json");
    let out = switchyard(&[
        "plan-placement",
        "--stats",
        stats.to_str().unwrap(),
        "--ranks",
        "2",
        "--out",
        plans.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for strategy in ["contiguous", "heuristic", "ilp stage 1", "ilp stage 2"] {
        assert!(
            stdout.contains(strategy),
            "{strategy} missing: {}",
            text(&out)
        );
    }
    let plans: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plans).unwrap()).unwrap();
    assert_eq!(plans["format"], "switchyard-placement-plan/1");
    assert_eq!(plans["ep"], 2);
    assert_eq!(plans["moe_layers"], serde_json::json!([0, 1]));
    assert_eq!(plans["plans"].as_array().unwrap().len(), 3);
    for plan in plans["plans"].as_array().unwrap() {
        let owners = plan["owners"].as_array().unwrap();
        assert_eq!(owners.len(), 2, "one owner vector per MoE layer");
        for owner in owners {
            let mut count = [0; 2];
            for rank in owner.as_array().unwrap() {
                count[rank.as_u64().unwrap() as usize] += 1;
            }
            assert_eq!(count, [2, 2]);
        }
    }
    // A rank count that does not divide the experts is refused with a reason.
    let out = switchyard(&[
        "plan-placement",
        "--stats",
        stats.to_str().unwrap(),
        "--ranks",
        "3",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be split evenly"));
}

/// `switchyard` with `RUST_LOG=info` (to read the trainer's log lines).
fn switchyard_info(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .current_dir(repo_root())
        .env("RUST_LOG", "info")
        .output()
        .expect("running switchyard")
}

/// Load-aware placement with live migration (ep=4 on threads, 8 experts, the heuristic
/// re-planning every 3 steps) follows the loss curve of the same run without rebalancing;
/// a run stopped after a migration resumes with the saved placement at the same ep size,
/// and falls back to contiguous (logged) at another ep size, still on the same curve.
#[test]
fn rebalancing_migrates_experts_and_keeps_the_loss_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = ["--set", "parallel.ep=4", "--set", "model.moe.num_experts=8"];
    // No migration threshold: every plan migrates (the threshold has its own test).
    let rebalance = [
        "--set",
        "placement.strategy.type=heuristic",
        "--set",
        "placement.rebalance_every=3",
        "--set",
        "placement.migration.payback_steps=0",
    ];
    let train = |name: &str, extra: &[&str]| -> (PathBuf, Output) {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = write(&dir, "c.yaml", &tiny_config(&dir));
        let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
        args.extend(layout);
        args.extend(extra);
        let out = switchyard_info(&args);
        assert!(out.status.success(), "{}", text(&out));
        (dir, out)
    };
    let (fixed_dir, _) = train("fixed", &[]);
    let (moving_dir, out) = train("moving", &rebalance);
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    let migrations = log
        .lines()
        .filter(|l| l.contains("placement: step"))
        .count();
    assert_eq!(migrations, 3, "re-planned at steps 3, 6, 9: {log}");
    assert!(log.contains("moved"), "{log}");
    assert!(
        moving_dir.join("run/routing-stats.json").exists(),
        "routing statistics saved with the checkpoints"
    );
    let fixed = losses(&fixed_dir.join("run"));
    let moving = losses(&moving_dir.join("run"));
    assert_eq!(fixed.len(), 12);
    assert_eq!(moving.len(), 12);
    let same_curve = |a: &[(u64, f64)], b: &[(u64, f64)], what: &str| {
        for ((s1, l1), (s2, l2)) in a.iter().zip(b) {
            assert_eq!(s1, s2);
            let rel = ((l1 - l2) / l1).abs();
            assert!(rel <= 1e-5, "{what}, step {s1}: {l1} vs {l2} (rel {rel:e})");
        }
    };
    same_curve(&fixed, &moving, "rebalanced vs fixed placement");

    // Stop at step 6 (migrated at step 3), resume at ep=4 (saved placement) to step 9, then
    // at ep=2 (contiguous fallback) to step 12.
    let dir = tmp.path().join("resumed");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = write(&dir, "c.yaml", &tiny_config(&dir));
    let cfg = cfg.to_str().unwrap();
    for (steps, ep, resume) in [("6", "4", false), ("9", "4", true), ("12", "2", true)] {
        let steps = format!("train.steps={steps}");
        let ep = format!("parallel.ep={ep}");
        let mut args = vec!["train", "--config", cfg, "--set", &steps, "--set", &ep];
        args.extend(["--set", "model.moe.num_experts=8"]);
        args.extend(rebalance);
        if resume {
            args.extend(["--resume", "auto"]);
        }
        let out = switchyard_info(&args);
        assert!(out.status.success(), "{}", text(&out));
        let log = String::from_utf8_lossy(&out.stderr);
        if ep.ends_with('2') {
            assert!(log.contains("another ep size"), "{log}");
        }
    }
    let resumed = losses(&dir.join("run"));
    assert_eq!(resumed.len(), 12);
    same_curve(&fixed, &resumed, "stopped, resumed at ep=4 then ep=2");
}

/// Timeouts past a week (or not finite) are config errors naming the key, not a panic at
/// the first collective or the first multi-rank save.
#[test]
fn huge_timeouts_are_config_errors_naming_the_key() {
    for (set, key) in [
        ("comm.timeout_s=1e20", "comm.timeout_s"),
        ("comm.timeout_s=1e19", "comm.timeout_s"),
        ("comm.timeout_s=.inf", "comm.timeout_s"),
        (
            "checkpoint.save_timeout_s=1e20",
            "checkpoint.save_timeout_s",
        ),
        (
            "placement.strategy={type: ilp, time_limit_s: 1e20}",
            "placement.strategy.time_limit_s",
        ),
    ] {
        let out = switchyard(&[
            "validate-config",
            "--config",
            "configs/quickstart.yaml",
            "--set",
            set,
        ]);
        assert_eq!(out.status.code(), Some(2), "{set}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{key}: must be in")) && stderr.contains("604800]"),
            "{set}: {}",
            text(&out)
        );
    }
}

/// Sizes that cannot fit in this machine's memory are config errors stating the estimate
/// and the available memory, not an allocation abort in `train`.
#[test]
fn impossible_sizes_are_config_errors_with_the_estimate() {
    for set in [
        "model.d_model=1000000000000",
        "model.vocab_size=1000000000000",
        "model.moe.num_experts=1000000000",
        "data.batch_size=1000000000",
    ] {
        let out = switchyard(&[
            "validate-config",
            "--config",
            "configs/quickstart.yaml",
            "--set",
            set,
        ]);
        assert_eq!(out.status.code(), Some(2), "{set}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("needs at least") && stderr.contains("but the machine has"),
            "{set}: {}",
            text(&out)
        );
    }
}

/// `estimate-memory` reports even a config that cannot run here (and says so), and `train`
/// writes the measured memory of every step: held, gradient and per-rank peak bytes.
#[test]
fn estimate_memory_reports_and_train_measures_every_rank() {
    let out = switchyard(&[
        "estimate-memory",
        "--config",
        "configs/quickstart.yaml",
        "--set",
        "model.d_model=1000000",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    for line in [
        "weights (f32)",
        "gradients",
        "optimizer (AdamW)",
        "activations",
        "layer 0",
        "communication",
        "optimizer update",
        "peak (estimate)",
        "does not fit",
    ] {
        assert!(report.contains(line), "`{line}` missing:\n{report}");
    }

    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.yaml", &tiny_config(tmp.path()));
    let out = switchyard(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.steps=2",
        "--set",
        "parallel.ep=2",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let metrics = std::fs::read_to_string(tmp.path().join("run/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    let bytes = |key: &str| {
        last[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {last}"))
    };
    let (peak, held) = (bytes("memory/peak_bytes"), bytes("memory/held_bytes"));
    assert!(peak > held && held > 0.0, "{last}");
    assert!(bytes("memory/grad_bytes") > 0.0, "{last}");
    for rank in 0..2 {
        assert!(
            bytes(&format!("memory/rank{rank}/peak_bytes")) > 0.0,
            "{last}"
        );
    }
}

/// Every file under `dir` but the lock file, with its bytes: what a refused run must leave
/// as it was.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().unwrap() != ".switchyard.lock" {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The steps of a run's metrics.jsonl, in file order.
fn steps(run_dir: &Path) -> Vec<u64> {
    losses(run_dir).into_iter().map(|(s, _)| s).collect()
}

/// A second run on a live run directory is refused at once, naming the first run's pid; the
/// lock dies with its holder, so after a kill -9 the next run starts.
#[test]
fn a_second_run_on_a_live_directory_is_refused_and_the_lock_dies_with_its_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.yaml", &tiny_config(tmp.path()));
    let cfg = cfg.to_str().unwrap();
    let long = [
        "--set",
        "train.steps=100000",
        "--set",
        "optim.decay_steps=100000",
        "--set",
        "checkpoint.every=0",
        "--set",
        "checkpoint.save_final=false",
        "--set",
        "train.eval_every=0",
    ];
    let mut args = vec!["train", "--config", cfg];
    args.extend(long);
    let mut first = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(&args)
        .current_dir(repo_root())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = first.id().to_string();
    // Training has begun once a metric line is written: the lock is held by then.
    let metrics = tmp.path().join("run/metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 1 {
        assert!(std::time::Instant::now() < deadline, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let lock = std::fs::read_to_string(tmp.path().join("run/.switchyard.lock")).unwrap();
    assert!(lock.contains(&format!("pid {pid},")), "{lock}");

    for extra in [&[][..], &["--resume", "auto"], &["--start-over"]] {
        let mut args = vec!["train", "--config", cfg, "--set", "train.steps=2"];
        args.extend(extra);
        let started = std::time::Instant::now();
        let out = switchyard(&args);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("in use by another switchyard run")
                && stderr.contains(&format!("pid {pid}")),
            "{extra:?}: {}",
            text(&out)
        );
        assert!(started.elapsed().as_secs() < 30, "refused at once");
    }
    assert!(first.try_wait().unwrap().is_none(), "the first run goes on");
    assert!(!tmp.path().join("run.previous").exists());

    first.kill().unwrap(); // SIGKILL: no clean-up of any kind
    first.wait().unwrap();
    // No checkpoint was committed: `--resume auto` starts fresh and the killed run's metric
    // lines are dropped.
    let out = switchyard(&[
        "train",
        "--config",
        cfg,
        "--set",
        "train.steps=2",
        "--resume",
        "auto",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(steps(&tmp.path().join("run")), [1, 2]);
}

/// A directory that cannot be written is found at start, not at the first save. The
/// checkpoint directory lies under a regular file, which stops root too; a read-only
/// directory (mode 0555) is tried as well where permissions apply (not as root).
#[test]
fn an_unwritable_checkpoint_directory_is_an_error_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.yaml", &tiny_config(tmp.path()));
    let blocker = write(tmp.path(), "blocker", "a file, not a directory");
    let read_only = tmp.path().join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    let mut perms = std::fs::metadata(&read_only).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o555);
    std::fs::set_permissions(&read_only, perms).unwrap();
    let mut dirs = vec![blocker.join("ckpt")];
    if std::fs::write(read_only.join("probe"), "").is_ok() {
        println!("running as root: mode 0555 does not stop writes; that case is skipped");
    } else {
        dirs.push(read_only.clone());
    }
    for dir in dirs {
        let set = format!("checkpoint.dir={}", dir.display());
        let out = switchyard(&["train", "--config", cfg.to_str().unwrap(), "--set", &set]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&dir.display().to_string()) && stderr.contains("checkpoint.dir"),
            "{}",
            text(&out)
        );
        assert!(
            !tmp.path().join("run/metrics.jsonl").exists(),
            "no step may run: {}",
            text(&out)
        );
    }
}

/// A resume recomputes the steps after its checkpoint: metrics.jsonl holds each step once.
#[test]
fn a_resume_leaves_each_step_once_in_metrics_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.yaml", &tiny_config(tmp.path()));
    let cfg = cfg.to_str().unwrap();
    let out = switchyard(&[
        "train",
        "--config",
        cfg,
        "--set",
        "train.steps=6",
        "--set",
        "checkpoint.every=4",
        "--set",
        "checkpoint.save_final=false",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let run = tmp.path().join("run");
    assert_eq!(steps(&run), [1, 2, 3, 4, 5, 6]);
    let out = switchyard(&[
        "train",
        "--config",
        cfg,
        "--set",
        "train.steps=8",
        "--set",
        "checkpoint.every=4",
        "--resume",
        "auto",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(steps(&run), [1, 2, 3, 4, 5, 6, 7, 8]);
}

/// Training again into a directory that holds a run is refused before anything is touched,
/// with the choices; `--start-over` moves the old run aside. `--resume` of an older
/// checkpoint than committed ones is refused too.
#[test]
fn a_second_fresh_run_on_a_finished_directory_is_refused_with_the_choices() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.yaml", &tiny_config(tmp.path()));
    let cfg = cfg.to_str().unwrap();
    let run = tmp.path().join("run");
    let six = ["--set", "train.steps=6"];
    let mut args = vec!["train", "--config", cfg];
    args.extend(six);
    let out = switchyard(&args);
    assert!(out.status.success(), "{}", text(&out));
    let before = tree(&run);
    assert!(run.join("checkpoints/step-00000006").is_dir());

    let step3 = run.join("checkpoints/step-00000003");
    let step3 = step3.to_str().unwrap();
    for extra in [&[][..], &["--resume", step3]] {
        let mut args = vec!["train", "--config", cfg];
        args.extend(six);
        args.extend(extra);
        let started = std::time::Instant::now();
        let out = switchyard(&args);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        for choice in ["--resume auto", "--set run.output_dir="] {
            assert!(
                stderr.contains(choice),
                "{extra:?}: {choice}: {}",
                text(&out)
            );
        }
        assert!(
            stderr.contains(if extra.is_empty() {
                "--start-over"
            } else {
                "step 6"
            }),
            "{extra:?}: {}",
            text(&out)
        );
        assert!(started.elapsed().as_secs() < 30, "refused at once");
        assert!(tree(&run) == before, "{extra:?}: the first run was touched");
    }

    let mut args = vec!["train", "--config", cfg, "--start-over"];
    args.extend(["--set", "train.steps=3"]);
    let out = switchyard(&args);
    assert!(out.status.success(), "{}", text(&out));
    let moved: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("run.previous-")
        })
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    let old: Vec<_> = before
        .iter()
        .map(|(p, b)| (moved[0].join(p.strip_prefix(&run).unwrap()), b.clone()))
        .collect();
    assert!(tree(&moved[0]) == old, "the old run is kept whole");
    assert_eq!(steps(&run), [1, 2, 3]);
    assert!(!run.join("checkpoints/step-00000006").exists());
}

/// Whether process `pid` has a handler installed for signal number `signal` (the `SigCgt`
/// mask of /proc/PID/status).
fn catches(pid: u32, signal: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// A stop signal during start-up (here: generating 100 MB of data), before any step, ends
/// the process at once with 75 — what the generated sbatch script requeues on — and
/// leaves nothing behind to resume: no step ran and no checkpoint exists.
#[test]
fn a_stop_signal_during_start_up_exits_75_at_once() {
    const SIGUSR1: u32 = 10;
    for signal in ["-USR1", "-TERM", "-INT"] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = write(tmp.path(), "c.yaml", &tiny_config(tmp.path()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["train", "--config", cfg.to_str().unwrap()])
            .args(["--set", "data.source.bytes=100000000"])
            .current_dir(repo_root())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !catches(child.id(), SIGUSR1) {
            assert!(std::time::Instant::now() < deadline, "no handler installed");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Into the data generation (~2 s for 100 MB), past the config and the lock.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let metrics = tmp.path().join("run/metrics.jsonl");
        assert!(!metrics.exists(), "start-up was over before the signal");
        let signalled = std::time::Instant::now();
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = child.wait().unwrap();
        let took = signalled.elapsed();
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(75), "{signal}: {stderr}");
        assert!(
            stderr.contains("stop signal before the first step"),
            "{signal}: {stderr}"
        );
        assert!(!metrics.exists(), "{signal}: a step ran");
        assert!(!tmp.path().join("run/checkpoints/step-00000001").exists());
        println!("{signal} during start-up: exit 75 after {took:?}");
    }
}

/// A failure is reported once: a cause that its parent's message already shows is not
/// repeated, and nothing panics.
#[test]
fn an_error_is_said_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.yaml", &tiny_config(tmp.path()));
    let cfg = cfg.to_str().unwrap();
    let out = switchyard(&["train", "--config", cfg, "--set", "train.steps=3"]);
    assert!(out.status.success(), "{}", text(&out));
    let step = tmp.path().join("run/checkpoints/step-00000003");
    let shard = std::fs::read_dir(&step)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let other = tmp.path().join("other");
    let set = format!("run.output_dir={}", other.display());
    let out = switchyard(&[
        "train",
        "--config",
        cfg,
        "--set",
        &set,
        "--init-from",
        step.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("checksum mismatch").count(),
        1,
        "{}",
        text(&out)
    );
    // An --init-from is no resume: the message does not speak of one.
    assert!(!stderr.contains("resum"), "{}", text(&out));
    assert_eq!(stderr.matches("error:").count(), 1, "{}", text(&out));
    assert!(!stderr.contains("panicked"), "{}", text(&out));
}

/// `generate` from a checkpoint saved at ep=2 (placement undone): the same seed draws the
/// same text, another seed other text, greedy decoding is the same with and without the
/// key/value cache, and bad options are refused naming the flag.
#[test]
fn generate_is_deterministic_and_the_cache_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.yaml", &tiny_config(tmp.path()));
    let out = switchyard(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "parallel.ep=2",
        "--set",
        "train.steps=6",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let checkpoints = tmp.path().join("run").join("checkpoints");
    let ckpt = checkpoints.to_str().unwrap();
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--checkpoint",
            ckpt,
            "--prompt",
            "The ",
            "--max-new-tokens",
            "24",
        ];
        args.extend_from_slice(extra);
        let out = switchyard(&args);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let a = generate(&["--seed", "1", "--top-k", "20", "--top-p", "0.9"]);
    assert!(a.starts_with("The "), "{a:?}");
    assert!(a.len() > "The \n".len(), "{a:?}");
    assert_eq!(
        a,
        generate(&["--seed", "1", "--top-k", "20", "--top-p", "0.9"])
    );
    assert_ne!(
        a,
        generate(&["--seed", "2", "--top-k", "20", "--top-p", "0.9"])
    );
    let greedy = generate(&["--temperature", "0"]);
    assert_eq!(greedy, generate(&["--temperature", "0", "--no-kv-cache"]));
    assert_eq!(
        greedy,
        generate(&["--temperature", "0", "--seed", "9"]),
        "greedy ignores the seed"
    );

    let out = switchyard(&[
        "generate",
        "--checkpoint",
        ckpt,
        "--prompt",
        "x",
        "--top-p",
        "0",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--top-p"),
        "{}",
        text(&out)
    );
    let out = switchyard(&[
        "generate",
        "--checkpoint",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("neither a checkpoint"),
        "{}",
        text(&out)
    );
}

/// The loss `eval` prints (`valid loss X nats/token ...`).
fn eval_loss(out: &Output) -> f64 {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("valid loss "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no valid loss in {}", text(out)))
}

/// A model trained at ep=2 (and one at dp=2 x ep=2) evaluates to the same loss at ep=2, at
/// dp=2 x ep=2 and in one process: each rank restores the experts it owns and evaluates its
/// rows; `--tokens-out` (rank 0) writes the same windows at every layout.
#[test]
fn eval_at_any_layout_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, sets) in [
        ("ep2", &["--set", "parallel.ep=2"][..]),
        (
            "dp2ep2",
            &["--set", "parallel.dp=2", "--set", "parallel.ep=2"][..],
        ),
    ] {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = write(&dir, "c.yaml", &tiny_config(&dir));
        let cfg = cfg.to_str().unwrap();
        let mut args = vec!["train", "--config", cfg, "--set", "train.steps=6"];
        args.extend_from_slice(sets);
        let out = switchyard(&args);
        assert!(out.status.success(), "{}", text(&out));
        let mut losses = Vec::new();
        let mut windows = Vec::new();
        for layout in [
            &["--set", "parallel.ep=1"][..],
            &["--set", "parallel.ep=2"][..],
            &["--set", "parallel.dp=2", "--set", "parallel.ep=2"][..],
        ] {
            let tokens = dir.join(format!("tokens-{}.npy", losses.len()));
            let mut args = vec![
                "eval",
                "--config",
                cfg,
                "--tokens-out",
                tokens.to_str().unwrap(),
            ];
            args.extend_from_slice(layout);
            let out = switchyard(&args);
            assert!(out.status.success(), "{}", text(&out));
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("(step 6)"),
                "{}",
                text(&out)
            );
            losses.push(eval_loss(&out));
            windows.push(std::fs::read(&tokens).unwrap());
        }
        eprintln!("trained at {name}: eval at ep=1, ep=2, dp=2 x ep=2: {losses:?}");
        for (loss, w) in losses.iter().zip(&windows).skip(1) {
            let rel = ((loss - losses[0]) / losses[0]).abs();
            assert!(rel <= 1e-5, "{name}: {losses:?} (rel {rel:e})");
            assert_eq!(w, &windows[0], "{name}: the evaluated windows differ");
        }
    }
}

/// `record-routing` at ep=2 (ranks as threads) saves the routing statistics of one process:
/// the ranks' counts are summed at every step.
#[test]
fn record_routing_at_ep2_equals_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "tiny.yaml", &tiny_config(tmp.path()));
    let record = |ep: &str| {
        let stats = tmp.path().join(format!("stats-ep{ep}.json"));
        let out = switchyard(&[
            "record-routing",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            &format!("parallel.ep={ep}"),
            "--steps",
            "4",
            "--out",
            stats.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("recorded 4 steps"),
            "{}",
            text(&out)
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        v
    };
    let (one, ep2) = (record("1"), record("2"));
    assert_eq!(ep2["records"], 4);
    for key in ["moe_layers", "num_experts", "decay"] {
        assert_eq!(one[key], ep2[key], "{key}");
    }
    let numbers = |v: &serde_json::Value| -> Vec<f64> {
        let mut out = Vec::new();
        let mut stack = vec![v.clone()];
        while let Some(v) = stack.pop() {
            match v {
                serde_json::Value::Array(a) => stack.extend(a),
                v => out.push(v.as_f64().unwrap()),
            }
        }
        out
    };
    for key in ["tokens", "transitions"] {
        let (a, b) = (numbers(&one[key]), numbers(&ep2[key]));
        assert_eq!(a.len(), b.len(), "{key}");
        assert!(!a.is_empty() && a.iter().any(|&x| x > 0.0), "{key}: {a:?}");
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-9 * x.abs().max(1.0),
                "{key}: one process {x}, ep=2 {y}"
            );
        }
    }
}

/// `bench` and `ablate` run at ep=2 (ranks as threads) and rank 0 prints the report once.
#[test]
fn bench_and_ablate_run_at_ep2() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "tiny.yaml", &tiny_config(tmp.path()));
    let cfg = cfg.to_str().unwrap();
    let ep2 = ["--set", "parallel.ep=2"];
    let mut args = vec!["bench", "--config", cfg, "--steps", "2", "--warmup", "1"];
    args.extend_from_slice(&ep2);
    let out = switchyard(&args);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("step time (mean)").count(),
        1,
        "{}",
        text(&out)
    );
    assert!(
        stdout.contains("ranks, devices               2, 1")
            && stdout.contains("tokens per step              64"),
        "{}",
        text(&out)
    );
    // --compare flips process-wide switches: not with rank threads.
    args.push("--compare");
    let out = switchyard(&args);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rank 0: --compare"),
        "{}",
        text(&out)
    );

    let mut args = vec!["ablate", "--config", cfg, "--set", "train.steps=2"];
    let one = switchyard(&args);
    assert!(one.status.success(), "{}", text(&one));
    args.extend_from_slice(&ep2);
    let out = switchyard(&args);
    assert!(out.status.success(), "{}", text(&out));
    // Validation loss per variant, as printed (4 decimals): the same at ep=2.
    let losses = |out: &Output| -> Vec<String> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| {
                ["vanilla ", "adamoe ", "moe++ ", "rmoe "]
                    .iter()
                    .any(|v| l.starts_with(v))
            })
            .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
            .collect()
    };
    assert_eq!(losses(&one).len(), 4, "{}", text(&one));
    assert_eq!(losses(&one), losses(&out), "{}", text(&out));

    // Two seeds: every variant trained with run.seed 5 and 6; the summary's figures are
    // the means over them, with the spread.
    let out = switchyard(&[
        "ablate",
        "--config",
        cfg,
        "--set",
        "train.steps=2",
        "--seeds",
        "2",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("means over 2 seeds (5, 6)"), "{stdout}");
    let json = tmp.path().join("run/ablation-routers.json");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(summary["seeds"], serde_json::json!([5, 6]), "{summary}");
    let runs = summary["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 8, "{summary}");
    for (v, spread) in summary["variants"]
        .as_array()
        .unwrap()
        .iter()
        .zip(summary["spread"].as_array().unwrap())
    {
        let name = v["name"].as_str().unwrap();
        let seeds: Vec<f64> = runs
            .iter()
            .filter(|r| r["name"] == name)
            .map(|r| r["valid_loss"].as_f64().unwrap())
            .collect();
        assert_eq!(seeds.len(), 2, "{name}");
        assert_ne!(
            seeds[0], seeds[1],
            "{name}: the seeds trained the same model"
        );
        let mean = v["valid_loss"].as_f64().unwrap();
        assert!((mean - (seeds[0] + seeds[1]) / 2.0).abs() < 1e-12, "{name}");
        let std = spread["valid_loss"]["std"].as_f64().unwrap();
        let expected = (seeds[0] - seeds[1]).abs() / 2f64.sqrt();
        assert!(
            (std - expected).abs() < 1e-9,
            "{name}: std {std}, expected {expected}"
        );
        assert!(
            stdout.contains(&format!("  {name:<8} {mean:.4} +- {std:.4}")),
            "{stdout}"
        );
    }
}

/// The routing options through the trainer: sigmoid scores, the auxiliary-loss-free bias
/// (updated after every step from the counts of every rank and micro-batch, saved in the
/// checkpoint), the global-batch balance loss over two accumulation micro-batches (an
/// extra forward counts the step first) and capacity dropping follow the single-process
/// curve at ep=2, and after a resume at dp=2 x ep=2; the biases reach metrics.jsonl. A
/// checkpoint with biases does not resume into a config without `bias_balance`.
#[test]
fn routing_options_follow_the_single_process_curve_across_layouts_and_resume() {
    let config = |dir: &Path| {
        tiny_config(dir)
            .replace(
                "    expert_ffn_dim: 32\n",
                "    expert_ffn_dim: 32\n    score: sigmoid\n    bias_balance: {gamma: 0.01}\n    \
                 balance_loss: global_batch\n    capacity: {type: drop, factor: 1.0}\n",
            )
            .replace("  steps: 12\n", "  steps: 12\n  grad_accum_steps: 2\n")
    };
    let tmp = tempfile::tempdir().unwrap();
    let (one_dir, par_dir) = one_process_and_across_layouts(tmp.path(), config);
    let manifest =
        std::fs::read_to_string(par_dir.join("run/checkpoints/step-00000006/manifest.json"))
            .unwrap();
    assert!(
        manifest.contains("router_bias"),
        "the checkpoint holds the biases"
    );
    let metrics = std::fs::read_to_string(par_dir.join("run/metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert!(
        last["moe/layer0/bias_abs_max"].as_f64().unwrap() > 0.0,
        "{last}"
    );
    assert!(
        last["moe/layer0/dropped_fraction"].as_f64().unwrap() > 0.0,
        "{last}"
    );
    assert!(last["moe/layer1/load_cv"].as_f64().is_some(), "{last}");

    // Without bias_balance the biases have nowhere to go: refused, saying why.
    let out = switchyard(&[
        "train",
        "--config",
        one_dir.join("c.yaml").to_str().unwrap(),
        "--set",
        "train.steps=14",
        "--set",
        "model.moe.bias_balance=null",
        "--resume",
        "auto",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("bias_balance"), "{}", text(&out));
}

/// The console of a 2-rank run (rank threads): one progress line per step from rank 0 with
/// compact numbers (step, loss, validation loss when evaluated, learning rate, tokens/s,
/// step time, MFU, memory, ETA), nothing below a warning from rank 1 — unless every rank is
/// asked to speak; metrics.jsonl gains the step time, MFU and z-loss.
#[test]
fn the_console_shows_rank_0_with_compact_numbers_and_the_metrics_gain_step_time_mfu_z_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.yaml", &tiny_config(tmp.path()));
    let run = |all_ranks: bool, out: &str| {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["train", "--config", cfg.to_str().unwrap()])
            .args(["--set", "train.steps=4", "--set", "train.eval_every=2"])
            .args(["--set", "parallel.ep=2", "--set", "metrics.log_every=1"])
            .args([
                "--set",
                &format!("run.output_dir={}", tmp.path().join(out).display()),
            ])
            .env("RUST_LOG", "info")
            .env(
                "SWITCHYARD_LOG_ALL_RANKS",
                if all_ranks { "1" } else { "0" },
            )
            .output()
            .expect("running switchyard")
    };
    let out = run(false, "quiet");
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let progress: Vec<&str> = stderr.lines().filter(|l| l.contains(" | loss ")).collect();
    assert_eq!(progress.len(), 4, "one line per step:\n{stderr}");
    for (i, line) in progress.iter().enumerate() {
        let step = i + 1;
        assert!(line.contains(&format!("step {step}/4 | loss ")), "{line}");
        for field in [
            " | lr ",
            " tok/s | ",
            "/step | MFU ",
            "% | mem ",
            "iB | ETA ",
        ] {
            assert!(line.contains(field), "`{field}` missing: {line}");
        }
        assert_eq!(line.contains(" | val "), step % 2 == 0, "{line}");
        // Compact: no number in the line has more than four decimals.
        let message = &line[line.find("step ").unwrap()..];
        for word in message.split([' ', '/', '%']) {
            if let Some((_, decimals)) = word.split_once('.') {
                let digits = decimals.chars().take_while(char::is_ascii_digit).count();
                assert!(digits <= 4, "`{word}` is not compact: {line}");
            }
        }
    }
    assert!(!stderr.contains("[rank 1]"), "rank 1 spoke:\n{stderr}");
    let loud = run(true, "loud");
    assert!(loud.status.success(), "{}", text(&loud));
    let loud_stderr = String::from_utf8_lossy(&loud.stderr);
    assert!(
        loud_stderr.lines().any(|l| l.starts_with("[rank 1] ")),
        "SWITCHYARD_LOG_ALL_RANKS=1 lets rank 1 log:\n{loud_stderr}"
    );

    let metrics = std::fs::read_to_string(tmp.path().join("quiet/metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let get = |key: &str| v[key].as_f64().unwrap_or_else(|| panic!("{key}: {v}"));
        assert!(get("train/step_time_s") > 0.0, "{v}");
        let mfu = get("train/mfu");
        assert!(mfu > 0.0 && mfu.is_finite(), "{v}");
        // The z-loss is its own series and a part of the auxiliary loss.
        let (z, aux) = (get("train/z_loss"), get("train/aux_loss"));
        assert!(z > 0.0 && z < aux, "{v}");
        assert!(get("memory/peak_bytes") > 0.0, "{v}");
    }
}

/// The owners of every MoE layer in the trainer state of a run's first checkpoint.
fn checkpoint_owners(run_dir: &Path) -> serde_json::Value {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dirs[0].join("manifest.json")).unwrap())
            .unwrap();
    manifest["trainer_state"]["placement"]["layers"].clone()
}

/// record-routing -> plan-placement -> train from the plan at ep=2 (threads): the plan file
/// validates, the run logs and keeps the plan's owners (checkpoint), and trains the
/// contiguous run's loss curve. A plan for another ep size, an old bare list and a file of
/// several plans are config errors naming `placement.plan`.
#[test]
fn a_run_starts_from_a_saved_plan_on_the_contiguous_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_config(tmp.path());
    let cfg = write(tmp.path(), "tiny.yaml", &base);
    let stats = tmp.path().join("stats.json");
    let out = record_routing(&cfg, &stats);
    assert!(out.status.success(), "{}", text(&out));
    let plan = tmp.path().join("plan.json");
    let out = switchyard(&[
        "plan-placement",
        "--stats",
        stats.to_str().unwrap(),
        "--ranks",
        "2",
        "--strategy",
        "heuristic",
        "--out",
        plan.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("placement.plan:"),
        "{}",
        text(&out)
    );
    // The plan as planned is accepted; then fixed owners that differ from contiguous in
    // every layer, so the test does not depend on what the heuristic chose.
    let planned = format!("{base}parallel:\n  ep: 2\nplacement:\n  plan: plan.json\n");
    let planned_cfg = write(tmp.path(), "planned.yaml", &planned);
    let out = switchyard(&["validate-config", "--config", planned_cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let owners = serde_json::json!([[1, 0, 1, 0], [0, 1, 1, 0]]);
    file["plans"][0]["owners"] = owners.clone();
    std::fs::write(&plan, serde_json::to_string(&file).unwrap()).unwrap();

    // Contiguous at ep=2, then from the plan (its path relative to the config file).
    let contiguous_dir = tmp.path().join("contiguous");
    std::fs::create_dir_all(&contiguous_dir).unwrap();
    let contiguous_cfg = write(
        &contiguous_dir,
        "c.yaml",
        &format!("{}parallel:\n  ep: 2\n", tiny_config(&contiguous_dir)),
    );
    let out = switchyard(&["train", "--config", contiguous_cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let planned_dir = tmp.path().join("planned");
    std::fs::create_dir_all(&planned_dir).unwrap();
    std::fs::copy(&plan, planned_dir.join("plan.json")).unwrap();
    let planned_cfg = write(
        &planned_dir,
        "c.yaml",
        &format!(
            "{}parallel:\n  ep: 2\nplacement:\n  plan: plan.json\n",
            tiny_config(&planned_dir)
        ),
    );
    let out = switchyard_info(&["train", "--config", planned_cfg.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("placement.plan: starting from the `heuristic` plan")
            && log.contains("layer 0 [1, 0, 1, 0], layer 1 [0, 1, 1, 0]"),
        "{log}"
    );
    let saved = checkpoint_owners(&planned_dir.join("run"));
    assert_eq!(saved["0"], owners[0], "{saved}");
    assert_eq!(saved["1"], owners[1], "{saved}");
    let contiguous = losses(&contiguous_dir.join("run"));
    let from_plan = losses(&planned_dir.join("run"));
    assert_eq!(contiguous.len(), 12);
    assert_eq!(from_plan.len(), 12);
    for ((s1, l1), (s2, l2)) in contiguous.iter().zip(&from_plan) {
        assert_eq!(s1, s2);
        let rel = ((l1 - l2) / l1).abs();
        assert!(rel <= 1e-5, "step {s1}: {l1} vs {l2} (rel {rel:e})");
    }

    // Plans that do not fit are config errors naming the key, the values and the fix.
    let refused = |extra: &[&str], expect: &[&str]| {
        let mut args = vec!["validate-config", "--config", planned_cfg.to_str().unwrap()];
        args.extend(extra);
        let out = switchyard(&args);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("placement.plan"), "{}", text(&out));
        for e in expect {
            assert!(err.contains(e), "{e} missing: {}", text(&out));
        }
    };
    refused(
        &["--set", "parallel.ep=4"],
        &["planned for 2 ep ranks, but parallel.ep is 4", "--ranks 4"],
    );
    refused(
        &["--set", "model.moe.num_experts=8"],
        &["places 4 experts per layer", "num_experts is 8"],
    );
    refused(
        &["--set", "model.moe.every=2"],
        &["places MoE layers [0, 1]", "are [0]"],
    );
    std::fs::write(
        planned_dir.join("plan.json"),
        serde_json::to_string(&file["plans"]).unwrap(),
    )
    .unwrap();
    refused(&[], &["bare list of plans"]);
    let mut two = file.clone();
    two["plans"] = serde_json::json!([file["plans"][0], file["plans"][0]]);
    std::fs::write(planned_dir.join("plan.json"), two.to_string()).unwrap();
    refused(&[], &["holds 2 plans", "--strategy NAME"]);
}

/// The migration threshold: with links priced as nearly free every plan that moves experts
/// pays back at once and migrates; with expert compute priced as free and experts 8x wider,
/// the all-to-all time a plan saves cannot pay back its moved bytes within one step, so
/// every decision is logged as kept with its numbers, and metrics.jsonl records them.
#[test]
fn a_rebalance_migrates_only_when_it_pays_back() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| -> (String, Vec<serde_json::Value>) {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = write(&dir, "c.yaml", &tiny_config(&dir));
        let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
        args.extend([
            "--set",
            "parallel.ep=4",
            "--set",
            "model.moe.num_experts=8",
            "--set",
            "placement.strategy.type=heuristic",
            "--set",
            "placement.rebalance_every=3",
        ]);
        args.extend(extra);
        let out = switchyard_info(&args);
        assert!(out.status.success(), "{}", text(&out));
        let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
        let decisions = metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("placement/planned_moves").is_some())
            .collect();
        (String::from_utf8_lossy(&out.stderr).to_string(), decisions)
    };
    let (log, decisions) = run("free", &["--set", "placement.migration.link_gb_per_s=1e9"]);
    assert_eq!(decisions.len(), 3, "steps 3, 6, 9: {log}");
    let migrated: f64 = decisions
        .iter()
        .map(|d| d["placement/migrated_experts"].as_f64().unwrap())
        .sum();
    assert!(migrated > 0.0, "{decisions:?}");
    assert!(log.contains(": migrate; moved"), "{log}");

    let (log, decisions) = run(
        "costly",
        &[
            "--set",
            "model.moe.expert_ffn_dim=256",
            "--set",
            "placement.migration.rank_tflop_per_s=1e9",
            "--set",
            "placement.migration.payback_steps=1",
        ],
    );
    assert_eq!(decisions.len(), 3, "{log}");
    for d in &decisions {
        assert_eq!(d["placement/migrated_experts"].as_f64(), Some(0.0), "{d}");
        if let Some(p) = d["placement/payback_steps"].as_f64() {
            assert!(p > 1.0, "{d}");
        }
    }
    let planned: f64 = decisions
        .iter()
        .map(|d| d["placement/planned_moves"].as_f64().unwrap())
        .sum();
    assert!(
        planned > 0.0,
        "the plans would have moved experts: {decisions:?}"
    );
    assert!(!log.contains("moved "), "{log}");
    let kept = log
        .lines()
        .filter(|l| l.contains(": keep; the placement stays"))
        .count();
    assert_eq!(kept, 3, "{log}");
}
