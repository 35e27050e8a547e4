//! `translate`: English QA pairs into other languages, ids kept aligned.
//!
//! ```toml
//! [stages.translate]
//! kind = "translate"
//! inputs.pairs = "pairs"                       # a qa_pairs output
//! inputs.precomputed = ["squad_es", "squad_it"] # squad readers of translated SQuAD
//! inputs.dictionaries = "muse_files"           # folder of MUSE en-xx.dict files
//! langs.es = { backend = "precomputed" }
//! langs.it = { backend = "precomputed" }
//! langs.de = { backend = "dictionary", file = "en-de.dict" }
//! langs.es_apertium = { backend = "command", cmd = "apertium -u eng-spa", lang = "es" }
//! inputs.nmt_model = "nllb"                    # an M2M100 / NLLB folder (hf_model, import)
//! langs.zh = { backend = "nllb", beams = 4, device = "cuda" }
//! ```
//!
//! Backends: `precomputed` takes the question and passage of the same
//! question id from a translated SQuAD (no MT run at all); `command` pipes
//! texts, one per line, through any line-in line-out program; `dictionary`
//! translates word by word with a MUSE bilingual dictionary (crude, but real
//! and available for every language); `nllb` runs an M2M100 / NLLB-200
//! model in burn (`xlpipe_ml::nmt`: beam search as transformers' `generate`,
//! length-sorted batches, CPU or CUDA). Other engines plug in through the
//! [`Translator`] trait.
//!
//! A translation memory keyed by (backend identity, source text, target
//! language) lives in the stage's state folder and persists across runs and
//! pipelines: adding a language translates only it, and an interrupted run
//! resumes where it stopped.
//!
//! Files: one per backend, `memory` the translation memory, `bench` the
//! `xlpipe bench translate` timing.
//!
//! Output folder `pairs`: `pairs.parquet` (pair_id, lang, split, question,
//! passage, negative) with English and every target language, holding only
//! the pairs every language has, and `meta.json` with per-language counts.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::qa_pairs::Unit;
use xlpipe_ml::model::DeviceChoice;
use xlpipe_stage_api::table::{read_parquet, string_column, strings, write_parquet, ReadReport};
pub mod bench;
mod command;
mod dictionary;
mod memory;
mod nllb;
mod precomputed;

use command::CommandTranslator;
use dictionary::DictionaryTranslator;
use memory::with_memory;
use nllb::NllbTranslation;
use precomputed::precomputed;

use xlpipe_stage_api::{InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct TranslateStage;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranslateParams {
    /// Output language name -> how to get there.
    langs: BTreeMap<String, LangSpec>,
    /// Texts per call of a command backend.
    #[serde(default = "default_batch")]
    batch: usize,
}

fn default_batch() -> usize {
    256
}

/// How to get one language. `lang` is the code written to the output when
/// the table key is only a name (e.g. `es_apertium` with `lang = "es"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
enum LangSpec {
    Precomputed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lang: Option<String>,
    },
    Command {
        cmd: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lang: Option<String>,
    },
    Dictionary {
        file: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lang: Option<String>,
    },
    /// The `nmt_model` input: M2M100 or NLLB-200.
    Nllb {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lang: Option<String>,
        /// The model's target-language token (`spa_Latn`, `__es__`);
        /// default: looked up from the language code.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        #[serde(default = "default_source")]
        source: String,
        #[serde(default = "default_beams")]
        beams: usize,
        #[serde(default = "default_max_length")]
        max_length: usize,
        #[serde(default = "default_length_penalty")]
        length_penalty: f32,
        /// Sentences decoded together.
        #[serde(default = "default_batch_size")]
        batch_size: usize,
        #[serde(default)]
        device: DeviceChoice,
    },
}

fn default_source() -> String {
    "en".into()
}
fn default_beams() -> usize {
    4
}
fn default_max_length() -> usize {
    200
}
fn default_length_penalty() -> f32 {
    1.0
}
fn default_batch_size() -> usize {
    16
}

