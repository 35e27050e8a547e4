//! Neural machine translation: M2M100 / NLLB-200 in burn ([`m2m100`]) and
//! decoding by greedy or beam search ([`generate`]), token for token as
//! transformers' `generate`; [`translator`] puts the tokenizer and
//! length-sorted batches around them for the `translate` stage's `nllb` backend.

pub mod generate;
pub mod m2m100;
pub mod translator;

pub use generate::{generate, EarlyStopping, GenerationConfig};
pub use m2m100::{M2m100, M2m100Config};
pub use translator::{language_token, NeuralTranslator};
