//! `export_mteb`: evaluations as MTEB `TaskResult` JSON, the format in
//! which embedding results are exchanged (mteb's `ResultCache`, the MTEB
//! results repository and leaderboard).
//!
//! ```toml
//! [stages.mteb]
//! kind = "export_mteb"
//! inputs.evaluations = ["xquad_r_eval[*]", "mlqa_r_eval[*]"]
//! model = "me5-small-hybrid"   # a grid point's model is "me5-small-hybrid[alpha=0.5,seed=1]"
//! ```
//!
//! Output folder `mteb`: `results/<model>/<revision>/<Task>.json` (a `/` in
//! the model name becomes `__`, as MTEB writes it), so that
//! `mteb.ResultCache(cache_path=<mteb>).load_results(require_model_meta=False,
//! include_remote=False)` reads a whole grid. Every evaluation is read
//! through the one results format (`xlpipe_eval::results`), so any
//! `evaluate_*` kind exports the same way.
//!
//! A task is a dataset (its `dataset` param, else its stage name; `tasks`
//! renames). Its subsets (`hf_subset`) are our settings: `mono`, `cross`,
//! `multi`, `bitext`, `adhoc` for the macro average over a setting's
//! languages, and `<setting>-<query lang>[-<candidate lang>]` for one
//! language or pair (`multi-ar`: Arabic questions against the whole
//! multilingual pool). Metric keys follow MTEB where the metric is the
//! same (`ndcg_at_10`, `recall_at_1`, `recall_at_10`, `recall_at_100`,
//! `map_at_100`, `mrr_at_100`); `map` and `mrr` are over the full ranking
//! (MTEB's `map_at_1000` cuts at rank 1000, so they are not renamed), the
//! multilingual max-min rank distance is `language_bias`, bitext accuracy
//! at 1 is `accuracy`. `main_score` is the setting's usual metric (map,
//! bitext accuracy, ad-hoc nDCG@10). `mteb_version` is null: mteb did not
//! compute these numbers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use xlpipe_eval::results::{usual_metric, ResultRow, Results, ALL, ANY};
use xlpipe_stage_api::{InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct ExportMtebStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportMtebParams {
    /// Model name; each grid point adds its values in brackets.
    #[serde(default = "default_model")]
    model: String,
    /// The model's revision folder (MTEB's name for an unknown one).
    #[serde(default = "default_revision")]
    revision: String,
    /// Dataset name -> MTEB task name (default: the dataset name).
    #[serde(default)]
    tasks: BTreeMap<String, String>,
    /// The split the numbers are reported under.
    #[serde(default = "default_split")]
    split: String,
    #[serde(default = "default_revision")]
    dataset_revision: String,
}

fn default_model() -> String {
    "xlpipe".into()
}
fn default_revision() -> String {
    "no_revision_available".into()
}
fn default_split() -> String {
    "test".into()
}

impl TypedStage for ExportMtebStage {
    type Params = ExportMtebParams;
    const KIND: &'static str = "export_mteb";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "evaluations as MTEB TaskResult JSON (results/<model>/<revision>/<Task>.json)";

    fn validate(
        &self,
        p: ExportMtebParams,
        _env: &ParamsEnv,
    ) -> Result<ExportMtebParams, ParamError> {
        for (field, value) in [
            ("model", &p.model),
            ("revision", &p.revision),
            ("split", &p.split),
        ] {
            if value.trim().is_empty() || value.contains("..") || value.contains('\\') {
                return Err(ParamError::new(
                    field,
                    format!("`{value}` cannot name a folder"),
                ));
            }
        }
        if p.revision.contains('/') {
            return Err(ParamError::new("revision", "a revision cannot contain `/`"));
        }
        for task in p.tasks.values() {
            if task.is_empty() || task.contains('/') {
                return Err(ParamError::new(
                    "tasks",
                    format!("`{task}` cannot name a file"),
                ));
            }
        }
        Ok(p)
    }

    fn interface_for(
        &self,
        _p: &ExportMtebParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![InputSlot::many("evaluations")],
            ..Interface::producing(&["mteb"])
        })
    }

    fn execute(&self, p: &ExportMtebParams, ctx: &StageContext) -> anyhow::Result<()> {
        let out = ctx.output("mteb");
        // (model folder, task) -> the evaluation it came from.
        let mut written: BTreeMap<(String, String), String> = BTreeMap::new();
        for artifact in ctx.inputs("evaluations") {
            let results = Results::read(&artifact.path).with_context(|| {
                format!(
                    "reading the results of {} ({})",
                    artifact.producer,
                    artifact.path.display()
                )
            })?;
            let dataset = results.dataset_or_stage(&artifact.producer);
            let task = p.tasks.get(&dataset).cloned().unwrap_or(dataset);
            let model = model_name(&p.model, &artifact.grid);
            let folder = model.replace('/', "__");
            if let Some(other) =
                written.insert((folder.clone(), task.clone()), artifact.producer.clone())
            {
                anyhow::bail!(
                    "{} and {other} both give task `{task}` of model `{model}`: name them apart \
                     (a `dataset` param on one, or `tasks`)",
                    artifact.producer
                );
            }
            let dir = out.join("results").join(&folder).join(&p.revision);
            std::fs::create_dir_all(&dir)?;
            let json = task_result(&results.rows, &task, p);
            std::fs::write(
                dir.join(format!("{task}.json")),
                serde_json::to_string_pretty(&json)?,
            )?;
        }
        Ok(())
    }

    fn render_output(&self, output: &Path) -> anyhow::Result<Option<String>> {
        let files = walk_json(&output.join("results"));
        Ok(Some(format!(
            "{} TaskResult files under {}/results",
            files,
            output.display()
        )))
    }
}

