//! `evaluate_adhoc`: ad-hoc passage retrieval with graded judgements
//! (MIRACL and other TREC-style tasks): queries against a corpus.
//!
//! ```toml
//! [stages.miracl_eval]
//! kind = "evaluate_adhoc"
//! inputs.data = "miracl_de"             # a `miracl` reader's output (qrels)
//! inputs.queries = "miracl_de_queries"  # encode of "queries" (id = "qid")
//! inputs.corpus = "miracl_de_corpus"    # encode of "corpus" (id = "docid")
//! depth = 100
//! ```
//!
//! Each query ranks the whole corpus by cosine; the top `depth` form the
//! run, scored with trec_eval semantics against the graded qrels (a
//! passage is relevant above 0, gains are the grades): `ndcg_10` and
//! `recall_100` as MIRACL reports them, plus `map_100` and `mrr_100`
//! (depth in the name: they see only the run). Queries without a relevant
//! passage are left out, as trec_eval does for queries without judgements.
//!
//! Output folder `results`: `results.parquet` and `query_results.parquet`
//! (the results format of `xlpipe_eval::results`, setting `adhoc`: the
//! macro average over languages, then one row per query language),
//! `metrics.parquet` (lang, queries, metrics),
//! `per_query.parquet`, `summary.json` (macro average over languages) and
//! `trec/adhoc.run` / `trec/adhoc.qrels`.

use std::collections::{BTreeMap, HashMap};

use polars::prelude::Column;
use serde::{Deserialize, Serialize};

