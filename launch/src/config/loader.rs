//! YAML config loading (see ARCHITECTURE.md).
