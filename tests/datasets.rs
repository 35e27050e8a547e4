//! The dataset readers on the real data of the shared mirror, through the
//! shipped `pipelines/datasets.toml`, and on broken inputs.

mod common;

use std::path::PathBuf;

use common::Scratch;
use serde_json::Value;
use xlpipe_stage_api::table::{read_parquet, strings};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn mirror() -> String {
    repo("../shared/mirror").display().to_string()
}

/// The `data` folder a reader stage wrote.
fn data_dir(s: &Scratch, stage: &str, pipeline: &str) -> PathBuf {
    let shown = s.ok(&["show", stage, "--pipeline", pipeline]).stdout;
    let path = shown
        .lines()
        .find_map(|l| l.trim().strip_prefix("output   data  "))
        .unwrap_or_else(|| panic!("no data output for {stage}:\n{shown}"));
    s.path(path)
}

fn meta(s: &Scratch, stage: &str) -> Value {
    meta_at(&data_dir(s, stage, "datasets"))
}

fn meta_at(dir: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap()
}

fn count(meta: &Value, key: &str) -> u64 {
    meta["counts"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no count {key} in {meta}"))
}

#[test]
fn every_mirrored_dataset_reads_with_its_real_counts() {
    let s = Scratch::shared();
    let file = repo("pipelines/datasets.toml").display().to_string();
    s.ok(&["run", &file, "--offline", "--mirror", &mirror()]);

    let xquad = meta(&s, "xquad_r");
    for lang in [
        "ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh",
    ] {
        assert_eq!(count(&xquad, &format!("questions.{lang}")), 1190, "{lang}");
    }
    assert_eq!(count(&xquad, "candidates.en"), 1180);
    assert_eq!(xquad["skipped"], 0);
    // Every question has its answer sentence in all 11 languages.
    let qrels = read_parquet(&data_dir(&s, "xquad_r", "datasets").join("qrels.parquet")).unwrap();
    assert_eq!(qrels.height(), 1190 * 11);

    let mlqa = meta(&s, "mlqa_r");
    assert_eq!(count(&mlqa, "questions.en"), 1148);
    assert_eq!(count(&mlqa, "candidates.en"), 6264);

    assert_eq!(count(&meta(&s, "ntrex"), "lines.ntrex"), 1997);
    assert_eq!(count(&meta(&s, "flores"), "lines.flores"), 1012);
    let sentences =
        read_parquet(&data_dir(&s, "ntrex", "datasets").join("sentences.parquet")).unwrap();
    assert_eq!(sentences.height(), 1997 * 11);
    let tatoeba = meta(&s, "tatoeba");
    for set in [
        "ara-eng", "cmn-eng", "deu-eng", "ell-eng", "hin-eng", "rus-eng", "spa-eng", "tur-eng",
        "vie-eng",
    ] {
        assert_eq!(count(&tatoeba, &format!("lines.{set}")), 1000, "{set}");
    }
    // Tatoeba v1 has only 548 Thai-English pairs.
    assert_eq!(count(&tatoeba, "lines.tha-eng"), 548);
    let tico = meta(&s, "tico19");
    for set in ["en-ar", "en-es", "en-hi", "en-ru", "en-zh"] {
        assert_eq!(count(&tico, &format!("lines.{set}")), 2100, "{set}");
    }

    let squad = meta(&s, "squad_dev");
    assert_eq!(squad["kept"], 10570);
    assert_eq!(squad["skipped"], 0);
    assert_eq!(meta(&s, "squad_it")["read"], 7609);
    assert_eq!(meta(&s, "squad_es")["read"], 6583);
    assert_eq!(meta(&s, "squadshifts_reddit")["kept"], 9803);
    let m2qa = meta(&s, "m2qa_de");
    assert_eq!(count(&m2qa, "questions.german.zip/german/news.json"), 900);
    assert_eq!(m2qa["read"], 4500);
    for (lang, records) in [("de", 3000), ("tr", 1500), ("zh", 3000)] {
        assert_eq!(
            meta(&s, &format!("m2qa_extra_{lang}"))["read"],
            records,
            "{lang}"
        );
    }

    for (lang, queries, qrels) in [
        ("ar", 2896, 29197),
        ("de", 305, 3144),
        ("en", 799, 8350),
        ("es", 648, 6443),
        ("hi", 350, 3494),
        ("ru", 1252, 13100),
        ("th", 733, 7573),
        ("zh", 393, 3928),
    ] {
        let miracl = meta(&s, &format!("miracl_{lang}"));
        assert_eq!(count(&miracl, "queries"), queries, "{lang}");
        assert_eq!(count(&miracl, "qrels"), qrels, "{lang}");
    }
    // XQuAD: the same 1190 questions in 12 languages.
    for lang in [
        "ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh",
    ] {
        assert_eq!(meta(&s, &format!("xquad_{lang}"))["read"], 1190, "{lang}");
    }
    assert_eq!(meta(&s, "xquad_en")["kept"], 1190);

    // The answer sentence really holds the answer.
    let qa = read_parquet(&data_dir(&s, "squad_dev", "datasets").join("qa.parquet")).unwrap();
    let answers = strings(&qa, "answer_text").unwrap();
    let sentences = strings(&qa, "sentence").unwrap();
    let inside = answers
        .iter()
        .zip(&sentences)
        .filter(|(a, s)| s.contains(a.as_str()))
        .count();
    assert!(
        inside as f64 > 0.97 * answers.len() as f64,
        "{inside} of {}",
        answers.len()
    );
}

fn import_and_read(s: &Scratch, file: &str, reader: &str) -> common::Ran {
    s.write(
        "p.toml",
        &format!(
            "[stages.input]\nkind = \"import\"\npath = \"in\"\n\n[stages.read]\ninputs.files = \"input\"\n{reader}"
        ),
    );
    assert!(s.path(&format!("in/{file}")).exists());
    s.xlpipe(&["run", "p.toml"])
}

#[test]
fn malformed_json_names_file_line_and_column() {
    let s = Scratch::new();
    s.write("in/bad.json", "{\"data\": [\n  {\"paragraphs\": [}\n]}\n");
    let ran = import_and_read(
        &s,
        "bad.json",
        "kind = \"squad\"\nfiles = [\"bad.json\"]\nlang = \"en\"\n",
    );
    assert_eq!(ran.code, 1, "{ran}");
    assert!(
        ran.stderr.contains("bad.json:2:19: malformed JSON"),
        "{ran}"
    );
}

#[test]
fn bad_records_are_skipped_and_counted_or_fail() {
    let s = Scratch::new();
    s.write(
        "in/qa.json",
        r#"{"data": [{"title": "t", "paragraphs": [{"context": "Alpha beta. Gamma delta.", "qas": [
            {"id": "ok", "question": "q1", "answers": [{"text": "Gamma", "answer_start": 12}]},
            {"id": "moved", "question": "q2", "answers": [{"text": "Gamma", "answer_start": 3}]},
            {"id": "noq", "answers": [{"text": "Alpha", "answer_start": 0}]}
        ]}]}]}"#,
    );
    let reader = "kind = \"squad\"\nfiles = [\"qa.json\"]\nlang = \"en\"\n";
    let ran = import_and_read(&s, "qa.json", reader);
    assert_eq!(ran.code, 0, "{ran}");
    let dir = data_dir(&s, "read", "p");
    let meta = meta_at(&dir);
    assert_eq!(
        (
            meta["read"].as_u64(),
            meta["kept"].as_u64(),
            meta["skipped"].as_u64()
        ),
        (Some(3), Some(1), Some(2))
    );
    assert_eq!(
        meta["problems"][0],
        "qa.json: record moved: answer not in context at answer_start (Gamma)"
    );
    let qa = read_parquet(&dir.join("qa.parquet")).unwrap();
    assert_eq!(strings(&qa, "sentence").unwrap(), vec!["Gamma delta."]);
    let ran = import_and_read(&s, "qa.json", &format!("{reader}on_error = \"fail\"\n"));
    assert_eq!(ran.code, 1, "{ran}");
    assert!(
        ran.stderr
            .contains("qa.json: record moved: answer not in context"),
        "{ran}"
    );
}

