//! Metrics sinks (see ARCHITECTURE.md).
