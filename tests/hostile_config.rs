//! Hostile config files: a generated corpus of alias-heavy, deep and large YAML, each
//! loaded by `switchyard validate-config`. Every file must either load (exit 0) or be
//! refused as a config error (exit 2), within a memory bound (the loader's limits,
//! `launch/src/config/loader.rs`, `limits`).
//!
//! The test prints each file's wall time and peak RSS and the worst of each:
//! `cargo test --release -p switchyard-launch --test hostile_config -- --nocapture`.
//! `HOSTILE_CONFIG_KEEP=DIR` also writes the corpus to DIR (to time other builds on it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Peak resident memory a `validate-config` run may reach on any file of the corpus.
const PEAK_RSS_BOUND_KB: i64 = 200 * 1024;

/// A child that runs longer than this is killed and the test fails (a hang, not a timing).
const HANG: Duration = Duration::from_secs(120);

fn repeat_joined(item: &str, n: usize, sep: &str) -> String {
    vec![item; n].join(sep)
}

/// `a0` is `width` scalars; `a{i}` repeats `a{i-1}` `width` times; the last level is
/// repeated `top` times under an un-anchored key.
fn nested_anchors(width: usize, levels: usize, top: usize) -> String {
    let mut s = format!("a0: &a0 [{}]\n", repeat_joined("1", width, ", "));
    for i in 1..levels {
        let prev = format!("*a{}", i - 1);
        s += &format!("a{i}: &a{i} [{}]\n", repeat_joined(&prev, width, ", "));
    }
    let last = format!("*a{}", levels - 1);
    s += &format!("top: [{}]\n", repeat_joined(&last, top, ", "));
    s
}

/// `anchors` small maps, each aliased `uses` times.
fn wide_anchors(anchors: usize, uses: usize) -> String {
    let mut s = String::from("defs:\n");
    for i in 0..anchors {
        s += &format!("  - &x{i} {{k: {i}, v: [1, 2, 3]}}\n");
    }
    s += "uses:\n";
    for i in 0..anchors {
        s += &format!("  - [{}]\n", repeat_joined(&format!("*x{i}"), uses, ", "));
    }
    s
}

/// The classic: 10 levels, each ten aliases of the one before.
fn billion_laughs() -> String {
    let mut s = String::from("l0: &l0 \"lol\"\n");
    for i in 1..10 {
        let prev = format!("*l{}", i - 1);
        s += &format!("l{i}: &l{i} [{}]\n", repeat_joined(&prev, 10, ","));
    }
    s
}

/// `m{i}` merges `m{i-1}` and adds one key: `levels^2 / 2` keys in all.
fn merge_chain(levels: usize) -> String {
    let mut s = String::from("m0: &m0 {k0: 0}\n");
    for i in 1..levels {
        s += &format!("m{i}: &m{i} {{<<: *m{}, k{i}: {i}}}\n", i - 1);
    }
    s
}

/// Each map merges every earlier one.
fn merge_lists(levels: usize) -> String {
    let mut s = String::from("m0: &m0 {k0: 0}\n");
    for i in 1..levels {
        let sources: Vec<String> = (0..i).map(|j| format!("*m{j}")).collect();
        s += &format!("m{i}: &m{i} {{<<: [{}], k{i}: {i}}}\n", sources.join(", "));
    }
    s
}

fn deep(open: &str, close: &str, depth: usize) -> String {
    format!("{}1{}\n", open.repeat(depth), close.repeat(depth))
}

/// A valid config written with anchors and merge keys, as a person would.
fn anchored_config(dir: &Path) -> String {
    format!(
        "run: {{name: anchors, output_dir: {}, threads: &one 1}}
model: &m
  vocab_size: 256
  d_model: 32
  n_heads: 2
  n_layers: 2
  ffn_dim: 64
  max_seq_len: 32
  moe: {{every: 1, num_experts: 4, top_k: 2, expert_ffn_dim: 32}}
data:
  tokenizer: {{type: byte}}
  source: {{type: synthetic, seed: 3, bytes: 40000}}
  seq_len: 16
  batch_size: 4
optim: {{lr: 3.0e-3, warmup_steps: *one, decay_steps: 2}}
train: {{<<: {{steps: *one, eval_batches: *one}}}}
",
        dir.join("run").display()
    )
}

