//! Retrieval evaluation: metrics with trec_eval semantics and TREC files.

pub mod metrics;
