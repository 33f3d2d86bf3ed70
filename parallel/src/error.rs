//! Errors of the parallel layer: each names what is wrong, where, and what to change.

use switchyard_comm::CommError;

pub type Result<T, E = ParallelError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum ParallelError {
    #[error(
        "mesh: dp ({dp}) x cp ({cp}) x ep ({ep}) = {product} ranks, but the world communicator \
         `{world_name}` has {world} ranks; choose dp, cp and ep whose product is {world} (e.g. \
         dp = {world}, cp = 1, ep = 1)"
    )]
    WorldSize {
        dp: usize,
        cp: usize,
        ep: usize,
        product: usize,
        world: usize,
        world_name: String,
    },
    #[error("mesh: {axis} must be at least 1 (got 0); use 1 to disable this kind of parallelism")]
    ZeroAxis { axis: &'static str },
    #[error(
        "mesh: ep = {ep} does not divide the number of experts ({experts}); choose an ep that \
         divides {experts} (divisors: {divisors:?})"
    )]
    EpDoesNotDivide {
        ep: usize,
        experts: usize,
        divisors: Vec<usize>,
    },
    #[error("placement: {0}")]
    Placement(String),
    #[error("parallelize: {0}")]
    Model(String),
    #[error("{0}")]
    Agreement(String),
    #[error("{what}: {detail}")]
    Shape { what: String, detail: String },
    #[error("{op}: {source}")]
    Comm {
        op: String,
        #[source]
        source: Box<CommError>,
    },
    #[error(
        "{op}: {detail}; build with the feature of that backend (`cuda`, `wgpu`), or add the \
         backend to `parallel/src/autodiff.rs`"
    )]
    UnsupportedBackend { op: String, detail: String },
}

impl ParallelError {
    /// Whether this error only reports another rank's failure (see
    /// `CommError::is_consequence`).
    pub fn is_consequence(&self) -> bool {
        matches!(self, ParallelError::Comm { source, .. } if source.is_consequence())
    }

    pub(crate) fn comm(op: impl Into<String>) -> impl FnOnce(CommError) -> ParallelError {
        let op = op.into();
        move |source| ParallelError::Comm {
            op,
            source: Box::new(source),
        }
    }
}
