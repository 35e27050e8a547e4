//! Hugging Face safetensors weights into the burn encoder and back.
//!
//! HF names (`encoder.layer.3.attention.self.query.weight`, optionally under
//! `bert.` / `roberta.`) are mapped onto the encoder's field paths
//! (`layers.3.query.weight`); burn-store's PyTorch adapter transposes linear
//! weights and renames LayerNorm `weight`/`bias` to `gamma`/`beta`. Loading
//! insists that every encoder tensor was found.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::store::{
    ApplyResult, BurnToPyTorchAdapter, KeyRemapper, ModuleSnapshot, PyTorchToBurnAdapter,
    SafetensorsStore, TensorSnapshot,
};
use burn::tensor::backend::Backend;
use burn::tensor::DType;

use super::config::{EncoderConfig, Pooling};
use super::encoder::Encoder;

/// (HF name pattern, encoder path) pairs.
const HF_TO_BURN: &[(&str, &str)] = &[
    (r"^(bert|roberta|model)\.", ""),
    (r"^embeddings\.word_embeddings\.", "embeddings.word."),
    (
        r"^embeddings\.position_embeddings\.",
        "embeddings.position.",
    ),
    (
        r"^embeddings\.token_type_embeddings\.",
        "embeddings.token_type.",
    ),
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (
        r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.",
        "layers.$1.$2.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.",
        "layers.$1.attention_out.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.",
        "layers.$1.attention_norm.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.intermediate\.dense\.",
        "layers.$1.intermediate.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.output\.dense\.",
        "layers.$1.output.",
    ),
    (
        r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.",
        "layers.$1.output_norm.",
    ),
];

const BURN_TO_HF: &[(&str, &str)] = &[
    (r"^embeddings\.word\.", "embeddings.word_embeddings."),
    (
        r"^embeddings\.position\.",
        "embeddings.position_embeddings.",
    ),
    (
        r"^embeddings\.token_type\.",
        "embeddings.token_type_embeddings.",
    ),
    (r"^embeddings\.norm\.", "embeddings.LayerNorm."),
    (
        r"^layers\.(\d+)\.(query|key|value)\.",
        "encoder.layer.$1.attention.self.$2.",
    ),
    (
        r"^layers\.(\d+)\.attention_out\.",
        "encoder.layer.$1.attention.output.dense.",
    ),
    (
        r"^layers\.(\d+)\.attention_norm\.",
        "encoder.layer.$1.attention.output.LayerNorm.",
    ),
    (
        r"^layers\.(\d+)\.intermediate\.",
        "encoder.layer.$1.intermediate.dense.",
    ),
    (
        r"^layers\.(\d+)\.output\.",
        "encoder.layer.$1.output.dense.",
    ),
    (
        r"^layers\.(\d+)\.output_norm\.",
        "encoder.layer.$1.output.LayerNorm.",
    ),
];

/// HF tensors the encoder does not use.
fn unused_is_fine(name: &str) -> bool {
    name.starts_with("pooler.")
        || name.ends_with("position_ids")
        || name.starts_with("lm_head.")
        || name.starts_with("cls.")
}

/// The `model.safetensors` of a Hugging Face model folder.
pub fn safetensors_file(dir: &Path) -> anyhow::Result<PathBuf> {
    let weights = dir.join("model.safetensors");
    anyhow::ensure!(
        weights.is_file(),
        "{} has no model.safetensors",
        dir.display()
    );
    Ok(weights)
}

/// Load the tensors of a Hugging Face safetensors file into `module`, their
/// names mapped by `names`. Every tensor the module has must be found (an
/// error lists those that were not, naming the module as `what`); the
/// result tells which of the file's tensors went unused.
pub fn load_safetensors<B: Backend, M: ModuleSnapshot<B>>(
    module: &mut M,
    weights: &Path,
    names: KeyRemapper,
    what: &str,
) -> anyhow::Result<ApplyResult> {
    let mut store = SafetensorsStore::from_file(weights)
        .remap(names)
        .with_from_adapter(PyTorchToBurnAdapter)
        .allow_partial(true);
    let result = module
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("loading {}: {e:?}", weights.display()))?;
    anyhow::ensure!(
        result.errors.is_empty(),
        "loading {}: {:?}",
        weights.display(),
        result.errors
    );
    anyhow::ensure!(
        result.missing.is_empty(),
        "{} lacks {what} tensors: {:?}",
        weights.display(),
        result.missing.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    Ok(result)
}

