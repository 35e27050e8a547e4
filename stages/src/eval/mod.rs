//! Retrieval evaluation: metrics with trec_eval semantics and TREC files.

pub mod lareqa;
pub mod metrics;
