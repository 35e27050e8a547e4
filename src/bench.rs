//! Benchmarks that print ratios against a baseline measured in the same run.
//!
//! `xlpipe bench engine`: how long the engine itself takes on a big grid.
//! `xlpipe bench search`: exact search on an XQuAD-R-sized pool vs numpy.
//! `xlpipe bench train`: training step time vs PyTorch.
//!
//! Generates a grid of trivial `command` stages plus one collecting stage,
//! runs it once, then times the no-op rerun (everything cached) and `plan`.
//! The baseline, measured in the same run, is the floor any cache lookup must
//! pay: reading and parsing every record file once.

use std::fmt::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use indicatif::{MultiProgress, ProgressDrawTarget};

use crate::cache::{Cache, Record};
use crate::plan::plan;
use crate::registry::open_pipeline;
use crate::run::{run, RunOptions};

/// The no-op rerun target from the engine's design brief.
const TARGET_MS: f64 = 100.0;

pub fn engine(instances: usize, repeat: usize) -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("xlpipe-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = engine_in(&dir, instances, repeat.max(1));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn engine_in(dir: &Path, instances: usize, repeat: usize) -> anyhow::Result<String> {
    let (rows, cols) = if instances.is_multiple_of(10) && instances >= 10 {
        (instances / 10, 10)
    } else {
        (instances, 1)
    };
    let list = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let file = dir.join("grid.toml");
    std::fs::write(
        &file,
        format!(
            r#"[pipeline]
name = "bench-grid"

[grid]
x = [{}]
y = [{}]

[stages.leaf]
kind = "command"
cmd = "echo ${{x}} ${{y}} > {{outputs.out}}"
outputs = ["out"]

[stages.collect]
kind = "command"
inputs.leaves = "leaf[*]"
cmd = "cat {{inputs.leaves}} > {{outputs.out}}"
outputs = ["out"]
"#,
            list(rows),
            list(cols)
        ),
    )?;
    let cache_dir = dir.join("cache");
    let hidden = MultiProgress::with_draw_target(ProgressDrawTarget::hidden());
    let options = RunOptions {
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
        gpus: 1,
        ..RunOptions::default()
    };

    let exe = std::env::current_exe()?;
    let xlpipe_run = || {
        let mut command = Command::new(&exe);
        command
            .arg("--cache")
            .arg(&cache_dir)
            .arg("run")
            .arg(&file)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null());
        command
    };
    // The cold run in a quiet subprocess: a thousand stages log two thousand lines.
    let clock = Instant::now();
    let status = xlpipe_run().status().context("running xlpipe")?;
    anyhow::ensure!(status.success(), "the cold run failed");
    let cold_s = clock.elapsed().as_secs_f64();
    let total = open_pipeline(&file)?.instances.len();

    let noop = median_ms(repeat, || {
        let pipeline = open_pipeline(&file)?;
        let summary = run(&pipeline, &Cache::open(&cache_dir)?, &options, &hidden)?;
        anyhow::ensure!(summary.executed.is_empty(), "no-op rerun executed stages");
        Ok(())
    })?;
    let planning = median_ms(repeat, || {
        let pipeline = open_pipeline(&file)?;
        let forced = vec![false; pipeline.instances.len()];
        plan(&pipeline, &Cache::open(&cache_dir)?, &forced);
        Ok(())
    })?;
    let floor = median_ms(repeat, || {
        for shard in std::fs::read_dir(cache_dir.join("records"))? {
            for entry in std::fs::read_dir(shard?.path())? {
                let bytes = std::fs::read(entry?.path())?;
                serde_json::from_slice::<Record>(&bytes)?;
            }
        }
        Ok(())
    })?;
    let command = median_ms(repeat, || {
        let status = xlpipe_run().status().context("running xlpipe")?;
        anyhow::ensure!(status.success(), "xlpipe run failed");
        Ok(())
    })?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "engine benchmark: {rows}x{cols} grid of command stages + 1 collector = {total} instances, {} jobs, median of {repeat}",
        options.jobs
    );
    let _ = writeln!(out, "  cold run                           {cold_s:>9.2} s");
    let _ = writeln!(
        out,
        "  no-op rerun, in process            {noop:>9.1} ms  {:.2}x the {TARGET_MS} ms target, {:.1}x the floor",
        noop / TARGET_MS,
        noop / floor
    );
    let _ = writeln!(
        out,
        "  no-op rerun, whole `xlpipe run`    {command:>9.1} ms  {:.2}x the {TARGET_MS} ms target",
        command / TARGET_MS
    );
    let _ = writeln!(
        out,
        "  plan, in process                   {planning:>9.1} ms  {:.1}x the floor",
        planning / floor
    );
    let _ = writeln!(out, "  floor: read + parse every record   {floor:>9.1} ms");
    Ok(out)
}

