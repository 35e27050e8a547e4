//! The report's tables: the main table (mean ± CI over replicates per
//! grid point), per language, the paired bootstrap, and every number in
//! long form; each as Parquet and CSV, the readable ones also as Markdown.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use polars::prelude::{Column, CsvWriter, DataFrame, SerWriter};
use serde_json::Value;

use xlpipe_eval::results::BIAS;
use xlpipe_eval::stats::{holm, mean_ci, p_text, paired_bootstrap, PairedBootstrap};
use xlpipe_stage_api::table::{string_column, write_parquet};

use super::load::Evaluation;
use super::markdown::{format_summary, markdown_table};
use super::{point_label, value_text, Point, ReportParams};

/// A column of the main table: (dataset or domain average, setting, metric).
pub(super) type Cell = (String, String, String);

pub(super) struct Report<'a> {
    pub p: &'a ReportParams,
    evaluations: Vec<Evaluation>,
    /// Distinct grid points in order.
    pub points: Vec<Point>,
    /// Grid variable names (columns of every table).
    variables: Vec<String>,
}

/// A query's value, by query id.
type QueryValues = HashMap<String, f64>;

/// Mean and CI half-width over replicates, and how many there were.
#[derive(Clone, Copy)]
pub(super) struct Summary {
    pub mean: f64,
    pub ci95: Option<f64>,
    pub replicates: usize,
}

