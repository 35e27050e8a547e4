//! `model_card`: a trained model folder whose card carries its evaluations.
//!
//! ```toml
//! [stages.card]
//! kind = "model_card"
//! inputs.model = "train.model"                      # one grid point's model ...
//! inputs.evaluations = ["xquad_r_eval", "mlqa_r_eval"]  # ... and its evaluations
//! ```
//!
//! `train` writes its card before anything has evaluated the model; this
//! stage writes the model folder again (files hard-linked from the cached
//! one where the file system allows, so it costs no space; copied
//! otherwise) with the card's front matter extended by a `model-index`
//! (the Hugging Face Hub's format for evaluation results, which
//! `huggingface_hub.ModelCard` reads) and an "Evaluation" table: every
//! evaluation's macro averages per setting (mono, cross, multi, bitext,
//! ad-hoc), read through the one results format.

use std::fmt::Write as _;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use xlpipe_eval::results::{Results, ALL};
use xlpipe_stage_api::content::link_tree;
use xlpipe_stage_api::{InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct ModelCardStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCardParams {}

/// One number for the card: dataset, setting, metric, value.
struct CardResult {
    dataset: String,
    setting: String,
    metric: String,
    value: f64,
}

impl TypedStage for ModelCardStage {
    type Params = ModelCardParams;
    const KIND: &'static str = "model_card";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "a trained model folder whose card (README.md) lists its evaluation results";

    fn validate(
        &self,
        p: ModelCardParams,
        _env: &ParamsEnv,
    ) -> Result<ModelCardParams, ParamError> {
        Ok(p)
    }

    fn interface_for(
        &self,
        _p: &ModelCardParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![InputSlot::one("model"), InputSlot::many("evaluations")],
            ..Interface::producing(&["model"])
        })
    }

    fn execute(&self, _p: &ModelCardParams, ctx: &StageContext) -> anyhow::Result<()> {
        let model = &ctx.inputs("model")[0];
        let mut results = Vec::new();
        for artifact in ctx.inputs("evaluations") {
            let read = Results::read(&artifact.path).with_context(|| {
                format!(
                    "reading the results of {} ({})",
                    artifact.producer,
                    artifact.path.display()
                )
            })?;
            let dataset = read.dataset_or_stage(&artifact.producer);
            results.extend(
                read.rows
                    .into_iter()
                    .filter(|r| r.query_lang == ALL && r.candidate_lang == ALL)
                    .map(|r| CardResult {
                        dataset: dataset.clone(),
                        setting: r.setting,
                        metric: r.metric,
                        value: r.value,
                    }),
            );
        }
        let out = ctx.output("model");
        link_tree(&model.path, &out)
            .with_context(|| format!("linking {} into {}", model.path.display(), out.display()))?;
        let card_path = model.path.join("README.md");
        let card = std::fs::read_to_string(&card_path)
            .with_context(|| format!("{} has no model card", model.path.display()))?;
        let name = card
            .lines()
            .find_map(|l| l.strip_prefix("# "))
            .unwrap_or(&model.producer)
            .to_string();
        let card = with_results(&card, &name, &results).with_context(|| {
            format!("{}: the card has no YAML front matter", card_path.display())
        })?;
        let target = out.join("README.md");
        std::fs::remove_file(&target)?; // a link to the input's card
        std::fs::write(&target, card)?;
        Ok(())
    }
}

/// The card with a `model-index` in its front matter and an "Evaluation"
/// section; `None` if it has no front matter.
fn with_results(card: &str, name: &str, results: &[CardResult]) -> Option<String> {
    let rest = card.strip_prefix("---\n")?;
    let end = rest.find("\n---\n")?;
    let (front, body) = (&rest[..end + 1], &rest[end + 5..]);
    let mut yaml = String::from("model-index:\n");
    let _ = writeln!(yaml, "- name: {}", yaml_string(name));
    yaml += "  results:\n";
    let mut datasets: Vec<&str> = Vec::new();
    for r in results {
        if !datasets.contains(&r.dataset.as_str()) {
            datasets.push(&r.dataset);
        }
    }
    for dataset in &datasets {
        yaml += "  - task:\n      type: retrieval\n";
        let _ = writeln!(
            yaml,
            "    dataset:\n      name: {d}\n      type: {d}\n    metrics:",
            d = yaml_string(dataset)
        );
        for r in results.iter().filter(|r| r.dataset == *dataset) {
            let _ = writeln!(
                yaml,
                "    - type: {}\n      name: {}\n      value: {}",
                yaml_string(&format!("{}_{}", r.setting, r.metric)),
                yaml_string(&format!("{} {}", r.setting, r.metric)),
                r.value
            );
        }
    }
    let mut table = String::from(
        "\n## Evaluation\n\nMacro averages over each setting's languages (bias: the \
         multilingual max-min rank distance, lower is better).\n\n\
         | dataset | setting | metric | value |\n|---|---|---|---|\n",
    );
    for r in results {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {:.4} |",
            r.dataset, r.setting, r.metric, r.value
        );
    }
    Some(format!("---\n{front}{yaml}---\n{body}{table}"))
}

/// A YAML double-quoted string.
fn yaml_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_go_into_the_front_matter_and_a_table() {
        let card = "---\nlibrary_name: sentence-transformers\n---\n\n# m[a=1]\n\ntext\n";
        let results = vec![CardResult {
            dataset: "xquad".into(),
            setting: "mono".into(),
            metric: "map".into(),
            value: 0.5,
        }];
        let new = with_results(card, "m[a=1]", &results).unwrap();
        assert!(
            new.starts_with(
                "---\nlibrary_name: sentence-transformers\nmodel-index:\n- name: \"m[a=1]\"\n"
            ),
            "{new}"
        );
        assert!(new.contains("    - type: \"mono_map\"\n      name: \"mono map\"\n      value: 0.5\n---\n\n# m[a=1]"), "{new}");
        assert!(new.ends_with("| xquad | mono | map | 0.5000 |\n"), "{new}");
        assert!(with_results("# no front matter", "m", &results).is_none());
    }
}
