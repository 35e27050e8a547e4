//! What the stages' benchmarks share: the timing loop, the Python
//! baselines they are measured against in the same run (scripts kept as
//! files beside each bench), and the text their inputs are cut from.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use xlpipe_ml::matmul::ProductCounts;

/// Median wall time of `repeat` runs of `f`, in milliseconds.
pub fn median_ms(repeat: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let clock = Instant::now();
        f()?;
        times.push(clock.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Words to build full-length training texts from (every text is cut at
/// the lengths, so each step sees the same number of tokens on both sides).
pub(crate) const BENCH_TEXT: &str = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, \
a region in France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, \
under their leader Rollo, agreed to swear fealty to King Charles III of West Francia. Through generations of \
assimilation and mixing with the native Frankish and Roman-Gaulish populations, their descendants would \
gradually merge with the Carolingian-based cultures of West Francia. Die Normannen waren ein Volk, das im \
zehnten Jahrhundert der Normandie ihren Namen gab. Los normandos fueron el pueblo que dio nombre a Normandía.";

/// `n` words of [`BENCH_TEXT`] from a place that depends on `i`, `stride`
/// words apart for consecutive `i`.
pub(crate) fn bench_words(i: usize, n: usize, stride: usize) -> String {
    let words: Vec<&str> = BENCH_TEXT.split_whitespace().collect();
    (0..n)
        .map(|k| words[(i * stride + k) % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// `count` answer sentences of SQuAD-like lengths (12 to 90 words), the
/// first cut at `first` (the text the training and encoding benches share).
pub(crate) fn answer_sentences(count: usize, first: usize) -> Vec<String> {
    (0..count)
        .map(|i| bench_words(i + first, 12 + (i * 29) % 79, 7))
        .collect()
}

/// The lines every model bench starts with (what the CPU has, which
/// kernels run, its measured f32 peak over `threads` threads), and that
/// peak in FLOP/s, for the fractions the bench prints.
pub(crate) fn machine_header(threads: usize) -> (String, f64) {
    let peak = xlpipe_ml::cpu::peak_f32_flops(0.5);
    let header = format!(
        "{}\nmeasured f32 peak (FMA, {threads} threads): {:.1} GFLOP/s\n",
        xlpipe_ml::cpu::describe(),
        peak * 1e-9
    );
    (header, peak)
}

/// The baselines' last argument: time PyTorch's bf16 autocast only where
/// the CPU has native bf16 products.
pub(crate) fn torch_bf16_arg() -> &'static str {
    let f = xlpipe_ml::cpu::Features::detect();
    if f.avx512_bf16 || f.amx_bf16 {
        "bf16"
    } else {
        "fp32"
    }
}

/// Why PyTorch's bf16 row is empty on a CPU without native bf16.
pub(crate) const TORCH_BF16_SKIPPED: &str = "this CPU has neither AVX512-BF16 nor AMX; PyTorch emulates bf16 there (measured on an AMD EPYC without them: 208 s/step against 18.6 s in fp32)";

/// Why the bf16 rows of the benches are empty on this build.
pub(crate) fn bf16_status() -> &'static str {
    if xlpipe_ml::cpu::Features::detect().amx_bf16 {
        "this build has no AMX kernel yet"
    } else {
        "this CPU has no AMX (bf16 would run as f32)"
    }
}

/// The products' achieved rate and its fraction of `peak`: those split
/// over all threads against the whole machine, those run one per thread
/// against one thread's share.
pub(crate) fn product_rate(p: &ProductCounts, peak: f64, threads: usize) -> String {
    let wide = p.wide_flops / p.wide_seconds.max(1e-12);
    let narrow = p.narrow_flops / p.narrow_thread_seconds.max(1e-12);
    let total = p.wide_flops + p.narrow_flops;
    format!(
        "{:.0} GFLOP/s = {:.0}% of peak (dense layers, {:.0}% of the FLOPs); attention {:.0}% of a thread's peak",
        wide * 1e-9,
        100.0 * wide / peak,
        100.0 * p.wide_flops / total.max(1.0),
        100.0 * narrow * threads as f64 / peak
    )
}

/// A Python script that measures the same work as a benchmark, in the same run.
pub(crate) struct PythonBaseline<'a> {
    pub python: &'a str,
    /// Names its temporary folder.
    pub name: &'a str,
    pub script: &'a str,
    /// What it runs, and what its Python needs, for the error message.
    pub what: &'a str,
    pub needs: &'a str,
}

/// Run `python SCRIPT MODEL DATA.json EXTRA...` and parse the JSON object
/// on the last line it prints.
pub(crate) fn python_baseline(
    b: &PythonBaseline,
    model: &Path,
    data: &serde_json::Value,
    extra: &[String],
) -> anyhow::Result<serde_json::Value> {
    let dir = std::env::temp_dir().join(format!("xlpipe-bench-{}-{}", b.name, std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("baseline.py");
    std::fs::write(&script, b.script)?;
    let data_file = dir.join("data.json");
    std::fs::write(&data_file, serde_json::to_vec(data)?)?;
    let output = Command::new(b.python)
        .arg(&script)
        .arg(model)
        .arg(&data_file)
        .args(extra)
        .output()
        .with_context(|| format!("running {}", b.python));
    let _ = std::fs::remove_dir_all(&dir);
    let output = output?;
    anyhow::ensure!(
        output.status.success(),
        "the {} baseline failed (needs {} in {}):\n{}",
        b.what,
        b.needs,
        b.python,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(
        output
            .stdout
            .split(|&b| b == b'\n')
            .rfind(|l| !l.is_empty())
            .unwrap_or_default(),
    )?)
}
