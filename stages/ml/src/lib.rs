//! The model code of xlpipe: the text encoder (burn modules and fused CPU
//! kernels), M2M100 / NLLB translation, the matrix product on host buffers,
//! PyTorch's AdamW, and the one random number generator.
//!
//! It knows nothing of pipelines or data files (no polars, no stage API):
//! tensors, tokenizers and model folders in, tensors and model folders out.

pub mod cpu;
pub mod matmul;
pub mod model;
pub mod nmt;
pub mod optim;
pub mod rng;
pub mod vector;
