//! Checkpoints (see ARCHITECTURE.md).