impl<'a> Report<'a> {
    pub(super) fn new(p: &'a ReportParams, evaluations: Vec<Evaluation>) -> Report<'a> {
        let mut points: Vec<Point> = Vec::new();
        for e in &evaluations {
            if !points.contains(&e.point) {
                points.push(e.point.clone());
            }
        }
        points.sort_by(|a, b| compare_points(&p.x, a, b));
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
    pub(super) fn cells(&self) -> Vec<Cell> {
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

    /// The main table's columns: `cells` without the average of a domain
    /// that holds one dataset (it would repeat that dataset's columns).
    fn table_cells(&self) -> Vec<Cell> {
        let mut datasets_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for e in &self.evaluations {
            datasets_of
                .entry(self.domain(&e.dataset))
                .or_default()
                .insert(&e.dataset);
        }
        self.cells()
            .into_iter()
            .filter(|(name, _, _)| {
                datasets_of
                    .get(name.as_str())
                    .is_none_or(|datasets| datasets.len() > 1)
            })
            .collect()
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

    pub(super) fn summarise(&self, point: &Point, cell: &Cell) -> Option<Summary> {
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

    /// Every table into `out`; returns `report.md`'s text.
    pub(super) fn write_tables(&self, out: &Path) -> anyhow::Result<String> {
        let mut markdown = String::from("# Results\n\n");
        self.write_results(out)?;
        markdown += &self.write_main(out)?;
        markdown += &self.write_per_language(out)?;
        markdown += &self.write_versus_best(out)?;
        markdown += &self.write_bootstrap(out)?;
        Ok(markdown)
    }

    /// The value of `var` at `point`. A point outside the grid (the
    /// untuned model's evaluations) reads `untuned` under `x`, as in the
    /// plots.
    fn point_text(&self, point: &Point, var: &str) -> String {
        if point.is_empty() && var == self.p.x {
            "untuned".into()
        } else {
            variable_text(point, var)
        }
    }

    /// Columns naming the grid point, one per variable.
    fn variable_columns(&self, points: &[&Point]) -> Vec<Column> {
        self.variables
            .iter()
            .map(|var| {
                let text = |pt: &&Point| self.point_text(pt, var);
                string_column(var, points.iter().map(text).collect())
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
        let cells = self.table_cells();
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
                        Some(s) => format_summary(s.mean, s.ci95, cell.2 == BIAS),
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
                    .map(|var| self.point_text(pt, var))
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

    /// `point` minus `reference` on `cell`, paired by replicate (the same
    /// seed on both sides) and by query (those every such replicate holds),
    /// resampled by `paired_bootstrap` with stream `stream`; `None` where
    /// the two share no replicate or no query.
    fn paired(&self, point: &Point, reference: &Point, cell: &Cell, stream: u64) -> Option<Paired> {
        let ours = self.query_values(point, &cell.0, &cell.1, &cell.2);
        let theirs = self.query_values(reference, &cell.0, &cell.1, &cell.2);
        let replicates: Vec<(&QueryValues, &QueryValues)> = ours
            .iter()
            .filter_map(|(r, a)| Some((*a, *theirs.get(r)?)))
            .collect();
        let (first, _) = replicates.first()?;
        let mut queries: Vec<&String> = first
            .keys()
            .filter(|q| {
                replicates
                    .iter()
                    .all(|(a, b)| a.contains_key(*q) && b.contains_key(*q))
            })
            .collect();
        if queries.is_empty() {
            return None;
        }
        queries.sort();
        let differences: Vec<Vec<f64>> = replicates
            .iter()
            .map(|(a, b)| queries.iter().map(|q| a[*q] - b[*q]).collect())
            .collect();
        Some(Paired {
            queries: queries.len(),
            replicates: differences.len(),
            result: paired_bootstrap(&differences, self.p.bootstrap_samples, stream),
        })
    }

    /// The question as a table: per measure (each dataset's
    /// settings in the main metric, and bias), the best grid point by its
    /// mean over replicates, and every other point against it (paired
    /// bootstrap, Holm within the measure). A point is "within noise" of
    /// the best where its Holm-adjusted p is at least 0.05; the last column
    /// says whether it is so on every measure at once.
    fn write_versus_best(&self, out: &Path) -> anyhow::Result<String> {
        struct Row<'r> {
            point: &'r Point,
            best: &'r Point,
            cell: Cell,
            paired: Paired,
            p_holm: f64,
        }
        let x = &self.p.x;
        let cells: Vec<Cell> = self
            .cells()
            .into_iter()
            .filter(|c| self.evaluations.iter().any(|e| e.dataset == c.0))
            .filter(|c| c.2 == self.p.metric || c.2 == BIAS)
            .collect();
        // Only grid points with a value of x (not an untuned baseline).
        let grid: Vec<&Point> = self
            .points
            .iter()
            .filter(|pt| pt.iter().any(|(k, _)| k == x))
            .collect();
        let mut rows: Vec<Row> = Vec::new();
        let mut bests: Vec<(Cell, &Point)> = Vec::new();
        for (index, cell) in cells.iter().enumerate() {
            let lower_is_better = cell.2 == BIAS;
            let means: Vec<(&Point, f64)> = grid
                .iter()
                .filter_map(|pt| Some((*pt, self.summarise(pt, cell)?.mean)))
                .filter(|(_, m)| !m.is_nan())
                .collect();
            let Some(&(best, _)) = means.iter().max_by(|a, b| {
                let order = a.1.total_cmp(&b.1);
                if lower_is_better {
                    order.reverse()
                } else {
                    order
                }
            }) else {
                continue;
            };
            bests.push((cell.clone(), best));
            let first = rows.len();
            for (point, _) in &means {
                if *point == best {
                    continue;
                }
                let stream = 1_000 + index as u64;
                if let Some(paired) = self.paired(point, best, cell, stream) {
                    rows.push(Row {
                        point,
                        best,
                        cell: cell.clone(),
                        paired,
                        p_holm: f64::NAN,
                    });
                }
            }
            let adjusted = holm(
                &rows[first..]
                    .iter()
                    .map(|r| r.paired.result.p_value)
                    .collect::<Vec<_>>(),
            );
            for (row, p) in rows[first..].iter_mut().zip(adjusted) {
                row.p_holm = p;
            }
        }
        let within = |r: &Row| r.p_holm >= 0.05;
        let points: Vec<&Point> = rows.iter().map(|r| r.point).collect();
        let mut columns = self.variable_columns(&points);
        columns.push(string_column(
            "best",
            rows.iter().map(|r| point_label(r.best)).collect(),
        ));
        columns.extend(paired_columns(
            rows.iter().map(|r| (&r.cell, &r.paired, r.p_holm)),
        ));
        columns.push(Column::new(
            "within_noise".into(),
            rows.iter().map(within).collect::<Vec<bool>>(),
        ));
        write_table(out, "versus_best", columns)?;

        // The answer: one row per grid point, one column per measure.
        let header: Vec<String> = std::iter::once("grid point".to_string())
            .chain(
                bests
                    .iter()
                    .map(|(c, _)| format!("{}/{}/{}", c.0, c.1, c.2)),
            )
            .chain(std::iter::once(
                "within noise of the best on all".to_string(),
            ))
            .collect();
        let answer: Vec<Vec<String>> = grid
            .iter()
            .map(|pt| {
                let mut all = true;
                let mut row = vec![point_label(pt)];
                for (cell, best) in &bests {
                    if best == pt {
                        row.push("best".into());
                        continue;
                    }
                    let found = rows.iter().find(|r| r.point == *pt && r.cell == *cell);
                    let digits = if cell.2 == BIAS { 1 } else { 4 };
                    row.push(match found {
                        Some(r) => {
                            all &= within(r);
                            let mark = if within(r) { "≈" } else { "✗" };
                            format!("{mark} {:+.d$}", r.paired.result.delta, d = digits)
                        }
                        None => {
                            all = false;
                            "–".into()
                        }
                    });
                }
                row.push(if all { "yes".into() } else { "no".into() });
                row
            })
            .collect();
        let table = markdown_table(&header, &answer);
        std::fs::write(out.join("versus_best.md"), &table)?;
        Ok(format!(
            "## Within noise of the best?

Per measure, the best grid point by its mean over {r}s (`best`; for bias the lowest), and every other point's difference from it (paired bootstrap by {r} and query, as below); `≈` where the difference is within noise (Holm-adjusted p ≥ 0.05 within the measure), `✗` where the point is reliably worse. The last column answers whether a point is within noise of the best on every measure at once. `versus_best.csv` has the intervals and both p-values.\n\n{table}\n",
            r = self.p.replicate
        ))
    }

    fn write_bootstrap(&self, out: &Path) -> anyhow::Result<String> {
        struct Row<'r> {
            point: &'r Point,
            baseline: f64,
            cell: Cell,
            paired: Paired,
            p_holm: f64,
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
                    let Some(paired) = self.paired(point, reference, cell, index as u64 + 1) else {
                        continue;
                    };
                    rows.push(Row {
                        point,
                        baseline,
                        cell: cell.clone(),
                        paired,
                        p_holm: f64::NAN,
                    });
                }
            }
        }
        // One family per baseline and measure: the other values of x
        // compared with it (Holm, family-wise error).
        let families: BTreeSet<(u64, Cell)> = rows
            .iter()
            .map(|r| (r.baseline.to_bits(), r.cell.clone()))
            .collect();
        for family in families {
            let members: Vec<usize> = (0..rows.len())
                .filter(|&i| (rows[i].baseline.to_bits(), rows[i].cell.clone()) == family)
                .collect();
            let adjusted = holm(
                &members
                    .iter()
                    .map(|&i| rows[i].paired.result.p_value)
                    .collect::<Vec<_>>(),
            );
            for (&i, p) in members.iter().zip(adjusted) {
                rows[i].p_holm = p;
            }
        }
        let points: Vec<&Point> = rows.iter().map(|r| r.point).collect();
        let mut columns = self.variable_columns(&points);
        columns.push(Column::new(
            format!("baseline_{x}").as_str().into(),
            rows.iter().map(|r| r.baseline).collect::<Vec<f64>>(),
        ));
        columns.extend(paired_columns(
            rows.iter().map(|r| (&r.cell, &r.paired, r.p_holm)),
        ));
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
            "p (Holm)",
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
                    r.paired.replicates.to_string(),
                    r.paired.difference_text(digits),
                    p_text(r.paired.result.p_value, self.p.bootstrap_samples),
                    p_text(r.p_holm, self.p.bootstrap_samples),
                ]
            })
            .collect();
        let table = markdown_table(&header, &table_rows);
        std::fs::write(out.join("bootstrap.md"), &table)?;
        Ok(format!(
            "## Paired bootstrap against {x} = {:?}\n\nDifference in the per-query mean, paired by {r} and by query ({} resamples, each drawing {r}s and queries with replacement, so the interval holds the {r}-to-{r} variance as well as the query sampling; a query's value is its mean over the setting's language pools). p is two-sided; `< 1/resamples` where no resample crossed zero; p (Holm) is adjusted by Holm's step-down method within each family (one baseline, one dataset, setting and metric: every other value of {x} against it), which bounds the chance of any false difference in the family at the level read.\n\nGrid points that share a {r} share its random draws (batch sampler stream, initialisation and dropout masks): at one {r}, two values of {x} are compared under common random numbers, which makes paired differences sharper but means that neighbouring values of {x} are not independent evidence of a trend.\n\n{table}\n",
            self.p.baselines, self.p.bootstrap_samples, r = self.p.replicate
        ))
    }
}

/// One point minus another on one measure, paired by replicate and query.
struct Paired {
    queries: usize,
    replicates: usize,
    result: PairedBootstrap,
}

impl Paired {
    /// "+0.0123 (+0.0050, +0.0200)".
    fn difference_text(&self, digits: usize) -> String {
        format!(
            "{:+.d$} ({:+.d$}, {:+.d$})",
            self.result.delta,
            self.result.ci_low,
            self.result.ci_high,
            d = digits
        )
    }
}

/// The columns of paired comparisons: the measure, the queries and
/// replicates behind it, the difference with its interval, p and Holm's p.
fn paired_columns<'r>(
    rows: impl Iterator<Item = (&'r Cell, &'r Paired, f64)> + Clone,
) -> Vec<Column> {
    let text = |f: fn(&Cell) -> &String| rows.clone().map(|(c, _, _)| f(c).clone()).collect();
    let num = |f: fn(&Paired) -> f64| rows.clone().map(|(_, p, _)| f(p)).collect::<Vec<f64>>();
    let count = |f: fn(&Paired) -> usize| {
        rows.clone()
            .map(|(_, p, _)| f(p) as i64)
            .collect::<Vec<i64>>()
    };
    vec![
        string_column("dataset", text(|c| &c.0)),
        string_column("setting", text(|c| &c.1)),
        string_column("metric", text(|c| &c.2)),
        Column::new("queries".into(), count(|p| p.queries)),
        Column::new("replicates".into(), count(|p| p.replicates)),
        Column::new("delta".into(), num(|p| p.result.delta)),
        Column::new("ci_low".into(), num(|p| p.result.ci_low)),
        Column::new("ci_high".into(), num(|p| p.result.ci_high)),
        Column::new("p_value".into(), num(|p| p.result.p_value)),
        Column::new(
            "p_holm".into(),
            rows.clone().map(|(_, _, h)| h).collect::<Vec<f64>>(),
        ),
    ]
}

