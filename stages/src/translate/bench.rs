//! `xlpipe bench translate`: the burn M2M100 / NLLB model's decoding
//! throughput next to transformers' `generate`
//! (`bench_transformers_generate.py`) on the same model, texts, batches and
//! threads, in the same run.

use std::fmt::Write as _;
use std::path::Path;

use xlpipe_ml::nmt::GenerationConfig;

use crate::bench::{bench_words, python_baseline, PythonBaseline};

/// Decoding settings of `bench translate`.
pub struct TranslateBench<'a> {
    pub model: &'a Path,
    pub target: &'a str,
    pub sentences: usize,
    pub beams: usize,
    pub max_length: usize,
    pub batch: usize,
    pub python: &'a str,
}

/// `bench translate`: the burn M2M100 / NLLB model's decoding throughput
/// next to transformers' `generate` on the same model, texts, batches and
/// threads, in the same run; also says whether both produced the same text.
pub fn report(b: &TranslateBench) -> anyhow::Result<String> {
    let texts: Vec<String> = (0..b.sentences)
        .map(|i| bench_words(i, 6 + (i * 5) % 24, 11))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let config = GenerationConfig {
        beams: b.beams,
        max_length: b.max_length,
        ..GenerationConfig::default()
    };
    let (ours, our_seconds) =
        xlpipe_ml::nmt::translator::benchmark_cpu(b.model, b.target, config, b.batch, &texts)?;

    let theirs = python_baseline(
        &PythonBaseline {
            python: b.python,
            name: "translate",
            script: include_str!("bench_transformers_generate.py"),
            what: "transformers",
            needs: "torch and transformers",
        },
        b.model,
        &serde_json::json!({
            "texts": texts, "target": b.target, "beams": b.beams,
            "max_length": b.max_length, "batch": b.batch, "threads": threads,
        }),
        &[],
    )?;
    let their_seconds = theirs["seconds"].as_f64().unwrap_or(f64::NAN);
    let their_texts: Vec<String> =
        serde_json::from_value(theirs["outputs"].clone()).unwrap_or_default();
    let same = their_texts
        .iter()
        .zip(&ours)
        .filter(|(a, b)| a == b)
        .count();

    let mut out = String::new();
    let _ = writeln!(
        out,
        "translate benchmark: {} on CPU, {} sentences, beams {}, max_length {}, batch {}, {threads} threads",
        b.model.display(),
        b.sentences,
        b.beams,
        b.max_length,
        b.batch
    );
    let _ = writeln!(
        out,
        "  xlpipe (burn flex)            {:>8.3} s  {:>8.1} sentences/s",
        our_seconds,
        b.sentences as f64 / our_seconds
    );
    let _ = writeln!(
        out,
        "  transformers {:<8} generate {:>8.3} s  {:>8.1} sentences/s",
        theirs["transformers"].as_str().unwrap_or("?"),
        their_seconds,
        b.sentences as f64 / their_seconds
    );
    let _ = writeln!(
        out,
        "  speed ratio xlpipe / transformers: {:.2}x (above 1 is faster)",
        their_seconds / our_seconds
    );
    let _ = writeln!(out, "  identical translations: {same} of {}", b.sentences);
    Ok(out)
}
