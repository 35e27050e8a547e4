//! Decoding: greedy and beam search with a forced target-language first
//! token, batched over sentences and reusing the decoder's key/value cache.
//!
//! Both follow transformers' `generate` (version 5) exactly, so the same
//! model gives the same tokens: the decoder starts from
//! `decoder_start_token_id`, the first generated token is forced to the
//! target language's, finished greedy rows are padded, and beam search
//! keeps the `2 * beams` best continuations per step, moves those ending in
//! EOS among the `beams` best into the finished set with score
//! `sum of log-probs / generated_length ^ length_penalty`, and stops by
//! transformers' early-stopping rule. Scores are accumulated in f32, as
//! there.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::m2m100::M2m100;

/// transformers' `early_stopping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// Stop once no running hypothesis can beat the worst finished one,
    /// judged at the current length (transformers' default, `False`).
    #[default]
    Heuristic,
    /// Stop as soon as `beams` hypotheses have finished (`True`).
    WhenFull,
    /// Judge with the best length still possible (`"never"`): canonical
    /// beam search.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationConfig {
    /// 1: greedy decoding.
    pub beams: usize,
    /// Maximum target length, counting the decoder's start token.
    pub max_length: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            beams: 1,
            max_length: 200,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
        }
    }
}

/// Translate a batch of tokenised sources; each output starts with the
/// decoder start token and the forced `target_token`, as transformers
/// returns them, right-padded with the pad token to the longest.
pub fn generate<B: Backend>(
    model: &M2m100<B>,
    sources: &[Vec<i64>],
    target_token: i64,
    config: &GenerationConfig,
) -> Vec<Vec<i64>> {
    let outputs = if config.beams <= 1 {
        greedy(model, sources, target_token, config.max_length)
    } else {
        beam_search(model, sources, target_token, config)
    };
    let width = outputs.iter().map(Vec::len).max().unwrap_or(0);
    let pad = model.config.pad_token_id as i64;
    outputs
        .into_iter()
        .map(|mut row| {
            row.resize(width, pad);
            row
        })
        .collect()
}

/// Log-probabilities `[rows][vocab]` of the next token, as f32 host vectors,
/// with the forced first token applied at `length == 1`.
fn next_log_probs<B: Backend>(
    logits: Tensor<B, 3>,
    length: usize,
    target_token: i64,
) -> Vec<Vec<f32>> {
    let [rows, _, vocab] = logits.dims();
    let values: Vec<f32> = log_softmax(logits.reshape([rows, vocab]), 1)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 logits");
    values
        .chunks(vocab)
        .map(|row| {
            if length == 1 {
                let mut forced = vec![f32::NEG_INFINITY; vocab];
                forced[target_token as usize] = 0.0;
                forced
            } else {
                row.to_vec()
            }
        })
        .collect()
}

fn rows_index<B: Backend>(rows: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let ids: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Tensor::from_data(TensorData::new(ids, [rows.len()]), device)
}

fn greedy<B: Backend>(
    model: &M2m100<B>,
    sources: &[Vec<i64>],
    target_token: i64,
    max_length: usize,
) -> Vec<Vec<i64>> {
    let eos = model.config.eos_token_id as i64;
    let start = model.config.decoder_start_token_id as i64;
    let mut outputs: Vec<Vec<i64>> = vec![vec![start]; sources.len()];
    let mut encoded = model.encode(sources);
    let mut cache = model.start_cache(&encoded);
    // Rows still decoding, by sentence; finished ones leave the batch.
    let mut active: Vec<usize> = (0..sources.len()).collect();
    let mut length = 1;
    while !active.is_empty() && length < max_length {
        let last: Vec<Vec<i64>> = active
            .iter()
            .map(|&s| vec![*outputs[s].last().expect("starts with a token")])
            .collect();
        let logits = model.decode(&last, &encoded, &mut cache, true);
        let log_probs = next_log_probs(logits, length, target_token);
        let mut keep = Vec::new();
        for (row, &s) in active.iter().enumerate() {
            let next = argmax(&log_probs[row]);
            outputs[s].push(next as i64);
            if next as i64 != eos {
                keep.push(row);
            }
        }
        length += 1;
        if keep.len() < active.len() && !keep.is_empty() {
            let index = rows_index::<B>(&keep, model.device());
            encoded = encoded.select(index.clone());
            cache = cache.select(index);
        }
        active = keep.iter().map(|&row| active[row]).collect();
    }
    outputs
}

