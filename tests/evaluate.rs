//! `evaluate_lareqa` on hand-made embeddings with hand-computed results.

mod common;

use common::Scratch;
use serde_json::Value;
use xlpipe_stages::table::{string_column, write_parquet};

fn embeddings(s: &Scratch, dir: &str, rows: &[(&str, &str, [f32; 2])]) {
    std::fs::create_dir_all(s.path(dir)).unwrap();
    write_parquet(
        &s.path(&format!("{dir}/ids.parquet")),
        vec![
            string_column("id", rows.iter().map(|r| r.0.to_string()).collect()),
            string_column("lang", rows.iter().map(|r| r.1.to_string()).collect()),
        ],
    )
    .unwrap();
    let bytes: Vec<u8> = rows
        .iter()
        .flat_map(|r| r.2.iter().flat_map(|x| x.to_le_bytes()))
        .collect();
    std::fs::write(s.path(&format!("{dir}/vectors.bin")), bytes).unwrap();
    s.write(&format!("{dir}/meta.json"), r#"{"dim": 2, "dtype": "f32"}"#);
}

#[test]
fn mono_cross_multi_and_bias_by_hand() {
    let s = Scratch::new();
    // Queries: the same two questions in English and German.
    embeddings(
        &s,
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
        &s,
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
"#,
    );
    s.ok(&["run", "p.toml"]);
    let shown = s.ok(&["show", "eval"]).stdout;
    let dir = s.path(
        shown
            .lines()
            .find_map(|l| l.trim().strip_prefix("output   results  "))
            .unwrap(),
    );
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
}
