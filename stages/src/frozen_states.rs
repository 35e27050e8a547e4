//! `frozen_states`: run the frozen bottom of a model once over a table's
//! texts and store each text's token states, so that every fine-tune of a
//! grid that trains only the top layers, and every encode of its models,
//! runs only those top layers.
//!
//! ```toml
//! [stages.pair_states]
//! kind = "frozen_states"
//! inputs.model = "me5"             # the base model the grid fine-tunes
//! inputs.texts = "translate"       # a folder of Parquet tables
//! table = "pairs"
//! train_layers = 2                 # as in `train`: the top 2 layers are left out
//! columns = [
//!   { column = "question", prefix = "query: ", max_len = 64 },
//!   { column = "passage", prefix = "passage: ", max_len = 128 },
//! ]
//! dtype = "f16"
//! ```
//!
//! The states of a text are those of [`Encoder::bottom_states`] at
//! `cut = layers - train_layers`, computed without dropout, for the text
//! with its prefix, cut at `max_len` as the consumer cuts it. Real tokens'
//! states do not depend on padding, so they are stored without it. The key
//! holds the base model and the cut, not alpha or seed: a grid computes them
//! once.
//!
//! Output folder `states`: `states.bin` (every text's real tokens, row-major
//! little-endian f16 or f32, `hidden` values a token), `texts.parquet` (set,
//! text, offset, length: where each distinct text's tokens start and how
//! many there are; a set is one prefix and max_len) and `meta.json` (cut,
//! layers, hidden, dtype, sets, and `bottom`, the fingerprint of the frozen
//! bottom, which consumers check against their own model).

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::on_device::{run_on, BackendWork};
use xlpipe_eval::embeddings::Dtype;
use xlpipe_ml::model::{load_encoder, DeviceChoice, Encoder, TextTokenizer, TokenBatch};
use xlpipe_stage_api::table::{
    int_column, integers, read_parquet, string_column, strings, write_parquet,
};
use xlpipe_stage_api::{InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct FrozenStatesStage;

/// One text column and how its consumer tokenizes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ColumnSpec {
    column: String,
    #[serde(default)]
    prefix: String,
    max_len: usize,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrozenStatesParams {
    table: String,
    columns: Vec<ColumnSpec>,
    /// The top layers a consumer trains; the states are those below them.
    train_layers: usize,
    #[serde(default = "default_dtype")]
    dtype: Dtype,
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    #[serde(default)]
    device: DeviceChoice,
}

fn default_dtype() -> Dtype {
    Dtype::F16
}
fn default_batch_size() -> usize {
    64
}

/// One prefix and max_len: texts are looked up within their set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateSet {
    pub prefix: String,
    pub max_len: usize,
    /// The table columns whose texts it holds.
    pub columns: Vec<String>,
}

/// `meta.json` of a `states` output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatesMeta {
    /// Layers below the states (0: the embeddings' output).
    pub cut: usize,
    /// Layers of the model they came from.
    pub layers: usize,
    pub hidden: usize,
    pub dtype: Dtype,
    /// [`Encoder::bottom_fingerprint`] of the frozen bottom at `cut`.
    pub bottom: String,
    pub sets: Vec<StateSet>,
    pub texts: usize,
    pub tokens: usize,
}

impl TypedStage for FrozenStatesStage {
    type Params = FrozenStatesParams;
    const KIND: &'static str = "frozen_states";
    // 2: softmax and GELU at vector width (as `encode` 2).
    const VERSION: u32 = 2;
    const SUMMARY: &'static str = "token states of a model's frozen bottom layers over a table's texts, for top-layer training and encoding";

    fn validate(
        &self,
        mut p: FrozenStatesParams,
        _env: &ParamsEnv,
    ) -> Result<FrozenStatesParams, ParamError> {
        if p.columns.is_empty() {
            return Err(ParamError::new("columns", "name at least one text column"));
        }
        for (i, c) in p.columns.iter().enumerate() {
            if c.max_len < 2 {
                return Err(ParamError::new(
                    format!("columns[{i}].max_len"),
                    "must leave room for the special tokens",
                ));
            }
        }
        if p.batch_size == 0 {
            return Err(ParamError::new("batch_size", "must be at least 1"));
        }
        p.device = p.device.check().map_err(|m| ParamError::new("device", m))?;
        Ok(p)
    }

