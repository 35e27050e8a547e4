//! `evaluate_lareqa`: answer-sentence retrieval on XQuAD-R / MLQA-R in the
//! three settings of the paper, with language bias.
//!
//! ```toml
//! [stages.eval_xquad_r]
//! kind = "evaluate_lareqa"
//! inputs.data = "xquad_r"                      # the lareqa reader's output (qrels)
//! inputs.questions = "encode_xquad_questions"  # encode of questions (id = qid)
//! inputs.candidates = "encode_xquad_candidates" # encode of candidates (id = cid)
//! ```
//!
//! Exact search by cosine (the vectors are L2-normalised). Settings:
//! monolingual (queries and candidates of one language), cross-lingual
//! (every ordered pair of different languages) and multilingual (one pool
//! of every language's candidates; the answer in every language is
//! relevant). A query counts in a setting when it has a relevant candidate
//! in the pool. Metrics use trec_eval semantics over the full ranking
//! (score descending, ties by candidate id descending): `map`, `mrr`,
//! `recall_1`, `recall_10`, `ndcg_10`, per language (pair) and
//! macro-averaged.
//!
//! Language bias (multilingual pool): per query, the rank of its lowest
//! relevant candidate minus the rank of its highest (max-min rank distance,
//! arXiv 2305.09025), averaged per query language and macro-averaged; plus
//! each candidate language's share of the top 10. Lower distance is better.
//!
//! Output folder `results`: `metrics.parquet` (setting, query_lang,
//! candidate_lang, queries, the metrics), `bias.parquet`, `summary.json`.

use std::collections::{BTreeMap, HashMap};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use polars::prelude::Column;
use serde::{Deserialize, Serialize};

use crate::encode::Embeddings;
use crate::table::{read_parquet, string_column, strings, write_parquet};
use crate::{
    from_canonical, parse_params, to_canonical, InputSlot, Interface, ParamError, ParamsEnv, Stage,
    StageContext,
};

pub struct EvaluateLareqaStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvaluateParams {
    /// Top-k depth of the language-share statistic.
    #[serde(default = "d_k")]
    top_k: usize,
}

fn d_k() -> usize {
    10
}

impl Stage for EvaluateLareqaStage {
    fn kind(&self) -> &'static str {
        "evaluate_lareqa"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "LAReQA retrieval: mono / cross / multilingual mAP, MRR, R@k, nDCG@10 and language bias"
    }

    fn canonical_params(
        &self,
        params: &toml::Table,
        _env: &ParamsEnv,
    ) -> Result<serde_json::Value, ParamError> {
        let p: EvaluateParams = parse_params(params)?;
        if p.top_k == 0 {
            return Err(ParamError::new("top_k", "must be at least 1"));
        }
        Ok(to_canonical(&p))
    }

    fn interface(
        &self,
        _params: &serde_json::Value,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![
                InputSlot::one("data"),
                InputSlot::one("questions"),
                InputSlot::one("candidates"),
            ],
            ..Interface::producing(&["results"])
        })
    }

    fn run(&self, params: &serde_json::Value, ctx: &StageContext) -> anyhow::Result<()> {
        let p: EvaluateParams = from_canonical(params)?;
        let questions = Embeddings::read(ctx.input("questions")?)?;
        let candidates = Embeddings::read(ctx.input("candidates")?)?;
        anyhow::ensure!(
            questions.dim == candidates.dim,
            "question and candidate vectors differ in size"
        );
        let qrels = read_parquet(&ctx.input("data")?.join("qrels.parquet"))?;
        let cand_index: HashMap<&str, usize> = candidates
            .ids
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i))
            .collect();
        let mut relevant: HashMap<String, Vec<usize>> = HashMap::new();
        for cid in strings(&qrels, "cid")?.iter().zip(strings(&qrels, "qid")?) {
            let index = *cand_index.get(cid.0.as_str()).ok_or_else(|| {
                anyhow::anyhow!("qrels name candidate {} that was not encoded", cid.0)
            })?;
            relevant.entry(cid.1).or_default().push(index);
        }
        let evaluation = evaluate(&questions, &candidates, &relevant, p.top_k)?;
        evaluation.write(&ctx.output("results"))
    }
}

