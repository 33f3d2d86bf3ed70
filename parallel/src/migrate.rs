//! Live expert migration: at a step boundary, every ep group moves the experts whose owner
//! changes from the old owner to the new one — the weights and whatever per-parameter
//! state the caller keeps (the optimizer's moments and step count, through
//! [`ExpertState`]) — then installs the new per-layer placements in the model's
//! dispatchers and returns the mesh that holds them (for [`crate::GradSync::set_mesh`]).
//!
//! Every rank of the world calls [`migrate`] with the same new placements (the caller makes
//! them agree, e.g. by broadcasting rank 0's plan). The transfer is one all-to-all(v) of
//! bytes over the ep axis: every ep group (one per dp x cp coordinate) moves its own copies,
//! so dp replicas stay replicas. Moves are listed in (layer, expert) order on every rank,
//! which is the order of the payloads inside each rank-to-rank block; the receiver parses
//! them in the same order.
//!
//! Payload of one expert, per parameter in `named_params` order (`w_gate`, `w_up`, `w_down`):
//! name (u32 length + UTF-8), shape (u32 rank + u64 dims), the f32 values, the caller's
//! state (u64 length + bytes). Little-endian throughout.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use switchyard_comm::Buffer;
use switchyard_moe::experts::SwiGlu;
use switchyard_moe::params::named_params;
use switchyard_moe::{ParamKey, Transformer};

use crate::error::{ParallelError, Result};
use crate::grad_sync::layer_dispatcher;
use crate::mesh::{ExpertPlacement, Mesh, Placement};

/// Per-parameter state that travels with an expert's weights (the optimizer's, keyed by
/// the parameter's key).
pub trait ExpertState {
    /// Removes the state kept for `param` on the sending rank and returns it as bytes
    /// (empty when there is none, e.g. before the first optimizer step).
    fn take(&mut self, param: &ParamKey) -> Vec<u8>;
    /// Installs the state received for `param` of shape `shape` (the bytes `take` returned
    /// on the sender).
    fn put(
        &mut self,
        param: &ParamKey,
        shape: &[usize],
        bytes: &[u8],
    ) -> std::result::Result<(), String>;
}

/// No state besides the weights.
#[derive(Debug, Default, Clone, Copy)]
pub struct WeightsOnly;

impl ExpertState for WeightsOnly {
    fn take(&mut self, _: &ParamKey) -> Vec<u8> {
        Vec::new()
    }
    fn put(&mut self, _: &ParamKey, _: &[usize], _: &[u8]) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// One expert changing owner inside every ep group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertMove {
    /// Model layer index (`layers.{layer}.moe`).
    pub layer: usize,
    /// Global expert id.
    pub expert: usize,
    /// Old and new owner (ep ranks).
    pub from: usize,
    pub to: usize,
}

/// The moves from the `old` placements to `new` (model layer index -> placement), in
/// (layer, expert) order.
pub fn planned_moves(old: &ExpertPlacement, new: &BTreeMap<usize, Placement>) -> Vec<ExpertMove> {
    let mut moves = Vec::new();
    for (&layer, placement) in new {
        let old = old.of(layer);
        for expert in 0..placement.num_experts().min(old.num_experts()) {
            let (from, to) = (old.owner(expert), placement.owner(expert));
            if from != to {
                moves.push(ExpertMove {
                    layer,
                    expert,
                    from,
                    to,
                });
            }
        }
    }
    moves
}

