//! The text encoder: a BERT / XLM-R model in burn, loaded from and saved to
//! Hugging Face folders (`config.json`, `model.safetensors`,
//! `tokenizer.json`).

pub mod config;
pub mod encoder;
pub mod load;
pub mod tokenize;

pub use config::{EncoderConfig, Pooling};
pub use encoder::Encoder;
pub use load::{load_encoder, save_encoder};
pub use tokenize::{TextTokenizer, TokenBatch};

/// Fail cleanly, instead of panicking on a device thread, where no CUDA
/// driver or device can be used.
#[cfg(feature = "cuda")]
pub fn cuda_available() -> anyhow::Result<()> {
    use burn::backend::cuda::CudaDevice;
    use burn::backend::Cuda;
    let probe = std::panic::catch_unwind(|| {
        let device = CudaDevice::new(0);
        burn::tensor::Tensor::<Cuda, 1>::zeros([1], &device).into_data()
    });
    probe.map(|_| ()).map_err(|_| {
        anyhow::anyhow!(
            "no usable CUDA device (is the NVIDIA driver installed?); use device = \"cpu\""
        )
    })
}
