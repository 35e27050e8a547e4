//! `evaluate_bitext`: bitext retrieval on parallel sentences (NTREX, FLORES,
//! TICO-19, Tatoeba): each sentence, as a query, must find its translation
//! among every sentence of the target language in its set.
//!
//! ```toml
//! [stages.flores_encoded]
//! kind = "encode"
//! inputs.model = "model"
//! inputs.texts = "flores"      # a `parallel` reader's output
//! table = "sentences"
//! text = "text"
//! id = "sid"                   # `set:line`: how translations are matched
//!
//! [stages.flores_eval]
//! kind = "evaluate_bitext"
//! inputs.sentences = "flores_encoded"
//! directions = "pivot"         # to and from `pivot` (default "en"); or "all"
//! ```
//!
//! Per direction (set, source language, target language): `accuracy_1`
//! (the translation ranked first) and `map` (with one relevant sentence,
//! the reciprocal rank), ranked by cosine in trec_eval's order, over the
//! whole target side. Both directions of every pair are scored.
//!
//! Output folder `results`: `results.parquet` and `query_results.parquet`
//! (the results format of `xlpipe_eval::results`, setting `bitext`: the
//! macro average over directions, then one row per direction, its source
//! language prefixed with `set:` where several sets hold that direction),
//! `metrics.parquet` (set, source_lang,
//! target_lang, queries, accuracy_1, map), `per_query.parquet`,
//! `summary.json` (macro averages over directions, and over the into- and
//! out-of-pivot directions), `trec/bitext.run` and `trec/bitext.qrels`
//! (query names `set/source/target/line`, top `trec_depth`, default 10).
//! `dataset` names the set in reports (default: the stage's name).

use std::collections::BTreeMap;
use std::io::Write;

use polars::prelude::Column;
use serde::{Deserialize, Serialize};

use xlpipe_eval::embeddings::Embeddings;
use xlpipe_eval::results::{Results, ALL, BITEXT_METRICS};
use xlpipe_eval::search::{for_each_query, TrecOrder};
use xlpipe_stage_api::table::{string_column, write_parquet};
use xlpipe_stage_api::{InputSlot, Interface, ParamError, StageContext, TypedStage};

pub struct EvaluateBitextStage;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Directions {
    /// Every language to and from the pivot.
    Pivot,
    /// Every ordered pair of languages in a set.
    All,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitextParams {
    #[serde(default = "default_directions")]
    directions: Directions,
    #[serde(default = "default_pivot")]
    pivot: String,
    #[serde(default = "default_trec_depth")]
    trec_depth: usize,
    /// The dataset's name in reports (default: the stage's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dataset: Option<String>,
}

fn default_directions() -> Directions {
    Directions::Pivot
}
fn default_pivot() -> String {
    "en".into()
}
fn default_trec_depth() -> usize {
    10
}

impl TypedStage for EvaluateBitextStage {
    type Params = BitextParams;
    const KIND: &'static str = "evaluate_bitext";
    // 2: also writes the results format the report reads.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "bitext retrieval on parallel sentences: accuracy@1 and mAP in both directions";

    fn interface_for(
        &self,
        _p: &BitextParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![InputSlot::one("sentences")],
            ..Interface::producing(&["results"])
        })
    }

    fn execute(&self, p: &BitextParams, ctx: &StageContext) -> anyhow::Result<()> {
        let all = Embeddings::read(ctx.input("sentences")?)?;
        let mut sets: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (row, sid) in all.ids.iter().enumerate() {
            let (set, _) = sid.rsplit_once(':').ok_or_else(|| {
                anyhow::anyhow!(
                    "sentence id `{sid}` is not `set:line`; encode the parallel sentences with id = \"sid\""
                )
            })?;
            sets.entry(set).or_default().push(row);
        }
        let mut directions: Vec<Direction> = Vec::new();
        for (set, rows) in &sets {
            directions.extend(evaluate_set(set, &all, rows, p)?);
        }
        anyhow::ensure!(
            !directions.is_empty(),
            "no direction to score (is the pivot `{}` in the sets?)",
            p.pivot
        );
        write_results(&ctx.output("results"), &directions, p)
    }
}

/// One source sentence: its id, the rank of its translation, the top of the ranking.
struct Ranked {
    sid: String,
    rank: usize,
    top: Vec<(String, f32)>,
}