/// `var`'s value at `point` as text (empty where the point lacks it).
fn variable_text(point: &Point, var: &str) -> String {
    point
        .iter()
        .find(|(k, _)| k == var)
        .map(|(_, v)| value_text(v))
        .unwrap_or_default()
}

/// Grid points in table order: the other variables first, then `x`, so the
/// rows of one model stay together; numbers compare as numbers.
fn compare_points(x: &str, a: &Point, b: &Point) -> Ordering {
    fn split<'p>(x: &str, point: &'p Point) -> (Vec<&'p (String, Value)>, Option<&'p Value>) {
        let rest = point.iter().filter(|(k, _)| k != x).collect();
        let x_value = point.iter().find(|(k, _)| k == x).map(|(_, v)| v);
        (rest, x_value)
    }
    let ((rest_a, x_a), (rest_b, x_b)) = (split(x, a), split(x, b));
    let pair = |(ka, va): &(String, Value), (kb, vb): &(String, Value)| {
        ka.cmp(kb).then_with(|| compare_values(va, vb))
    };
    let rest = rest_a
        .iter()
        .zip(&rest_b)
        .map(|(a, b)| pair(a, b))
        .find(|o| o.is_ne())
        .unwrap_or_else(|| rest_a.len().cmp(&rest_b.len()));
    rest.then_with(|| match (x_a, x_b) {
        (Some(a), Some(b)) => compare_values(a, b),
        (a, b) => a.is_some().cmp(&b.is_some()),
    })
}

