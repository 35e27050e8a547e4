//! Neural machine translation: M2M100 / NLLB-200 in burn ([`m2m100`]) and
//! decoding by greedy or beam search ([`generate`]), token for token as
//! transformers' `generate`.

pub mod generate;
pub mod m2m100;

pub use generate::{generate, EarlyStopping, GenerationConfig};
pub use m2m100::{M2m100, M2m100Config};
