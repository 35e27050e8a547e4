//! `xlpipe bench search`: exact search and the whole LAReQA evaluation on
//! an XQuAD-R-sized pool, next to numpy (`bench_numpy_search.py`) in the
//! same run.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::Command;

use anyhow::Context;

use xlpipe_eval::embeddings::Embeddings;
use xlpipe_eval::search::{for_each_query, TrecOrder};
use xlpipe_ml::rng::SplitMix64;

use super::lareqa::{evaluate, TrecOptions};
use crate::bench::median_ms;

/// `xlpipe bench search`: exact search over a pool shaped like XQuAD-R's
/// multilingual one (13,014 candidates, 13,090 queries, 11 languages, 384
/// dimensions), next to numpy matmul + argsort in the same run.
///
/// The vectors are synthetic but shaped like real embeddings: a candidate is
/// its sentence's meaning plus a language direction plus noise, a question
/// is its answer's meaning plus its own language and more noise, so the
/// relevant answers rank high but not first, as with a real encoder.
pub fn report(repeat: usize, python: &str) -> anyhow::Result<String> {
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
            .args(["-c", include_str!("bench_numpy_search.py")])
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
