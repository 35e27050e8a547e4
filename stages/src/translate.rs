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
//! model in burn (`crate::nmt`: beam search as transformers' `generate`,
//! length-sorted batches, CPU or CUDA). Other engines plug in through the
//! [`Translator`] trait.
//!
//! A translation memory keyed by (backend identity, source text, target
//! language) lives in the stage's state folder and persists across runs and
//! pipelines: adding a language translates only it, and an interrupted run
//! resumes where it stopped.
//!
//! Output folder `pairs`: `pairs.parquet` (pair_id, lang, split, question,
//! passage, negative) with English and every target language, holding only
//! the pairs every language has, and `meta.json` with per-language counts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::model::{DeviceChoice, OnBackend};
use crate::nmt::{EarlyStopping, GenerationConfig, NeuralTranslator};
use crate::qa_pairs::Unit;
use crate::table::{read_parquet, string_column, strings, write_parquet, ReadReport};
use crate::{
    from_canonical, parse_params, to_canonical, InputSlot, Interface, ParamError, ParamsEnv, Stage,
    StageContext,
};

pub struct TranslateStage;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TranslateParams {
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
        #[serde(default = "default_nmt_batch")]
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
fn default_nmt_batch() -> usize {
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

impl Stage for TranslateStage {
    fn kind(&self) -> &'static str {
        "translate"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "translate English QA pairs (precomputed, command, dictionary or NLLB / M2M100 backends) with a translation memory"
    }

    fn canonical_params(
        &self,
        params: &toml::Table,
        _env: &ParamsEnv,
    ) -> Result<serde_json::Value, ParamError> {
        let mut p: TranslateParams = parse_params(params)?;
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
        Ok(to_canonical(&p))
    }

    fn interface(
        &self,
        params: &serde_json::Value,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        let p: TranslateParams =
            from_canonical(params).map_err(|e| ParamError::new("", e.to_string()))?;
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

    fn run(&self, params: &serde_json::Value, ctx: &StageContext) -> anyhow::Result<()> {
        let p: TranslateParams = from_canonical(params)?;
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
                    ctx,
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

/// Questions and passages of the same question ids in a translated SQuAD.
/// Hard negatives cannot be looked up this way and stay empty.
fn precomputed(
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

/// The `nllb` backend for one language, for [`DeviceChoice::run`]: load the
/// model once, then translate what the memory lacks.
struct NllbTranslation<'a> {
    spec: &'a LangSpec,
    lang: &'a str,
    english: &'a English,
    batch: usize,
    ctx: &'a StageContext,
    report: &'a mut ReadReport,
}

impl OnBackend for NllbTranslation<'_> {
    type Output = Vec<Option<[String; 3]>>;
    fn run<B: burn::tensor::backend::Backend>(
        self,
        device: B::Device,
    ) -> anyhow::Result<Self::Output> {
        let NllbTranslation {
            spec,
            lang,
            english,
            batch,
            ctx,
            report,
        } = self;
        let LangSpec::Nllb {
            code,
            source,
            beams,
            max_length,
            length_penalty,
            batch_size,
            ..
        } = spec
        else {
            unreachable!("called for nllb languages only")
        };
        let model = match ctx.inputs("nmt_model") {
            [one] => one,
            _ => anyhow::bail!("the nllb backend needs one `nmt_model` input"),
        };
        let generation = GenerationConfig {
            beams: *beams,
            max_length: *max_length,
            length_penalty: *length_penalty,
            early_stopping: EarlyStopping::Heuristic,
        };
        let target = code.as_deref().unwrap_or(lang);
        let translator = NeuralTranslator::<B>::load(
            &model.path,
            source,
            target,
            generation,
            *batch_size,
            &device,
        )?;
        let mut engine = NllbEngine {
            translator,
            identity: format!(
                "nllb model={} source={source} target={target} beams={beams} max_length={max_length} length_penalty={length_penalty}",
                model.hash
            ),
        };
        with_memory(&mut engine, lang, english, batch, ctx, report)
    }
}

struct NllbEngine<B: burn::tensor::backend::Backend> {
    translator: NeuralTranslator<B>,
    identity: String,
}

impl<B: burn::tensor::backend::Backend> Translator for NllbEngine<B> {
    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn translate(&mut self, texts: &[String]) -> anyhow::Result<Vec<Option<String>>> {
        Ok(self
            .translator
            .translate_texts(texts)?
            .into_iter()
            .map(Some)
            .collect())
    }
}

/// Translate every English text through `engine`, consulting and then
/// extending the persistent translation memory.
fn with_memory(
    engine: &mut dyn Translator,
    lang: &str,
    english: &English,
    batch: usize,
    ctx: &StageContext,
    report: &mut ReadReport,
) -> anyhow::Result<Vec<Option<[String; 3]>>> {
    let mut memory = Memory::open(&ctx.state_dir, &engine.identity(), lang)?;
    let mut todo: Vec<String> = Vec::new();
    let mut distinct = HashSet::new();
    for text in english
        .questions
        .iter()
        .chain(&english.passages)
        .chain(&english.negatives)
    {
        if !text.is_empty() && distinct.insert(text.as_str()) && !memory.entries.contains_key(text)
        {
            todo.push(text.clone());
        }
    }
    report.count(format!("from_memory.{lang}"), distinct.len() - todo.len());
    report.count(format!("translated_now.{lang}"), todo.len());
    let bar = ctx.progress_bar(todo.len() as u64, &format!("translating to {lang}"));
    let started = std::time::Instant::now();
    for chunk in todo.chunks(batch) {
        let translated = engine.translate(chunk)?;
        anyhow::ensure!(
            translated.len() == chunk.len(),
            "translator returned {} texts for {}",
            translated.len(),
            chunk.len()
        );
        memory.append(chunk, &translated)?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if !todo.is_empty() {
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            "translated {} texts to {lang} in {seconds:.1} s ({:.1} texts/s)",
            todo.len(),
            todo.len() as f64 / seconds.max(1e-9)
        );
    }
    let look = |t: &String| -> Option<String> {
        if t.is_empty() {
            Some(String::new())
        } else {
            memory.entries.get(t).cloned().flatten()
        }
    };
    Ok((0..english.ids.len())
        .map(|i| {
            Some([
                look(&english.questions[i])?,
                look(&english.passages[i])?,
                look(&english.negatives[i])?,
            ])
        })
        .collect())
}

/// Append-only JSON Lines: `[source, translation or null]` per line.
struct Memory {
    path: PathBuf,
    entries: HashMap<String, Option<String>>,
}

impl Memory {
    fn open(state_dir: &Path, identity: &str, lang: &str) -> anyhow::Result<Memory> {
        let id = blake3::hash(identity.as_bytes()).to_hex();
        let dir = state_dir.join("memory");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.{lang}.jsonl", &id[..16]));
        let mut entries = HashMap::new();
        if let Ok(file) = File::open(&path) {
            for line in BufReader::new(file).lines() {
                // A line cut short by a kill is simply not in the memory.
                if let Ok((source, target)) =
                    serde_json::from_str::<(String, Option<String>)>(&line?)
                {
                    entries.insert(source, target);
                }
            }
        }
        Ok(Memory { path, entries })
    }

    fn append(&mut self, sources: &[String], targets: &[Option<String>]) -> anyhow::Result<()> {
        let mut text = String::new();
        for (s, t) in sources.iter().zip(targets) {
            text.push_str(&serde_json::to_string(&(s, t))?);
            text.push('\n');
            self.entries.insert(s.clone(), t.clone());
        }
        // Another run may append to the same memory: one locked write per batch.
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.lock()?;
        file.write_all(text.as_bytes())?;
        file.sync_data()?;
        Ok(())
    }
}

/// Any program that reads texts one per line and writes their translations
/// one per line, in order (Apertium, a Moses server wrapper, a script).
struct CommandTranslator {
    cmd: String,
}

impl Translator for CommandTranslator {
    fn identity(&self) -> String {
        format!("command:{}", self.cmd)
    }

    fn translate(&mut self, texts: &[String]) -> anyhow::Result<Vec<Option<String>>> {
        let mut input = String::new();
        for t in texts {
            // One text per line: line breaks inside a text become spaces.
            input.push_str(&t.replace(['\n', '\r'], " "));
            input.push('\n');
        }
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{}`", self.cmd))?;
        let mut stdin = child.stdin.take().expect("piped");
        // Write from a thread: the program may fill its stdout before reading all input.
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let output = child.wait_with_output()?;
        writer
            .join()
            .expect("writer thread")
            .context("writing to the translator")?;
        if !output.status.success() {
            anyhow::bail!(
                "`{}` failed ({}): {}",
                self.cmd,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let lines: Vec<&str> = text.lines().collect();
        anyhow::ensure!(
            lines.len() == texts.len(),
            "`{}` answered {} lines for {} input lines; it must translate line by line",
            self.cmd,
            lines.len(),
            texts.len()
        );
        Ok(lines
            .into_iter()
            .map(|l| (!l.trim().is_empty()).then(|| l.trim().to_string()))
            .collect())
    }
}

/// Word-by-word translation with a MUSE dictionary (`target @ source` per
/// line; the first target of a source word wins). Unknown words stay as
/// they are; a text none of whose words are known counts as untranslatable.
struct DictionaryTranslator {
    identity: String,
    words: HashMap<String, String>,
    unknown_words: usize,
}

impl DictionaryTranslator {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut words = HashMap::new();
        for line in text.lines() {
            if let Some((target, source)) = line.split_once(" @ ") {
                words
                    .entry(source.trim().to_lowercase())
                    .or_insert_with(|| target.trim().to_string());
            }
        }
        anyhow::ensure!(
            !words.is_empty(),
            "{} has no `target @ source` lines",
            path.display()
        );
        Ok(DictionaryTranslator {
            identity: format!("dictionary:{}", blake3::hash(text.as_bytes()).to_hex()),
            words,
            unknown_words: 0,
        })
    }

    fn translate_one(&mut self, text: &str) -> Option<String> {
        let mut out = String::with_capacity(text.len());
        let (mut known, mut total) = (0, 0);
        let mut word = String::new();
        let mut flush = |word: &mut String, out: &mut String, words: &HashMap<String, String>| {
            if word.is_empty() {
                return;
            }
            total += 1;
            match words.get(&word.to_lowercase()) {
                Some(t) => {
                    known += 1;
                    if word.chars().next().is_some_and(char::is_uppercase) {
                        let mut chars = t.chars();
                        if let Some(first) = chars.next() {
                            out.extend(first.to_uppercase());
                            out.push_str(chars.as_str());
                        }
                    } else {
                        out.push_str(t);
                    }
                }
                None => out.push_str(word),
            }
            word.clear();
        };
        for c in text.chars() {
            if c.is_alphanumeric() || c == '\'' {
                word.push(c);
            } else {
                flush(&mut word, &mut out, &self.words);
                out.push(c);
            }
        }
        flush(&mut word, &mut out, &self.words);
        self.unknown_words += total - known;
        (known > 0).then_some(out)
    }
}

impl Translator for DictionaryTranslator {
    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn translate(&mut self, texts: &[String]) -> anyhow::Result<Vec<Option<String>>> {
        Ok(texts.iter().map(|t| self.translate_one(t)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_translates_word_by_word_keeping_case_and_punctuation() {
        let mut t = DictionaryTranslator {
            identity: String::new(),
            words: [("the", "die"), ("house", "haus"), ("is", "ist")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            unknown_words: 0,
        };
        assert_eq!(
            t.translate_one("The house is red."),
            Some("Die haus ist red.".into())
        );
        assert_eq!(t.unknown_words, 1);
        assert_eq!(t.translate_one("Xyz!"), None);
    }
}
