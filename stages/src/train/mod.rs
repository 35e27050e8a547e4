//! `train`: fine-tune an encoder on parallel QA pairs with hybrid batches.
//!
//! ```toml
//! [stages.train]
//! kind = "train"
//! inputs.model = "base_model"      # a Hugging Face folder (import / download)
//! inputs.pairs = "translate"       # translate output: pairs in several languages
//! alpha = "${alpha}"               # P(monolingual batch); 1 = X-X-mono, 0 = X-Y
//! steps = 1000
//! batch_size = 32
//! lr = 3e-5
//! seed = "${seed}"
//! ```
//!
//! One shared encoder for queries and passages with E5 prefixes, cosine
//! similarity scaled by `scale` (1 / temperature), InfoNCE over in-batch
//! negatives (plus the pairs' hard negatives with `hard_negatives = true`).
//! AdamW (`optim`: PyTorch's update, no decay on biases and LayerNorm
//! weights), linear warmup then linear decay, gradient clipping by global
//! norm, gradient accumulation. The backend is reseeded every step, so a run
//! resumed from a checkpoint (kept in the state folder, written every
//! `checkpoint_every` steps) continues exactly as an uninterrupted one.
//! Validation loss on fixed batches of the held-out split drives early
//! stopping (`patience` evaluations without improvement); the best weights
//! are what the stage writes.
//!
//! Outputs: `model` (a Hugging Face folder) and `training` (metrics.parquet:
//! step, loss, lr, grad_norm, monolingual, val_loss; sampler.json: realised batch mix
//! and languages; summary.json).

pub mod sampler;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use polars::prelude::Column;
use serde::{Deserialize, Serialize};

use crate::frozen_states::FrozenStates;
use sampler::{AlphaSchedule, Batch, HybridSampler, LanguageChoice, Mix, ParallelPairs};
use xlpipe_ml::model::cpu_kernels::seed_dropout;
use xlpipe_ml::model::{
    length_groups, load_encoder, save_encoder, DeviceChoice, Encoder, EncoderConfig, OnBackend,
    Pooling, TextTokenizer, TokenBatch,
};
use xlpipe_ml::optim::AdamW;
use xlpipe_stage_api::content::copy_tree;
use xlpipe_stage_api::table::{read_parquet, strings, write_parquet};
use xlpipe_stage_api::{
    parse_params, InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage,
};

pub struct TrainStage;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Init {
    /// The weights of the input model.
    Pretrained,
    /// Fresh random weights of the input model's shape (for tests and
    /// from-scratch baselines).
    Random,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    alpha: f64,
    /// Ramp alpha linearly to this value over training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    alpha_end: Option<f64>,
    #[serde(default = "default_language_choice")]
    language_choice: LanguageChoice,
    /// How monolingual batches are placed: independently with probability
    /// alpha (`bernoulli`, the paper's), or alpha's share in every block
    /// of 20 steps (`stratified`).
    #[serde(default = "default_mix")]
    mix: Mix,
    /// Train on these languages only (default: every language of the pairs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    langs: Option<Vec<String>>,
    steps: usize,
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    #[serde(default = "default_lr")]
    lr: f64,
    #[serde(default = "default_weight_decay")]
    weight_decay: f64,
    #[serde(default = "default_warmup_ratio")]
    warmup_ratio: f64,
    #[serde(default = "default_max_grad_norm")]
    max_grad_norm: f64,
    #[serde(default = "default_grad_accumulation")]
    grad_accumulation: usize,
    /// Logit scale, 1 / temperature (sentence-transformers uses 20).
    #[serde(default = "default_scale")]
    scale: f64,
    #[serde(default = "default_query_max_len")]
    query_max_len: usize,
    #[serde(default = "default_passage_max_len")]
    passage_max_len: usize,
    #[serde(default = "default_query_prefix")]
    query_prefix: String,
    #[serde(default = "default_passage_prefix")]
    passage_prefix: String,
    #[serde(default)]
    pooling: Pooling,
    /// Add each pair's hard negative to the candidates.
    #[serde(default)]
    hard_negatives: bool,
    /// Validate every this many steps (0: never).
    #[serde(default = "default_every")]
    eval_every: usize,
    #[serde(default = "default_val_batches")]
    val_batches: usize,
    /// Stop after this many evaluations without a better validation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    patience: Option<usize>,
    #[serde(default = "default_every")]
    checkpoint_every: usize,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    device: DeviceChoice,
    #[serde(default = "default_init")]
    init: Init,
    /// Train only the top this many transformer layers (and what is above
    /// them); the embeddings and the layers below stay frozen. Default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    train_layers: Option<usize>,
    /// Keep the embeddings frozen (implied when `train_layers` leaves
    /// layers out).
    #[serde(default)]
    freeze_embeddings: bool,
    /// Embed each side of a batch in length-sorted groups padded to at most
    /// this share of their tokens (1: one padded batch). The batch, its
    /// in-batch negatives and its loss stay the same.
    #[serde(default = "default_max_padding")]
    max_padding: f64,
}

