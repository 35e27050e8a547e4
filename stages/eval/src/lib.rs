//! Retrieval evaluation: stored embeddings read back, exact search,
//! metrics with trec_eval semantics and TREC files, the one results format
//! every evaluation writes, and the statistics of result tables
//! (confidence intervals, paired bootstrap).
//!
//! It knows no stage kind and runs no model: vectors and judgements in,
//! numbers out.

pub mod embeddings;
pub mod metrics;
pub mod results;
pub mod search;
pub mod stats;
