//! `answer_retrieval`: turn extractive QA (the `squad` reader's output) into
//! an answer-retrieval set in the LAReQA layout, so `evaluate_lareqa`
//! scores domain-shift sets (SQuADShifts, M2QA) like XQuAD-R.
//!
//! ```toml
//! [stages.m2qa_retrieval]
//! kind = "answer_retrieval"
//! inputs.data = ["m2qa_de", "m2qa_tr", "m2qa_zh"]
//! unit = "sentence"        # or "paragraph"
//! max_questions = 2000     # per input, optional
//! ```
//!
//! Candidates are every sentence of every distinct paragraph (`unit =
//! "sentence"`, with the paragraph as context, as in LAReQA) or every
//! paragraph (`unit = "paragraph"`); a question's relevant candidate is its
//! answer's sentence or paragraph. Questions of different inputs are never
//! translations of each other, so with several languages only the
//! monolingual and multilingual settings have relevant candidates.
//! `max_questions` keeps a fixed pseudo-random subset of each input's
//! questions (by a hash of the question id); every paragraph stays a
//! candidate, so the pool is as hard as with all questions.
//! `max_paragraphs` keeps a fixed subset of paragraphs (by a hash of their
//! id) and only their questions: a smaller pool, for quick runs.
//!
//! Output folder `data`: `questions.parquet` (lang, qid, question),
//! `candidates.parquet` (lang, cid, sentence, context), `qrels.parquet`
//! (qid, lang, cid), `meta.json` (counts).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::datasets::lareqa::RetrievalTables;
use crate::datasets::split_sentences;
use xlpipe_stage_api::table::{integers, read_parquet, strings};
use xlpipe_stage_api::{InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct AnswerRetrievalStage;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Unit {
    Sentence,
    Paragraph,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerRetrievalParams {
    #[serde(default = "default_unit")]
    unit: Unit,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_questions: Option<usize>,
    /// Keep a fixed pseudo-random subset of each input's paragraphs (by a
    /// hash of the paragraph id), with only their questions: a smaller pool
    /// as well as fewer questions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_paragraphs: Option<usize>,
}

fn default_unit() -> Unit {
    Unit::Sentence
}

impl TypedStage for AnswerRetrievalStage {
    type Params = AnswerRetrievalParams;
    const KIND: &'static str = "answer_retrieval";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "extractive QA -> answer-sentence (or paragraph) retrieval set in the LAReQA layout";

    fn validate(
        &self,
        p: AnswerRetrievalParams,
        _env: &ParamsEnv,
    ) -> Result<AnswerRetrievalParams, ParamError> {
        if p.max_questions == Some(0) {
            return Err(ParamError::new("max_questions", "must be at least 1"));
        }
        if p.max_paragraphs == Some(0) {
            return Err(ParamError::new("max_paragraphs", "must be at least 1"));
        }
        Ok(p)
    }

    fn interface_for(
        &self,
        _p: &AnswerRetrievalParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![InputSlot::many("data")],
            ..Interface::producing(&["data"])
        })
    }

    fn execute(&self, p: &AnswerRetrievalParams, ctx: &StageContext) -> anyhow::Result<()> {
        let mut set = RetrievalTables::default();
        let mut seen_qids = HashSet::new();
        for input in ctx.inputs("data") {
            let qa = read_parquet(&input.path.join("qa.parquet"))?;
            let (langs, qids, questions) = (
                strings(&qa, "lang")?,
                strings(&qa, "qid")?,
                strings(&qa, "question")?,
            );
            let (context_ids, contexts) = (strings(&qa, "context_id")?, strings(&qa, "context")?);
            let sentence_index = integers(&qa, "sentence_index")?;
            let hash = |text: &str| *blake3::hash(text.as_bytes()).as_bytes();
            let kept_paragraphs: Option<HashSet<&str>> = p.max_paragraphs.map(|max| {
                let mut ids: Vec<&str> = context_ids.iter().map(String::as_str).collect();
                ids.sort_unstable();
                ids.dedup();
                ids.sort_by_cached_key(|id| hash(id));
                ids.into_iter().take(max).collect()
            });
            let kept = |r: usize| {
                kept_paragraphs
                    .as_ref()
                    .is_none_or(|k| k.contains(context_ids[r].as_str()))
            };
            let mut rows: Vec<usize> = (0..qa.height()).filter(|&r| kept(r)).collect();
            if let Some(max) = p.max_questions {
                rows.sort_by_cached_key(|&r| hash(&qids[r]));
                rows.truncate(max);
                rows.sort_unstable();
            }
            // Every (kept) paragraph is a candidate, asked about or not.
            let mut paragraphs: BTreeMap<(&str, &str), &str> = BTreeMap::new();
            for r in (0..qa.height()).filter(|&r| kept(r)) {
                paragraphs.insert((&langs[r], &context_ids[r]), &contexts[r]);
            }
            for ((lang, context_id), context) in &paragraphs {
                add_paragraph(&mut set, p.unit, lang, context_id, context);
            }
            for r in rows {
                // evaluate_lareqa reads one question id in two languages as
                // translations of each other, which these are not.
                anyhow::ensure!(
                    seen_qids.insert(qids[r].clone()),
                    "question id {} appears twice ({}); the inputs must not share question ids",
                    qids[r],
                    input.producer
                );
                let cid = match p.unit {
                    Unit::Sentence => format!("{}:{}", context_ids[r], sentence_index[r]),
                    Unit::Paragraph => context_ids[r].clone(),
                };
                set.q_lang.push(langs[r].clone());
                set.q_id.push(qids[r].clone());
                set.q_text.push(questions[r].clone());
                set.r_qid.push(qids[r].clone());
                set.r_lang.push(langs[r].clone());
                set.r_cid.push(format!("{}:{cid}", langs[r]));
            }
        }
        let out = ctx.output("data");
        std::fs::create_dir_all(&out)?;
        let counts = serde_json::json!({
            "questions": set.q_id.len(),
            "candidates": set.c_id.len(),
        });
        set.write(&out)?;
        std::fs::write(out.join("meta.json"), serde_json::to_vec_pretty(&counts)?)?;
        Ok(())
    }
}

/// Every sentence (or the whole) of one paragraph as candidates.
fn add_paragraph(
    set: &mut RetrievalTables,
    unit: Unit,
    lang: &str,
    context_id: &str,
    context: &str,
) {
    let mut push = |id: String, text: &str| {
        set.c_lang.push(lang.to_string());
        set.c_id.push(format!("{lang}:{id}"));
        set.c_text.push(text.to_string());
        set.c_context.push(context.to_string());
    };
    match unit {
        Unit::Sentence => {
            for (i, (start, end)) in split_sentences(context).into_iter().enumerate() {
                push(format!("{context_id}:{i}"), context[start..end].trim());
            }
        }
        Unit::Paragraph => push(context_id.to_string(), context),
    }
}
