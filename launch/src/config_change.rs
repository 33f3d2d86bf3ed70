//! A resume under a changed config: every difference between the checkpoint's config (saved
//! in its manifest) and this run's, refused when it changes the training trajectory (the
//! schedule, the model, the optimizer, the data, the seed, the precision) unless
//! `--allow-config-change`, accepted with a note when it does not (logging, evaluation,
//! checkpointing, output paths, the parallel layout, transport, placement, device).

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Keys (and the subtrees below them) whose change leaves the trajectory alone: what is
/// logged, evaluated, saved and where, and how the same steps are laid out and run (a new
/// layout follows the same curve within fp32 rounding; checkpoints load at any layout).
/// Every other key changes the trajectory. `train.steps` is decided by [`harmless`].
const HARMLESS: [&str; 13] = [
    "run.name",
    "run.output_dir",
    "run.threads",
    "train.eval_every",
    "train.eval_batches",
    "train.nonfinite",
    "train.activation_checkpointing",
    "checkpoint",
    "metrics",
    "parallel",
    "comm",
    "placement",
    "device",
];

/// One key whose value differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Dotted key path, `optim.lr`.
    pub key: String,
    /// The checkpoint's value (compact JSON), `(absent)` when it had none.
    pub saved: String,
    /// This run's value.
    pub now: String,
    /// Whether the trajectory stays the same.
    pub harmless: bool,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} -> {}", self.key, self.saved, self.now)?;
        if self.key == "train.steps" && !self.harmless {
            write!(
                f,
                " (the cosine schedule decays over train.steps while optim.decay_steps is \
                 unset: the learning rate of every later step changes)"
            )?;
        }
        Ok(())
    }
}

/// Every difference between the checkpoint's config and this run's, in key order.
pub fn differences(saved: &Value, now: &Value) -> Vec<Difference> {
    let mut out = Vec::new();
    walk("", Some(saved), Some(now), &mut out);
    let decay_set = |v: &Value| !v.pointer("/optim/decay_steps").is_none_or(Value::is_null);
    let steps_free = decay_set(saved) && decay_set(now);
    for d in &mut out {
        d.harmless = harmless(&d.key, steps_free);
    }
    out
}

/// `steps_free`: the schedule does not read `train.steps` (`optim.decay_steps` is set).
fn harmless(key: &str, steps_free: bool) -> bool {
    if key == "train.steps" {
        return steps_free;
    }
    HARMLESS
        .iter()
        .any(|h| key == *h || key.strip_prefix(h).is_some_and(|r| r.starts_with('.')))
}

fn walk(key: &str, saved: Option<&Value>, now: Option<&Value>, out: &mut Vec<Difference>) {
    if let (Some(Value::Object(a)), Some(Value::Object(b))) = (saved, now) {
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let sub = if key.is_empty() {
                k.clone()
            } else {
                format!("{key}.{k}")
            };
            walk(&sub, a.get(k), b.get(k), out);
        }
        return;
    }
    // An absent key and a null one are the same config (an unset optional).
    let show = |v: Option<&Value>| match v {
        None | Some(Value::Null) => "(absent)".to_string(),
        Some(v) => v.to_string(),
    };
    let (a, b) = (show(saved), show(now));
    if a != b {
        out.push(Difference {
            key: key.to_string(),
            saved: a,
            now: b,
            harmless: false,
        });
    }
}

/// A resume refused for changes of the trajectory; exit code 2 (a config error).
#[derive(Debug)]
pub struct ConfigChangeRefused {
    pub checkpoint: PathBuf,
    pub differences: Vec<Difference>,
}

