//! The text encoder: a BERT / XLM-R model in burn, loaded from and saved to
//! Hugging Face folders (`config.json`, `model.safetensors`,
//! `tokenizer.json`).

pub mod config;
pub mod cpu_kernels;
pub mod device;
pub mod encoder;
pub mod load;
pub mod tokenize;

pub use config::{EncoderConfig, Pooling};
pub use device::{DeviceChoice, OnBackend};
pub use encoder::Encoder;
pub use load::{load_encoder, save_encoder};
pub use tokenize::{PackedTokens, TextTokenizer, TokenBatch};
