//! The burn M2M100 / NLLB model and its decoding against Hugging Face
//! transformers on the same weights: a tiny random model whose golden
//! outputs `tests/fixtures/make_m2m100_fixtures.py` wrote (logits to 1e-4,
//! generated tokens exactly, greedy and beam search).

mod common;

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::Tensor;
use common::{floats, max_abs_diff};
use serde_json::Value;
use xlpipe_ml::nmt::{generate, EarlyStopping, GenerationConfig, M2m100, NeuralTranslator};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-m2m100")
}

fn golden() -> Value {
    serde_json::from_slice(&std::fs::read(fixture().join("golden.json")).unwrap()).unwrap()
}

fn rows(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

/// A tensor's values as f32.
fn values<const D: usize>(tensor: Tensor<Flex, D>) -> Vec<f32> {
    tensor.into_data().convert::<f32>().into_vec().unwrap()
}

/// Sources without their right padding.
fn sources(golden: &Value) -> Vec<Vec<i64>> {
    let ids = rows(&golden["input_ids"]);
    let mask = rows(&golden["attention_mask"]);
    ids.iter()
        .zip(&mask)
        .map(|(row, m)| {
            row.iter()
                .zip(m)
                .filter(|(_, &m)| m == 1)
                .map(|(&t, _)| t)
                .collect()
        })
        .collect()
}

#[test]
fn encoder_states_and_logits_match_transformers() {
    let golden = golden();
    let model = M2m100::<Flex>::load(&fixture(), &Default::default()).unwrap();
    let encoded = model.encode(&sources(&golden));
    let hidden = values(encoded.hidden.clone());
    // Padded positions differ by design (transformers computes them too);
    // compare real tokens only.
    let mask = rows(&golden["attention_mask"]);
    let expected = floats(&golden["encoder_hidden"]);
    let d = model.config.d_model;
    let width = mask[0].len();
    let mut worst: f32 = 0.0;
    for (b, row) in mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                let at = (b * width + t) * d;
                worst = worst.max(max_abs_diff(&hidden[at..at + d], &expected[at..at + d]));
            }
        }
    }
    assert!(worst < 1e-4, "encoder states differ by {worst}");

    // Teacher-forced logits for the whole target at once, and one token at
    // a time through the cache: the same numbers.
    let targets = rows(&golden["decoder_input_ids"]);
    let expected = floats(&golden["logits"]);
    let mut cache = model.start_cache(&encoded);
    let logits = values(model.decode(&targets, &encoded, &mut cache, false));
    let worst = max_abs_diff(&logits, &expected);
    assert!(worst < 1e-4, "logits differ by {worst}");

    // Step by step (the first row has no pad inside its real prefix).
    let vocab = model.config.vocab_size;
    let mut cache = model.start_cache(&encoded);
    for t in 0..targets[1].len() {
        let step: Vec<Vec<i64>> = targets.iter().map(|r| vec![r[t]]).collect();
        let out = values(model.decode(&step, &encoded, &mut cache, true));
        // Row 1 has no padding: its incremental logits equal the full pass.
        let width = targets[1].len();
        let at = (width + t) * vocab;
        let worst = max_abs_diff(&out[vocab..2 * vocab], &expected[at..at + vocab]);
        assert!(worst < 1e-4, "step {t}: logits differ by {worst}");
    }
}

#[test]
fn greedy_and_beam_search_match_transformers_generate() {
    let golden = golden();
    let model = M2m100::<Flex>::load(&fixture(), &Default::default()).unwrap();
    let sources = sources(&golden);
    for run in golden["generate"].as_array().unwrap() {
        let early_stopping = match run.get("early_stopping") {
            Some(Value::Bool(true)) => EarlyStopping::WhenFull,
            Some(Value::String(s)) if s == "never" => EarlyStopping::Never,
            _ => EarlyStopping::Heuristic,
        };
        let config = GenerationConfig {
            beams: run["num_beams"].as_u64().unwrap() as usize,
            max_length: run["max_length"].as_u64().unwrap() as usize,
            length_penalty: run
                .get("length_penalty")
                .and_then(Value::as_f64)
                .unwrap_or(1.0) as f32,
            early_stopping,
        };
        let target = run["forced_bos"].as_i64().unwrap();
        let output = generate(&model, &sources, target, &config);
        assert_eq!(output, rows(&run["output"]), "{config:?}, target {target}");
    }
}

#[test]
fn texts_translate_as_transformers_batch_decode() {
    let golden = golden();
    for case in golden["translations"].as_array().unwrap() {
        let texts: Vec<String> = case["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        let config = GenerationConfig {
            beams: 2,
            max_length: 10,
            ..GenerationConfig::default()
        };
        let lang = case["lang"].as_str().unwrap();
        // Batches of 3 in length order: batching must not change a translation.
        let translator =
            NeuralTranslator::<Flex>::load(&fixture(), "en", lang, config, 3, &Default::default())
                .unwrap();
        let expected: Vec<String> = case["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            translator.translate_texts(&texts).unwrap(),
            expected,
            "{lang}"
        );
    }
    let err = NeuralTranslator::<Flex>::load(
        &fixture(),
        "en",
        "xx",
        GenerationConfig::default(),
        1,
        &Default::default(),
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("no language token for `xx`"),
        "{err}"
    );
}

/// A copy of the fixture whose embedding matrix is stored as `name`, the
/// way some hub conversions keep one of its tied copies instead.
fn fixture_with_embedding_named(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture().join(file), dir.path().join(file)).unwrap();
    }
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + length]).unwrap();
    let matrix = header.remove("model.shared.weight").unwrap();
    header.insert(name.to_string(), matrix);
    let mut header = serde_json::to_vec(&header).unwrap();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(&bytes[8 + length..]);
    std::fs::write(dir.path().join("model.safetensors"), out).unwrap();
    dir
}

#[test]
fn embedding_matrix_found_under_its_tied_names() {
    let golden = golden();
    let device = Default::default();
    let hidden = |model: &M2m100<Flex>| values(model.encode(&sources(&golden)).hidden);
    let reference = hidden(&M2m100::<Flex>::load(&fixture(), &device).unwrap());
    for name in [
        "model.encoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight",
        "lm_head.weight",
    ] {
        let dir = fixture_with_embedding_named(name);
        let model = M2m100::<Flex>::load(dir.path(), &device).unwrap();
        assert_eq!(hidden(&model), reference, "{name}");
    }
    let dir = fixture_with_embedding_named("model.unrelated.weight");
    let error = M2m100::<Flex>::load(dir.path(), &device)
        .expect_err("a checkpoint without its embedding matrix is refused")
        .to_string();
    assert!(
        error.contains("has no embedding matrix") && error.contains("model.shared.weight"),
        "{error}"
    );
}
