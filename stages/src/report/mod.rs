//! `report`: gather every evaluation instance of a grid into result tables
//! and plots.
//!
//! ```toml
//! [stages.report]
//! kind = "report"
//! inputs.evaluations = ["xquad_r_eval[*]", "mlqa_r_eval[*]", "flores_eval[*]"]
//! in_domain = ["xquad_r_eval", "mlqa_r_eval"]  # the rest are out-of-domain
//! metric = "map"         # of the main table and plots
//! replicate = "seed"     # grid variable averaged over, with 95% CIs
//! x = "alpha"            # grid variable on the plots' x axis ...
//! baselines = [0.0, 1.0] # ... and the values every point is tested against
//! ```
//!
//! An evaluation's dataset is its `dataset` param or else the name of its
//! stage; its grid point is its producer's grid values minus the replicate
//! variable. Evaluations outside the grid (an untuned model's, say) are
//! the row `-`. Both
//! `evaluate_lareqa` (settings mono / cross / multi, plus the multilingual
//! max-min rank distance as metric `bias`), `evaluate_bitext` (setting
//! `bitext`) and `evaluate_adhoc` (setting `adhoc`) results are read. A
//! dataset whose kind lacks `metric` shows its usual one in the main table
//! (bitext `accuracy_1`, ad-hoc `ndcg_10`).
//!
//! Output folder `report`:
//! - `results.{parquet,csv}`: every number, long format (grid variables,
//!   replicate, dataset, domain, setting, metric, value).
//! - `main.{parquet,csv,md}`: one row per grid point; per dataset and
//!   setting the main metric and the bias, mean and 95% CI half-width over
//!   replicates (Student's t), plus in-domain and out-of-domain averages.
//! - `per_language.{parquet,csv}`: the same per query (and candidate) language.
//! - `bootstrap.{parquet,csv,md}`: each point against the baselines of `x`
//!   with the other variables equal: paired bootstrap (by replicate and by
//!   query, resampling both) of the difference in the main metric and in
//!   bias. A query's value in a setting is its mean over that setting's
//!   language pools (so with parallel queries, as in XQuAD-R, the mean over
//!   queries is the macro average).
//! - `report.md`: the tables above for reading; `plots/*.svg` and `*.png`.

mod plot;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use polars::prelude::{Column, DataFrame};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::evaluate::adhoc::ADHOC_METRICS;
use xlpipe_eval::stats::{mean_ci, p_text, paired_bootstrap, PairedBootstrap};
use xlpipe_stage_api::table::{read_parquet, string_column, strings, write_parquet};
use xlpipe_stage_api::{
    InputArtifact, InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage,
};

pub struct ReportStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportParams {
    #[serde(default)]
    in_domain: Vec<String>,
    #[serde(default = "default_metric")]
    metric: String,
    #[serde(default = "default_replicate")]
    replicate: String,
    #[serde(default = "default_x")]
    x: String,
    #[serde(default = "default_baselines")]
    baselines: Vec<f64>,
    #[serde(default = "default_bootstrap_samples")]
    bootstrap_samples: usize,
}

fn default_metric() -> String {
    "map".into()
}
fn default_replicate() -> String {
    "seed".into()
}
fn default_x() -> String {
    "alpha".into()
}
fn default_baselines() -> Vec<f64> {
    vec![0.0, 1.0]
}
fn default_bootstrap_samples() -> usize {
    1000
}

/// Metrics each evaluation kind reports, in table order.
const LAREQA_METRICS: [&str; 5] = ["map", "mrr", "recall_1", "recall_10", "ndcg_10"];
const BITEXT_METRICS: [&str; 2] = ["accuracy_1", "map"];
/// The language-bias metric (lower is better), multilingual setting only.
const BIAS: &str = "bias";

impl TypedStage for ReportStage {
    type Params = ReportParams;
    const KIND: &'static str = "report";
    // 2: the bootstrap resamples seeds as well as queries.
    // 3: untuned levels labelled "(untuned)" in their setting's colour;
    // the t quantile beyond 30 degrees of freedom to 1e-4.
    const VERSION: u32 = 3;
    const SUMMARY: &'static str = "result tables (mean ± 95% CI over seeds, paired bootstrap) and plots of a grid's evaluations";