    fn interface_for(
        &self,
        p: &FrozenStatesParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![InputSlot::one("model"), InputSlot::one("texts")],
            resources: p.device.resources(),
            ..Interface::producing(&["states"])
        })
    }

    fn execute(&self, p: &FrozenStatesParams, ctx: &StageContext) -> anyhow::Result<()> {
        run_on(p.device, ctx, p)
    }
}

impl BackendWork for FrozenStatesParams {
    fn run<B: Backend>(&self, ctx: &StageContext, device: B::Device) -> anyhow::Result<()> {
        compute::<B>(self, ctx, device)
    }
}

fn compute<B: Backend>(
    p: &FrozenStatesParams,
    ctx: &StageContext,
    device: B::Device,
) -> anyhow::Result<()> {
    let model_dir = ctx.input("model")?;
    let table_path = ctx.input("texts")?.join(format!("{}.parquet", p.table));
    let frame = read_parquet(&table_path)?;
    let tokenizer = TextTokenizer::for_model(model_dir)?;
    let encoder = load_encoder::<B>(model_dir, Default::default(), &device)?;
    let layers = encoder.layers.len();
    anyhow::ensure!(
        p.train_layers <= layers,
        "train_layers = {} but the model has {layers} layers",
        p.train_layers
    );
    let cut = layers - p.train_layers;

    // One set per (prefix, max_len); columns that share both share a set.
    let mut sets: Vec<StateSet> = Vec::new();
    let mut set_texts: Vec<BTreeSet<String>> = Vec::new();
    for c in &p.columns {
        let values = strings(&frame, &c.column)
            .with_context(|| format!("{}: column `{}`", table_path.display(), c.column))?;
        let at = match sets
            .iter()
            .position(|s| s.prefix == c.prefix && s.max_len == c.max_len)
        {
            Some(at) => at,
            None => {
                sets.push(StateSet {
                    prefix: c.prefix.clone(),
                    max_len: c.max_len,
                    columns: Vec::new(),
                });
                set_texts.push(BTreeSet::new());
                sets.len() - 1
            }
        };
        sets[at].columns.push(c.column.clone());
        set_texts[at].extend(values);
    }

    let total: usize = set_texts.iter().map(BTreeSet::len).sum();
    let bar = ctx.progress_bar(total as u64, &format!("frozen states of {}", p.table));
    let texts: Vec<Vec<String>> = set_texts
        .into_iter()
        .map(|t| t.into_iter().collect())
        .collect();
    let meta = write_states(
        &encoder,
        &tokenizer,
        StatesLayout {
            cut,
            dtype: p.dtype,
            batch_size: p.batch_size,
        },
        sets,
        &texts,
        &ctx.output("states"),
        &bar,
    )?;
    bar.finish_and_clear();
    tracing::info!(
        "{} texts, {} tokens of states below layer {cut} of {layers}",
        meta.texts,
        meta.tokens
    );
    Ok(())
}

/// Where to cut, and how to store what is below.
pub struct StatesLayout {
    pub cut: usize,
    pub dtype: Dtype,
    pub batch_size: usize,
}

