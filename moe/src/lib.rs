//! switchyard-moe: single-device model code — routers, experts, dispatch plans, auxiliary
//! losses, the `TokenDispatcher` seam (with the communication-free `LocalDispatcher`), and
//! the decoder-only transformer that uses them. Knows nothing about communication.

pub mod attention;
pub mod config;
pub mod dispatch;
pub mod experts;
pub mod init;
pub mod layer;
pub mod model;
pub mod params;
pub mod profile;
pub mod recompute;
pub mod router;

pub use attention::{AttentionImpl, DenseAttention};
pub use config::{
    CapacityConfig, ModelConfig, MoeConfig, RouterConfig, SharedExpertConfig, SlotKind,
};
pub use dispatch::{BatchPosition, BatchReducer, LocalDispatcher, LocalReducer, TokenDispatcher};
pub use layer::{MoeLayer, MoeStats};
pub use model::{KvCache, Transformer, cross_entropy};
pub use params::{Component, ParamKey};
pub use recompute::ActivationCheckpointing;
pub use switchyard_kernels::precision::{self, Precision};
