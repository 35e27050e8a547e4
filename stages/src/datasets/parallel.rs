//! `parallel`: line-aligned translations as bitext-retrieval sets.
//!
//! ```toml
//! [stages.tatoeba]
//! kind = "parallel"
//! inputs.files = "tatoeba_download"
//! [stages.tatoeba.sets]
//! deu-eng = { de = "tatoeba.deu-eng.deu", en = "tatoeba.deu-eng.eng" }
//! ara-eng = { ar = "tatoeba.ara-eng.ara", en = "tatoeba.ara-eng.eng" }
//! ```
//!
//! A set is a group of files, one per language, whose line *i* are
//! translations of each other (NTREX and FLORES: one set of all languages;
//! TICO-19 and Tatoeba: one set per language pair). Files of a set with
//! different line counts are misaligned: the set is skipped and counted
//! (or the stage fails, `on_error = "fail"`). Lines empty or not UTF-8 in
//! any language are left out of every language. `max_lines` keeps the
//! first N lines of each set, for quick runs.
//!
//! Output folder `data`: `sentences.parquet` (sid, set, lang, id, text;
//! `id` is the line number, shared by translations, and `sid` is
//! `set:id`, the name to encode them under) and `meta.json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{input_file, reader_interface};
use xlpipe_stage_api::table::{int_column, string_column, write_parquet, OnError, ReadReport};
use xlpipe_stage_api::{Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct ParallelStage;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelParams {
    /// Set name -> language -> file in the input folder.
    sets: BTreeMap<String, BTreeMap<String, String>>,
    /// Keep the first N lines of each set (for quick runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_lines: Option<usize>,
    #[serde(default)]
    on_error: OnError,
}

impl TypedStage for ParallelStage {
    type Params = ParallelParams;
    const KIND: &'static str = "parallel";
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "read line-aligned parallel text (NTREX, FLORES, TICO-19, Tatoeba)";

    fn validate(&self, p: ParallelParams, _env: &ParamsEnv) -> Result<ParallelParams, ParamError> {
        if p.sets.is_empty() {
            return Err(ParamError::new("sets", "name at least one set of files"));
        }
        for (name, files) in &p.sets {
            if files.len() < 2 {
                return Err(ParamError::new(
                    format!("sets.{name}"),
                    "a set needs files in at least two languages",
                ));
            }
        }
        Ok(p)
    }

    fn interface_for(
        &self,
        _p: &ParallelParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(reader_interface())
    }

    fn execute(&self, p: &ParallelParams, ctx: &StageContext) -> anyhow::Result<()> {
        let dir = ctx.input("files")?;
        let mut report = ReadReport::new(p.on_error);
        let (mut set_col, mut lang_col, mut id_col, mut text_col) =
            (vec![], vec![], vec![], vec![]);
        for (set, files) in &p.sets {
            // Read every language's lines as raw bytes; decode per line so
            // one bad line does not lose the file.
            let mut lines: BTreeMap<&str, Vec<Option<String>>> = BTreeMap::new();
            for (lang, file) in files {
                let bytes = std::fs::read(input_file(dir, file)?)?;
                let decoded = bytes
                    .split(|&b| b == b'\n')
                    .map(|l| String::from_utf8(l.strip_suffix(b"\r").unwrap_or(l).to_vec()).ok())
                    .collect::<Vec<_>>();
                let mut decoded = decoded;
                if bytes.ends_with(b"\n") {
                    decoded.pop();
                }
                lines.insert(lang, decoded);
            }
            let counts: Vec<String> = files
                .iter()
                .map(|(lang, file)| format!("{file}: {}", lines[lang.as_str()].len()))
                .collect();
            let n = lines.values().next().map_or(0, Vec::len);
            if lines.values().any(|l| l.len() != n) {
                report.read += 1;
                report.bad_record(
                    set,
                    "(whole set)",
                    "misaligned line counts",
                    &counts.join(", "),
                )?;
                continue;
            }
            let mut kept = 0;
            for i in 0..n.min(p.max_lines.unwrap_or(usize::MAX)) {
                report.read += 1;
                let row: Vec<(&str, Option<&String>)> = lines
                    .iter()
                    .map(|(lang, l)| (*lang, l[i].as_ref()))
                    .collect();
                if let Some((lang, _)) = row.iter().find(|(_, t)| t.is_none()) {
                    report.bad_record(
                        set,
                        &format!("line {}", i + 1),
                        "invalid UTF-8",
                        &files[*lang],
                    )?;
                    continue;
                }
                if let Some((lang, _)) = row
                    .iter()
                    .find(|(_, t)| t.is_some_and(|t| t.trim().is_empty()))
                {
                    report.bad_record(
                        set,
                        &format!("line {}", i + 1),
                        "empty line",
                        &files[*lang],
                    )?;
                    continue;
                }
                for (lang, text) in row {
                    set_col.push(set.clone());
                    lang_col.push(lang.to_string());
                    id_col.push(i as i64 + 1);
                    text_col.push(text.expect("checked above").trim().to_string());
                }
                kept += 1;
            }
            report.kept += kept;
            report.count(format!("lines.{set}"), kept);
        }
        let out = ctx.output("data");
        std::fs::create_dir_all(&out)?;
        write_parquet(
            &out.join("sentences.parquet"),
            vec![
                string_column(
                    "sid",
                    set_col
                        .iter()
                        .zip(&id_col)
                        .map(|(set, id)| format!("{set}:{id}"))
                        .collect(),
                ),
                string_column("set", set_col),
                string_column("lang", lang_col),
                int_column("id", id_col),
                string_column("text", text_col),
            ],
        )?;
        report.write(&out.join("meta.json"))
    }
}