impl LangSpec {
    fn code(&self, name: &str) -> String {
        let (LangSpec::Precomputed { lang }
        | LangSpec::Command { lang, .. }
        | LangSpec::Dictionary { lang, .. }
        | LangSpec::Nllb { lang, .. }) = self;
        lang.clone().unwrap_or_else(|| name.to_string())
    }
}

/// A machine translation engine: batched, so engines on a GPU can fill it.
pub trait Translator {
    /// Identifies the engine and its settings in the translation memory.
    fn identity(&self) -> String;
    /// Translate every text; `None` where the engine could not.
    fn translate(&mut self, texts: &[String]) -> anyhow::Result<Vec<Option<String>>>;
}

impl TypedStage for TranslateStage {
    type Params = TranslateParams;
    const KIND: &'static str = "translate";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str = "translate English QA pairs (precomputed, command, dictionary or NLLB / M2M100 backends) with a translation memory";

    fn validate(
        &self,
        mut p: TranslateParams,
        _env: &ParamsEnv,
    ) -> Result<TranslateParams, ParamError> {
        for (name, spec) in &mut p.langs {
            if let LangSpec::Nllb {
                beams,
                max_length,
                batch_size,
                device,
                ..
            } = spec
            {
                if *beams == 0 || *batch_size == 0 || *max_length < 3 {
                    return Err(ParamError::new(
                        format!("langs.{name}"),
                        "beams and batch_size must be at least 1, max_length at least 3",
                    ));
                }
                *device = device
                    .check()
                    .map_err(|e| ParamError::new(format!("langs.{name}.device"), e.to_string()))?;
            }
        }
        if p.langs.is_empty() {
            return Err(ParamError::new(
                "langs",
                "name at least one target language",
            ));
        }
        if p.batch == 0 {
            return Err(ParamError::new("batch", "must be at least 1"));
        }
        let mut codes = HashSet::new();
        for (name, spec) in &p.langs {
            let code = spec.code(name);
            if code == "en" || !codes.insert(code.clone()) {
                return Err(ParamError::new(
                    format!("langs.{name}"),
                    format!("language `{code}` is English or given twice"),
                ));
            }
        }
        Ok(p)
    }

    fn interface_for(
        &self,
        p: &TranslateParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        let needs = |f: fn(&LangSpec) -> bool| p.langs.values().any(f);
        let mut inputs = vec![InputSlot::one("pairs")];
        inputs.push(InputSlot {
            name: "precomputed".into(),
            many: true,
            optional: !needs(|b| matches!(b, LangSpec::Precomputed { .. })),
        });
        inputs.push(InputSlot {
            name: "dictionaries".into(),
            many: false,
            optional: !needs(|b| matches!(b, LangSpec::Dictionary { .. })),
        });
        inputs.push(InputSlot {
            name: "nmt_model".into(),
            many: false,
            optional: !needs(|b| matches!(b, LangSpec::Nllb { .. })),
        });
        let mut resources = BTreeMap::new();
        for spec in p.langs.values() {
            if let LangSpec::Nllb { device, .. } = spec {
                resources.extend(device.resources());
            }
        }
        Ok(Interface {
            inputs,
            outputs: vec!["pairs".into()],
            resources,
        })
    }

