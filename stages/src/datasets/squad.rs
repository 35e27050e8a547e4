//! `squad`: extractive QA in SQuAD format.
//!
//! Reads SQuAD JSON (`data` / `paragraphs` / `qas`: SQuAD v1.1, XQuAD,
//! SQuAD-es, SQuAD-it, SQuADShifts) and HF-style JSON Lines (one
//! `{id, question, context, answers: {text: [...], answer_start: [...]}}`
//! per line: M2QA), plain, gzipped (`.gz`) or inside a zip, which may be
//! encrypted (`password`). Each context is split into sentences so a
//! training pair can use the answer sentence or the whole paragraph.
//!
//! `articles = { from = 0, to = 24 }` reads only those articles (by position
//! in the file): XQuAD's translations are parallel, so one range takes the
//! same articles in every language.
//!
//! Output folder `data`: `qa.parquet` with one row per answerable question
//! (lang, source, title, qid, question, context_id, context, answer_text,
//! answer_start, sentence, sentence_index) and `meta.json`. `context_id` is
//! a hash of the whitespace-normalised context, so the same paragraph has
//! the same id in every file that contains it.

use std::io::Read;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{char_to_byte, input_file, parse_json, reader_interface, split_sentences, Articles};
use xlpipe_stage_api::table::{int_column, string_column, write_parquet, OnError, ReadReport};
use xlpipe_stage_api::{Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct SquadStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SquadParams {
    /// Files in the input folder: `.json`, `.jsonl`, `.json.gz` or `.zip`
    /// (every `.json`/`.jsonl` member is read).
    files: Vec<String>,
    /// Language of the questions and contexts.
    lang: String,
    /// Read only these articles of SQuAD-layout files (by position).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    articles: Option<Articles>,
    /// Password of encrypted zip files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    #[serde(default)]
    on_error: OnError,
}

impl TypedStage for SquadStage {
    type Params = SquadParams;
    const KIND: &'static str = "squad";
    // 2: the `title` column.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "read SQuAD-format QA (JSON, JSON Lines, .gz, encrypted .zip) with answer sentences";

    fn validate(&self, p: SquadParams, _env: &ParamsEnv) -> Result<SquadParams, ParamError> {
        if p.files.is_empty() {
            return Err(ParamError::new("files", "name at least one file"));
        }
        if let Some(articles) = &p.articles {
            articles.check()?;
        }
        Ok(p)
    }

    fn interface_for(&self, _p: &SquadParams, _inputs: &[String]) -> Result<Interface, ParamError> {
        Ok(reader_interface())
    }

    fn execute(&self, p: &SquadParams, ctx: &StageContext) -> anyhow::Result<()> {
        let dir = ctx.input("files")?;
        let mut rows = Rows::default();
        let mut report = ReadReport::new(p.on_error);
        for name in &p.files {
            for (source, bytes) in read_sources(dir, name, p.password.as_deref())? {
                read_source(&source, &bytes, p.articles, &mut rows, &mut report)?;
            }
        }
        report.kept = rows.qid.len();
        let out = ctx.output("data");
        std::fs::create_dir_all(&out)?;
        let n = rows.qid.len();
        write_parquet(
            &out.join("qa.parquet"),
            vec![
                string_column("lang", vec![p.lang.clone(); n]),
                string_column("source", rows.source),
                string_column("title", rows.title),
                string_column("qid", rows.qid),
                string_column("question", rows.question),
                string_column("context_id", rows.context_id),
                string_column("context", rows.context),
                string_column("answer_text", rows.answer_text),
                int_column("answer_start", rows.answer_start),
                string_column("sentence", rows.sentence),
                int_column("sentence_index", rows.sentence_index),
            ],
        )?;
        report.write(&out.join("meta.json"))
    }
}

/// The byte contents of `name`: one source, or one per zip member.
fn read_sources(
    dir: &Path,
    name: &str,
    password: Option<&str>,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let path = input_file(dir, name)?;
    let raw = std::fs::read(&path)?;
    if name.ends_with(".gz") {
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut bytes)
            .with_context(|| format!("{name}: not a valid gzip file"))?;
        return Ok(vec![(name.to_string(), bytes)]);
    }
    if !name.ends_with(".zip") {
        return Ok(vec![(name.to_string(), raw)]);
    }
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(raw))
        .with_context(|| format!("{name}: not a valid zip file"))?;
    let mut sources = Vec::new();
    for i in 0..archive.len() {
        let member_name = match archive.name_for_index(i) {
            Some(Ok(n)) => n.to_string(),
            _ => continue,
        };
        if !(member_name.ends_with(".json") || member_name.ends_with(".jsonl")) {
            continue;
        }
        let encrypted = archive.by_index_raw(i).is_ok_and(|f| f.encrypted());
        let mut member = if encrypted {
            let pw = password.ok_or_else(|| {
                anyhow::anyhow!("{name}: {member_name} is encrypted; set `password`")
            })?;
            archive
                .by_index_decrypt(i, pw.as_bytes())
                .map_err(|err| match err {
                    zip::result::ZipError::InvalidPassword => {
                        anyhow::anyhow!("{name}: wrong zip password for {member_name}")
                    }
                    other => anyhow::anyhow!("{name}: {member_name}: {other}"),
                })?
        } else {
            archive
                .by_index(i)
                .map_err(|err| anyhow::anyhow!("{name}: {member_name}: {err}"))?
        };
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes).map_err(|err| {
            anyhow::anyhow!("{name}: reading {member_name} failed ({err}); is the password right?")
        })?;
        sources.push((format!("{name}/{member_name}"), bytes));
    }
    anyhow::ensure!(
        !sources.is_empty(),
        "{name}: no .json or .jsonl files inside"
    );
    Ok(sources)
}

