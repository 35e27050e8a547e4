//! Partial fine-tuning and stored frozen states, on real mirror data with a
//! tiny randomly initialised XLM-R-shaped encoder (2 layers, dropout on, so
//! that equal weights also mean equal dropout draws).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{max_abs_diff, Scratch};

fn repo(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

const SIDES: &str = r#"query_max_len = 24
passage_max_len = 48
batch_size = 8
lr = 2e-3
alpha = 0.5
mix = "stratified"
"#;

fn pipeline() -> String {
    format!(
        r#"[pipeline]
name = "frozen"
include = ["{datasets}"]

[stages.tiny]
kind = "import"
path = "tiny"

[stages.pairs]
kind = "qa_pairs"
inputs.qa = "squad_dev"
inputs.exclude = ["xquad_r"]
max_pairs = 300
validation_fraction = 0.15

[stages.translate]
kind = "translate"
inputs.pairs = "pairs"
inputs.dictionaries = "muse_files"
langs.de = {{ backend = "dictionary", file = "en-de.dict" }}

# A base model with weights: two steps from a random start.
[stages.base]
kind = "train"
inputs.model = "tiny"
inputs.pairs = "translate"
init = "random"
steps = 2
eval_every = 0
seed = 1
{SIDES}

[stages.pair_states]
kind = "frozen_states"
inputs.model = "base.model"
inputs.texts = "translate"
table = "pairs"
train_layers = 1
dtype = "f32"
columns = [
  {{ column = "question", prefix = "query: ", max_len = 24 }},
  {{ column = "passage", prefix = "passage: ", max_len = 48 }},
]

[stages.top_text]
kind = "train"
inputs.model = "base.model"
inputs.pairs = "translate"
train_layers = 1
steps = 12
eval_every = 6
seed = 4
{SIDES}

[stages.top_states]
kind = "train"
inputs.model = "base.model"
inputs.pairs = "translate"
inputs.states = "pair_states"
train_layers = 1
steps = 12
eval_every = 6
seed = 4
{SIDES}

[stages.all_default]
kind = "train"
inputs.model = "base.model"
inputs.pairs = "translate"
steps = 6
eval_every = 0
seed = 4
{SIDES}

[stages.all_explicit]
kind = "train"
inputs.model = "base.model"
inputs.pairs = "translate"
train_layers = 2
steps = 6
eval_every = 0
seed = 4
{SIDES}

[stages.question_states]
kind = "frozen_states"
inputs.model = "base.model"
inputs.texts = "xquad_r"
table = "questions"
train_layers = 1
dtype = "f32"
columns = [{{ column = "question", prefix = "query: ", max_len = 24 }}]

[stages.encode_text]
kind = "encode"
inputs.model = "top_states.model"
inputs.texts = "xquad_r"
table = "questions"
text = "question"
id = "qid"
prefix = "query: "
max_len = 24

[stages.encode_states]
kind = "encode"
inputs.model = "top_states.model"
inputs.texts = "xquad_r"
inputs.states = "question_states"
table = "questions"
text = "question"
id = "qid"
prefix = "query: "
max_len = 24

[stages.question_states_f16]
kind = "frozen_states"
inputs.model = "base.model"
inputs.texts = "xquad_r"
table = "questions"
train_layers = 1
columns = [{{ column = "question", prefix = "query: ", max_len = 24 }}]

[stages.encode_states_f16]
kind = "encode"
inputs.model = "top_states.model"
inputs.texts = "xquad_r"
inputs.states = "question_states_f16"
table = "questions"
text = "question"
id = "qid"
prefix = "query: "
max_len = 24

# A model whose every layer moved cannot read the base model's states.
[stages.encode_mismatch]
kind = "encode"
inputs.model = "all_default.model"
inputs.texts = "xquad_r"
inputs.states = "question_states"
table = "questions"
text = "question"
id = "qid"
prefix = "query: "
max_len = 24
"#,
        datasets = repo("pipelines/datasets.toml")
    )
}

fn scratch() -> Scratch {
    let s = Scratch::shared();
    s.write(
        "tiny/config.json",
        r#"{"model_type": "xlm-roberta", "vocab_size": 250002, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 130, "type_vocab_size": 1, "pad_token_id": 1,
            "layer_norm_eps": 1e-5, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}"#,
    );
    std::fs::copy(
        repo("../shared/derived/tokenizers/xlm-roberta.tokenizer.json"),
        s.path("tiny/tokenizer.json"),
    )
    .unwrap();
    s.write("p.toml", &pipeline());
    s
}

fn run(s: &Scratch, until: &[&str]) -> common::Ran {
    let mirror = repo("../shared/mirror");
    let mut args = vec!["run", "p.toml", "--offline", "--mirror", &mirror];
    for stage in until {
        args.extend(["--until", stage]);
    }
    s.xlpipe(&args)
}

fn output(s: &Scratch, stage: &str, name: &str) -> PathBuf {
    let shown = s.ok(&["show", stage, "--pipeline", "frozen"]).stdout;
    let prefix = format!("output   {name}  ");
    s.path(
        shown
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no output {name} of {stage}: {shown}")),
    )
}