impl fmt::Display for ConfigChangeRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "the config differs from the one checkpoint {} was trained with, in what sets the \
             training trajectory:",
            self.checkpoint.display()
        )?;
        for d in self.differences.iter().filter(|d| !d.harmless) {
            writeln!(f, "  {d}")?;
        }
        let harmless: Vec<&Difference> = self.differences.iter().filter(|d| d.harmless).collect();
        if !harmless.is_empty() {
            writeln!(f, "and in what does not (these alone would be accepted):")?;
            for d in harmless {
                writeln!(f, "  {d}")?;
            }
        }
        write!(
            f,
            "Resume with the checkpoint's values (its config is the `config` field of {}), \
             pass --allow-config-change to go on with the new ones (the run then follows no \
             single config), or start a new run from its weights: --init-from {} --set \
             run.output_dir=<new dir>",
            self.checkpoint.join("manifest.json").display(),
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for ConfigChangeRefused {}

/// Compares this run's config with the checkpoint's at `checkpoint`: refuses a change of the
/// trajectory unless `allow`, and logs every difference (on `log`: rank 0).
pub fn check(
    checkpoint: &Path,
    saved: &Value,
    now: &Value,
    allow: bool,
    log: bool,
) -> Result<(), ConfigChangeRefused> {
    let differences = differences(saved, now);
    let refused = differences.iter().any(|d| !d.harmless);
    if refused && !allow {
        return Err(ConfigChangeRefused {
            checkpoint: checkpoint.to_path_buf(),
            differences,
        });
    }
    if log {
        for d in &differences {
            if d.harmless {
                tracing::info!("resume: config changed, accepted (same trajectory): {d}");
            } else {
                tracing::warn!(
                    "resume: config changed, allowed by --allow-config-change (the trajectory \
                     changes): {d}"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn base() -> Value {
        json!({
            "run": {"name": "x", "output_dir": "runs/x", "seed": 1},
            "optim": {"lr": 3e-4, "decay_steps": null},
            "train": {"steps": 100, "eval_every": 10},
            "metrics": {"log_every": 1},
            "parallel": {"dp": 1, "ep": 1},
            "data": {"source": {"type": "text", "path": "/a/input.txt"}},
        })
    }

    #[test]
    fn differences_are_listed_and_classified() {
        let saved = base();
        assert!(differences(&saved, &saved).is_empty());
        let mut now = base();
        now["metrics"]["log_every"] = json!(5);
        now["parallel"]["ep"] = json!(2);
        now["run"]["output_dir"] = json!("runs/y");
        let d = differences(&saved, &now);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d.iter().all(|d| d.harmless), "{d:?}");
        assert_eq!(d[0].to_string(), "metrics.log_every: 1 -> 5");
        assert!(check(Path::new("ck"), &saved, &now, false, false).is_ok());

        let mut now = base();
        now["train"]["steps"] = json!(200);
        now["optim"]["lr"] = json!(1e-3);
        now["run"]["seed"] = json!(2);
        now["data"]["source"] = json!({"type": "jsonl", "path": "/a/d.jsonl", "text_key": "t"});
        now["metrics"]["log_every"] = json!(5);
        let d = differences(&saved, &now);
        let refused: Vec<&str> = d
            .iter()
            .filter(|d| !d.harmless)
            .map(|d| d.key.as_str())
            .collect();
        assert_eq!(
            refused,
            [
                "data.source.path",
                "data.source.text_key",
                "data.source.type",
                "optim.lr",
                "run.seed",
                "train.steps"
            ]
        );
        let e = check(Path::new("ck"), &saved, &now, false, false).unwrap_err();
        let text = e.to_string();
        for want in [
            "train.steps: 100 -> 200 (the cosine schedule",
            "data.source.text_key: (absent) -> \"t\"",
            "and in what does not",
            "metrics.log_every: 1 -> 5",
            "--allow-config-change",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
        assert!(check(Path::new("ck"), &saved, &now, true, false).is_ok());
    }

    #[test]
    fn train_steps_is_harmless_when_decay_steps_fixes_the_schedule() {
        let mut saved = base();
        saved["optim"]["decay_steps"] = json!(1000);
        let mut now = saved.clone();
        now["train"]["steps"] = json!(500);
        let d = differences(&saved, &now);
        assert!(d.len() == 1 && d[0].harmless, "{d:?}");
        // Changing decay_steps itself changes the schedule.
        now["optim"]["decay_steps"] = json!(500);
        let d = differences(&saved, &now);
        assert!(
            d.iter()
                .any(|d| d.key == "optim.decay_steps" && !d.harmless),
            "{d:?}"
        );
        assert!(check(Path::new("ck"), &saved, &now, false, false).is_err());
        // A key named like a harmless one but not below it is not harmless.
        assert!(!harmless("run.seed", false) && !harmless("metricsx", false));
        assert!(harmless("checkpoint.every", false) && harmless("metrics", false));
    }
}