/// Moves experts (weights and `state`) from their owners under `old` to the owners of `new`
/// (model layer index -> placement; layers not named keep theirs) and installs the new
/// placements in the model's dispatchers. A collective over the world's ep groups: every
/// rank calls it with the same `new`. `device`: the device of the model's parameters
/// (received experts are built on it). Returns the model, the new placement and the moves
/// made.
pub fn migrate(
    mut model: Transformer,
    mesh: &Mesh,
    old: &ExpertPlacement,
    new: BTreeMap<usize, Placement>,
    state: &mut dyn ExpertState,
    device: &Device,
) -> Result<(Transformer, ExpertPlacement, Vec<ExpertMove>)> {
    for &layer in new.keys() {
        if model
            .layers
            .get(layer)
            .and_then(|b| b.moe.as_ref())
            .is_none()
        {
            return Err(ParallelError::Placement(format!(
                "migration: model layer {layer} is not a MoE layer; give placements only for \
                 the MoE layers"
            )));
        }
    }
    let moves = planned_moves(old, &new);
    let placement = old.clone().with_layers(new.clone())?;
    let ep = mesh.ep_comm();
    let (me, size) = (ep.rank(), ep.size());
    // Pack what leaves this rank, dropping it from the model.
    let mut send: Vec<Vec<u8>> = vec![Vec::new(); size];
    for m in moves.iter().filter(|m| m.from == me) {
        let layer = moe_layer(&mut model, m.layer);
        let expert = layer.experts[m.expert].take().ok_or_else(|| {
            ParallelError::Placement(format!(
                "migration: ep rank {me} should own expert {} of layer {} but does not hold it",
                m.expert, m.layer
            ))
        })?;
        pack_expert(&mut send[m.to], m, &expert, state)?;
    }
    let send_counts: Vec<usize> = send.iter().map(Vec::len).collect();
    let op = "migration: exchange of payload sizes";
    let recv_counts = ep
        .i_all_to_all_v(
            Buffer::I64(send_counts.iter().map(|&n| n as i64).collect()),
            vec![1; size],
            vec![1; size],
        )
        .map_err(ParallelError::comm(op))?
        .wait()
        .map_err(ParallelError::comm(op))?
        .into_vec::<i64>()
        .map_err(|b| ParallelError::Shape {
            what: op.into(),
            detail: format!("received {} instead of i64", b.dtype()),
        })?;
    let recv_counts: Vec<usize> = recv_counts.into_iter().map(|n| n as usize).collect();
    let op = "migration: exchange of expert weights and state";
    let received = ep
        .i_all_to_all_v(Buffer::U8(send.concat()), send_counts, recv_counts.clone())
        .map_err(ParallelError::comm(op))?
        .wait()
        .map_err(ParallelError::comm(op))?
        .into_vec::<u8>()
        .map_err(|b| ParallelError::Shape {
            what: op.into(),
            detail: format!("received {} instead of u8", b.dtype()),
        })?;
    // Unpack what arrives, block by block (source ep rank order), moves in order.
    let mut start = 0;
    for (src, &n) in recv_counts.iter().enumerate() {
        let mut reader = Reader {
            bytes: &received[start..start + n],
            at: 0,
        };
        start += n;
        for m in moves.iter().filter(|m| m.from == src && m.to == me) {
            let expert = unpack_expert(&mut reader, m, state, device)?;
            moe_layer(&mut model, m.layer).experts[m.expert] = Some(expert);
        }
        if reader.at != reader.bytes.len() {
            return Err(ParallelError::Shape {
                what: op.into(),
                detail: format!(
                    "ep rank {src} sent {} bytes, the moves account for {}",
                    n, reader.at
                ),
            });
        }
    }
    for &layer in new.keys() {
        let block = &mut model.layers[layer];
        let moe = block.moe.take().expect("checked above: a MoE layer");
        block.moe =
            Some(moe.with_dispatcher(layer_dispatcher(mesh, layer, placement.of(layer).clone())));
    }
    Ok((model, placement, moves))
}

/// Lays the model's experts out for `new` (model layer index -> placement) without moving
/// any data: experts this rank stops owning are dropped, experts it starts owning are made
/// by `fresh` (placeholders, to be overwritten — a checkpoint restore reads every expert by
/// name), and the dispatchers get the new placements. Local: no communication. Returns the
/// model and the new placement (`old` with the layers of `new` replaced).
pub fn relayout(
    mut model: Transformer,
    mesh: &Mesh,
    old: &ExpertPlacement,
    new: BTreeMap<usize, Placement>,
    fresh: impl Fn() -> SwiGlu,
) -> Result<(Transformer, ExpertPlacement)> {
    let new_placement = old.clone().with_layers(new.clone())?;
    let me = mesh.ep_rank();
    for (&layer, placement) in &new {
        let Some(moe) = model.layers.get_mut(layer).and_then(|b| b.moe.take()) else {
            return Err(ParallelError::Placement(format!(
                "relayout: model layer {layer} is not a MoE layer; give placements only for \
                 the MoE layers"
            )));
        };
        let mut moe = moe.with_dispatcher(layer_dispatcher(
            mesh,
            layer,
            new_placement.of(layer).clone(),
        ));
        for (e, slot) in moe.experts.iter_mut().enumerate() {
            match (placement.owner(e) == me, slot.is_some()) {
                (true, false) => *slot = Some(fresh()),
                (false, true) => *slot = None,
                _ => {}
            }
        }
        model.layers[layer].moe = Some(moe);
    }
    Ok((model, new_placement))
}

