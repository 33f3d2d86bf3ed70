//! Typed parameter identity, and named access to a module's float parameters.
//!
//! burn identifies parameters by random `ParamId`s; Switchyard identifies them by a
//! [`ParamKey`] built from the module path (`layers.3.moe.experts.5.w_up`), which is stable
//! across runs, layouts and placements. Checkpoints, the optimizer state, gradient
//! synchronisation and expert migration all key on it. The on-disk tensor name is made
//! ([`ParamKey::name`]) and parsed ([`ParamKey::parse`]) here and nowhere else.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Gradients, Tensor};

/// What a parameter belongs to. Layer components carry the model layer index in
/// [`ParamKey::layer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    /// `embed`
    Embedding,
    /// `lm_head`
    LmHead,
    /// `final_norm.*`
    FinalNorm,
    /// `router_gru.*`: the recurrent router's GRU (RMoE), shared by the MoE layers.
    RouterGru,
    /// `layers.{l}.attn_norm.*`
    AttentionNorm,
    /// `layers.{l}.attn.*`
    Attention,
    /// `layers.{l}.ffn_norm.*`
    FfnNorm,
    /// `layers.{l}.dense.*`: the FFN of a dense layer.
    DenseFfn,
    /// `layers.{l}.moe.router.*`
    Router,
    /// `layers.{l}.moe.experts.{e}.*`: routed FFN expert `e` (global id).
    RoutedExpert(usize),
    /// `layers.{l}.moe.constants.{i}.*`: MoE++ constant expert `i`.
    ConstantExpert(usize),
    /// `layers.{l}.moe.shared.{i}.*`: shared expert `i`.
    SharedExpert(usize),
    /// A path of no Switchyard model (a sub-module visited on its own, e.g. one expert).
    Other,
}

/// The identity of one float parameter: its component (layer, expert id, ...) and its
/// tensor within it. Ordered, compared and hashed as its name, so maps keyed by it iterate
/// as the on-disk names sort, and `map.get("layers.0.attn.wq")` works.
#[derive(Debug, Clone)]
pub struct ParamKey {
    name: String,
    layer: Option<usize>,
    component: Component,
}

impl ParamKey {
    /// Parses an on-disk name (the inverse of [`ParamKey::name`]). Every string is a key:
    /// a name no Switchyard model has is [`Component::Other`].
    pub fn parse(name: &str) -> ParamKey {
        let parts: Vec<&str> = name.split('.').collect();
        let index = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
        let (layer, component) = match parts.as_slice() {
            ["embed"] => (None, Component::Embedding),
            ["lm_head"] => (None, Component::LmHead),
            ["final_norm", ..] => (None, Component::FinalNorm),
            ["router_gru", ..] => (None, Component::RouterGru),
            ["layers", _, rest @ ..] if index(1).is_some() => {
                let component = match rest {
                    ["attn_norm", ..] => Component::AttentionNorm,
                    ["attn", ..] => Component::Attention,
                    ["ffn_norm", ..] => Component::FfnNorm,
                    ["dense", ..] => Component::DenseFfn,
                    ["moe", "router", ..] => Component::Router,
                    ["moe", "experts", _, _, ..] => {
                        index(4).map_or(Component::Other, Component::RoutedExpert)
                    }
                    ["moe", "constants", _, _, ..] => {
                        index(4).map_or(Component::Other, Component::ConstantExpert)
                    }
                    ["moe", "shared", _, _, ..] => {
                        index(4).map_or(Component::Other, Component::SharedExpert)
                    }
                    _ => Component::Other,
                };
                (index(1), component)
            }
            _ => (None, Component::Other),
        };
        let layer = if component == Component::Other {
            None
        } else {
            layer
        };
        ParamKey {
            name: name.to_string(),
            layer,
            component,
        }
    }

    /// The key of tensor `leaf` (`w_gate`, `w_up`, `w_down`) of routed expert `expert` in
    /// model layer `layer`.
    pub fn routed_expert(layer: usize, expert: usize, leaf: &str) -> ParamKey {
        ParamKey::parse(&format!("layers.{layer}.moe.experts.{expert}.{leaf}"))
    }

    /// The on-disk tensor name (checkpoints, logs).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model layer index of a layer component.
    pub fn layer(&self) -> Option<usize> {
        self.layer
    }

    pub fn component(&self) -> Component {
        self.component
    }

    /// `(layer, global expert id)` of a routed expert's parameter.
    pub fn routed_expert_id(&self) -> Option<(usize, usize)> {
        match (self.layer, self.component) {
            (Some(l), Component::RoutedExpert(e)) => Some((l, e)),
            _ => None,
        }
    }

    /// Whether this is a router's gate matrix `[D, slots]` (resized when a checkpoint of a
    /// router with fewer slots is loaded).
    pub fn is_router_gate(&self) -> bool {
        self.component == Component::Router && self.leaf() == "w_gate"
    }

    /// The tensor's own name inside its component (`w_up`, `gamma`, ...).
    pub fn leaf(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }
}

impl fmt::Display for ParamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl PartialEq for ParamKey {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for ParamKey {}

impl PartialOrd for ParamKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ParamKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.name.cmp(&other.name)
    }
}

impl std::hash::Hash for ParamKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state)
    }
}

impl Borrow<str> for ParamKey {
    fn borrow(&self) -> &str {
        &self.name
    }
}