#[derive(Default)]
struct Rows {
    source: Vec<String>,
    /// The article's title (empty in JSON Lines, which has none).
    title: Vec<String>,
    qid: Vec<String>,
    question: Vec<String>,
    context_id: Vec<String>,
    context: Vec<String>,
    answer_text: Vec<String>,
    answer_start: Vec<i64>,
    sentence: Vec<String>,
    sentence_index: Vec<i64>,
}

fn read_source(
    source: &str,
    bytes: &[u8],
    articles_wanted: Option<Articles>,
    rows: &mut Rows,
    report: &mut ReadReport,
) -> anyhow::Result<()> {
    let before = rows.qid.len();
    // One JSON document is SQuAD layout; a file whose first line is a JSON
    // object on its own is JSON Lines; anything else is malformed.
    let whole = serde_json::from_slice::<Value>(bytes);
    let first_line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let json_lines =
        whole.is_err() && serde_json::from_slice::<Value>(first_line).is_ok_and(|v| v.is_object());
    if !json_lines {
        let json = whole.or_else(|_| parse_json(bytes, source))?;
        let articles = json
            .get("data")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow::anyhow!("{source}: no `data` list"))?;
        for (index, article) in articles.iter().enumerate() {
            if articles_wanted.is_some_and(|a| !a.contains(index)) {
                continue;
            }
            let title = article.get("title").and_then(Value::as_str).unwrap_or("");
            let before_article = rows.qid.len();
            for paragraph in article
                .get("paragraphs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(context) = paragraph.get("context").and_then(Value::as_str) else {
                    report.read += 1;
                    report.bad_record(source, "(paragraph)", "missing context", "")?;
                    continue;
                };
                let sentences = split_sentences(context);
                for qa in paragraph
                    .get("qas")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    add_question(source, qa, context, &sentences, rows, report)?;
                }
            }
            let added = rows.qid.len() - before_article;
            rows.title
                .extend(std::iter::repeat_n(title.to_string(), added));
        }
    } else {
        anyhow::ensure!(
            articles_wanted.is_none(),
            "{source}: JSON Lines has no articles; `articles` needs SQuAD-layout JSON"
        );
        let text = std::str::from_utf8(bytes).map_err(|err| {
            let line = bytes[..err.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            anyhow::anyhow!("{source}:{line}: invalid UTF-8")
        })?;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let record = match serde_json::from_str::<Value>(line) {
                Ok(v) => v,
                Err(err) => {
                    report.read += 1;
                    report.bad_record(
                        source,
                        &format!("line {}", n + 1),
                        "malformed JSON",
                        &err.to_string(),
                    )?;
                    continue;
                }
            };
            let Some(context) = record.get("context").and_then(Value::as_str) else {
                report.read += 1;
                report.bad_record(source, &format!("line {}", n + 1), "missing context", "")?;
                continue;
            };
            let sentences = split_sentences(context);
            add_question(source, &record, context, &sentences, rows, report)?;
        }
        rows.title.resize(rows.qid.len(), String::new());
    }
    report.count(format!("questions.{source}"), rows.qid.len() - before);
    Ok(())
}

