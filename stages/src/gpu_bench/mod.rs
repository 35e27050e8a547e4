//! `xlpipe bench gpu`: the CUDA path checked against the CPU backend on the
//! same weights, then timed next to PyTorch on the same GPU in the same run.
//!
//! Models are randomly initialised encoders of two shapes, written once as
//! Hugging Face folders so that every side loads the same weights:
//! multilingual-e5-small's (12 x 384) and XLM-R base's (12 x 768), both
//! with the given model's vocabulary and tokenizer. What it prints:
//!
//! - parity: embeddings of the same texts on CUDA (f32, and bf16 weights)
//!   against the CPU backend and against PyTorch (cosines); a short
//!   training run without dropout (the loss at each step) on CUDA, on the
//!   CPU and in PyTorch; greedy decoding of the tiny M2M100 fixture on CUDA
//!   against the CPU and transformers' golden output;
//! - speed: a full fine-tuning step (InfoNCE over in-batch negatives,
//!   AdamW, clipping; as `train` runs it, packed, and as one padded batch)
//!   and encoding throughput, next to sentence-transformers in fp32, TF32
//!   and bf16 autocast; each side's peak device memory (nvidia-smi, above
//!   what the process held before the phase), and the training rate as a
//!   fraction of the bf16 matrix-product rate measured in the same run.
//!
//! The measuring functions are generic over the backend, so the tests run
//! them on the CPU; only [`report`] needs a CUDA build.

use std::path::{Path, PathBuf};

use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use xlpipe_ml::model::{
    load_encoder, save_encoder, Encoder, EncoderConfig, PackedTokens, Pooling, TextTokenizer,
};
use xlpipe_ml::nmt::{generate, EarlyStopping, GenerationConfig, M2m100};
use xlpipe_ml::optim::AdamW;

use crate::bench::bench_words;
use crate::train::{info_nce, scalar};

/// InfoNCE scale (1 / temperature) of every training run here, `train`'s default.
const SCALE: f64 = 20.0;

/// What `xlpipe bench gpu` is asked for.
pub struct GpuBench<'a> {
    /// A Hugging Face encoder folder: its config and tokenizer give the
    /// shapes' vocabulary (its weights are not read).
    pub model: &'a Path,
    /// An M2M100 / NLLB folder with transformers' golden outputs
    /// (`tests/fixtures/tiny-m2m100`).
    pub nmt: &'a Path,
    pub python: &'a str,
    /// Timed training steps (after warm-up steps that also autotune).
    pub steps: usize,
    pub batch: usize,
    /// Texts per timed encoding pass.
    pub texts: usize,
    /// Only these model shapes (`e5-small`, `xlmr-base`); empty: both.
    pub shapes: Vec<String>,
    /// Compute in bf16 on the GPU (the parity checks then give the bf16
    /// figure against the CPU's f32); f32 otherwise.
    pub bf16: bool,
    /// Only xlpipe's timings: no parity checks and no PyTorch (for a
    /// profile: `CUBECL_DEBUG_OPTION=profile CUBECL_DEBUG_LOG=FILE` logs
    /// every kernel's time).
    pub speed_only: bool,
}

/// Write a randomly initialised encoder of `model`'s config with the given
/// sizes (and dropout `dropout`) as a Hugging Face folder `dir/model`.
pub fn random_model(
    model: &Path,
    dir: &Path,
    sizes: (usize, usize, usize),
    dropout: f64,
    seed: u64,
) -> anyhow::Result<PathBuf> {
    use burn::backend::Flex;
    let source = dir.join("source");
    std::fs::create_dir_all(&source)?;
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json"))?)?;
    let (hidden, heads, intermediate) = sizes;
    config["hidden_size"] = hidden.into();
    config["num_attention_heads"] = heads.into();
    config["intermediate_size"] = intermediate.into();
    config["hidden_dropout_prob"] = dropout.into();
    config["attention_probs_dropout_prob"] = dropout.into();
    std::fs::write(
        source.join("config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "sentencepiece.bpe.model",
    ] {
        if model.join(file).is_file() {
            std::fs::copy(model.join(file), source.join(file))?;
        }
    }
    let device = Default::default();
    Flex::seed(&device, seed);
    let encoder: Encoder<Flex> =
        EncoderConfig::from_file(&source.join("config.json"), Pooling::Mean)?.init(&device);
    let out = dir.join("model");
    save_encoder(&encoder, &source, &out)?;
    Ok(out)
}

/// Embeddings `[texts, dim]` (row-major) of `texts` in batches of `batch`,
/// each a padded batch as the encode stage runs it.
pub fn embed_texts<B: Backend>(
    encoder: &Encoder<B>,
    tokenizer: &TextTokenizer,
    texts: &[String],
    max_len: usize,
    batch: usize,
    device: &B::Device,
) -> anyhow::Result<Vec<f32>> {
    let mut out = Vec::new();
    for chunk in texts.chunks(batch) {
        let (ids, mask) = tokenizer.encode(chunk, max_len)?.tensors::<B>(device);
        out.extend(
            encoder
                .embed(ids, mask)
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("reading embeddings: {e:?}"))?,
        );
    }
    Ok(out)
}