/// Dotted path tracking shared by the visitor and the mapper.
#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn current(&self) -> ParamKey {
        ParamKey::parse(&self.0.join("."))
    }
}

/// Name, shape and value of every float parameter, in visiting order.
pub fn named_params<M: Module>(module: &M) -> Vec<(ParamKey, Vec<usize>, Tensor<1>)> {
    struct Collect {
        path: Path,
        out: Vec<(ParamKey, Vec<usize>, Tensor<1>)>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            let shape = value.dims().to_vec();
            self.out
                .push((self.path.current(), shape, value.inner().flatten(0, D - 1)));
        }
    }
    let mut collect = Collect {
        path: Path::default(),
        out: Vec::new(),
    };
    module.visit(&mut collect);
    collect.out
}

/// Gradients of every float parameter that took part in the backward pass, flattened and
/// keyed by name. Parameters without a gradient (unused in this forward) are absent.
pub fn named_grads<M: Module>(module: &M, grads: &Gradients) -> BTreeMap<ParamKey, Tensor<1>> {
    struct Collect<'a> {
        path: Path,
        grads: &'a Gradients,
        out: BTreeMap<ParamKey, Tensor<1>>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = param.val().grad(self.grads) {
                self.out.insert(self.path.current(), grad.flatten(0, D - 1));
            }
        }
    }
    let mut collect = Collect {
        path: Path::default(),
        grads,
        out: BTreeMap::new(),
    };
    module.visit(&mut collect);
    collect.out
}

/// Replace every float parameter by `f(name, current value flattened)`, keeping its id,
/// shape and `require_grad` flag. `f` returns the new flattened value (not tracked).
pub fn map_params<M: Module>(module: M, f: impl FnMut(&ParamKey, Tensor<1>) -> Tensor<1>) -> M {
    struct Map<F> {
        path: Path,
        f: F,
    }
    impl<F: FnMut(&ParamKey, Tensor<1>) -> Tensor<1>> ModuleMapper for Map<F> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let name = self.path.current();
            let (id, value, mapper) = param.consume();
            let require_grad = value.is_require_grad();
            let tracked = value.device().is_autodiff();
            let shape = value.shape();
            let updated = (self.f)(&name, value.inner().flatten(0, D - 1));
            let mut updated: Tensor<D> = updated.reshape(shape);
            // Training parameters live on the autodiff device; values computed on the inner
            // device are moved back so the next forward pass tracks them again.
            if tracked {
                updated = Tensor::from_inner(updated).set_require_grad(require_grad);
            }
            Param::from_mapped_value(id, updated, mapper)
        }
    }
    module.map(&mut Map {
        path: Path::default(),
        f,
    })
}

/// A short fingerprint of the parameter names and shapes: two models with the same
/// signature can exchange checkpoints.
pub fn signature<M: Module>(module: &M) -> String {
    let mut text = String::new();
    for (name, shape, _) in named_params(module) {
        text.push_str(&format!("{}:{shape:?};", name.name()));
    }
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_into_components_and_back() {
        let cases = [
            ("embed", None, Component::Embedding),
            ("lm_head", None, Component::LmHead),
            ("final_norm.gamma", None, Component::FinalNorm),
            ("router_gru.w_ih", None, Component::RouterGru),
            ("layers.3.attn.wq", Some(3), Component::Attention),
            (
                "layers.0.attn_norm.gamma",
                Some(0),
                Component::AttentionNorm,
            ),
            ("layers.1.ffn_norm.gamma", Some(1), Component::FfnNorm),
            ("layers.1.dense.w_up", Some(1), Component::DenseFfn),
            ("layers.2.moe.router.w_gate", Some(2), Component::Router),
            (
                "layers.12.moe.experts.7.w_down",
                Some(12),
                Component::RoutedExpert(7),
            ),
            (
                "layers.2.moe.constants.1.v",
                Some(2),
                Component::ConstantExpert(1),
            ),
            (
                "layers.2.moe.shared.0.w_gate",
                Some(2),
                Component::SharedExpert(0),
            ),
            ("w_gate", None, Component::Other),
            ("layers.x.attn.wq", None, Component::Other),
            ("layers.1.moe.experts.y.w_up", None, Component::Other),
        ];
        for (name, layer, component) in cases {
            let key = ParamKey::parse(name);
            assert_eq!((key.layer(), key.component()), (layer, component), "{name}");
            assert_eq!(key.name(), name);
            assert_eq!(key.to_string(), name);
        }
        let key = ParamKey::routed_expert(4, 9, "w_up");
        assert_eq!(key.name(), "layers.4.moe.experts.9.w_up");
        assert_eq!(key.routed_expert_id(), Some((4, 9)));
        assert_eq!(key.leaf(), "w_up");
        assert!(ParamKey::parse("layers.0.moe.router.w_gate").is_router_gate());
        assert!(!ParamKey::parse("layers.0.dense.w_gate").is_router_gate());
    }

    #[test]
    fn keys_sort_and_look_up_as_their_names() {
        let mut map = BTreeMap::new();
        for name in ["layers.10.attn.wq", "layers.2.attn.wq", "embed"] {
            map.insert(ParamKey::parse(name), name.len());
        }
        let order: Vec<&str> = map.keys().map(ParamKey::name).collect();
        assert_eq!(order, ["embed", "layers.10.attn.wq", "layers.2.attn.wq"]);
        assert_eq!(map.get("layers.2.attn.wq"), Some(&16));
    }
}
