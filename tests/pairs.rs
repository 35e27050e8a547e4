//! Training pairs without leakage, and their translation by all three
//! backends with the translation memory, on the real mirror data.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;

use common::Scratch;
use serde_json::Value;
use xlpipe_stage_api::table::{read_parquet, strings};

fn repo(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

fn output(s: &Scratch, stage: &str, name: &str, pipeline: &str) -> PathBuf {
    let shown = s.ok(&["show", stage, "--pipeline", pipeline]).stdout;
    let prefix = format!("output   {name}  ");
    let path = shown
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no output {name} for {stage}:\n{shown}"));
    s.path(path)
}

fn meta(dir: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap()
}

/// The questions of one language in a translate output, in table order.
fn questions_in(out: &std::path::Path, lang: &str) -> Vec<String> {
    let frame = read_parquet(&out.join("pairs.parquet")).unwrap();
    let langs = strings(&frame, "lang").unwrap();
    strings(&frame, "question")
        .unwrap()
        .into_iter()
        .zip(&langs)
        .filter(|(_, l)| *l == lang)
        .map(|(q, _)| q)
        .collect()
}

fn run(s: &Scratch, file: &str, until: &str) -> common::Ran {
    s.ok(&[
        "run",
        file,
        "--offline",
        "--mirror",
        &repo("../shared/mirror"),
        "--until",
        until,
    ])
}

#[test]
fn no_xquad_paragraph_survives_into_training_pairs() {
    let s = Scratch::shared();
    s.write(
        "p.toml",
        &format!(
            r#"[pipeline]
name = "leakage"
include = ["{}"]

[stages.pairs]
kind = "qa_pairs"
inputs.qa = "squad_dev"
inputs.exclude = ["xquad_r", "mlqa_r"]
"#,
            repo("pipelines/datasets.toml")
        ),
    );
    run(&s, "p.toml", "pairs");
    run(&s, "p.toml", "xquad_en");
    let pairs = output(&s, "pairs", "pairs", "leakage");
    let m = meta(&pairs);
    assert_eq!(m["counts"]["excluded_paragraphs"], 240, "{m}");
    assert_eq!(m["counts"]["excluded_questions"], 1190, "{m}");

    // Check against XQuAD itself, read independently of XQuAD-R.
    let xquad =
        read_parquet(&output(&s, "xquad_en", "data", "leakage").join("qa.parquet")).unwrap();
    let xquad_contexts: HashSet<String> =
        strings(&xquad, "context_id").unwrap().into_iter().collect();
    let xquad_qids: HashSet<String> = strings(&xquad, "qid").unwrap().into_iter().collect();
    assert_eq!(xquad_contexts.len(), 240);
    let mut total = 0;
    for split in ["train", "valid"] {
        let frame = read_parquet(&pairs.join(format!("{split}.parquet"))).unwrap();
        total += frame.height();
        for cid in strings(&frame, "context_id").unwrap() {
            assert!(
                !xquad_contexts.contains(&cid),
                "XQuAD paragraph {cid} leaked into {split}"
            );
        }
        for qid in strings(&frame, "pair_id").unwrap() {
            assert!(
                !xquad_qids.contains(&qid),
                "XQuAD question {qid} leaked into {split}"
            );
        }
    }
    assert_eq!(total, 10570 - 1190);
    // Validation is held out by paragraph: no paragraph is on both sides.
    let train: HashSet<String> = strings(
        &read_parquet(&pairs.join("train.parquet")).unwrap(),
        "context_id",
    )
    .unwrap()
    .into_iter()
    .collect();
    let valid = strings(
        &read_parquet(&pairs.join("valid.parquet")).unwrap(),
        "context_id",
    )
    .unwrap();
    assert!(!valid.is_empty());
    assert!(valid.iter().all(|c| !train.contains(c)));
}

const TRANSLATE: &str = r#"
[stages.pairs]
kind = "qa_pairs"
inputs.qa = "squad_dev"
inputs.exclude = ["xquad_r"]
max_pairs = 400
hard_negatives = "same_paragraph"

[stages.translate]
kind = "translate"
inputs.pairs = "pairs"
inputs.precomputed = ["squad_es", "squad_it"]
inputs.dictionaries = "muse_files"
langs.es = { backend = "precomputed" }
langs.it = { backend = "precomputed" }
langs.de = { backend = "dictionary", file = "en-de.dict" }
"#;

#[test]
fn translation_backends_and_memory() {
    // A private cache: the translation memory must start empty.
    let s = Scratch::new();
    let header = format!(
        "[pipeline]\nname = \"translate-test\"\ninclude = [\"{}\"]\n",
        repo("pipelines/datasets.toml")
    );
    s.write("p.toml", &format!("{header}{TRANSLATE}"));
    run(&s, "p.toml", "translate");
    let out = output(&s, "translate", "pairs", "translate-test");
    let m = meta(&out);
    let n = m["kept"].as_u64().unwrap();
    assert!(n > 100, "{m}");
    for lang in ["en", "es", "it", "de"] {
        assert_eq!(m["counts"][format!("pairs.{lang}")], n, "{lang}: {m}");
    }
    let first_de = m["counts"]["translated_now.de"].as_u64().unwrap();
    assert!(first_de > 200, "{m}");
    let frame = read_parquet(&out.join("pairs.parquet")).unwrap();
    assert_eq!(frame.height() as u64, 4 * n);
    // Ids are aligned: every language has exactly the same pair ids.
    let ids = strings(&frame, "pair_id").unwrap();
    let langs = strings(&frame, "lang").unwrap();
    let per_lang = |l: &str| -> HashSet<&String> {
        ids.iter()
            .zip(&langs)
            .filter(|(_, x)| *x == l)
            .map(|(i, _)| i)
            .collect()
    };
    assert_eq!(per_lang("en"), per_lang("de"));
    assert_eq!(per_lang("en"), per_lang("es"));
    let questions = strings(&frame, "question").unwrap();
    let german: Vec<&String> = questions
        .iter()
        .zip(&langs)
        .filter(|(_, l)| *l == "de")
        .map(|(q, _)| q)
        .collect();
    assert!(
        german
            .iter()
            .any(|q| q.contains("Die ") || q.contains("die ") || q.contains("der ")),
        "{german:?}"
    );

    // Second run: everything comes from the memory.
    let rerun = s.ok(&[
        "run",
        "p.toml",
        "--offline",
        "--mirror",
        &repo("../shared/mirror"),
        "--force",
        "translate",
        "--until",
        "translate",
    ]);
    assert_eq!(rerun.counts().0, 1, "{rerun}");
    let m = meta(&output(&s, "translate", "pairs", "translate-test"));
    assert_eq!(m["counts"]["translated_now.de"], 0, "{m}");
    assert_eq!(m["counts"]["from_memory.de"], first_de, "{m}");

    // One more language: only it is translated.
    s.write(
        "p.toml",
        &format!(
            "{header}{TRANSLATE}langs.el = {{ backend = \"dictionary\", file = \"en-el.dict\" }}\n"
        ),
    );
    run(&s, "p.toml", "translate");
    let m = meta(&output(&s, "translate", "pairs", "translate-test"));
    assert_eq!(m["counts"]["translated_now.de"], 0, "{m}");
    assert!(
        m["counts"]["translated_now.el"].as_u64().unwrap() > 200,
        "{m}"
    );
}

#[test]
fn command_backend_runs_a_real_translator() {
    let s = Scratch::shared();
    s.write(
        "p.toml",
        &format!(
            r#"[pipeline]
name = "apertium-test"
include = ["{}"]

[stages.pairs]
kind = "qa_pairs"
inputs.qa = "squad_dev"
inputs.exclude = ["xquad_r"]
max_pairs = 40

[stages.translate]
kind = "translate"
inputs.pairs = "pairs"
langs.es = {{ backend = "command", cmd = "apertium -u eng-spa" }}
"#,
            repo("pipelines/datasets.toml")
        ),
    );
    run(&s, "p.toml", "translate");
    let out = output(&s, "translate", "pairs", "apertium-test");
    let english = questions_in(&out, "en");
    let spanish = questions_in(&out, "es");
    assert_eq!(english.len(), spanish.len());
    assert!(english.len() >= 30);
    let changed = english.iter().zip(&spanish).filter(|(e, s)| e != s).count();
    assert!(changed * 10 >= english.len() * 9, "{spanish:?}");
    assert!(
        spanish
            .iter()
            .any(|q| q.contains("Qué") || q.contains("Quién") || q.contains("Cuándo")),
        "{spanish:?}"
    );
}

#[test]
fn nllb_backend_translates_with_the_burn_model() {
    let s = Scratch::new();
    s.write(
        "p.toml",
        &format!(
            r#"[pipeline]
name = "nllb-test"
include = ["{}"]

[stages.pairs]
kind = "qa_pairs"
inputs.qa = "squad_dev"
inputs.exclude = ["xquad_r"]
max_pairs = 6

[stages.tiny_m2m100]
kind = "import"
path = "{}"

[stages.translate]
kind = "translate"
inputs.pairs = "pairs"
inputs.nmt_model = "tiny_m2m100"
langs.es = {{ backend = "nllb", beams = 2, max_length = 10, batch_size = 4 }}
langs.zh = {{ backend = "nllb", max_length = 8 }}
"#,
            repo("pipelines/datasets.toml"),
            repo("tests/fixtures/tiny-m2m100")
        ),
    );
    run(&s, "p.toml", "translate");
    let out = output(&s, "translate", "pairs", "nllb-test");
    let m = meta(&out);
    let n = m["kept"].as_u64().unwrap();
    assert!(n >= 5, "{m}");
    for lang in ["en", "es", "zh"] {
        assert_eq!(m["counts"][format!("pairs.{lang}")], n, "{lang}: {m}");
    }
    assert!(
        m["counts"]["translated_now.es"].as_u64().unwrap() >= n,
        "{m}"
    );

    // What the stage wrote is what the model says, sentence by sentence.
    let config = xlpipe_ml::nmt::GenerationConfig {
        beams: 2,
        max_length: 10,
        ..Default::default()
    };
    let translator = xlpipe_ml::nmt::NeuralTranslator::<burn::backend::Flex>::load(
        std::path::Path::new(&repo("tests/fixtures/tiny-m2m100")),
        "en",
        "es",
        config,
        1,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(
        translator
            .translate_texts(&questions_in(&out, "en"))
            .unwrap(),
        questions_in(&out, "es")
    );

    // A second pipeline asking for the same translations finds them in the memory.
    s.write(
        "q.toml",
        &std::fs::read_to_string(s.path("p.toml"))
            .unwrap()
            .replace("nllb-test", "nllb-test-2")
            .replace("batch_size = 4", "batch_size = 2"),
    );
    run(&s, "q.toml", "translate");
    let m = meta(&output(&s, "translate", "pairs", "nllb-test-2"));
    assert_eq!(m["counts"]["translated_now.es"], 0, "{m}");
    assert_eq!(m["counts"]["translated_now.zh"], 0, "{m}");
}

#[test]
fn human_arm_trains_on_some_xquad_articles_and_evaluates_on_the_others() {
    let s = Scratch::shared();
    let pipeline = |train_to: usize| {
        format!(
            r#"[pipeline]
name = "human-arm-{train_to}"
include = ["{datasets}"]

[stages.xquad_train_en]
kind = "squad"
inputs.files = "xquad_files"
files = ["xquad.en.json"]
lang = "en"
articles = {{ to = {train_to} }}

[stages.xquad_r_heldout]
kind = "lareqa"
inputs.files = "xquad_r_files"
langs = ["de", "en", "zh"]
articles = {{ from = 24 }}

[stages.pairs_h]
kind = "qa_pairs"
inputs.qa = "xquad_train_en"
inputs.exclude = ["xquad_r_heldout"]
exclude_articles = true
validation_fraction = 0.1

[stages.pairs_paragraphs_only]
kind = "qa_pairs"
inputs.qa = "xquad_train_en"
inputs.exclude = ["xquad_r_heldout"]
validation_fraction = 0.1

[stages.translate_h]
kind = "translate"
inputs.pairs = "pairs_h"
inputs.precomputed = ["xquad_de", "xquad_zh"]
langs.de = {{ backend = "precomputed" }}
langs.zh = {{ backend = "precomputed" }}
"#,
            datasets = repo("pipelines/datasets.toml")
        )
    };
    s.write("clean.toml", &pipeline(24));
    for stage in [
        "translate_h",
        "pairs_paragraphs_only",
        "xquad_en",
        "xquad_r_heldout",
    ] {
        run(&s, "clean.toml", stage);
    }
    let all =
        read_parquet(&output(&s, "xquad_en", "data", "human-arm-24").join("qa.parquet")).unwrap();
    let titles = strings(&all, "title").unwrap();
    let qids = strings(&all, "qid").unwrap();
    let article_order: Vec<&String> = titles.iter().fold(Vec::new(), |mut seen, t| {
        if seen.last() != Some(&t) {
            seen.push(t);
        }
        seen
    });
    assert_eq!(article_order.len(), 48);
    let first_half: HashSet<&String> = article_order[..24].iter().copied().collect();
    let train_qids: HashSet<&String> = qids
        .iter()
        .zip(&titles)
        .filter(|(_, t)| first_half.contains(t))
        .map(|(q, _)| q)
        .collect();

    // Disjoint by construction: the guard finds nothing to drop.
    let pairs = output(&s, "pairs_h", "pairs", "human-arm-24");
    let m = meta(&pairs);
    assert_eq!(m["counts"]["excluded_paragraphs"], 0, "{m}");
    assert_eq!(m["counts"]["excluded_articles"], 0, "{m}");
    let mut pair_ids = Vec::new();
    for split in ["train", "valid"] {
        pair_ids.extend(
            strings(
                &read_parquet(&pairs.join(format!("{split}.parquet"))).unwrap(),
                "pair_id",
            )
            .unwrap(),
        );
    }
    assert_eq!(pair_ids.len(), train_qids.len());
    assert!(pair_ids.iter().all(|q| train_qids.contains(q)));

    // The held-out XQuAD-R: the other 24 articles, in every language read.
    let heldout = output(&s, "xquad_r_heldout", "data", "human-arm-24");
    let heldout_qids = strings(
        &read_parquet(&heldout.join("questions.parquet")).unwrap(),
        "qid",
    )
    .unwrap();
    assert_eq!(heldout_qids.len(), 3 * (qids.len() - train_qids.len()));
    assert!(heldout_qids.iter().all(|q| !train_qids.contains(q)));
    let heldout_titles = strings(
        &read_parquet(&heldout.join("articles.parquet")).unwrap(),
        "title",
    )
    .unwrap();
    assert_eq!(heldout_titles.len(), 24);
    assert!(heldout_titles.iter().all(|t| !first_half.contains(t)));

    // Human translations, ids aligned: every pair in de and zh too.
    let translated = output(&s, "translate_h", "pairs", "human-arm-24");
    let de = questions_in(&translated, "de");
    let zh = questions_in(&translated, "zh");
    assert_eq!((de.len(), zh.len()), (pair_ids.len(), pair_ids.len()));
    assert!(de
        .iter()
        .any(|q| q.starts_with("Wie") || q.starts_with("Wer") || q.starts_with("Was")));

    // A split that overlaps: 6 articles are on both sides. The article
    // guard drops them (and, XQuAD-R's paragraphs being XQuAD's, so does
    // the paragraph guard alone).
    s.write("leaky.toml", &pipeline(30));
    run(&s, "leaky.toml", "pairs_h");
    run(&s, "leaky.toml", "pairs_paragraphs_only");
    let leaky = meta(&output(&s, "pairs_h", "pairs", "human-arm-30"));
    assert_eq!(leaky["counts"]["excluded_articles"], 6, "{leaky}");
    assert_eq!(leaky["counts"]["excluded_paragraphs"], 30, "{leaky}");
    assert_eq!(
        leaky["kept"].as_u64().unwrap() as usize,
        train_qids.len(),
        "{leaky}"
    );
    let by_paragraph = meta(&output(
        &s,
        "pairs_paragraphs_only",
        "pairs",
        "human-arm-30",
    ));
    assert_eq!(
        by_paragraph["counts"]["excluded_articles"], 0,
        "{by_paragraph}"
    );
    assert_eq!(
        by_paragraph["counts"]["excluded_paragraphs"], 30,
        "{by_paragraph}"
    );
}
