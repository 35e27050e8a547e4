//! The stage kinds of xlpipe, one module each, written against the stage
//! API (`xlpipe-stage-api`) and using the model code (`xlpipe-ml`) and the
//! retrieval evaluation (`xlpipe-eval`). [`kinds`] lists them for the
//! binary's registry; nothing here knows the engine.

pub mod answer_retrieval;
pub mod bench;
pub mod command;
pub mod datasets;
pub mod download;
pub mod encode;
pub mod evaluate;
pub mod export_mteb;
pub mod frozen_states;
pub mod gpu_bench;
pub mod hf_model;
pub mod import;
pub mod model_card;
mod on_device;
pub mod qa_pairs;
pub mod report;
pub mod search_rung;
pub mod train;
pub mod translate;
pub mod validation_retrieval;

use std::sync::Arc;

use xlpipe_stage_api::Stage;

/// Every stage kind, in the order `xlpipe kinds` lists them. A new kind is
/// added here and nowhere else.
///
/// The list lives in this crate, not in the binary, because turning a kind
/// into `dyn Stage` compiles the blanket `Stage` implementation (parsing,
/// validating and serialising its params) where the turning happens: here,
/// that code is optimised in dev builds like the rest of the kinds; in the
/// binary it was not, and `xlpipe bench engine`'s plan ran ~15% slower.
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
        Arc::new(validation_retrieval::ValidationRetrievalStage),
        Arc::new(qa_pairs::QaPairsStage),
        Arc::new(translate::TranslateStage),
        Arc::new(train::TrainStage),
        Arc::new(frozen_states::FrozenStatesStage),
        Arc::new(encode::EncodeStage),
        Arc::new(evaluate::lareqa::EvaluateLareqaStage),
        Arc::new(evaluate::bitext::EvaluateBitextStage),
        Arc::new(evaluate::adhoc::EvaluateAdhocStage),
        Arc::new(report::ReportStage),
        Arc::new(export_mteb::ExportMtebStage),
        Arc::new(model_card::ModelCardStage),
        Arc::new(search_rung::SearchRungStage),
    ]
}
