//! Pipeline files: loading ([`load`]) and validation + grid expansion ([`expand`]).

pub mod expand;
pub mod load;

use std::path::Path;
use std::sync::Arc;

pub use expand::{Instance, Pipeline};
use xlpipe_stage_api::Stage;

use crate::diag::Diagnostics;

/// Load, validate and expand a pipeline file.
pub fn open(path: &Path, kinds: &[Arc<dyn Stage>]) -> Result<Pipeline, Diagnostics> {
    let spec = load::load(path).map_err(Diagnostics)?;
    expand::expand(spec, kinds)
}
