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
//! Output folder `results`: `results.parquet` and `query_results.parquet`
//! (the results format of `xlpipe_eval::results`, what `report` reads),
//! `metrics.parquet` (setting, query_lang,
//! candidate_lang, queries, the metrics), `per_query.parquet` (the same per
//! query, plus its max-min rank distance in the multilingual pool: what
//! paired tests need), `bias.parquet`, `summary.json`, and `trec/` with
//! `<setting>.run` / `<setting>.qrels` for pytrec_eval, ranx or trec_eval
//! (query names `query_lang/candidate_lang/qid`, `*` for the multilingual
//! pool). The run files hold the top `trec_depth` (default 10; 0 = whole
//! pool) of each ranking, for the settings in `trec_settings` (default all
//! three); the metrics above always use the whole ranking. `dataset` names
//! the set in reports (default: the stage's name).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use polars::prelude::Column;
use serde::{Deserialize, Serialize};

use xlpipe_eval::embeddings::Embeddings;
use xlpipe_eval::results::{Results, ALL, ANY, BIAS, LAREQA_METRICS};
use xlpipe_eval::search::{for_each_query, TrecOrder};
use xlpipe_stage_api::table::{read_parquet, string_column, strings, write_parquet};
use xlpipe_stage_api::{InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct EvaluateLareqaStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    /// Top-k depth of the language-share statistic.
    #[serde(default = "default_depth")]
    top_k: usize,
    /// Ranked candidates per query in the TREC run files (0: whole pool).
    #[serde(default = "default_depth")]
    trec_depth: usize,
    /// Settings whose TREC run and qrels files are written.
    #[serde(default = "default_trec_settings")]
    trec_settings: Vec<Setting>,
    /// The dataset's name in reports (default: the stage's name), so that
    /// evaluations of different models on one set line up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dataset: Option<String>,
}

fn default_depth() -> usize {
    10
}

fn default_trec_settings() -> Vec<Setting> {
    vec![Setting::Mono, Setting::Cross, Setting::Multi]
}

impl TypedStage for EvaluateLareqaStage {
    type Params = EvaluateParams;
    const KIND: &'static str = "evaluate_lareqa";
    // 4: also writes the results format the report reads.
    const VERSION: u32 = 4;
    const SUMMARY: &'static str =
        "LAReQA retrieval: mono / cross / multilingual mAP, MRR, R@k, nDCG@10 and language bias";

    fn validate(
        &self,
        mut p: EvaluateParams,
        _env: &ParamsEnv,
    ) -> Result<EvaluateParams, ParamError> {
        if p.top_k == 0 {
            return Err(ParamError::new("top_k", "must be at least 1"));
        }
        p.trec_settings.sort();
        p.trec_settings.dedup();
        Ok(p)
    }

