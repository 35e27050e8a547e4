//! `qa_pairs`: English (question, positive passage) training pairs from a
//! `squad` reader's output, with every evaluation paragraph removed.
//!
//! ```toml
//! [stages.pairs]
//! kind = "qa_pairs"
//! inputs.qa = "squad_dev"
//! inputs.exclude = ["xquad_r", "mlqa_r"]   # evaluation sets: no paragraph of theirs may train
//! unit = "sentence"                        # or "paragraph"
//! validation_fraction = 0.1                # held out by paragraph
//! hard_negatives = "same_paragraph"        # or "lexical" (BM25 neighbours), "none"
//! ```
//!
//! Leakage guard: a training paragraph is dropped when its normalised text
//! equals an evaluation context, or when any of its questions has an id an
//! evaluation set uses (XQuAD, hence XQuAD-R, reuses SQuAD's ids); with
//! `exclude_articles = true`, also when its article (by title) is one an
//! evaluation set holds.
//!
//! Output folder `pairs`: `train.parquet` and `valid.parquet` (pair_id,
//! context_id, question, passage, negative — empty when there is none) and
//! `meta.json` with the counts, `settings.json` with the unit.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::datasets::split_sentences;
use crate::datasets::squad::context_id;
use xlpipe_stage_api::table::{read_parquet, string_column, strings, write_parquet, ReadReport};
use xlpipe_stage_api::{InputSlot, Interface, ParamError, ParamsEnv, StageContext, TypedStage};

pub struct QaPairsStage;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// The sentence that holds the answer.
    Sentence,
    /// The whole paragraph.
    Paragraph,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum HardNegatives {
    None,
    /// Another sentence of the positive's paragraph (sentence unit only).
    SameParagraph,
    /// The best BM25 match for the question that is not from its paragraph.
    Lexical,
}

fn default_unit() -> Unit {
    Unit::Sentence
}

fn default_validation_fraction() -> f64 {
    0.1
}

