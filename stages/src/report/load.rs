//! Reading one evaluation instance's numbers: the results format of
//! `xlpipe_eval::results` and nothing else, whatever kind wrote it.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use xlpipe_eval::results::{usual_metric, Results, ALL};
use xlpipe_stage_api::InputArtifact;

use super::{Point, ReportParams};

/// One evaluation instance's numbers.
pub(super) struct Evaluation {
    pub point: Point,
    pub replicate: Option<Value>,
    pub dataset: String,
    /// (setting, metric) -> value (macro average).
    pub summary: BTreeMap<(String, String), f64>,
    /// (setting, query lang, candidate lang, metric) -> value.
    pub per_language: BTreeMap<(String, String, String, String), f64>,
    /// (setting, metric) -> query -> value, averaged over the setting's pools.
    pub per_query: BTreeMap<(String, String), HashMap<String, f64>>,
    /// The metric its main-table column shows: `metric` when it reports
    /// that, else its setting's usual one (bitext accuracy@1, ad-hoc nDCG@10).
    pub headline: String,
}

impl Evaluation {
    pub fn load(artifact: &InputArtifact, p: &ReportParams) -> anyhow::Result<Evaluation> {
        let results = Results::read(&artifact.path).map_err(|e| {
            anyhow::anyhow!(
                "reading the results of {} ({}): {e:#}",
                artifact.producer,
                artifact.path.display()
            )
        })?;
        let mut grid = artifact.grid.clone();
        let replicate = grid.remove(&p.replicate);
        let stage = artifact.producer.split('[').next().unwrap_or_default();
        if let Some(label) = p.series.get(stage) {
            grid.insert(super::SERIES.to_string(), Value::String(label.clone()));
        }
        let dataset = results.dataset_or_stage(&artifact.producer);
        let mut summary = BTreeMap::new();
        let mut per_language = BTreeMap::new();
        for row in results.rows {
            if row.query_lang == ALL && row.candidate_lang == ALL {
                summary.insert((row.setting, row.metric), row.value);
            } else {
                per_language.insert(
                    (row.setting, row.query_lang, row.candidate_lang, row.metric),
                    row.value,
                );
            }
        }
        let headline = if summary.keys().any(|(_, m)| *m == p.metric) {
            p.metric.clone()
        } else {
            let setting = summary.keys().next().map_or("", |(s, _)| s.as_str());
            usual_metric(setting).to_string()
        };
        Ok(Evaluation {
            point: grid.into_iter().collect(),
            replicate,
            dataset,
            summary,
            per_language,
            per_query: results.queries,
            headline,
        })
    }
}

/// One training run's curves, from a `train` stage's `training` output.
pub(super) struct TrainingCurve {
    /// The run's grid point, e.g. `alpha=0.5, seed=1`.
    pub label: String,
    /// (step, training loss) for every step.
    pub loss: Vec<(f64, f64)>,
    /// (step, validation loss) where the run validated.
    pub val_loss: Vec<(f64, f64)>,
}

impl TrainingCurve {
    pub fn load(artifact: &InputArtifact) -> anyhow::Result<TrainingCurve> {
        let file = artifact.path.join("metrics.parquet");
        let frame = xlpipe_stage_api::table::read_parquet(&file).map_err(|e| {
            anyhow::anyhow!(
                "input `training` from {}: {} is not a train stage's metrics ({e:#})",
                artifact.producer,
                file.display()
            )
        })?;
        let column = |name: &str| -> anyhow::Result<Vec<Option<f64>>> {
            let values = frame
                .column(name)
                .and_then(|c| c.cast(&polars::prelude::DataType::Float64))
                .map_err(|e| anyhow::anyhow!("{}: column `{name}`: {e}", file.display()))?;
            Ok(values.f64()?.iter().collect())
        };
        let steps = column("step")?;
        let pairs = |values: Vec<Option<f64>>| -> Vec<(f64, f64)> {
            steps
                .iter()
                .zip(values)
                .filter_map(|(s, v)| Some(((*s)?, v?)))
                .collect()
        };
        let label = if artifact.grid.is_empty() {
            artifact.producer.clone()
        } else {
            let point: Point = artifact.grid.clone().into_iter().collect();
            super::point_label(&point)
        };
        Ok(TrainingCurve {
            label,
            loss: pairs(column("loss")?),
            val_loss: pairs(column("val_loss")?),
        })
    }
}
