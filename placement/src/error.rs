use std::path::PathBuf;

pub type Result<T, E = PlacementError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// A malformed problem or statistics (sizes that do not fit together).
    #[error("{0}")]
    Invalid(String),
    #[error("placement plan {path}: {message}")]
    PlanFile { path: PathBuf, message: String },
    #[error("routing statistics {path}: {message}")]
    StatsFile { path: PathBuf, message: String },
    #[error(
        "the ILP solver `{0}` is not compiled in; rebuild with `--features switchyard-placement/{0}` or set placement.strategy.solver: microlp"
    )]
    SolverUnavailable(&'static str),
}