fn moe_layer(model: &mut Transformer, layer: usize) -> &mut switchyard_moe::MoeLayer {
    model.layers[layer]
        .moe
        .as_mut()
        .expect("migrate checks that every placed layer is a MoE layer")
}

fn pack_expert(
    out: &mut Vec<u8>,
    m: &ExpertMove,
    expert: &SwiGlu,
    state: &mut dyn ExpertState,
) -> Result<()> {
    for (name, shape, value) in named_params(expert) {
        let values = value
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| ParallelError::Shape {
                what: format!("migration: expert {} of layer {}", m.expert, m.layer),
                detail: format!("`{name}` is not readable as f32: {e:?}"),
            })?;
        let leaf = name.name();
        let full = ParamKey::routed_expert(m.layer, m.expert, leaf);
        out.extend((leaf.len() as u32).to_le_bytes());
        out.extend(leaf.as_bytes());
        out.extend((shape.len() as u32).to_le_bytes());
        for d in &shape {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        let extra = state.take(&full);
        out.extend((extra.len() as u64).to_le_bytes());
        out.extend(extra);
    }
    Ok(())
}

fn unpack_expert(
    reader: &mut Reader<'_>,
    m: &ExpertMove,
    state: &mut dyn ExpertState,
    device: &Device,
) -> Result<SwiGlu> {
    let what = || format!("migration: expert {} of layer {}", m.expert, m.layer);
    let mut weights: BTreeMap<String, Param<Tensor<2>>> = BTreeMap::new();
    for _ in 0..3 {
        let len = reader.u32(&what)? as usize;
        let name = String::from_utf8(reader.take(len, &what)?.to_vec()).map_err(|_| {
            ParallelError::Shape {
                what: what(),
                detail: "a parameter name is not UTF-8".into(),
            }
        })?;
        let rank = reader.u32(&what)? as usize;
        let shape: Vec<usize> = (0..rank)
            .map(|_| reader.u64(&what).map(|d| d as usize))
            .collect::<Result<_>>()?;
        let [rows, cols] = shape[..] else {
            return Err(ParallelError::Shape {
                what: what(),
                detail: format!("`{name}` has shape {shape:?}, expected a matrix"),
            });
        };
        let values: Vec<f32> = reader
            .take(rows * cols * 4, &what)?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("chunks of 4")))
            .collect();
        let extra_len = reader.u64(&what)? as usize;
        let extra = reader.take(extra_len, &what)?;
        let full = ParamKey::routed_expert(m.layer, m.expert, &name);
        state
            .put(&full, &shape, extra)
            .map_err(|detail| ParallelError::Shape {
                what: what(),
                detail: format!("state of `{full}`: {detail}"),
            })?;
        let tensor = Tensor::<2>::from_data(TensorData::new(values, [rows, cols]), device);
        weights.insert(name, Param::from_tensor(tensor));
    }
    let mut weight = |name: &str| {
        weights.remove(name).ok_or_else(|| ParallelError::Shape {
            what: what(),
            detail: format!("the payload has no `{name}`"),
        })
    };
    Ok(SwiGlu {
        w_gate: weight("w_gate")?,
        w_up: weight("w_up")?,
        w_down: weight("w_down")?,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if self.at + n > self.bytes.len() {
            return Err(ParallelError::Shape {
                what: what(),
                detail: format!(
                    "the payload ends at byte {}, {n} more were expected at {}",
                    self.bytes.len(),
                    self.at
                ),
            });
        }
        self.at += n;
        Ok(&self.bytes[self.at - n..self.at])
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
}
