//! The one results format: every `evaluate_*` kind writes its numbers as
//! two long tables, and `report` reads these and nothing else.
//!
//! - `results.parquet`: dataset, setting, query_lang, candidate_lang,
//!   metric, value, n (queries behind the value). A setting's headline row
//!   has both languages [`ALL`] (the macro average over its language
//!   pairs); the other rows are one language or pair each (candidate_lang
//!   [`ANY`] where the metric is over the whole pool, as language bias is,
//!   and empty where the kind has no candidate language).
//! - `query_results.parquet`: setting, qid, metric, value: per query, the
//!   mean over the setting's pools (with parallel queries, as in XQuAD-R,
//!   the mean over queries is then the macro average). What the paired
//!   bootstrap resamples.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use xlpipe_stage_api::table::{
    floats, integers, read_parquet, string_column, strings, write_parquet,
};

/// Language of a setting's macro-average row.
pub const ALL: &str = "all";
/// Candidate language of a number over the whole multilingual pool.
pub const ANY: &str = "*";

/// The ranking metrics of LAReQA-style retrieval, in table order.
pub const LAREQA_METRICS: [&str; 5] = ["map", "mrr", "recall_1", "recall_10", "ndcg_10"];
/// Bitext retrieval's metrics, in table order.
pub const BITEXT_METRICS: [&str; 2] = ["accuracy_1", "map"];
/// Ad-hoc retrieval's metrics, in table order.
pub const ADHOC_METRICS: [&str; 4] = ["ndcg_10", "recall_100", "map_100", "mrr_100"];
/// The language-bias metric (lower is better), multilingual setting only.
pub const BIAS: &str = "bias";

/// Every metric a report can put in its main table.
pub fn known_metrics() -> impl Iterator<Item = &'static str> + Clone {
    LAREQA_METRICS
        .into_iter()
        .chain(BITEXT_METRICS)
        .chain(ADHOC_METRICS)
}

/// The metric a setting is usually reported by, for a report whose
/// `metric` the evaluation lacks.
pub fn usual_metric(setting: &str) -> &'static str {
    match setting {
        "bitext" => "accuracy_1",
        "adhoc" => "ndcg_10",
        _ => "map",
    }
}

/// One number of an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub setting: String,
    pub query_lang: String,
    pub candidate_lang: String,
    pub metric: String,
    pub value: f64,
    pub n: usize,
}

/// What one evaluation found.
#[derive(Debug, Clone, Default)]
pub struct Results {
    pub dataset: String,
    pub rows: Vec<ResultRow>,
    /// (setting, metric) -> query id -> value.
    pub queries: BTreeMap<(String, String), HashMap<String, f64>>,
}

impl Results {
    pub fn new(dataset: &str) -> Results {
        Results {
            dataset: dataset.to_string(),
            ..Results::default()
        }
    }

    /// Add one number.
    pub fn push(
        &mut self,
        setting: &str,
        (query_lang, candidate_lang): (&str, &str),
        metric: &str,
        value: f64,
        n: usize,
    ) {
        self.rows.push(ResultRow {
            setting: setting.to_string(),
            query_lang: query_lang.to_string(),
            candidate_lang: candidate_lang.to_string(),
            metric: metric.to_string(),
            value,
            n,
        });
    }

    /// Per query, the mean of `values` ((query id, value), one per pool the
    /// query was ranked in).
    pub fn add_query_means<'a>(
        &mut self,
        setting: &str,
        metric: &str,
        values: impl IntoIterator<Item = (&'a str, f64)>,
    ) {
        let mut sums: HashMap<&str, (f64, usize)> = HashMap::new();
        for (qid, value) in values {
            let sum = sums.entry(qid).or_default();
            sum.0 += value;
            sum.1 += 1;
        }
        self.queries
            .entry((setting.to_string(), metric.to_string()))
            .or_default()
            .extend(
                sums.into_iter()
                    .map(|(qid, (sum, n))| (qid.to_string(), sum / n as f64)),
            );
    }

    /// The dataset these results are of: the evaluation's `dataset` param,
    /// or else the stage name of `producer` (e.g. `xquad_r_eval[seed=1]`).
    pub fn dataset_or_stage(&self, producer: &str) -> String {
        if self.dataset.is_empty() {
            producer.split('[').next().unwrap_or_default().to_string()
        } else {
            self.dataset.clone()
        }
    }

