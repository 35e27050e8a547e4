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
//! the row `-`. Every evaluation is read through the one results format
//! (`xlpipe_eval::results`) that all `evaluate_*` kinds write: LAReQA's
//! settings mono / cross / multi (plus the multilingual max-min rank
//! distance as metric `bias`), bitext's `bitext` and ad-hoc's `adhoc`. A
//! dataset whose results lack `metric` shows its setting's usual one in the
//! main table (bitext `accuracy_1`, ad-hoc `ndcg_10`).
//!
//! Modules: `load` (one evaluation's numbers), `tables` (the tables and
//! their statistics), `markdown` (text for reading), `plot` (the charts).
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
//!   queries is the macro average). Its
//!   p-values are adjusted by Holm within each family (one baseline, one
//!   measure).
//! - `versus_best.{parquet,csv,md}`: per measure (each setting's main
//!   metric, and bias) the best grid point, every other point against it
//!   (paired bootstrap, Holm within the measure), and per point whether it
//!   is within noise of the best on every measure at once.
//! - `report.md`: the tables above for reading; `plots/*.svg` and `*.png`.
//! - `tensorboard/<run>/`: with `inputs.training`, every run's TensorBoard
//!   events (hard-linked), for one `tensorboard --logdir` over the grid.

mod load;
mod markdown;
mod plot;
pub use plot::{write_line_chart, ChartLine};
mod tables;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use anyhow::Context;

use xlpipe_eval::results::known_metrics;
use xlpipe_stage_api::content::link_tree;
use xlpipe_stage_api::{InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage};

use load::Evaluation;
use tables::Report;

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
    /// Producing stage -> a label: evaluations of different stages over the
    /// same grid (two training protocols, say) become separate lines and
    /// rows, told apart by a `series` variable, instead of one point.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    series: BTreeMap<String, String>,
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

impl TypedStage for ReportStage {
    type Params = ReportParams;
    const KIND: &'static str = "report";
    // 2: the bootstrap resamples seeds as well as queries.
    // 3: untuned levels labelled "(untuned)" in their setting's colour;
    // the t quantile beyond 30 degrees of freedom to 1e-4.
    // 4: reads the results format; grid points sort numbers as numbers.
    // 5: the untuned row labelled; no domain columns repeating one
    // dataset's; training curves.
    // 6: a grid's TensorBoard runs gathered under `tensorboard/`.
    // 7: Holm-adjusted p-values; every point against each measure's best.
    // 8: trade-off charts (mono against multi and against bias).
    // 9: a chart's canvas widens to show long legend labels whole.
    const VERSION: u32 = 9;
    const SUMMARY: &'static str = "result tables (mean ± 95% CI over seeds, paired bootstrap) and plots of a grid's evaluations";

    fn validate(&self, mut p: ReportParams, _env: &ParamsEnv) -> Result<ReportParams, ParamError> {
        if !known_metrics().any(|m| m == p.metric) {
            return Err(ParamError::new(
                "metric",
                format!(
                    "unknown metric `{}`; known: {}",
                    p.metric,
                    known_metrics()
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        p.in_domain.sort();
        p.in_domain.dedup();
        if !p.series.is_empty() && (p.x == SERIES || p.replicate == SERIES) {
            return Err(ParamError::new(
                "series",
                format!("`{SERIES}` names the series variable; x and replicate must be others"),
            ));
        }
        Ok(p)
    }

    fn interface_for(
        &self,
        _p: &ReportParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![
                InputSlot::many("evaluations"),
                InputSlot {
                    optional: true,
                    ..InputSlot::many("training")
                },
            ],
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
        let out = ctx.output("report");
        std::fs::create_dir_all(out.join("plots"))?;
        let markdown = report.write_tables(&out)?;
        std::fs::write(out.join("report.md"), markdown)?;
        plot::write_plots(&report, &out.join("plots"))?;
        let curves = ctx
            .inputs("training")
            .iter()
            .map(load::TrainingCurve::load)
            .collect::<anyhow::Result<Vec<_>>>()?;
        plot::write_training_curves(&curves, &out.join("plots"))?;
        // Every run's TensorBoard events in one folder, so that
        // `tensorboard --logdir <report>/tensorboard` shows the whole grid
        // (each run folder is named after its instance).
        for artifact in ctx.inputs("training") {
            let events = artifact.path.join("tensorboard");
            if events.is_dir() {
                link_tree(&events, &out.join("tensorboard")).with_context(|| {
                    format!("gathering the TensorBoard runs of {}", artifact.producer)
                })?;
            }
        }
        Ok(())
    }

    fn render_output(&self, output: &Path) -> anyhow::Result<Option<String>> {
        markdown::render_main_table(output).map(Some)
    }
}

/// The variable `series` adds to the points of the stages it names.
const SERIES: &str = "series";

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