    fn validate(&self, mut p: ReportParams, _env: &ParamsEnv) -> Result<ReportParams, ParamError> {
        let known = LAREQA_METRICS
            .iter()
            .chain(&BITEXT_METRICS)
            .chain(&ADHOC_METRICS);
        if !known.clone().any(|m| *m == p.metric) {
            return Err(ParamError::new(
                "metric",
                format!(
                    "unknown metric `{}`; known: {}",
                    p.metric,
                    known
                        .copied()
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        p.in_domain.sort();
        p.in_domain.dedup();
        Ok(p)
    }

    fn interface_for(
        &self,
        _p: &ReportParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![InputSlot::many("evaluations")],
            ..Interface::producing(&["report"])
        })
    }

    fn execute(&self, p: &ReportParams, ctx: &StageContext) -> anyhow::Result<()> {
        let evaluations = ctx
            .inputs("evaluations")
            .iter()
            .map(|a| Evaluation::load(a, p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!evaluations.is_empty(), "no evaluations to report");
        let report = Report::new(p, evaluations);
        report.write(&ctx.output("report"))
    }

    fn render_output(&self, output: &Path) -> anyhow::Result<Option<String>> {
        render_main_table(output).map(Some)
    }
}

/// A grid point: the grid values of an instance, replicate left out.
type Point = Vec<(String, Value)>;

fn point_label(point: &Point) -> String {
    if point.is_empty() {
        return "-".into();
    }
    point
        .iter()
        .map(|(k, v)| format!("{k}={}", value_text(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One evaluation instance's numbers.
struct Evaluation {
    point: Point,
    replicate: Option<Value>,
    dataset: String,
    /// (setting, metric) -> value (macro average).
    summary: BTreeMap<(String, String), f64>,
    /// (setting, query lang, candidate lang, metric) -> value.
    per_language: BTreeMap<(String, String, String, String), f64>,
    /// (setting, metric) -> query -> value, averaged over the setting's pools.
    per_query: BTreeMap<(String, String), HashMap<String, f64>>,
    /// The metric its main-table column shows: `metric` when it reports
    /// that, else its kind's usual one (bitext accuracy@1, ad-hoc nDCG@10).
    headline: String,
}

impl Evaluation {
    fn load(artifact: &InputArtifact, p: &ReportParams) -> anyhow::Result<Evaluation> {
        let dir = &artifact.path;
        let mut grid = artifact.grid.clone();
        let replicate = grid.remove(&p.replicate);
        let summary: Value = serde_json::from_slice(&std::fs::read(dir.join("summary.json"))?)?;
        let dataset = match summary["dataset"].as_str() {
            Some(name) => name.to_string(),
            None => artifact
                .producer
                .split('[')
                .next()
                .unwrap_or_default()
                .to_string(),
        };
        let metrics = read_parquet(&dir.join("metrics.parquet"))?;
        let per_query = read_parquet(&dir.join("per_query.parquet"))?;
        let mut eval = Evaluation {
            point: grid.into_iter().collect(),
            replicate,
            dataset,
            summary: BTreeMap::new(),
            per_language: BTreeMap::new(),
            per_query: BTreeMap::new(),
            headline: String::new(),
        };
        if metrics.column("setting").is_ok() {
            for setting in ["mono", "cross", "multi"] {
                for metric in LAREQA_METRICS {
                    if let Some(v) = summary[setting][metric].as_f64() {
                        eval.summary.insert((setting.into(), metric.into()), v);
                    }
                }
            }
            if let Some(v) = summary["max_min_rank_distance"].as_f64() {
                eval.summary.insert(("multi".into(), BIAS.into()), v);
            }
            let settings = strings(&metrics, "setting")?;
            let langs = (
                strings(&metrics, "query_lang")?,
                strings(&metrics, "candidate_lang")?,
            );
            eval.add_languages(&metrics, &settings, &langs, &LAREQA_METRICS)?;
            let bias = read_parquet(&dir.join("bias.parquet"))?;
            for (lang, v) in strings(&bias, "query_lang")?
                .into_iter()
                .zip(floats(&bias, "max_min_rank_distance")?)
            {
                eval.per_language
                    .insert(("multi".into(), lang, "*".into(), BIAS.into()), v);
            }
            let settings = strings(&per_query, "setting")?;
            eval.add_queries(&per_query, &settings, &LAREQA_METRICS)?;
            let bias = floats(&per_query, "max_min_rank_distance")?;
            let qids = strings(&per_query, "qid")?;
            let mut sums: HashMap<String, (f64, usize)> = HashMap::new();
            for ((setting, qid), v) in settings.iter().zip(qids).zip(bias) {
                if setting == "multi" && v.is_finite() {
                    let e = sums.entry(qid).or_default();
                    e.0 += v;
                    e.1 += 1;
                }
            }
            eval.per_query.insert(
                ("multi".into(), BIAS.into()),
                sums.into_iter()
                    .map(|(q, (s, n))| (q, s / n as f64))
                    .collect(),
            );
        } else if metrics.column("source_lang").is_ok() {
            for metric in BITEXT_METRICS {
                if let Some(v) = summary["all"][metric].as_f64() {
                    eval.summary.insert(("bitext".into(), metric.into()), v);
                }
            }
            let settings = vec!["bitext".to_string(); metrics.height()];
            let langs = (
                strings(&metrics, "source_lang")?,
                strings(&metrics, "target_lang")?,
            );
            eval.add_languages(&metrics, &settings, &langs, &BITEXT_METRICS)?;
            let settings = vec!["bitext".to_string(); per_query.height()];
            eval.add_queries(&per_query, &settings, &BITEXT_METRICS)?;
        } else {
            for metric in ADHOC_METRICS {
                if let Some(v) = summary["adhoc"][metric].as_f64() {
                    eval.summary.insert(("adhoc".into(), metric.into()), v);
                }
            }
            let settings = vec!["adhoc".to_string(); metrics.height()];
            let langs = (
                strings(&metrics, "lang")?,
                vec![String::new(); metrics.height()],
            );
            eval.add_languages(&metrics, &settings, &langs, &ADHOC_METRICS)?;
            let settings = vec!["adhoc".to_string(); per_query.height()];
            eval.add_queries(&per_query, &settings, &ADHOC_METRICS)?;
        }
        eval.headline = if eval.summary.keys().any(|(_, m)| *m == p.metric) {
            p.metric.clone()
        } else if metrics.column("source_lang").is_ok() {
            "accuracy_1".into()
        } else {
            "ndcg_10".into()
        };
        Ok(eval)
    }

    fn add_languages(
        &mut self,
        metrics: &DataFrame,
        settings: &[String],
        (query_langs, candidate_langs): &(Vec<String>, Vec<String>),
        names: &[&str],
    ) -> anyhow::Result<()> {
        for metric in names {
            for (i, v) in floats(metrics, metric)?.into_iter().enumerate() {
                self.per_language.insert(
                    (
                        settings[i].clone(),
                        query_langs[i].clone(),
                        candidate_langs[i].clone(),
                        metric.to_string(),
                    ),
                    v,
                );
            }
        }
        Ok(())
    }

    /// Per query, the mean over the setting's pools (rows with one qid).
    fn add_queries(
        &mut self,
        per_query: &DataFrame,
        settings: &[String],
        names: &[&str],
    ) -> anyhow::Result<()> {
        let qids = strings(per_query, "qid")?;
        for metric in names {
            let mut sums: HashMap<(&str, &str), (f64, usize)> = HashMap::new();
            for (i, v) in floats(per_query, metric)?.into_iter().enumerate() {
                let e = sums.entry((&settings[i], &qids[i])).or_default();
                e.0 += v;
                e.1 += 1;
            }
            for ((setting, qid), (sum, n)) in sums {
                self.per_query
                    .entry((setting.to_string(), metric.to_string()))
                    .or_default()
                    .insert(qid.to_string(), sum / n as f64);
            }
        }
        Ok(())
    }
}

fn floats(frame: &DataFrame, name: &str) -> anyhow::Result<Vec<f64>> {
    let column = frame
        .column(name)?
        .cast(&polars::prelude::DataType::Float64)?;
    Ok(column
        .f64()?
        .iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}

/// A column of the main table: (dataset or domain average, setting, metric).
type Cell = (String, String, String);

struct Report<'a> {
    p: &'a ReportParams,
    evaluations: Vec<Evaluation>,
    /// Distinct grid points in order.
    points: Vec<Point>,
    /// Grid variable names (columns of every table).
    variables: Vec<String>,
}

/// A query's value, by query id.
type QueryValues = HashMap<String, f64>;

/// Mean and CI half-width over replicates, and how many there were.
#[derive(Clone, Copy)]
struct Summary {
    mean: f64,
    ci95: Option<f64>,
    replicates: usize,
}

impl<'a> Report<'a> {
    fn new(p: &'a ReportParams, evaluations: Vec<Evaluation>) -> Report<'a> {
        let mut points: Vec<Point> = Vec::new();
        for e in &evaluations {
            if !points.contains(&e.point) {
                points.push(e.point.clone());
            }
        }
        let x = p.x.clone();
        points.sort_by(|a, b| {
            let key = |pt: &Point| {
                pt.iter()
                    .map(|(k, v)| {
                        if *k == x {
                            format!("{k}={:020.6}", v.as_f64().unwrap_or(0.0) + 1e6)
                        } else {
                            format!("{k}={}", value_text(v))
                        }
                    })
                    .collect::<Vec<_>>()
            };
            // Other variables first, then x: rows of one model stay together.
            let (ka, kb) = (key(a), key(b));
            let split = |k: Vec<String>| {
                let (xs, rest): (Vec<_>, Vec<_>) =
                    k.into_iter().partition(|s| s.starts_with(&format!("{x}=")));
                (rest, xs)
            };
            split(ka).cmp(&split(kb))
        });
        let variables: BTreeSet<String> = points
            .iter()
            .flat_map(|pt| pt.iter().map(|(k, _)| k.clone()))
            .collect();
        Report {
            p,
            evaluations,
            points,
            variables: variables.into_iter().collect(),
        }
    }

    fn domain(&self, dataset: &str) -> &'static str {
        if self.p.in_domain.iter().any(|d| d == dataset) {
            "in-domain"
        } else {
            "out-of-domain"
        }
    }

    /// The main table's columns: every (dataset, setting) with the main
    /// metric, the bias where there is one, then the domain averages.
    fn cells(&self) -> Vec<Cell> {
        let mut cells: BTreeSet<Cell> = BTreeSet::new();
        let mut domains: BTreeSet<Cell> = BTreeSet::new();
        for e in &self.evaluations {
            for (setting, metric) in e.summary.keys() {
                if *metric == e.headline || metric == BIAS {
                    cells.insert((e.dataset.clone(), setting.clone(), metric.clone()));
                    domains.insert((
                        self.domain(&e.dataset).to_string(),
                        setting.clone(),
                        metric.clone(),
                    ));
                }
            }
        }
        cells.into_iter().chain(domains).collect()
    }

    /// Values of `cell` at `point`, one per replicate (domain cells average
    /// their datasets within each replicate).
    fn replicate_values(&self, point: &Point, cell: &Cell) -> Vec<f64> {
        let (name, setting, metric) = cell;
        let mut by_replicate: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for e in self.evaluations.iter().filter(|e| e.point == *point) {
            let matches = e.dataset == *name || self.domain(&e.dataset) == name;
            if let (true, Some(v)) = (matches, e.summary.get(&(setting.clone(), metric.clone()))) {
                let key = e.replicate.as_ref().map(value_text).unwrap_or_default();
                let entry = by_replicate.entry(key).or_default();
                entry.0 += v;
                entry.1 += 1;
            }
        }
        by_replicate.values().map(|(s, n)| s / *n as f64).collect()
    }

    fn summarise(&self, point: &Point, cell: &Cell) -> Option<Summary> {
        let values = self.replicate_values(point, cell);
        if values.is_empty() {
            return None;
        }
        let (mean, ci95) = mean_ci(&values);
        Some(Summary {
            mean,
            ci95,
            replicates: values.len(),
        })
    }

    fn write(&self, out: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(out.join("plots"))?;
        let mut markdown = String::from("# Results\n\n");
        self.write_results(out)?;
        markdown += &self.write_main(out)?;
        markdown += &self.write_per_language(out)?;
        markdown += &self.write_bootstrap(out)?;
        std::fs::write(out.join("report.md"), markdown)?;
        plot::write_plots(self, &out.join("plots"))
    }

    /// Columns naming the grid point, one per variable.
    fn variable_columns(&self, points: &[&Point]) -> Vec<Column> {
        self.variables
            .iter()
            .map(|var| {
                string_column(
                    var,
                    points
                        .iter()
                        .map(|pt| {
                            pt.iter()
                                .find(|(k, _)| k == var)
                                .map(|(_, v)| value_text(v))
                                .unwrap_or_default()
                        })
                        .collect(),
                )
            })
            .collect()
    }

    fn write_results(&self, out: &Path) -> anyhow::Result<()> {
        let rows: Vec<(&Evaluation, &(String, String), f64)> = self
            .evaluations
            .iter()
            .flat_map(|e| e.summary.iter().map(move |(k, v)| (e, k, *v)))
            .collect();
        let points: Vec<&Point> = rows.iter().map(|r| &r.0.point).collect();
        let mut columns = self.variable_columns(&points);
        columns.extend([
            string_column(
                &self.p.replicate,
                rows.iter()
                    .map(|r| r.0.replicate.as_ref().map(value_text).unwrap_or_default())
                    .collect(),
            ),
            string_column(
                "dataset",
                rows.iter().map(|r| r.0.dataset.clone()).collect(),
            ),
            string_column(
                "domain",
                rows.iter()
                    .map(|r| self.domain(&r.0.dataset).to_string())
                    .collect(),
            ),
            string_column("setting", rows.iter().map(|r| r.1 .0.clone()).collect()),
            string_column("metric", rows.iter().map(|r| r.1 .1.clone()).collect()),
            Column::new("value".into(), rows.iter().map(|r| r.2).collect::<Vec<_>>()),
        ]);
        write_table(out, "results", columns)
    }

    fn write_main(&self, out: &Path) -> anyhow::Result<String> {
        let cells = self.cells();
        let points: Vec<&Point> = self.points.iter().collect();
        let mut columns = self.variable_columns(&points);
        let mut text_columns: Vec<(String, Vec<String>)> = Vec::new();
        let mut replicates = vec![0usize; points.len()];
        for cell in &cells {
            let summaries: Vec<Option<Summary>> =
                points.iter().map(|pt| self.summarise(pt, cell)).collect();
            let name = format!("{}/{}/{}", cell.0, cell.1, cell.2);
            for (i, s) in summaries.iter().enumerate() {
                replicates[i] = replicates[i].max(s.map_or(0, |s| s.replicates));
            }
            columns.push(Column::new(
                name.as_str().into(),
                summaries
                    .iter()
                    .map(|s| s.map(|s| s.mean))
                    .collect::<Vec<_>>(),
            ));
            columns.push(Column::new(
                format!("{name}/ci95").as_str().into(),
                summaries
                    .iter()
                    .map(|s| s.and_then(|s| s.ci95))
                    .collect::<Vec<_>>(),
            ));
            text_columns.push((
                name,
                summaries
                    .iter()
                    .map(|s| match s {
                        None => "".into(),
                        Some(s) => format_summary(s, cell.2 == BIAS),
                    })
                    .collect(),
            ));
        }
        columns.push(Column::new(
            self.p.replicate.as_str().into(),
            replicates.iter().map(|&n| n as i64).collect::<Vec<_>>(),
        ));
        write_table(out, "main", columns)?;
        let mut header: Vec<String> = self.variables.clone();
        header.push(format!("{}s", self.p.replicate));
        header.extend(text_columns.iter().map(|(n, _)| n.clone()));
        let rows: Vec<Vec<String>> = points
            .iter()
            .enumerate()
            .map(|(i, pt)| {
                let mut row: Vec<String> = self
                    .variables
                    .iter()
                    .map(|var| {
                        pt.iter()
                            .find(|(k, _)| k == var)
                            .map(|(_, v)| value_text(v))
                            .unwrap_or_default()
                    })
                    .collect();
                row.push(replicates[i].to_string());
                row.extend(text_columns.iter().map(|(_, v)| v[i].clone()));
                row
            })
            .collect();
        let table = markdown_table(&header, &rows);
        std::fs::write(out.join("main.md"), &table)?;
        Ok(format!(
            "## Main table\n\n`{}` per dataset and setting (and `bias`: mean max-min rank distance, lower is better), mean ± 95% CI over {}s.\n\n{table}\n",
            self.p.metric, self.p.replicate
        ))
    }

    fn write_per_language(&self, out: &Path) -> anyhow::Result<String> {
        // (point, dataset, setting, query lang, candidate lang, metric) -> values over replicates.
        type Key<'k> = (usize, &'k str, &'k str, &'k str, &'k str, &'k str);
        let mut groups: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
        for e in &self.evaluations {
            let point = self.points.iter().position(|p| *p == e.point).unwrap_or(0);
            for ((setting, ql, cl, metric), v) in &e.per_language {
                groups
                    .entry((point, &e.dataset, setting, ql, cl, metric))
                    .or_default()
                    .push(*v);
            }
        }
        let keys: Vec<_> = groups.keys().copied().collect();
        let points: Vec<&Point> = keys.iter().map(|k| &self.points[k.0]).collect();
        let summaries: Vec<(f64, Option<f64>)> = groups.values().map(|v| mean_ci(v)).collect();
        let mut columns = self.variable_columns(&points);
        let text = |f: fn(&Key) -> String| -> Vec<String> { keys.iter().map(f).collect() };
        columns.extend([
            string_column("dataset", text(|k| k.1.to_string())),
            string_column("setting", text(|k| k.2.to_string())),
            string_column("query_lang", text(|k| k.3.to_string())),
            string_column("candidate_lang", text(|k| k.4.to_string())),
            string_column("metric", text(|k| k.5.to_string())),
            Column::new(
                "mean".into(),
                summaries.iter().map(|s| s.0).collect::<Vec<_>>(),
            ),
            Column::new(
                "ci95".into(),
                summaries.iter().map(|s| s.1).collect::<Vec<_>>(),
            ),
        ]);
        write_table(out, "per_language", columns)?;
        // For reading: the main metric per query language (mean over
        // candidate languages), one table per dataset and setting.
        let mut md = String::from("## Per query language\n\n");
        // (dataset, setting) -> (point, query lang) -> means over candidate languages.
        type Cells<'k> = BTreeMap<(usize, &'k str), Vec<f64>>;
        let mut by_table: BTreeMap<(&str, &str), Cells> = BTreeMap::new();
        for (key, values) in &groups {
            if key.5 == self.p.metric {
                by_table
                    .entry((key.1, key.2))
                    .or_default()
                    .entry((key.0, key.3))
                    .or_default()
                    .push(values.iter().sum::<f64>() / values.len() as f64);
            }
        }
        for ((dataset, setting), cells) in by_table {
            let langs: BTreeSet<&str> = cells.keys().map(|k| k.1).collect();
            let point_ids: BTreeSet<usize> = cells.keys().map(|k| k.0).collect();
            let mut header = vec!["grid point".to_string()];
            header.extend(langs.iter().map(|l| l.to_string()));
            let rows: Vec<Vec<String>> = point_ids
                .iter()
                .map(|&pt| {
                    let mut row = vec![point_label(&self.points[pt])];
                    row.extend(langs.iter().map(|l| {
                        cells
                            .get(&(pt, *l))
                            .map(|v| format!("{:.3}", v.iter().sum::<f64>() / v.len() as f64))
                            .unwrap_or_default()
                    }));
                    row
                })
                .collect();
            let _ = write!(
                md,
                "### {dataset}, {setting}: `{}` by query language\n\n{}\n",
                self.p.metric,
                markdown_table(&header, &rows)
            );
        }
        Ok(md)
    }

    /// Per replicate, per query, the value of (dataset, setting, metric) at `point`.
    fn query_values(
        &self,
        point: &Point,
        dataset: &str,
        setting: &str,
        metric: &str,
    ) -> BTreeMap<String, &QueryValues> {
        self.evaluations
            .iter()
            .filter(|e| e.point == *point && e.dataset == dataset)
            .filter_map(|e| {
                let values = e
                    .per_query
                    .get(&(setting.to_string(), metric.to_string()))?;
                let replicate = e.replicate.as_ref().map(value_text).unwrap_or_default();
                Some((replicate, values))
            })
            .collect()
    }

    fn write_bootstrap(&self, out: &Path) -> anyhow::Result<String> {
        struct Row<'r> {
            point: &'r Point,
            baseline: f64,
            cell: (String, String, String),
            queries: usize,
            replicates: usize,
            result: PairedBootstrap,
        }
        let x = &self.p.x;
        let mut rows: Vec<Row> = Vec::new();
        let dataset_cells: Vec<Cell> = self
            .cells()
            .into_iter()
            .filter(|c| self.evaluations.iter().any(|e| e.dataset == c.0))
            .collect();
        for point in &self.points {
            let Some(value) = point
                .iter()
                .find(|(k, _)| k == x)
                .and_then(|(_, v)| v.as_f64())
            else {
                continue;
            };
            for &baseline in &self.p.baselines {
                if (value - baseline).abs() < 1e-12 {
                    continue;
                }
                let Some(reference) = self.points.iter().find(|other| {
                    other.len() == point.len()
                        && other.iter().zip(point.iter()).all(|((ka, va), (kb, vb))| {
                            ka == kb
                                && if ka == x {
                                    va.as_f64().is_some_and(|a| (a - baseline).abs() < 1e-12)
                                } else {
                                    va == vb
                                }
                        })
                }) else {
                    continue;
                };
                for (index, cell) in dataset_cells.iter().enumerate() {
                    let ours = self.query_values(point, &cell.0, &cell.1, &cell.2);
                    let theirs = self.query_values(reference, &cell.0, &cell.1, &cell.2);
                    // Paired by replicate (the same seed on both sides) and
                    // by query: the queries every such replicate holds.
                    let replicates: Vec<(&QueryValues, &QueryValues)> = ours
                        .iter()
                        .filter_map(|(r, a)| Some((*a, *theirs.get(r)?)))
                        .collect();
                    let Some((first, _)) = replicates.first() else {
                        continue;
                    };
                    let mut queries: Vec<&String> = first
                        .keys()
                        .filter(|q| {
                            replicates
                                .iter()
                                .all(|(a, b)| a.contains_key(*q) && b.contains_key(*q))
                        })
                        .collect();
                    if queries.is_empty() {
                        continue;
                    }
                    queries.sort();
                    let differences: Vec<Vec<f64>> = replicates
                        .iter()
                        .map(|(a, b)| queries.iter().map(|q| a[*q] - b[*q]).collect())
                        .collect();
                    rows.push(Row {
                        point,
                        baseline,
                        cell: cell.clone(),
                        queries: queries.len(),
                        replicates: differences.len(),
                        result: paired_bootstrap(
                            &differences,
                            self.p.bootstrap_samples,
                            index as u64 + 1,
                        ),
                    });
                }
            }
        }
        let points: Vec<&Point> = rows.iter().map(|r| r.point).collect();
        let mut columns = self.variable_columns(&points);
        let text = |f: fn(&Row) -> String| rows.iter().map(f).collect::<Vec<String>>();
        let num = |f: fn(&Row) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
        columns.extend([
            Column::new(format!("baseline_{x}").as_str().into(), num(|r| r.baseline)),
            string_column("dataset", text(|r| r.cell.0.clone())),
            string_column("setting", text(|r| r.cell.1.clone())),
            string_column("metric", text(|r| r.cell.2.clone())),
            Column::new(
                "queries".into(),
                rows.iter().map(|r| r.queries as i64).collect::<Vec<_>>(),
            ),
            Column::new(
                "replicates".into(),
                rows.iter().map(|r| r.replicates as i64).collect::<Vec<_>>(),
            ),
            Column::new("delta".into(), num(|r| r.result.delta)),
            Column::new("ci_low".into(), num(|r| r.result.ci_low)),
            Column::new("ci_high".into(), num(|r| r.result.ci_high)),
            Column::new("p_value".into(), num(|r| r.result.p_value)),
        ]);
        write_table(out, "bootstrap", columns)?;
        let header: Vec<String> = [
            "grid point",
            "vs",
            "dataset",
            "setting",
            "metric",
            "seeds",
            "Δ (95% CI)",
            "p",
        ]
        .map(String::from)
        .to_vec();
        let table_rows: Vec<Vec<String>> = rows
            .iter()
            .filter(|r| r.cell.2 == self.p.metric || r.cell.2 == BIAS)
            .map(|r| {
                let digits = if r.cell.2 == BIAS { 1 } else { 4 };
                vec![
                    point_label(r.point),
                    format!("{x}={}", r.baseline),
                    r.cell.0.clone(),
                    r.cell.1.clone(),
                    r.cell.2.clone(),
                    r.replicates.to_string(),
                    format!(
                        "{:+.d$} ({:+.d$}, {:+.d$})",
                        r.result.delta,
                        r.result.ci_low,
                        r.result.ci_high,
                        d = digits
                    ),
                    p_text(r.result.p_value, self.p.bootstrap_samples),
                ]
            })
            .collect();
        let table = markdown_table(&header, &table_rows);
        std::fs::write(out.join("bootstrap.md"), &table)?;
        Ok(format!(
            "## Paired bootstrap against {x} = {:?}\n\nDifference in the per-query mean, paired by {r} and by query ({} resamples, each drawing {r}s and queries with replacement, so the interval holds the {r}-to-{r} variance as well as the query sampling; a query's value is its mean over the setting's language pools). p is two-sided; `< 1/resamples` where no resample crossed zero.\n\nGrid points that share a {r} share its random draws (batch sampler stream, initialisation and dropout masks): at one {r}, two values of {x} are compared under common random numbers, which makes paired differences sharper but means that neighbouring values of {x} are not independent evidence of a trend.\n\n{table}\n",
            self.p.baselines, self.p.bootstrap_samples, r = self.p.replicate
        ))
    }
}

fn format_summary(s: &Summary, bias: bool) -> String {
    let digits = if bias { 1 } else { 4 };
    match s.ci95 {
        Some(ci) => format!("{:.d$} ± {:.d$}", s.mean, ci, d = digits),
        None => format!("{:.d$}", s.mean, d = digits),
    }
}

/// A Markdown table with padded columns, so it also reads in a terminal.
fn markdown_table(header: &[String], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter()
            .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
            .chain([header[i].chars().count(), 3])
            .max()
            .unwrap_or(3)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let cell = cells.get(i).map_or("", String::as_str);
                format!("{cell}{}", " ".repeat(w - cell.chars().count()))
            })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out += &format!("|-{}-|\n", rule.join("-|-"));
    for row in rows {
        out += &line(row);
    }
    out
}

/// `NAME.parquet` (through polars) and `NAME.csv` of the same columns.
fn write_table(out: &Path, name: &str, columns: Vec<Column>) -> anyhow::Result<()> {
    let frame = DataFrame::new_infer_height(columns.clone())?;
    write_parquet(&out.join(format!("{name}.parquet")), columns)?;
    std::fs::write(out.join(format!("{name}.csv")), csv_text(&frame)?)?;
    Ok(())
}

/// RFC 4180 CSV: fields with commas, quotes or newlines are quoted; nulls are empty.
fn csv_text(frame: &DataFrame) -> anyhow::Result<String> {
    let quote = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let names: Vec<String> = frame
        .get_column_names()
        .iter()
        .map(|n| quote(n.as_str()))
        .collect();
    let mut out = names.join(",") + "\n";
    for row in 0..frame.height() {
        let fields: Vec<String> = frame
            .columns()
            .iter()
            .map(|c| {
                let v = c.get(row).map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(match v {
                    polars::prelude::AnyValue::Null => String::new(),
                    polars::prelude::AnyValue::String(s) => quote(s),
                    polars::prelude::AnyValue::Float64(x) => x.to_string(),
                    other => quote(&other.to_string()),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        out += &fields.join(",");
        out.push('\n');
    }
    Ok(out)
}

/// The main table of a report folder, formatted for a terminal.
fn render_main_table(folder: &Path) -> anyhow::Result<String> {
    let file = folder.join("main.md");
    std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))
}