/// The smallest and the mean cosine between rows of `a` and `b` (`dim`
/// wide). A NaN anywhere makes both NaN: never a pass.
pub fn cosines(a: &[f32], b: &[f32], dim: usize) -> (f64, f64) {
    if a.len() != b.len() || a.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut all = Vec::new();
    for (x, y) in a.chunks(dim).zip(b.chunks(dim)) {
        let dot: f64 = x.iter().zip(y).map(|(&p, &q)| p as f64 * q as f64).sum();
        let norm = |v: &[f32]| v.iter().map(|&p| p as f64 * p as f64).sum::<f64>().sqrt();
        all.push(dot / (norm(x) * norm(y)));
    }
    if all.iter().any(|c| c.is_nan()) {
        return (f64::NAN, f64::NAN);
    }
    let min = all.iter().copied().fold(f64::INFINITY, f64::min);
    (min, all.iter().sum::<f64>() / all.len() as f64)
}

/// One training batch: queries and their positive passages, prefixed.
pub struct PairBatch {
    pub queries: Vec<String>,
    pub passages: Vec<String>,
}

/// `count` batches of `size` pairs cut from the bench text, every text long
/// enough to fill its cap (`lengths` tokens), no two alike.
pub fn pair_batches(count: usize, size: usize, lengths: (usize, usize)) -> Vec<PairBatch> {
    (0..count)
        .map(|b| PairBatch {
            queries: (0..size)
                .map(|i| format!("query: {}", bench_words(b * size + i, lengths.0, 5)))
                .collect(),
            passages: (0..size)
                .map(|i| format!("passage: {}", bench_words(b * size + i, lengths.1, 3)))
                .collect(),
        })
        .collect()
}

/// How a training step embeds each side: packed tokens (as `train` runs
/// it) or one padded batch (PyTorch's work).
#[derive(Clone, Copy)]
pub enum Layout {
    Packed,
    Padded,
}

/// A training run's losses and its step times (seconds; the first
/// `warmup` steps' times left out).
pub struct TrainRun {
    pub losses: Vec<f64>,
    pub step_seconds: Vec<f64>,
}