#[test]
fn misaligned_parallel_files() {
    let s = Scratch::new();
    s.write("in/a.en", "one\ntwo\nthree\n");
    s.write("in/a.de", "eins\nzwei\n");
    s.write("in/b.en", "one\n\nthree\n");
    s.write("in/b.de", "eins\nzwei\ndrei\n");
    let sets = "[stages.read.sets]\na = { en = \"a.en\", de = \"a.de\" }\nb = { en = \"b.en\", de = \"b.de\" }\n";
    let ran = import_and_read(
        &s,
        "a.en",
        &format!("kind = \"parallel\"\non_error = \"fail\"\n{sets}"),
    );
    assert_eq!(ran.code, 1, "{ran}");
    assert!(
        ran.stderr
            .contains("a: record (whole set): misaligned line counts (a.de: 2, a.en: 3)"),
        "{ran}"
    );
    let ran = import_and_read(&s, "a.en", &format!("kind = \"parallel\"\n{sets}"));
    assert_eq!(ran.code, 0, "{ran}");
    let meta = meta_at(&data_dir(&s, "read", "p"));
    assert_eq!(meta["counts"]["lines.b"], 2);
    assert_eq!(meta["skipped_by_reason"]["misaligned line counts"], 1);
    assert_eq!(meta["skipped_by_reason"]["empty line"], 1);
}

