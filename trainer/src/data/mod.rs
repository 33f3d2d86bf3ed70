//! Data pipeline (see ARCHITECTURE.md).