fn default_language_choice() -> LanguageChoice {
    LanguageChoice::Uniform
}
fn default_mix() -> Mix {
    Mix::Bernoulli
}
fn default_batch_size() -> usize {
    32
}
fn default_lr() -> f64 {
    3e-5
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_warmup_ratio() -> f64 {
    0.1
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_grad_accumulation() -> usize {
    1
}
fn default_scale() -> f64 {
    20.0
}
fn default_query_max_len() -> usize {
    32
}
fn default_passage_max_len() -> usize {
    128
}
fn default_query_prefix() -> String {
    "query: ".into()
}
fn default_passage_prefix() -> String {
    "passage: ".into()
}
fn default_every() -> usize {
    100
}
fn default_val_batches() -> usize {
    8
}
fn default_max_padding() -> f64 {
    0.1
}
fn default_init() -> Init {
    Init::Pretrained
}

impl TypedStage for TrainStage {
    type Params = TrainParams;
    const KIND: &'static str = "train";
    // 2: clipping by the global gradient norm, PyTorch's AdamW (eps 1e-8,
    // no decay on biases and LayerNorm weights), grad_norm in metrics.
    // 3: the CPU kernels' dropout masks (a counter-based SplitMix64
    // stream), so the same seed trains other weights than version 2.
    // 4: each side embedded in length-sorted groups (other dropout
    // draws), partial fine-tuning, stored states.
    const VERSION: u32 = 4;
    const SUMMARY: &'static str =
        "fine-tune an encoder with hybrid mono/cross-lingual batches (InfoNCE)";

    fn validate(&self, mut p: TrainParams, _env: &ParamsEnv) -> Result<TrainParams, ParamError> {
        for (name, value) in [("alpha", Some(p.alpha)), ("alpha_end", p.alpha_end)] {
            if let Some(v) = value {
                if !(0.0..=1.0).contains(&v) {
                    return Err(ParamError::new(
                        name,
                        format!("{v} is not a probability in [0, 1]"),
                    ));
                }
            }
        }
        let positive = [
            ("steps", p.steps),
            ("batch_size", p.batch_size),
            ("grad_accumulation", p.grad_accumulation),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ParamError::new(name, "must be at least 1"));
            }
        }
        if p.batch_size < 2 {
            return Err(ParamError::new(
                "batch_size",
                "in-batch negatives need at least 2",
            ));
        }
        if p.train_layers == Some(0) {
            return Err(ParamError::new(
                "train_layers",
                "must be at least 1 (a model with nothing to train)",
            ));
        }
        if p.max_padding.is_nan() || p.max_padding <= 0.0 {
            return Err(ParamError::new(
                "max_padding",
                "must be a share of tokens above 0 (1 = one padded batch)",
            ));
        }
        p.device = p.device.check().map_err(|m| ParamError::new("device", m))?;
        Ok(p)
    }

    fn interface_for(&self, p: &TrainParams, _inputs: &[String]) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![
                InputSlot::one("model"),
                InputSlot::one("pairs"),
                InputSlot::optional("states"),
            ],
            outputs: vec!["model".into(), "training".into()],
            resources: p.device.resources(),
        })
    }

    fn execute(&self, p: &TrainParams, ctx: &StageContext) -> anyhow::Result<()> {
        p.device.run(ctx.gpu(), Training { p, ctx })
    }
}

/// A train stage's run, for [`DeviceChoice::run`]: on the backend it is
/// given, with autodiff.
struct Training<'a> {
    p: &'a TrainParams,
    ctx: &'a StageContext,
}

impl OnBackend for Training<'_> {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        train::<burn::backend::Autodiff<B>>(self.p, self.ctx, device)
    }
}

/// Per language, per training pair: its hard negative, if any.
type HardNegatives = Vec<Vec<Option<String>>>;

/// Train and validation pairs, by language.
fn load_pairs(
    dir: &Path,
    langs: Option<&[String]>,
) -> anyhow::Result<(ParallelPairs, ParallelPairs, HardNegatives)> {
    let frame = read_parquet(&dir.join("pairs.parquet"))
        .context("the `pairs` input is not a translate output")?;
    let ids = strings(&frame, "pair_id")?;
    let row_langs = strings(&frame, "lang")?;
    let splits = strings(&frame, "split")?;
    let questions = strings(&frame, "question")?;
    let passages = strings(&frame, "passage")?;
    let negatives = strings(&frame, "negative")?;
    let mut all_langs: Vec<String> = row_langs
        .iter()
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if let Some(wanted) = langs {
        for l in wanted {
            anyhow::ensure!(
                all_langs.contains(l),
                "language `{l}` is not in the pairs (they have {all_langs:?})"
            );
        }
        all_langs = wanted.to_vec();
    }
    let lang_index: BTreeMap<&str, usize> = all_langs
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    let build = |split: &str| {
        let mut order: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, id) in ids.iter().enumerate() {
            if splits[i] == split && lang_index.contains_key(row_langs[i].as_str()) {
                let n = order.len();
                order.entry(id.as_str()).or_insert(n);
            }
        }
        let n = order.len();
        let mut q = vec![vec![None; n]; all_langs.len()];
        let mut d = vec![vec![None; n]; all_langs.len()];
        let mut neg = vec![vec![None; n]; all_langs.len()];
        for i in 0..ids.len() {
            if splits[i] != split {
                continue;
            }
            if let (Some(&l), Some(&p)) = (
                lang_index.get(row_langs[i].as_str()),
                order.get(ids[i].as_str()),
            ) {
                q[l][p] = Some(questions[i].clone());
                d[l][p] = Some(passages[i].clone());
                neg[l][p] = (!negatives[i].is_empty()).then(|| negatives[i].clone());
            }
        }
        (
            ParallelPairs {
                langs: all_langs.clone(),
                questions: q,
                passages: d,
            },
            neg,
        )
    };
    let (train, train_negatives) = build("train");
    let (valid, _) = build("valid");
    Ok((train, valid, train_negatives))
}

/// Where the trained layers' input comes from.
enum Trunk<B: AutodiffBackend> {
    /// Nothing frozen: the whole encoder trains on token ids.
    Whole,
    /// Frozen below `cut`, computed here on the inner backend: no autodiff
    /// and no dropout, as stored states are.
    Live {
        bottom: Box<Encoder<B::InnerBackend>>,
        cut: usize,
    },
    /// Frozen below the states' cut, read from a `frozen_states` output.
    Stored {
        states: Box<FrozenStates>,
        query_set: usize,
        passage_set: usize,
    },
}

