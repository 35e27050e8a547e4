//! `xlpipe bench train`: seconds per step of our training next to
//! PyTorch with sentence-transformers (`bench_torch_train.py`, in the same
//! run); of full fine-tuning, of the top layers from text and from stored
//! states; and of evaluation encodes, on the grid's settings.

use std::fmt::Write as _;
use std::path::Path;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;

use super::trainer::{clip_norm, freeze, info_nce, scalar, Batcher, Trunk};
use super::TrainParams;
use crate::frozen_states::FrozenStates;
use xlpipe_ml::matmul::{start_counting, stop_counting, ProductCounts};
use xlpipe_ml::model::{load_encoder, Encoder, Pooling, TextTokenizer};
use xlpipe_ml::optim::AdamW;
use xlpipe_stage_api::parse_params;

use crate::bench::{
    answer_sentences, bench_words, bf16_status, machine_header, product_rate, python_baseline,
    torch_bf16_arg, PythonBaseline, TORCH_BF16_SKIPPED,
};

/// One way of training or encoding, timed by `xlpipe bench train`.
pub struct ModeTiming {
    pub mode: String,
    /// Median seconds per step (training) or per pass over the texts
    /// (encoding); the first, a warm-up, excluded.
    pub median_seconds: f64,
    /// Real and padded tokens per step or pass, both sides together.
    pub real_tokens: usize,
    pub padded_tokens: usize,
    /// What the matrix products did in the timed steps or passes.
    pub products: ProductCounts,
}

/// Training steps on one fixed batch of `queries` and `passages`
/// (unprefixed) with the training stage's own loss, optimizer, clipping
/// and E5 prefixes, on the CPU backend, four ways: every layer as one
/// padded batch per side (PyTorch's work); every layer as packed tokens
/// (as `train` runs it); the top `train_layers` from text, packed too; the
/// same from stored states.
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
    let modes: [(&str, bool); 4] = [
        ("all layers, one padded batch", false),
        ("all layers, packed tokens", false),
        ("top layers from text", true),
        ("top layers from stored states", true),
    ];
    let q: Vec<&str> = queries.iter().map(String::as_str).collect();
    let d: Vec<&str> = passages.iter().map(String::as_str).collect();
    let mut timings = Vec::new();
    for (index, (mode, partial)) in modes.into_iter().enumerate() {
        let table: toml::Table = format!(
            "alpha = 1.0\nsteps = {steps}\nquery_max_len = {}\npassage_max_len = {}\n{}",
            lengths.0,
            lengths.1,
            if partial {
                format!("train_layers = {train_layers}")
            } else {
                String::new()
            }
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
            tokenizer: Some(&tokenizer),
            p: &p,
            trunk,
        };
        let (mut real, mut padded) = (0, 0);
        for (texts, query) in [(&q, true), (&d, false)] {
            let lens: Vec<usize> = batcher
                .token_rows(texts, query)?
                .iter()
                .map(Vec::len)
                .collect();
            real += lens.iter().sum::<usize>();
            padded += if index == 0 {
                lens.len() * lens.iter().max().unwrap_or(&0)
            } else {
                lens.iter().sum()
            };
        }
        // One padded batch per side, the way PyTorch runs it; the trainer's
        // own path otherwise.
        let embed = |encoder: &Encoder<B>, texts: &[&str], query: bool| {
            if index == 0 {
                batcher.embed_padded(encoder, texts, query, &device)
            } else {
                batcher.embed_side(encoder, texts, query, &device)
            }
        };
        let mut optimizer = AdamW::new(p.weight_decay, clip_norm(p.max_grad_norm));
        let mut times = Vec::new();
        for step in 0..=steps {
            if step == 1 {
                start_counting();
            }
            let clock = std::time::Instant::now();
            let loss = info_nce(
                embed(&encoder, &q, true)?,
                embed(&encoder, &d, false)?,
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
        let products = stop_counting();
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
            products,
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
    let timing = |mode: String, (median_seconds, products)| ModeTiming {
        mode,
        median_seconds,
        real_tokens: real,
        padded_tokens: padded,
        products,
    };
    // All layers from text, as `xlpipe bench encode` times it.
    let from_text = crate::encode::bench::encode_passes(
        &encoder,
        &tokenizer,
        &prefixed,
        (max_len, 64),
        repeat,
        &device,
    )?;
    let mut times = Vec::new();
    for pass in 0..=repeat {
        if pass == 1 {
            start_counting();
        }
        let clock = std::time::Instant::now();
        for chunk in order.chunks(64) {
            let batch: Vec<&str> = chunk.iter().map(|&i| texts[i].as_str()).collect();
            let (x, mask) = states.batch::<B>(0, &batch, &device)?;
            let _ = encoder.embed_from(x, mask, cut).into_data();
        }
        if pass > 0 {
            times.push(clock.elapsed().as_secs_f64());
        }
    }
    let products = stop_counting();
    times.sort_by(f64::total_cmp);
    let timings = vec![
        timing("all layers from text".into(), from_text),
        timing(
            format!("top {train_layers} layers from stored states"),
            (times[times.len() / 2], products),
        ),
    ];
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

/// `xlpipe bench train`: a full fine-tuning step of the model in `model`
/// on this CPU (as `train` runs it, and as one padded batch), next to
/// PyTorch + sentence-transformers in `python`, fp32 and bf16 autocast, on
/// the same batch, in one run; then partial fine-tuning and encoding.
pub fn report(
    model: &Path,
    batch: usize,
    steps: usize,
    train_layers: usize,
    python: &str,
) -> anyhow::Result<String> {
    let (queries, passages) = varied_texts(batch);
    let lengths = (64, 128);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (mut out, peak) = machine_header(threads);
    let modes = benchmark_cpu_training(model, &queries, &passages, lengths, steps, train_layers)?;
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
            "queries": queries.iter().map(|t| format!("query: {t}")).collect::<Vec<_>>(),
            "passages": passages.iter().map(|t| format!("passage: {t}")).collect::<Vec<_>>(),
            "query_len": lengths.0, "passage_len": lengths.1,
        }),
        &[
            steps.to_string(),
            threads.to_string(),
            torch_bf16_arg().into(),
        ],
    );
    let _ = writeln!(
        out,
        "\nfull fine-tuning step: {}, batch {batch} of SQuAD-like lengths (queries 6-25 words, passages 12-90), caps {} / {}, {threads} threads, median of {steps} steps (same loss, clipping and AdamW on both sides)",
        model.display(),
        lengths.0,
        lengths.1
    );
    let step_tokens = modes[0].real_tokens;
    let rate = |s: f64| step_tokens as f64 / s;
    for m in &modes[..2] {
        let _ = writeln!(
            out,
            "  xlpipe f32, {:<28} {:>7.3} s/step {:>7.0} tokens/s  products {}",
            m.mode,
            m.median_seconds,
            rate(m.median_seconds),
            product_rate(&m.products, peak, threads)
        );
    }
    let _ = writeln!(
        out,
        "  xlpipe bf16                             not run: {}",
        bf16_status()
    );
    let ours = modes[1].median_seconds;
    match torch {
        Ok(torch) => {
            let version = torch["torch"].as_str().unwrap_or("?").to_string();
            let seconds = |which: &str| torch[which]["median_seconds"].as_f64().unwrap_or(f64::NAN);
            for (which, label) in [("fp32", "fp32"), ("bf16", "bf16 autocast")] {
                if torch[which].is_null() {
                    let _ = writeln!(
                        out,
                        "  PyTorch {version} {label:<22} not run: {}",
                        TORCH_BF16_SKIPPED
                    );
                    continue;
                }
                let _ = writeln!(
                    out,
                    "  PyTorch {version} {label:<22} {:>7.3} s/step {:>7.0} tokens/s  (sentence-transformers MNRL, pads each side to its longest text)",
                    seconds(which),
                    rate(seconds(which))
                );
            }
            let _ = writeln!(
                out,
                "  speed ratio xlpipe f32 (as train runs it) / PyTorch fp32: {:.2}x, / PyTorch bf16 autocast: {:.2}x (above 1 is faster; NaN: not run)",
                seconds("fp32") / ours,
                seconds("bf16") / ours
            );
            let _ = writeln!(
                out,
                "  speed ratio xlpipe f32 (one padded batch, PyTorch's work) / PyTorch fp32: {:.2}x",
                seconds("fp32") / modes[0].median_seconds
            );
        }
        // The rest needs no Python.
        Err(err) => {
            let _ = writeln!(out, "  PyTorch baseline skipped: {err:#}");
        }
    }
    out += &partial(&modes, batch, steps, lengths, peak, threads)?;
    out += &encoding(model, train_layers, peak, threads)?;
    Ok(out)
}