/// `model`, plus a grid point's values: `me5[alpha=0.5,seed=1]`.
fn model_name(model: &str, grid: &BTreeMap<String, Value>) -> String {
    if grid.is_empty() {
        return model.to_string();
    }
    let values: Vec<String> = grid
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    format!("{model}[{}]", values.join(","))
}

/// One `hf_subset`'s numbers: its setting, languages, metric key -> value.
type Subset = (String, BTreeSet<String>, Map<String, Value>);

/// One task's `TaskResult`, as MTEB 2 reads it (`TaskResult.from_disk`):
/// every score dict has `main_score`, `hf_subset` and `languages`.
fn task_result(rows: &[ResultRow], task: &str, p: &ExportMtebParams) -> Value {
    let mut subsets: BTreeMap<String, Subset> = BTreeMap::new();
    let mut setting_languages: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for row in rows {
        let whole = row.query_lang == ALL && row.candidate_lang == ALL;
        let subset = if whole {
            row.setting.clone()
        } else {
            subset_name(row)
        };
        let entry = subsets
            .entry(subset)
            .or_insert_with(|| (row.setting.clone(), BTreeSet::new(), Map::new()));
        if !whole {
            for lang in [&row.query_lang, &row.candidate_lang] {
                if !lang.is_empty() && lang != ANY && lang != ALL {
                    entry.1.insert(mteb_language(lang));
                    setting_languages
                        .entry(&row.setting)
                        .or_default()
                        .insert(mteb_language(lang));
                }
            }
        }
        entry.2.insert(metric_key(&row.metric), json!(row.value));
        entry.2.insert("n_queries".into(), json!(row.n));
    }
    let scores: Vec<Value> = subsets
        .into_iter()
        .map(|(subset, (setting, mut languages, mut metrics))| {
            if languages.is_empty() {
                languages = setting_languages
                    .get(setting.as_str())
                    .cloned()
                    .unwrap_or_default();
            }
            let main = metric_key(usual_metric(&setting));
            let main_score = metrics.get(&main).cloned().unwrap_or(Value::Null);
            metrics.insert("main_score".into(), main_score);
            metrics.insert("hf_subset".into(), json!(subset));
            metrics.insert("languages".into(), json!(languages));
            Value::Object(metrics)
        })
        .collect();
    json!({
        "dataset_revision": p.dataset_revision,
        "task_name": task,
        "mteb_version": null,
        "scores": { p.split.clone(): scores },
        "evaluation_time": null,
        "kg_co2_emissions": null,
    })
}

fn subset_name(row: &ResultRow) -> String {
    let mut name = format!("{}-{}", row.setting, row.query_lang);
    let c = &row.candidate_lang;
    if !c.is_empty() && c != ANY && c != ALL {
        name.push('-');
        name.push_str(c);
    }
    name
}

