//! The [`Checkpointer`]: owns the checkpoint directory and the whole save / restore /
//! convert protocol, in one process and across ranks; and [`Checkpointed`], the one trait
//! of everything a checkpoint holds.
//!
//! A save gathers a [`Snapshot`] from every [`Checkpointed`] part (model weights, optimizer
//! moments and step count, sampler position and RNG seed, step counters, routing statistics
//! and the expert placement) and writes it: tensors into one safetensors file per kind
//! (`model`, `optimizer`), the rest into the manifest's `trainer_state` object. The
//! learning-rate schedule is a pure function of the step and needs nothing of its own.
//!
//! Multi-rank saves: the dp-rank-0 replica of every ep rank writes its experts, world rank
//! 0 also the dense tensors, each into its own files (`model.rank-NNNN.safetensors`); every
//! phase (temp directory, shards, commit) ends in an agreement, so either every rank
//! returns the committed directory or every rank returns an error and nothing is committed.
//! A checkpoint written at any layout reads back the same way ([`Snapshot`] merges shards).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::Tensor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use switchyard_moe::ParamKey;
use switchyard_moe::Transformer;
use switchyard_moe::params::{map_params, named_params};
use switchyard_parallel::Layout;

use super::tensor::tensor_file_kind;
use super::{
    CheckpointManager, FileEntry, LoadedCheckpoint, ManifestMeta, NamedTensor, load, read_manifest,
    step_dir_name, verify_compatible, write_files,
};
use crate::error::TrainError;
use crate::stop::StopSignal;

/// A checkpoint in memory: tensors by file kind (`model`, `optimizer`) and name, and the
/// manifest's trainer state (a JSON object, one or more fields per part).
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub tensors: BTreeMap<String, BTreeMap<String, NamedTensor>>,
    pub state: serde_json::Map<String, serde_json::Value>,
}

impl Snapshot {
    /// Adds `tensors` to the file of kind `kind`.
    pub fn put_tensors(&mut self, kind: &str, tensors: Vec<NamedTensor>) {
        let file = self.tensors.entry(kind.to_string()).or_default();
        for t in tensors {
            file.insert(t.name.clone(), t);
        }
    }

    /// The tensors of kind `kind`, by name.
    pub fn tensors(&self, kind: &str) -> Result<&BTreeMap<String, NamedTensor>, String> {
        self.tensors.get(kind).ok_or_else(|| {
            format!(
                "the checkpoint has no {kind}.safetensors (nor {kind}.rank-NNNN.safetensors \
                 shards)"
            )
        })
    }

    /// Sets the trainer-state field `key`.
    pub fn put<T: Serialize>(&mut self, key: &str, value: &T) {
        let value = serde_json::to_value(value).expect("trainer state serialises");
        self.state.insert(key.to_string(), value);
    }

    /// The trainer-state field `key` (`None` when absent: older checkpoints, optional parts).
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, String> {
        match self.state.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| format!("manifest.json trainer_state.{key}: {e}")),
        }
    }

    /// [`Self::get`] for a field every checkpoint has.
    pub fn require<T: DeserializeOwned>(&self, key: &str) -> Result<T, String> {
        self.get(key)?
            .ok_or_else(|| format!("manifest.json trainer_state has no `{key}`"))
    }

    /// The snapshot of a checkpoint read from disk: the tensors of every
    /// `{kind}.safetensors` / `{kind}.rank-NNNN.safetensors` file merged by kind.
    pub fn of(loaded: &LoadedCheckpoint) -> Result<Snapshot, String> {
        let mut snapshot = Snapshot::default();
        for (file, tensors) in &loaded.files {
            let Some(kind) = tensor_file_kind(file) else {
                continue;
            };
            let merged = snapshot.tensors.entry(kind.to_string()).or_default();
            for t in tensors {
                if merged.insert(t.name.clone(), t.clone()).is_some() {
                    return Err(format!(
                        "tensor `{}` is stored twice (again in {file}); the checkpoint's shards \
                         overlap",
                        t.name
                    ));
                }
            }
        }
        snapshot.state = match &loaded.manifest.trainer_state {
            serde_json::Value::Object(map) => map.clone(),
            other => {
                return Err(format!(
                    "manifest.json trainer_state is {other}, not an object"
                ));
            }
        };
        Ok(snapshot)
    }
}

/// A part of the training state that checkpoints hold.
pub trait Checkpointed {
    /// Adds this part to a snapshot being saved.
    fn save(&self, snapshot: &mut Snapshot);
    /// Reads this part back from a checkpoint's snapshot; the error says what is wrong.
    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String>;
}