/// Metrics of one query in one pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scores {
    pub map: f64,
    pub mrr: f64,
    pub recall_1: f64,
    pub recall_10: f64,
    pub ndcg_10: f64,
}

impl Scores {
    /// From the (1-based) ranks of the relevant candidates.
    pub fn from_ranks(ranks: &mut [usize]) -> Scores {
        ranks.sort_unstable();
        let r = ranks.len() as f64;
        if ranks.is_empty() {
            return Scores::default();
        }
        let idcg: f64 = (0..ranks.len().min(10))
            .map(|i| 1.0 / (i as f64 + 2.0).log2())
            .sum();
        Scores {
            map: ranks
                .iter()
                .enumerate()
                .map(|(i, &k)| (i + 1) as f64 / k as f64)
                .sum::<f64>()
                / r,
            mrr: 1.0 / ranks[0] as f64,
            recall_1: ranks.iter().filter(|&&k| k <= 1).count() as f64 / r,
            recall_10: ranks.iter().filter(|&&k| k <= 10).count() as f64 / r,
            ndcg_10: ranks
                .iter()
                .filter(|&&k| k <= 10)
                .map(|&k| 1.0 / (k as f64 + 1.0).log2())
                .sum::<f64>()
                / idcg,
        }
    }

    fn add(&mut self, other: &Scores) {
        self.map += other.map;
        self.mrr += other.mrr;
        self.recall_1 += other.recall_1;
        self.recall_10 += other.recall_10;
        self.ndcg_10 += other.ndcg_10;
    }

    fn scaled(&self, by: f64) -> Scores {
        Scores {
            map: self.map * by,
            mrr: self.mrr * by,
            recall_1: self.recall_1 * by,
            recall_10: self.recall_10 * by,
            ndcg_10: self.ndcg_10 * by,
        }
    }
}

/// 1-based rank of `target` among `pool` by (score desc, id order desc), as trec_eval.
fn rank_of(target: usize, pool: &[usize], scores: &[f32], order: &[usize]) -> usize {
    let (s, o) = (scores[target], order[target]);
    1 + pool
        .iter()
        .filter(|&&c| scores[c] > s || (scores[c] == s && order[c] > o))
        .count()
}

pub struct Evaluation {
    /// (setting, query lang, candidate lang) -> (queries, summed scores).
    cells: BTreeMap<(String, String, String), (usize, Scores)>,
    /// Query language -> (queries, summed max-min rank distance).
    bias: BTreeMap<String, (usize, f64)>,
    /// Candidate language -> summed share of the top k.
    top_share: BTreeMap<String, f64>,
    multi_queries: usize,
}