/// Compute the states of `encoder` below `layout.cut` for `texts[s]` of each
/// set `sets[s]` (distinct texts, unprefixed) into a `states` folder `out`.
pub fn write_states<B: Backend>(
    encoder: &Encoder<B>,
    tokenizer: &TextTokenizer,
    layout: StatesLayout,
    sets: Vec<StateSet>,
    texts: &[Vec<String>],
    out: &Path,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<StatesMeta> {
    let StatesLayout {
        cut,
        dtype,
        batch_size,
    } = layout;
    let hidden = encoder.embeddings.word.weight.dims()[1];
    let device = encoder.embeddings.word.weight.device();
    std::fs::create_dir_all(out)?;
    let mut file = std::io::BufWriter::new(std::fs::File::create(out.join("states.bin"))?);
    let (mut set_column, mut text_column, mut offsets, mut lengths_column) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut tokens = 0usize;
    for (index, (s, texts)) in sets.iter().zip(texts).enumerate() {
        let prefixed: Vec<String> = texts.iter().map(|t| format!("{}{t}", s.prefix)).collect();
        let rows = tokenizer.rows(&prefixed, s.max_len)?;
        let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| (lengths[i], i));
        for chunk in order.chunks(batch_size) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| rows[i].as_slice()).collect();
            let tokens_batch = TokenBatch::from_rows(&batch, tokenizer.pad_id());
            let seq = tokens_batch.seq;
            let (ids, mask) = tokens_batch.tensors::<B>(&device);
            let states: Vec<f32> = encoder
                .bottom_states(ids, mask, cut)
                .into_data()
                .convert::<f32>()
                .to_vec()
                .map_err(|e| anyhow::anyhow!("reading states: {e:?}"))?;
            for (row, &i) in chunk.iter().enumerate() {
                let start = row * seq * hidden;
                for &v in &states[start..start + lengths[i] * hidden] {
                    match dtype {
                        Dtype::F32 => file.write_all(&v.to_le_bytes())?,
                        Dtype::F16 => {
                            file.write_all(&burn::tensor::f16::from_f32(v).to_le_bytes())?
                        }
                    }
                }
                set_column.push(index as i64);
                text_column.push(texts[i].clone());
                offsets.push(tokens as i64);
                lengths_column.push(lengths[i] as i64);
                tokens += lengths[i];
            }
            bar.inc(chunk.len() as u64);
        }
    }
    file.flush()?;
    write_parquet(
        &out.join("texts.parquet"),
        vec![
            int_column("set", set_column),
            string_column("text", text_column),
            int_column("offset", offsets),
            int_column("length", lengths_column),
        ],
    )?;
    let meta = StatesMeta {
        cut,
        layers: encoder.layers.len(),
        hidden,
        dtype,
        bottom: encoder.bottom_fingerprint(cut),
        sets,
        texts: texts.iter().map(Vec::len).sum(),
        tokens,
    };
    std::fs::write(out.join("meta.json"), serde_json::to_vec_pretty(&meta)?)?;
    Ok(meta)
}

/// A `states` output opened for reading: the index in memory, the states
/// memory-mapped.
pub struct FrozenStates {
    pub meta: StatesMeta,
    /// Who produced them, for error messages.
    pub producer: String,
    dir: PathBuf,
    /// Per set: text -> (first token, tokens)
    index: Vec<HashMap<String, (usize, usize)>>,
    data: memmap2::Mmap,
}

impl FrozenStates {
    pub fn open(dir: &Path, producer: &str) -> anyhow::Result<FrozenStates> {
        let meta_path = dir.join("meta.json");
        let meta: StatesMeta = serde_json::from_slice(
            &std::fs::read(&meta_path)
                .with_context(|| format!("reading {}", meta_path.display()))?,
        )
        .with_context(|| format!("{} is not a frozen_states output", meta_path.display()))?;
        let frame = read_parquet(&dir.join("texts.parquet"))?;
        let sets = integers(&frame, "set")?;
        let texts = strings(&frame, "text")?;
        let offsets = integers(&frame, "offset")?;
        let lengths = integers(&frame, "length")?;
        // One map per set, so that a lookup by `&str` allocates nothing.
        let mut index: Vec<HashMap<String, (usize, usize)>> = vec![HashMap::new(); meta.sets.len()];
        for (i, text) in texts.into_iter().enumerate() {
            let set = index.get_mut(sets[i] as usize).with_context(|| {
                format!(
                    "{}: row {i} names set {} of {}",
                    dir.display(),
                    sets[i],
                    meta.sets.len()
                )
            })?;
            set.insert(text, (offsets[i] as usize, lengths[i] as usize));
        }
        let bin = dir.join("states.bin");
        let file =
            std::fs::File::open(&bin).with_context(|| format!("opening {}", bin.display()))?;
        // SAFETY: cached objects are read-only and never rewritten in place.
        let data = unsafe { memmap2::Mmap::map(&file)? };
        let width = match meta.dtype {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
        };
        anyhow::ensure!(
            data.len() == meta.tokens * meta.hidden * width,
            "{}: {} bytes for {} tokens of {} values",
            bin.display(),
            data.len(),
            meta.tokens,
            meta.hidden
        );
        Ok(FrozenStates {
            meta,
            producer: producer.to_string(),
            dir: dir.to_path_buf(),
            index,
            data,
        })
    }

    /// The set holding texts with this prefix, cut at `max_len`.
    pub fn set(&self, prefix: &str, max_len: usize) -> anyhow::Result<usize> {
        self.meta
            .sets
            .iter()
            .position(|s| s.prefix == prefix && s.max_len == max_len)
            .ok_or_else(|| {
                let held: Vec<String> = self
                    .meta
                    .sets
                    .iter()
                    .map(|s| format!("{:?} at max_len {} ({})", s.prefix, s.max_len, s.columns.join(", ")))
                    .collect();
                anyhow::anyhow!(
                    "the states of `{}` hold no texts with prefix {prefix:?} at max_len {max_len}; they hold {}",
                    self.producer,
                    held.join("; ")
                )
            })
    }