/// The model's weights: `model` tensors by [`ParamKey`] name. A rank saves and restores
/// the parameters it holds (dense ones and its own experts).
impl Checkpointed for Transformer {
    fn save(&self, snapshot: &mut Snapshot) {
        let tensors = named_params(self)
            .into_iter()
            .map(|(key, shape, value)| NamedTensor::f32(key.name(), shape, tensor_values(&value)))
            .collect();
        snapshot.put_tensors("model", tensors);
        let biases = self.router_biases();
        if !biases.is_empty() {
            snapshot.put("router_bias", &biases);
        }
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        // The auxiliary-loss-free biases are part of the routing function: a checkpoint
        // without them cannot continue a model with them, nor the other way round.
        let saved: Option<Vec<(usize, Vec<f32>)>> = snapshot.get("router_bias")?;
        let expected = self.router_biases();
        match saved {
            Some(saved) => {
                if expected.is_empty() {
                    return Err(
                        "the checkpoint holds auxiliary-loss-free router biases but \
                         model.moe.bias_balance is not set; set it as the run that wrote the \
                         checkpoint did"
                            .into(),
                    );
                }
                for (layer, bias) in saved {
                    self.set_router_bias(layer, bias)
                        .map_err(|e| format!("router_bias: {e}"))?;
                }
            }
            None if !expected.is_empty() => {
                return Err(
                    "model.moe.bias_balance is set but the checkpoint holds no router \
                     biases (it was written without bias_balance); remove bias_balance, or \
                     start a new run"
                        .into(),
                );
            }
            None => {}
        }
        let stored = snapshot.tensors("model")?;
        load_weights(self, stored, |key, stored, shape, _| {
            if stored.shape != shape {
                return Err(format!(
                    "tensor `{key}` has shape {:?} in the checkpoint but {shape:?} in the model",
                    stored.shape
                ));
            }
            f32_values(key, stored)
        })
    }
}

/// Replaces every parameter of `model` by `value(key, stored tensor, model shape, current
/// value)`. Every model parameter must be stored.
pub fn load_weights(
    model: &mut Transformer,
    stored: &BTreeMap<String, NamedTensor>,
    value: impl Fn(&ParamKey, &NamedTensor, &[usize], &Tensor<1>) -> Result<Vec<f32>, String>,
) -> Result<(), String> {
    let mut values = BTreeMap::new();
    for (key, shape, current) in named_params(model) {
        let t = stored.get(key.name()).ok_or_else(|| {
            format!(
                "the checkpoint has no tensor `{key}` (in model.safetensors or any \
                 model.rank-NNNN.safetensors shard)"
            )
        })?;
        let v = value(&key, t, &shape, &current)?;
        values.insert(key, (v, current.device()));
    }
    *model = map_params(model.clone(), |key, _| {
        let (v, device) = &values[key];
        Tensor::from_floats(v.as_slice(), device)
    });
    Ok(())
}

/// The f32 values of a stored tensor.
pub fn f32_values(key: &ParamKey, t: &NamedTensor) -> Result<Vec<f32>, String> {
    t.as_f32()
        .map(<[f32]>::to_vec)
        .ok_or_else(|| format!("`{key}` in model.safetensors is not f32"))
}

/// A parameter's values as f32 (host copy).
pub fn tensor_values(t: &Tensor<1>) -> Vec<f32> {
    t.clone()
        .into_data()
        .try_to_vec::<f32>()
        .expect("parameters are f32")
}

/// Owns the checkpoint directory (`checkpoint:` node) and the save / restore protocol.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    manager: CheckpointManager,
    save_timeout: Duration,
    /// The run's resolved config, stored in every manifest.
    resolved_config: serde_json::Value,
    /// A stop signal shortens the wait for the other ranks (see `Layout::all_ok_within`).
    stop: Option<Arc<StopSignal>>,
}

impl Checkpointer {
    pub fn new(
        dir: &Path,
        keep_last: usize,
        save_timeout_s: f64,
        resolved_config: serde_json::Value,
        stop: Option<Arc<StopSignal>>,
    ) -> Result<Checkpointer, TrainError> {
        Ok(Checkpointer {
            manager: CheckpointManager::new(dir, keep_last)?,
            save_timeout: switchyard_parallel::duration_from_secs(save_timeout_s),
            resolved_config,
            stop,
        })
    }

    pub fn root(&self) -> &Path {
        self.manager.root()
    }

    /// Saves `snapshot` as the checkpoint of `step` (a collective over `layout` when there
    /// is one) and returns the committed directory.
    pub fn save(
        &self,
        step: u64,
        snapshot: Snapshot,
        meta: SaveMeta,
        layout: Option<&Layout>,
    ) -> Result<PathBuf, TrainError> {
        let meta = ManifestMeta {
            tokens_seen: meta.tokens_seen,
            model_signature: meta.model_signature,
            trainer_state: serde_json::Value::Object(snapshot.state),
            config: self.resolved_config.clone(),
        };
        let files: Vec<(String, Vec<NamedTensor>)> = snapshot
            .tensors
            .into_iter()
            .map(|(kind, tensors)| (kind, tensors.into_values().collect()))
            .collect();
        let Some(layout) = layout else {
            let files: Vec<(String, Vec<NamedTensor>)> = files
                .into_iter()
                .map(|(kind, t)| (format!("{kind}.safetensors"), t))
                .collect();
            return Ok(self.manager.save(step, &files, meta)?);
        };
        self.save_shared(step, files, meta, layout)
    }