fn default_hard_negatives() -> HardNegatives {
    HardNegatives::None
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QaPairsParams {
    #[serde(default = "default_unit")]
    unit: Unit,
    #[serde(default = "default_validation_fraction")]
    validation_fraction: f64,
    #[serde(default = "default_hard_negatives")]
    hard_negatives: HardNegatives,
    /// Seed of the validation split, the subset and negative choice.
    #[serde(default)]
    seed: u64,
    /// Keep at most this many pairs (whole paragraphs, chosen by seed): for
    /// quick runs on a CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_pairs: Option<usize>,
    /// Also drop every paragraph of an article that an evaluation set
    /// holds (by title): for training on part of a parallel set (XQuAD)
    /// and evaluating on the rest, where paragraphs of one article share
    /// facts and names.
    #[serde(default)]
    exclude_articles: bool,
}

impl TypedStage for QaPairsStage {
    type Params = QaPairsParams;
    const KIND: &'static str = "qa_pairs";
    // 2: excluded_articles in meta.json.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "English (question, passage) training pairs, evaluation paragraphs removed";

    fn validate(&self, p: QaPairsParams, _env: &ParamsEnv) -> Result<QaPairsParams, ParamError> {
        if !(0.0..1.0).contains(&p.validation_fraction) {
            return Err(ParamError::new("validation_fraction", "must be in [0, 1)"));
        }
        if p.hard_negatives == HardNegatives::SameParagraph && p.unit == Unit::Paragraph {
            return Err(ParamError::new(
                "hard_negatives",
                "`same_paragraph` needs unit = \"sentence\"",
            ));
        }
        Ok(p)
    }

    fn interface_for(
        &self,
        _p: &QaPairsParams,
        _inputs: &[String],
    ) -> Result<Interface, ParamError> {
        Ok(Interface {
            inputs: vec![
                InputSlot::one("qa"),
                InputSlot {
                    name: "exclude".into(),
                    many: true,
                    optional: true,
                },
            ],
            outputs: vec!["pairs".into()],
            ..Interface::default()
        })
    }

    fn execute(&self, p: &QaPairsParams, ctx: &StageContext) -> anyhow::Result<()> {
        let qa = read_parquet(&ctx.input("qa")?.join("qa.parquet"))?;
        let qids = strings(&qa, "qid")?;
        let questions = strings(&qa, "question")?;
        let contexts = strings(&qa, "context")?;
        let context_ids = strings(&qa, "context_id")?;
        let sentences = strings(&qa, "sentence")?;

        let banned = evaluation_material(ctx)?;
        let titles = if p.exclude_articles {
            anyhow::ensure!(
                !banned.titles.is_empty() || ctx.inputs("exclude").is_empty(),
                "exclude_articles: no `exclude` input names its articles (a squad output with titles, or a lareqa output with articles.parquet)"
            );
            strings(&qa, "title").context(
                "exclude_articles needs article titles in the `qa` input (a squad reader of SQuAD-layout JSON)",
            )?
        } else {
            Vec::new()
        };
        let mut dropped_paragraphs: HashSet<&str> = HashSet::new();
        let mut dropped_articles: HashSet<&str> = HashSet::new();
        for (i, cid) in context_ids.iter().enumerate() {
            let by_article = p.exclude_articles && banned.titles.contains(&titles[i]);
            if by_article {
                dropped_articles.insert(&titles[i]);
            }
            if by_article || banned.contexts.contains(cid) || banned.qids.contains(&qids[i]) {
                dropped_paragraphs.insert(cid);
            }
        }
        let excluded_questions = context_ids
            .iter()
            .filter(|c| dropped_paragraphs.contains(c.as_str()))
            .count();
        let mut kept: Vec<usize> = (0..qids.len())
            .filter(|&i| !dropped_paragraphs.contains(context_ids[i].as_str()))
            .collect();
        if let Some(max) = p.max_pairs {
            // Paragraphs in seeded order, so a subset never splits one.
            kept.sort_by_key(|&i| (mix(p.seed ^ 0x5eed, &context_ids[i]), i));
            kept.truncate(max);
            kept.sort_unstable();
        }
        let passage = |i: usize| match p.unit {
            Unit::Sentence => sentences[i].clone(),
            Unit::Paragraph => contexts[i].clone(),
        };

        let negatives: Vec<String> = match p.hard_negatives {
            HardNegatives::None => vec![String::new(); kept.len()],
            HardNegatives::SameParagraph => kept
                .iter()
                .map(|&i| {
                    let others: Vec<&str> = split_sentences(&contexts[i])
                        .into_iter()
                        .map(|(s, e)| &contexts[i][s..e])
                        .filter(|s| *s != sentences[i])
                        .collect();
                    if others.is_empty() {
                        String::new()
                    } else {
                        let pick = mix(p.seed, &qids[i]) as usize % others.len();
                        others[pick].to_string()
                    }
                })
                .collect(),
            HardNegatives::Lexical => {
                let passages: Vec<(String, &str)> = kept
                    .iter()
                    .map(|&i| (passage(i), context_ids[i].as_str()))
                    .collect();
                lexical_negatives(
                    &kept
                        .iter()
                        .map(|&i| questions[i].as_str())
                        .collect::<Vec<_>>(),
                    &passages,
                )
            }
        };

        let mut train: [Vec<String>; 5] = Default::default();
        let mut valid: [Vec<String>; 5] = Default::default();
        for (k, &i) in kept.iter().enumerate() {
            // Hold out whole paragraphs, so validation never shares one with training.
            let held_out =
                (mix(p.seed, &context_ids[i]) as f64 / u64::MAX as f64) < p.validation_fraction;
            let columns = if held_out { &mut valid } else { &mut train };
            columns[0].push(qids[i].clone());
            columns[1].push(context_ids[i].clone());
            columns[2].push(questions[i].clone());
            columns[3].push(passage(i));
            columns[4].push(negatives[k].clone());
        }
        let out = ctx.output("pairs");
        std::fs::create_dir_all(&out)?;
        let mut report = ReadReport::default();
        report.read = qids.len();
        report.kept = kept.len();
        report.count("excluded_paragraphs", dropped_paragraphs.len());
        report.count("excluded_articles", dropped_articles.len());
        report.count("excluded_questions", excluded_questions);
        report.count(
            "paragraphs",
            context_ids.iter().collect::<HashSet<_>>().len() - dropped_paragraphs.len(),
        );
        report.count("train_pairs", train[0].len());
        report.count("valid_pairs", valid[0].len());
        write_pairs(&out.join("train.parquet"), train)?;
        write_pairs(&out.join("valid.parquet"), valid)?;
        tracing::info!(
            "{} pairs kept; {} paragraphs ({} questions) removed as evaluation material",
            kept.len(),
            dropped_paragraphs.len(),
            excluded_questions
        );
        std::fs::write(
            out.join("settings.json"),
            serde_json::to_vec_pretty(&serde_json::json!({ "unit": p.unit }))?,
        )?;
        report.write(&out.join("meta.json"))
    }
}

fn write_pairs(
    path: &Path,
    [ids, cids, questions, passages, negatives]: [Vec<String>; 5],
) -> anyhow::Result<()> {
    write_parquet(
        path,
        vec![
            string_column("pair_id", ids),
            string_column("context_id", cids),
            string_column("question", questions),
            string_column("passage", passages),
            string_column("negative", negatives),
        ],
    )
}

/// Context ids and question ids of every connected evaluation set.
/// What the evaluation sets hold: paragraphs (by context id), question ids
/// and article titles (where the reader kept them).
#[derive(Default)]
struct EvaluationMaterial {
    contexts: HashSet<String>,
    qids: HashSet<String>,
    titles: HashSet<String>,
}

fn evaluation_material(ctx: &StageContext) -> anyhow::Result<EvaluationMaterial> {
    let mut m = EvaluationMaterial::default();
    for input in ctx.inputs("exclude") {
        let dir = &input.path;
        if dir.join("qa.parquet").exists() {
            let qa = read_parquet(&dir.join("qa.parquet"))?;
            m.contexts.extend(strings(&qa, "context_id")?);
            m.qids.extend(strings(&qa, "qid")?);
            if qa.column("title").is_ok() {
                m.titles
                    .extend(strings(&qa, "title")?.into_iter().filter(|t| !t.is_empty()));
            }
        } else if dir.join("candidates.parquet").exists() {
            let candidates = read_parquet(&dir.join("candidates.parquet"))?;
            m.contexts.extend(
                strings(&candidates, "context")?
                    .iter()
                    .map(|c| context_id(c)),
            );
            m.qids.extend(strings(
                &read_parquet(&dir.join("questions.parquet"))?,
                "qid",
            )?);
            if dir.join("articles.parquet").exists() {
                m.titles.extend(strings(
                    &read_parquet(&dir.join("articles.parquet"))?,
                    "title",
                )?);
            }
        } else {
            anyhow::bail!(
                "exclude input from {} is neither a `squad` nor a `lareqa` reader's output",
                input.producer
            );
        }
    }
    Ok(m)
}

/// A well-mixed 64-bit hash of (seed, text): deterministic choices.
fn mix(seed: u64, text: &str) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.update(text.as_bytes());
    let bytes = hasher.finalize();
    u64::from_le_bytes(bytes.as_bytes()[..8].try_into().expect("8 bytes"))
}