pub fn evaluate(
    questions: &Embeddings,
    candidates: &Embeddings,
    relevant: &HashMap<String, Vec<usize>>,
    top_k: usize,
) -> anyhow::Result<Evaluation> {
    let dim = questions.dim;
    let mut langs: Vec<String> = candidates.langs.clone();
    langs.sort();
    langs.dedup();
    let pools: BTreeMap<&str, Vec<usize>> = langs
        .iter()
        .map(|l| {
            (
                l.as_str(),
                (0..candidates.ids.len())
                    .filter(|&c| &candidates.langs[c] == l)
                    .collect(),
            )
        })
        .collect();
    let all: Vec<usize> = (0..candidates.ids.len()).collect();
    // Tie-break order: candidate ids compared as strings.
    let mut by_id: Vec<usize> = all.clone();
    by_id.sort_by(|&a, &b| candidates.ids[a].cmp(&candidates.ids[b]));
    let mut order = vec![0usize; all.len()];
    for (position, &c) in by_id.iter().enumerate() {
        order[c] = position;
    }
    let device = Default::default();
    let cand_matrix: Tensor<Flex, 2> = Tensor::from_data(
        TensorData::new(candidates.vectors.clone(), [all.len(), dim]),
        &device,
    )
    .transpose();

    let mut eval = Evaluation {
        cells: BTreeMap::new(),
        bias: BTreeMap::new(),
        top_share: BTreeMap::new(),
        multi_queries: 0,
    };
    const CHUNK: usize = 512;
    for start in (0..questions.ids.len()).step_by(CHUNK) {
        let end = (start + CHUNK).min(questions.ids.len());
        let block: Tensor<Flex, 2> = Tensor::from_data(
            TensorData::new(
                questions.vectors[start * dim..end * dim].to_vec(),
                [end - start, dim],
            ),
            &device,
        );
        let scores: Vec<f32> = block
            .matmul(cand_matrix.clone())
            .into_data()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for (row, q) in (start..end).enumerate() {
            let Some(rel) = relevant.get(&questions.ids[q]) else {
                continue;
            };
            let s = &scores[row * all.len()..(row + 1) * all.len()];
            let qlang = &questions.langs[q];
            // Monolingual and cross-lingual: one pool per candidate language.
            for (clang, pool) in &pools {
                let mut ranks: Vec<usize> = rel
                    .iter()
                    .filter(|&&c| candidates.langs[c] == *clang)
                    .map(|&c| rank_of(c, pool, s, &order))
                    .collect();
                if ranks.is_empty() {
                    continue;
                }
                let setting = if qlang == clang { "mono" } else { "cross" };
                let cell = eval
                    .cells
                    .entry((setting.into(), qlang.clone(), clang.to_string()))
                    .or_default();
                cell.0 += 1;
                cell.1.add(&Scores::from_ranks(&mut ranks));
            }
            // Multilingual: every language's candidates in one pool.
            let mut ranks: Vec<usize> = rel.iter().map(|&c| rank_of(c, &all, s, &order)).collect();
            let cell = eval
                .cells
                .entry(("multi".into(), qlang.clone(), "*".into()))
                .or_default();
            cell.0 += 1;
            cell.1.add(&Scores::from_ranks(&mut ranks));
            let spread =
                (ranks.iter().max().unwrap_or(&0) - ranks.iter().min().unwrap_or(&0)) as f64;
            let bias = eval.bias.entry(qlang.clone()).or_default();
            bias.0 += 1;
            bias.1 += spread;
            let mut top: Vec<usize> = all.clone();
            let k = top_k.min(top.len());
            let cmp =
                |a: &usize, b: &usize| s[*b].total_cmp(&s[*a]).then(order[*b].cmp(&order[*a]));
            top.select_nth_unstable_by(k - 1, cmp);
            for &c in &top[..k] {
                *eval
                    .top_share
                    .entry(candidates.langs[c].clone())
                    .or_default() += 1.0 / k as f64;
            }
            eval.multi_queries += 1;
        }
    }
    Ok(eval)
}

impl Evaluation {
    /// Macro average of one setting over its cells.
    pub fn macro_average(&self, setting: &str) -> Option<Scores> {
        let cells: Vec<Scores> = self
            .cells
            .iter()
            .filter(|((s, _, _), _)| s == setting)
            .map(|(_, (n, sum))| sum.scaled(1.0 / *n as f64))
            .collect();
        let mut total = Scores::default();
        cells.iter().for_each(|c| total.add(c));
        (!cells.is_empty()).then(|| total.scaled(1.0 / cells.len() as f64))
    }

    /// Mean max-min rank distance, macro-averaged over query languages.
    pub fn macro_bias(&self) -> f64 {
        let per_lang: Vec<f64> = self.bias.values().map(|(n, sum)| sum / *n as f64).collect();
        per_lang.iter().sum::<f64>() / per_lang.len().max(1) as f64
    }

