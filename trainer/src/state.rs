//! What a [`Trainer`] saves and how its experts move: the checkpoint parts
//! ([`Checkpointed`]) it is made of, save / restore / weights-only starts through the
//! [`Checkpointer`], and placement changes through the [`Rebalancer`].

use std::path::{Path, PathBuf};

use crate::checkpoint::{self, Checkpointed, Checkpointer, SaveMeta, Snapshot};
use crate::error::TrainError;
use crate::optim::NamedAdamW;
use crate::rebalance::{ModelState, Rebalanced, Rebalancer, SavedPlacement, zero_expert};
use crate::trainer::{Counters, Trainer};

impl Checkpointed for Counters {
    fn save(&self, snapshot: &mut Snapshot) {
        snapshot.put("step", &self.step);
        snapshot.put("tokens_seen", &self.tokens_seen);
        snapshot.put("skipped_steps", &self.skipped_steps);
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        self.step = snapshot.require("step")?;
        self.tokens_seen = snapshot.require("tokens_seen")?;
        self.skipped_steps = snapshot.require("skipped_steps")?;
        Ok(())
    }
}

impl Trainer {
    /// Placement metrics of this step (rank 0 logs them): load max/mean per MoE layer and
    /// cross-rank traffic of the current placement under the routing statistics.
    pub fn placement_scalars(&self) -> Vec<(String, f64)> {
        match (&self.rebalancer, &self.layout) {
            (Some(r), Some(l)) => r.scalars(l.placement()),
            _ => Vec::new(),
        }
    }

