//! `xlpipe bench train`: seconds per step of our training next to
//! PyTorch with sentence-transformers (`bench_torch_train.py`, in the same
//! run); of full fine-tuning, of the top layers from text and from stored
//! states; and of evaluation encodes, on the grid's settings.

use std::fmt::Write as _;
use std::path::Path;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;

use super::trainer::{clip_norm, freeze, info_nce, scalar, Batcher, Trunk};
use super::{default_lr, default_max_grad_norm, default_scale, default_weight_decay, TrainParams};
use crate::frozen_states::FrozenStates;
use xlpipe_ml::model::{length_groups, load_encoder, Encoder, Pooling, TextTokenizer, TokenBatch};
use xlpipe_ml::optim::AdamW;
use xlpipe_stage_api::parse_params;

use crate::bench::{bench_words, python_baseline, PythonBaseline};

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

/// `xlpipe bench train`: training step time and tokens/s of the model in
/// `model` on this CPU, next to PyTorch + sentence-transformers in `python`.
pub fn report(
    model: &Path,
    batch: usize,
    steps: usize,
    train_layers: usize,
    python: &str,
) -> anyhow::Result<String> {
    let text = |i: usize, n: usize| bench_words(i, n, 7);
    let queries: Vec<String> = (0..batch)
        .map(|i| format!("query: {}", text(i, 60)))
        .collect();
    let passages: Vec<String> = (0..batch)
        .map(|i| format!("passage: {}", text(i + batch, 220)))
        .collect();
    let lengths = (32, 128);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    let ours = benchmark_cpu_steps(model, &queries, &passages, lengths, steps)?;

    let torch = python_baseline(
        &PythonBaseline {
            python,
            name: "train",
            script: include_str!("bench_torch_train.py"),
            what: "PyTorch",
            needs: "torch and sentence-transformers",
        },
        model,
        &serde_json::json!({
            "queries": queries, "passages": passages,
            "query_len": lengths.0, "passage_len": lengths.1,
        }),
        &[steps.to_string(), threads.to_string()],
    );

    let mut out = String::new();
    let _ = writeln!(
        out,
        "train benchmark: {} on CPU, batch {batch}, query <= {} / passage <= {} tokens, {threads} threads, median of {steps} steps",
        model.display(),
        lengths.0,
        lengths.1
    );
    let rate = |tokens: usize, s: f64| tokens as f64 / s;
    let _ = writeln!(
        out,
        "  xlpipe (burn flex)          {:>8.3} s/step  {:>9.0} tokens/s  ({} tokens/step)",
        ours.median_seconds,
        rate(ours.tokens_per_step, ours.median_seconds),
        ours.tokens_per_step
    );
    match torch {
        Ok(torch) => {
            let torch_seconds = torch["median_seconds"].as_f64().unwrap_or(f64::NAN);
            let torch_tokens = torch["tokens_per_step"].as_u64().unwrap_or(0) as usize;
            let _ = writeln!(
                out,
                "  PyTorch {:<8} (ST MNRL)  {:>8.3} s/step  {:>9.0} tokens/s  ({} tokens/step)",
                torch["torch"].as_str().unwrap_or("?"),
                torch_seconds,
                rate(torch_tokens, torch_seconds),
                torch_tokens
            );
            let _ = writeln!(
                out,
                "  speed ratio xlpipe / PyTorch: {:.2}x (above 1 is faster)",
                torch_seconds / ours.median_seconds
            );
        }
        // The partial fine-tuning comparison below needs no Python.
        Err(err) => {
            let _ = writeln!(out, "  PyTorch baseline skipped: {err:#}");
        }
    }
    out += &partial(model, batch, steps, train_layers)?;
    Ok(out)
}

/// Texts of SQuAD-like lengths for the partial fine-tuning comparison:
/// questions of 6 to 25 words, answer sentences of 12 to 90.
fn varied_texts(batch: usize) -> (Vec<String>, Vec<String>) {
    let text = |i: usize, n: usize| bench_words(i, n, 7);
    let queries = (0..batch).map(|i| text(i, 6 + (i * 7) % 20)).collect();
    let passages = (0..batch)
        .map(|i| text(i + batch, 12 + (i * 29) % 79))
        .collect();
    (queries, passages)
}

/// The second half of `bench train`: full against partial fine-tuning (and
/// from text against from stored states) on SQuAD-like lengths at the grid's
/// caps, then encoding with all layers against the top layers from states.
fn partial(
    model: &Path,
    batch: usize,
    steps: usize,
    train_layers: usize,
) -> anyhow::Result<String> {
    let (queries, passages) = varied_texts(batch);
    let lengths = (64, 128);
    let modes = benchmark_cpu_training(model, &queries, &passages, lengths, steps, train_layers)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\npartial fine-tuning: batch {batch} of SQuAD-like lengths (queries 6-25 words, passages 12-90), caps {} / {}, median of {steps} steps",
        lengths.0, lengths.1
    );
    let baseline = modes[0].median_seconds;
    for m in &modes {
        let _ = writeln!(
            out,
            "  {:<44} {:>8.3} s/step  {:>5.2}x  real {:>6} / padded {:>6} tokens ({:.0}% padding)",
            m.mode,
            m.median_seconds,
            baseline / m.median_seconds,
            m.real_tokens,
            m.padded_tokens,
            100.0 * (m.padded_tokens - m.real_tokens) as f64 / m.padded_tokens.max(1) as f64
        );
    }
    let sentences: Vec<String> = varied_texts(1000).1;
    let encodes = benchmark_cpu_encoding(model, &sentences, "passage: ", 128, train_layers, 1)?;
    let _ = writeln!(
        out,
        "\nencoding 1000 candidate sentences (as an evaluation encode per fine-tuned model; XQuAD-R has 13,014):"
    );
    let baseline = encodes[0].median_seconds;
    for m in &encodes {
        let _ = writeln!(
            out,
            "  {:<44} {:>8.3} s  {:>5.2}x  {:>7.0} texts/s",
            m.mode,
            m.median_seconds,
            baseline / m.median_seconds,
            sentences.len() as f64 / m.median_seconds
        );
    }
    Ok(out)
}
