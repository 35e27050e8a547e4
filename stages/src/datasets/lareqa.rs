//! `lareqa`: XQuAD-R and MLQA-R, the LAReQA answer-sentence retrieval sets.
//!
//! Input: a folder of `<lang>.json` files in SQuAD layout whose paragraphs
//! also carry `sentences` and `sentence_breaks` (character offsets).
//! Every sentence, with its paragraph as context, is a candidate. A
//! question's answer sentence is the one whose break contains the answer's
//! `answer_start`; questions share ids across languages (they are
//! translations), so a question is relevant to the answer sentence of its id
//! in every language.
//!
//! Output folder `data`: `questions.parquet` (lang, qid, question),
//! `articles.parquet` (the titles of the articles read),
//! `candidates.parquet` (lang, cid, sentence, context), `qrels.parquet`
//! (qid, lang, cid: the answer in each language), `meta.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{input_file, parse_json, reader_interface, Articles};
use xlpipe_stage_api::table::{string_column, write_parquet, OnError, ReadReport};
use xlpipe_stage_api::{Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct LareqaStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LareqaParams {
    /// Languages to read, each from `<lang>.json` in the input folder.
    langs: Vec<String>,
    /// Read only the first N paragraphs of each file (their sentences and
    /// questions): a smaller set for quick runs. XQuAD-R's files are
    /// parallel, so the subset is the same paragraphs in every language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_paragraphs: Option<usize>,
    /// Read only these articles (by position; the files are parallel, so
    /// the same articles in every language), e.g. those a training split
    /// left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    articles: Option<Articles>,
    #[serde(default)]
    on_error: OnError,
}

impl TypedStage for LareqaStage {
    type Params = LareqaParams;
    const KIND: &'static str = "lareqa";
    // 2: `articles`, articles.parquet.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "read XQuAD-R / MLQA-R into questions, candidate sentences and qrels";

    fn validate(&self, p: LareqaParams, _env: &ParamsEnv) -> Result<LareqaParams, ParamError> {
        if p.langs.is_empty() {
            return Err(ParamError::new("langs", "name at least one language"));
        }
        if let Some(articles) = &p.articles {
            articles.check()?;
        }
        Ok(p)
    }

    fn interface_for(
        &self,
        _p: &LareqaParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(reader_interface())
    }

    fn execute(&self, p: &LareqaParams, ctx: &StageContext) -> anyhow::Result<()> {
        let dir = ctx.input("files")?;
        let out = ctx.output("data");
        std::fs::create_dir_all(&out)?;
        let mut tables = RetrievalTables::default();
        let mut report = ReadReport::new(p.on_error);
        for lang in &p.langs {
            read_language(dir, lang, p, &mut tables, &mut report)?;
        }
        report.kept = tables.q_id.len();
        tables.write(&out)?;
        report.write(&out.join("meta.json"))
    }
}

/// An answer-retrieval set in the LAReQA layout, column by column (also
/// what `answer_retrieval` writes).
#[derive(Default)]
pub(crate) struct RetrievalTables {
    pub q_lang: Vec<String>,
    pub q_id: Vec<String>,
    pub q_text: Vec<String>,
    pub c_lang: Vec<String>,
    pub c_id: Vec<String>,
    pub c_text: Vec<String>,
    pub c_context: Vec<String>,
    pub r_qid: Vec<String>,
    pub r_lang: Vec<String>,
    pub r_cid: Vec<String>,
    /// Titles of the articles read, where the source has them.
    pub articles: Vec<String>,
}

impl RetrievalTables {
    /// `questions.parquet`, `candidates.parquet` and `qrels.parquet` in `out`.
    pub fn write(self, out: &Path) -> anyhow::Result<()> {
        if !self.articles.is_empty() {
            let titles: std::collections::BTreeSet<String> = self.articles.into_iter().collect();
            write_parquet(
                &out.join("articles.parquet"),
                vec![string_column("title", titles.into_iter().collect())],
            )?;
        }
        write_parquet(
            &out.join("questions.parquet"),
            vec![
                string_column("lang", self.q_lang),
                string_column("qid", self.q_id),
                string_column("question", self.q_text),
            ],
        )?;
        write_parquet(
            &out.join("candidates.parquet"),
            vec![
                string_column("lang", self.c_lang),
                string_column("cid", self.c_id),
                string_column("sentence", self.c_text),
                string_column("context", self.c_context),
            ],
        )?;
        write_parquet(
            &out.join("qrels.parquet"),
            vec![
                string_column("qid", self.r_qid),
                string_column("lang", self.r_lang),
                string_column("cid", self.r_cid),
            ],
        )
    }
}

fn read_language(
    dir: &Path,
    lang: &str,
    p: &LareqaParams,
    t: &mut RetrievalTables,
    report: &mut ReadReport,
) -> anyhow::Result<()> {
    let file = format!("{lang}.json");
    let path = input_file(dir, &file)?;
    let json = parse_json(&std::fs::read(&path)?, &file)?;
    let articles = json
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow::anyhow!("{file}: no `data` list: not a SQuAD-layout file"))?;
    let (mut questions, mut candidates) = (0, 0);
    // Paragraphs are numbered over the whole file, so a candidate keeps its
    // id whichever articles are read.
    let paragraphs = articles
        .iter()
        .enumerate()
        .flat_map(|(a, article)| {
            article
                .get("paragraphs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(move |paragraph| (a, article, paragraph))
        })
        .enumerate()
        .filter(|(_, (a, _, _))| p.articles.is_none_or(|wanted| wanted.contains(*a)));
    for (index, (_, article, paragraph)) in paragraphs.take(p.max_paragraphs.unwrap_or(usize::MAX))
    {
        let id = format!("paragraph {index}");
        if let Some(title) = article.get("title").and_then(Value::as_str) {
            t.articles.push(title.to_string());
        }
        let context = paragraph.get("context").and_then(Value::as_str);
        let sentences = paragraph.get("sentences").and_then(Value::as_array);
        let breaks = paragraph.get("sentence_breaks").and_then(Value::as_array);
        let (Some(context), Some(sentences), Some(breaks)) = (context, sentences, breaks) else {
            report.read += 1;
            report.bad_record(
                &file,
                &id,
                "missing context, sentences or sentence_breaks",
                "",
            )?;
            continue;
        };
        let spans: Option<Vec<(u64, u64)>> = breaks
            .iter()
            .map(|b| Some((b.get(0)?.as_u64()?, b.get(1)?.as_u64()?)))
            .collect();
        let texts: Option<Vec<&str>> = sentences.iter().map(Value::as_str).collect();
        let (Some(spans), Some(texts)) = (spans, texts) else {
            report.read += 1;
            report.bad_record(&file, &id, "malformed sentences or sentence_breaks", "")?;
            continue;
        };
        if spans.len() != texts.len() {
            report.read += 1;
            report.bad_record(
                &file,
                &id,
                "sentences and sentence_breaks differ in length",
                &format!("{} vs {}", texts.len(), spans.len()),
            )?;
            continue;
        }
        let first_candidate = t.c_id.len();
        for (s, text) in texts.iter().enumerate() {
            t.c_lang.push(lang.to_string());
            t.c_id.push(format!("{lang}:{index}:{s}"));
            t.c_text.push(text.to_string());
            t.c_context.push(context.to_string());
            candidates += 1;
        }
        for qa in paragraph
            .get("qas")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            report.read += 1;
            let qid = qa.get("id").and_then(Value::as_str);
            let question = qa.get("question").and_then(Value::as_str);
            let answer = qa
                .get("answers")
                .and_then(Value::as_array)
                .and_then(|a| a.first());
            let start = answer
                .and_then(|a| a.get("answer_start"))
                .and_then(Value::as_u64);
            let (Some(qid), Some(question), Some(start)) = (qid, question, start) else {
                let id = qid.unwrap_or("(no id)");
                report.bad_record(&file, id, "missing id, question or answer", "")?;
                continue;
            };
            let Some(s) = spans.iter().position(|&(b, e)| b <= start && start < e) else {
                report.bad_record(
                    &file,
                    qid,
                    "answer_start is outside every sentence",
                    &start.to_string(),
                )?;
                continue;
            };
            t.q_lang.push(lang.to_string());
            t.q_id.push(qid.to_string());
            t.q_text.push(question.to_string());
            t.r_qid.push(qid.to_string());
            t.r_lang.push(lang.to_string());
            t.r_cid.push(t.c_id[first_candidate + s].clone());
            questions += 1;
        }
    }
    report.count(format!("questions.{lang}"), questions);
    report.count(format!("candidates.{lang}"), candidates);
    Ok(())
}