/// Load the encoder of a Hugging Face model folder.
pub fn load_encoder<B: Backend>(
    dir: &Path,
    pooling: Pooling,
    device: &B::Device,
) -> anyhow::Result<Encoder<B>> {
    let config = EncoderConfig::from_file(&dir.join("config.json"), pooling)?;
    let mut encoder = config.init::<B>(device);
    let weights = safetensors_file(dir)?;
    let result = load_safetensors(
        &mut encoder,
        &weights,
        KeyRemapper::from_patterns(HF_TO_BURN.to_vec())?,
        "encoder",
    )?;
    // burn-store finds LayerNorm gamma/beta under their PyTorch names but
    // still lists those names as unused: they were used if the twin applied.
    let applied_as = |name: &str| {
        let twin = name
            .strip_suffix(".weight")
            .map(|stem| format!("{stem}.gamma"))
            .or_else(|| {
                name.strip_suffix(".bias")
                    .map(|stem| format!("{stem}.beta"))
            });
        twin.is_some_and(|t| result.applied.contains(&t))
    };
    let unexpected: Vec<&String> = result
        .unused
        .iter()
        .filter(|n| !unused_is_fine(n) && !applied_as(n))
        .collect();
    anyhow::ensure!(
        unexpected.is_empty(),
        "{} has tensors the encoder does not know: {unexpected:?}",
        weights.display()
    );
    tracing::debug!(
        "loaded {} tensors from {}",
        result.applied.len(),
        weights.display()
    );
    Ok(encoder)
}

/// Write `encoder` as a Hugging Face folder: `model.safetensors` plus the
/// config and tokenizer files of the folder it came from.
pub fn save_encoder<B: Backend>(
    encoder: &Encoder<B>,
    source: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "sentencepiece.bpe.model",
    ] {
        let from = source.join(file);
        if from.is_file() {
            std::fs::copy(&from, dir.join(file))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    // Each tensor is read out of the encoder only when the writer reaches
    // it, and written straight to the file: a model is hundreds of
    // megabytes, and collecting it in memory first (burn-store's in-memory
    // store) copied it three times into fresh memory before writing.
    let snapshots = encoder.collect(None, Some(Box::new(BurnToPyTorchAdapter)), false);
    let (snapshots, _) = KeyRemapper::from_patterns(BURN_TO_HF.to_vec())?.remap(snapshots);
    let mut weights = Vec::with_capacity(snapshots.len());
    for snapshot in snapshots {
        anyhow::ensure!(
            snapshot.dtype == DType::F32,
            "{}: tensor {} is {:?}; models are saved in f32",
            dir.display(),
            snapshot.full_path(),
            snapshot.dtype
        );
        weights.push((snapshot.full_path(), Weight::Encoder(snapshot)));
    }
    write_weights(
        &source.join("model.safetensors"),
        weights,
        &dir.join("model.safetensors"),
    )
}

/// A tensor of a saved model: the encoder's own (materialised when
/// written) or one passed through from the source file.
enum Weight<'a> {
    Encoder(TensorSnapshot),
    Source(safetensors::tensor::TensorView<'a>),
}

impl safetensors::View for Weight<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            // Checked by save_encoder.
            Weight::Encoder(_) => safetensors::Dtype::F32,
            Weight::Source(view) => view.dtype(),
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Weight::Encoder(snapshot) => &snapshot.shape,
            Weight::Source(view) => view.shape(),
        }
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            // The trait has no error path; a tensor held in memory reads
            // out (burn-store's own writer panics the same way).
            Weight::Encoder(snapshot) => std::borrow::Cow::Owned(
                snapshot
                    .to_data()
                    .unwrap_or_else(|e| panic!("reading tensor {}: {e:?}", snapshot.full_path()))
                    .as_bytes()
                    .to_vec(),
            ),
            Weight::Source(view) => std::borrow::Cow::Borrowed(view.data()),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Weight::Encoder(snapshot) => snapshot.data_len(),
            Weight::Source(view) => view.data_len(),
        }
    }
}

/// Write `weights` with the source's pooler (which the encoder
/// neither uses nor trains; transformers' `BertModel`, and so
/// sentence-transformers, expects one and warns about "newly initialized"
/// weights when it is missing) and one metadata entry, PyTorch's
/// `format = "pt"` (burn's writer adds its own entries from a hash map, in
/// a random order: equal weights saved twice would differ in bytes, and so
/// in content hash, and everything downstream would rerun). The file
/// format orders tensors by dtype and name, whatever order they come in.
fn write_weights(
    source: &Path,
    weights: Vec<(String, Weight<'_>)>,
    to: &Path,
) -> anyhow::Result<()> {
    use safetensors::SafeTensors;
    // Mapped, not read: only the pooler's few tensors are wanted.
    let source_map = std::fs::File::open(source)
        .ok()
        .and_then(|file| unsafe { memmap2::Mmap::map(&file) }.ok());
    let source_tensors = source_map
        .as_deref()
        .and_then(|bytes| SafeTensors::deserialize(bytes).ok());
    let pooler: Vec<_> = source_tensors
        .iter()
        .flat_map(|tensors| tensors.tensors())
        .filter_map(|(name, view)| {
            let bare = name
                .strip_prefix("bert.")
                .or_else(|| name.strip_prefix("roberta."))
                .unwrap_or(&name);
            bare.starts_with("pooler.")
                .then(|| (bare.to_string(), Weight::Source(view)))
        })
        .collect();
    let all = weights.into_iter().chain(pooler);
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let partial = to.with_extension("safetensors.partial");
    safetensors::serialize_to_file(all, Some(metadata), &partial)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, to)?;
    Ok(())
}
