//! The burn encoder against Hugging Face transformers on the same weights:
//! tiny random models (golden outputs in tests/fixtures, made by
//! make_model_fixtures.py) and the real multilingual-e5-small.

mod common;

use std::path::{Path, PathBuf};

use burn::backend::Flex;

use common::{floats, int_tensor, ints, max_abs_diff};
use serde_json::Value;
use xlpipe_ml::model::{load_encoder, save_encoder, Pooling, TextTokenizer};

fn fixtures(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Worst |difference| from transformers' outputs of the tiny model in
/// `dir` (golden outputs from `golden_dir`): hidden states, then the
/// embeddings of each pooling.
fn tiny_diffs(dir: &Path, golden_dir: &Path) -> Vec<(String, f32)> {
    let golden = json(&golden_dir.join("golden.json"));
    let mut diffs = Vec::new();
    for (pooling, key) in [(Pooling::Mean, "mean"), (Pooling::Cls, "cls")] {
        let encoder = load_encoder::<Flex>(dir, pooling, &Default::default()).unwrap();
        let ids = int_tensor(&golden["input_ids"]);
        let mask = int_tensor(&golden["attention_mask"]);
        let hidden = encoder.hidden_states(ids.clone(), mask.clone());
        let hidden: Vec<f32> = hidden.into_data().to_vec().unwrap();
        diffs.push((
            "hidden states".into(),
            max_abs_diff(&hidden, &floats(&golden["hidden"])),
        ));
        let embedded: Vec<f32> = encoder.embed(ids, mask).into_data().to_vec().unwrap();
        diffs.push((
            format!("{key} embeddings"),
            max_abs_diff(&embedded, &floats(&golden[key])),
        ));
    }
    diffs
}

fn check_tiny(name: &str) {
    let dir = fixtures(name);
    for (what, diff) in tiny_diffs(&dir, &dir) {
        eprintln!("{name}: {what} max |diff| {diff:e}");
        assert!(diff <= 1e-4, "{name}: {what} differ by {diff}");
    }
}

/// The parity check itself must fail on a broken model: the tiny XLM-R
/// with one weight matrix set to NaN differs from transformers everywhere.
#[test]
fn nan_weights_fail_the_parity_check() {
    let fixture = fixtures("tiny-xlmr");
    let broken = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), broken.path().join(entry.file_name())).unwrap();
    }
    let weights = broken.path().join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let (name, tensor) = header
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, v)| k.contains("layer.0.attention.self.query.weight") && v["dtype"] == "F32")
        .expect("the first layer's query weight");
    let offsets: Vec<usize> = tensor["data_offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect();
    let data = 8 + header_len;
    for value in bytes[data + offsets[0]..data + offsets[1]].chunks_exact_mut(4) {
        value.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&weights, bytes).unwrap();
    for (what, diff) in tiny_diffs(broken.path(), &fixture) {
        assert!(
            diff > 1e-4 || diff.is_nan(),
            "{name} set to NaN, yet {what} pass ({diff})"
        );
    }
}

#[test]
fn tiny_bert_matches_transformers() {
    check_tiny("tiny-bert");
}

#[test]
fn tiny_xlmr_matches_transformers() {
    check_tiny("tiny-xlmr");
}

#[test]
fn xlmr_tokenizer_matches() {
    let golden = json(&fixtures("xlmr-tokenizer.json"));
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/derived/tokenizers/xlm-roberta.tokenizer.json");
    let tokenizer = TextTokenizer::from_file(&path, 1).unwrap();
    let texts: Vec<String> = golden["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    for (text, expected) in texts.iter().zip(golden["ids"].as_array().unwrap()) {
        let batch = tokenizer.encode(std::slice::from_ref(text), 512).unwrap();
        let expected: Vec<i64> = expected
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(batch.ids, expected, "{text}");
    }
}