    fn save_shared(
        &self,
        step: u64,
        files: Vec<(String, Vec<NamedTensor>)>,
        meta: ManifestMeta,
        layout: &Layout,
    ) -> Result<PathBuf, TrainError> {
        let rank = layout.rank();
        let tag = layout.broadcast_i64s(vec![std::process::id() as i64], "checkpoint: save tag")?[0]
            as u64;
        let tmp = self.manager.shared_temp_dir(step, tag);
        let begun = if rank == 0 {
            self.manager.begin_shared(step, tag).map(|_| ())
        } else {
            Ok(())
        };
        self.agree(layout, &tmp, begun, step, "create the temp directory")?;
        // Every expert once (dp rank 0 of its ep rank), every dense tensor once (rank 0).
        // With a sharded optimizer each rank holds exactly the moments it owns (every
        // parameter's on one rank) and writes them all.
        let sharded_moments = layout.shard_mode().is_sharded();
        let shard: Vec<(String, Vec<NamedTensor>)> = files
            .into_iter()
            .filter_map(|(kind, tensors)| {
                let all_mine = sharded_moments && kind == "optimizer";
                if !all_mine && !layout.writes_experts() {
                    return None;
                }
                let mine: Vec<NamedTensor> = tensors
                    .into_iter()
                    .filter(|t| {
                        all_mine
                            || rank == 0
                            || ParamKey::parse(&t.name).routed_expert_id().is_some()
                    })
                    .collect();
                // An empty file only where the unsharded save writes one (rank 0 always
                // writes every kind, so a reader finds each).
                (!mine.is_empty() || layout.writes_experts())
                    .then(|| (format!("{kind}.rank-{rank:04}.safetensors"), mine))
            })
            .collect();
        let written = if shard.is_empty() {
            Ok(Vec::new())
        } else {
            write_files(&tmp, &shard)
        };
        let entries = match &written {
            Ok(e) => serde_json::to_vec(e).expect("file entries serialise"),
            Err(_) => Vec::new(),
        };
        self.agree(layout, &tmp, written.map(|_| ()), step, "write the shards")?;
        let gathered = layout.all_gather_bytes(entries, "checkpoint: file entries")?;
        let committed = if rank == 0 {
            let mut all: Vec<FileEntry> = Vec::new();
            for part in gathered {
                let entries: Vec<FileEntry> =
                    serde_json::from_slice(&part).expect("file entries written above parse");
                all.extend(entries);
            }
            self.manager
                .commit_shared(&tmp, step, all, meta)
                .map(|_| ())
        } else {
            Ok(())
        };
        self.agree(layout, &tmp, committed, step, "commit")?;
        Ok(self.manager.root().join(step_dir_name(step)))
    }

    /// Collective outcome of one phase of a distributed save: every rank learns whether
    /// every rank succeeded; on failure rank 0 removes the temp directory.
    fn agree(
        &self,
        layout: &Layout,
        tmp: &Path,
        outcome: Result<(), super::CheckpointError>,
        step: u64,
        phase: &str,
    ) -> Result<(), TrainError> {
        let interrupted = || self.stop.as_ref().is_some_and(|s| s.requested());
        let ok = layout.all_ok_within(
            outcome.is_ok(),
            &format!("checkpoint of step {step}: {phase}"),
            self.save_timeout,
            &interrupted,
        )?;
        if ok {
            return Ok(());
        }
        if layout.rank() == 0 {
            self.manager.abandon(tmp);
        }
        match outcome {
            Err(e) => Err(e.into()),
            Ok(()) => Err(TrainError::OtherRank(format!(
                "checkpoint of step {step}: another rank failed to {phase} (its own error is \
                 in its log); nothing was committed"
            ))),
        }
    }
}

/// The manifest fields a save needs besides the snapshot.
#[derive(Debug, Clone)]
pub struct SaveMeta {
    pub tokens_seen: u64,
    /// Signature of the whole (unsharded) model: the same at every layout.
    pub model_signature: String,
}

/// Reads the checkpoint at `path` for a run whose model has `signature`: verified files,
/// merged shards.
pub fn read_snapshot(path: &Path, signature: &str) -> Result<Snapshot, TrainError> {
    let manifest = read_manifest(path)?;
    verify_compatible(&manifest, path, signature)?;
    read_any_snapshot(path)
}

/// [`read_snapshot`] of the model's weights only (the optimizer's files are not read).
pub fn read_weights_snapshot(path: &Path, signature: &str) -> Result<Snapshot, TrainError> {
    let manifest = read_manifest(path)?;
    verify_compatible(&manifest, path, signature)?;
    let loaded = super::load_kinds(path, |kind| kind == "model")?;
    Snapshot::of(&loaded).map_err(|message| TrainError::Snapshot {
        path: path.to_path_buf(),
        message,
    })
}

/// Reads the checkpoint at `path` whatever model wrote it (weights-only starts check names
/// and shapes themselves).
pub fn read_any_snapshot(path: &Path) -> Result<Snapshot, TrainError> {
    let loaded = load(path)?;
    Snapshot::of(&loaded).map_err(|message| TrainError::Snapshot {
        path: path.to_path_buf(),
        message,
    })
}
