//! The training loop: hybrid batches from the sampler, each side embedded
//! as packed tokens through whatever trunk feeds the trained layers,
//! InfoNCE, AdamW with warmup and decay, validation and early stopping,
//! checkpoints (`checkpoint`) along the way.

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use polars::prelude::Column;

use super::checkpoint::{Checkpoints, MetricRow, Progress, Resumed};
use super::sampler::{AlphaSchedule, Batch, HybridSampler, ParallelPairs, NO_HORIZON};
use super::sentence_transformers::{self, RunFacts};
use super::tensorboard::{write_events, Scalar};
use super::{load_pairs, stable_until, DecayShape, Init, LrSchedule, TrainParams};
use crate::frozen_states::FrozenStates;
use anyhow::Context;
use xlpipe_ml::model::cpu_kernels::{is_cpu_backend, seed_dropout};
use xlpipe_ml::model::{
    load_encoder, save_encoder, Encoder, EncoderConfig, PackedTokens, TextTokenizer, TokenBatch,
};
use xlpipe_ml::optim::AdamW;
use xlpipe_stage_api::table::write_parquet;
use xlpipe_stage_api::StageContext;

/// Where the trained layers' input comes from.
pub(super) enum Trunk<B: AutodiffBackend> {
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
pub(super) struct Batcher<'a, B: AutodiffBackend> {
    /// None when the trunk is stored states: nothing is tokenised then.
    pub tokenizer: Option<&'a TextTokenizer>,
    pub p: &'a TrainParams,
    pub trunk: Trunk<B>,
}

impl<B: AutodiffBackend> Batcher<'_, B> {
    /// Token ids of one side's texts, as training feeds them: the side's
    /// prefix added, cut at the side's length.
    pub(super) fn token_rows(&self, texts: &[&str], query: bool) -> anyhow::Result<Vec<Vec<u32>>> {
        let (prefix, max_len) = if query {
            (&self.p.query_prefix, self.p.query_max_len)
        } else {
            (&self.p.passage_prefix, self.p.passage_max_len)
        };
        let tokenizer = self
            .tokenizer
            .context("texts are tokenised only when the trunk is not stored states")?;
        let prefixed: Vec<String> = texts.iter().map(|t| format!("{prefix}{t}")).collect();
        tokenizer.rows(&prefixed, max_len)
    }

    /// Embeddings of one side's texts, in their order, from one padded
    /// batch through the whole encoder: the way PyTorch runs it, and
    /// `embed_side`'s way on a GPU.
    pub(super) fn embed_padded<M: Backend<Device = B::Device>>(
        &self,
        encoder: &Encoder<M>,
        texts: &[&str],
        query: bool,
        device: &B::Device,
    ) -> anyhow::Result<Tensor<M, 2>> {
        let tokenizer = self
            .tokenizer
            .context("texts are tokenised when the trunk is the whole encoder")?;
        let rows = self.token_rows(texts, query)?;
        let (ids, mask) = TokenBatch::from_rows(&rows, tokenizer.pad_id()).tensors::<M>(device);
        Ok(encoder.embed(ids, mask))
    }

    /// Embeddings of one side's texts, in their order. On the CPU from
    /// packed tokens: no padding, each dense layer one product over all of
    /// the side's tokens, attention per text. The whole encoder on any
    /// other backend: from one padded batch, the faster way there.
    pub(super) fn embed_side<M: Backend<Device = B::Device>>(
        &self,
        encoder: &Encoder<M>,
        texts: &[&str],
        query: bool,
        device: &B::Device,
    ) -> anyhow::Result<Tensor<M, 2>> {
        let tokens = || -> anyhow::Result<PackedTokens> {
            Ok(PackedTokens::from_rows(&self.token_rows(texts, query)?))
        };
        Ok(match &self.trunk {
            Trunk::Whole if is_cpu_backend::<M>() => encoder.embed_packed(&tokens()?),
            // On a GPU, one padded batch (see `is_cpu_backend`).
            Trunk::Whole => self.embed_padded(encoder, texts, query, device)?,
            Trunk::Live { bottom, cut } => {
                let tokens = tokens()?;
                // Through host data: the same code serves the autodiff
                // backend (training) and the inner one (validation).
                let states = bottom.packed_states(&tokens, *cut).into_data();
                encoder.embed_packed_from(Tensor::from_data(states, device), &tokens.lengths, *cut)
            }
            Trunk::Stored {
                states,
                query_set,
                passage_set,
            } => {
                let set = if query { *query_set } else { *passage_set };
                let (x, lengths) = states.packed::<M>(set, texts, device)?;
                encoder.embed_packed_from(x, &lengths, states.meta.cut)
            }
        })
    }

    /// InfoNCE loss of one batch.
    pub(super) fn loss<M: Backend<Device = B::Device>>(
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

pub(crate) fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data().iter::<f64>().next().unwrap_or(f64::NAN)
}

