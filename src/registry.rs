//! The stage kinds this binary knows, and opening a pipeline file against
//! them: shared by the commands ([`crate::cli`]) and the benchmarks
//! ([`crate::bench`]), which both sit above the engine.

use std::path::Path;
use std::sync::Arc;

use xlpipe_stage_api::Stage;

use crate::pipeline::{self, Pipeline};

/// Every stage kind this build knows, in the order `xlpipe kinds` lists
/// them: the list that `xlpipe-stages` keeps, since the kinds are turned
/// into `dyn Stage` there (see [`xlpipe_stages::kinds`]).
pub fn kinds() -> Vec<Arc<dyn Stage>> {
    xlpipe_stages::kinds()
}

/// Load, check and expand a pipeline file (errors carry file, line and field).
pub fn open_pipeline(file: &Path) -> anyhow::Result<Pipeline> {
    Ok(pipeline::open(file, &kinds())?)
}