/// The first index of the largest value (torch.argmax's tie rule).
fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// One sentence's beam search state.
struct Beams {
    /// Running hypotheses: tokens and accumulated log-probability.
    running: Vec<(Vec<i64>, f32)>,
    /// The `beams` best finished slots: (tokens, score, really finished).
    finished: Vec<(Vec<i64>, f32, bool)>,
    improvable: bool,
    done: bool,
}

const MASKED: f32 = -1.0e9;

fn beam_search<B: Backend>(
    model: &M2m100<B>,
    sources: &[Vec<i64>],
    target_token: i64,
    config: &GenerationConfig,
) -> Vec<Vec<i64>> {
    let k = config.beams;
    let keep = 2 * k;
    let eos = model.config.eos_token_id as i64;
    let start = model.config.decoder_start_token_id as i64;
    let prompt = 1;
    let mut states: Vec<Beams> = sources
        .iter()
        .map(|_| Beams {
            running: (0..k)
                .map(|b| (vec![start], if b == 0 { 0.0 } else { MASKED }))
                .collect(),
            finished: vec![(vec![start], MASKED, false); k],
            improvable: true,
            done: false,
        })
        .collect();
    // Row r of the decoder batch: sentence active[r / k], beam r % k.
    let encoded_once = model.encode(sources);
    let mut active: Vec<usize> = (0..sources.len()).collect();
    let repeat: Vec<usize> = active
        .iter()
        .flat_map(|&s| std::iter::repeat_n(s, k))
        .collect();
    let mut encoded = encoded_once.select(rows_index::<B>(&repeat, model.device()));
    let mut cache = model.start_cache(&encoded);
    let mut length = 1;
    loop {
        let last: Vec<Vec<i64>> = active
            .iter()
            .flat_map(|&s| {
                states[s]
                    .running
                    .iter()
                    .map(|(t, _)| vec![*t.last().unwrap()])
            })
            .collect();
        let logits = model.decode(&last, &encoded, &mut cache, true);
        let log_probs = next_log_probs(logits, length, target_token);
        let vocab = log_probs[0].len();
        // For the cache: which old row each surviving hypothesis extends.
        let mut parents: Vec<usize> = Vec::with_capacity(active.len() * k);
        let mut still: Vec<usize> = Vec::new();
        for (slot, &s) in active.iter().enumerate() {
            let state = &mut states[s];
            // The `keep` best of beams x vocab (sorted, as torch.topk).
            let mut candidates: Vec<(f32, usize, usize)> = Vec::with_capacity(k * vocab);
            for (b, (_, score)) in state.running.iter().enumerate() {
                for (token, &lp) in log_probs[slot * k + b].iter().enumerate() {
                    candidates.push((lp + score, b, token));
                }
            }
            let top = top_k(candidates, keep);
            let hits: Vec<bool> = top
                .iter()
                .map(|&(_, _, token)| token as i64 == eos || length + 1 >= config.max_length)
                .collect();

            // Next running beams: the best `k` that did not stop.
            let mut next_running: Vec<(f32, usize, usize)> = top
                .iter()
                .zip(&hits)
                .map(|(&(score, b, t), &hit)| (if hit { score + MASKED } else { score }, b, t))
                .collect();
            next_running = top_k(next_running, k);

            // Finished: the top `k` candidates that stopped, length-penalised,
            // merged with the finished slots; blocked once no improvement is possible.
            let all_full = state.finished.iter().all(|f| f.2);
            let blocked =
                (all_full && config.early_stopping == EarlyStopping::WhenFull) || !state.improvable;
            let penalty = ((length + 1 - prompt) as f32).powf(config.length_penalty);
            let mut merged: Vec<(f32, Vec<i64>, bool)> = state
                .finished
                .iter()
                .map(|(tokens, score, real)| (*score, tokens.clone(), *real))
                .collect();
            for (i, (&(score, b, token), &hit)) in top.iter().zip(&hits).enumerate() {
                let finished_now = hit && i < k;
                let mut score = score / penalty;
                if blocked {
                    score += MASKED;
                }
                if !finished_now {
                    score += MASKED;
                }
                let mut tokens = state.running[b].0.clone();
                tokens.push(token as i64);
                merged.push((score, tokens, finished_now));
            }
            let order = top_k(
                merged
                    .iter()
                    .enumerate()
                    .map(|(i, m)| (m.0, i, 0))
                    .collect(),
                k,
            );
            state.finished = order
                .iter()
                .map(|&(_, i, _)| (merged[i].1.clone(), merged[i].0, merged[i].2))
                .collect();

            state.running = next_running
                .iter()
                .map(|&(score, b, token)| {
                    let mut tokens = state.running[b].0.clone();
                    tokens.push(token as i64);
                    (tokens, score)
                })
                .collect();

            // transformers' early-stopping heuristic, at the new length.
            let hypothetical =
                if config.early_stopping == EarlyStopping::Never && config.length_penalty > 0.0 {
                    config.max_length - prompt
                } else {
                    length + 1 - prompt
                };
            let best_possible =
                state.running[0].1 / (hypothetical as f32).powf(config.length_penalty);
            let worst_finished = state
                .finished
                .iter()
                .map(|f| f.1)
                .fold(f32::INFINITY, f32::min);
            state.improvable = state.improvable
                && state.finished.iter().any(|f| {
                    let worst = if f.2 { worst_finished } else { MASKED };
                    best_possible > worst
                });
            let full = state.finished.iter().all(|f| f.2);
            state.done = !state.improvable
                || (full && config.early_stopping == EarlyStopping::WhenFull)
                || hits.iter().all(|&h| h);
            if !state.done {
                still.push(s);
                parents.extend(next_running.iter().map(|&(_, b, _)| slot * k + b));
            }
        }
        length += 1;
        if still.is_empty() {
            break;
        }
        if still.len() < active.len() {
            let rows: Vec<usize> = still
                .iter()
                .flat_map(|&s| std::iter::repeat_n(s, k))
                .map(|s| active.iter().position(|&a| a == s).expect("was active") * k)
                .collect();
            encoded = encoded.select(rows_index::<B>(&rows, model.device()));
        }
        cache = cache.select(rows_index::<B>(&parents, model.device()));
        active = still;
    }
    states
        .into_iter()
        .map(|state| {
            let (tokens, _, _) = state
                .finished
                .into_iter()
                .next()
                .expect("beams >= 1 finished slots");
            tokens
        })
        .collect()
}

/// The `k` largest by score, sorted descending; equal scores keep their
/// order (the lower index first).
fn top_k(mut items: Vec<(f32, usize, usize)>, k: usize) -> Vec<(f32, usize, usize)> {
    let k = k.min(items.len());
    let by_score = |a: &(f32, usize, usize), b: &(f32, usize, usize)| {
        b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal)
    };
    if k < items.len() {
        items.select_nth_unstable_by(k, |a, b| by_score(a, b).then((a.1, a.2).cmp(&(b.1, b.2))));
        items.truncate(k);
    }
    items.sort_by(|a, b| by_score(a, b).then((a.1, a.2).cmp(&(b.1, b.2))));
    items
}
