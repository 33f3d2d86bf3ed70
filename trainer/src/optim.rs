//! AdamW (burn-optim's update rule) with per-parameter state keyed by [`ParamKey`], a
//! linear-warmup + cosine learning-rate schedule, and global-norm gradient clipping.
//!
//! State is keyed by the parameter's typed identity, not by burn's random `ParamId`, so it
//! survives checkpoints and moves with an expert when placement changes
//! ([`AdamMigration`]).

use std::collections::{BTreeMap, BTreeSet};

use burn::backend::Flex;
use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, Optimizer};
use burn::tensor::Tensor;
use burn::tensor::{Device, TensorData};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use switchyard_kernels::{self as cpu, Fused, fused};
use switchyard_moe::ParamKey;
use switchyard_moe::params::{map_params, named_params};
use switchyard_moe::profile::{self, Part};
use switchyard_parallel::Ownership;
use switchyard_parallel::migrate::ExpertState;

use crate::checkpoint::{Checkpointed, NamedTensor, Snapshot, tensor_values};

/// The `optim:` node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate, reached after warmup.
    pub lr: f64,
    /// Floor of the cosine decay.
    #[serde(default)]
    pub min_lr: f64,
    #[serde(default)]
    pub warmup_steps: u64,
    /// Steps over which the cosine decays from `lr` to `min_lr`; defaults to `train.steps`.
    #[serde(default)]
    pub decay_steps: Option<u64>,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to vectors such as norm gains).
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; absent = no clipping.
    #[serde(default)]
    pub grad_clip: Option<f64>,
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.1
}

impl OptimConfig {
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        let mut check = |ok: bool, key: &str, msg: &str| {
            if !ok {
                issues.push((key.to_string(), msg.to_string()));
            }
        };
        check(
            self.lr > 0.0 && self.lr.is_finite(),
            "lr",
            "must be a positive number (1e-4 to 3e-3 is usual)",
        );
        check(
            self.min_lr >= 0.0 && self.min_lr <= self.lr,
            "min_lr",
            "must lie between 0 and lr",
        );
        check(
            self.beta1 >= 0.0 && self.beta1 < 1.0,
            "beta1",
            "must lie in [0, 1); 0.9 is usual",
        );
        check(
            self.beta2 >= 0.0 && self.beta2 < 1.0,
            "beta2",
            "must lie in [0, 1); 0.95 or 0.999 is usual",
        );
        check(self.eps > 0.0, "eps", "must be positive; 1e-8 is usual");
        check(
            self.weight_decay >= 0.0,
            "weight_decay",
            "must be non-negative",
        );
        if let Some(clip) = self.grad_clip {
            check(
                clip > 0.0,
                "grad_clip",
                "must be positive; remove it to disable clipping",
            );
        }
        if let Some(decay) = self.decay_steps {
            check(decay > 0, "decay_steps", "must be positive");
        }
        issues
    }

    /// Learning rate at optimizer step `step` (0-based): linear warmup from lr/warmup to lr,
    /// then cosine decay to `min_lr` at `decay_steps`, then flat at `min_lr`.
    pub fn lr_at(&self, step: u64, total_steps: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self
            .decay_steps
            .unwrap_or(total_steps)
            .max(self.warmup_steps + 1);
        let progress =
            ((step - self.warmup_steps) as f64 / (decay_steps - self.warmup_steps) as f64).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr + (self.lr - self.min_lr) * cosine
    }
}

/// AdamW over a whole model, state keyed by parameter.
pub struct NamedAdamW {
    decayed: AdamW,
    not_decayed: AdamW,
    /// Parameters that receive weight decay: the matrices. Vectors (norm gains, biases,
    /// constant-expert vectors) are not decayed, as in GPT-2 / nanoGPT.
    decay: BTreeSet<ParamKey>,
    /// The parameters this rank holds and their element counts (kept current by expert
    /// migration): what a checkpoint restore must find moments for.
    held: BTreeMap<ParamKey, usize>,
    state: BTreeMap<ParamKey, AdamWState<1>>,
    /// With a sharded optimizer (`parallel.shard_optimizer`): the parameters this rank
    /// owns are the only ones it keeps moments for and updates; the others are left as
    /// they are (the owners' values are all-gathered after the step).
    ownership: Option<Ownership>,
    hyper: Hyper,
    /// Where the moments live: the parameters' inner (non-autodiff) device.
    device: Device,
}