/// `max_grad_norm` as a clipping threshold: 0 or less turns clipping off.
pub(super) fn clip_norm(max_grad_norm: f64) -> Option<f64> {
    (max_grad_norm > 0.0).then_some(max_grad_norm)
}

/// Learning rate at `step` (from 0).
///
/// Linear: warmup over `warmup_ratio` of the steps, then linear decay to
/// zero at the end, so every step's rate depends on `steps`. WSD: warmup
/// over `warmup_steps`, constant, then decay over the last `decay_steps`;
/// before the decay the rate depends on the step alone.
pub(super) fn learning_rate(p: &TrainParams, step: usize) -> f64 {
    match p.lr_schedule {
        LrSchedule::Linear => {
            let warmup = ((p.steps as f64) * p.warmup_ratio).round() as usize;
            if step < warmup {
                p.lr * (step + 1) as f64 / warmup as f64
            } else {
                let remaining = (p.steps - step) as f64 / (p.steps - warmup).max(1) as f64;
                p.lr * remaining
            }
        }
        LrSchedule::Wsd => {
            let warmup = p.warmup_steps.unwrap_or(0);
            let decay = p.decay_steps.unwrap_or(0);
            let decay_start = p.steps - decay;
            if step < warmup {
                p.lr * (step + 1) as f64 / warmup as f64
            } else if step < decay_start {
                p.lr
            } else {
                // From just below 1 at the decay's first step to 1/decay
                // of the way at its last (never exactly 0: a step at lr 0
                // would be wasted).
                let progress = (step - decay_start) as f64 / decay as f64;
                match p.decay_shape.unwrap_or(DecayShape::OneMinusSqrt) {
                    DecayShape::Linear => p.lr * (1.0 - progress),
                    DecayShape::OneMinusSqrt => p.lr * (1.0 - progress.sqrt()),
                }
            }
        }
    }
}

