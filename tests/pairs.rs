//! Training pairs without leakage, and their translation by all three
//! backends with the translation memory, on the real mirror data.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;

use common::Scratch;
use serde_json::Value;
use xlpipe_stages::table::{read_parquet, strings};

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
    let config = xlpipe_stages::nmt::GenerationConfig {
        beams: 2,
        max_length: 10,
        ..Default::default()
    };
    let translator = xlpipe_stages::nmt::NeuralTranslator::<burn::backend::Flex>::load(
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