#[test]
fn saved_model_has_hugging_face_names_and_the_same_outputs() {
    let dir = fixtures("tiny-xlmr");
    let device = Default::default();
    let encoder = load_encoder::<Flex>(&dir, Pooling::Mean, &device).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_encoder(&encoder, &dir, out.path()).unwrap();
    let names = |p: &Path| -> Vec<String> {
        let bytes = std::fs::read(p).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let mut keys: Vec<String> = header
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .map(|(k, v)| format!("{k} {}", v["shape"]))
            .collect();
        keys.sort();
        keys
    };
    // Every tensor of the source comes back, the pooler (which the encoder
    // does not use) included, so transformers loads it without warnings.
    assert_eq!(
        names(&out.path().join("model.safetensors")),
        names(&dir.join("model.safetensors"))
    );
    let pooler = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = tensors.tensor("pooler.dense.weight").unwrap();
        view.data().to_vec()
    };
    assert_eq!(
        pooler(&out.path().join("model.safetensors")),
        pooler(&dir.join("model.safetensors"))
    );
    assert!(out.path().join("config.json").is_file());
    // Equal weights saved twice are equal bytes (one metadata entry, not
    // burn's from a hash map), so equal models keep one content hash.
    let again = tempfile::tempdir().unwrap();
    save_encoder(&encoder, &dir, again.path()).unwrap();
    let saved = std::fs::read(out.path().join("model.safetensors")).unwrap();
    assert!(saved == std::fs::read(again.path().join("model.safetensors")).unwrap());
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&saved).unwrap();
    assert_eq!(
        metadata.metadata().as_ref().map(|m| m.len()),
        Some(1),
        "{metadata:?}"
    );
    let golden = json(&dir.join("golden.json"));
    let reloaded = load_encoder::<Flex>(out.path(), Pooling::Mean, &device).unwrap();
    let embedded: Vec<f32> = reloaded
        .embed(
            int_tensor(&golden["input_ids"]),
            int_tensor(&golden["attention_mask"]),
        )
        .into_data()
        .to_vec()
        .unwrap();
    assert!(max_abs_diff(&embedded, &floats(&golden["mean"])) <= 1e-4);
}

#[test]
fn multilingual_e5_small_matches_transformers() {
    let dir = common::me5_small();
    let golden = json(&fixtures("me5-small.json"));
    let texts: Vec<String> = golden["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), 1).unwrap();
    let batch = tokenizer.encode(&texts, 128).unwrap();
    let (expected_ids, _) = ints(&golden["ids"]);
    assert_eq!(
        batch.ids, expected_ids,
        "token ids differ from transformers'"
    );
    let device = Default::default();
    let encoder = load_encoder::<Flex>(&dir, Pooling::Mean, &device).unwrap();
    let (ids, mask) = batch.tensors::<Flex>(&device);
    let embedded: Vec<f32> = encoder.embed(ids, mask).into_data().to_vec().unwrap();
    let diff = max_abs_diff(&embedded, &floats(&golden["mean"]));
    eprintln!("multilingual-e5-small: embeddings max |diff| {diff:e}");
    assert!(diff <= 1e-4, "mE5-small embeddings differ by {diff}");
}

#[test]
fn hub_models_come_from_the_hub_cache_offline() {
    let s = common::Scratch::new();
    // The layout huggingface_hub writes: refs/main -> commit, snapshot files
    // as symlinks into blobs/.
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = s.path("hub/models--test-org--tiny-xlmr");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/derived/tokenizers/xlm-roberta.tokenizer.json");
    for (name, from) in [
        ("config.json", fixtures("tiny-xlmr/config.json")),
        ("model.safetensors", fixtures("tiny-xlmr/model.safetensors")),
        ("tokenizer.json", tokenizer),
    ] {
        let blob = repo.join("blobs").join(name);
        std::fs::copy(from, &blob).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(name)).unwrap();
    }
    s.write(
        "p.toml",
        "[stages.model]\nkind = \"hf_model\"\nid = \"test-org/tiny-xlmr\"\n",
    );
    let run = |s: &common::Scratch| {
        let out = s
            .command(&["run", "p.toml"])
            .env("HF_HUB_CACHE", s.path("hub"))
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&s);
    assert_eq!(code, Some(0), "{stderr}");
    let shown = s.ok(&["show", "model"]).stdout;
    assert!(
        shown.contains(&format!("\"commit\": \"{commit}\"")),
        "{shown}"
    );
    let dir = s.path(
        shown
            .lines()
            .find_map(|l| l.trim().strip_prefix("output   files  "))
            .unwrap(),
    );
    load_encoder::<Flex>(&dir, Pooling::Mean, &Default::default()).unwrap();

    // Not in the cache and offline: a clear error.
    s.write(
        "p.toml",
        "[stages.model]\nkind = \"hf_model\"\nid = \"test-org/absent\"\n",
    );
    let (code, stderr) = run(&s);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("config.json is not in the hub cache"),
        "{stderr}"
    );
}

#[test]
fn a_nan_anywhere_fails_the_comparison() {
    let good = [0.5f32, -1.0, 2.0];
    assert_eq!(common::max_abs_diff(&good, &good), 0.0);
    for i in 0..3 {
        let mut bad = good;
        bad[i] = f32::NAN;
        assert!(common::max_abs_diff(&bad, &good) > 1.0);
        assert!(common::max_abs_diff(&good, &bad) > 1.0);
    }
    let all_nan = [f32::NAN; 3];
    assert!(common::max_abs_diff(&all_nan, &good).is_infinite());
}