fn compare_values(a: &Value, b: &Value) -> Ordering {
    match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) => a.total_cmp(&b),
        _ => value_text(a).cmp(&value_text(b)),
    }
}

/// `NAME.parquet` and `NAME.csv` of the same columns, both through polars.
fn write_table(out: &Path, name: &str, columns: Vec<Column>) -> anyhow::Result<()> {
    let mut frame = DataFrame::new_infer_height(columns.clone())?;
    write_parquet(&out.join(format!("{name}.parquet")), columns)?;
    let path = out.join(format!("{name}.csv"));
    let mut file = std::fs::File::create(&path)?;
    CsvWriter::new(&mut file)
        .finish(&mut frame)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(values: &[(&str, Value)]) -> Point {
        values
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn points_sort_by_their_other_variables_then_x_and_numbers_as_numbers() {
        let json = |text: &str| -> Value { serde_json::from_str(text).unwrap() };
        let mut points = [
            point(&[("alpha", json("0.5")), ("layers", json("10"))]),
            point(&[("alpha", json("0.25")), ("layers", json("2"))]),
            point(&[("alpha", json("0")), ("layers", json("10"))]),
            point(&[("alpha", json("1")), ("layers", json("2"))]),
            point(&[]),
        ];
        points.sort_by(|a, b| compare_points("alpha", a, b));
        let labels: Vec<String> = points.iter().map(point_label).collect();
        assert_eq!(
            labels,
            [
                "-",
                "alpha=0.25, layers=2",
                "alpha=1, layers=2",
                "alpha=0, layers=10",
                "alpha=0.5, layers=10"
            ]
        );
    }
}