    /// Write `results.parquet` and `query_results.parquet` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let rows = &self.rows;
        let text = |get: fn(&ResultRow) -> &String| rows.iter().map(|r| get(r).clone()).collect();
        write_parquet(
            &dir.join("results.parquet"),
            vec![
                string_column("dataset", vec![self.dataset.clone(); rows.len()]),
                string_column("setting", text(|r| &r.setting)),
                string_column("query_lang", text(|r| &r.query_lang)),
                string_column("candidate_lang", text(|r| &r.candidate_lang)),
                string_column("metric", text(|r| &r.metric)),
                polars::prelude::Column::new(
                    "value".into(),
                    rows.iter().map(|r| r.value).collect::<Vec<_>>(),
                ),
                polars::prelude::Column::new(
                    "n".into(),
                    rows.iter().map(|r| r.n as i64).collect::<Vec<_>>(),
                ),
            ],
        )?;
        // Sorted, so the file is the same for the same results.
        let mut queries: Vec<(&(String, String), &String, f64)> = self
            .queries
            .iter()
            .flat_map(|(key, values)| values.iter().map(move |(q, v)| (key, q, *v)))
            .collect();
        queries.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        write_parquet(
            &dir.join("query_results.parquet"),
            vec![
                string_column("setting", queries.iter().map(|q| q.0 .0.clone()).collect()),
                string_column("qid", queries.iter().map(|q| q.1.clone()).collect()),
                string_column("metric", queries.iter().map(|q| q.0 .1.clone()).collect()),
                polars::prelude::Column::new(
                    "value".into(),
                    queries.iter().map(|q| q.2).collect::<Vec<_>>(),
                ),
            ],
        )
    }

    /// Read what [`Results::write`] wrote.
    pub fn read(dir: &Path) -> anyhow::Result<Results> {
        let frame = read_parquet(&dir.join("results.parquet"))?;
        let dataset = strings(&frame, "dataset")?;
        let (settings, query_langs, candidate_langs, metrics) = (
            strings(&frame, "setting")?,
            strings(&frame, "query_lang")?,
            strings(&frame, "candidate_lang")?,
            strings(&frame, "metric")?,
        );
        let values = floats(&frame, "value")?;
        let counts = integers(&frame, "n")?;
        let mut results = Results::new(dataset.first().map_or("", String::as_str));
        for i in 0..frame.height() {
            results.rows.push(ResultRow {
                setting: settings[i].clone(),
                query_lang: query_langs[i].clone(),
                candidate_lang: candidate_langs[i].clone(),
                metric: metrics[i].clone(),
                value: values[i],
                n: counts[i] as usize,
            });
        }
        let frame = read_parquet(&dir.join("query_results.parquet"))?;
        let (settings, qids, metrics) = (
            strings(&frame, "setting")?,
            strings(&frame, "qid")?,
            strings(&frame, "metric")?,
        );
        for (i, value) in floats(&frame, "value")?.into_iter().enumerate() {
            results
                .queries
                .entry((settings[i].clone(), metrics[i].clone()))
                .or_default()
                .insert(qids[i].clone(), value);
        }
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_read_back_as_written_with_queries_averaged_over_their_pools() {
        let mut results = Results::new("xquad_r");
        results.push("multi", (ALL, ALL), "map", 0.25, 3);
        results.push("multi", ("de", ANY), BIAS, 7.5, 2);
        results.add_query_means("multi", "map", [("q1", 0.5), ("q1", 1.0)]);
        results.add_query_means("multi", "map", [("q3", 0.0)]);
        let dir = tempfile::tempdir().unwrap();
        results.write(dir.path()).unwrap();
        let back = Results::read(dir.path()).unwrap();
        assert_eq!(back.dataset, "xquad_r");
        assert_eq!(back.rows, results.rows);
        let map = &back.queries[&("multi".to_string(), "map".to_string())];
        assert_eq!(map.len(), 2, "{map:?}");
        assert_eq!((map["q1"], map["q3"]), (0.75, 0.0));
    }
}
