//! Metrics sinks: JSONL (`run_dir/metrics.jsonl`), TensorBoard event files
//! (`run_dir/tensorboard/`) and a terminal progress bar (or plain log lines when stderr
//! is not a terminal).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use protobuf::well_known_types::Value as ProtoValue;
use protobuf::{Message, RepeatedField};
use serde::{Deserialize, Serialize};
use tensorboard_proto::plugin_hparams::{HParamsPluginData, SessionStartInfo};
use tensorboard_proto::summary::{
    Summary, Summary_Value, SummaryMetadata, SummaryMetadata_PluginData,
};
use tensorboard_proto::tensor::TensorProto;
use tensorboard_proto::tensor_shape::TensorShapeProto;
use tensorboard_proto::types::DataType;
use tensorboard_rs::summary::scalar;
use tensorboard_rs::summary_writer::FileWriter;

/// Name of the JSONL file inside the run directory.
pub const JSONL_FILE: &str = "metrics.jsonl";
/// Name of the TensorBoard log directory inside the run directory.
pub const TENSORBOARD_DIR: &str = "tensorboard";

/// The `metrics` node of the run configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Write TensorBoard event files under `run_dir/tensorboard/`.
    pub tensorboard: bool,
    /// Append one JSON object per `log` call to `run_dir/metrics.jsonl`.
    pub jsonl: bool,
    /// Show a progress bar on a terminal (plain log lines otherwise).
    pub progress: bool,
    /// Emit the plain progress line every this many steps (when no bar is shown).
    pub log_every: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            tensorboard: true,
            jsonl: true,
            progress: true,
            log_every: 1,
        }
    }
}

impl MetricsConfig {
    /// Problems with this node as `(key path relative to the node, message)`; empty if valid.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.log_every == 0 {
            problems.push((
                "log_every".to_string(),
                "must be at least 1 (got 0); use 1 to log every step".to_string(),
            ));
        }
        problems
    }
}

/// Errors of the metrics sinks; each names the file involved and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// An operating-system call failed.
    #[error(
        "could not {op} {path}: {source}; check that the run directory is writable and the disk is not full"
    )]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration failed [`MetricsConfig::validate`].
    #[error("invalid metrics config: {}", .0.iter().map(|(k, m)| format!("metrics.{k}: {m}")).collect::<Vec<_>>().join("; "))]
    InvalidConfig(Vec<(String, String)>),
    /// A metric name passed to [`MetricsSink::log`] is unusable.
    #[error("metric name '{name}' at step {step}: {reason}")]
    BadMetricName {
        /// The name.
        name: String,
        /// The step being logged.
        step: u64,
        /// Why it is rejected.
        reason: &'static str,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MetricsError {
    let path = path.to_path_buf();
    move |source| MetricsError::Io { op, path, source }
}

/// Writes training metrics to every enabled sink.
pub struct MetricsSink {
    cfg: MetricsConfig,
    jsonl: Option<(File, PathBuf)>,
    tensorboard: Option<FileWriter>,
    bar: Option<ProgressBar>,
    total_steps: u64,
    start_step: u64,
    started: Instant,
}

impl std::fmt::Debug for MetricsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsSink")
            .field("cfg", &self.cfg)
            .field("jsonl", &self.jsonl.as_ref().map(|(_, p)| p))
            .field("tensorboard", &self.tensorboard.is_some())
            .field("bar", &self.bar.is_some())
            .finish()
    }
}

impl MetricsSink {
    /// Opens the sinks enabled in `cfg` under `run_dir` (created if missing). The run
    /// continues from `start_step` (0: fresh): whatever an earlier run logged after it (steps
    /// a resumed run recomputes, a partial line or record left by a crash) is dropped from
    /// `metrics.jsonl` and the old TensorBoard event files first, so each holds one curve;
    /// TensorBoard gets a new event file next to the old ones.
    pub fn new(
        cfg: MetricsConfig,
        run_dir: &Path,
        total_steps: u64,
        start_step: u64,
    ) -> Result<Self, MetricsError> {
        Self::with_terminal(
            cfg,
            run_dir,
            total_steps,
            start_step,
            std::io::stderr().is_terminal(),
        )
    }