/// Full fine-tuning of the encoder in `model` over `batches` (one step
/// each, then again from the first while `steps` lasts): InfoNCE, AdamW
/// (weight decay 0.01, clipping at 1.0) at a constant `lr`.
#[allow(clippy::too_many_arguments)]
pub fn train_steps<B: AutodiffBackend>(
    model: &Path,
    tokenizer: &TextTokenizer,
    batches: &[PairBatch],
    lengths: (usize, usize),
    layout: Layout,
    steps: usize,
    lr: f64,
    device: &B::Device,
) -> anyhow::Result<TrainRun> {
    let mut encoder: Encoder<B> = load_encoder(model, Pooling::Mean, device)?;
    let mut optimizer = AdamW::new(0.01, Some(1.0));
    let side = |encoder: &Encoder<B>, texts: &[String], len: usize| -> anyhow::Result<_> {
        Ok(match layout {
            Layout::Packed => {
                encoder.embed_packed(&PackedTokens::from_rows(&tokenizer.rows(texts, len)?))
            }
            Layout::Padded => {
                let (ids, mask) = tokenizer.encode(texts, len)?.tensors::<B>(device);
                encoder.embed(ids, mask)
            }
        })
    };
    let (mut losses, mut step_seconds) = (Vec::new(), Vec::new());
    for step in 0..steps {
        let batch = &batches[step % batches.len()];
        let clock = std::time::Instant::now();
        let loss = info_nce(
            side(&encoder, &batch.queries, lengths.0)?,
            side(&encoder, &batch.passages, lengths.1)?,
            SCALE,
        );
        // Read as `train` reads it (a finite check each step).
        losses.push(scalar(loss.clone()));
        let grads = GradientsParams::from_grads(loss.backward(), &encoder);
        encoder = optimizer.step(lr, encoder, grads).0;
        // Reading a weight waits for the update to finish on any backend.
        let last = encoder.layers.len() - 1;
        let _ = scalar(encoder.layers[last].output_norm.gamma.val().sum());
        step_seconds.push(clock.elapsed().as_secs_f64());
    }
    Ok(TrainRun {
        losses,
        step_seconds,
    })
}

/// Token ids, one row per sequence.
type TokenRows = Vec<Vec<i64>>;

/// Greedy decoding of the golden sources of an M2M100 fixture
/// (`golden.json`, as `tests/nmt.rs` reads it) on `B`, and transformers'
/// greedy output for the same target language.
pub fn greedy_nmt<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> anyhow::Result<(TokenRows, TokenRows)> {
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("golden.json"))?)?;
    let rows = |v: &serde_json::Value| -> TokenRows {
        v.as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        r.as_array()
                            .map(|r| r.iter().filter_map(|x| x.as_i64()).collect())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (ids, mask) = (rows(&golden["input_ids"]), rows(&golden["attention_mask"]));
    let sources: TokenRows = ids
        .iter()
        .zip(&mask)
        .map(|(row, m)| {
            row.iter()
                .zip(m)
                .filter(|(_, &m)| m == 1)
                .map(|(&t, _)| t)
                .collect()
        })
        .collect();
    let run = golden["generate"]
        .as_array()
        .and_then(|runs| runs.iter().find(|r| r["num_beams"].as_u64() == Some(1)))
        .ok_or_else(|| anyhow::anyhow!("{}: no greedy run in golden.json", dir.display()))?;
    let config = GenerationConfig {
        beams: 1,
        max_length: run["max_length"].as_u64().unwrap_or(12) as usize,
        length_penalty: 1.0,
        early_stopping: EarlyStopping::Heuristic,
    };
    let target = run["forced_bos"].as_i64().unwrap_or_default();
    let model = M2m100::<B>::load(dir, device)?;
    Ok((
        generate(&model, &sources, target, &config),
        rows(&run["output"]),
    ))
}

/// Make bf16 the float type of every tensor created on `device` from now
/// on (`load_encoder` casts the weights to it). burn 0.21 takes a tensor's
/// type from its device's settings, keyed by the device alone: `Cuda<bf16>`
/// on a device first used as `Cuda<f32>` still computes in f32. So this
/// must come before the device's first tensor, and a process computes in
/// one precision per device.
pub fn use_bf16<B: Backend>(device: &B::Device) -> anyhow::Result<()> {
    use burn::tensor::{Element, FloatDType, IntDType};
    burn::tensor::set_default_dtypes::<B>(
        device,
        FloatDType::BF16,
        IntDType::from(<B::IntElem as Element>::dtype()),
    )
    .map_err(|e| anyhow::anyhow!("making bf16 the device's float type: {e:?}"))
}

/// The median of `values` (NaN when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// FLOPs of one full fine-tuning step of an encoder (`layers` x `hidden`,
/// intermediate `inner`) on `batch` sequences of `len` tokens, counting the
/// matrix products (dense layers and attention) forward and backward (3x
/// the forward's).
pub fn train_flops(layers: usize, hidden: usize, inner: usize, batch: usize, len: usize) -> f64 {
    let tokens = (batch * len) as f64;
    let (h, i) = (hidden as f64, inner as f64);
    let dense = 2.0 * tokens * (4.0 * h * h + 2.0 * h * i);
    let attention = 4.0 * tokens * len as f64 * h;
    3.0 * layers as f64 * (dense + attention)
}

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::report;