/// Every f32 tensor of a safetensors file, by name.
fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, info)| {
            assert_eq!(info["dtype"], "F32", "{name}");
            let at = info["data_offsets"].as_array().unwrap();
            let (from, to) = (
                at[0].as_u64().unwrap() as usize,
                at[1].as_u64().unwrap() as usize,
            );
            let values = data[from..to]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name.clone(), values)
        })
        .collect()
}

fn weights(s: &Scratch, stage: &str) -> BTreeMap<String, Vec<f32>> {
    tensors(&output(s, stage, "model").join("model.safetensors"))
}

fn vectors(s: &Scratch, stage: &str) -> Vec<f32> {
    std::fs::read(output(s, stage, "embeddings").join("vectors.bin"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn top_layer_training_from_states_equals_training_from_text_and_freezes_the_rest() {
    let s = scratch();
    let ran = run(
        &s,
        &["top_text", "top_states", "all_default", "all_explicit"],
    );
    assert_eq!(ran.code, 0, "{ran}");
    let base = weights(&s, "base");
    let from_text = weights(&s, "top_text");
    let from_states = weights(&s, "top_states");
    assert_eq!(
        base.keys().collect::<Vec<_>>(),
        from_text.keys().collect::<Vec<_>>()
    );
    let mut moved = 0;
    for (name, values) in &base {
        let frozen = !name.contains("layer.1.");
        let text = &from_text[name];
        let states = &from_states[name];
        if frozen {
            // Frozen parameters are never touched: bit for bit the base.
            assert_eq!(values, text, "{name} changed while frozen");
            assert_eq!(values, states, "{name} changed while frozen");
        } else {
            moved += (max_abs_diff(values, text) > 1e-4) as usize;
            // The key bias adds q . b to every score of a query, which the
            // softmax cancels: its exact gradient is zero, what arrives is
            // rounding noise, and Adam scales noise to steps of size lr.
            // Equal up to rounding means nothing there.
            if name.ends_with("key.bias") {
                continue;
            }
            let diff = max_abs_diff(text, states);
            assert!(diff <= 1e-5, "{name}: from states differs by {diff}");
        }
    }
    assert!(moved >= 8, "only {moved} top-layer tensors moved");

    // train_layers = all is the default: the same run, to the bit.
    let default = weights(&s, "all_default");
    let explicit = weights(&s, "all_explicit");
    assert_eq!(default, explicit);
    assert_ne!(
        default["embeddings.word_embeddings.weight"],
        base["embeddings.word_embeddings.weight"]
    );
}

#[test]
fn encoding_from_states_equals_encoding_from_text_and_a_changed_bottom_is_refused() {
    let s = scratch();
    let ran = run(&s, &["encode_text", "encode_states", "encode_states_f16"]);
    assert_eq!(ran.code, 0, "{ran}");
    let text = vectors(&s, "encode_text");
    let states = vectors(&s, "encode_states");
    assert_eq!(text.len(), states.len());
    assert!(text.len() > 32 * 10_000, "{}", text.len());
    let diff = max_abs_diff(&text, &states);
    assert!(diff <= 1e-5, "encodings from states differ by {diff}");
    // Half-precision states (the default) round the input of the top
    // layers only: every vector stays within cosine 0.9999 of the exact one.
    let half = vectors(&s, "encode_states_f16");
    let worst = text
        .chunks_exact(32)
        .zip(half.chunks_exact(32))
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>())
        .fold(1.0f32, |worst, c| {
            if c.is_nan() {
                f32::NEG_INFINITY
            } else {
                worst.min(c)
            }
        });
    assert!(worst >= 0.9999, "f16 states: worst cosine {worst}");

    let ran = run(&s, &["encode_mismatch"]);
    assert_ne!(ran.code, 0, "{ran}");
    for named in ["question_states", "all_default", "frozen bottom"] {
        assert!(ran.stderr.contains(named), "no `{named}` in: {ran}");
    }
}

#[test]
fn states_that_miss_a_setting_are_refused_with_what_they_hold() {
    let s = scratch();
    let text = std::fs::read_to_string(s.path("p.toml")).unwrap();
    // The consumer cuts queries at 32, the states were made at 24.
    let text = text.replace(
        "prefix = \"query: \"\nmax_len = 24\n\n# A model",
        "prefix = \"query: \"\nmax_len = 32\n\n# A model",
    );
    let text = text.replacen(
        "inputs.states = \"question_states\"\ntable = \"questions\"\ntext = \"question\"\nid = \"qid\"\nprefix = \"query: \"\nmax_len = 24",
        "inputs.states = \"question_states\"\ntable = \"questions\"\ntext = \"question\"\nid = \"qid\"\nprefix = \"query: \"\nmax_len = 32",
        1,
    );
    s.write("p.toml", &text);
    let ran = run(&s, &["encode_states"]);
    assert_ne!(ran.code, 0, "{ran}");
    assert!(
        ran.stderr.contains("max_len 32") && ran.stderr.contains("max_len 24"),
        "{ran}"
    );
}
