//! `miracl`: a monolingual ad-hoc retrieval task in MIRACL / TREC layout.
//!
//! Reads topics (`qid<TAB>query` lines), qrels (`qid Q0 docid relevance`,
//! tab or space separated) and, when given, a passage corpus (JSON Lines
//! with `docid`, `title`, `text`) from the input folder.
//!
//! Output folder `data`: `queries.parquet` (lang, qid, query),
//! `qrels.parquet` (qid, docid, relevance), `corpus.parquet` (docid, title,
//! text; only with a corpus) and `meta.json`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{input_file, reader_interface};
use xlpipe_stage_api::table::{int_column, string_column, write_parquet, OnError, ReadReport};
use xlpipe_stage_api::{Interface, ParamError, StageContext, TypedStage};

pub struct MiraclStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MiraclParams {
    lang: String,
    topics: String,
    qrels: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    corpus: Option<String>,
    #[serde(default)]
    on_error: OnError,
}

impl TypedStage for MiraclStage {
    type Params = MiraclParams;
    const KIND: &'static str = "miracl";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "read MIRACL-style topics, qrels and a jsonl passage corpus";

    fn interface_for(
        &self,
        _p: &MiraclParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(reader_interface())
    }

    fn execute(&self, p: &MiraclParams, ctx: &StageContext) -> anyhow::Result<()> {
        let dir = ctx.input("files")?;
        let mut report = ReadReport::new(p.on_error);
        let out = ctx.output("data");
        std::fs::create_dir_all(&out)?;

        let (mut qids, mut queries) = (Vec::new(), Vec::new());
        let topics = std::fs::read_to_string(input_file(dir, &p.topics)?)?;
        for (n, line) in topics
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            report.read += 1;
            match line.split_once('\t') {
                Some((qid, query)) if !qid.is_empty() && !query.trim().is_empty() => {
                    qids.push(qid.to_string());
                    queries.push(query.trim().to_string());
                }
                _ => report.bad_record(
                    &p.topics,
                    &format!("line {}", n + 1),
                    "expected qid<TAB>query",
                    line,
                )?,
            }
        }
        report.count("queries", qids.len());
        let n = qids.len();
        write_parquet(
            &out.join("queries.parquet"),
            vec![
                string_column("lang", vec![p.lang.clone(); n]),
                string_column("qid", qids),
                string_column("query", queries),
            ],
        )?;

        let (mut qids, mut docids, mut relevance) = (Vec::new(), Vec::new(), Vec::new());
        let qrels = std::fs::read_to_string(input_file(dir, &p.qrels)?)?;
        for (n, line) in qrels
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            report.read += 1;
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [qid, _, docid, rel] if rel.parse::<i64>().is_ok() => {
                    qids.push(qid.to_string());
                    docids.push(docid.to_string());
                    relevance.push(rel.parse::<i64>().expect("checked"));
                }
                _ => report.bad_record(
                    &p.qrels,
                    &format!("line {}", n + 1),
                    "expected `qid Q0 docid relevance`",
                    line,
                )?,
            }
        }
        report.count("qrels", qids.len());
        write_parquet(
            &out.join("qrels.parquet"),
            vec![
                string_column("qid", qids),
                string_column("docid", docids),
                int_column("relevance", relevance),
            ],
        )?;

        if let Some(corpus) = &p.corpus {
            let (mut docids, mut titles, mut texts) = (Vec::new(), Vec::new(), Vec::new());
            let text = std::fs::read_to_string(input_file(dir, corpus)?)?;
            for (n, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                report.read += 1;
                let record: Option<Value> = serde_json::from_str(line).ok();
                let field = |name: &str| record.as_ref()?.get(name)?.as_str().map(str::to_string);
                match (field("docid"), field("text")) {
                    (Some(docid), Some(body)) => {
                        docids.push(docid);
                        titles.push(field("title").unwrap_or_default());
                        texts.push(body);
                    }
                    _ => report.bad_record(
                        corpus,
                        &format!("line {}", n + 1),
                        "expected JSON with docid and text",
                        "",
                    )?,
                }
            }
            report.count("passages", docids.len());
            write_parquet(
                &out.join("corpus.parquet"),
                vec![
                    string_column("docid", docids),
                    string_column("title", titles),
                    string_column("text", texts),
                ],
            )?;
        }
        report.kept = report.read - report.skipped;
        report.write(&out.join("meta.json"))
    }
}
