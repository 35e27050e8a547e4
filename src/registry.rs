//! The stage kinds this binary knows, and opening a pipeline file against
//! them: shared by the commands ([`crate::cli`]) and the benchmarks
//! ([`crate::bench`]), which both sit above the engine.

use std::path::Path;
use std::sync::Arc;

use xlpipe_stages::Stage;

use crate::pipeline::{self, Pipeline};

/// Every stage kind, from the stages crate's registry.
pub fn kinds() -> Vec<Arc<dyn Stage>> {
    xlpipe_stages::registry()
        .into_iter()
        .map(Arc::from)
        .collect()
}

/// Load, check and expand a pipeline file (errors carry file, line and field).
pub fn open_pipeline(file: &Path) -> anyhow::Result<Pipeline> {
    Ok(pipeline::open(file, &kinds())?)
}
