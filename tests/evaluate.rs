//! `evaluate_lareqa` on hand-made embeddings with hand-computed results.

mod common;

use std::path::PathBuf;

use common::{embeddings, qrels, Scratch};
use serde_json::Value;
use xlpipe_eval::results::{Results, ALL, ANY, BIAS};
use xlpipe_ml::rng::SplitMix64;
use xlpipe_stage_api::table::{read_parquet, string_column, strings, write_parquet};

/// Two questions in English and German over four candidates, with
/// `extra` stages added to the pipeline after `eval`.
fn hand_made_evaluation(s: &Scratch, extra: &str) {
    // Queries: the same two questions in English and German.
    embeddings(
        s,
        "q",
        &[
            ("q1", "en", [1.0, 0.0]),
            ("q2", "en", [0.0, 1.0]),
            ("q1", "de", [1.0, 0.0]),
            ("q2", "de", [0.0, 1.0]),
        ],
    );
    // English answers sit on the queries; German ones are tilted towards the wrong question.
    embeddings(
        s,
        "c",
        &[
            ("en:a", "en", [1.0, 0.0]),
            ("en:b", "en", [0.0, 1.0]),
            ("de:a", "de", [0.6, 0.8]),
            ("de:b", "de", [0.8, 0.6]),
        ],
    );
    std::fs::create_dir_all(s.path("d")).unwrap();
    write_parquet(
        &s.path("d/qrels.parquet"),
        vec![
            string_column("qid", ["q1", "q2", "q1", "q2"].map(String::from).to_vec()),
            string_column("lang", ["en", "en", "de", "de"].map(String::from).to_vec()),
            string_column(
                "cid",
                ["en:a", "en:b", "de:a", "de:b"].map(String::from).to_vec(),
            ),
        ],
    )
    .unwrap();
    s.write(
        "p.toml",
        &(r#"
[stages.d]
kind = "import"
path = "d"
[stages.q]
kind = "import"
path = "q"
[stages.c]
kind = "import"
path = "c"
[stages.eval]
kind = "evaluate_lareqa"
inputs.data = "d"
inputs.questions = "q"
inputs.candidates = "c"
"#
        .to_string()
            + extra),
    );
    s.ok(&["run", "p.toml"]);
}

#[test]
fn mono_cross_multi_and_bias_by_hand() {
    let s = Scratch::new();
    hand_made_evaluation(&s, "");
    let dir = results_dir(&s);
    let summary: Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    let close = |v: &Value, x: f64| (v.as_f64().unwrap() - x).abs() < 1e-9;
    // Mono: English perfect, German answers at rank 2 -> (1 + 0.5) / 2.
    assert!(close(&summary["mono"]["map"], 0.75), "{summary}");
    // Cross: en->de like German mono (0.5), de->en perfect (1).
    assert!(close(&summary["cross"]["map"], 0.75), "{summary}");
    assert!(close(&summary["cross"]["recall_1"], 0.5), "{summary}");
    // Multi: relevant at ranks 1 and 3 for every query: AP = (1 + 2/3) / 2.
    assert!(
        close(&summary["multi"]["map"], (1.0 + 2.0 / 3.0) / 2.0),
        "{summary}"
    );
    // Max-min rank distance 3 - 1 = 2 for every query.
    assert!(close(&summary["max_min_rank_distance"], 2.0), "{summary}");
    // The top 10 is capped at the pool (4 candidates): half of it English.
    assert!(
        close(&summary["top_10_language_share"]["en"], 0.5),
        "{summary}"
    );
    // The results format, what `report` reads, holds the same numbers.
    let results = Results::read(&dir).unwrap();
    let value = |setting: &str, langs: (&str, &str), metric: &str| {
        let row = results.rows.iter().find(|r| {
            (
                r.setting.as_str(),
                r.query_lang.as_str(),
                r.candidate_lang.as_str(),
                r.metric.as_str(),
            ) == (setting, langs.0, langs.1, metric)
        });
        row.map(|r| (r.value, r.n))
            .unwrap_or_else(|| panic!("no {setting} {langs:?} {metric} in {:?}", results.rows))
    };
    // n: the queries behind a value (each of the 4 query rows once in a
    // macro average, 2 per language).
    let near = |got: (f64, usize), want: (f64, usize)| {
        assert!(
            (got.0 - want.0).abs() < 1e-9 && got.1 == want.1,
            "{got:?} vs {want:?}"
        )
    };
    near(value("mono", (ALL, ALL), "map"), (0.75, 4));
    near(value("mono", ("de", "de"), "map"), (0.5, 2));
    near(value("cross", ("de", "en"), "map"), (1.0, 2));
    near(value("cross", (ALL, ALL), "recall_1"), (0.5, 4));
    near(value("multi", (ALL, ALL), BIAS), (2.0, 4));
    near(value("multi", ("en", ANY), BIAS), (2.0, 2));
    // Per query: the mean over its pools (q1 in English and German mono).
    let mono = &results.queries[&("mono".to_string(), "map".to_string())];
    assert_eq!(mono.len(), 2, "{mono:?}");
    assert!((mono["q1"] - 0.75).abs() < 1e-9, "{mono:?}");
    let bias = &results.queries[&("multi".to_string(), BIAS.to_string())];
    assert!((bias["q2"] - 2.0).abs() < 1e-9, "{bias:?}");
    assert_eq!(
        results.dataset, "",
        "no `dataset` param: the report names it"
    );
}

