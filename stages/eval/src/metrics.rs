//! Ranking metrics with trec_eval semantics, so numbers match what the IR
//! community reports (checked against pytrec_eval in `tests/metrics.rs`).
//!
//! A run is ranked by score, descending, ties broken by document id
//! descending (as trec_eval does). A document is relevant when its qrel is
//! above zero; nDCG uses the qrel value as gain. Metric names state their
//! depth: `recall_10` is recall in the top 10.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::Context;

/// Judgements: query -> document -> relevance.
pub type Qrels = BTreeMap<String, HashMap<String, i64>>;
/// A run: query -> (document, score).
pub type Run = BTreeMap<String, Vec<(String, f64)>>;

/// Metrics of one query.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryMetrics {
    /// Average precision over the whole ranking (`map`).
    pub average_precision: f64,
    /// 1 / rank of the first relevant document (`recip_rank`).
    pub reciprocal_rank: f64,
    /// nDCG of the top 10 (`ndcg_cut_10`).
    pub ndcg_10: f64,
    /// Recall in the top k, for each requested k (`recall_k`).
    pub recall: BTreeMap<usize, f64>,
}

/// Sort a query's ranking the way trec_eval reads it.
pub fn trec_order(ranking: &mut [(String, f64)]) {
    ranking.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
}

/// Metrics of one query's ranking (any order) against its judgements.
pub fn evaluate_query(
    ranking: &[(String, f64)],
    qrels: &HashMap<String, i64>,
    recall_at: &[usize],
) -> QueryMetrics {
    let mut ranked = ranking.to_vec();
    trec_order(&mut ranked);
    let relevant_total = qrels.values().filter(|&&r| r > 0).count();
    let mut hits = 0usize;
    let mut precision_sum = 0.0;
    let mut reciprocal_rank = 0.0;
    let mut dcg = 0.0;
    let mut hits_at: Vec<usize> = Vec::with_capacity(ranked.len());
    for (i, (doc, _)) in ranked.iter().enumerate() {
        let rank = i + 1;
        let rel = qrels.get(doc).copied().unwrap_or(0);
        if rel > 0 {
            hits += 1;
            precision_sum += hits as f64 / rank as f64;
            if reciprocal_rank == 0.0 {
                reciprocal_rank = 1.0 / rank as f64;
            }
            if rank <= 10 {
                dcg += rel as f64 / (rank as f64 + 1.0).log2();
            }
        }
        hits_at.push(hits);
    }
    let mut ideal: Vec<i64> = qrels.values().copied().filter(|&r| r > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(10)
        .enumerate()
        .map(|(i, &r)| r as f64 / (i as f64 + 2.0).log2())
        .sum();
    let per_relevant = |x: f64| {
        if relevant_total == 0 {
            0.0
        } else {
            x / relevant_total as f64
        }
    };
    QueryMetrics {
        average_precision: per_relevant(precision_sum),
        reciprocal_rank,
        ndcg_10: if idcg > 0.0 { dcg / idcg } else { 0.0 },
        recall: recall_at
            .iter()
            .map(|&k| {
                let found = hits_at
                    .get(k.min(hits_at.len()).wrapping_sub(1))
                    .copied()
                    .unwrap_or(0);
                (k, per_relevant(found as f64))
            })
            .collect(),
    }
}

/// Read a TREC run file: `qid Q0 docid rank score tag` per line.
pub fn read_run(path: &Path) -> anyhow::Result<Run> {
    let mut run = Run::new();
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [qid, _, doc, _, score, ..] = fields.as_slice() else {
            anyhow::bail!(
                "{}:{}: expected `qid Q0 docid rank score tag`",
                path.display(),
                n + 1
            );
        };
        let score: f64 = score
            .parse()
            .with_context(|| format!("{}:{}: score `{score}`", path.display(), n + 1))?;
        run.entry(qid.to_string())
            .or_default()
            .push((doc.to_string(), score));
    }
    Ok(run)
}

/// Read a TREC qrels file: `qid iteration docid relevance` per line.
pub fn read_qrels(path: &Path) -> anyhow::Result<Qrels> {
    let mut qrels = Qrels::new();
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [qid, _, doc, rel] = fields.as_slice() else {
            anyhow::bail!(
                "{}:{}: expected `qid 0 docid relevance`",
                path.display(),
                n + 1
            );
        };
        let rel: i64 = rel
            .parse()
            .with_context(|| format!("{}:{}: relevance `{rel}`", path.display(), n + 1))?;
        qrels
            .entry(qid.to_string())
            .or_default()
            .insert(doc.to_string(), rel);
    }
    Ok(qrels)
}

/// Write a run in TREC format, each query in trec_eval order.
pub fn write_run(path: &Path, run: &Run, tag: &str) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (qid, ranking) in run {
        let mut ranked = ranking.clone();
        trec_order(&mut ranked);
        for (i, (doc, score)) in ranked.iter().enumerate() {
            writeln!(out, "{qid} Q0 {doc} {} {score} {tag}", i + 1)?;
        }
    }
    out.flush()?;
    Ok(())
}

pub fn write_qrels(path: &Path, qrels: &Qrels) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (qid, judged) in qrels {
        let mut docs: Vec<(&String, &i64)> = judged.iter().collect();
        docs.sort();
        for (doc, rel) in docs {
            writeln!(out, "{qid} 0 {doc} {rel}")?;
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
        pairs.iter().map(|(d, r)| (d.to_string(), *r)).collect()
    }

    fn r(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(d, s)| (d.to_string(), *s)).collect()
    }

    #[test]
    fn hand_computed_case_with_a_tie() {
        // Order: d4 (0.9), then the 0.5 tie broken by id descending: d2, d1; then d3.
        let m = evaluate_query(
            &r(&[("d1", 0.5), ("d2", 0.5), ("d3", 0.4), ("d4", 0.9)]),
            &q(&[("d1", 1), ("d2", 0), ("d3", 1)]),
            &[1, 10],
        );
        assert!((m.average_precision - (1.0 / 3.0 + 2.0 / 4.0) / 2.0).abs() < 1e-12);
        assert!((m.reciprocal_rank - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.recall[&1], 0.0);
        assert_eq!(m.recall[&10], 1.0);
        let dcg = 1.0 / 4f64.log2() + 1.0 / 5f64.log2();
        let idcg = 1.0 / 2f64.log2() + 1.0 / 3f64.log2();
        assert!((m.ndcg_10 - dcg / idcg).abs() < 1e-12);
    }

    #[test]
    fn graded_gains_and_nothing_relevant() {
        let m = evaluate_query(
            &r(&[("a", 3.0), ("b", 2.0)]),
            &q(&[("a", 1), ("b", 2)]),
            &[1],
        );
        let expected = (1.0 + 2.0 / 3f64.log2()) / (2.0 + 1.0 / 3f64.log2());
        assert!((m.ndcg_10 - expected).abs() < 1e-12);
        assert_eq!(m.recall[&1], 0.5);
        let none = evaluate_query(&r(&[("a", 1.0)]), &q(&[("a", 0)]), &[1]);
        assert_eq!(
            (none.average_precision, none.reciprocal_rank, none.ndcg_10),
            (0.0, 0.0, 0.0)
        );
    }
}
