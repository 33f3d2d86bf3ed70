//! switchyard-trainer: model assembly, data pipeline, optimizer and schedule, train loop,
//! evaluation, checkpoint/resume, metrics and the throughput benchmark.

pub mod ablation;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod distributed;
pub mod metrics;
pub mod optim;
pub mod parity;
pub mod train;