    fn write(&self, out: &std::path::Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(out)?;
        let rows: Vec<(&(String, String, String), Scores, usize)> = self
            .cells
            .iter()
            .map(|(k, (n, sum))| (k, sum.scaled(1.0 / *n as f64), *n))
            .collect();
        let f = |get: fn(&Scores) -> f64| rows.iter().map(|r| get(&r.1)).collect::<Vec<f64>>();
        write_parquet(
            &out.join("metrics.parquet"),
            vec![
                string_column("setting", rows.iter().map(|r| r.0 .0.clone()).collect()),
                string_column("query_lang", rows.iter().map(|r| r.0 .1.clone()).collect()),
                string_column(
                    "candidate_lang",
                    rows.iter().map(|r| r.0 .2.clone()).collect(),
                ),
                Column::new(
                    "queries".into(),
                    rows.iter().map(|r| r.2 as i64).collect::<Vec<_>>(),
                ),
                Column::new("map".into(), f(|s| s.map)),
                Column::new("mrr".into(), f(|s| s.mrr)),
                Column::new("recall_1".into(), f(|s| s.recall_1)),
                Column::new("recall_10".into(), f(|s| s.recall_10)),
                Column::new("ndcg_10".into(), f(|s| s.ndcg_10)),
            ],
        )?;
        write_parquet(
            &out.join("bias.parquet"),
            vec![
                string_column("query_lang", self.bias.keys().cloned().collect()),
                Column::new(
                    "max_min_rank_distance".into(),
                    self.bias
                        .values()
                        .map(|(n, s)| s / *n as f64)
                        .collect::<Vec<_>>(),
                ),
            ],
        )?;
        let summary = |s: Option<Scores>| {
            s.map(|s| serde_json::json!({"map": s.map, "mrr": s.mrr, "recall_1": s.recall_1, "recall_10": s.recall_10, "ndcg_10": s.ndcg_10}))
        };
        let shares: BTreeMap<&String, f64> = self
            .top_share
            .iter()
            .map(|(l, s)| (l, s / self.multi_queries.max(1) as f64))
            .collect();
        std::fs::write(
            out.join("summary.json"),
            serde_json::to_vec_pretty(&serde_json::json!({
                "mono": summary(self.macro_average("mono")),
                "cross": summary(self.macro_average("cross")),
                "multi": summary(self.macro_average("multi")),
                "max_min_rank_distance": self.macro_bias(),
                "top_10_language_share": shares,
            }))?,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::metrics::evaluate_query;

    #[test]
    fn rank_based_scores_equal_trec_eval_semantics() {
        // Scores with ties; ids decide ties. Compare with evaluate_query,
        // which is checked against pytrec_eval.
        let scores = [0.5f32, 0.9, 0.5, 0.1, 0.5, 0.7];
        let ids = ["c0", "c1", "c2", "c3", "c4", "c5"];
        let mut by_id: Vec<usize> = (0..6).collect();
        by_id.sort_by_key(|&i| ids[i]);
        let order: Vec<usize> = (0..6)
            .map(|i| by_id.iter().position(|&x| x == i).unwrap())
            .collect();
        let pool: Vec<usize> = (0..6).collect();
        for relevant in [vec![0usize], vec![2, 3], vec![0, 2, 4], vec![1, 5, 3]] {
            let mut ranks: Vec<usize> = relevant
                .iter()
                .map(|&c| rank_of(c, &pool, &scores, &order))
                .collect();
            let ours = Scores::from_ranks(&mut ranks);
            let ranking: Vec<(String, f64)> = (0..6)
                .map(|i| (ids[i].to_string(), scores[i] as f64))
                .collect();
            let qrels = relevant.iter().map(|&c| (ids[c].to_string(), 1)).collect();
            let reference = evaluate_query(&ranking, &qrels, &[1, 10]);
            assert!(
                (ours.map - reference.average_precision).abs() < 1e-12,
                "{relevant:?}"
            );
            assert!((ours.mrr - reference.reciprocal_rank).abs() < 1e-12);
            assert!((ours.ndcg_10 - reference.ndcg_10).abs() < 1e-12);
            assert_eq!(ours.recall_1, reference.recall[&1]);
            assert_eq!(ours.recall_10, reference.recall[&10]);
        }
    }
}
