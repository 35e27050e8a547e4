//! `encode`: embed a text column of a table with a model.
//!
//! ```toml
//! [stages.encode_candidates]
//! kind = "encode"
//! inputs.model = "base_model"       # a Hugging Face folder (or a train output)
//! inputs.texts = "xquad_r"          # a folder of Parquet tables
//! table = "candidates"              # candidates.parquet in that folder
//! text = "sentence"                 # the column to embed
//! id = "cid"                        # the column that names each row
//! prefix = "passage: "
//! ```
//!
//! Texts are batched in order of token length (little padding), embedded
//! with mean or CLS pooling and L2-normalised. The model is an input, so its
//! content hash is in the key: a grid re-encodes only for models that
//! changed, and evaluation sets encoded with a shared base model are
//! encoded once.
//!
//! With `inputs.states` (a `frozen_states` output over the same texts, with
//! the same prefix and max_len) only the model's layers above the states'
//! cut run; the model's bottom must be the one the states came from.
//!
//! Output folder `embeddings`: `ids.parquet` (the id column, plus `lang`
//! when the table has one, in table order), `vectors.bin` (row-major
//! little-endian f32 or f16, one row per id) and `meta.json` (rows, dim,
//! dtype).

pub mod bench;

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::frozen_states::FrozenStates;
use crate::on_device::{run_on, BackendWork};
use xlpipe_eval::embeddings::Dtype;
use xlpipe_ml::model::{load_encoder, DeviceChoice, Pooling, TextTokenizer};
use xlpipe_stage_api::table::{read_parquet, string_column, strings, write_parquet};
use xlpipe_stage_api::{InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct EncodeStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodeParams {
    table: String,
    text: String,
    id: String,
    #[serde(default)]
    prefix: String,
    #[serde(default = "default_max_len")]
    max_len: usize,
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    #[serde(default)]
    pooling: Pooling,
    #[serde(default = "default_dtype")]
    dtype: Dtype,
    #[serde(default)]
    device: DeviceChoice,
}

fn default_max_len() -> usize {
    128
}
fn default_batch_size() -> usize {
    64
}
fn default_dtype() -> Dtype {
    Dtype::F32
}

impl TypedStage for EncodeStage {
    type Params = EncodeParams;
    const KIND: &'static str = "encode";
    // 2: softmax and GELU at vector width (a vectorisable exp, sums in 16
    // lanes): the same math, other roundings.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "embed a text column with a model (length-bucketed batches, f32 or f16)";

    fn validate(&self, mut p: EncodeParams, _env: &ParamsEnv) -> Result<EncodeParams, ParamError> {
        if p.batch_size == 0 {
            return Err(ParamError::new("batch_size", "must be at least 1"));
        }
        if p.max_len < 2 {
            return Err(ParamError::new(
                "max_len",
                "must leave room for the special tokens",
            ));
        }
        p.device = p.device.check().map_err(|m| ParamError::new("device", m))?;
        Ok(p)
    }

    fn interface_for(&self, p: &EncodeParams, _inputs: &[String]) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![
                InputSlot::one("model"),
                InputSlot::one("texts"),
                InputSlot::optional("states"),
            ],
            resources: p.device.resources(),
            ..Interface::producing(&["embeddings"])
        })
    }

    fn execute(&self, p: &EncodeParams, ctx: &StageContext) -> anyhow::Result<()> {
        run_on(p.device, ctx, p)
    }
}

impl BackendWork for EncodeParams {
    fn run<B: burn::tensor::backend::Backend>(
        &self,
        ctx: &StageContext,
        device: B::Device,
    ) -> anyhow::Result<()> {
        encode::<B>(self, ctx, device)
    }
}

/// What the model's layers start from: the texts (all layers run), or
/// stored states of its frozen bottom in set `usize` (only the layers above).
enum Source {
    Text(Box<TextTokenizer>),
    States(Box<FrozenStates>, usize),
}

