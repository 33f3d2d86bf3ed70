//! Deterministic parameter initialisation from a seeded host RNG.
//!
//! Parameters are drawn on the host from ChaCha8 streams keyed by the run seed, so every rank
//! of every layout builds bit-identical weights without broadcasting them, and a model does
//! not depend on the backend's RNG.

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Hands out one independent RNG stream per parameter, in construction order.
pub struct Initializer {
    seed: u64,
    next_stream: u64,
    pub std: f64,
    pub device: Device,
}

impl Initializer {
    pub fn new(seed: u64, std: f64, device: &Device) -> Self {
        Self {
            seed,
            next_stream: 0,
            std,
            device: device.clone(),
        }
    }

    fn rng(&mut self) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(self.next_stream);
        self.next_stream += 1;
        rng
    }

    /// Normal(0, std) weights.
    pub fn normal<const D: usize>(&mut self, shape: [usize; D]) -> Param<Tensor<D>> {
        self.normal_with_std(shape, self.std)
    }

    pub fn normal_with_std<const D: usize>(
        &mut self,
        shape: [usize; D],
        std: f64,
    ) -> Param<Tensor<D>> {
        let mut rng = self.rng();
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| (standard_normal(&mut rng) * std) as f32)
            .collect();
        Param::from_tensor(Tensor::from_data(
            TensorData::new(values, shape),
            &self.device,
        ))
    }

    pub fn ones<const D: usize>(&mut self, shape: [usize; D]) -> Param<Tensor<D>> {
        // Consume a stream anyway so adding a norm does not shift the later streams' meaning.
        let _ = self.rng();
        Param::from_tensor(Tensor::ones(shape, &self.device))
    }
}

/// Box-Muller; exact enough for initialisation and free of extra dependencies.
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0f64 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