/// (name, contents, must load): every file of the corpus.
fn corpus(dir: &Path) -> Vec<(String, String, bool)> {
    let mut files = vec![
        (
            "nested-100x3".to_string(),
            nested_anchors(100, 2, 100),
            false,
        ),
        ("nested-60x4".into(), nested_anchors(60, 3, 60), false),
        ("nested-10x100".into(), nested_anchors(10, 99, 10), false),
        ("wide-1000x100".into(), wide_anchors(1000, 100), false),
        ("wide-100x10".into(), wide_anchors(100, 10), false),
        ("billion-laughs".into(), billion_laughs(), false),
        ("merge-chain-100".into(), merge_chain(100), false),
        ("merge-chain-2000".into(), merge_chain(2000), false),
        ("merge-lists-300".into(), merge_lists(300), false),
        (
            "alias-sequence-200k".into(),
            format!(
                "a: &a {{k: [1, 2]}}\nb: [{}]\n",
                repeat_joined("*a", 200_000, ",")
            ),
            false,
        ),
        (
            "long-scalar-aliased".into(),
            format!(
                "a: &a \"{}\"\nb: [{}]\n",
                "x".repeat(500_000),
                repeat_joined("*a", 100, ",")
            ),
            false,
        ),
        (
            "anchor-in-complex-key".into(),
            format!(
                "? &k [{}]\n: 1\nb: [{}]\n",
                repeat_joined("1", 1000, ","),
                repeat_joined("*k", 1000, ",")
            ),
            false,
        ),
        ("deep-seq-100k".into(), deep("[", "]", 100_000), false),
        ("deep-map-10k".into(), deep("{a: ", "}", 10_000), false),
        (
            "flat-scalars-300k".into(),
            format!("a: [{}]\n", repeat_joined("1", 300_000, ",")),
            false,
        ),
        (
            "over-file-limit".into(),
            format!("# {}\n", "x".repeat(2 << 20)),
            false,
        ),
        ("anchored-config".into(), anchored_config(dir), true),
    ];
    // Long keys nested deep: the key paths' bytes grow with the square of the depth.
    let key = "k".repeat(1 << 14);
    files.push((
        "long-keys-nested".into(),
        format!("{}1{}\n", format!("{{{key}: ").repeat(60), "}".repeat(60)),
        false,
    ));
    files
}

/// Exit code, wall time and peak RSS (KiB) of `switchyard validate-config --config path`.
fn run_measured(path: &Path, log: &Path) -> (Option<i32>, Duration, i64) {
    let stderr = std::fs::File::create(log).unwrap();
    let start = Instant::now();
    // Reaped by wait4 below (std's wait would not report the peak RSS).
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["validate-config", "--config"])
        .arg(path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("running switchyard");
    let pid = child.id() as libc::pid_t;
    loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: pid is a child of this process that nothing else waits for.
        let got = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        assert!(got >= 0, "wait4: {}", std::io::Error::last_os_error());
        if got == pid {
            let elapsed = start.elapsed();
            let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
            return (code, elapsed, usage.ru_maxrss);
        }
        if start.elapsed() > HANG {
            // SAFETY: signals our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{} still running after {HANG:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn every_hostile_config_loads_or_is_refused_within_a_memory_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = std::env::var_os("HOSTILE_CONFIG_KEEP").map(PathBuf::from);
    let mut worst_time = (Duration::ZERO, String::new());
    let mut worst_rss = (0, String::new());
    for (name, contents, must_load) in corpus(tmp.path()) {
        let path = tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&path, &contents).unwrap();
        if let Some(keep) = &keep {
            std::fs::create_dir_all(keep).unwrap();
            std::fs::write(keep.join(format!("{name}.yaml")), &contents).unwrap();
        }
        let log = tmp.path().join(format!("{name}.stderr"));
        let (code, elapsed, rss_kb) = run_measured(&path, &log);
        let stderr = std::fs::read_to_string(&log).unwrap();
        let last = stderr.lines().last().unwrap_or_default();
        println!(
            "{name:24} {:>8} B  exit {code:?}  {:>8.3} s  {:>7} KiB  {}",
            contents.len(),
            elapsed.as_secs_f64(),
            rss_kb,
            last.chars().take(110).collect::<String>()
        );
        let expected = if must_load { 0 } else { 2 };
        assert_eq!(code, Some(expected), "{name}:\n{stderr}");
        if !must_load {
            assert!(
                stderr.contains("error: invalid config"),
                "{name}:\n{stderr}"
            );
        }
        assert!(
            rss_kb < PEAK_RSS_BOUND_KB,
            "{name}: peak RSS {rss_kb} KiB over {PEAK_RSS_BOUND_KB} KiB"
        );
        if elapsed > worst_time.0 {
            worst_time = (elapsed, name.clone());
        }
        if rss_kb > worst_rss.0 {
            worst_rss = (rss_kb, name);
        }
    }
    println!(
        "worst parse time: {:.3} s ({}); worst peak RSS: {} KiB ({})",
        worst_time.0.as_secs_f64(),
        worst_time.1,
        worst_rss.0,
        worst_rss.1
    );
}