pub(super) fn train<B: AutodiffBackend>(
    p: &TrainParams,
    ctx: &StageContext,
    device: B::Device,
) -> anyhow::Result<()> {
    let model_dir = ctx.input("model")?;
    // From stored states nothing is tokenised, and parsing XLM-R's
    // tokenizer is most of a second a run.
    let tokenizer = match ctx.inputs("states") {
        [] => Some(TextTokenizer::for_model(model_dir)?),
        _ => None,
    };
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
    let trunk = open_trunk(ctx, p, &encoder, cut)?;
    let batcher = Batcher {
        tokenizer: tokenizer.as_ref(),
        p,
        trunk,
    };
    let mut optimizer = AdamW::new(p.weight_decay, clip_norm(p.max_grad_norm));

    let schedule = AlphaSchedule {
        start: p.alpha,
        end: p.alpha_end.unwrap_or(p.alpha),
    };
    // Under WSD the sampler sees no horizon, so a step's batch depends on
    // (seed, step) alone, never on the budget (see `sampler::NO_HORIZON`).
    let micro_steps = match p.lr_schedule {
        LrSchedule::Linear => p.steps * p.grad_accumulation,
        LrSchedule::Wsd => NO_HORIZON,
    };
    let mut sampler = HybridSampler::new(
        &train_data,
        p.batch_size,
        schedule,
        p.language_choice,
        p.mix,
        p.seed,
    )?;
    if p.eval_every > 0 && valid_data.len() < p.batch_size {
        // Said loudly: `eval_every` and `patience` then do nothing, and the
        // last step's weights are what the stage writes.
        tracing::warn!(
            "eval_every = {} but only {} validation pairs, fewer than batch_size = {}: \
             no validation, no early stopping, the last step's weights are kept \
             (raise the pairs' validation_fraction)",
            p.eval_every,
            valid_data.len(),
            p.batch_size
        );
    }
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

    // Resume from the last checkpoint of this very stage instance, else
    // from the stable phase another run with these settings stored.
    let checkpoints = Checkpoints::of(ctx, cut);
    let prefix = ctx.prefixes.as_ref().and_then(|p| p.resume.as_ref());
    let resumed = match (
        checkpoints.resume(encoder, &mut optimizer, &device)?,
        prefix,
    ) {
        (Ok(resumed), _) => {
            tracing::warn!(
                "resumed at step {} from {}",
                resumed.progress.step,
                checkpoints.dir().display()
            );
            resumed
        }
        (Err(fresh), Some(prefix)) => {
            let resumed = checkpoints.adopt_prefix(&prefix.path, fresh, &mut optimizer, &device)?;
            tracing::info!(
                "resumed from the stable phase at step {} of {}",
                resumed.progress.step,
                prefix.producer
            );
            resumed
        }
        (Err(fresh), None) => Resumed {
            encoder: fresh,
            progress: Progress::default(),
            best: None,
        },
    };
    encoder = resumed.encoder;
    let mut progress = resumed.progress;
    // The best weights by validation loss so far, kept in memory (a clone
    // shares the tensors) and written once, at the end or into a checkpoint.
    let mut best = resumed.best;
    // The sampler is a pure function of the seed: replay it.
    for micro in 0..progress.step * p.grad_accumulation {
        sampler.next_batch(micro, micro_steps);
    }
    // Where this run leaves its stable phase for others (not when it
    // started from that very prefix).
    let store_prefix = ctx.prefixes.as_ref().and_then(|prefixes| {
        let until = stable_until(p)?;
        (progress.step < until).then_some((until, &prefixes.store_at))
    });

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
            wall_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
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
                best = Some(encoder.clone());
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
        if let Some((until, store_at)) = store_prefix {
            if step == until {
                checkpoints.write_state(
                    store_at,
                    &encoder,
                    best.as_ref(),
                    &optimizer,
                    &progress,
                )?;
            }
        }
        if p.checkpoint_every > 0 && step % p.checkpoint_every == 0 && step < p.steps {
            checkpoints.save(&encoder, best.as_ref(), &optimizer, &progress)?;
        }
    }
    bar.finish_and_clear();

    // The best weights by validation loss, or the last without validation.
    let out = ctx.output("model");
    save_encoder(best.as_ref().unwrap_or(&encoder), model_dir, &out)?;
    sentence_transformers::write_folder(
        &out,
        p,
        &RunFacts {
            instance: &ctx.instance,
            base: &ctx.inputs("model")[0].producer,
            steps_run: progress.step,
            best_val_loss: progress.best_val,
            train_pairs: train_data.len(),
            langs: &train_data.langs,
            layers: encoder.layers.len(),
        },
    )?;
    write_training_record(ctx, &progress, &sampler, &train_data, &valid_data)?;
    checkpoints.remove();
    Ok(())
}

/// Where the trained layers' input comes from, for an encoder frozen below
/// `cut`: stored states when `inputs.states` is connected (checked to come
/// from this very bottom), else the encoder itself.
fn open_trunk<B: AutodiffBackend>(
    ctx: &StageContext,
    p: &TrainParams,
    encoder: &Encoder<B>,
    cut: Option<usize>,
) -> anyhow::Result<Trunk<B>> {
    Ok(match (ctx.inputs("states"), cut) {
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
            states.check_bottom(encoder, &ctx.inputs("model")[0].producer)?;
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
    })
}

/// Per step: loss, learning rate, gradient norm, the share of monolingual
/// batches so far, and the validation loss where there is one.
fn tensorboard_scalars(rows: &[MetricRow]) -> Vec<Scalar<'static>> {
    let mut scalars = Vec::new();
    let mut monolingual = 0usize;
    for (i, r) in rows.iter().enumerate() {
        monolingual += r.monolingual as usize;
        let mut add = |tag, value| {
            scalars.push(Scalar {
                tag,
                step: r.step,
                wall_time: r.wall_time,
                value,
            })
        };
        add("train/loss", r.loss);
        add("train/learning_rate", r.lr);
        add("train/grad_norm", r.grad_norm);
        add(
            "train/monolingual_share",
            monolingual as f64 / (i + 1) as f64,
        );
        if let Some(v) = r.val_loss {
            add("validation/loss", v);
        }
    }
    scalars
}