/// Without CUDA in the build there is nothing to measure.
#[cfg(not(feature = "cuda"))]
pub fn report(_: &GpuBench) -> anyhow::Result<String> {
    anyhow::bail!(
        "this xlpipe was built without CUDA: build it with `cargo build --release --features cuda`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};

    /// A base folder as `random_model` reads it: an XLM-R config and tokenizer.
    fn base(dir: &Path) -> PathBuf {
        let base = dir.join("base");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(
            base.join("config.json"),
            r#"{"model_type": "xlm-roberta", "vocab_size": 250002, "hidden_size": 16,
                "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
                "max_position_embeddings": 130, "type_vocab_size": 1, "pad_token_id": 1,
                "layer_norm_eps": 1e-5, "hidden_act": "gelu"}"#,
        )
        .unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/derived/tokenizers/xlm-roberta.tokenizer.json"),
            base.join("tokenizer.json"),
        )
        .unwrap();
        base
    }

    #[test]
    fn a_random_model_loads_and_embeds_alike_in_both_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let model = random_model(&base(dir.path()), dir.path(), (32, 4, 64), 0.0, 3).unwrap();
        let tokenizer = TextTokenizer::for_model(&model).unwrap();
        let device = Default::default();
        let encoder: Encoder<Flex> = load_encoder(&model, Pooling::Mean, &device).unwrap();
        assert_eq!(encoder.embeddings.word.weight.dims()[1], 32);
        let texts: Vec<String> = (0..5).map(|i| bench_words(i, 3 + 4 * i, 7)).collect();
        let whole = embed_texts(&encoder, &tokenizer, &texts, 16, 5, &device).unwrap();
        let split = embed_texts(&encoder, &tokenizer, &texts, 16, 2, &device).unwrap();
        let (min, mean) = cosines(&whole, &split, 32);
        assert!(min > 0.99999 && mean <= 1.0 + 1e-9, "{min} {mean}");
        // Unrelated vectors are told apart; a NaN is never a pass.
        let shifted: Vec<f32> = whole.iter().skip(32).chain(&whole[..32]).copied().collect();
        assert!(cosines(&whole, &shifted, 32).0 < 0.999);
        let mut broken = whole.clone();
        broken[3] = f32::NAN;
        assert!(cosines(&whole, &broken, 32).0.is_nan());
    }

    #[test]
    fn packed_and_padded_training_give_one_loss_curve() {
        type B = Autodiff<Flex>;
        let dir = tempfile::tempdir().unwrap();
        let model = random_model(&base(dir.path()), dir.path(), (32, 4, 64), 0.0, 5).unwrap();
        let tokenizer = TextTokenizer::for_model(&model).unwrap();
        let batches = pair_batches(2, 4, (8, 16));
        let device = Default::default();
        let run = |layout| {
            train_steps::<B>(
                &model,
                &tokenizer,
                &batches,
                (8, 16),
                layout,
                4,
                1e-3,
                &device,
            )
            .unwrap()
        };
        let (packed, padded) = (run(Layout::Packed), run(Layout::Padded));
        assert_eq!(packed.losses.len(), 4);
        for (a, b) in packed.losses.iter().zip(&padded.losses) {
            assert!(
                (a - b).abs() < 1e-4,
                "{:?} vs {:?}",
                packed.losses,
                padded.losses
            );
        }
        // It trains: the loss on the first batch fell by its second visit.
        assert!(packed.losses[2] < packed.losses[0], "{:?}", packed.losses);
    }

    #[test]
    fn greedy_decoding_matches_the_golden_output_on_the_cpu() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-m2m100");
        let (ours, golden) = greedy_nmt::<Flex>(&fixture, &Default::default()).unwrap();
        assert!(!golden.is_empty());
        assert_eq!(ours, golden);
    }

    #[test]
    fn training_flops_count_the_products() {
        // One layer, hidden 2, inner 4, one sequence of one token:
        // 2 * (16 + 16) + 4 * 2 = 72 forward, x3.
        assert_eq!(train_flops(1, 2, 4, 1, 1), 216.0);
    }
}