    fn with_terminal(
        cfg: MetricsConfig,
        run_dir: &Path,
        total_steps: u64,
        start_step: u64,
        stderr_is_terminal: bool,
    ) -> Result<Self, MetricsError> {
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(MetricsError::InvalidConfig(problems));
        }
        std::fs::create_dir_all(run_dir).map_err(io_err("create run directory", run_dir))?;
        let jsonl = if cfg.jsonl {
            let path = run_dir.join(JSONL_FILE);
            truncate_jsonl(&path, start_step)?;
            Some((open_jsonl(&path)?, path))
        } else {
            None
        };
        let tensorboard = if cfg.tensorboard {
            let dir = run_dir.join(TENSORBOARD_DIR);
            truncate_event_files(&dir, start_step)?;
            Some(open_tensorboard(&dir)?)
        } else {
            None
        };
        let bar = (cfg.progress && stderr_is_terminal).then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr());
            // The template is a constant; a failure would be a bug caught by the tests, but
            // fall back to indicatif's default style rather than panic.
            if let Ok(style) = ProgressStyle::with_template("[{bar:24.cyan/blue}] {wide_msg}") {
                bar.set_style(style);
            }
            bar.set_position(start_step);
            crate::console::register_bar(&bar);
            bar
        });
        Ok(Self {
            cfg,
            jsonl,
            tensorboard,
            bar,
            total_steps,
            start_step,
            started: Instant::now(),
        })
    }

    /// True when `step` falls on the `log_every` cadence; the trainer may use it to decide
    /// when to call [`log`](Self::log).
    pub fn should_log(&self, step: u64) -> bool {
        step.is_multiple_of(self.cfg.log_every as u64)
    }

    /// Records scalars for `step`: one JSONL line (written with a single write, so a crash
    /// never leaves a line half-appended by us) and one TensorBoard scalar per name.
    /// Non-finite values are written to JSONL as the strings `"NaN"`, `"Infinity"`,
    /// `"-Infinity"` (JSON has no such numbers). Names must be non-empty, unique and not `step`.
    pub fn log(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<(), MetricsError> {
        let mut seen = HashSet::new();
        for (name, _) in scalars {
            let reason = if name.is_empty() {
                Some("it is empty")
            } else if *name == "step" {
                Some("'step' is reserved for the step number")
            } else if !seen.insert(*name) {
                Some("it appears twice in one call")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(MetricsError::BadMetricName {
                    name: (*name).into(),
                    step,
                    reason,
                });
            }
        }
        if let Some((file, path)) = &mut self.jsonl {
            let line = jsonl_line(step, scalars);
            file.write_all(line.as_bytes())
                .map_err(io_err("append to", path))?;
            file.flush().map_err(io_err("flush", path))?;
        }
        if let Some(tb) = &mut self.tensorboard {
            for (name, value) in scalars {
                // TensorBoard scalars are f32 and steps are usize in tensorboard-rs.
                tb.add_summary(scalar(name, *value as f32), step as usize);
            }
            tb.flush();
        }
        Ok(())
    }

    /// Updates the progress display with `line` (its ETA filled in here): the bar's message
    /// on a terminal, where a step that evaluated also leaves its line above the bar;
    /// otherwise a log line every `log_every` steps and at every evaluation.
    pub fn progress(&mut self, mut line: crate::console::ProgressLine) {
        let step = line.step;
        line.eta = self.eta(step);
        let evaluated = line.valid_loss.is_some();
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(line.to_string());
            if evaluated {
                tracing::info!("{line}");
            }
        } else if evaluated || self.should_log(step) {
            tracing::info!("{line}");
        }
    }

    /// Writes `config` (the resolved config) as the run's hyperparameters for TensorBoard's
    /// HPARAMS dashboard: every scalar leaf under its dotted key (`optim.lr`,
    /// `model.moe.top_k`, list items as `key.0`); nothing without the TensorBoard sink.
    pub fn log_hparams(&mut self, config: &serde_json::Value, step: u64) {
        if let Some(tb) = &mut self.tensorboard {
            tb.add_summary(hparams_summary(config), step as usize);
            tb.flush();
        }
    }

    /// Writes `text` (Markdown) to TensorBoard's text dashboard under `tag` at `step`, e.g.
    /// the resolved config; nothing without the TensorBoard sink.
    pub fn log_text(&mut self, tag: &str, text: &str, step: u64) {
        if let Some(tb) = &mut self.tensorboard {
            tb.add_summary(text_summary(tag, text), step as usize);
            tb.flush();
        }
    }

    /// Estimated time to `total_steps` from the average step time since this sink started.
    fn eta(&self, step: u64) -> Option<Duration> {
        let done = step.checked_sub(self.start_step).filter(|&d| d > 0)?;
        let left = self.total_steps.saturating_sub(step);
        Some(self.started.elapsed().mul_f64(left as f64 / done as f64))
    }

    /// Finishes the bar, waits for TensorBoard's writer thread to write everything, and
    /// fsyncs the JSONL file.
    pub fn finish(mut self) -> Result<(), MetricsError> {
        if let Some(bar) = self.bar.take() {
            // The last step evaluated and left its line above the bar.
            bar.finish_and_clear();
            crate::console::clear_bar();
        }
        // Dropping the writer joins its background thread, which writes all queued events.
        drop(self.tensorboard.take());
        if let Some((file, path)) = self.jsonl.take() {
            file.sync_all().map_err(io_err("fsync", &path))?;
        }
        Ok(())
    }
}

