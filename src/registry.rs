//! The stage kinds this binary knows, and opening a pipeline file against
//! them: shared by the commands ([`crate::cli`]) and the benchmarks
//! ([`crate::bench`]), which both sit above the engine.

use std::path::Path;
use std::sync::Arc;

use xlpipe_stage_api::Stage;
use xlpipe_stages::{
    answer_retrieval, command, datasets, download, encode, evaluate, frozen_states, hf_model,
    import, qa_pairs, report, train, translate,
};

use crate::pipeline::{self, Pipeline};

/// Every stage kind this build knows, in the order `xlpipe kinds` lists
/// them. A new kind is added here and nowhere else in the engine.
pub fn kinds() -> Vec<Arc<dyn Stage>> {
    vec![
        Arc::new(command::CommandStage),
        Arc::new(download::DownloadStage),
        Arc::new(import::ImportStage),
        Arc::new(hf_model::HfModelStage),
        Arc::new(datasets::squad::SquadStage),
        Arc::new(datasets::lareqa::LareqaStage),
        Arc::new(datasets::parallel::ParallelStage),
        Arc::new(datasets::miracl::MiraclStage),
        Arc::new(answer_retrieval::AnswerRetrievalStage),
        Arc::new(qa_pairs::QaPairsStage),
        Arc::new(translate::TranslateStage),
        Arc::new(train::TrainStage),
        Arc::new(frozen_states::FrozenStatesStage),
        Arc::new(encode::EncodeStage),
        Arc::new(evaluate::lareqa::EvaluateLareqaStage),
        Arc::new(evaluate::bitext::EvaluateBitextStage),
        Arc::new(evaluate::adhoc::EvaluateAdhocStage),
        Arc::new(report::ReportStage),
    ]
}

/// Load, check and expand a pipeline file (errors carry file, line and field).
pub fn open_pipeline(file: &Path) -> anyhow::Result<Pipeline> {
    Ok(pipeline::open(file, &kinds())?)
}
