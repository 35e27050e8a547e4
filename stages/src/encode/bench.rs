//! `xlpipe bench encode`: a full-model evaluation encode on this CPU as
//! the encode stage runs it (length-sorted batches), next to
//! `SentenceTransformer.encode` (`bench_torch_encode.py`) in fp32 and under
//! bf16 autocast, on the same texts, cap, batch size and threads, in one
//! run; with the products' achieved FLOP/s against the measured peak.

use std::fmt::Write as _;
use std::path::Path;

use burn::tensor::backend::Backend;
use xlpipe_ml::matmul::{start_counting, stop_counting, ProductCounts};
use xlpipe_ml::model::{Encoder, TextTokenizer, TokenBatch};

use crate::bench::{
    answer_sentences, bf16_status, machine_header, product_rate, python_baseline, torch_bf16_arg,
    PythonBaseline, TORCH_BF16_SKIPPED,
};

/// Seconds of `repeat` timed passes (after a warm-up) of encoding `texts`
/// (prefix included) in length-sorted batches of `batch`, as the encode
/// stage does; the median pass, and the products' counts over all passes.
pub(crate) fn encode_passes<B: Backend>(
    encoder: &Encoder<B>,
    tokenizer: &TextTokenizer,
    texts: &[String],
    (max_len, batch): (usize, usize),
    repeat: usize,
    device: &B::Device,
) -> anyhow::Result<(f64, ProductCounts)> {
    let rows = tokenizer.rows(texts, max_len)?;
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| (rows[i].len(), i));
    let mut times = Vec::new();
    for pass in 0..=repeat {
        if pass == 1 {
            start_counting();
        }
        let clock = std::time::Instant::now();
        for chunk in order.chunks(batch) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| rows[i].as_slice()).collect();
            let (ids, mask) =
                TokenBatch::from_rows(&batch, tokenizer.pad_id()).tensors::<B>(device);
            let _ = encoder.embed(ids, mask).into_data();
        }
        if pass > 0 {
            times.push(clock.elapsed().as_secs_f64());
        }
    }
    let products = stop_counting();
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], products))
}

/// `xlpipe bench encode`: `texts` SQuAD-like answer sentences (12 to 90
/// words, "passage: " prefix, cut at 128 tokens) encoded by xlpipe and by
/// sentence-transformers in `python`.
pub fn report(
    model: &Path,
    texts: usize,
    batch: usize,
    repeat: usize,
    python: &str,
) -> anyhow::Result<String> {
    type B = burn::backend::Flex;
    let (prefix, max_len) = ("passage: ", 128);
    let sentences = answer_sentences(texts, 7);
    let prefixed: Vec<String> = sentences.iter().map(|t| format!("{prefix}{t}")).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (mut out, peak) = machine_header(threads);
    let device = Default::default();
    let tokenizer = TextTokenizer::for_model(model)?;
    let encoder: Encoder<B> =
        xlpipe_ml::model::load_encoder(model, xlpipe_ml::model::Pooling::Mean, &device)?;
    let tokens: usize = tokenizer
        .rows(&prefixed, max_len)?
        .iter()
        .map(Vec::len)
        .sum();
    let (ours, products) = encode_passes(
        &encoder,
        &tokenizer,
        &prefixed,
        (max_len, batch),
        repeat,
        &device,
    )?;
    let torch = python_baseline(
        &PythonBaseline {
            python,
            name: "encode",
            script: include_str!("bench_torch_encode.py"),
            what: "sentence-transformers",
            needs: "torch and sentence-transformers",
        },
        model,
        &serde_json::json!({
            "texts": sentences, "prefix": prefix, "max_len": max_len, "batch": batch,
        }),
        &[
            repeat.to_string(),
            threads.to_string(),
            torch_bf16_arg().into(),
        ],
    );
    let _ = writeln!(
        out,
        "\nencode: {}, {texts} answer sentences (12-90 words, {tokens} tokens), cap {max_len}, batch {batch}, {threads} threads, median of {repeat} passes",
        model.display()
    );
    let rate = |s: f64| texts as f64 / s;
    let _ = writeln!(
        out,
        "  xlpipe f32                        {ours:>7.3} s {:>7.1} texts/s {:>7.0} tokens/s  products {}",
        rate(ours),
        tokens as f64 / ours,
        product_rate(&products, peak, threads)
    );
    let _ = writeln!(
        out,
        "  xlpipe bf16                       not run: {}",
        bf16_status()
    );
    match torch {
        Ok(torch) => {
            let version = torch["torch"].as_str().unwrap_or("?").to_string();
            let seconds = |which: &str| torch[which]["median_seconds"].as_f64().unwrap_or(f64::NAN);
            for (which, label) in [("fp32", "fp32"), ("bf16", "bf16 autocast")] {
                if torch[which].is_null() {
                    let _ = writeln!(
                        out,
                        "  ST.encode, PyTorch {version} {label:<14} not run: {TORCH_BF16_SKIPPED}"
                    );
                    continue;
                }
                let s = seconds(which);
                let _ = writeln!(
                    out,
                    "  ST.encode, PyTorch {version} {label:<14} {s:>7.3} s {:>7.1} texts/s {:>7.0} tokens/s",
                    rate(s),
                    tokens as f64 / s
                );
            }
            let _ = writeln!(
                out,
                "  speed ratio xlpipe f32 / ST.encode fp32: {:.2}x, / ST.encode bf16 autocast: {:.2}x (above 1 is faster; NaN: not run)",
                seconds("fp32") / ours,
                seconds("bf16") / ours
            );
        }
        Err(err) => {
            let _ = writeln!(out, "  sentence-transformers baseline skipped: {err:#}");
        }
    }
    Ok(out)
}
