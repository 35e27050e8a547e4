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
//! Outputs: `model` (a Hugging Face folder that is also a sentence-transformers
//! model, with a model card) and `training` (metrics.parquet: step, loss, lr,
//! grad_norm, monolingual, val_loss, wall_time; sampler.json: realised batch
//! mix and languages; summary.json; tensorboard/INSTANCE/: the same curves
//! as TensorBoard events).
//!
//! This file is the stage (params, inputs); `sampler` draws the hybrid
//! batches, `trainer` runs the training loop, `checkpoint` keeps and
//! restores a run's state, `bench` times steps for `xlpipe bench train`.

pub mod bench;
mod checkpoint;
pub mod sampler;
mod sentence_transformers;
mod tensorboard;
mod trainer;

pub(crate) use trainer::{info_nce, scalar};

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::on_device::{run_on, BackendWork};
use sampler::{LanguageChoice, Mix, ParallelPairs};
use xlpipe_ml::model::{DeviceChoice, Pooling};
use xlpipe_stage_api::table::{read_parquet, strings};
use xlpipe_stage_api::{
    InputSlot, Interface, ParamError, ParamsEnv, PrefixReuse, StageContext, TypedStage,
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
    /// `linear` (warmup over `warmup_ratio` of the steps, then down to 0 at
    /// the last step) or `wsd` (warmup-stable-decay: `warmup_steps` up,
    /// constant, then down over the last `decay_steps`), whose steps before
    /// the decay do not depend on `steps`.
    #[serde(default, skip_serializing_if = "LrSchedule::is_linear")]
    lr_schedule: LrSchedule,
    /// WSD's warmup, in steps (a share of `steps` would tie it to the budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    warmup_steps: Option<usize>,
    /// WSD's decay: the last this many steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decay_steps: Option<usize>,
    /// WSD's decay shape: `linear` or `1-sqrt` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decay_shape: Option<DecayShape>,
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
    /// The hub id the input model is a copy of, for the model card's
    /// `base_model` (e.g. "intfloat/multilingual-e5-small").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_model: Option<String>,
}

/// How the learning rate moves over training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    Linear,
    Wsd,
}

impl LrSchedule {
    fn is_linear(&self) -> bool {
        *self == LrSchedule::Linear
    }
}

/// The shape of WSD's decay from `lr` to 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum DecayShape {
    #[serde(rename = "linear")]
    Linear,
    /// lr × (1 − sqrt(progress)) (Hägele et al. 2024 found it better than linear).
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
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
    // 5: the model folder is a sentence-transformers model (modules,
    // prompts, card, the base model's pooler kept); TensorBoard events and
    // wall times in `training`.
    // 6: softmax, GELU and layer norm at vector width (a vectorisable
    // exp, sums in 16 lanes): the same math, other roundings.
    // 7: each side embedded as packed tokens (no padding; other dropout
    // draws, other roundings); max_padding gone with the length groups.
    const VERSION: u32 = 7;
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
        check_schedule(&p)?;
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
        run_on(p.device, ctx, p)
    }

    /// Under WSD everything before the decay depends on (seed, step) alone,
    /// so runs that differ only in `steps` share their stable phase.
    fn prefix_reuse(&self, p: &TrainParams) -> Option<PrefixReuse> {
        let until = stable_until(p)?;
        let mut shared_params = serde_json::to_value(p).ok()?;
        shared_params.as_object_mut()?.remove("steps");
        Some(PrefixReuse {
            shared_params,
            reusable_until: until,
        })
    }
}

/// The steps of a WSD run before its decay (`None` under the linear
/// schedule, or with no step before the decay).
fn stable_until(p: &TrainParams) -> Option<usize> {
    let decay = p.decay_steps?;
    (p.lr_schedule == LrSchedule::Wsd && p.steps > decay).then(|| p.steps - decay)
}

/// WSD's params go with `lr_schedule = "wsd"` and nothing that spans the
/// whole budget: everything before its decay must not depend on `steps`.
fn check_schedule(p: &TrainParams) -> Result<(), ParamError> {
    let wsd_only = [
        ("warmup_steps", p.warmup_steps.is_some()),
        ("decay_steps", p.decay_steps.is_some()),
        ("decay_shape", p.decay_shape.is_some()),
    ];
    if p.lr_schedule == LrSchedule::Linear {
        if let Some((name, _)) = wsd_only.iter().find(|(_, set)| *set) {
            return Err(ParamError::new(
                *name,
                "belongs to lr_schedule = \"wsd\" (this train uses the linear schedule)",
            ));
        }
        return Ok(());
    }
    let Some(decay) = p.decay_steps else {
        return Err(ParamError::new(
            "decay_steps",
            "lr_schedule = \"wsd\" needs decay_steps (the last steps, over which lr decays to 0)",
        ));
    };
    let warmup = p.warmup_steps.unwrap_or(0);
    if warmup + decay > p.steps {
        return Err(ParamError::new(
            "decay_steps",
            format!(
                "warmup_steps ({warmup}) + decay_steps ({decay}) exceed steps ({})",
                p.steps
            ),
        ));
    }
    if p.alpha_end.is_some() {
        return Err(ParamError::new(
            "alpha_end",
            "a ramp of alpha spans the whole budget, so with lr_schedule = \"wsd\" every step \
             would depend on `steps`; use a constant alpha",
        ));
    }
    Ok(())
}

/// Training runs on the backend it is given, with autodiff.
impl BackendWork for TrainParams {
    fn run<B: Backend>(&self, ctx: &StageContext, device: B::Device) -> anyhow::Result<()> {
        trainer::train::<burn::backend::Autodiff<B>>(self, ctx, device)
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