    fn interface_for(
        &self,
        _p: &EvaluateParams,
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

    fn execute(&self, p: &EvaluateParams, ctx: &StageContext) -> anyhow::Result<()> {
        let questions = Embeddings::read(ctx.input("questions")?)?;
        let candidates = Embeddings::read(ctx.input("candidates")?)?;
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
        let trec = TrecOptions {
            settings: p.trec_settings.clone(),
            depth: p.trec_depth,
        };
        let evaluation = evaluate(&questions, &candidates, &relevant, p.top_k, &trec)?;
        evaluation.write(&ctx.output("results"), &trec, p.dataset.as_deref())
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

    /// The values in the order of [`LAREQA_METRICS`].
    fn values(&self) -> [f64; 5] {
        [
            self.map,
            self.mrr,
            self.recall_1,
            self.recall_10,
            self.ndcg_10,
        ]
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

/// A setting of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Setting {
    Mono,
    Cross,
    Multi,
}

impl Setting {
    pub fn name(self) -> &'static str {
        match self {
            Setting::Mono => "mono",
            Setting::Cross => "cross",
            Setting::Multi => "multi",
        }
    }
}

/// One query ranked in one pool.
struct PoolResult {
    setting: Setting,
    /// Candidate language of the pool (`*` for the multilingual pool).
    candidate_lang: String,
    scores: Scores,
    /// Its relevant candidates, and the top of the ranking with scores,
    /// kept for the TREC files.
    relevant: Vec<usize>,
    top: Vec<(usize, f32)>,
}

/// Everything one query contributes.
struct QueryResult {
    query: usize,
    pools: Vec<PoolResult>,
    /// Max-min rank distance of its relevant candidates in the multilingual pool.
    rank_spread: usize,
    /// The multilingual pool's top k (for the language share).
    top_k: Vec<usize>,
}

/// What the TREC files hold.
pub struct TrecOptions {
    pub settings: Vec<Setting>,
    /// Ranked candidates per query (0: the whole pool).
    pub depth: usize,
}

pub struct Evaluation {
    queries: Vec<QueryResult>,
    query_ids: Vec<String>,
    query_langs: Vec<String>,
    candidate_ids: Vec<String>,
    /// Candidate language -> summed share of the top k.
    top_share: BTreeMap<String, f64>,
}

pub fn evaluate(
    questions: &Embeddings,
    candidates: &Embeddings,
    relevant: &HashMap<String, Vec<usize>>,
    top_k: usize,
    trec: &TrecOptions,
) -> anyhow::Result<Evaluation> {
    let mut langs: Vec<String> = candidates.langs.clone();
    langs.sort();
    langs.dedup();
    let pools: Vec<(&str, Vec<usize>)> = langs
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
    let order = TrecOrder::new(&candidates.ids);
    let keep_top = |setting: Setting, scores: &[f32], pool: &[usize]| -> Vec<(usize, f32)> {
        if trec.settings.contains(&setting) {
            order
                .top(scores, pool, trec.depth)
                .into_iter()
                .map(|c| (c, scores[c]))
                .collect()
        } else {
            Vec::new()
        }
    };
    let results = for_each_query(questions, candidates, |q, s| {
        let rel = relevant.get(&questions.ids[q])?;
        let qlang = &questions.langs[q];
        let mut pool_results = Vec::new();
        // Monolingual and cross-lingual: one pool per candidate language.
        for (clang, pool) in &pools {
            let in_pool: Vec<usize> = rel
                .iter()
                .copied()
                .filter(|&c| candidates.langs[c] == *clang)
                .collect();
            if in_pool.is_empty() {
                continue;
            }
            let setting = if qlang == clang {
                Setting::Mono
            } else {
                Setting::Cross
            };
            pool_results.push(PoolResult {
                setting,
                candidate_lang: clang.to_string(),
                scores: Scores::from_ranks(&mut order.ranks(s, pool, &in_pool)),
                top: keep_top(setting, s, pool),
                relevant: in_pool,
            });
        }
        // Multilingual: every language's candidates in one pool.
        let mut ranks = order.ranks(s, &all, rel);
        let rank_spread = ranks.iter().max().unwrap_or(&0) - ranks.iter().min().unwrap_or(&0);
        pool_results.push(PoolResult {
            setting: Setting::Multi,
            candidate_lang: "*".into(),
            scores: Scores::from_ranks(&mut ranks),
            top: keep_top(Setting::Multi, s, &all),
            relevant: rel.clone(),
        });
        Some(QueryResult {
            query: q,
            pools: pool_results,
            rank_spread,
            top_k: order.top(s, &all, top_k),
        })
    })?;
    let queries: Vec<QueryResult> = results.into_iter().flatten().collect();
    let mut top_share = BTreeMap::new();
    for result in &queries {
        for &c in &result.top_k {
            *top_share.entry(candidates.langs[c].clone()).or_default() +=
                1.0 / result.top_k.len() as f64;
        }
    }
    Ok(Evaluation {
        queries,
        query_ids: questions.ids.clone(),
        query_langs: questions.langs.clone(),
        candidate_ids: candidates.ids.clone(),
        top_share,
    })
}

/// (setting, query lang, candidate lang) -> (queries, summed scores).
type Cells<'a> = BTreeMap<(Setting, &'a str, &'a str), (usize, Scores)>;

/// Macro average of one setting over its (query, candidate language) cells.
fn macro_average(cells: &Cells, setting: Setting) -> Option<Scores> {
    let means: Vec<Scores> = cells
        .iter()
        .filter(|((s, _, _), _)| *s == setting)
        .map(|(_, (n, sum))| sum.scaled(1.0 / *n as f64))
        .collect();
    let mut total = Scores::default();
    means.iter().for_each(|c| total.add(c));
    (!means.is_empty()).then(|| total.scaled(1.0 / means.len() as f64))
}

impl Evaluation {
    /// (setting, query lang, candidate lang) -> (queries, summed scores).
    fn cells(&self) -> Cells<'_> {
        let mut cells = Cells::new();
        for result in &self.queries {
            for pool in &result.pools {
                let cell = cells
                    .entry((
                        pool.setting,
                        self.query_langs[result.query].as_str(),
                        pool.candidate_lang.as_str(),
                    ))
                    .or_default();
                cell.0 += 1;
                cell.1.add(&pool.scores);
            }
        }
        cells
    }

    /// Query language -> (queries, mean max-min rank distance).
    fn bias(&self) -> BTreeMap<&str, (usize, f64)> {
        let mut sums: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
        for result in &self.queries {
            let entry = sums
                .entry(self.query_langs[result.query].as_str())
                .or_default();
            entry.0 += 1;
            entry.1 += result.rank_spread as f64;
        }
        sums.into_iter()
            .map(|(lang, (n, sum))| (lang, (n, sum / n as f64)))
            .collect()
    }

    /// Mean max-min rank distance, macro-averaged over query languages.
    pub fn macro_bias(&self) -> f64 {
        let bias = self.bias();
        bias.values().map(|(_, mean)| mean).sum::<f64>() / bias.len().max(1) as f64
    }

    /// The query's name in TREC files: one ranking per query and pool.
    fn trec_query(&self, query: usize, candidate_lang: &str) -> String {
        format!(
            "{}/{}/{}",
            self.query_langs[query], candidate_lang, self.query_ids[query]
        )
    }

    fn write(
        &self,
        out: &std::path::Path,
        trec: &TrecOptions,
        dataset: Option<&str>,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(out)?;
        let cells = self.cells();
        let rows: Vec<((Setting, &str, &str), Scores, usize)> = cells
            .iter()
            .map(|(k, (n, sum))| (*k, sum.scaled(1.0 / *n as f64), *n))
            .collect();
        let f = |get: fn(&Scores) -> f64| rows.iter().map(|r| get(&r.1)).collect::<Vec<f64>>();
        write_parquet(
            &out.join("metrics.parquet"),
            vec![
                string_column(
                    "setting",
                    rows.iter().map(|r| r.0 .0.name().to_string()).collect(),
                ),
                string_column(
                    "query_lang",
                    rows.iter().map(|r| r.0 .1.to_string()).collect(),
                ),
                string_column(
                    "candidate_lang",
                    rows.iter().map(|r| r.0 .2.to_string()).collect(),
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
        self.write_per_query(&out.join("per_query.parquet"))?;
        let bias = self.bias();
        write_parquet(
            &out.join("bias.parquet"),
            vec![
                string_column("query_lang", bias.keys().map(|l| l.to_string()).collect()),
                Column::new(
                    "max_min_rank_distance".into(),
                    bias.values().map(|(_, mean)| *mean).collect::<Vec<_>>(),
                ),
            ],
        )?;
        let summary = |s: Option<Scores>| {
            s.map(|s| serde_json::json!({"map": s.map, "mrr": s.mrr, "recall_1": s.recall_1, "recall_10": s.recall_10, "ndcg_10": s.ndcg_10}))
        };
        let shares: BTreeMap<&String, f64> = self
            .top_share
            .iter()
            .map(|(l, s)| (l, s / self.queries.len().max(1) as f64))
            .collect();
        std::fs::write(
            out.join("summary.json"),
            serde_json::to_vec_pretty(&serde_json::json!({
                "dataset": dataset,
                "mono": summary(macro_average(&cells, Setting::Mono)),
                "cross": summary(macro_average(&cells, Setting::Cross)),
                "multi": summary(macro_average(&cells, Setting::Multi)),
                "max_min_rank_distance": self.macro_bias(),
                "top_10_language_share": shares,
            }))?,
        )?;
        self.results(&cells, dataset).write(out)?;
        let trec_dir = out.join("trec");
        std::fs::create_dir_all(&trec_dir)?;
        for &setting in &trec.settings {
            self.write_trec(&trec_dir, setting)?;
        }
        Ok(())
    }

    /// The results format: per setting its macro average (languages
    /// [`ALL`]) and its cells, the bias macro-averaged and per query
    /// language, and per query the mean over the setting's pools.
    fn results(&self, cells: &Cells, dataset: Option<&str>) -> Results {
        let mut results = Results::new(dataset.unwrap_or_default());
        for setting in [Setting::Mono, Setting::Cross, Setting::Multi] {
            let name = setting.name();
            let pools: Vec<(&QueryResult, &PoolResult)> = self
                .queries
                .iter()
                .flat_map(|r| r.pools.iter().map(move |p| (r, p)))
                .filter(|(_, p)| p.setting == setting)
                .collect();
            if let Some(average) = macro_average(cells, setting) {
                let queries = pools
                    .iter()
                    .map(|(r, _)| r.query)
                    .collect::<std::collections::BTreeSet<_>>()
                    .len();
                for (metric, value) in LAREQA_METRICS.into_iter().zip(average.values()) {
                    results.push(name, (ALL, ALL), metric, value, queries);
                }
            }
            for ((_, query_lang, candidate_lang), (n, sum)) in
                cells.iter().filter(|((s, _, _), _)| *s == setting)
            {
                let mean = sum.scaled(1.0 / *n as f64);
                for (metric, value) in LAREQA_METRICS.into_iter().zip(mean.values()) {
                    results.push(name, (query_lang, candidate_lang), metric, value, *n);
                }
            }
            for (i, metric) in LAREQA_METRICS.into_iter().enumerate() {
                results.add_query_means(
                    name,
                    metric,
                    pools
                        .iter()
                        .map(|(r, p)| (self.query_ids[r.query].as_str(), p.scores.values()[i])),
                );
            }
        }
        if !self.queries.is_empty() {
            let multi = Setting::Multi.name();
            results.push(
                multi,
                (ALL, ALL),
                BIAS,
                self.macro_bias(),
                self.queries.len(),
            );
            for (lang, (queries, mean)) in self.bias() {
                results.push(multi, (lang, ANY), BIAS, mean, queries);
            }
            results.add_query_means(
                multi,
                BIAS,
                self.queries
                    .iter()
                    .map(|r| (self.query_ids[r.query].as_str(), r.rank_spread as f64)),
            );
        }
        results
    }

    /// One row per query and pool: what paired significance tests need.
    fn write_per_query(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let rows: Vec<(&QueryResult, &PoolResult)> = self
            .queries
            .iter()
            .flat_map(|r| r.pools.iter().map(move |p| (r, p)))
            .collect();
        let f = |get: fn(&Scores) -> f64| {
            rows.iter()
                .map(|(_, p)| get(&p.scores))
                .collect::<Vec<f64>>()
        };
        write_parquet(
            path,
            vec![
                string_column(
                    "setting",
                    rows.iter()
                        .map(|(_, p)| p.setting.name().to_string())
                        .collect(),
                ),
                string_column(
                    "query_lang",
                    rows.iter()
                        .map(|(r, _)| self.query_langs[r.query].clone())
                        .collect(),
                ),
                string_column(
                    "candidate_lang",
                    rows.iter().map(|(_, p)| p.candidate_lang.clone()).collect(),
                ),
                string_column(
                    "qid",
                    rows.iter()
                        .map(|(r, _)| self.query_ids[r.query].clone())
                        .collect(),
                ),
                Column::new("map".into(), f(|s| s.map)),
                Column::new("mrr".into(), f(|s| s.mrr)),
                Column::new("recall_1".into(), f(|s| s.recall_1)),
                Column::new("recall_10".into(), f(|s| s.recall_10)),
                Column::new("ndcg_10".into(), f(|s| s.ndcg_10)),
                Column::new(
                    "max_min_rank_distance".into(),
                    rows.iter()
                        .map(|(r, p)| (p.setting == Setting::Multi).then_some(r.rank_spread as f64))
                        .collect::<Vec<Option<f64>>>(),
                ),
            ],
        )
    }

    /// `<setting>.run` and `<setting>.qrels`; query names `qlang/clang/qid`.
    fn write_trec(&self, dir: &std::path::Path, setting: Setting) -> anyhow::Result<()> {
        let mut run = std::io::BufWriter::new(std::fs::File::create(
            dir.join(format!("{}.run", setting.name())),
        )?);
        let mut qrels = std::io::BufWriter::new(std::fs::File::create(
            dir.join(format!("{}.qrels", setting.name())),
        )?);
        for result in &self.queries {
            for pool in result.pools.iter().filter(|p| p.setting == setting) {
                let name = self.trec_query(result.query, &pool.candidate_lang);
                for (rank, (c, score)) in pool.top.iter().enumerate() {
                    writeln!(
                        run,
                        "{name} Q0 {} {} {score} xlpipe",
                        self.candidate_ids[*c],
                        rank + 1
                    )?;
                }
                let mut relevant: Vec<&str> = pool
                    .relevant
                    .iter()
                    .map(|&c| self.candidate_ids[c].as_str())
                    .collect();
                relevant.sort_unstable();
                for cid in relevant {
                    writeln!(qrels, "{name} 0 {cid} 1")?;
                }
            }
        }
        run.flush()?;
        qrels.flush()?;
        Ok(())
    }
}