/// Results of one (set, source, target) direction.
struct Direction {
    set: String,
    source: String,
    target: String,
    queries: Vec<Ranked>,
}

fn evaluate_set(
    set: &str,
    all: &Embeddings,
    rows: &[usize],
    p: &BitextParams,
) -> anyhow::Result<Vec<Direction>> {
    let subset = Embeddings {
        ids: rows.iter().map(|&r| all.ids[r].clone()).collect(),
        langs: rows.iter().map(|&r| all.langs[r].clone()).collect(),
        dim: all.dim,
        vectors: rows
            .iter()
            .flat_map(|&r| all.vectors[r * all.dim..(r + 1) * all.dim].iter().copied())
            .collect(),
    };
    let mut by_lang: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut position: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (i, (sid, lang)) in subset.ids.iter().zip(&subset.langs).enumerate() {
        by_lang.entry(lang).or_default().push(i);
        anyhow::ensure!(
            position.insert((lang, sid), i).is_none(),
            "sentence `{sid}` appears twice in language {lang}"
        );
    }
    let pairs: Vec<(&str, &str)> = by_lang
        .keys()
        .flat_map(|&s| by_lang.keys().map(move |&t| (s, t)))
        .filter(|(s, t)| s != t)
        .filter(|(s, t)| p.directions == Directions::All || *s == p.pivot || *t == p.pivot)
        .collect();
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let order = TrecOrder::new(&subset.ids);
    let ranked = for_each_query(&subset, &subset, |q, scores| {
        let source = subset.langs[q].as_str();
        pairs
            .iter()
            .filter(|(s, _)| *s == source)
            .filter_map(|&(_, target)| {
                let answer = *position.get(&(target, subset.ids[q].as_str()))?;
                let pool = &by_lang[target];
                let rank = order.ranks(scores, pool, &[answer])[0];
                let top = order
                    .top(scores, pool, p.trec_depth)
                    .into_iter()
                    .map(|c| (subset.ids[c].clone(), scores[c]))
                    .collect();
                Some((target, rank, top))
            })
            .collect::<Vec<_>>()
    })?;
    let mut directions: BTreeMap<(&str, &str), Direction> = BTreeMap::new();
    for (q, results) in ranked.into_iter().enumerate() {
        let source = subset.langs[q].as_str();
        for (target, rank, top) in results {
            directions
                .entry((source, target))
                .or_insert_with(|| Direction {
                    set: set.to_string(),
                    source: source.to_string(),
                    target: target.to_string(),
                    queries: Vec::new(),
                })
                .queries
                .push(Ranked {
                    sid: subset.ids[q].clone(),
                    rank,
                    top,
                });
        }
    }
    Ok(directions.into_values().collect())
}

impl Direction {
    fn accuracy_1(&self) -> f64 {
        self.queries.iter().filter(|q| q.rank == 1).count() as f64 / self.queries.len() as f64
    }

    fn map(&self) -> f64 {
        self.queries
            .iter()
            .map(|q| 1.0 / q.rank as f64)
            .sum::<f64>()
            / self.queries.len() as f64
    }
}

