//! `validation_retrieval`: the training data's held-out pairs as an
//! answer-retrieval set in the LAReQA layout, so that `evaluate_lareqa`
//! scores a model on mono / cross / multi mAP and language bias exactly as
//! on XQuAD-R, without looking at any test set. What a search (or any
//! choice of settings) should be tuned on.
//!
//! ```toml
//! [stages.valid_set]
//! kind = "validation_retrieval"
//! inputs.pairs = "translate"   # a `translate` output (pairs.parquet)
//! split = "valid"              # default; the pairs `train` never trains on
//! ```
//!
//! A pair's question in each language is one query (id: the pair id, so the
//! languages of one pair are translations of each other, as XQuAD-R's are);
//! its passage in each language is the relevant candidate. Candidates are
//! the split's distinct passages per language: two questions about one
//! sentence share it, so a copy of the answer is never a negative.
//!
//! Output folder `data`: `questions.parquet` (lang, qid, question),
//! `candidates.parquet` (lang, cid, sentence, context — empty), `qrels.parquet`
//! (qid, lang, cid), `meta.json` (counts).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::datasets::lareqa::RetrievalTables;
use xlpipe_stage_api::table::{read_parquet, strings};
use xlpipe_stage_api::{InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct ValidationRetrievalStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationRetrievalParams {
    #[serde(default = "default_split")]
    split: String,
}

fn default_split() -> String {
    "valid".into()
}

impl TypedStage for ValidationRetrievalStage {
    type Params = ValidationRetrievalParams;
    const KIND: &'static str = "validation_retrieval";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "held-out training pairs as a LAReQA-layout retrieval set (a validation objective)";

    fn validate(
        &self,
        p: ValidationRetrievalParams,
        _env: &ParamsEnv,
    ) -> Result<ValidationRetrievalParams, ParamError> {
        if !["train", "valid"].contains(&p.split.as_str()) {
            return Err(ParamError::new(
                "split",
                format!("`{}`: the pairs have splits `train` and `valid`", p.split),
            ));
        }
        Ok(p)
    }

    fn interface_for(
        &self,
        _p: &ValidationRetrievalParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![InputSlot::one("pairs")],
            ..Interface::producing(&["data"])
        })
    }

    fn execute(&self, p: &ValidationRetrievalParams, ctx: &StageContext) -> anyhow::Result<()> {
        let file = ctx.input("pairs")?.join("pairs.parquet");
        let frame = read_parquet(&file).with_context(|| {
            format!(
                "{}: the `pairs` input is not a translate output",
                file.display()
            )
        })?;
        let column = |name: &str| {
            strings(&frame, name).with_context(|| format!("{}: column `{name}`", file.display()))
        };
        let (ids, langs, splits) = (column("pair_id")?, column("lang")?, column("split")?);
        let (questions, passages) = (column("question")?, column("passage")?);
        let set = retrieval_set(
            (0..frame.height())
                .filter(|&i| splits[i] == p.split)
                .map(|i| PairText {
                    pair_id: &ids[i],
                    lang: &langs[i],
                    question: &questions[i],
                    passage: &passages[i],
                }),
        );
        anyhow::ensure!(
            !set.q_id.is_empty(),
            "{} has no `{}` pairs (qa_pairs' validation_fraction = 0?)",
            file.display(),
            p.split
        );
        let counts = serde_json::json!({
            "questions": set.q_id.len(),
            "candidates": set.c_id.len(),
            "languages": set.c_lang.iter().collect::<BTreeSet<_>>(),
        });
        let out = ctx.output("data");
        std::fs::create_dir_all(&out)?;
        set.write(&out)?;
        std::fs::write(out.join("meta.json"), serde_json::to_vec_pretty(&counts)?)?;
        Ok(())
    }
}

/// One row of the pairs table.
struct PairText<'a> {
    pair_id: &'a str,
    lang: &'a str,
    question: &'a str,
    passage: &'a str,
}

/// Queries, distinct passages as candidates, and each query's passage as
/// its relevant candidate in every language.
fn retrieval_set<'a>(rows: impl Iterator<Item = PairText<'a>>) -> RetrievalTables {
    let mut set = RetrievalTables::default();
    // (lang, passage) -> candidate id: the first pair that has it names it.
    let mut candidates: BTreeMap<(&str, &str), String> = BTreeMap::new();
    for row in rows {
        let cid = candidates
            .entry((row.lang, row.passage))
            .or_insert_with(|| {
                set.c_lang.push(row.lang.to_string());
                set.c_id.push(format!("{}:{}", row.lang, row.pair_id));
                set.c_text.push(row.passage.to_string());
                set.c_context.push(String::new());
                format!("{}:{}", row.lang, row.pair_id)
            })
            .clone();
        set.q_lang.push(row.lang.to_string());
        set.q_id.push(row.pair_id.to_string());
        set.q_text.push(row.question.to_string());
        set.r_qid.push(row.pair_id.to_string());
        set.r_lang.push(row.lang.to_string());
        set.r_cid.push(cid);
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_passages_are_one_candidate_and_pairs_are_translations() {
        let rows = [
            ("p1", "en", "Who?", "Ann did it."),
            ("p2", "en", "When?", "Ann did it."),
            ("p1", "de", "Wer?", "Ann tat es."),
            ("p2", "de", "Wann?", "Ann tat es."),
            ("p3", "de", "Wo?", "In Rom."),
        ];
        let set = retrieval_set(
            rows.iter()
                .map(|&(pair_id, lang, question, passage)| PairText {
                    pair_id,
                    lang,
                    question,
                    passage,
                }),
        );
        assert_eq!(set.q_id, ["p1", "p2", "p1", "p2", "p3"]);
        assert_eq!(set.c_id, ["en:p1", "de:p1", "de:p3"]);
        assert_eq!(set.r_cid, ["en:p1", "en:p1", "de:p1", "de:p1", "de:p3"]);
        assert_eq!(set.r_lang, ["en", "en", "de", "de", "de"]);
    }
}
