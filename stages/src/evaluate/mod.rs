//! The `evaluate_*` kinds: LAReQA-style retrieval (mono / cross / multi and
//! language bias), bitext retrieval and ad-hoc retrieval; `bench` times
//! the LAReQA search for `xlpipe bench search`.

pub mod adhoc;
pub mod bench;
pub mod bitext;
pub mod lareqa;