fn write_results(
    out: &std::path::Path,
    directions: &[Direction],
    p: &BitextParams,
) -> anyhow::Result<()> {
    let pivot = p.pivot.as_str();
    std::fs::create_dir_all(out.join("trec"))?;
    let text = |f: fn(&Direction) -> &String| -> Vec<String> {
        directions.iter().map(|d| f(d).clone()).collect()
    };
    write_parquet(
        &out.join("metrics.parquet"),
        vec![
            string_column("set", text(|d| &d.set)),
            string_column("source_lang", text(|d| &d.source)),
            string_column("target_lang", text(|d| &d.target)),
            Column::new(
                "queries".into(),
                directions
                    .iter()
                    .map(|d| d.queries.len() as i64)
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "accuracy_1".into(),
                directions
                    .iter()
                    .map(Direction::accuracy_1)
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "map".into(),
                directions.iter().map(Direction::map).collect::<Vec<_>>(),
            ),
        ],
    )?;
    let rows: Vec<(&Direction, &Ranked)> = directions
        .iter()
        .flat_map(|d| d.queries.iter().map(move |q| (d, q)))
        .collect();
    write_parquet(
        &out.join("per_query.parquet"),
        vec![
            string_column("set", rows.iter().map(|r| r.0.set.clone()).collect()),
            string_column(
                "source_lang",
                rows.iter().map(|r| r.0.source.clone()).collect(),
            ),
            string_column(
                "target_lang",
                rows.iter().map(|r| r.0.target.clone()).collect(),
            ),
            string_column("qid", rows.iter().map(|r| r.1.sid.clone()).collect()),
            Column::new(
                "accuracy_1".into(),
                rows.iter()
                    .map(|r| f64::from(u8::from(r.1.rank == 1)))
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "map".into(),
                rows.iter()
                    .map(|r| 1.0 / r.1.rank as f64)
                    .collect::<Vec<_>>(),
            ),
        ],
    )?;
    let mut run = std::io::BufWriter::new(std::fs::File::create(out.join("trec/bitext.run"))?);
    let mut qrels = std::io::BufWriter::new(std::fs::File::create(out.join("trec/bitext.qrels"))?);
    for (d, Ranked { sid, top, .. }) in &rows {
        let line = sid.rsplit_once(':').map_or(sid.as_str(), |(_, l)| l);
        let name = format!("{}/{}/{}/{line}", d.set, d.source, d.target);
        for (rank, (cid, score)) in top.iter().enumerate() {
            writeln!(
                run,
                "{name} Q0 {}:{cid} {} {score} xlpipe",
                d.target,
                rank + 1
            )?;
        }
        writeln!(qrels, "{name} 0 {}:{sid} 1", d.target)?;
    }
    run.flush()?;
    qrels.flush()?;
    let average = |selected: Vec<&Direction>| {
        let n = selected.len().max(1) as f64;
        serde_json::json!({
            "directions": selected.len(),
            "accuracy_1": selected.iter().map(|d| d.accuracy_1()).sum::<f64>() / n,
            "map": selected.iter().map(|d| d.map()).sum::<f64>() / n,
        })
    };
    results_of(directions, p.dataset.as_deref()).write(out)?;
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "dataset": p.dataset,
            "all": average(directions.iter().collect()),
            "into_pivot": average(directions.iter().filter(|d| d.target == pivot).collect()),
            "from_pivot": average(directions.iter().filter(|d| d.source == pivot).collect()),
            "pivot": pivot,
        }))?,
    )?;
    Ok(())
}

/// The results format: setting `bitext`, the macro average over every
/// direction, then one row per direction, and per source sentence its mean
/// over the directions it was a query in.
fn results_of(directions: &[Direction], dataset: Option<&str>) -> Results {
    let mut results = Results::new(dataset.unwrap_or_default());
    let values = |d: &Direction| [d.accuracy_1(), d.map()];
    let n = directions.len().max(1) as f64;
    let queries: usize = directions.iter().map(|d| d.queries.len()).sum();
    for (i, metric) in BITEXT_METRICS.into_iter().enumerate() {
        let average = directions.iter().map(|d| values(d)[i]).sum::<f64>() / n;
        results.push("bitext", (ALL, ALL), metric, average, queries);
    }
    let sets_of = |d: &Direction| {
        directions
            .iter()
            .filter(|o| (&o.source, &o.target) == (&d.source, &d.target))
            .count()
    };
    for d in directions {
        // Where two sets hold the same direction, its languages alone would
        // not name it.
        let source = if sets_of(d) > 1 {
            format!("{}:{}", d.set, d.source)
        } else {
            d.source.clone()
        };
        for (metric, value) in BITEXT_METRICS.into_iter().zip(values(d)) {
            results.push(
                "bitext",
                (&source, &d.target),
                metric,
                value,
                d.queries.len(),
            );
        }
    }
    let reciprocal = |q: &Ranked| [f64::from(u8::from(q.rank == 1)), 1.0 / q.rank as f64];
    for (i, metric) in BITEXT_METRICS.into_iter().enumerate() {
        results.add_query_means(
            "bitext",
            metric,
            directions.iter().flat_map(|d| {
                d.queries
                    .iter()
                    .map(move |q| (q.sid.as_str(), reciprocal(q)[i]))
            }),
        );
    }
    results
}