/// Texts of SQuAD-like lengths: questions of 6 to 25 words, answer
/// sentences of 12 to 90.
fn varied_texts(batch: usize) -> (Vec<String>, Vec<String>) {
    let queries = (0..batch)
        .map(|i| bench_words(i, 6 + (i * 7) % 20, 7))
        .collect();
    (queries, answer_sentences(batch, batch))
}

/// The second part of `bench train`: full against partial fine-tuning
/// (and from text against from stored states) on the same batch.
fn partial(
    modes: &[ModeTiming],
    batch: usize,
    steps: usize,
    lengths: (usize, usize),
    peak: f64,
    threads: usize,
) -> anyhow::Result<String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nfull against partial fine-tuning: the same batch {batch}, caps {} / {}, median of {steps} steps",
        lengths.0, lengths.1
    );
    let baseline = modes[0].median_seconds;
    for m in modes {
        let _ = writeln!(
            out,
            "  {:<44} {:>8.3} s/step  {:>5.2}x  real {:>6} / padded {:>6} tokens ({:.0}% padding); products {}",
            m.mode,
            m.median_seconds,
            baseline / m.median_seconds,
            m.real_tokens,
            m.padded_tokens,
            100.0 * (m.padded_tokens - m.real_tokens) as f64 / m.padded_tokens.max(1) as f64,
            product_rate(&m.products, peak, threads)
        );
    }
    Ok(out)
}

/// The last part of `bench train`: an evaluation encode with all layers
/// against the top layers from stored states.
fn encoding(
    model: &Path,
    train_layers: usize,
    peak: f64,
    threads: usize,
) -> anyhow::Result<String> {
    let sentences = answer_sentences(1000, 1000);
    let encodes = benchmark_cpu_encoding(model, &sentences, "passage: ", 128, train_layers, 1)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nencoding 1000 candidate sentences (as an evaluation encode per fine-tuned model; XQuAD-R has 13,014):"
    );
    let baseline = encodes[0].median_seconds;
    for m in &encodes {
        let _ = writeln!(
            out,
            "  {:<44} {:>8.3} s  {:>5.2}x  {:>7.0} texts/s; products {}",
            m.mode,
            m.median_seconds,
            baseline / m.median_seconds,
            sentences.len() as f64 / m.median_seconds,
            product_rate(&m.products, peak, threads)
        );
    }
    Ok(out)
}
