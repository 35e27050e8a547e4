//! Retrieval evaluation: metrics with trec_eval semantics and TREC files.

pub mod adhoc;
pub mod bitext;
pub mod lareqa;
pub mod metrics;
pub mod search;
