//! The `precomputed` backend: translations that already exist, looked up by
//! question id in a `squad` output of the target language.

use std::collections::HashMap;

use anyhow::Context;

use super::English;
use crate::qa_pairs::Unit;
use xlpipe_stage_api::table::{read_parquet, strings};
use xlpipe_stage_api::StageContext;

/// Questions and passages of the same question ids in a translated SQuAD.
/// Hard negatives cannot be looked up this way and stay empty.
pub(super) fn precomputed(
    ctx: &StageContext,
    lang: &str,
    unit: Unit,
    english: &English,
) -> anyhow::Result<Vec<Option<[String; 3]>>> {
    for input in ctx.inputs("precomputed") {
        let qa = read_parquet(&input.path.join("qa.parquet")).with_context(|| {
            format!(
                "precomputed input from {} is not a `squad` output",
                input.producer
            )
        })?;
        if strings(&qa, "lang")?.first().map(String::as_str) != Some(lang) {
            continue;
        }
        let passages = match unit {
            Unit::Sentence => strings(&qa, "sentence")?,
            Unit::Paragraph => strings(&qa, "context")?,
        };
        let by_id: HashMap<String, (String, String)> = strings(&qa, "qid")?
            .into_iter()
            .zip(strings(&qa, "question")?.into_iter().zip(passages))
            .collect();
        return Ok(english
            .ids
            .iter()
            .map(|id| {
                by_id
                    .get(id)
                    .map(|(q, p)| [q.clone(), p.clone(), String::new()])
            })
            .collect());
    }
    anyhow::bail!("no `precomputed` input has language `{lang}`")
}
