//! xlpipe: a declarative pipeline runner for multilingual retrieval research.
//!
//! See ARCHITECTURE.md for the map: a pipeline file is loaded and expanded
//! over its grid ([`pipeline`]), planned against the content-addressed
//! [`cache`] ([`plan`]) and executed ([`run`]) here or on Slurm ([`slurm`]);
//! stage kinds live in the `xlpipe-stages` crate behind one trait.

pub mod bench;
pub mod cache;
pub mod cli;
pub mod dag;
pub mod diag;
pub mod executor;
pub mod hashing;
pub mod interrupt;
pub mod logging;
pub mod maintenance;
pub mod pipeline;
pub mod plan;
pub mod registry;
pub mod run;
pub mod search;
pub mod slurm;
pub mod task;