/// Our metric names as MTEB's keys, where the metric is the same.
fn metric_key(metric: &str) -> String {
    match metric {
        "recall_1" => "recall_at_1",
        "recall_10" => "recall_at_10",
        "ndcg_10" => "ndcg_at_10",
        "recall_100" => "recall_at_100",
        "map_100" => "map_at_100",
        "mrr_100" => "mrr_at_100",
        "accuracy_1" => "accuracy",
        "bias" => "language_bias",
        other => other,
    }
    .to_string()
}

/// MTEB's language code (ISO 639-3 and script) for the ISO 639-1 codes of
/// the datasets xlpipe reads; any other code is kept as it is.
fn mteb_language(code: &str) -> String {
    let known = match code {
        "ar" => "arb-Arab",
        "bn" => "ben-Beng",
        "de" => "deu-Latn",
        "el" => "ell-Grek",
        "en" => "eng-Latn",
        "es" => "spa-Latn",
        "fa" => "fas-Arab",
        "fi" => "fin-Latn",
        "fr" => "fra-Latn",
        "hi" => "hin-Deva",
        "id" => "ind-Latn",
        "it" => "ita-Latn",
        "ja" => "jpn-Jpan",
        "ko" => "kor-Hang",
        "nl" => "nld-Latn",
        "pt" => "por-Latn",
        "ro" => "ron-Latn",
        "ru" => "rus-Cyrl",
        "sw" => "swa-Latn",
        "te" => "tel-Telu",
        "th" => "tha-Thai",
        "tr" => "tur-Latn",
        "uk" => "ukr-Cyrl",
        "vi" => "vie-Latn",
        "zh" => "zho-Hans",
        other => other,
    };
    known.to_string()
}

fn walk_json(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                walk_json(&e.path())
            } else {
                usize::from(e.path().extension().is_some_and(|x| x == "json"))
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(setting: &str, q: &str, c: &str, metric: &str, value: f64) -> ResultRow {
        ResultRow {
            setting: setting.into(),
            query_lang: q.into(),
            candidate_lang: c.into(),
            metric: metric.into(),
            value,
            n: 3,
        }
    }

    #[test]
    fn settings_become_subsets_with_mteb_keys_and_languages() {
        let p: ExportMtebParams = serde_json::from_value(json!({})).unwrap();
        let rows = vec![
            row("mono", ALL, ALL, "map", 0.8),
            row("mono", ALL, ALL, "ndcg_10", 0.85),
            row("mono", "ar", "ar", "map", 0.7),
            row("mono", "de", "de", "map", 0.9),
            row("cross", "ar", "de", "recall_10", 0.5),
            row("multi", ALL, ALL, "bias", 12.0),
            row("multi", "ar", ANY, "map", 0.4),
        ];
        let result = task_result(&rows, "XQuAD-R", &p);
        assert_eq!(result["task_name"], "XQuAD-R");
        assert!(result["mteb_version"].is_null());
        let scores = result["scores"]["test"].as_array().unwrap();
        let by_subset: BTreeMap<&str, &Value> = scores
            .iter()
            .map(|s| (s["hf_subset"].as_str().unwrap(), s))
            .collect();
        assert_eq!(
            by_subset.keys().copied().collect::<Vec<_>>(),
            [
                "cross-ar-de",
                "mono",
                "mono-ar-ar",
                "mono-de-de",
                "multi",
                "multi-ar"
            ]
        );
        let mono = by_subset["mono"];
        assert_eq!(mono["main_score"], 0.8);
        assert_eq!(mono["ndcg_at_10"], 0.85);
        assert_eq!(mono["languages"], json!(["arb-Arab", "deu-Latn"]));
        assert_eq!(by_subset["mono-ar-ar"]["languages"], json!(["arb-Arab"]));
        assert_eq!(by_subset["cross-ar-de"]["recall_at_10"], 0.5);
        assert_eq!(by_subset["multi"]["language_bias"], 12.0);
        assert_eq!(by_subset["multi-ar"]["main_score"], 0.4);
        assert_eq!(by_subset["multi-ar"]["n_queries"], 3);
    }

    #[test]
    fn a_grid_point_names_its_model() {
        let grid: BTreeMap<String, Value> = [
            ("alpha".to_string(), json!(0.5)),
            ("seed".to_string(), json!(1)),
        ]
        .into();
        assert_eq!(model_name("me5", &grid), "me5[alpha=0.5,seed=1]");
        assert_eq!(model_name("org/me5", &BTreeMap::new()), "org/me5");
    }
}
