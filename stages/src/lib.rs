//! The stage kinds of xlpipe, one module each, written against the stage
//! API (`xlpipe-stage-api`) and using the model code (`xlpipe-ml`) and the
//! retrieval evaluation (`xlpipe-eval`). The binary's registry lists them;
//! nothing here knows the engine.

pub mod answer_retrieval;
pub mod bench;
pub mod command;
pub mod datasets;
pub mod download;
pub mod encode;
pub mod evaluate;
pub mod frozen_states;
pub mod hf_model;
pub mod import;
mod on_device;
pub mod qa_pairs;
pub mod report;
pub mod train;
pub mod translate;