fn median_ms(repeat: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let clock = Instant::now();
        f()?;
        times.push(clock.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The PyTorch side of `bench train`: sentence-transformers with
/// MultipleNegativesRankingLoss on the same model, batch, lengths, threads.
const TORCH_TRAIN_STEP: &str = r#"
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer, losses

model_dir, data_file, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = json.load(open(data_file))
torch.set_num_threads(threads)
torch.manual_seed(0)
model = SentenceTransformer(model_dir, device="cpu")
loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=0.01)

def features(texts, max_len):
    model.max_seq_length = max_len
    return model.tokenize(texts)

q = features(data["queries"], data["query_len"])
p = features(data["passages"], data["passage_len"])
tokens = int(q["attention_mask"].sum() + p["attention_mask"].sum())
times = []
for step in range(steps + 1):
    start = time.perf_counter()
    loss = loss_fn([dict(q), dict(p)], None)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    if step > 0:
        times.append(time.perf_counter() - start)
times.sort()
print(json.dumps({"median_seconds": times[len(times) // 2], "tokens_per_step": tokens, "torch": torch.__version__}))
"#;

/// Words to build full-length training texts from (every text is cut at
/// the lengths, so each step sees the same number of tokens on both sides).
const BENCH_TEXT: &str = "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, \
a region in France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, \
under their leader Rollo, agreed to swear fealty to King Charles III of West Francia. Through generations of \
assimilation and mixing with the native Frankish and Roman-Gaulish populations, their descendants would \
gradually merge with the Carolingian-based cultures of West Francia. Die Normannen waren ein Volk, das im \
zehnten Jahrhundert der Normandie ihren Namen gab. Los normandos fueron el pueblo que dio nombre a Normandía.";

/// `xlpipe bench train`: training step time and tokens/s of the model in
/// `model` on this CPU, next to PyTorch + sentence-transformers in `python`.
pub fn train(
    model: &Path,
    batch: usize,
    steps: usize,
    train_layers: usize,
    python: &str,
) -> anyhow::Result<String> {
    let words: Vec<&str> = BENCH_TEXT.split_whitespace().collect();
    let text = |i: usize, n: usize| -> String {
        (0..n)
            .map(|k| words[(i * 7 + k) % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };
    let queries: Vec<String> = (0..batch)
        .map(|i| format!("query: {}", text(i, 60)))
        .collect();
    let passages: Vec<String> = (0..batch)
        .map(|i| format!("passage: {}", text(i + batch, 220)))
        .collect();
    let lengths = (32, 128);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    let ours =
        xlpipe_stages::train::benchmark_cpu_steps(model, &queries, &passages, lengths, steps)?;

    let torch = python_baseline(
        &PythonBaseline {
            python,
            name: "train",
            script: TORCH_TRAIN_STEP,
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
    let words: Vec<&str> = BENCH_TEXT.split_whitespace().collect();
    let text = |i: usize, n: usize| -> String {
        (0..n)
            .map(|k| words[(i * 7 + k) % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };
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
    let modes = xlpipe_stages::train::benchmark_cpu_training(
        model,
        &queries,
        &passages,
        lengths,
        steps,
        train_layers,
    )?;
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
    let encodes = xlpipe_stages::train::benchmark_cpu_encoding(
        model,
        &sentences,
        "passage: ",
        128,
        train_layers,
        1,
    )?;
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

/// The numpy side of `bench search`: a plain matmul and a full argsort of
/// every query's scores, on the same vectors.
const NUMPY_SEARCH: &str = r#"
import json, sys, time
import numpy as np
q = np.fromfile(sys.argv[1], dtype=np.float32).reshape(int(sys.argv[3]), -1)
c = np.fromfile(sys.argv[2], dtype=np.float32).reshape(int(sys.argv[4]), -1)
start = time.perf_counter()
scores = q @ c.T
matmul = time.perf_counter() - start
ranking = np.argsort(-scores, axis=1)
total = time.perf_counter() - start
print(json.dumps({"matmul_seconds": matmul, "total_seconds": total, "numpy": np.__version__}))
"#;

/// `xlpipe bench search`: exact search over a pool shaped like XQuAD-R's
/// multilingual one (13,014 candidates, 13,090 queries, 11 languages, 384
/// dimensions), next to numpy matmul + argsort in the same run.
///
/// The vectors are synthetic but shaped like real embeddings: a candidate is
/// its sentence's meaning plus a language direction plus noise, a question
/// is its answer's meaning plus its own language and more noise, so the
/// relevant answers rank high but not first, as with a real encoder.
pub fn search(repeat: usize, python: &str) -> anyhow::Result<String> {
    use std::collections::HashMap;
    use xlpipe_eval::embeddings::Embeddings;
    use xlpipe_eval::search::{for_each_query, TrecOrder};
    use xlpipe_ml::rng::SplitMix64;
    use xlpipe_stages::evaluate::lareqa::{evaluate, TrecOptions};

    const LANGS: usize = 11;
    const SENTENCES: usize = 1183; // per language: 13,013 + 1 extra candidate
    const QUESTIONS: usize = 1190; // per language: 13,090
    const DIM: usize = 384;
    let mut rng = SplitMix64(11);
    let mut gaussian = move || {
        // Sum of uniforms: close enough to normal for spreading vectors.
        (0..4)
            .map(|_| (rng.next_u64() >> 11) as f32 / (1u64 << 53) as f32)
            .sum::<f32>()
            - 2.0
    };
    let mut random_vector =
        |scale: f32| -> Vec<f32> { (0..DIM).map(|_| gaussian() * scale).collect() };
    let meanings: Vec<Vec<f32>> = (0..SENTENCES + 1).map(|_| random_vector(1.0)).collect();
    let languages: Vec<Vec<f32>> = (0..LANGS).map(|_| random_vector(0.6)).collect();
    let mut embed = |meaning: usize, lang: usize, noise: f32| -> Vec<f32> {
        let noise = random_vector(noise);
        let v: Vec<f32> = (0..DIM)
            .map(|d| meanings[meaning][d] + languages[lang][d] + noise[d])
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect()
    };
    let mut candidates = Embeddings {
        ids: Vec::new(),
        langs: Vec::new(),
        dim: DIM,
        vectors: Vec::new(),
    };
    let mut questions = Embeddings {
        ids: Vec::new(),
        langs: Vec::new(),
        dim: DIM,
        vectors: Vec::new(),
    };
    let mut relevant: HashMap<String, Vec<usize>> = HashMap::new();
    for lang in 0..LANGS {
        let sentences = SENTENCES + usize::from(lang == 0);
        for s in 0..sentences {
            candidates.ids.push(format!("l{lang}:s{s}"));
            candidates.langs.push(format!("l{lang}"));
            candidates.vectors.extend(embed(s, lang, 0.5));
        }
        for q in 0..QUESTIONS {
            let answer = q % SENTENCES;
            questions.ids.push(format!("q{q}"));
            questions.langs.push(format!("l{lang}"));
            questions.vectors.extend(embed(answer, lang, 0.8));
            if lang == 0 {
                relevant.insert(
                    format!("q{q}"),
                    (0..LANGS)
                        .map(|l| l * SENTENCES + usize::from(l > 0) + answer)
                        .collect(),
                );
            }
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    let order = TrecOrder::new(&candidates.ids);
    let all: Vec<usize> = (0..candidates.ids.len()).collect();
    // The product alone, visiting each row as little as possible: the floor
    // under the ranking, to set against numpy's matmul.
    let product = median_ms(repeat, || {
        let ranked = for_each_query(&questions, &candidates, |_, scores| scores[0])?;
        anyhow::ensure!(ranked.len() == questions.ids.len());
        Ok(())
    })?;
    let multi = median_ms(repeat, || {
        let ranked = for_each_query(&questions, &candidates, |q, scores| {
            let ranks = order.ranks(scores, &all, &relevant[&questions.ids[q]]);
            (ranks, order.top(scores, &all, 10))
        })?;
        anyhow::ensure!(ranked.len() == questions.ids.len());
        Ok(())
    })?;
    let no_trec = TrecOptions {
        settings: Vec::new(),
        depth: 10,
    };
    let full = median_ms(repeat, || {
        evaluate(&questions, &candidates, &relevant, 10, &no_trec)?;
        Ok(())
    })?;

    let dir = std::env::temp_dir().join(format!("xlpipe-bench-search-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    std::fs::write(dir.join("q.f32"), bytes(&questions.vectors))?;
    std::fs::write(dir.join("c.f32"), bytes(&candidates.vectors))?;
    let mut numpy = Vec::new();
    for _ in 0..repeat {
        let output = Command::new(python)
            .args(["-c", NUMPY_SEARCH])
            .arg(dir.join("q.f32"))
            .arg(dir.join("c.f32"))
            .arg(questions.ids.len().to_string())
            .arg(candidates.ids.len().to_string())
            .output()
            .with_context(|| format!("running {python}"))?;
        anyhow::ensure!(
            output.status.success(),
            "the numpy baseline failed (needs numpy in {python}):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        numpy.push(serde_json::from_slice::<serde_json::Value>(&output.stdout)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let median = |key: &str| -> f64 {
        let mut v: Vec<f64> = numpy.iter().filter_map(|r| r[key].as_f64()).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1000.0
    };
    let (np_matmul, np_total) = (median("matmul_seconds"), median("total_seconds"));

    let mut out = String::new();
    let _ = writeln!(
        out,
        "search benchmark: {} queries x {} candidates ({LANGS} languages, {DIM} dims), {threads} threads, median of {repeat}",
        questions.ids.len(),
        candidates.ids.len()
    );
    let _ = writeln!(
        out,
        "  xlpipe multilingual pool: scores, ranks of the relevant, top 10   {:>8.0} ms  {:.2}x numpy's time, {:.2}x its matmul",
        multi,
        multi / np_total,
        multi / np_matmul
    );
    let _ = writeln!(
        out,
        "  xlpipe whole LAReQA evaluation (mono + cross + multi + bias)       {:>8.0} ms  {:.2}x numpy's time, {:.2}x its matmul",
        full,
        full / np_total,
        full / np_matmul
    );
    let _ = writeln!(
        out,
        "  xlpipe scores alone (the matrix product)                          {:>8.0} ms  {:.2}x numpy's matmul",
        product,
        product / np_matmul
    );
    let _ = writeln!(
        out,
        "  numpy {:<7} matmul + argsort of every row                     {:>8.0} ms  (matmul alone {:.0} ms)",
        numpy[0]["numpy"].as_str().unwrap_or("?"),
        np_total,
        np_matmul
    );
    Ok(out)
}

/// A Python script that measures the same work as a benchmark, in the same run.
struct PythonBaseline<'a> {
    python: &'a str,
    /// Names its temporary folder.
    name: &'a str,
    script: &'a str,
    /// What it runs, and what its Python needs, for the error message.
    what: &'a str,
    needs: &'a str,
}

/// Run `python SCRIPT MODEL DATA.json EXTRA...` and parse the JSON object
/// on the last line it prints.
fn python_baseline(
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
pub fn translate(b: &TranslateBench) -> anyhow::Result<String> {
    use xlpipe_ml::nmt::GenerationConfig;
    let words: Vec<&str> = BENCH_TEXT.split_whitespace().collect();
    let texts: Vec<String> = (0..b.sentences)
        .map(|i| {
            let n = 6 + (i * 5) % 24;
            (0..n)
                .map(|k| words[(i * 11 + k) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
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
            script: TRANSFORMERS_GENERATE,
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

/// The transformers side of `bench translate`: the same length-sorted
/// batches, source layout (`[language token] tokens </s>`) and settings.
const TRANSFORMERS_GENERATE: &str = r#"
import json, sys, time
import torch, transformers
model_dir, data = sys.argv[1], json.load(open(sys.argv[2]))
torch.set_num_threads(data["threads"])
tok = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json")
model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
def lang_id(code):
    for t in [code, {"es": "spa_Latn", "de": "deu_Latn", "zh": "zho_Hans", "en": "eng_Latn"}.get(code, code), f"__{code}__"]:
        i = tok.convert_tokens_to_ids(t)
        if i is not None and i != tok.unk_token_id:
            return i
    raise SystemExit(f"no language token for {code}")
src, tgt = lang_id("en"), lang_id(data["target"])
eos, pad = model.config.eos_token_id, model.config.pad_token_id
rows = [[src] + tok(t, add_special_tokens=False).input_ids + [eos] for t in data["texts"]]
order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
def run(indices):
    out = {}
    for start in range(0, len(indices), data["batch"]):
        chunk = indices[start:start + data["batch"]]
        width = max(len(rows[i]) for i in chunk)
        ids = torch.tensor([rows[i] + [pad] * (width - len(rows[i])) for i in chunk])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=(ids != pad).long(), forced_bos_token_id=tgt,
                                 num_beams=data["beams"], max_length=data["max_length"], do_sample=False)
        for i, text in zip(chunk, tok.batch_decode(gen, skip_special_tokens=True)):
            out[i] = text
    return out
run(order[:data["batch"]])
start = time.perf_counter()
out = run(order)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "outputs": [out[i] for i in range(len(rows))], "transformers": transformers.__version__}))
"#;
