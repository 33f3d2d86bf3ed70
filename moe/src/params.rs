//! Named access to a module's float parameters.
//!
//! burn identifies parameters by random `ParamId`s; Switchyard names them by their module
//! path (`layers.3.ffn.experts.5.w_up`), which is stable across runs, layouts and
//! placements. Checkpoints, the optimizer state and gradient synchronisation all key on
//! these names.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Gradients, Tensor};

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
    fn current(&self) -> String {
        self.0.join(".")
    }
}

/// Name, shape and value of every float parameter, in visiting order.
pub fn named_params<M: Module>(module: &M) -> Vec<(String, Vec<usize>, Tensor<1>)> {
    struct Collect {
        path: Path,
        out: Vec<(String, Vec<usize>, Tensor<1>)>,
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
pub fn named_grads<M: Module>(module: &M, grads: &Gradients) -> BTreeMap<String, Tensor<1>> {
    struct Collect<'a> {
        path: Path,
        grads: &'a Gradients,
        out: BTreeMap<String, Tensor<1>>,
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
pub fn map_params<M: Module>(module: M, f: impl FnMut(&str, Tensor<1>) -> Tensor<1>) -> M {
    struct Map<F> {
        path: Path,
        f: F,
    }
    impl<F: FnMut(&str, Tensor<1>) -> Tensor<1>> ModuleMapper for Map<F> {
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
        text.push_str(&format!("{name}:{shape:?};"));
    }
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}