/// The HParams plugin's session-start summary of `config`'s scalar leaves (what PyTorch's
/// `add_hparams` writes; the plugin infers the experiment from it).
fn hparams_summary(config: &serde_json::Value) -> Summary {
    fn leaves(prefix: &str, v: &serde_json::Value, out: &mut HashMap<String, ProtoValue>) {
        let mut value = ProtoValue::new();
        match v {
            serde_json::Value::Object(map) => {
                for (k, child) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(&key, child, out);
                }
                return;
            }
            serde_json::Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    leaves(&format!("{prefix}.{i}"), child, out);
                }
                return;
            }
            serde_json::Value::Null => return,
            serde_json::Value::Bool(b) => value.set_bool_value(*b),
            serde_json::Value::Number(n) => value.set_number_value(n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::String(t) => value.set_string_value(t.clone()),
        }
        out.insert(prefix.to_string(), value);
    }
    let mut start = SessionStartInfo::new();
    leaves("", config, start.mut_hparams());
    let mut data = HParamsPluginData::new();
    data.set_version(0);
    data.set_session_start_info(start);
    let content = data
        .write_to_bytes()
        .expect("an in-memory message serialises");
    plugin_summary("_hparams_/session_start_info", "hparams", content, None)
}

/// A TensorBoard text summary: a string tensor read by the text plugin (`add_text` in
/// PyTorch's writer; tensorboard-rs leaves it unimplemented).
fn text_summary(tag: &str, text: &str) -> Summary {
    let mut tensor = TensorProto::new();
    tensor.set_dtype(DataType::DT_STRING);
    tensor.set_tensor_shape(TensorShapeProto::new());
    tensor.set_string_val(RepeatedField::from(vec![text.as_bytes().to_vec()]));
    plugin_summary(tag, "text", Vec::new(), Some(tensor))
}

/// A summary of one value `tag` for TensorBoard plugin `plugin` (its `content` in the
/// metadata, and the value's `tensor` if any).
fn plugin_summary(
    tag: &str,
    plugin: &str,
    content: Vec<u8>,
    tensor: Option<TensorProto>,
) -> Summary {
    let mut plugin_data = SummaryMetadata_PluginData::new();
    plugin_data.set_plugin_name(plugin.into());
    plugin_data.set_content(content);
    let mut metadata = SummaryMetadata::new();
    metadata.set_plugin_data(plugin_data);
    let mut value = Summary_Value::new();
    value.set_tag(tag.into());
    value.set_metadata(metadata);
    if let Some(tensor) = tensor {
        value.set_tensor(tensor);
    }
    let mut summary = Summary::new();
    summary.set_value(RepeatedField::from(vec![value]));
    summary
}

/// Formats one JSONL line; keys keep the caller's order after `step`.
fn jsonl_line(step: u64, scalars: &[(&str, f64)]) -> String {
    let mut line = format!("{{\"step\":{step}");
    for (name, value) in scalars {
        let key = serde_json::Value::String((*name).into()).to_string();
        let value = if value.is_finite() {
            serde_json::Number::from_f64(*value).map_or_else(|| "null".into(), |n| n.to_string())
        } else if value.is_nan() {
            "\"NaN\"".into()
        } else if *value > 0.0 {
            "\"Infinity\"".into()
        } else {
            "\"-Infinity\"".into()
        };
        line.push_str(&format!(",{key}:{value}"));
    }
    line.push_str("}\n");
    line
}

/// Opens `path` for appending (after [`truncate_jsonl`]).
fn open_jsonl(path: &Path) -> Result<File, MetricsError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err("open", path))
}

