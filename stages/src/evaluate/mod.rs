//! The `evaluate_*` kinds: LAReQA-style retrieval (mono / cross / multi and
//! language bias), bitext retrieval and ad-hoc retrieval.

pub mod adhoc;
pub mod bitext;
pub mod lareqa;