fn results_dir(s: &Scratch) -> PathBuf {
    output_dir(s, "eval", "results")
}

fn output_dir(s: &Scratch, stage: &str, output: &str) -> PathBuf {
    let shown = s.ok(&["show", stage]).stdout;
    let prefix = format!("output   {output}  ");
    s.path(
        shown
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .unwrap(),
    )
}

/// `export_mteb` writes MTEB `TaskResult` JSON that mteb itself loads
/// (live where a python with `mteb` is found: XLPIPE_MTEB_PYTHON, else
/// python3), with the numbers of the results format; where mteb is not
/// installed (it needs torch: not in CI), the file is checked against what
/// mteb 2.26's `TaskResult.from_disk` requires, read from its source.
#[test]
fn mteb_loads_the_exported_results() {
    let s = Scratch::new();
    hand_made_evaluation(
        &s,
        r#"
[stages.mteb]
kind = "export_mteb"
inputs.evaluations = "eval"
model = "org/tiny"
tasks = { eval = "HandMadeLAReQA" }
"#,
    );
    let results = Results::read(&results_dir(&s)).unwrap();
    let out = output_dir(&s, "mteb", "mteb");
    let file = out.join("results/org__tiny/no_revision_available/HandMadeLAReQA.json");
    let json: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();

    // What TaskResult requires (mteb/results/task_result.py, 2.26.24).
    assert!(json["dataset_revision"].is_string() && json["task_name"] == "HandMadeLAReQA");
    assert!(json["mteb_version"].is_null() && json["evaluation_time"].is_null());
    let scores = json["scores"]["test"].as_array().expect("scores per split");
    for score in scores {
        assert!(score["main_score"].is_number(), "{score}");
        assert!(score["hf_subset"].is_string(), "{score}");
        assert!(score["languages"].is_array(), "{score}");
    }
    let subset = |name: &str| {
        scores
            .iter()
            .find(|s| s["hf_subset"] == name)
            .unwrap_or_else(|| panic!("no subset {name} in {json}"))
    };
    let value = |setting: &str, q: &str, c: &str, metric: &str| {
        results
            .rows
            .iter()
            .find(|r| {
                (
                    r.setting.as_str(),
                    r.query_lang.as_str(),
                    r.candidate_lang.as_str(),
                    r.metric.as_str(),
                ) == (setting, q, c, metric)
            })
            .unwrap()
            .value
    };
    assert_eq!(subset("mono")["main_score"], value("mono", ALL, ALL, "map"));
    assert_eq!(
        subset("cross-de-en")["ndcg_at_10"],
        value("cross", "de", "en", "ndcg_10")
    );
    assert_eq!(
        subset("multi")["language_bias"],
        value("multi", ALL, ALL, BIAS)
    );
    assert_eq!(
        subset("mono")["languages"],
        serde_json::json!(["deu-Latn", "eng-Latn"])
    );

    let python = std::env::var("XLPIPE_MTEB_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_mteb = std::process::Command::new(&python)
        .args(["-c", "import mteb"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_mteb {
        eprintln!(
            "SKIPPED the live mteb load (no python with mteb; set XLPIPE_MTEB_PYTHON): \
             checked against TaskResult's requirements only"
        );
        return;
    }
    let loaded = std::process::Command::new(&python)
        .arg("-c")
        .arg(
            "import json, sys, mteb\n\
             from mteb.results import TaskResult\n\
             r = mteb.ResultCache(cache_path=sys.argv[1]).load_results(\n\
                 require_model_meta=False, include_remote=False)\n\
             models = [(m.model_name, m.model_revision) for m in r.model_results]\n\
             tr = r.model_results[0].task_results[0]\n\
             one = TaskResult.from_disk(__import__('pathlib').Path(sys.argv[2]))\n\
             print(json.dumps({'models': models, 'task': tr.task_name,\n\
                 'mteb': mteb.__version__,\n\
                 'main': {s['hf_subset']: s['main_score'] for s in one.scores['test']}}))",
        )
        .arg(&out)
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        loaded.status.success(),
        "mteb could not load the export: {}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    let read: Value = serde_json::from_slice(&loaded.stdout).unwrap();
    eprintln!("mteb read: {read}");
    assert_eq!(
        read["models"],
        serde_json::json!([["org/tiny", "no_revision_available"]])
    );
    assert_eq!(read["task"], "HandMadeLAReQA");
    let main = &read["main"];
    assert_eq!(main["mono"], value("mono", ALL, ALL, "map"));
    assert_eq!(main["multi-de"], value("multi", "de", ANY, "map"));
    assert_eq!(main.as_object().unwrap().len(), scores.len());
}

#[test]
fn trec_files_give_pytrec_eval_the_same_metrics() {
    // Three languages, vectors on a coarse grid so scores tie often.
    let s = Scratch::new();
    let langs = ["de", "en", "fr"];
    let mut rng = SplitMix64(7);
    let mut grid = || -> [f32; 3] { [0, 1, 2].map(|_| (rng.next_u64() % 3) as f32 - 1.0) };
    let (mut questions, mut candidates, mut judged) = (vec![], vec![], vec![]);
    for lang in langs {
        for q in 0..12 {
            questions.push((format!("q{q}"), lang.to_string(), grid()));
            candidates.push((format!("{lang}:a{q}"), lang.to_string(), grid()));
            judged.push((format!("q{q}"), lang.to_string(), format!("{lang}:a{q}")));
        }
        for d in 0..6 {
            candidates.push((format!("{lang}:x{d}"), lang.to_string(), grid()));
        }
    }
    embeddings(&s, "q", &questions);
    embeddings(&s, "c", &candidates);
    qrels(&s, &judged);
    s.write(
        "p.toml",
        r#"
[stages.d]
kind = "import"
path = "d"
[stages.q]
kind = "import"
path = "q"
[stages.c]
kind = "import"
path = "c"
[stages.eval]
kind = "evaluate_lareqa"
inputs.data = "d"
inputs.questions = "q"
inputs.candidates = "c"
trec_depth = 0
"#,
    );
    s.ok(&["run", "p.toml"]);
    let dir = results_dir(&s);
    let per_query = read_parquet(&dir.join("per_query.parquet")).unwrap();
    let column = |name: &str| -> Vec<f64> {
        per_query
            .column(name)
            .unwrap()
            .f64()
            .unwrap()
            .into_no_null_iter()
            .collect()
    };
    let names: Vec<String> = ["setting", "query_lang", "candidate_lang", "qid"]
        .map(|c| strings(&per_query, c).unwrap())
        .iter()
        .fold(vec![String::new(); per_query.height()], |acc, col| {
            acc.into_iter()
                .zip(col)
                .map(|(a, v)| {
                    if a.is_empty() {
                        v.clone()
                    } else {
                        format!("{a}/{v}")
                    }
                })
                .collect()
        });
    // mono: 3 languages x 12, cross: 6 ordered pairs x 12, multi: 36.
    assert_eq!(per_query.height(), 36 + 72 + 36);
    let metrics = [
        ("map", column("map")),
        ("recip_rank", column("mrr")),
        ("ndcg_cut_10", column("ndcg_10")),
        ("recall_1", column("recall_1")),
        ("recall_10", column("recall_10")),
    ];
    let mut compared = 0;
    for setting in ["mono", "cross", "multi"] {
        let reference = common::pytrec_eval(
            &dir.join(format!("trec/{setting}.qrels")),
            &dir.join(format!("trec/{setting}.run")),
        );
        for (row, name) in names.iter().enumerate() {
            let Some(trec_name) = name.strip_prefix(&format!("{setting}/")) else {
                continue;
            };
            for (measure, ours) in &metrics {
                let expected = reference[trec_name][*measure];
                assert!(
                    (ours[row] - expected).abs() <= 1e-6,
                    "{name} {measure}: ours {}, pytrec_eval {expected}",
                    ours[row]
                );
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 5 * per_query.height());
}

#[test]
fn bitext_accuracy_and_map_by_hand() {
    let s = Scratch::new();
    // Two sets; in set `a` the German line 2 sits closer to English line 1.
    embeddings(
        &s,
        "e",
        &[
            ("a:1", "en", [1.0, 0.0]),
            ("a:2", "en", [0.0, 1.0]),
            ("a:1", "de", [1.0, 0.0]),
            ("a:2", "de", [0.9, 0.1]),
            ("b:1", "en", [1.0, 0.0]),
            ("b:1", "fr", [0.0, 1.0]),
            ("b:1", "de", [1.0, 0.0]),
        ],
    );
    s.write(
        "p.toml",
        r#"
[stages.e]
kind = "import"
path = "e"
[stages.eval]
kind = "evaluate_bitext"
inputs.sentences = "e"
"#,
    );
    s.ok(&["run", "p.toml"]);
    let dir = results_dir(&s);
    let summary: Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    // Directions with English: a en->de, a de->en, b en->fr, b fr->en, b en->de, b de->en.
    // a en->de: line 1 finds de:1 first (1.0 vs 0.9), line 2 finds de:2 first (0.1 vs 0) -> 1.
    // a de->en: de line 2 [0.9, 0.1] prefers en line 1 -> rank 2; accuracy 0.5, map 0.75.
    // set b has one line per language: every direction is perfect.
    assert_eq!(summary["all"]["directions"], 6, "{summary}");
    let close = |v: &Value, x: f64| (v.as_f64().unwrap() - x).abs() < 1e-9;
    assert!(close(&summary["all"]["accuracy_1"], 5.5 / 6.0), "{summary}");
    assert!(
        close(&summary["into_pivot"]["map"], (0.75 + 1.0 + 1.0) / 3.0),
        "{summary}"
    );
    assert!(
        close(&summary["from_pivot"]["accuracy_1"], 1.0),
        "{summary}"
    );
    let run = std::fs::read_to_string(dir.join("trec/bitext.run")).unwrap();
    assert!(run.contains("a/de/en/2 Q0 en:a:1 1 "), "{run}");
    let qrels = std::fs::read_to_string(dir.join("trec/bitext.qrels")).unwrap();
    assert!(qrels.contains("a/de/en/2 0 en:a:2 1"), "{qrels}");
    // The results format: de->en is in both sets, so each set names its own.
    let results = Results::read(&dir).unwrap();
    let value = |langs: (&str, &str), metric: &str| {
        results
            .rows
            .iter()
            .find(|r| {
                (
                    r.query_lang.as_str(),
                    r.candidate_lang.as_str(),
                    r.metric.as_str(),
                ) == (langs.0, langs.1, metric)
            })
            .map(|r| r.value)
            .unwrap_or_else(|| panic!("no {langs:?} {metric} in {:?}", results.rows))
    };
    assert!((value((ALL, ALL), "accuracy_1") - 5.5 / 6.0).abs() < 1e-9);
    assert!((value(("a:de", "en"), "map") - 0.75).abs() < 1e-9);
    assert!((value(("b:de", "en"), "map") - 1.0).abs() < 1e-9);
    assert!((value(("fr", "en"), "map") - 1.0).abs() < 1e-9);
    // a:2 was a query in en->de (rank 1) and de->en (rank 2).
    let map = &results.queries[&("bitext".to_string(), "map".to_string())];
    assert!((map["a:2"] - 0.75).abs() < 1e-9, "{map:?}");
}

#[test]
fn answer_retrieval_turns_qa_into_a_lareqa_layout() {
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("qa")).unwrap();
    let text = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    write_parquet(
        &s.path("qa/qa.parquet"),
        vec![
            string_column("lang", text(&["de", "de", "de"])),
            string_column("qid", text(&["x1", "x2", "x3"])),
            string_column("question", text(&["Wer?", "Wo?", "Wann?"])),
            string_column("context_id", text(&["p1", "p1", "p2"])),
            string_column(
                "context",
                text(&[
                    "Anna kam. Sie blieb in Berlin.",
                    "Anna kam. Sie blieb in Berlin.",
                    "Es war 1990.",
                ]),
            ),
            xlpipe_stage_api::table::int_column("sentence_index", vec![0, 1, 0]),
        ],
    )
    .unwrap();
    s.write(
        "p.toml",
        r#"
[stages.qa]
kind = "import"
path = "qa"
[stages.sentences]
kind = "answer_retrieval"
inputs.data = ["qa"]
[stages.paragraphs]
kind = "answer_retrieval"
inputs.data = ["qa"]
unit = "paragraph"
max_questions = 2
[stages.one_paragraph]
kind = "answer_retrieval"
inputs.data = ["qa"]
max_paragraphs = 1
"#,
    );
    s.ok(&["run", "p.toml"]);
    let output = |stage: &str| -> PathBuf {
        let shown = s.ok(&["show", stage]).stdout;
        s.path(
            shown
                .lines()
                .find_map(|l| l.trim().strip_prefix("output   data  "))
                .unwrap(),
        )
    };
    let sentences = output("sentences");
    let cids = strings(
        &read_parquet(&sentences.join("candidates.parquet")).unwrap(),
        "cid",
    )
    .unwrap();
    assert_eq!(cids, ["de:p1:0", "de:p1:1", "de:p2:0"]);
    let qrels = read_parquet(&sentences.join("qrels.parquet")).unwrap();
    assert_eq!(
        strings(&qrels, "cid").unwrap(),
        ["de:p1:0", "de:p1:1", "de:p2:0"]
    );
    let paragraphs = output("paragraphs");
    let candidates = read_parquet(&paragraphs.join("candidates.parquet")).unwrap();
    assert_eq!(strings(&candidates, "cid").unwrap(), ["de:p1", "de:p2"]);
    let questions = read_parquet(&paragraphs.join("questions.parquet")).unwrap();
    assert_eq!(questions.height(), 2);
    // One paragraph: its sentences, and only its questions.
    let one = output("one_paragraph");
    let candidates = read_parquet(&one.join("candidates.parquet")).unwrap();
    let questions = read_parquet(&one.join("questions.parquet")).unwrap();
    let cids = strings(&candidates, "cid").unwrap();
    let expected_questions = if cids[0].starts_with("de:p1") { 2 } else { 1 };
    assert!(cids.iter().all(|c| c[..5] == cids[0][..5]), "{cids:?}");
    assert_eq!(questions.height(), expected_questions);
}

#[test]
fn adhoc_metrics_match_pytrec_eval_on_its_trec_files() {
    let s = Scratch::new();
    let mut rng = SplitMix64(9);
    let mut grid = || -> [f32; 3] { [0, 1, 2].map(|_| (rng.next_u64() % 5) as f32 - 2.0) };
    let queries: Vec<(String, String, [f32; 3])> = (0..12)
        .map(|q| {
            (
                format!("q{q}"),
                if q < 6 { "de" } else { "sw" }.to_string(),
                grid(),
            )
        })
        .collect();
    let corpus: Vec<(String, String, [f32; 3])> = (0..160)
        .map(|d| (format!("doc{d}"), String::new(), grid()))
        .collect();
    embeddings(&s, "queries", &queries);
    embeddings(&s, "corpus", &corpus);
    let (mut qids, mut docids, mut grades) = (vec![], vec![], vec![]);
    for q in 0..12 {
        for d in 0..160 {
            if rng.next_u64().is_multiple_of(12) {
                qids.push(format!("q{q}"));
                docids.push(format!("doc{d}"));
                grades.push((rng.next_u64() % 3) as i64);
            }
        }
    }
    std::fs::create_dir_all(s.path("d")).unwrap();
    write_parquet(
        &s.path("d/qrels.parquet"),
        vec![
            string_column("qid", qids),
            string_column("docid", docids),
            xlpipe_stage_api::table::int_column("relevance", grades),
        ],
    )
    .unwrap();
    s.write(
        "p.toml",
        r#"
[stages.d]
kind = "import"
path = "d"
[stages.queries]
kind = "import"
path = "queries"
[stages.corpus]
kind = "import"
path = "corpus"
[stages.eval]
kind = "evaluate_adhoc"
inputs.data = "d"
inputs.queries = "queries"
inputs.corpus = "corpus"
"#,
    );
    s.ok(&["run", "p.toml"]);
    let dir = results_dir(&s);
    let reference = common::pytrec_eval(&dir.join("trec/adhoc.qrels"), &dir.join("trec/adhoc.run"));
    let per_query = read_parquet(&dir.join("per_query.parquet")).unwrap();
    let qids = strings(&per_query, "qid").unwrap();
    assert!(qids.len() >= 10, "{qids:?}");
    for (ours, theirs) in [
        ("ndcg_10", "ndcg_cut_10"),
        ("recall_100", "recall_100"),
        ("map_100", "map"),
        ("mrr_100", "recip_rank"),
    ] {
        let column = per_query.column(ours).unwrap().f64().unwrap();
        for (row, qid) in qids.iter().enumerate() {
            let (a, b) = (column.get(row).unwrap(), reference[qid][theirs]);
            assert!((a - b).abs() <= 1e-6, "{qid} {ours}: {a} vs {b}");
        }
    }
    let run = std::fs::read_to_string(dir.join("trec/adhoc.run")).unwrap();
    assert_eq!(run.lines().count(), qids.len() * 100);
    // The results format: per query, what the report's bootstrap resamples,
    // against pytrec_eval; per language and macro, the means of those.
    let results = Results::read(&dir).unwrap();
    for (ours, theirs) in [("ndcg_10", "ndcg_cut_10"), ("recall_100", "recall_100")] {
        let values = &results.queries[&("adhoc".to_string(), ours.to_string())];
        assert_eq!(values.len(), qids.len());
        for (qid, v) in values {
            let reference = reference[qid][theirs];
            assert!(
                (v - reference).abs() <= 1e-6,
                "{qid} {ours}: {v} vs {reference}"
            );
        }
        let langs: Vec<f64> = ["de", "sw"]
            .iter()
            .map(|lang| {
                let row = results
                    .rows
                    .iter()
                    .find(|r| r.query_lang == *lang && r.metric == ours);
                row.unwrap().value
            })
            .collect();
        let all = results
            .rows
            .iter()
            .find(|r| r.query_lang == ALL && r.metric == ours);
        assert!((all.unwrap().value - (langs[0] + langs[1]) / 2.0).abs() < 1e-12);
    }
}

/// `model_card` writes the model folder again with its evaluations in the
/// card: a `model-index` that huggingface_hub's own `ModelCard` reads back
/// with the numbers of the results format, and the other files unchanged.
#[test]
fn a_model_card_carries_the_evaluations() {
    let s = Scratch::new();
    s.write(
        "m/README.md",
        "---\nlibrary_name: sentence-transformers\nlanguage:\n- de\n---\n\n# tiny[alpha=0.5]\n\nA model.\n",
    );
    s.write("m/model.safetensors", "weights");
    s.write("m/1_Pooling/config.json", "{}");
    hand_made_evaluation(
        &s,
        r#"
[stages.m]
kind = "import"
path = "m"

[stages.card]
kind = "model_card"
inputs.model = "m"
inputs.evaluations = "eval"
"#,
    );
    let results = Results::read(&results_dir(&s)).unwrap();
    let mono_map = results
        .rows
        .iter()
        .find(|r| r.setting == "mono" && r.query_lang == ALL && r.metric == "map")
        .unwrap()
        .value;
    let out = output_dir(&s, "card", "model");
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        b"weights"
    );
    assert_eq!(
        std::fs::read(out.join("1_Pooling/config.json")).unwrap(),
        b"{}"
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("| eval | mono | map | 0.7500 |"), "{card}");

    let read = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import json, sys\n\
             from huggingface_hub import ModelCard\n\
             card = ModelCard.load(sys.argv[1])\n\
             print(json.dumps({'name': card.data.model_name, 'language': card.data.language,\n\
                 'results': {r.metric_type: r.metric_value for r in card.data.eval_results}}))",
        )
        .arg(out.join("README.md"))
        .output()
        .unwrap();
    if !read.status.success() {
        let err = String::from_utf8_lossy(&read.stderr);
        assert!(
            err.contains("No module named 'huggingface_hub'"),
            "huggingface_hub could not read the card: {err}"
        );
        eprintln!(
            "SKIPPED the huggingface_hub read-back (not installed; scripts/test.sh installs it)"
        );
        return;
    }
    let read: Value = serde_json::from_slice(&read.stdout).unwrap();
    eprintln!("huggingface_hub read: {read}");
    assert_eq!(read["name"], "tiny[alpha=0.5]");
    assert_eq!(read["language"], serde_json::json!(["de"]));
    assert_eq!(read["results"]["mono_map"], mono_map);
    assert_eq!(
        read["results"]["multi_bias"],
        results
            .rows
            .iter()
            .find(|r| r.setting == "multi" && r.query_lang == ALL && r.metric == BIAS)
            .unwrap()
            .value
    );
}