/// The `training` output: metrics per step, the realised batch mix, a
/// summary, TensorBoard events.
fn write_training_record(
    ctx: &StageContext,
    progress: &Progress,
    sampler: &HybridSampler,
    train_data: &ParallelPairs,
    valid_data: &ParallelPairs,
) -> anyhow::Result<()> {
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
            Column::new(
                "wall_time".into(),
                rows.iter().map(|r| r.wall_time).collect::<Vec<_>>(),
            ),
        ],
    )?;
    write_events(
        &training.join("tensorboard").join(&ctx.instance),
        rows.first().map_or(0.0, |r| r.wall_time),
        &tensorboard_scalars(rows),
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
    Ok(())
}

/// `encoder` with its frozen part (per `train_layers` and
/// `freeze_embeddings`) taken out of autodiff, and the cut below which it is
/// frozen (`None`: nothing frozen). Frozen parameters get no gradient, so
/// the optimizer keeps no state for them and never changes them.
pub(super) fn freeze<B: AutodiffBackend>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use std::path::Path;
    use xlpipe_ml::model::Pooling;
    use xlpipe_stage_api::parse_params;

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

    /// Packed sides, through the whole model or a frozen bottom layer,
    /// give the loss and gradients of each side as one padded batch.
    #[test]
    fn packed_sides_give_the_loss_and_gradients_of_one_padded_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (encoder, tokenizer) = tiny(dir.path());
        let device = Default::default();
        let queries = texts("question");
        let passages = texts("passage");
        let q: Vec<&str> = queries.iter().map(String::as_str).collect();
        let d: Vec<&str> = passages.iter().map(String::as_str).collect();
        for (extra, whole) in [("", true), ("train_layers = 1", false)] {
            let p = params(extra);
            let (encoder, cut) = freeze(encoder.clone(), &p).unwrap();
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
            // The packing is real: one padded batch would waste over a third.
            let prefixed: Vec<String> = d.iter().map(|t| format!("passage: {t}")).collect();
            let lengths: Vec<usize> = tokenizer
                .rows(&prefixed, 96)
                .unwrap()
                .iter()
                .map(Vec::len)
                .collect();
            let padded = lengths.len() * lengths.iter().max().unwrap();
            assert!(
                lengths.iter().sum::<usize>() * 3 < padded * 2,
                "{lengths:?}"
            );
            let batcher = Batcher::<B> {
                tokenizer: Some(&tokenizer),
                p: &p,
                trunk: match cut {
                    None => Trunk::Whole,
                    Some(cut) => Trunk::Live {
                        bottom: Box::new(encoder.valid()),
                        cut,
                    },
                },
            };
            let packed = info_nce(
                batcher.embed_side(&encoder, &q, true, &device).unwrap(),
                batcher.embed_side(&encoder, &d, false, &device).unwrap(),
                p.scale,
            );
            let loss_diff = max_diff(
                reference.clone().into_data().to_vec().unwrap(),
                packed.clone().into_data().to_vec().unwrap(),
            );
            assert!(loss_diff <= 1e-6, "{extra}: losses differ by {loss_diff}");
            let a = reference.backward();
            let b = packed.backward();
            let top = &encoder.layers[1];
            let mut diffs = vec![
                max_diff(grad(&top.query.weight, &a), grad(&top.query.weight, &b)),
                max_diff(grad(&top.output.weight, &a), grad(&top.output.weight, &b)),
                max_diff(
                    grad(&top.output.bias.clone().unwrap(), &a),
                    grad(&top.output.bias.clone().unwrap(), &b),
                ),
            ];
            if whole {
                diffs.extend([
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
                ]);
            }
            assert!(
                diffs.iter().all(|d| *d <= 1e-6),
                "{extra}: gradients differ by {diffs:?}"
            );
        }
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
            tokenizer: Some(&tokenizer),
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