fn encode<B: burn::tensor::backend::Backend>(
    p: &EncodeParams,
    ctx: &StageContext,
    device: B::Device,
) -> anyhow::Result<()> {
    let model_dir = ctx.input("model")?;
    let table_path = ctx.input("texts")?.join(format!("{}.parquet", p.table));
    let frame = read_parquet(&table_path)?;
    let ids = strings(&frame, &p.id)?;
    let raw = strings(&frame, &p.text)?;
    let texts: Vec<String> = raw.iter().map(|t| format!("{}{t}", p.prefix)).collect();
    let langs = frame
        .column("lang")
        .is_ok()
        .then(|| strings(&frame, "lang"))
        .transpose()?;

    let encoder = load_encoder::<B>(model_dir, p.pooling, &device)?;
    let dim = encoder.embeddings.word.weight.dims()[1];
    // With stored states of the model's frozen bottom, only the layers
    // above it run, and nothing is tokenised: the tokenizer is not even
    // loaded (parsing XLM-R's is most of a second, per model and table).
    let source = match ctx.inputs("states") {
        [] => Source::Text(Box::new(TextTokenizer::for_model(model_dir)?)),
        [one] => {
            let states = FrozenStates::open(&one.path, &one.producer)?;
            let set = states.set(&p.prefix, p.max_len)?;
            states.check_bottom(&encoder, &ctx.inputs("model")[0].producer)?;
            Source::States(Box::new(states), set)
        }
        many => anyhow::bail!("input `states` has {} artifacts, expected one", many.len()),
    };

    // Length-sorted batches waste little on padding; rows go back in table order.
    let lengths = match &source {
        Source::States(states, set) => raw
            .iter()
            .map(|t| states.length(*set, t))
            .collect::<anyhow::Result<Vec<_>>>()?,
        Source::Text(tokenizer) => tokenizer.lengths(&texts)?,
    };
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    let mut vectors = vec![0f32; texts.len() * dim];
    let bar = ctx.progress_bar(texts.len() as u64, &format!("encoding {}", p.table));
    for chunk in order.chunks(p.batch_size) {
        let embedded = match &source {
            Source::States(states, set) => {
                let batch: Vec<&str> = chunk.iter().map(|&i| raw[i].as_str()).collect();
                let (x, mask) = states.batch::<B>(*set, &batch, &device)?;
                encoder.embed_from(x, mask, states.meta.cut)
            }
            Source::Text(tokenizer) => {
                let batch: Vec<String> = chunk.iter().map(|&i| texts[i].clone()).collect();
                let (input_ids, mask) = tokenizer.encode(&batch, p.max_len)?.tensors::<B>(&device);
                encoder.embed(input_ids, mask)
            }
        };
        let embedded: Vec<f32> = embedded
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("reading embeddings: {e:?}"))?;
        for (row, &i) in chunk.iter().enumerate() {
            vectors[i * dim..(i + 1) * dim].copy_from_slice(&embedded[row * dim..(row + 1) * dim]);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();

    let out = ctx.output("embeddings");
    std::fs::create_dir_all(&out)?;
    let mut columns = vec![string_column("id", ids)];
    if let Some(langs) = langs {
        columns.push(string_column("lang", langs));
    }
    write_parquet(&out.join("ids.parquet"), columns)?;
    let mut file = std::io::BufWriter::new(std::fs::File::create(out.join("vectors.bin"))?);
    for v in &vectors {
        match p.dtype {
            Dtype::F32 => file.write_all(&v.to_le_bytes())?,
            Dtype::F16 => file.write_all(&burn::tensor::f16::from_f32(*v).to_le_bytes())?,
        }
    }
    file.flush()?;
    std::fs::write(
        out.join("meta.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "rows": texts.len(), "dim": dim, "dtype": p.dtype, "table": p.table, "text": p.text,
        }))?,
    )?;
    Ok(())
}