/// Keeps only the complete lines of `path` whose step is at most `last_step`: a resumed
/// run logs the later steps again, and readers should not have to de-duplicate. A partial
/// last line (a crash mid-write) and unparseable lines go too. The file is replaced
/// atomically (temp file, fsync, rename) and only when something is dropped.
fn truncate_jsonl(path: &Path, last_step: u64) -> Result<(), MetricsError> {
    #[derive(Deserialize)]
    struct Step {
        step: u64,
    }
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    let mut kept = Vec::with_capacity(text.len());
    for line in text.split_inclusive(|&b| b == b'\n') {
        let keep = line.ends_with(b"\n")
            && serde_json::from_slice::<Step>(line).is_ok_and(|l| l.step <= last_step);
        if keep {
            kept.extend_from_slice(line);
        }
    }
    if kept.len() == text.len() {
        return Ok(());
    }
    tracing::warn!(file = %path.display(), last_step, bytes = text.len() - kept.len(), "dropping metric lines after the step this run continues from");
    replace_file(path, &kept)
}

/// Writes `bytes` to a temp file next to `path`, fsyncs it and renames it over `path`.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), MetricsError> {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy());
    // A dot name: TensorBoard reads only `events.out.tfevents.*`, so it never sees the temp.
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    file.write_all(bytes).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("rename a temp file over", path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", dir))?;
    }
    Ok(())
}

/// Drops, from every event file in the TensorBoard directory `dir`, the events after
/// `last_step` and a partial last record (a crash mid-write), so that TensorBoard shows
/// one curve after a resume. Records are copied byte for byte (their checksums stay valid).
fn truncate_event_files(dir: &Path, last_step: u64) -> Result<(), MetricsError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("list TensorBoard directory", dir)(e)),
    };
    for entry in entries {
        let path = entry
            .map_err(io_err("list TensorBoard directory", dir))?
            .path();
        let is_events = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("events.out.tfevents."));
        if !is_events {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
        let kept = events_up_to(&bytes, last_step);
        if kept.len() != bytes.len() {
            tracing::warn!(file = %path.display(), last_step, "dropping TensorBoard events after the step this run continues from");
            replace_file(&path, &kept)?;
        }
    }
    Ok(())
}

/// The TFRecords of `bytes` (u64 length, u32 length crc, data, u32 data crc; little-endian)
/// whose `Event.step` is at most `last_step`, up to the first incomplete record.
fn events_up_to(bytes: &[u8], last_step: u64) -> Vec<u8> {
    let mut kept = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(len_bytes) = bytes.get(at..at + 8) {
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let Some(end) = len.checked_add(at + 16).filter(|&e| e <= bytes.len()) else {
            break;
        };
        if event_step(&bytes[at + 12..end - 4]) <= last_step {
            kept.extend_from_slice(&bytes[at..end]);
        }
        at = end;
    }
    kept
}

/// `Event.step` (field 2, a varint; 0 when absent, as in the file-version event) of a
/// serialized `tensorboard.Event`; an undecodable event counts as step 0 and is kept.
fn event_step(event: &[u8]) -> u64 {
    fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at)?;
            *at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut at = 0;
    while at < event.len() {
        let Some(key) = varint(event, &mut at) else {
            return 0;
        };
        let skip = match key & 7 {
            0 => match varint(event, &mut at) {
                Some(v) if key >> 3 == 2 => return v,
                Some(_) => 0,
                None => return 0,
            },
            1 => 8,
            2 => match varint(event, &mut at) {
                Some(n) => n as usize,
                None => return 0,
            },
            5 => 4,
            _ => return 0,
        };
        at = at.saturating_add(skip);
    }
    0
}

/// Last second used for an event-file name per directory in this process. tensorboard-rs
/// names files `events.out.tfevents.<unix secs>.<host>.<pid>.0` and creates them with
/// truncation, so two writers for one directory within one second would clobber each other.
static EVENT_FILE_SECONDS: Mutex<Option<HashMap<PathBuf, u64>>> = Mutex::new(None);

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn open_tensorboard(dir: &Path) -> Result<FileWriter, MetricsError> {
    // tensorboard-rs panics if it cannot create the directory or file; check both here so
    // bad paths become errors.
    std::fs::create_dir_all(dir).map_err(io_err("create TensorBoard directory", dir))?;
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    File::create(&probe).map_err(io_err("create a file in TensorBoard directory", dir))?;
    std::fs::remove_file(&probe).map_err(io_err("remove probe file", &probe))?;

    let mut guard = EVENT_FILE_SECONDS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let used = guard.get_or_insert_with(HashMap::new);
    if let Some(&last) = used.get(dir) {
        while unix_secs() <= last {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let writer = FileWriter::new(dir);
    used.insert(dir.to_path_buf(), unix_secs());
    Ok(writer)
}

/// Result of one optimizer step.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: u64,
    pub loss: f64,
    /// The balance loss and the z-loss, weighted by their coefficients.
    pub aux_loss: f64,
    /// The z-loss part of `aux_loss`.
    pub z_loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub skipped: bool,
    pub tokens: u64,
    pub seconds: f64,
    /// Measured by the counting allocator; `None` when the process runs without it.
    pub memory: Option<StepMemory>,
}

/// What a step held, measured (bytes of live allocations, `switchyard_kernels::alloc`). Per
/// process: ranks that are threads of one process share the figures.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMemory {
    /// Held when the step began: weights, optimizer moments, data, buffers kept between
    /// steps.
    pub at_start: u64,
    /// Held after the last micro-batch's backward, before the gradient sync: `at_start`
    /// plus the accumulated gradients (everything else of the backward is freed by then).
    pub before_sync: u64,
    /// The most held at once during the step, on each rank (world order).
    pub peak_per_rank: Vec<u64>,
}