use xlpipe_eval::embeddings::Embeddings;
use xlpipe_eval::metrics::{evaluate_query, write_qrels, write_run, Qrels, QueryMetrics, Run};
use xlpipe_eval::results::{Results, ADHOC_METRICS, ALL};
use xlpipe_eval::search::{for_each_query, TrecOrder};
use xlpipe_stage_api::table::{integers, read_parquet, string_column, strings, write_parquet};
use xlpipe_stage_api::{InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct EvaluateAdhocStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdhocParams {
    #[serde(default = "default_depth")]
    depth: usize,
    /// The dataset's name in reports (default: the stage's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dataset: Option<String>,
}

fn default_depth() -> usize {
    100
}

/// A query's metrics in the order of [`ADHOC_METRICS`].
fn values(m: &QueryMetrics) -> [f64; 4] {
    [
        m.ndcg_10,
        m.recall[&100],
        m.average_precision,
        m.reciprocal_rank,
    ]
}

impl TypedStage for EvaluateAdhocStage {
    type Params = AdhocParams;
    const KIND: &'static str = "evaluate_adhoc";
    // 2: also writes the results format the report reads.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "ad-hoc retrieval with graded qrels (MIRACL): nDCG@10, R@100 over a top-100 run";

    fn validate(&self, p: AdhocParams, _env: &ParamsEnv) -> Result<AdhocParams, ParamError> {
        if p.depth < 100 {
            return Err(ParamError::new(
                "depth",
                "must be at least 100 (recall_100 needs the top 100)",
            ));
        }
        Ok(p)
    }

    fn interface_for(&self, _p: &AdhocParams, _inputs: &[String]) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![
                InputSlot::one("data"),
                InputSlot::one("queries"),
                InputSlot::one("corpus"),
            ],
            ..Interface::producing(&["results"])
        })
    }

    fn execute(&self, p: &AdhocParams, ctx: &StageContext) -> anyhow::Result<()> {
        let queries = Embeddings::read(ctx.input("queries")?)?;
        let corpus = Embeddings::read(ctx.input("corpus")?)?;
        let frame = read_parquet(&ctx.input("data")?.join("qrels.parquet"))?;
        let mut qrels = Qrels::new();
        for ((qid, docid), grade) in strings(&frame, "qid")?
            .into_iter()
            .zip(strings(&frame, "docid")?)
            .zip(integers(&frame, "relevance")?)
        {
            qrels.entry(qid).or_default().insert(docid, grade);
        }
        let order = TrecOrder::new(&corpus.ids);
        let everything: Vec<usize> = (0..corpus.ids.len()).collect();
        let ranked = for_each_query(&queries, &corpus, |q, scores| {
            let judged = qrels.get(&queries.ids[q])?;
            if !judged.values().any(|&g| g > 0) {
                return None;
            }
            let ranking: Vec<(String, f64)> = order
                .top(scores, &everything, p.depth)
                .into_iter()
                .map(|c| (corpus.ids[c].clone(), scores[c] as f64))
                .collect();
            let metrics = evaluate_query(&ranking, judged, &[100]);
            Some((q, ranking, metrics))
        })?;
        let ranked: Vec<_> = ranked.into_iter().flatten().collect();
        anyhow::ensure!(
            !ranked.is_empty(),
            "no query has a relevant passage in the qrels (do the query ids match?)"
        );

        let out = ctx.output("results");
        std::fs::create_dir_all(out.join("trec"))?;
        let mut run = Run::new();
        let mut judged = Qrels::new();
        for (q, ranking, _) in &ranked {
            let qid = &queries.ids[*q];
            run.insert(qid.clone(), ranking.clone());
            judged.insert(qid.clone(), qrels[qid].clone());
        }
        write_run(&out.join("trec/adhoc.run"), &run, "xlpipe")?;
        write_qrels(&out.join("trec/adhoc.qrels"), &judged)?;

        let column = |i: usize| -> Vec<f64> { ranked.iter().map(|r| values(&r.2)[i]).collect() };
        let mut per_query = vec![
            string_column(
                "lang",
                ranked.iter().map(|r| queries.langs[r.0].clone()).collect(),
            ),
            string_column(
                "qid",
                ranked.iter().map(|r| queries.ids[r.0].clone()).collect(),
            ),
        ];
        for (i, name) in ADHOC_METRICS.iter().enumerate() {
            per_query.push(Column::new((*name).into(), column(i)));
        }
        write_parquet(&out.join("per_query.parquet"), per_query)?;

        let mut by_lang: BTreeMap<&str, (usize, [f64; 4])> = BTreeMap::new();
        for (q, _, metrics) in &ranked {
            let entry = by_lang.entry(queries.langs[*q].as_str()).or_default();
            entry.0 += 1;
            for (sum, v) in entry.1.iter_mut().zip(values(metrics)) {
                *sum += v;
            }
        }
        let means: Vec<(&str, usize, [f64; 4])> = by_lang
            .iter()
            .map(|(lang, (n, sums))| (*lang, *n, sums.map(|s| s / *n as f64)))
            .collect();
        let mut metrics = vec![
            string_column("lang", means.iter().map(|m| m.0.to_string()).collect()),
            Column::new(
                "queries".into(),
                means.iter().map(|m| m.1 as i64).collect::<Vec<_>>(),
            ),
        ];
        for (i, name) in ADHOC_METRICS.iter().enumerate() {
            metrics.push(Column::new(
                (*name).into(),
                means.iter().map(|m| m.2[i]).collect::<Vec<_>>(),
            ));
        }
        write_parquet(&out.join("metrics.parquet"), metrics)?;
        let macro_average: HashMap<&str, f64> = ADHOC_METRICS
            .iter()
            .enumerate()
            .map(|(i, name)| {
                (
                    *name,
                    means.iter().map(|m| m.2[i]).sum::<f64>() / means.len() as f64,
                )
            })
            .collect();
        let mut results = Results::new(p.dataset.as_deref().unwrap_or_default());
        for (metric, value) in ADHOC_METRICS.iter().map(|m| (*m, macro_average[m])) {
            results.push("adhoc", (ALL, ALL), metric, value, ranked.len());
        }
        for (lang, n, means) in &means {
            for (metric, value) in ADHOC_METRICS.into_iter().zip(means) {
                results.push("adhoc", (lang, ""), metric, *value, *n);
            }
        }
        for (i, metric) in ADHOC_METRICS.into_iter().enumerate() {
            results.add_query_means(
                "adhoc",
                metric,
                ranked
                    .iter()
                    .map(|r| (queries.ids[r.0].as_str(), values(&r.2)[i])),
            );
        }
        results.write(&out)?;
        std::fs::write(
            out.join("summary.json"),
            serde_json::to_vec_pretty(&serde_json::json!({
                "dataset": p.dataset,
                "adhoc": macro_average,
                "queries": ranked.len(),
            }))?,
        )?;
        Ok(())
    }
}