fn tokens(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// For each question, the highest-scoring BM25 passage (k1 = 0.9, b = 0.4,
/// Anserini's defaults) from another paragraph than its own positive.
fn lexical_negatives(questions: &[&str], passages: &[(String, &str)]) -> Vec<String> {
    let (k1, b) = (0.9f64, 0.4f64);
    // Distinct passages only: many questions share one paragraph.
    let mut unique: Vec<(&str, &str)> = Vec::new();
    let mut seen = HashSet::new();
    for (text, cid) in passages {
        if seen.insert(text.as_str()) {
            unique.push((text.as_str(), cid));
        }
    }
    let docs: Vec<Vec<String>> = unique.iter().map(|(t, _)| tokens(t)).collect();
    let avg_len = docs.iter().map(Vec::len).sum::<usize>() as f64 / docs.len().max(1) as f64;
    let mut postings: HashMap<&str, Vec<(usize, f64)>> = HashMap::new();
    for (d, doc) in docs.iter().enumerate() {
        let mut tf: HashMap<&str, f64> = HashMap::new();
        for t in doc {
            *tf.entry(t.as_str()).or_default() += 1.0;
        }
        for (t, f) in tf {
            postings.entry(t).or_default().push((d, f));
        }
    }
    let n = docs.len() as f64;
    questions
        .iter()
        .zip(passages)
        .map(|(q, (_, own))| {
            let mut scores: HashMap<usize, f64> = HashMap::new();
            let mut terms = tokens(q);
            terms.sort();
            terms.dedup();
            for t in &terms {
                let Some(list) = postings.get(t.as_str()) else {
                    continue;
                };
                let idf = ((n - list.len() as f64 + 0.5) / (list.len() as f64 + 0.5) + 1.0).ln();
                for &(d, f) in list {
                    let norm = f + k1 * (1.0 - b + b * docs[d].len() as f64 / avg_len);
                    *scores.entry(d).or_default() += idf * f * (k1 + 1.0) / norm;
                }
            }
            scores
                .into_iter()
                .filter(|(d, _)| unique[*d].1 != *own)
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
                .map(|(d, _)| unique[d].0.to_string())
                .unwrap_or_default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_negative_is_the_best_match_outside_the_own_paragraph() {
        let passages = vec![
            ("The cat sat on the mat.".to_string(), "p1"),
            ("A cat and a mat.".to_string(), "p2"),
            ("Dogs bark loudly.".to_string(), "p3"),
        ];
        let negatives = lexical_negatives(
            &["where did the cat sit on the mat", "x", "dogs"],
            &passages,
        );
        assert_eq!(negatives[0], "A cat and a mat.");
        assert_eq!(negatives[1], "");
        assert_eq!(negatives[2], "");
    }
}