impl StepReport {
    /// Tokens trained per second of this step.
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Result of an evaluation.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Mean cross-entropy per token; a blend's is the weighted mean of its sources'.
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: u64,
    /// A blend's (source name, loss) per source; empty for a single source.
    pub sources: Vec<(String, f64)>,
}

/// What model FLOP utilisation is measured against: the FLOP/s the run's ranks can do
/// together, measured on every rank at once at the start of the run
/// (`bench::rank_peak_gflops`: the CPU's FMA peak over the rank's threads, or the GPU's
/// matmul), so ranks that share cores split them as they do in training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DevicePeak {
    /// The sum over the ranks, GFLOP/s.
    pub gflops: f64,
}

impl DevicePeak {
    /// The share of the peak that `achieved_gflops` (the whole run's) is.
    pub fn mfu(&self, achieved_gflops: f64) -> f64 {
        achieved_gflops / self.gflops
    }
}

/// What one optimizer step's report gives, computed once for the metrics and the
/// progress line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRates {
    pub tokens_per_sec: f64,
    /// Model GFLOP/s of the whole run.
    pub gflops: f64,
    /// `gflops` over the peak, when the peak is known.
    pub mfu: Option<f64>,
    /// The largest rank's peak bytes of the step, when memory is counted.
    pub peak_bytes: Option<u64>,
}

impl StepRates {
    pub fn of(report: &StepReport, flops_per_token: f64, peak: Option<DevicePeak>) -> StepRates {
        let tokens_per_sec = report.tokens_per_sec();
        let gflops = tokens_per_sec * flops_per_token / 1e9;
        StepRates {
            tokens_per_sec,
            gflops,
            mfu: peak.map(|p| p.mfu(gflops)),
            peak_bytes: report
                .memory
                .as_ref()
                .and_then(|m| m.peak_per_rank.iter().copied().max()),
        }
    }
}

/// The scalars of one optimizer step (`train/...`); `train/mfu` when the peak is known.
pub fn step_scalars(
    report: &StepReport,
    rates: &StepRates,
    tokens_seen: u64,
) -> Vec<(String, f64)> {
    let StepRates {
        tokens_per_sec,
        gflops,
        mfu,
        peak_bytes,
    } = *rates;
    vec![
        ("train/loss".into(), report.loss),
        ("train/aux_loss".into(), report.aux_loss),
        ("train/z_loss".into(), report.z_loss),
        ("train/grad_norm".into(), report.grad_norm),
        ("train/lr".into(), report.lr),
        ("train/tokens_per_sec".into(), tokens_per_sec),
        ("train/step_time_s".into(), report.seconds),
        ("train/gflops_per_sec".into(), gflops),
        ("train/tokens_seen".into(), tokens_seen as f64),
        ("train/skipped".into(), report.skipped as u8 as f64),
    ]
    .into_iter()
    .chain(mfu.map(|m| ("train/mfu".to_string(), m)))
    .chain(report.memory.iter().flat_map(|m| {
        [
            (
                "memory/peak_bytes".to_string(),
                peak_bytes.unwrap_or(0) as f64,
            ),
            ("memory/held_bytes".to_string(), m.at_start as f64),
            (
                "memory/grad_bytes".to_string(),
                m.before_sync.saturating_sub(m.at_start) as f64,
            ),
        ]
        .into_iter()
        .chain(
            m.peak_per_rank
                .iter()
                .enumerate()
                .map(|(r, &b)| (format!("memory/rank{r}/peak_bytes"), b as f64)),
        )
    }))
    .collect()
}