/// Every answer as (text, answer_start), in either SQuAD or HF layout;
/// unaligned ones (`answer_start` -1, as in SQuAD-es) have `None`.
fn answers(answers: &Value) -> Option<Vec<(&str, Option<u64>)>> {
    match answers {
        Value::Array(list) => list
            .iter()
            .map(|a| Some((a.get("text")?.as_str()?, a.get("answer_start")?.as_u64())))
            .collect(),
        Value::Object(_) => {
            let texts = answers.get("text")?.as_array()?;
            let starts = answers.get("answer_start")?.as_array()?;
            texts
                .iter()
                .zip(starts)
                .map(|(t, s)| Some((t.as_str()?, s.as_u64())))
                .collect()
        }
        _ => None,
    }
}

fn has_no_answer(qa: &Value) -> bool {
    qa.get("is_impossible").and_then(Value::as_bool) == Some(true)
        || match qa.get("answers") {
            Some(Value::Array(list)) => list.is_empty(),
            Some(Value::Object(_)) => qa["answers"]
                .get("text")
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty),
            _ => false,
        }
}

fn add_question(
    source: &str,
    qa: &Value,
    context: &str,
    sentences: &[(usize, usize)],
    rows: &mut Rows,
    report: &mut ReadReport,
) -> anyhow::Result<()> {
    report.read += 1;
    let qid = qa.get("id").and_then(Value::as_str);
    let question = qa.get("question").and_then(Value::as_str);
    let (Some(qid), Some(question)) = (qid, question) else {
        return report.bad_record(
            source,
            qid.unwrap_or("(no id)"),
            "missing id or question",
            "",
        );
    };
    if has_no_answer(qa) {
        report.count("unanswerable", 1);
        return Ok(());
    }
    let Some(candidates) = qa.get("answers").and_then(answers) else {
        return report.bad_record(source, qid, "missing or malformed answers", "");
    };
    // The first answer that really sits at its offset in the context.
    let aligned = candidates.iter().find_map(|&(text, start)| {
        let byte = char_to_byte(context, start? as usize)?;
        (!text.is_empty() && context[byte..].starts_with(text)).then_some((text, start?, byte))
    });
    let Some((answer, start, byte)) = aligned else {
        let shown = candidates.first().map_or("", |(t, _)| t);
        return report.bad_record(source, qid, "answer not in context at answer_start", shown);
    };
    let index = sentences
        .iter()
        .position(|&(s, e)| byte < e && s <= byte)
        .or_else(|| sentences.iter().position(|&(s, _)| s >= byte))
        .unwrap_or(sentences.len().saturating_sub(1));
    let (s, e) = sentences.get(index).copied().unwrap_or((0, context.len()));
    rows.source.push(source.to_string());
    rows.qid.push(qid.to_string());
    rows.question.push(question.to_string());
    rows.context_id.push(context_id(context));
    rows.context.push(context.to_string());
    rows.answer_text.push(answer.to_string());
    rows.answer_start.push(start as i64);
    rows.sentence.push(context[s..e].to_string());
    rows.sentence_index.push(index as i64);
    Ok(())
}

/// Identity of a paragraph: a hash of its whitespace-normalised text.
pub fn context_id(context: &str) -> String {
    let normal: Vec<&str> = context.split_whitespace().collect();
    blake3::hash(normal.join(" ").as_bytes()).to_hex()[..16].to_string()
}