    fn execute(&self, p: &TranslateParams, ctx: &StageContext) -> anyhow::Result<()> {
        let pairs_dir = ctx.input("pairs")?;
        let unit = read_unit(pairs_dir)?;
        let mut english = English::default();
        for split in ["train", "valid"] {
            let frame = read_parquet(&pairs_dir.join(format!("{split}.parquet")))?;
            english.ids.extend(strings(&frame, "pair_id")?);
            english.questions.extend(strings(&frame, "question")?);
            english.passages.extend(strings(&frame, "passage")?);
            english.negatives.extend(strings(&frame, "negative")?);
            english
                .splits
                .extend(vec![split.to_string(); frame.height()]);
        }
        let mut report = ReadReport::default();
        report.read = english.ids.len();
        let mut languages: Vec<(String, Vec<Option<[String; 3]>>)> = Vec::new();
        for (name, spec) in &p.langs {
            let code = spec.code(name);
            let rows = match spec {
                LangSpec::Precomputed { .. } => precomputed(ctx, &code, unit, &english)?,
                LangSpec::Command { cmd, .. } => {
                    let mut engine = CommandTranslator { cmd: cmd.clone() };
                    with_memory(&mut engine, &code, &english, p.batch, ctx, &mut report)?
                }
                LangSpec::Dictionary { file, .. } => {
                    let dir = ctx.input("dictionaries")?;
                    let mut engine =
                        DictionaryTranslator::load(&crate::datasets::input_file(dir, file)?)?;
                    let before = engine.unknown_words;
                    let rows =
                        with_memory(&mut engine, &code, &english, p.batch, ctx, &mut report)?;
                    report.count(
                        format!("unknown_words.{code}"),
                        engine.unknown_words - before,
                    );
                    rows
                }
                LangSpec::Nllb { device, .. } => device.run(
                    ctx.gpu(),
                    NllbTranslation {
                        spec,
                        lang: &code,
                        english: &english,
                        batch: p.batch,
                        ctx,
                        report: &mut report,
                    },
                )?,
            };
            let missing = rows.iter().filter(|r| r.is_none()).count();
            report.count(format!("untranslatable.{code}"), missing);
            languages.push((code, rows));
        }

        // Keep the pairs every language has: cross-lingual batches need them all.
        let complete: Vec<usize> = (0..english.ids.len())
            .filter(|&i| languages.iter().all(|(_, rows)| rows[i].is_some()))
            .collect();
        report.kept = complete.len();
        report.count(
            "dropped_not_in_every_language",
            english.ids.len() - complete.len(),
        );
        let mut columns: [Vec<String>; 6] = Default::default();
        let mut push = |i: usize, lang: &str, texts: [&str; 3]| {
            columns[0].push(english.ids[i].clone());
            columns[1].push(lang.to_string());
            columns[2].push(english.splits[i].clone());
            for (c, t) in texts.into_iter().enumerate() {
                columns[3 + c].push(t.to_string());
            }
        };
        for &i in &complete {
            push(
                i,
                "en",
                [
                    &english.questions[i],
                    &english.passages[i],
                    &english.negatives[i],
                ],
            );
        }
        for (code, rows) in &languages {
            for &i in &complete {
                let [q, passage, negative] = rows[i].as_ref().expect("complete rows");
                push(i, code, [q, passage, negative]);
            }
            report.count(format!("pairs.{code}"), complete.len());
        }
        report.count("pairs.en", complete.len());
        let out = ctx.output("pairs");
        std::fs::create_dir_all(&out)?;
        let [ids, langs, splits, questions, passages, negatives] = columns;
        write_parquet(
            &out.join("pairs.parquet"),
            vec![
                string_column("pair_id", ids),
                string_column("lang", langs),
                string_column("split", splits),
                string_column("question", questions),
                string_column("passage", passages),
                string_column("negative", negatives),
            ],
        )?;
        report.write(&out.join("meta.json"))
    }
}

#[derive(Default)]
struct English {
    ids: Vec<String>,
    questions: Vec<String>,
    passages: Vec<String>,
    negatives: Vec<String>,
    splits: Vec<String>,
}

fn read_unit(pairs_dir: &Path) -> anyhow::Result<Unit> {
    let text = std::fs::read_to_string(pairs_dir.join("settings.json"))
        .context("the `pairs` input is not a qa_pairs output (no settings.json)")?;
    let settings: serde_json::Value = serde_json::from_str(&text)?;
    Ok(serde_json::from_value(settings["unit"].clone())?)
}