/// The routing scalars of the MoE layers (`moe/layer{l}/...`), over the global batch of
/// the step's last micro-batch (every rank's tokens): load max/mean, min/mean and
/// coefficient of variation, drops, balancing loss, experts per token, the share of each
/// slot kind and of each expert, and the auxiliary-loss-free biases (mean and max
/// magnitude, and each expert's).
pub fn moe_scalars(stats: &[(usize, switchyard_moe::MoeStats)]) -> Vec<(String, f64)> {
    let mut scalars = Vec::new();
    for (layer, stats) in stats {
        let mut push = |name: &str, value: f64| {
            scalars.push((format!("moe/layer{layer}/{name}"), value));
        };
        push("max_over_mean_load", stats.max_over_mean_load());
        push("min_over_mean_load", stats.min_over_mean_load());
        push("load_cv", stats.load_cv());
        push("dropped_fraction", stats.dropped_fraction);
        push("load_balance_loss", stats.load_balance);
        push("ffn_experts_per_token", stats.ffn_experts_per_token);
        for (name, f) in switchyard_moe::layer::KIND_NAMES
            .iter()
            .zip(stats.kind_fraction)
        {
            push(&format!("{name}_fraction"), f);
        }
        for (e, f) in stats.expert_fraction.iter().enumerate() {
            push(&format!("expert{e}_fraction"), *f);
        }
        if !stats.bias.is_empty() {
            let magnitudes = stats.bias.iter().map(|b| b.abs() as f64);
            push(
                "bias_abs_mean",
                magnitudes.clone().sum::<f64>() / stats.bias.len() as f64,
            );
            push("bias_abs_max", magnitudes.fold(0.0, f64::max));
            for (e, b) in stats.bias.iter().enumerate() {
                push(&format!("expert{e}_bias"), *b as f64);
            }
        }
    }
    scalars
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(tensorboard: bool, jsonl: bool) -> MetricsConfig {
        MetricsConfig {
            tensorboard,
            jsonl,
            progress: true,
            log_every: 2,
        }
    }

    #[test]
    fn config_defaults_unknown_keys_and_validation() {
        let c: MetricsConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(
            c,
            MetricsConfig {
                tensorboard: true,
                jsonl: true,
                progress: true,
                log_every: 1
            }
        );
        let c: MetricsConfig =
            serde_json::from_str(r#"{"log_every": 10, "progress": false}"#).unwrap();
        assert_eq!((c.log_every, c.progress, c.jsonl), (10, false, true));
        let err = serde_json::from_str::<MetricsConfig>(r#"{"log_evry": 10}"#).unwrap_err();
        assert!(err.to_string().contains("log_evry"), "{err}");
        assert!(c.validate().is_empty());
        let bad = MetricsConfig {
            log_every: 0,
            ..Default::default()
        };
        let problems = bad.validate();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "log_every");
        let tmp = tempfile::tempdir().unwrap();
        let err = MetricsSink::new(bad, tmp.path(), 10, 0).unwrap_err();
        assert!(err.to_string().contains("metrics.log_every"), "{err}");
    }

    fn read_lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn jsonl_lines_are_written_immediately_and_truncated_to_the_resumed_step() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(JSONL_FILE);
        let mut sink =
            MetricsSink::with_terminal(cfg(false, true), tmp.path(), 10, 0, false).unwrap();
        sink.log(1, &[("loss", 2.5), ("lr", 1e-4)]).unwrap();
        sink.log(
            2,
            &[
                ("loss", 0.1 + 0.2),
                ("grad_norm", f64::NAN),
                ("x", f64::NEG_INFINITY),
            ],
        )
        .unwrap();
        // Visible before finish(): a crash now would lose nothing already logged.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("{\"step\":1,\"loss\":2.5,\"lr\":0.0001}\n"),
            "{text}"
        );
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[1]["loss"].as_f64(),
            Some(0.1 + 0.2),
            "value must round-trip exactly"
        );
        assert_eq!(
            (lines[1]["grad_norm"].as_str(), lines[1]["x"].as_str()),
            (Some("NaN"), Some("-Infinity"))
        );
        drop(sink); // simulated crash: no finish()

        // A line of a step the resumed run recomputes, and a partial line (a crash
        // mid-write): the resume from step 2 drops both.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"step\":3,\"loss\":9.0}\n{\"step\":4,\"lo")
            .unwrap();
        let mut sink =
            MetricsSink::with_terminal(cfg(false, true), tmp.path(), 10, 2, false).unwrap();
        sink.log(3, &[("loss", 1.0)]).unwrap();
        sink.finish().unwrap();
        let steps: Vec<_> = read_lines(&path)
            .iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3]);
    }

    #[test]
    fn bad_metric_names_are_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let mut sink =
            MetricsSink::with_terminal(cfg(false, true), tmp.path(), 10, 0, false).unwrap();
        for scalars in [
            &[("step", 1.0)][..],
            &[("", 1.0)],
            &[("a", 1.0), ("a", 2.0)],
        ] {
            assert!(matches!(
                sink.log(5, scalars),
                Err(MetricsError::BadMetricName { step: 5, .. })
            ));
        }
        assert_eq!(
            std::fs::read_to_string(tmp.path().join(JSONL_FILE)).unwrap(),
            "",
            "rejected calls write nothing"
        );
    }

    #[test]
    fn disabled_sinks_write_nothing_and_progress_works_without_terminal() {
        let tmp = tempfile::tempdir().unwrap();
        let mut sink =
            MetricsSink::with_terminal(cfg(false, false), tmp.path(), 10, 0, false).unwrap();
        assert!(sink.bar.is_none());
        sink.log(1, &[("loss", 1.0)]).unwrap();
        for (step, loss) in [(1, 1.0), (2, 0.9)] {
            sink.progress(crate::console::ProgressLine {
                step,
                total_steps: 2,
                loss,
                tokens_per_sec: 1234.0,
                ..Default::default()
            });
        }
        assert!(sink.should_log(2) && !sink.should_log(3));
        sink.finish().unwrap();
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        let with_bar =
            MetricsSink::with_terminal(cfg(false, false), tmp.path(), 10, 4, true).unwrap();
        assert_eq!(with_bar.bar.as_ref().map(|b| b.position()), Some(4));
    }

    #[test]
    fn unwritable_run_dir_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = MetricsSink::new(MetricsConfig::default(), &file, 10, 0).unwrap_err();
        assert!(
            matches!(&err, MetricsError::Io { path, .. } if path == &file),
            "{err:?}"
        );
    }

    // --- TensorBoard event files, parsed back independently of tensorboard-rs ---

    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn masked(data: &[u8]) -> u32 {
        let c = crc32c(data);
        c.rotate_right(15).wrapping_add(0xa282_ead8)
    }

    /// Splits a TFRecord file into payloads, verifying both CRCs of every record.
    fn tfrecords(bytes: &[u8]) -> Vec<&[u8]> {
        let (mut out, mut at) = (Vec::new(), 0);
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(
                len_crc,
                masked(len_bytes),
                "length CRC of record at byte {at}"
            );
            let data = &bytes[at + 12..at + 12 + len];
            let data_crc =
                u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(data_crc, masked(data), "data CRC of record at byte {at}");
            out.push(data);
            at += 16 + len;
        }
        out
    }

    enum Field<'a> {
        Varint(u64),
        Fixed64,
        Bytes(&'a [u8]),
        Fixed32(u32),
    }

    fn varint(b: &[u8], at: &mut usize) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[*at];
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }

    /// Minimal protobuf wire-format reader: (field number, value) pairs.
    fn fields(b: &[u8]) -> Vec<(u64, Field<'_>)> {
        let (mut out, mut at) = (Vec::new(), 0);
        while at < b.len() {
            let key = varint(b, &mut at);
            let field = match key & 7 {
                0 => Field::Varint(varint(b, &mut at)),
                1 => {
                    at += 8;
                    Field::Fixed64
                }
                2 => {
                    let n = varint(b, &mut at) as usize;
                    at += n;
                    Field::Bytes(&b[at - n..at])
                }
                5 => {
                    at += 4;
                    Field::Fixed32(u32::from_le_bytes(b[at - 4..at].try_into().unwrap()))
                }
                w => panic!("unexpected wire type {w}"),
            };
            out.push((key >> 3, field));
        }
        out
    }

    /// (file_version, [(step, tag, value)]) from an event file. Event: 2 = step,
    /// 3 = file_version, 5 = summary; Summary: 1 = value; Value: 1 = tag, 2 = simple_value.
    fn parse_events(bytes: &[u8]) -> (Option<String>, Vec<(i64, String, f32)>) {
        let (mut version, mut scalars) = (None, Vec::new());
        for record in tfrecords(bytes) {
            let mut step = 0;
            for (num, f) in fields(record) {
                match (num, f) {
                    (2, Field::Varint(s)) => step = s as i64,
                    (3, Field::Bytes(v)) => version = Some(String::from_utf8(v.to_vec()).unwrap()),
                    (5, Field::Bytes(summary)) => {
                        for (_, value) in fields(summary).into_iter().filter(|(n, _)| *n == 1) {
                            let Field::Bytes(value) = value else {
                                panic!("Summary.value is not a message")
                            };
                            let (mut tag, mut v) = (String::new(), f32::NAN);
                            for (n, f) in fields(value) {
                                match (n, f) {
                                    (1, Field::Bytes(t)) => {
                                        tag = String::from_utf8(t.to_vec()).unwrap()
                                    }
                                    (2, Field::Fixed32(x)) => v = f32::from_bits(x),
                                    _ => {}
                                }
                            }
                            scalars.push((step, tag, v));
                        }
                    }
                    _ => {}
                }
            }
        }
        (version, scalars)
    }

    /// Writes a small run to `<tmp>/switchyard-tb-sample` for
    /// `scripts/check_tensorboard.py` (TensorBoard's own reader). Run with `--ignored`.
    #[test]
    #[ignore = "writes outside a temp dir; used with scripts/check_tensorboard.py"]
    fn write_sample_run_for_tensorboard_check() {
        let dir = std::env::temp_dir().join("switchyard-tb-sample");
        let _ = std::fs::remove_dir_all(&dir); // a previous sample; absence is fine
        let mut sink = MetricsSink::with_terminal(cfg(true, true), &dir, 3, 0, false).unwrap();
        for step in 1..=3u64 {
            sink.log(step, &[("loss", 3.0 / step as f64), ("lr", 1e-3)])
                .unwrap();
        }
        sink.finish().unwrap();
        println!("sample run written to {}", dir.display());
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn tensorboard_event_file_has_valid_records_and_scalars() {
        let tmp = tempfile::tempdir().unwrap();
        let mut sink =
            MetricsSink::with_terminal(cfg(true, false), tmp.path(), 10, 0, false).unwrap();
        sink.log(1, &[("loss", 2.5), ("lr", 0.001)]).unwrap();
        sink.log(2, &[("loss", 1.25)]).unwrap();
        sink.finish().unwrap();
        // A resumed run in the same process and second must not clobber the first file.
        let mut sink =
            MetricsSink::with_terminal(cfg(true, false), tmp.path(), 10, 2, false).unwrap();
        sink.log(3, &[("loss", 0.5)]).unwrap();
        sink.finish().unwrap();

        let dir = tmp.path().join(TENSORBOARD_DIR);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert_eq!(files.len(), 2, "{files:?}");
        let mut all = Vec::new();
        for f in &files {
            assert!(
                f.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("events.out.tfevents.")
            );
            let (version, scalars) = parse_events(&std::fs::read(f).unwrap());
            assert_eq!(version.as_deref(), Some("brain.Event:2"));
            all.extend(scalars);
        }
        all.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let expected = [
            (1, "loss", 2.5),
            (1, "lr", 0.001),
            (2, "loss", 1.25),
            (3, "loss", 0.5),
        ];
        let got: Vec<_> = all.iter().map(|(s, t, v)| (*s, t.as_str(), *v)).collect();
        assert_eq!(got, expected);
    }

    /// Event files of all (scalar step, tag) pairs in `dir`, every record checked.
    fn tensorboard_scalars(dir: &Path) -> Vec<(i64, String, f32)> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(dir.join(TENSORBOARD_DIR)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            assert!(
                name.starts_with("events.out.tfevents."),
                "stray file {name}"
            );
            all.extend(parse_events(&std::fs::read(&path).unwrap()).1);
        }
        all.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        all
    }

    #[test]
    fn a_resume_drops_later_tensorboard_events_and_a_torn_record() {
        let tmp = tempfile::tempdir().unwrap();
        let mut sink =
            MetricsSink::with_terminal(cfg(true, false), tmp.path(), 10, 0, false).unwrap();
        for step in 1..=4u64 {
            sink.log(step, &[("loss", step as f64)]).unwrap();
        }
        sink.finish().unwrap();
        // A crash mid-record: a length prefix with half its record.
        let file = std::fs::read_dir(tmp.path().join(TENSORBOARD_DIR))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap()
            .write_all(&[40, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3])
            .unwrap();
        // Resumed from the step-2 checkpoint: steps 3 and 4 are logged again.
        let mut sink =
            MetricsSink::with_terminal(cfg(true, false), tmp.path(), 10, 2, false).unwrap();
        for step in 3..=4u64 {
            sink.log(step, &[("loss", 10.0 * step as f64)]).unwrap();
        }
        sink.finish().unwrap();
        let got: Vec<_> = tensorboard_scalars(tmp.path())
            .into_iter()
            .map(|(s, _, v)| (s, v))
            .collect();
        assert_eq!(got, [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]);
        // Starting over at step 0 (`--resume auto` without a checkpoint) leaves no scalars.
        let sink = MetricsSink::with_terminal(cfg(true, false), tmp.path(), 10, 0, false).unwrap();
        sink.finish().unwrap();
        assert_eq!(tensorboard_scalars(tmp.path()), []);
    }
}