/// AdamW's constants, for the fused update.
#[derive(Debug, Clone, Copy)]
struct Hyper {
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
}

impl NamedAdamW {
    pub fn new<M: burn::module::Module>(cfg: &OptimConfig, model: &M) -> Self {
        let params = named_params(model);
        let device = params
            .first()
            .map(|(_, _, value)| value.device())
            .unwrap_or_else(Device::flex);
        let decay = params
            .iter()
            .filter(|(_, shape, _)| shape.len() >= 2)
            .map(|(key, _, _)| key.clone())
            .collect();
        let held = params
            .iter()
            .map(|(key, shape, _)| (key.clone(), shape.iter().product()))
            .collect();
        let base = AdamWConfig::new()
            .with_beta_1(cfg.beta1 as f32)
            .with_beta_2(cfg.beta2 as f32)
            .with_epsilon(cfg.eps as f32);
        Self {
            decayed: base
                .clone()
                .with_weight_decay(cfg.weight_decay as f32)
                .build(),
            not_decayed: base.with_weight_decay(0.0).build(),
            decay,
            held,
            state: BTreeMap::new(),
            ownership: None,
            device,
            hyper: Hyper {
                beta1: cfg.beta1 as f32,
                beta2: cfg.beta2 as f32,
                eps: cfg.eps as f32,
                weight_decay: cfg.weight_decay as f32,
            },
        }
    }

    /// Keeps moments for, and updates, only the parameters `ownership` gives this rank
    /// (`None`: every parameter). Before the first step or after a restore.
    pub fn sharded(mut self, ownership: Option<Ownership>) -> Self {
        if let Some(own) = &ownership {
            self.held.retain(|key, _| own.owns(key));
            self.state.retain(|key, _| own.owns(key));
        }
        self.ownership = ownership;
        self
    }

    /// Whether this rank updates `key` (always, unless the optimizer is sharded).
    fn updates(&self, key: &ParamKey) -> bool {
        self.ownership.as_ref().is_none_or(|own| own.owns(key))
    }

    /// One update of every parameter with its gradient times `grad_scale` (the clipping
    /// factor of [`clip_scale`], applied in the update's own pass over the gradients). A
    /// parameter without a gradient (it took no part in this step, e.g. an expert no token
    /// chose) is updated with a zero gradient, so every parameter's step count stays equal
    /// to the optimizer's.
    pub fn step<M: burn::module::Module>(
        &mut self,
        model: M,
        grads: &BTreeMap<ParamKey, Tensor<1>>,
        grad_scale: f32,
        lr: f64,
    ) -> M {
        profile::time(Part::Optimizer, || {
            self.step_impl(model, grads, grad_scale, lr)
        })
    }

    fn step_impl<M: burn::module::Module>(
        &mut self,
        model: M,
        grads: &BTreeMap<ParamKey, Tensor<1>>,
        grad_scale: f32,
        lr: f64,
    ) -> M {
        if fused(Fused::Optimizer) {
            let mut params = named_params(&model);
            if params.iter().all(|(_, _, v)| v.device() == Device::flex()) {
                params.retain(|(name, _, _)| self.updates(name));
                let (names, entries): (Vec<ParamKey>, Vec<AdamEntry>) = params
                    .into_iter()
                    .map(|(name, _, value)| {
                        let entry = AdamEntry {
                            grad: grads.get(&name).cloned(),
                            state: self.state.remove(&name),
                            decayed: self.decay.contains(&name),
                            value,
                        };
                        (name, entry)
                    })
                    .unzip();
                let mut updated = BTreeMap::new();
                for (name, (value, state)) in names
                    .into_iter()
                    .zip(fused_adamw(self.hyper, lr, grad_scale, entries))
                {
                    self.state.insert(name.clone(), state);
                    updated.insert(name, value);
                }
                return map_params(model, |name, value| {
                    if self.updates(name) {
                        updated
                            .remove(name)
                            .expect("every owned parameter was updated")
                    } else {
                        value
                    }
                });
            }
        }
        map_params(model, |name, value| {
            if !self.updates(name) {
                return value;
            }
            let grad = match grads.get(name) {
                Some(g) if grad_scale != 1.0 => g.clone() * grad_scale,
                Some(g) => g.clone(),
                None => value.zeros_like(),
            };
            let optimizer = if self.decay.contains(name) {
                &self.decayed
            } else {
                &self.not_decayed
            };
            let (updated, state) = optimizer.step(lr, value, grad, self.state.remove(name));
            if let Some(state) = state {
                self.state.insert(name.clone(), state);
            }
            updated
        })
    }