/// Turns a batch's texts into embeddings and its InfoNCE loss.
struct Batcher<'a, B: AutodiffBackend> {
    tokenizer: &'a TextTokenizer,
    p: &'a TrainParams,
    trunk: Trunk<B>,
}

impl<B: AutodiffBackend> Batcher<'_, B> {
    /// Embeddings of one side's texts, in their order: embedded in
    /// length-sorted groups (little padding), put back in place.
    fn embed_side<M: Backend<Device = B::Device>>(
        &self,
        encoder: &Encoder<M>,
        texts: &[&str],
        query: bool,
        device: &B::Device,
    ) -> anyhow::Result<Tensor<M, 2>> {
        let (prefix, max_len) = if query {
            (&self.p.query_prefix, self.p.query_max_len)
        } else {
            (&self.p.passage_prefix, self.p.passage_max_len)
        };
        let rows = match &self.trunk {
            Trunk::Stored { .. } => Vec::new(),
            _ => {
                let prefixed: Vec<String> = texts.iter().map(|t| format!("{prefix}{t}")).collect();
                self.tokenizer.rows(&prefixed, max_len)?
            }
        };
        let lengths: Vec<usize> = match &self.trunk {
            Trunk::Stored {
                states,
                query_set,
                passage_set,
            } => {
                let set = if query { *query_set } else { *passage_set };
                texts
                    .iter()
                    .map(|t| states.length(set, t))
                    .collect::<anyhow::Result<_>>()?
            }
            _ => rows.iter().map(Vec::len).collect(),
        };
        let groups = length_groups(&lengths, self.p.max_padding);
        let mut parts = Vec::with_capacity(groups.len());
        for group in &groups {
            let tokens = || {
                let group_rows: Vec<&[u32]> = group.iter().map(|&i| rows[i].as_slice()).collect();
                TokenBatch::from_rows(&group_rows, self.tokenizer.pad_id())
            };
            parts.push(match &self.trunk {
                Trunk::Whole => {
                    let (ids, mask) = tokens().tensors::<M>(device);
                    encoder.embed(ids, mask)
                }
                Trunk::Live { bottom, cut } => {
                    let tokens = tokens();
                    let (ids, mask) = tokens.tensors::<B::InnerBackend>(device);
                    // Through host data: the same code serves the autodiff
                    // backend (training) and the inner one (validation).
                    let states = bottom.bottom_states(ids, mask, *cut).into_data();
                    let (_, mask) = tokens.tensors::<M>(device);
                    encoder.embed_from(Tensor::from_data(states, device), mask, *cut)
                }
                Trunk::Stored {
                    states,
                    query_set,
                    passage_set,
                } => {
                    let set = if query { *query_set } else { *passage_set };
                    let group_texts: Vec<&str> = group.iter().map(|&i| texts[i]).collect();
                    let (x, mask) = states.batch::<M>(set, &group_texts, device)?;
                    encoder.embed_from(x, mask, states.meta.cut)
                }
            });
        }
        let embedded = Tensor::cat(parts, 0);
        // Row r of `embedded` is text order[r]; put each text back in place.
        let mut place = vec![0i64; texts.len()];
        for (r, &i) in groups.iter().flatten().enumerate() {
            place[i] = r as i64;
        }
        let place = Tensor::<M, 1, Int>::from_data(TensorData::new(place, [texts.len()]), device);
        Ok(embedded.select(0, place))
    }

    /// InfoNCE loss of one batch.
    fn loss<M: Backend<Device = B::Device>>(
        &self,
        encoder: &Encoder<M>,
        data: &ParallelPairs,
        negatives: Option<&[Vec<Option<String>>]>,
        batch: &Batch,
        device: &B::Device,
    ) -> anyhow::Result<Tensor<M, 1>> {
        let queries: Vec<&str> = batch
            .pairs
            .iter()
            .map(|&i| {
                data.questions[batch.query_lang][i]
                    .as_deref()
                    .expect("sampled")
            })
            .collect();
        let mut passages: Vec<&str> = batch
            .pairs
            .iter()
            .map(|&i| {
                data.passages[batch.passage_lang][i]
                    .as_deref()
                    .expect("sampled")
            })
            .collect();
        if let Some(negatives) = negatives {
            passages.extend(
                batch
                    .pairs
                    .iter()
                    .filter_map(|&i| negatives[batch.passage_lang][i].as_deref()),
            );
        }
        let q = self.embed_side(encoder, &queries, true, device)?;
        let p = self.embed_side(encoder, &passages, false, device)?;
        Ok(info_nce(q, p, self.p.scale))
    }
}

/// Cross-entropy of each query against all candidates, the i-th being its
/// positive: mean(-log softmax(scale * q p^T)_ii).
pub fn info_nce<B: Backend>(
    queries: Tensor<B, 2>,
    candidates: Tensor<B, 2>,
    scale: f64,
) -> Tensor<B, 1> {
    let n = queries.dims()[0];
    let logits = queries.matmul(candidates.transpose()).mul_scalar(scale);
    let targets = Tensor::<B, 1, Int>::arange(0..n as i64, &logits.device()).reshape([n, 1]);
    log_softmax(logits, 1).gather(1, targets).mean().neg()
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data().iter::<f64>().next().unwrap_or(f64::NAN)
}

/// `max_grad_norm` as a clipping threshold: 0 or less turns clipping off.
fn clip_norm(max_grad_norm: f64) -> Option<f64> {
    (max_grad_norm > 0.0).then_some(max_grad_norm)
}

