//! switchyard-trainer: model assembly, data pipeline, optimizer and schedule, train loop,
//! evaluation, checkpoint/resume and metrics.

pub mod checkpoint;
pub mod data;
pub mod metrics;