    /// Refuse a model whose bottom differs from the one the states came
    /// from: its top layers would read states of another model.
    pub fn check_bottom<B: Backend>(
        &self,
        encoder: &Encoder<B>,
        model: &str,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            encoder.layers.len() == self.meta.layers,
            "the states of `{}` come from a {}-layer model, but model `{model}` has {} layers",
            self.producer,
            self.meta.layers,
            encoder.layers.len()
        );
        let own = encoder.bottom_fingerprint(self.meta.cut);
        anyhow::ensure!(
            own == self.meta.bottom,
            "the states of `{}` ({}) were computed by frozen bottom {} (embeddings and layers below {}), \
             but model `{model}` has bottom {own} there: its lower layers differ from the model the states \
             came from (was it trained with more layers than the states leave out?)",
            self.producer,
            self.dir.display(),
            self.meta.bottom,
            self.meta.cut
        );
        Ok(())
    }

    /// Token count of `text` in `set`.
    pub fn length(&self, set: usize, text: &str) -> anyhow::Result<usize> {
        Ok(self.locate(set, text)?.1)
    }

    fn locate(&self, set: usize, text: &str) -> anyhow::Result<(usize, usize)> {
        self.index[set]
            .get(text)
            .copied()
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "the states of `{}` hold no state for text {:?} (columns {}): compute them over the table this stage reads",
                    self.producer,
                    text.chars().take(80).collect::<String>(),
                    self.meta.sets[set].columns.join(", ")
                )
            })
    }

    /// The states of `texts`, right-padded with zeros to the longest, and
    /// their mask: the input of [`Encoder::embed_from`].
    pub fn batch<B: Backend>(
        &self,
        set: usize,
        texts: &[&str],
        device: &B::Device,
    ) -> anyhow::Result<(Tensor<B, 3>, Tensor<B, 2, Int>)> {
        let spans: Vec<(usize, usize)> = texts
            .iter()
            .map(|t| self.locate(set, t))
            .collect::<anyhow::Result<_>>()?;
        let hidden = self.meta.hidden;
        let seq = spans.iter().map(|s| s.1).max().unwrap_or(1).max(1);
        let mut values = vec![0f32; texts.len() * seq * hidden];
        let mut mask = vec![0i64; texts.len() * seq];
        for (row, &(offset, len)) in spans.iter().enumerate() {
            self.read(
                offset,
                len,
                &mut values[row * seq * hidden..(row * seq + len) * hidden],
            );
            mask[row * seq..row * seq + len].fill(1);
        }
        let shape = [texts.len(), seq];
        Ok((
            Tensor::from_data(TensorData::new(values, [texts.len(), seq, hidden]), device),
            Tensor::from_data(TensorData::new(mask, shape), device),
        ))
    }

    /// The states of `texts` in set `set` as packed rows `[tokens, hidden]`,
    /// one text after another without padding, and each text's length: the
    /// input of [`Encoder::embed_packed_from`].
    pub fn packed<B: Backend>(
        &self,
        set: usize,
        texts: &[&str],
        device: &B::Device,
    ) -> anyhow::Result<(Tensor<B, 2>, Vec<usize>)> {
        let spans: Vec<(usize, usize)> = texts
            .iter()
            .map(|t| self.locate(set, t))
            .collect::<anyhow::Result<_>>()?;
        let hidden = self.meta.hidden;
        let rows: usize = spans.iter().map(|s| s.1).sum();
        let mut values = vec![0f32; rows * hidden];
        let mut at = 0;
        for &(offset, len) in &spans {
            self.read(offset, len, &mut values[at * hidden..(at + len) * hidden]);
            at += len;
        }
        Ok((
            Tensor::from_data(TensorData::new(values, [rows, hidden]), device),
            spans.iter().map(|s| s.1).collect(),
        ))
    }

    /// The `len` stored token states from token `offset`, as f32 into `out`.
    fn read(&self, offset: usize, len: usize, out: &mut [f32]) {
        let hidden = self.meta.hidden;
        match self.meta.dtype {
            Dtype::F32 => {
                let bytes = &self.data[offset * hidden * 4..(offset + len) * hidden * 4];
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Dtype::F16 => {
                let bytes = &self.data[offset * hidden * 2..(offset + len) * hidden * 2];
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = burn::tensor::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }
}