    /// Number of updates applied so far (0 before the first step).
    pub fn steps_taken(&self) -> usize {
        self.state
            .values()
            .next()
            .map(|s| s.momentum.time)
            .unwrap_or(0)
    }

    /// First and second moments as `<param>.exp_avg` / `<param>.exp_avg_sq`.
    pub fn export(&self) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        for (key, state) in &self.state {
            for (suffix, tensor) in [
                ("exp_avg", &state.momentum.moment_1),
                ("exp_avg_sq", &state.momentum.moment_2),
            ] {
                out.push(NamedTensor::f32(
                    format!("{key}.{suffix}"),
                    vec![tensor.dims()[0]],
                    tensor_values(tensor),
                ));
            }
        }
        out
    }

    /// Restore from `export`'s tensors and the step count. Every parameter this rank holds
    /// must have both moments with the right length.
    pub fn import(
        &mut self,
        tensors: &BTreeMap<String, NamedTensor>,
        steps_taken: usize,
    ) -> Result<(), String> {
        self.state.clear();
        if steps_taken == 0 {
            return Ok(());
        }
        for (key, &size) in &self.held {
            let moment = |suffix: &str| -> Result<Tensor<1>, String> {
                let name = format!("{key}.{suffix}");
                let t = tensors
                    .get(&name)
                    .ok_or_else(|| format!("optimizer state `{name}` is missing"))?;
                let values = t
                    .as_f32()
                    .ok_or_else(|| format!("optimizer state `{name}` is not f32"))?;
                if values.len() != size {
                    return Err(format!(
                        "optimizer state `{name}` has {} values, the parameter has {size}",
                        values.len()
                    ));
                }
                Ok(Tensor::from_floats(values, &self.device))
            };
            let momentum =
                AdaptiveMomentumState::new(steps_taken, moment("exp_avg")?, moment("exp_avg_sq")?);
            self.state.insert(key.clone(), AdamWState::new(momentum));
        }
        Ok(())
    }
}

/// The moments in `optimizer` tensors, the update count in the trainer state.
impl Checkpointed for NamedAdamW {
    fn save(&self, snapshot: &mut Snapshot) {
        snapshot.put_tensors("optimizer", self.export());
        snapshot.put("optimizer_steps_taken", &self.steps_taken());
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        let steps: usize = snapshot.require("optimizer_steps_taken")?;
        self.import(snapshot.tensors("optimizer")?, steps)
    }
}

/// [`NamedAdamW`]'s state of one parameter as bytes, for live expert migration: the step
/// count (u64) then both moments (f32), little-endian.
pub struct AdamMigration<'a> {
    pub optim: &'a mut NamedAdamW,
}

impl ExpertState for AdamMigration<'_> {
    fn take(&mut self, param: &ParamKey) -> Vec<u8> {
        self.optim.held.remove(param);
        self.optim.decay.remove(param);
        let Some(state) = self.optim.state.remove(param) else {
            return Vec::new();
        };
        let m = &state.momentum;
        let mut out = (m.time as u64).to_le_bytes().to_vec();
        for moment in [&m.moment_1, &m.moment_2] {
            out.extend(tensor_values(moment).iter().flat_map(|v| v.to_le_bytes()));
        }
        out
    }

    fn put(&mut self, param: &ParamKey, shape: &[usize], bytes: &[u8]) -> Result<(), String> {
        if !self.optim.updates(param) {
            // A replica that does not own the expert's parameter: its owner (the replica of
            // the sender that owned it) received the moments.
            return if bytes.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "optimizer state of `{param}` arrived at a rank that does not own it"
                ))
            };
        }
        self.optim
            .held
            .insert(param.clone(), shape.iter().product());
        if shape.len() >= 2 {
            self.optim.decay.insert(param.clone());
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let n: usize = shape.iter().product();
        if bytes.len() != 8 + 8 * n {
            return Err(format!(
                "{} bytes of optimizer state for {n} values (expected {})",
                bytes.len(),
                8 + 8 * n
            ));
        }
        let time = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let floats: Vec<f32> = bytes[8..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("chunks of 4")))
            .collect();
        let (m1, m2) = floats.split_at(n);
        let momentum = AdaptiveMomentumState::new(
            time,
            Tensor::from_floats(m1, &self.optim.device),
            Tensor::from_floats(m2, &self.optim.device),
        );
        self.optim
            .state
            .insert(param.clone(), AdamWState::new(momentum));
        Ok(())
    }
}

