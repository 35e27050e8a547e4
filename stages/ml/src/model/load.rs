//! Hugging Face safetensors weights into the burn encoder and back.
//!
//! HF names (`encoder.layer.3.attention.self.query.weight`, optionally under
//! `bert.` / `roberta.`) are mapped onto the encoder's field paths
//! (`layers.3.query.weight`); burn-store's PyTorch adapter transposes linear
//! weights and renames LayerNorm `weight`/`bias` to `gamma`/`beta`. Loading
//! insists that every encoder tensor was found.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::store::{
    ApplyResult, BurnToPyTorchAdapter, KeyRemapper, ModuleSnapshot, PyTorchToBurnAdapter,
    SafetensorsStore, TensorSnapshot,
};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use super::config::{EncoderConfig, Pooling};
use super::encoder::{for_each_row_block, Encoder, ROW_BLOCK_VALUES};

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
    // The file's f32 stays f32 through burn-store, whatever float type the
    // device makes its tensors in (bf16 where `set_default_dtypes` says so):
    // the weights follow the device, or bf16 activations would meet f32
    // weights.
    let float: DType = burn::tensor::get_device_settings::<B>(device)
        .float_dtype
        .into();
    Ok(burn::module::Module::map(encoder, &mut CastFloats(float)))
}

/// Casts every float parameter to one type (those already in it untouched).
struct CastFloats(DType);

impl<B: Backend> burn::module::ModuleMapper<B> for CastFloats {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<B, D>>,
    ) -> burn::module::Param<Tensor<B, D>> {
        if param.val().dtype() == self.0 {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        burn::module::Param::from_mapped_value(id, tensor.cast(self.0), mapper)
    }
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
        let name = snapshot.full_path();
        // The word embedding is most of a model's bytes (384 MB of 470 in
        // mE5-small), and the adapter passes it through as it is: written
        // in row blocks, it never sits in memory whole a second time.
        let weight = if name == WORD_EMBEDDING {
            Weight::Rows(encoder.embeddings.word.weight.val())
        } else {
            Weight::Snapshot(snapshot)
        };
        weights.push((name, weight));
    }
    write_weights(
        &source.join("model.safetensors"),
        weights,
        &dir.join("model.safetensors"),
    )
}

/// The HF name of the word embedding (after `BURN_TO_HF`).
const WORD_EMBEDDING: &str = "embeddings.word_embeddings.weight";

/// A tensor of a saved model, all f32 but the source's pooler.
enum Weight<'a, B: Backend> {
    /// Read out of the encoder through burn-store's adapter (which
    /// transposes linear weights) when the writer reaches it.
    Snapshot(TensorSnapshot),
    /// An encoder tensor stored as it is, written a block of rows at a time.
    Rows(Tensor<B, 2>),
    /// Passed through from the source file.
    Source(safetensors::tensor::TensorView<'a>),
}

impl<B: Backend> Weight<'_, B> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Weight::Snapshot(_) | Weight::Rows(_) => safetensors::Dtype::F32,
            Weight::Source(view) => view.dtype(),
        }
    }

    fn shape(&self) -> Vec<usize> {
        match self {
            Weight::Snapshot(snapshot) => snapshot.shape.to_vec(),
            Weight::Rows(tensor) => tensor.dims().to_vec(),
            Weight::Source(view) => view.shape().to_vec(),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Weight::Snapshot(snapshot) => snapshot.data_len(),
            Weight::Rows(tensor) => tensor.shape().num_elements() * 4,
            Weight::Source(view) => view.data().len(),
        }
    }

    fn write_to(&self, out: &mut impl Write, block_values: usize) -> anyhow::Result<()> {
        match self {
            Weight::Snapshot(snapshot) => {
                let data = snapshot.to_data().map_err(|e| {
                    anyhow::anyhow!("reading tensor {}: {e:?}", snapshot.full_path())
                })?;
                out.write_all(data.as_bytes())?;
            }
            Weight::Rows(tensor) => {
                for_each_row_block(tensor, block_values, |bytes| out.write_all(bytes))?
            }
            Weight::Source(view) => out.write_all(view.data())?,
        }
        Ok(())
    }
}