#[test]
fn wrong_zip_password() {
    let s = Scratch::new();
    let zip = repo("../shared/mirror/raw.githubusercontent.com/UKPLab/m2qa/b58dd76a8db8e363a1277beb565831ed7a4e9f61/m2qa_dataset/german.zip");
    std::fs::create_dir_all(s.path("in")).unwrap();
    std::fs::copy(zip, s.path("in/german.zip")).unwrap();
    let ran = import_and_read(
        &s,
        "german.zip",
        "kind = \"squad\"\nfiles = [\"german.zip\"]\nlang = \"de\"\npassword = \"not-it\"\n",
    );
    assert_eq!(ran.code, 1, "{ran}");
    assert!(
        ran.stderr.contains("german.zip: wrong zip password")
            || ran.stderr.contains("is the password right?"),
        "{ran}"
    );
    let ran = import_and_read(
        &s,
        "german.zip",
        "kind = \"squad\"\nfiles = [\"german.zip\"]\nlang = \"de\"\n",
    );
    assert!(ran.stderr.contains("is encrypted; set `password`"), "{ran}");
}

#[test]
fn miracl_corpus_and_invalid_utf8_lines() {
    let s = Scratch::new();
    s.write("in/topics.tsv", "q1\tWer ist da?\nq2\tWas ist das?\n");
    s.write("in/qrels.tsv", "q1 Q0 d1 1\nq1 Q0 d2 0\nq2\tQ0\td2\t1\n");
    s.write(
        "in/corpus.jsonl",
        "{\"docid\": \"d1\", \"title\": \"T\", \"text\": \"Ich bin da.\"}\n{\"title\": \"no id\"}\n{\"docid\": \"d2\", \"text\": \"Das ist es.\"}\n",
    );
    let ran = import_and_read(
        &s,
        "corpus.jsonl",
        "kind = \"miracl\"\nlang = \"de\"\ntopics = \"topics.tsv\"\nqrels = \"qrels.tsv\"\ncorpus = \"corpus.jsonl\"\n",
    );
    assert_eq!(ran.code, 0, "{ran}");
    let dir = data_dir(&s, "read", "p");
    let corpus = read_parquet(&dir.join("corpus.parquet")).unwrap();
    assert_eq!(strings(&corpus, "docid").unwrap(), vec!["d1", "d2"]);
    let meta = meta_at(&dir);
    assert_eq!(
        (
            meta["counts"]["queries"].as_u64(),
            meta["counts"]["qrels"].as_u64()
        ),
        (Some(2), Some(3))
    );
    assert_eq!(meta["skipped"], 1);

    // A line that is not UTF-8 is left out of every language of its set.
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("in")).unwrap();
    std::fs::write(s.path("in/x.en"), b"one\ntwo\nthree\n").unwrap();
    std::fs::write(s.path("in/x.de"), b"eins\nzw\xffei\ndrei\n").unwrap();
    let ran = import_and_read(
        &s,
        "x.en",
        "kind = \"parallel\"\n[stages.read.sets]\nx = { en = \"x.en\", de = \"x.de\" }\n",
    );
    assert_eq!(ran.code, 0, "{ran}");
    let dir = data_dir(&s, "read", "p");
    let sentences = read_parquet(&dir.join("sentences.parquet")).unwrap();
    assert_eq!(
        strings(&sentences, "text").unwrap(),
        vec!["eins", "one", "drei", "three"]
    );
}