/// One parameter's input to [`fused_adamw`]: its flattened value, its gradient (none: it
/// took no part in the step, and is updated with a zero gradient) and its moments (none
/// before the first update).
struct AdamEntry {
    value: Tensor<1>,
    grad: Option<Tensor<1>>,
    state: Option<AdamWState<1>>,
    decayed: bool,
}

/// burn-optim's AdamW update (same formulas, same order) of every parameter, with its
/// gradient times `grad_scale` (rounded as a separate scaling pass would), in one parallel
/// pass: the chunks of all parameters form one task list (a per-parameter loop
/// left the second core idle on the small ones and cost a dispatch each), values, gradients
/// and moments are read in place and the new ones written once into fresh buffers, instead
/// of burn-optim's dozen full-size temporaries per parameter.
fn fused_adamw(
    h: Hyper,
    lr: f64,
    grad_scale: f32,
    entries: Vec<AdamEntry>,
) -> Vec<(Tensor<1>, AdamWState<1>)> {
    const CHUNK: usize = 1 << 14;
    let flex = |t: &Tensor<1>| {
        t.clone()
            .try_into_primitive::<Flex>()
            .expect("a tensor on the flex device")
    };
    // Inputs: [value, grad, m, v] per parameter; `None` reads as zeros.
    let prims: Vec<[Option<cpu::FlexTensor>; 4]> = entries
        .iter()
        .map(|e| {
            let m = e.state.as_ref().map(|s| flex(&s.momentum.moment_1));
            let v = e.state.as_ref().map(|s| flex(&s.momentum.moment_2));
            [Some(flex(&e.value)), e.grad.as_ref().map(flex), m, v]
        })
        .collect();
    let inputs: Vec<[std::borrow::Cow<[f32]>; 4]> = prims
        .iter()
        .zip(&entries)
        .map(|(p, e)| {
            let n = e.value.dims()[0];
            p.each_ref().map(|t| match t {
                Some(t) => cpu::values(t),
                None => std::borrow::Cow::Owned(vec![0f32; n]),
            })
        })
        .collect();
    // Per parameter: (step count, decay factor, 1 / bias corrections).
    let (f1, f2) = (1.0 - h.beta1, 1.0 - h.beta2);
    let consts: Vec<(usize, f32, f32, f32)> = entries
        .iter()
        .map(|e| {
            let time = e.state.as_ref().map_or(1, |s| s.momentum.time + 1);
            let c1 = 1f32 - h.beta1.powi(time as i32);
            let c2 = 1f32 - h.beta2.powi(time as i32);
            let decay_rate = if e.decayed {
                lr * h.weight_decay as f64
            } else {
                0.0
            };
            // x * 1.0 == x exactly, so one branch-free loop serves both (it vectorises);
            // the bias corrections as reciprocals leave one division and one square root.
            (time, (1.0 - decay_rate) as f32, 1.0 / c1, 1.0 / c2)
        })
        .collect();
    let mut outputs: Vec<[Vec<f32>; 3]> = inputs
        .iter()
        .map(|i| [0; 3].map(|_| Vec::with_capacity(i[0].len())))
        .collect();
    let lr = lr as f32;
    {
        // One task per chunk of a parameter: (parameter, first element, out p, m, v).
        type Out<'a> = &'a mut [std::mem::MaybeUninit<f32>];
        let mut tasks: Vec<(usize, usize, Out, Out, Out)> = Vec::new();
        for (i, [p, m, v]) in outputs.iter_mut().enumerate() {
            let n = inputs[i][0].len();
            let chunks = p.spare_capacity_mut()[..n]
                .chunks_mut(CHUNK)
                .zip(m.spare_capacity_mut()[..n].chunks_mut(CHUNK))
                .zip(v.spare_capacity_mut()[..n].chunks_mut(CHUNK));
            for (c, ((p, m), v)) in chunks.enumerate() {
                tasks.push((i, c * CHUNK, p, m, v));
            }
        }
        tasks
            .into_par_iter()
            .for_each(|(i, start, p_out, m_out, v_out)| {
                let [p, g, m, v] = &inputs[i];
                let (_, keep, inv_c1, inv_c2) = consts[i];
                let span = start..start + p_out.len();
                let ins = p[span.clone()]
                    .iter()
                    .zip(&g[span.clone()])
                    .zip(&m[span.clone()])
                    .zip(&v[span]);
                let outs = p_out.iter_mut().zip(m_out.iter_mut()).zip(v_out.iter_mut());
                cpu::wide(
                    #[inline(always)]
                    || {
                        for ((((&p, &g), &m), &v), ((p_out, m_out), v_out)) in ins.zip(outs) {
                            // g * 1.0 == g exactly: no branch for the unclipped case.
                            let g = g * grad_scale;
                            let m = m * h.beta1 + g * f1;
                            let v = v * h.beta2 + g * g * f2;
                            let delta = (m * inv_c1) / ((v * inv_c2).sqrt() + h.eps);
                            p_out.write(p * keep - delta * lr);
                            m_out.write(m);
                            v_out.write(v);
                        }
                    },
                );
            });
    }
    let device = entries.first().map(|e| e.value.device());
    outputs
        .into_iter()
        .zip(consts)
        .zip(&inputs)
        .map(|((mut out, (time, ..)), input)| {
            let n = input[0].len();
            for buf in &mut out {
                // SAFETY: the chunks of the pass above cover all `n` elements of each buffer
                // and wrote every one of them.
                unsafe { buf.set_len(n) };
            }
            let device = device.as_ref().expect("a parameter");
            let [p, m, v] =
                out.map(|data| Tensor::<1>::from_data(TensorData::new(data, [n]), device));
            (p, AdamWState::new(AdaptiveMomentumState::new(time, m, v)))
        })
        .collect()
}