    /// What a placement change touches, or `None` in one process.
    fn model_state(&mut self) -> Option<ModelState<'_>> {
        Some(ModelState {
            model: &mut self.model,
            layout: self.layout.as_mut()?,
            optim: &mut self.optim,
            device: &self.device,
        })
    }

    /// Re-plans the placement and migrates the experts when it pays back (a collective;
    /// see [`Rebalancer::rebalance`]). Returns rank 0's log line and decision metrics.
    pub fn rebalance(&mut self) -> Result<Option<Rebalanced>, TrainError> {
        let step = self.counters.step;
        let Some(rebalancer) = self.rebalancer.take() else {
            return Ok(None);
        };
        let line = match self.model_state() {
            Some(state) => rebalancer.rebalance(step, state),
            None => Ok(None),
        };
        self.rebalancer = Some(rebalancer);
        line
    }

    /// Moves every MoE layer's experts to `owners[i]` (the ep rank of each expert of the
    /// i-th MoE layer), weights and optimizer state (a collective).
    pub fn set_placement(
        &mut self,
        owners: &[Vec<usize>],
    ) -> Result<Vec<switchyard_parallel::ExpertMove>, TrainError> {
        let layers = self.moe_layers();
        let state = self.model_state().ok_or_else(|| {
            TrainError::Placement("setting a placement needs expert parallelism".into())
        })?;
        crate::rebalance::set_placement(state, &layers, owners)
    }

    /// Everything a checkpoint holds, from every part.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        self.model.save(&mut snapshot);
        self.optim.save(&mut snapshot);
        self.sampler.save(&mut snapshot);
        self.counters.save(&mut snapshot);
        if let Some(r) = &self.rebalancer {
            r.save(&mut snapshot);
        }
        if let Some(l) = &self.layout {
            snapshot.put(
                "placement",
                &SavedPlacement::of(l.placement(), &self.moe_layers()),
            );
        }
        snapshot
    }

    /// Saves a checkpoint of the current step (a collective when distributed).
    pub fn save(&self, checkpointer: &Checkpointer) -> Result<PathBuf, TrainError> {
        if self.is_logger()
            && let Some(r) = self.rebalancer.as_ref().filter(|r| r.stats.records > 0)
        {
            // For `switchyard plan-placement --stats`; the checkpoint holds its own copy.
            let path = self.cfg.run.output_dir.join("routing-stats.json");
            if let Err(e) = std::fs::create_dir_all(&self.cfg.run.output_dir)
                .map_err(|e| e.to_string())
                .and_then(|_| r.stats.save(&path).map_err(|e| e.to_string()))
            {
                tracing::warn!("routing statistics not saved: {e}");
            }
        }
        let meta = SaveMeta {
            tokens_seen: self.counters.tokens_seen,
            model_signature: self.signature.clone(),
        };
        checkpointer.save(
            self.counters.step,
            self.snapshot(),
            meta,
            self.layout.as_ref(),
        )
    }

    /// Restores weights, optimizer moments, data position, counters, routing statistics
    /// and the expert placement from a checkpoint of this model (any layout).
    pub fn restore(&mut self, path: &Path) -> Result<(), TrainError> {
        let snapshot = checkpoint::read_snapshot(path, &self.signature)?;
        self.restore_from(path, &snapshot, true)
    }

    /// [`Self::restore`] of the weights, the step and the placement only, reading none of
    /// the optimizer's files (evaluation: a model sized for sharded optimizer state is
    /// not loaded with every rank's moments).
    pub fn restore_weights(&mut self, path: &Path) -> Result<(), TrainError> {
        let snapshot = checkpoint::read_weights_snapshot(path, &self.signature)?;
        self.restore_from(path, &snapshot, false)
    }

    fn restore_from(
        &mut self,
        path: &Path,
        snapshot: &Snapshot,
        training_state: bool,
    ) -> Result<(), TrainError> {
        let resume_err = |message: String| TrainError::Resume {
            path: path.to_path_buf(),
            message,
        };
        // The placement first: the weights are read for the experts this rank then holds.
        let saved: Option<SavedPlacement> = snapshot.get("placement").map_err(resume_err)?;
        let (d_model, ffn) = (self.cfg.model.d_model, self.cfg.model.moe.expert_ffn_dim);
        let device = self.device.clone();
        let optim_cfg = self.cfg.optim.clone();
        // Expert ownership is a function of the key, so today's holds for the experts the
        // restored placement brings.
        let ownership = self.layout.as_ref().and_then(|l| l.ownership().cloned());
        let initial_plan = self.initial_plan.clone();
        if let Some(state) = self.model_state() {
            Rebalancer::restore_placement(
                saved.as_ref(),
                initial_plan.as_deref(),
                state,
                || zero_expert(d_model, ffn, &device),
                |model| NamedAdamW::new(&optim_cfg, model).sharded(ownership.clone()),
            )?;
        }
        let mut parts: Vec<&mut dyn Checkpointed> = vec![&mut self.model, &mut self.counters];
        if training_state {
            parts.extend([&mut self.optim as &mut dyn Checkpointed, &mut self.sampler]);
            if let Some(r) = &mut self.rebalancer {
                parts.push(r);
            }
        }
        for part in parts {
            part.restore(snapshot).map_err(resume_err)?;
        }
        Ok(())
    }

    /// Start from the weights of another run's checkpoint (fine-tuning, conversion): the
    /// optimizer, data position and step start fresh. A vanilla router's `[D, n]` weights
    /// fill a null-expert router's `[D, n + m]`: the true-expert columns are copied, and the
    /// null columns too (cyclically) with `null_init: copy_true_rows`, so the expanded router
    /// starts balanced (AdaMoE's conversion); with `random` they keep their fresh values.
    /// Any other difference in names or shapes is an error naming the tensor. Router biases
    /// (`bias_balance`) come along when both runs have them (see
    /// [`checkpoint::init_router_biases`]).
    pub fn init_from(&mut self, path: &Path) -> Result<(), TrainError> {
        let err = |message: String| TrainError::InitFrom {
            path: path.to_path_buf(),
            message,
        };
        let snapshot = checkpoint::read_any_snapshot(path)?;
        checkpoint::init_weights(&mut self.model, &snapshot, &self.cfg.model.moe).map_err(err)?;
        checkpoint::init_router_biases(&mut self.model, &snapshot).map_err(err)
    }
}