/// Write `weights` with the source's pooler (which the encoder
/// neither uses nor trains; transformers' `BertModel`, and so
/// sentence-transformers, expects one and warns about "newly initialized"
/// weights when it is missing) and one metadata entry, PyTorch's
/// `format = "pt"` (burn's writer adds its own entries from a hash map, in
/// a random order: equal weights saved twice would differ in bytes, and so
/// in content hash, and everything downstream would rerun).
fn write_weights<B: Backend>(
    source: &Path,
    weights: Vec<(String, Weight<'_, B>)>,
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
    let mut all: Vec<_> = weights.into_iter().chain(pooler).collect();
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let partial = to.with_extension("safetensors.partial");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&partial)
            .with_context(|| format!("creating {}", partial.display()))?,
    );
    write_safetensors(&mut all, metadata, ROW_BLOCK_VALUES, &mut out)
        .and_then(|()| Ok(out.flush()?))
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, to)?;
    Ok(())
}

/// The safetensors format as the `safetensors` crate writes it (tensors
/// ordered by descending dtype, then name; the JSON header padded with
/// spaces to 8 bytes), so a model's bytes do not depend on which writer
/// made them; but each tensor is written as the writer reaches it, some in
/// blocks, where the crate's writer wants each tensor whole in memory.
fn write_safetensors<B: Backend>(
    weights: &mut [(String, Weight<'_, B>)],
    metadata: std::collections::HashMap<String, String>,
    block_values: usize,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    use safetensors::tensor::{Metadata, TensorInfo};
    weights.sort_by(|(left_name, left), (right_name, right)| {
        right
            .dtype()
            .cmp(&left.dtype())
            .then(left_name.cmp(right_name))
    });
    let mut offset = 0;
    let mut infos = Vec::with_capacity(weights.len());
    for (name, weight) in weights.iter() {
        let len = weight.data_len();
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: weight.dtype(),
                shape: weight.shape(),
                data_offsets: (offset, offset + len),
            },
        ));
        offset += len;
    }
    let header = Metadata::new(Some(metadata), infos)?;
    let mut header = serde_json::to_string(&header)?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for (_, weight) in weights.iter() {
        weight.write_to(out, block_values)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    /// The writer's bytes are the `safetensors` crate's own serialisation
    /// of the same tensors, for a tensor written in row blocks (the last
    /// one short) as for one written whole.
    #[test]
    fn the_writer_writes_what_the_safetensors_crate_writes() {
        let device = Default::default();
        let values = |n: usize, scale: f32| -> Vec<f32> {
            (0..n).map(|i| (i as f32 * scale).sin()).collect()
        };
        let rows =
            Tensor::<Flex, 2>::from_data(TensorData::new(values(37 * 5, 0.7), [37, 5]), &device);
        let small = Tensor::<Flex, 1>::from_data(TensorData::new(values(6, 1.3), [6]), &device);
        let snapshot = TensorSnapshot::from_float(
            &small,
            vec!["b".to_string()],
            vec![],
            burn::module::ParamId::new(),
        );
        let metadata =
            || std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        for block_values in [10, usize::MAX] {
            let mut weights = vec![
                ("z.rows".to_string(), Weight::Rows(rows.clone())),
                ("a.small".to_string(), Weight::Snapshot(snapshot.clone())),
            ];
            let mut written = Vec::new();
            write_safetensors(&mut weights, metadata(), block_values, &mut written).unwrap();
            let bytes =
                |t: Vec<f32>| -> Vec<u8> { t.iter().flat_map(|v| v.to_le_bytes()).collect() };
            let (rows_bytes, small_bytes) = (bytes(values(37 * 5, 0.7)), bytes(values(6, 1.3)));
            let views = [
                (
                    "z.rows",
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        vec![37, 5],
                        &rows_bytes,
                    )
                    .unwrap(),
                ),
                (
                    "a.small",
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        vec![6],
                        &small_bytes,
                    )
                    .unwrap(),
                ),
            ];
            let expected = safetensors::serialize(views, Some(metadata())).unwrap();
            assert!(written == expected, "block_values {block_values}");
        }
    }
}