/// Learning rate at `step`: linear warmup, then linear decay to zero.
fn learning_rate(p: &TrainParams, step: usize) -> f64 {
    let warmup = ((p.steps as f64) * p.warmup_ratio).round() as usize;
    if step < warmup {
        p.lr * (step + 1) as f64 / warmup as f64
    } else {
        let remaining = (p.steps - step) as f64 / (p.steps - warmup).max(1) as f64;
        p.lr * remaining
    }
}

#[derive(Serialize, Deserialize, Default)]
struct Progress {
    step: usize,
    best_val: Option<f64>,
    bad_evals: usize,
    rows: Vec<MetricRow>,
}

#[derive(Serialize, Deserialize, Clone)]
struct MetricRow {
    step: usize,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    monolingual: bool,
    val_loss: Option<f64>,
}

fn train<B: AutodiffBackend>(
    p: &TrainParams,
    ctx: &StageContext,
    device: B::Device,
) -> anyhow::Result<()> {
    let model_dir = ctx.input("model")?;
    let tokenizer = TextTokenizer::for_model(model_dir)?;
    let (train_data, valid_data, negatives) = load_pairs(ctx.input("pairs")?, p.langs.as_deref())?;
    tracing::info!(
        "{} training and {} validation pairs in {:?}",
        train_data.len(),
        valid_data.len(),
        train_data.langs
    );
    let negatives = p.hard_negatives.then_some(negatives.as_slice());

    B::seed(&device, p.seed);
    let encoder: Encoder<B> = match p.init {
        Init::Pretrained => load_encoder(model_dir, p.pooling, &device)?,
        Init::Random => {
            EncoderConfig::from_file(&model_dir.join("config.json"), p.pooling)?.init(&device)
        }
    };
    let (mut encoder, cut) = freeze(encoder, p)?;
    let trunk: Trunk<B> = match (ctx.inputs("states"), cut) {
        ([], None) => Trunk::Whole,
        ([], Some(cut)) => Trunk::Live {
            bottom: Box::new(encoder.valid()),
            cut,
        },
        ([one], Some(cut)) => {
            let states = FrozenStates::open(&one.path, &one.producer)?;
            anyhow::ensure!(
                states.meta.cut == cut,
                "the states of `{}` are the output of the {} layers below the top {}, but this \
                 stage trains the top {} of {} (train_layers = {:?}): the cuts differ",
                one.producer,
                states.meta.cut,
                states.meta.layers - states.meta.cut,
                encoder.layers.len() - cut,
                encoder.layers.len(),
                p.train_layers
            );
            states.check_bottom(&encoder, &ctx.inputs("model")[0].producer)?;
            Trunk::Stored {
                query_set: states.set(&p.query_prefix, p.query_max_len)?,
                passage_set: states.set(&p.passage_prefix, p.passage_max_len)?,
                states: Box::new(states),
            }
        }
        ([_], None) => anyhow::bail!(
            "input `states` needs a frozen bottom: set train_layers below the model's {} layers, \
             or freeze_embeddings = true",
            encoder.layers.len()
        ),
        (many, _) => anyhow::bail!("input `states` has {} artifacts, expected one", many.len()),
    };
    let batcher = Batcher {
        tokenizer: &tokenizer,
        p,
        trunk,
    };
    let mut optimizer = AdamW::new(p.weight_decay, clip_norm(p.max_grad_norm));

    let schedule = AlphaSchedule {
        start: p.alpha,
        end: p.alpha_end.unwrap_or(p.alpha),
    };
    let micro_steps = p.steps * p.grad_accumulation;
    let mut sampler = HybridSampler::new(
        &train_data,
        p.batch_size,
        schedule,
        p.language_choice,
        p.mix,
        p.seed,
    )?;
    // Fixed validation batches, so losses at different steps compare.
    let val_batches: Vec<Batch> = if valid_data.len() >= p.batch_size && p.eval_every > 0 {
        let mut v = HybridSampler::new(
            &valid_data,
            p.batch_size,
            schedule,
            p.language_choice,
            p.mix,
            p.seed ^ 0x7a11d,
        )?;
        (0..p.val_batches)
            .map(|i| v.next_batch(i, p.val_batches))
            .collect()
    } else {
        Vec::new()
    };

    // Resume from the last checkpoint of this very stage instance.
    let checkpoints = ctx.state_dir.join(&ctx.key);
    // Full precision: a resumed run must continue from the exact weights.
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    let mut progress = Progress::default();
    if let Ok(text) = std::fs::read_to_string(checkpoints.join("progress.json")) {
        progress = serde_json::from_str(&text)?;
        // Loading keeps each parameter's frozen or trainable flag.
        encoder = encoder.load_record(recorder.load(checkpoints.join("model"), &device)?);
        optimizer.load(&checkpoints.join("optimizer.bin"))?;
        // The sampler is a pure function of the seed: replay it.
        for micro in 0..progress.step * p.grad_accumulation {
            sampler.next_batch(micro, micro_steps);
        }
        tracing::warn!(
            "resumed at step {} from {}",
            progress.step,
            checkpoints.display()
        );
    }
    let best_dir = checkpoints.join("best");

    let bar = ctx.progress_bar(p.steps as u64, "training");
    bar.set_position(progress.step as u64);
    let mut step = progress.step;
    while step < p.steps {
        // Same randomness (dropout) for the same step, resumed or not: on
        // the CPU from this thread's own stream (trainings that run side by
        // side must not share one), elsewhere from the backend's generator.
        let step_seed = p.seed.wrapping_mul(1_000_003).wrapping_add(step as u64);
        seed_dropout(step_seed);
        B::seed(&device, step_seed);
        let lr = learning_rate(p, step);
        let mut accumulator = GradientsAccumulator::<Encoder<B>>::new();
        let mut loss_sum = 0.0;
        let mut monolingual = true;
        for micro in 0..p.grad_accumulation {
            let batch = sampler.next_batch(step * p.grad_accumulation + micro, micro_steps);
            monolingual &= batch.monolingual;
            let loss = batcher.loss(&encoder, &train_data, negatives, &batch, &device)?;
            let value = scalar(loss.clone());
            anyhow::ensure!(
                value.is_finite(),
                "the training loss became {value} at step {step}; lower lr (now {lr:e}) or check the data"
            );
            loss_sum += value;
            let grads = GradientsParams::from_grads(
                loss.div_scalar(p.grad_accumulation as f64).backward(),
                &encoder,
            );
            accumulator.accumulate(&encoder, grads);
        }
        let (updated, report) = optimizer.step(lr, encoder, accumulator.grads());
        encoder = updated;
        step += 1;
        let mut row = MetricRow {
            step,
            loss: loss_sum / p.grad_accumulation as f64,
            lr,
            grad_norm: report.grad_norm,
            monolingual,
            val_loss: None,
        };
        let evaluate = !val_batches.is_empty() && (step % p.eval_every == 0 || step == p.steps);
        let mut stop = false;
        if evaluate {
            let inner = encoder.valid();
            let mut total = 0.0;
            for batch in &val_batches {
                total += scalar(batcher.loss(&inner, &valid_data, None, batch, &device)?);
            }
            let val = total / val_batches.len() as f64;
            row.val_loss = Some(val);
            tracing::info!(
                "step {step}: train loss {:.4}, validation loss {val:.4}",
                row.loss
            );
            if progress.best_val.is_none_or(|b| val < b) {
                progress.best_val = Some(val);
                progress.bad_evals = 0;
                save_encoder(&encoder, model_dir, &best_dir)?;
            } else {
                progress.bad_evals += 1;
                stop = p
                    .patience
                    .is_some_and(|patience| progress.bad_evals >= patience);
            }
        }
        progress.rows.push(row);
        progress.step = step;
        bar.inc(1);
        if stop {
            tracing::info!(
                "early stop at step {step}: no better validation loss in {} evaluations",
                progress.bad_evals
            );
            break;
        }
        if p.checkpoint_every > 0 && step % p.checkpoint_every == 0 && step < p.steps {
            checkpoint(&checkpoints, &recorder, &encoder, &optimizer, &progress)?;
        }
    }
    bar.finish_and_clear();

    let out = ctx.output("model");
    if best_dir.join("model.safetensors").is_file() {
        copy_tree(&best_dir, &out)?;
    } else {
        save_encoder(&encoder, model_dir, &out)?;
    }
    let training = ctx.output("training");
    std::fs::create_dir_all(&training)?;
    let rows = &progress.rows;
    write_parquet(
        &training.join("metrics.parquet"),
        vec![
            Column::new(
                "step".into(),
                rows.iter().map(|r| r.step as i64).collect::<Vec<_>>(),
            ),
            Column::new(
                "loss".into(),
                rows.iter().map(|r| r.loss).collect::<Vec<_>>(),
            ),
            Column::new("lr".into(), rows.iter().map(|r| r.lr).collect::<Vec<_>>()),
            Column::new(
                "grad_norm".into(),
                rows.iter().map(|r| r.grad_norm).collect::<Vec<_>>(),
            ),
            Column::new(
                "monolingual".into(),
                rows.iter().map(|r| r.monolingual).collect::<Vec<_>>(),
            ),
            Column::new(
                "val_loss".into(),
                rows.iter().map(|r| r.val_loss).collect::<Vec<_>>(),
            ),
        ],
    )?;
    std::fs::write(
        training.join("sampler.json"),
        serde_json::to_vec_pretty(&sampler.stats)?,
    )?;
    std::fs::write(
        training.join("summary.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "steps_run": progress.step,
            "best_val_loss": progress.best_val,
            "final_train_loss": rows.last().map(|r| r.loss),
            "train_pairs": train_data.len(),
            "valid_pairs": valid_data.len(),
            "languages": train_data.langs,
        }))?,
    )?;
    // A finished stage no longer needs its checkpoints.
    let _ = std::fs::remove_dir_all(&checkpoints);
    Ok(())
}