/// sqrt(sum of squares) over every gradient, in f64 on the host.
pub fn global_norm(grads: &BTreeMap<ParamKey, Tensor<1>>) -> f64 {
    profile::time(Part::Optimizer, || global_norm_impl(grads))
}

fn global_norm_impl(grads: &BTreeMap<ParamKey, Tensor<1>>) -> f64 {
    grads.values().map(cpu::squared_norm).sum::<f64>().sqrt()
}

/// The factor that brings the global gradient norm `norm` down to `max_norm` (1 when it is
/// already at most that, or without clipping); [`NamedAdamW::step`] applies it.
pub fn clip_scale(norm: f64, max_norm: Option<f64>) -> f32 {
    match max_norm {
        Some(max) if norm > max => (max / (norm + 1e-6)) as f32,
        _ => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OptimConfig {
        OptimConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 10,
            decay_steps: None,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: Some(1.0),
        }
    }

    #[test]
    fn schedule_warms_up_linearly_then_decays_to_min() {
        let c = cfg();
        assert!((c.lr_at(0, 100) - 1e-4).abs() < 1e-12);
        assert!((c.lr_at(4, 100) - 5e-4).abs() < 1e-12);
        assert!((c.lr_at(9, 100) - 1e-3).abs() < 1e-12);
        assert!((c.lr_at(10, 100) - 1e-3).abs() < 1e-12);
        // halfway through the decay: (lr + min_lr) / 2
        assert!((c.lr_at(55, 100) - 5.5e-4).abs() < 1e-9);
        assert!((c.lr_at(100, 100) - 1e-4).abs() < 1e-12);
        assert!((c.lr_at(500, 100) - 1e-4).abs() < 1e-12);
        let mut prev = f64::MAX;
        for s in 10..100 {
            let lr = c.lr_at(s, 100);
            assert!(lr <= prev);
            prev = lr;
        }
    }

    /// The fused AdamW equals burn-optim's over several steps, decayed and not, with the
    /// moments it keeps (checkpoints store them).
    #[test]
    fn fused_adamw_matches_burn_optim() {
        let device = burn::tensor::Device::flex();
        let run = |fused_on: bool| {
            let h = cfg();
            let base = AdamWConfig::new()
                .with_beta_1(h.beta1 as f32)
                .with_beta_2(h.beta2 as f32)
                .with_epsilon(h.eps as f32);
            let mut opt = NamedAdamW {
                decayed: base.clone().with_weight_decay(0.1).build(),
                not_decayed: base.with_weight_decay(0.0).build(),
                decay: [ParamKey::parse("w"), ParamKey::parse("big")]
                    .into_iter()
                    .collect(),
                held: BTreeMap::new(),
                state: BTreeMap::new(),
                ownership: None,
                device: device.clone(),
                hyper: Hyper {
                    beta1: 0.9,
                    beta2: 0.95,
                    eps: 1e-8,
                    weight_decay: 0.1,
                },
            };
            let mut params: Vec<(ParamKey, Vec<f32>)> = vec![
                (
                    ParamKey::parse("w"),
                    (0..50).map(|i| (i as f32 * 0.37).sin()).collect(),
                ),
                (
                    ParamKey::parse("g"),
                    (0..7).map(|i| 1.0 + i as f32 * 0.1).collect(),
                ),
                // Several chunks of the fused pass.
                (
                    ParamKey::parse("big"),
                    (0..40_000).map(|i| (i as f32 * 0.011).cos()).collect(),
                ),
            ];
            for step in 0..4 {
                // Clipped (scaled) gradients on odd steps.
                let scale = if step % 2 == 1 { 0.37 } else { 1.0 };
                let grad = |n: usize| {
                    let g: Vec<f32> = (0..n).map(|i| ((i + step) as f32 * 0.71).cos()).collect();
                    Tensor::<1>::from_floats(g.as_slice(), &device)
                };
                if fused_on {
                    // Every parameter in one call, as `NamedAdamW::step` makes it.
                    let entries = params
                        .iter()
                        .map(|(name, p)| AdamEntry {
                            value: Tensor::<1>::from_floats(p.as_slice(), &device),
                            grad: Some(grad(p.len())),
                            state: opt.state.remove(name),
                            decayed: opt.decay.contains(name),
                        })
                        .collect();
                    let updated = fused_adamw(opt.hyper, 1e-2, scale, entries);
                    for ((name, p), (u, state)) in params.iter_mut().zip(updated) {
                        opt.state.insert(name.clone(), state);
                        *p = tensor_values(&u);
                    }
                    continue;
                }
                for (name, p) in params.iter_mut() {
                    let value = Tensor::<1>::from_floats(p.as_slice(), &device);
                    let o = if opt.decay.contains(name) {
                        &opt.decayed
                    } else {
                        &opt.not_decayed
                    };
                    let state = opt.state.remove(name);
                    let (updated, state) = o.step(1e-2, value, grad(p.len()) * scale, state);
                    opt.state.insert(name.clone(), state.unwrap());
                    *p = tensor_values(&updated);
                }
            }
            (params, opt.export())
        };
        let (fast, fast_state) = run(true);
        let (slow, slow_state) = run(false);
        for ((name, a), (_, b)) in fast.iter().zip(&slow) {
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-6 * y.abs().max(1.0),
                    "{name}: {x} vs {y}"
                );
            }
        }
        assert_eq!(fast_state.len(), slow_state.len());
        for (a, b) in fast_state.iter().zip(&slow_state) {
            assert_eq!(a.name, b.name);
            for (x, y) in a.as_f32().unwrap().iter().zip(b.as_f32().unwrap()) {
                assert!(
                    (x - y).abs() <= 1e-6 * y.abs().max(1e-3),
                    "{}: {x} vs {y}",
                    a.name
                );
            }
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let device = burn::tensor::Device::flex();
        let mut grads = BTreeMap::new();
        grads.insert(
            ParamKey::parse("a"),
            Tensor::<1>::from_floats([3.0, 0.0], &device),
        );
        grads.insert(
            ParamKey::parse("b"),
            Tensor::<1>::from_floats([0.0, 4.0], &device),
        );
        let norm = global_norm(&grads);
        assert!((norm - 5.0).abs() < 1e-6);
        let scale = clip_scale(norm, Some(1.0));
        let clipped: BTreeMap<ParamKey, Tensor<1>> = grads
            .iter()
            .map(|(name, g)| (name.clone(), g.clone() * scale))
            .collect();
        assert!((global_norm(&clipped) - 1.0).abs() < 1e-5);
        assert!((tensor_values(&clipped["a"])[0] - 0.6).abs() < 1e-5);
        assert_eq!(clip_scale(norm, Some(6.0)), 1.0, "below the limit");
        assert_eq!(clip_scale(norm, None), 1.0, "no clipping");
    }
}
