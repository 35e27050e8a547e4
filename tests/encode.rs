//! The encode stage end to end: the real multilingual-e5-small through the
//! pipeline gives transformers' embeddings, in table order.

mod common;

use std::path::Path;

use common::Scratch;
use serde_json::Value;
use xlpipe_stage_api::table::{read_parquet, string_column, strings, write_parquet};

fn golden() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/me5-small.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn encode_stage_matches_transformers_in_f32_and_f16() {
    let model = common::me5_small();
    let golden = golden();
    let texts: Vec<String> = golden["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let expected: Vec<f32> = golden["mean"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("texts")).unwrap();
    let ids: Vec<String> = (0..texts.len()).map(|i| format!("t{i}")).collect();
    write_parquet(
        &s.path("texts/texts.parquet"),
        vec![
            string_column("id", ids.clone()),
            string_column("lang", vec!["xx".to_string(); texts.len()]),
            string_column("text", texts.clone()),
        ],
    )
    .unwrap();
    for (dtype, bytes, tolerance) in [("f32", 4, 1e-4f32), ("f16", 2, 1e-3)] {
        s.write(
            "p.toml",
            &format!(
                r#"[stages.model]
kind = "import"
path = "{}"

[stages.texts]
kind = "import"
path = "texts"

[stages.encode]
kind = "encode"
inputs.model = "model"
inputs.texts = "texts"
table = "texts"
text = "text"
id = "id"
batch_size = 4
dtype = "{dtype}"
"#,
                model.display()
            ),
        );
        s.ok(&["run", "p.toml"]);
        let shown = s.ok(&["show", "encode"]).stdout;
        let dir = s.path(
            shown
                .lines()
                .find_map(|l| l.trim().strip_prefix("output   embeddings  "))
                .unwrap(),
        );
        assert_eq!(
            strings(&read_parquet(&dir.join("ids.parquet")).unwrap(), "id").unwrap(),
            ids
        );
        let raw = std::fs::read(dir.join("vectors.bin")).unwrap();
        assert_eq!(raw.len(), expected.len() * bytes);
        let values: Vec<f32> = if bytes == 4 {
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        } else {
            raw.chunks_exact(2)
                .map(|c| burn::tensor::f16::from_le_bytes(c.try_into().unwrap()).to_f32())
                .collect()
        };
        let diff = common::max_abs_diff(&values, &expected);
        eprintln!("encode {dtype}: max |diff| to transformers {diff:e}");
        assert!(diff <= tolerance, "{dtype}: embeddings differ by {diff}");
    }
}