/// `encoder` with its frozen part (per `train_layers` and
/// `freeze_embeddings`) taken out of autodiff, and the cut below which it is
/// frozen (`None`: nothing frozen). Frozen parameters get no gradient, so
/// the optimizer keeps no state for them and never changes them.
fn freeze<B: AutodiffBackend>(
    mut encoder: Encoder<B>,
    p: &TrainParams,
) -> anyhow::Result<(Encoder<B>, Option<usize>)> {
    let layers = encoder.layers.len();
    let trained = p.train_layers.unwrap_or(layers);
    anyhow::ensure!(
        trained <= layers,
        "train_layers = {trained} but the model has {layers} layers"
    );
    if trained == layers && !p.freeze_embeddings {
        return Ok((encoder, None));
    }
    let cut = layers - trained;
    encoder.embeddings = encoder.embeddings.no_grad();
    encoder.layers = encoder
        .layers
        .into_iter()
        .enumerate()
        .map(|(i, layer)| if i < cut { layer.no_grad() } else { layer })
        .collect();
    Ok((encoder, Some(cut)))
}

fn checkpoint<B: AutodiffBackend>(
    dir: &Path,
    recorder: &NamedMpkFileRecorder<FullPrecisionSettings>,
    encoder: &Encoder<B>,
    optimizer: &AdamW,
    progress: &Progress,
) -> anyhow::Result<()> {
    // Write everything under a fresh name, then swap, so a kill never leaves
    // a half-written checkpoint behind.
    let partial = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    recorder.record(encoder.clone().into_record(), partial.join("model"))?;
    optimizer.save(&partial.join("optimizer.bin"))?;
    std::fs::write(partial.join("progress.json"), serde_json::to_vec(progress)?)?;
    if dir.join("best").is_dir() {
        copy_tree(&dir.join("best"), &partial.join("best"))?;
    }
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&partial, dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Timing of training steps, for `xlpipe bench train`.
pub struct StepTiming {
    /// Median seconds per optimizer step (the first step, a warm-up, excluded).
    pub median_seconds: f64,
    /// Real (non-padding) tokens per step, queries and passages together.
    pub tokens_per_step: usize,
}

/// Run `steps` training steps of the model in `model_dir` on the CPU backend
/// with the training stage's own loss, optimizer and clipping, on one fixed
/// batch of `queries` and `passages` (prefixes included).
pub fn benchmark_cpu_steps(
    model_dir: &Path,
    queries: &[String],
    passages: &[String],
    lengths: (usize, usize),
    steps: usize,
) -> anyhow::Result<StepTiming> {
    type B = burn::backend::Autodiff<burn::backend::Flex>;
    let device = Default::default();
    let tokenizer = TextTokenizer::for_model(model_dir)?;
    let mut encoder: Encoder<B> = load_encoder(model_dir, Pooling::Mean, &device)?;
    // The stage's defaults, so the bench times what a default `train` runs.
    let mut optimizer = AdamW::new(default_weight_decay(), clip_norm(default_max_grad_norm()));
    let q = tokenizer.encode(queries, lengths.0)?;
    let p = tokenizer.encode(passages, lengths.1)?;
    let tokens_per_step = (q.mask.iter().sum::<i64>() + p.mask.iter().sum::<i64>()) as usize;
    let mut times = Vec::new();
    for step in 0..=steps {
        let clock = std::time::Instant::now();
        let (qi, qm) = q.tensors::<B>(&device);
        let (pi, pm) = p.tensors::<B>(&device);
        let loss = info_nce(
            encoder.embed(qi, qm),
            encoder.embed(pi, pm),
            default_scale(),
        );
        let grads = GradientsParams::from_grads(loss.backward(), &encoder);
        encoder = optimizer.step(default_lr(), encoder, grads).0;
        // Reading a weight waits for the step to finish on any backend.
        let _ = scalar(encoder.embeddings.norm.gamma.val().sum());
        if step > 0 {
            times.push(clock.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(StepTiming {
        median_seconds: times[times.len() / 2],
        tokens_per_step,
    })
}

/// One way of training or encoding, timed by `xlpipe bench train`.
pub struct ModeTiming {
    pub mode: String,
    /// Median seconds per step (training) or per pass over the texts
    /// (encoding); the first, a warm-up, excluded.
    pub median_seconds: f64,
    /// Real and padded tokens per step or pass, both sides together.
    pub real_tokens: usize,
    pub padded_tokens: usize,
}

/// Training steps on one fixed batch of `queries` and `passages`
/// (unprefixed) with the training stage's own loss, optimizer, clipping
/// and E5 prefixes, on the CPU backend, four ways: every layer as one
/// padded batch per side; every layer in length groups; the top
/// `train_layers` from text; the same from stored states.
pub fn benchmark_cpu_training(
    model_dir: &Path,
    queries: &[String],
    passages: &[String],
    lengths: (usize, usize),
    steps: usize,
    train_layers: usize,
) -> anyhow::Result<Vec<ModeTiming>> {
    type B = burn::backend::Autodiff<burn::backend::Flex>;
    let device = Default::default();
    let tokenizer = TextTokenizer::for_model(model_dir)?;
    let base: Encoder<B> = load_encoder(model_dir, Pooling::Mean, &device)?;
    let layers = base.layers.len();
    let scratch = tempfile_dir(model_dir)?;
    let cut = layers.saturating_sub(train_layers);
    let sets = vec![
        crate::frozen_states::StateSet {
            prefix: "query: ".into(),
            max_len: lengths.0,
            columns: vec!["question".into()],
        },
        crate::frozen_states::StateSet {
            prefix: "passage: ".into(),
            max_len: lengths.1,
            columns: vec!["passage".into()],
        },
    ];
    let distinct = |texts: &[String]| -> Vec<String> {
        texts
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    crate::frozen_states::write_states(
        &base.valid(),
        &tokenizer,
        crate::frozen_states::StatesLayout {
            cut,
            dtype: xlpipe_eval::embeddings::Dtype::F16,
            batch_size: 64,
        },
        sets,
        &[distinct(queries), distinct(passages)],
        &scratch,
        &indicatif::ProgressBar::hidden(),
    )?;
    let modes: [(&str, bool, f64); 4] = [
        ("all layers, one padded batch", false, 1.0),
        ("all layers, length groups", false, 0.1),
        ("top layers from text", true, 0.1),
        ("top layers from stored states", true, 0.1),
    ];
    let q: Vec<&str> = queries.iter().map(String::as_str).collect();
    let d: Vec<&str> = passages.iter().map(String::as_str).collect();
    let mut timings = Vec::new();
    for (index, (mode, partial, max_padding)) in modes.into_iter().enumerate() {
        let table: toml::Table = format!(
            "alpha = 1.0\nsteps = {steps}\nquery_max_len = {}\npassage_max_len = {}\nmax_padding = {max_padding}\n{}",
            lengths.0,
            lengths.1,
            if partial { format!("train_layers = {train_layers}") } else { String::new() }
        )
        .parse()?;
        let p: TrainParams = parse_params(&table).map_err(|e| anyhow::anyhow!("{e}"))?;
        let (mut encoder, cut) = freeze(base.clone(), &p)?;
        let trunk = match (index, cut) {
            (3, Some(_)) => Trunk::Stored {
                states: Box::new(FrozenStates::open(&scratch, "bench")?),
                query_set: 0,
                passage_set: 1,
            },
            (_, Some(cut)) => Trunk::Live {
                bottom: Box::new(encoder.valid()),
                cut,
            },
            (_, None) => Trunk::Whole,
        };
        let batcher = Batcher::<B> {
            tokenizer: &tokenizer,
            p: &p,
            trunk,
        };
        let (mut real, mut padded) = (0, 0);
        for (texts, prefix, max_len) in [
            (queries, "query: ", lengths.0),
            (passages, "passage: ", lengths.1),
        ] {
            let prefixed: Vec<String> = texts.iter().map(|t| format!("{prefix}{t}")).collect();
            let lens: Vec<usize> = tokenizer
                .rows(&prefixed, max_len)?
                .iter()
                .map(Vec::len)
                .collect();
            for group in length_groups(&lens, max_padding) {
                let longest = group.iter().map(|&i| lens[i]).max().unwrap_or(0);
                padded += longest * group.len();
                real += group.iter().map(|&i| lens[i]).sum::<usize>();
            }
        }
        let mut optimizer = AdamW::new(p.weight_decay, clip_norm(p.max_grad_norm));
        let mut times = Vec::new();
        for step in 0..=steps {
            let clock = std::time::Instant::now();
            let loss = info_nce(
                batcher.embed_side(&encoder, &q, true, &device)?,
                batcher.embed_side(&encoder, &d, false, &device)?,
                p.scale,
            );
            let grads = GradientsParams::from_grads(loss.backward(), &encoder);
            encoder = optimizer.step(p.lr, encoder, grads).0;
            // Reading a weight waits for the step to finish on any backend.
            let _ = scalar(encoder.layers[layers - 1].output_norm.gamma.val().sum());
            if step > 0 {
                times.push(clock.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        timings.push(ModeTiming {
            mode: if partial {
                format!("{mode} (top {train_layers})")
            } else {
                mode.to_string()
            },
            median_seconds: times[times.len() / 2],
            real_tokens: real,
            padded_tokens: padded,
        });
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(timings)
}

/// Encoding `texts` (unprefixed, `prefix` added) the way the encode stage
/// does, with every layer from text and with the top `train_layers` from
/// stored states, `repeat` passes each after a warm-up.
pub fn benchmark_cpu_encoding(
    model_dir: &Path,
    texts: &[String],
    prefix: &str,
    max_len: usize,
    train_layers: usize,
    repeat: usize,
) -> anyhow::Result<Vec<ModeTiming>> {
    type B = burn::backend::Flex;
    let device = Default::default();
    let tokenizer = TextTokenizer::for_model(model_dir)?;
    let encoder: Encoder<B> = load_encoder(model_dir, Pooling::Mean, &device)?;
    let cut = encoder.layers.len().saturating_sub(train_layers);
    let scratch = tempfile_dir(model_dir)?;
    let distinct: Vec<String> = texts
        .iter()
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    crate::frozen_states::write_states(
        &encoder,
        &tokenizer,
        crate::frozen_states::StatesLayout {
            cut,
            dtype: xlpipe_eval::embeddings::Dtype::F16,
            batch_size: 64,
        },
        vec![crate::frozen_states::StateSet {
            prefix: prefix.into(),
            max_len,
            columns: vec!["text".into()],
        }],
        &[distinct],
        &scratch,
        &indicatif::ProgressBar::hidden(),
    )?;
    let states = FrozenStates::open(&scratch, "bench")?;
    let prefixed: Vec<String> = texts.iter().map(|t| format!("{prefix}{t}")).collect();
    let rows = tokenizer.rows(&prefixed, max_len)?;
    let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    let real: usize = lengths.iter().sum();
    let padded: usize = order
        .chunks(64)
        .map(|c| c.iter().map(|&i| lengths[i]).max().unwrap_or(0) * c.len())
        .sum();
    let mut timings = Vec::new();
    for from_states in [false, true] {
        let mut times = Vec::new();
        for pass in 0..=repeat {
            let clock = std::time::Instant::now();
            for chunk in order.chunks(64) {
                let embedded = if from_states {
                    let batch: Vec<&str> = chunk.iter().map(|&i| texts[i].as_str()).collect();
                    let (x, mask) = states.batch::<B>(0, &batch, &device)?;
                    encoder.embed_from(x, mask, cut)
                } else {
                    let batch: Vec<&[u32]> = chunk.iter().map(|&i| rows[i].as_slice()).collect();
                    let (ids, mask) =
                        TokenBatch::from_rows(&batch, tokenizer.pad_id()).tensors::<B>(&device);
                    encoder.embed(ids, mask)
                };
                let _ = embedded.into_data();
            }
            if pass > 0 {
                times.push(clock.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        timings.push(ModeTiming {
            mode: if from_states {
                format!("top {train_layers} layers from stored states")
            } else {
                "all layers from text".into()
            },
            median_seconds: times[times.len() / 2],
            real_tokens: real,
            padded_tokens: padded,
        });
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(timings)
}

/// A fresh scratch folder for a benchmark's states, beside the system's
/// temporary files.
fn tempfile_dir(model_dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let name = format!(
        "xlpipe-bench-{}-{}",
        std::process::id(),
        xlpipe_stage_api::content::hex(
            &blake3::hash(model_dir.to_string_lossy().as_bytes()).as_bytes()[..4]
        )
    );
    let dir = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;

    type B = burn::backend::Autodiff<burn::backend::Flex>;

    fn params(extra: &str) -> TrainParams {
        let table: toml::Table =
            format!("alpha = 0.5\nsteps = 1\nquery_max_len = 40\npassage_max_len = 96\n{extra}")
                .parse()
                .unwrap();
        parse_params(&table).unwrap()
    }

    fn tiny(dir: &Path) -> (Encoder<B>, TextTokenizer) {
        std::fs::write(
            dir.join("config.json"),
            r#"{"model_type": "xlm-roberta", "vocab_size": 250002, "hidden_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": 130, "type_vocab_size": 1, "pad_token_id": 1,
                "layer_norm_eps": 1e-5, "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0}"#,
        )
        .unwrap();
        let config = EncoderConfig::from_file(&dir.join("config.json"), Pooling::Mean).unwrap();
        let tokenizer = TextTokenizer::from_file(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/derived/tokenizers/xlm-roberta.tokenizer.json"),
            1,
        )
        .unwrap();
        (config.init(&Default::default()), tokenizer)
    }

    /// Texts of very different lengths, so one padded batch wastes a lot.
    fn texts(stem: &str) -> Vec<String> {
        (0..12)
            .map(|i| {
                let words: Vec<String> = (0..1 + (i * 7) % 30)
                    .map(|w| format!("{stem}{w}"))
                    .collect();
                words.join(" ")
            })
            .collect()
    }

    fn max_diff(a: Vec<f32>, b: Vec<f32>) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).fold(0.0, |worst, (x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                worst.max(d)
            }
        })
    }

    fn grad<const D: usize>(
        param: &Param<Tensor<B, D>>,
        grads: &<B as AutodiffBackend>::Gradients,
    ) -> Vec<f32> {
        param
            .val()
            .grad(grads)
            .expect("a gradient")
            .into_data()
            .to_vec()
            .unwrap()
    }

    #[test]
    fn grouped_sides_give_the_loss_and_gradients_of_one_padded_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (encoder, tokenizer) = tiny(dir.path());
        let device = Default::default();
        let p = params("");
        let queries = texts("question");
        let passages = texts("passage");

        // The reference: each side one padded batch, embedded at once.
        let one_batch = |texts: &[String], prefix: &str, max_len: usize| {
            let prefixed: Vec<String> = texts.iter().map(|t| format!("{prefix}{t}")).collect();
            let (ids, mask) = tokenizer
                .encode(&prefixed, max_len)
                .unwrap()
                .tensors::<B>(&device);
            encoder.embed(ids, mask)
        };
        let reference = info_nce(
            one_batch(&queries, "query: ", 40),
            one_batch(&passages, "passage: ", 96),
            p.scale,
        );
        let batcher = Batcher::<B> {
            tokenizer: &tokenizer,
            p: &p,
            trunk: Trunk::Whole,
        };
        let q: Vec<&str> = queries.iter().map(String::as_str).collect();
        let d: Vec<&str> = passages.iter().map(String::as_str).collect();
        // The grouping is real: one padded batch would waste over a third.
        let lengths: Vec<usize> = tokenizer
            .rows(
                &d.iter()
                    .map(|t| format!("passage: {t}"))
                    .collect::<Vec<_>>(),
                96,
            )
            .unwrap()
            .iter()
            .map(Vec::len)
            .collect();
        let groups = length_groups(&lengths, p.max_padding);
        assert!(groups.len() >= 3, "{groups:?}");
        let grouped = info_nce(
            batcher.embed_side(&encoder, &q, true, &device).unwrap(),
            batcher.embed_side(&encoder, &d, false, &device).unwrap(),
            p.scale,
        );
        let loss_diff = max_diff(
            reference.clone().into_data().to_vec().unwrap(),
            grouped.clone().into_data().to_vec().unwrap(),
        );
        assert!(loss_diff <= 1e-6, "losses differ by {loss_diff}");
        let a = reference.backward();
        let b = grouped.backward();
        let layer = &encoder.layers[1];
        let diffs = [
            max_diff(
                grad(&encoder.embeddings.word.weight, &a),
                grad(&encoder.embeddings.word.weight, &b),
            ),
            max_diff(
                grad(&encoder.embeddings.norm.gamma, &a),
                grad(&encoder.embeddings.norm.gamma, &b),
            ),
            max_diff(
                grad(&encoder.layers[0].query.weight, &a),
                grad(&encoder.layers[0].query.weight, &b),
            ),
            max_diff(
                grad(&layer.output.weight, &a),
                grad(&layer.output.weight, &b),
            ),
            max_diff(
                grad(&layer.output.bias.clone().unwrap(), &a),
                grad(&layer.output.bias.clone().unwrap(), &b),
            ),
        ];
        assert!(
            diffs.iter().all(|d| *d <= 1e-6),
            "gradients differ by {diffs:?}"
        );
    }

    #[test]
    fn frozen_parameters_get_no_gradient() {
        let dir = tempfile::tempdir().unwrap();
        let (encoder, tokenizer) = tiny(dir.path());
        let device = Default::default();
        let p = params("train_layers = 1");
        let (encoder, cut) = freeze(encoder, &p).unwrap();
        assert_eq!(cut, Some(1));
        let batcher = Batcher::<B> {
            tokenizer: &tokenizer,
            p: &p,
            trunk: Trunk::Live {
                bottom: Box::new(encoder.valid()),
                cut: 1,
            },
        };
        let queries = texts("q");
        let q: Vec<&str> = queries.iter().map(String::as_str).collect();
        let loss = info_nce(
            batcher.embed_side(&encoder, &q, true, &device).unwrap(),
            batcher.embed_side(&encoder, &q, false, &device).unwrap(),
            p.scale,
        );
        let grads = loss.backward();
        assert!(encoder.embeddings.word.weight.val().grad(&grads).is_none());
        assert!(encoder.layers[0]
            .intermediate
            .weight
            .val()
            .grad(&grads)
            .is_none());
        assert!(encoder.layers[1]
            .intermediate
            .weight
            .val()
            .grad(&grads)
            .is_some());
        let too_many = freeze(tiny(dir.path()).0, &params("train_layers = 3"));
        assert!(too_many.is_err());
    }
}
