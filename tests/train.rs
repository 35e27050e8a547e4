//! Training on real mirror data with a tiny randomly initialised encoder
//! (the real XLM-R tokenizer, 2 small layers).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Scratch;
use xlpipe_stage_api::table::{read_parquet, string_column, strings, write_parquet};

fn repo(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

/// A tiny XLM-R-shaped model folder (config + tokenizer, no weights).
fn tiny_model(s: &Scratch) {
    s.write(
        "tiny/config.json",
        r#"{"model_type": "xlm-roberta", "vocab_size": 250002, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 130, "type_vocab_size": 1, "pad_token_id": 1,
            "layer_norm_eps": 1e-5, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}"#,
    );
    std::fs::copy(
        repo("../shared/derived/tokenizers/xlm-roberta.tokenizer.json"),
        s.path("tiny/tokenizer.json"),
    )
    .unwrap();
}

fn pipeline(name: &str, train: &str) -> String {
    format!(
        r#"[pipeline]
name = "{name}"
include = ["{}"]

[stages.tiny]
kind = "import"
path = "tiny"

[stages.pairs]
kind = "qa_pairs"
inputs.qa = "squad_dev"
inputs.exclude = ["xquad_r"]
max_pairs = 1500
validation_fraction = 0.15

[stages.translate]
kind = "translate"
inputs.pairs = "pairs"
inputs.dictionaries = "muse_files"
langs.de = {{ backend = "dictionary", file = "en-de.dict" }}

[stages.train]
kind = "train"
inputs.model = "tiny"
inputs.pairs = "translate"
init = "random"
query_max_len = 24
passage_max_len = 48
{train}
"#,
        repo("pipelines/datasets.toml")
    )
}

fn run_until_train(s: &Scratch) -> common::Ran {
    s.xlpipe(&[
        "run",
        "p.toml",
        "--offline",
        "--mirror",
        &repo("../shared/mirror"),
        "--until",
        "train",
    ])
}

fn output(s: &Scratch, pipeline: &str, name: &str) -> PathBuf {
    output_of(s, pipeline, "train", name)
}

/// Output `name` of `stage`'s cached result in `pipeline`.
fn output_of(s: &Scratch, pipeline: &str, stage: &str, name: &str) -> PathBuf {
    let shown = s.ok(&["show", stage, "--pipeline", pipeline]).stdout;
    let prefix = format!("output   {name}  ");
    s.path(
        shown
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .unwrap(),
    )
}

#[test]
fn validation_loss_falls_on_real_data() {
    let s = Scratch::shared();
    tiny_model(&s);
    s.write(
        "p.toml",
        &pipeline(
            "falls",
            "alpha = 0.5\nsteps = 240\nbatch_size = 16\nlr = 5e-3\neval_every = 40\nseed = 3\n",
        ),
    );
    let ran = run_until_train(&s);
    assert_eq!(ran.code, 0, "{ran}");
    let metrics = read_parquet(&output(&s, "falls", "training").join("metrics.parquet")).unwrap();
    let val: Vec<f64> = metrics
        .column("val_loss")
        .unwrap()
        .f64()
        .unwrap()
        .iter()
        .flatten()
        .collect();
    assert_eq!(val.len(), 6, "{val:?}");
    // ln(16) = 2.77 is chance level for 16 candidates; a randomly
    // initialised 2-layer model learns slowly but steadily.
    let chance = 16f64.ln();
    assert!(
        val[5] < val[0] - 0.15 && val[5] < chance - 0.3,
        "validation loss did not fall: {val:?}"
    );
    let sampler: serde_json::Value = serde_json::from_slice(
        &std::fs::read(output(&s, "falls", "training").join("sampler.json")).unwrap(),
    )
    .unwrap();
    let mono = sampler["monolingual_batches"].as_u64().unwrap();
    let cross = sampler["cross_lingual_batches"].as_u64().unwrap();
    assert_eq!(mono + cross, 240);
    assert!(mono > 80 && cross > 80, "{sampler}");
    assert!(output(&s, "falls", "model")
        .join("model.safetensors")
        .is_file());
}

fn safetensors_floats(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn resume_after_kill_gives_the_same_weights() {
    let settings = "alpha = 0.5\nsteps = 40\nbatch_size = 8\nlr = 1e-3\neval_every = 0\ncheckpoint_every = 5\nseed = 5\n";
    let uninterrupted = Scratch::new();
    tiny_model(&uninterrupted);
    uninterrupted.write("p.toml", &pipeline("resume", settings));
    let ran = run_until_train(&uninterrupted);
    assert_eq!(ran.code, 0, "{ran}");

    let killed = Scratch::new();
    tiny_model(&killed);
    killed.write("p.toml", &pipeline("resume", settings));
    // Everything up to the training data, then a training run to kill.
    let ran = killed.xlpipe(&[
        "run",
        "p.toml",
        "--offline",
        "--mirror",
        &repo("../shared/mirror"),
        "--until",
        "translate",
    ]);
    assert_eq!(ran.code, 0, "{ran}");
    // The first checkpoint comes at step 5 of 40: the kill lands well before
    // the end even when this test is slow to notice it.
    let mut child = killed.spawn(&["run", "p.toml", "--offline", "--until", "train"]);
    let state = killed.cache().join("state/train");
    let deadline = Instant::now() + Duration::from_secs(600);
    let checkpointed = || {
        std::fs::read_dir(&state)
            .into_iter()
            .flatten()
            .flatten()
            // Only the key's own folder: `<key>.partial` gets its
            // progress.json before the swap that makes it the checkpoint.
            .filter(|e| e.path().extension().is_none())
            .any(|e| e.path().join("progress.json").is_file())
    };
    while !checkpointed() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let ran = run_until_train(&killed);
    assert_eq!(ran.code, 0, "{ran}");
    assert!(ran.stderr.contains("resumed at step"), "{ran}");

    let a =
        safetensors_floats(&output(&uninterrupted, "resume", "model").join("model.safetensors"));
    let b = safetensors_floats(&output(&killed, "resume", "model").join("model.safetensors"));
    assert_eq!(a.len(), b.len());
    let diff = common::max_abs_diff(&a, &b);
    assert!(diff <= 1e-6, "weights differ by {diff} after resume");
}

#[test]
fn a_diverging_loss_stops_with_a_clear_error() {
    let s = Scratch::shared();
    tiny_model(&s);
    s.write(
        "p.toml",
        &pipeline("diverge", "alpha = 1.0\nsteps = 60\nbatch_size = 8\nlr = 1e30\nwarmup_ratio = 0.0\nmax_grad_norm = 1e30\neval_every = 0\n"),
    );
    let ran = run_until_train(&s);
    assert_eq!(ran.code, 1, "{ran}");
    assert!(ran.stderr.contains("the training loss became"), "{ran}");
}

/// The optimizer against PyTorch: `clip_grad_norm_` then `torch.optim.AdamW`
/// (no decay on the bias), golden trajectory from
/// tests/fixtures/make_adamw_fixture.py.
#[test]
fn adamw_matches_pytorch() {
    use burn::module::Param;
    use burn::nn::Linear;
    use burn::optim::GradientsParams;
    use burn::tensor::{Tensor, TensorData};
    use xlpipe_ml::optim::AdamW;
    type B = burn::backend::Autodiff<burn::backend::Flex>;
    type Inner = burn::backend::Flex;

    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/adamw.json")).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        let mut out = Vec::new();
        let mut stack = vec![v];
        while let Some(v) = stack.pop() {
            match v {
                serde_json::Value::Array(items) => stack.extend(items.iter().rev()),
                other => out.push(other.as_f64().unwrap() as f32),
            }
        }
        out
    };
    let device = Default::default();
    let matrix = |v: &serde_json::Value| TensorData::new(floats(v), [3, 4]);
    let vector = |v: &serde_json::Value| TensorData::new(floats(v), [4]);
    let mut linear = Linear::<B> {
        weight: Param::from_tensor(Tensor::from_data(
            matrix(&fixture["start"]["weight"]),
            &device,
        )),
        bias: Some(Param::from_tensor(Tensor::from_data(
            vector(&fixture["start"]["bias"]),
            &device,
        ))),
    };
    let mut optimizer = AdamW::new(
        fixture["weight_decay"].as_f64().unwrap(),
        fixture["max_grad_norm"].as_f64(),
    );
    let lr = fixture["lr"].as_f64().unwrap();
    let mut worst = 0f32;
    for (i, step) in fixture["steps"].as_array().unwrap().iter().enumerate() {
        let mut grads = GradientsParams::new();
        grads.register(
            linear.weight.id,
            Tensor::<Inner, 2>::from_data(matrix(&step["grad_weight"]), &device),
        );
        grads.register(
            linear.bias.as_ref().unwrap().id,
            Tensor::<Inner, 1>::from_data(vector(&step["grad_bias"]), &device),
        );
        let (updated, report) = optimizer.step(lr, linear, grads);
        linear = updated;
        let expected_norm = step["grad_norm"].as_f64().unwrap();
        assert!(
            (report.grad_norm - expected_norm).abs() < 1e-5,
            "step {i}: grad norm {} vs torch {expected_norm}",
            report.grad_norm
        );
        let got = [
            linear.weight.val().into_data().to_vec::<f32>().unwrap(),
            linear
                .bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .to_vec()
                .unwrap(),
        ];
        let want = [floats(&step["weight"]), floats(&step["bias"])];
        for (g, w) in got.iter().zip(&want) {
            for (a, b) in g.iter().zip(w) {
                worst = worst.max((a - b).abs());
            }
        }
    }
    assert!(worst < 1e-6, "max abs difference from torch: {worst:e}");
}

/// A python that has sentence-transformers: XLPIPE_ST_PYTHON, else python3.
fn st_python() -> Option<String> {
    let python = std::env::var("XLPIPE_ST_PYTHON").unwrap_or_else(|_| "python3".into());
    let found = std::process::Command::new(&python)
        .args(["-c", "import sentence_transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    found.then_some(python)
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter())
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn vectors(dir: &Path) -> Vec<f32> {
    std::fs::read(dir.join("vectors.bin"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The trained folder loads in sentence-transformers with nothing but the
/// path, and its `encode(..., prompt_name=...)` gives xlpipe's `encode`
/// vectors: live where sentence-transformers is installed, and always
/// against tests/fixtures/st-tiny.json (made by make_st_fixture.py on this
/// very folder: lr = 0 keeps the seeded random weights, which are the same
/// on every machine). The training curves read back through TensorBoard's
/// own reader.
#[test]
fn a_trained_model_is_a_sentence_transformers_model() {
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo("tests/fixtures/st-tiny.json")).unwrap())
            .unwrap();
    let s = Scratch::shared();
    tiny_model(&s);
    let texts = |key: &str| -> Vec<String> {
        golden[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    for (name, key) in [("queries", "queries"), ("documents", "documents")] {
        let rows = texts(key);
        std::fs::create_dir_all(s.path(name)).unwrap();
        write_parquet(
            &s.path(&format!("{name}/texts.parquet")),
            vec![
                string_column("id", (0..rows.len()).map(|i| format!("t{i}")).collect()),
                string_column("lang", vec!["xx".to_string(); rows.len()]),
                string_column("text", rows),
            ],
        )
        .unwrap();
    }
    let encode = |name: &str, prefix: &str| {
        format!(
            r#"
[stages.{name}]
kind = "import"
path = "{name}"

[stages.encode_{name}]
kind = "encode"
inputs.model = "train.model"
inputs.texts = "{name}"
table = "texts"
text = "text"
id = "id"
prefix = "{prefix}"
max_len = 48
"#
        )
    };
    let toml = pipeline(
        "st",
        "alpha = 0.5\nsteps = 4\nbatch_size = 8\nlr = 0.0\neval_every = 2\nseed = 11\nbase_model = \"example/tiny\"\n",
    ) + &encode("queries", "query: ")
        + &encode("documents", "passage: ");
    s.write("p.toml", &toml);
    let mirror = repo("../shared/mirror");
    let ran = s.xlpipe(&["run", "p.toml", "--offline", "--mirror", &mirror]);
    assert_eq!(ran.code, 0, "{ran}");
    let model = output(&s, "st", "model");
    if std::env::var_os("XLPIPE_ST_KEEP").is_some() {
        eprintln!("model folder: {}", model.display());
    }

    // The folder: modules, caps, prompts, a card with front matter.
    let json = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(model.join(name)).unwrap()).unwrap()
    };
    assert_eq!(json("modules.json").as_array().unwrap().len(), 3);
    assert_eq!(json("sentence_bert_config.json")["max_seq_length"], 48);
    let st_config = json("config_sentence_transformers.json");
    assert_eq!(st_config["prompts"]["query"], "query: ");
    assert_eq!(st_config["prompts"]["document"], "passage: ");
    assert_eq!(
        json("1_Pooling/config.json")["pooling_mode_mean_tokens"],
        true
    );
    let card = std::fs::read_to_string(model.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nlibrary_name: sentence-transformers\n"),
        "{card}"
    );
    assert!(card.contains("base_model: example/tiny\n"), "{card}");
    assert!(card.contains("- de\n- en\n"), "{card}");

    // sentence-transformers' vectors against xlpipe's.
    let shown = |stage: &str| -> PathBuf {
        let text = s.ok(&["show", stage, "--pipeline", "st"]).stdout;
        s.path(
            text.lines()
                .find_map(|l| l.trim().strip_prefix("output   embeddings  "))
                .unwrap(),
        )
    };
    let ours_q = vectors(&shown("encode_queries"));
    let ours_d = vectors(&shown("encode_documents"));
    let mut references = vec![("fixture st-tiny.json", golden.clone())];
    match st_python() {
        Some(python) => {
            let out = s.path("st-live.json");
            let made = std::process::Command::new(&python)
                .arg(repo("tests/fixtures/make_st_fixture.py"))
                .arg(&model)
                .arg(&out)
                .output()
                .unwrap();
            assert!(made.status.success(), "{made:?}");
            let live: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
            assert_eq!(live["prompts"]["query"], "query: ");
            assert_eq!(live["max_seq_length"], 48);
            assert_eq!(live["similarity_fn_name"], "cosine");
            let modules: Vec<&str> = live["modules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap())
                .collect();
            assert_eq!(modules, ["Transformer", "Pooling", "Normalize"]);
            references.push(("sentence-transformers, live", live));
        }
        None => eprintln!(
            "SKIPPED the live sentence-transformers check (no python with it; set \
             XLPIPE_ST_PYTHON): compared with the fixture only"
        ),
    }
    for (what, reference) in references {
        let q = common::max_abs_diff(&ours_q, &floats(&reference["query_embeddings"]));
        let d = common::max_abs_diff(&ours_d, &floats(&reference["document_embeddings"]));
        eprintln!("{what}: max |diff| queries {q:e}, documents {d:e}");
        assert!(
            q <= 1e-5 && d <= 1e-5,
            "{what}: xlpipe's vectors differ from sentence-transformers' by {q} / {d} \
             (if the tiny model's weights changed, remake the fixture with make_st_fixture.py)"
        );
    }

    // TensorBoard's reader sees the curves of metrics.parquet.
    let training = output(&s, "st", "training");
    let runs: Vec<_> = std::fs::read_dir(training.join("tensorboard"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(runs, ["train"]);
    let read = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import json, sys\n\
             from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
             acc = EventAccumulator(sys.argv[1]); acc.Reload()\n\
             print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] \
             for t in acc.Tags()['scalars']}))",
        )
        .arg(training.join("tensorboard/train"))
        .output()
        .unwrap();
    assert!(read.status.success(), "{read:?}");
    let curves: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    let metrics = read_parquet(&training.join("metrics.parquet")).unwrap();
    let column = |name: &str| -> Vec<Option<f64>> {
        metrics
            .column(name)
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .collect()
    };
    let as_pairs = |tag: &str| -> Vec<(u64, f32)> {
        curves[tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag} in {curves}"))
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
            .collect()
    };
    let loss: Vec<(u64, f32)> = column("loss")
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u64 + 1, v.unwrap() as f32))
        .collect();
    assert_eq!(as_pairs("train/loss"), loss);
    let val: Vec<(u64, f32)> = column("val_loss")
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| (i as u64 + 1, v as f32)))
        .collect();
    assert_eq!(val.len(), 2, "{val:?}");
    assert!(val.iter().all(|(_, v)| v.is_finite()));
    assert_eq!(as_pairs("validation/loss"), val);
    for tag in [
        "train/learning_rate",
        "train/grad_norm",
        "train/monolingual_share",
    ] {
        assert_eq!(as_pairs(tag).len(), 4, "{tag}");
    }
}

/// The per-step training loss and learning rate of a finished training.
fn curve(dir: &Path) -> Vec<(f64, f64)> {
    let metrics = read_parquet(&dir.join("metrics.parquet")).unwrap();
    let column = |name: &str| -> Vec<f64> {
        metrics
            .column(name)
            .unwrap()
            .f64()
            .unwrap()
            .iter()
            .map(|v| v.unwrap_or(f64::NAN))
            .collect()
    };
    column("loss").into_iter().zip(column("lr")).collect()
}

/// Under `lr_schedule = "wsd"` a step depends on (seed, step), never on the
/// budget: the first 6 steps of a 10-step run whose decay starts at 6 are
/// those of a 6-step run without decay, bit for bit (stratified blocks
/// included). Under the linear schedule they are not (the control: the
/// comparison can fail).
#[test]
fn a_wsd_stable_phase_does_not_depend_on_the_budget() {
    let s = Scratch::shared();
    tiny_model(&s);
    let common =
        "alpha = 0.5\nmix = \"stratified\"\nbatch_size = 8\nlr = 1e-3\neval_every = 0\nseed = 7\n";
    let runs = [
        (
            "wsd6",
            "lr_schedule = \"wsd\"\nwarmup_steps = 2\ndecay_steps = 0\nsteps = 6\n",
        ),
        (
            "wsd10",
            "lr_schedule = \"wsd\"\nwarmup_steps = 2\ndecay_steps = 4\nsteps = 10\n",
        ),
        ("linear6", "steps = 6\n"),
        ("linear10", "steps = 10\n"),
    ];
    let mut curves = std::collections::BTreeMap::new();
    for (name, schedule) in runs {
        s.write("p.toml", &pipeline(name, &format!("{common}{schedule}")));
        let ran = run_until_train(&s);
        assert_eq!(ran.code, 0, "{ran}");
        curves.insert(name, curve(&output(&s, name, "training")));
    }
    let (short, long) = (&curves["wsd6"], &curves["wsd10"]);
    assert_eq!((short.len(), long.len()), (6, 10));
    for (step, (a, b)) in short.iter().zip(long).enumerate() {
        assert!(
            a.0.to_bits() == b.0.to_bits() && a.1.to_bits() == b.1.to_bits(),
            "step {}: loss/lr {a:?} (6 steps) vs {b:?} (10 steps)",
            step + 1
        );
    }
    // Warmup over 2 steps, then constant, then the 1-sqrt decay.
    let lrs: Vec<f64> = long.iter().map(|(_, lr)| *lr).collect();
    assert_eq!(&lrs[..6], &[5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]);
    assert!(
        lrs[6] == 1e-3 && lrs[7] < lrs[6] && lrs[9] < lrs[8] && lrs[9] > 0.0,
        "{lrs:?}"
    );
    assert!(
        (lrs[7] - 1e-3 * (1.0 - 0.25f64.sqrt())).abs() < 1e-15,
        "{lrs:?}"
    );
    let (short, long) = (&curves["linear6"], &curves["linear10"]);
    assert!(
        short.iter().zip(long).skip(1).any(|(a, b)| a != b),
        "the linear schedule's first steps should depend on the budget"
    );
}

/// The held-out pairs as a validation set, encoded by the trained model and
/// scored as XQuAD-R is.
const VALIDATION_STAGES: &str = r#"
[stages.valid_set]
kind = "validation_retrieval"
inputs.pairs = "translate"

[stages.valid_questions]
kind = "encode"
inputs.model = "train.model"
inputs.texts = "valid_set"
table = "questions"
text = "question"
id = "qid"
max_len = 24

[stages.valid_candidates]
kind = "encode"
inputs.model = "train.model"
inputs.texts = "valid_set"
table = "candidates"
text = "sentence"
id = "cid"
max_len = 48

[stages.valid_eval]
kind = "evaluate_lareqa"
inputs.data = "valid_set"
inputs.questions = "valid_questions"
inputs.candidates = "valid_candidates"
dataset = "validation"
"#;

/// The held-out pairs as a retrieval set: a trained model is scored on
/// them by the same encode + evaluate_lareqa as on XQuAD-R (mono, cross,
/// multi, bias), and the set holds only `valid` pairs, never training ones.
#[test]
fn held_out_pairs_make_a_validation_retrieval_set() {
    let s = Scratch::shared();
    tiny_model(&s);
    let stages = format!(
        "alpha = 0.5\nsteps = 4\nbatch_size = 8\neval_every = 0\nseed = 2\n{VALIDATION_STAGES}"
    );
    s.write("p.toml", &pipeline("valid", &stages));
    let ran = s.xlpipe(&[
        "run",
        "p.toml",
        "--offline",
        "--mirror",
        &repo("../shared/mirror"),
    ]);
    assert_eq!(ran.code, 0, "{ran}");
    let shown = |stage: &str, output: &str| output_of(&s, "valid", stage, output);
    // Only held-out pairs, in both languages, one query per pair and language.
    let pairs = read_parquet(&shown("translate", "pairs").join("pairs.parquet")).unwrap();
    let (ids, splits) = (
        strings(&pairs, "pair_id").unwrap(),
        strings(&pairs, "split").unwrap(),
    );
    let valid: std::collections::BTreeSet<&String> = ids
        .iter()
        .zip(&splits)
        .filter(|(_, s)| *s == "valid")
        .map(|(id, _)| id)
        .collect();
    let questions = read_parquet(&shown("valid_set", "data").join("questions.parquet")).unwrap();
    let qids = strings(&questions, "qid").unwrap();
    assert!(
        qids.iter().all(|q| valid.contains(q)),
        "a training pair is in the set"
    );
    assert_eq!(qids.len(), 2 * valid.len());
    let summary: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shown("valid_eval", "results").join("summary.json")).unwrap(),
    )
    .unwrap();
    for setting in ["mono", "cross", "multi"] {
        let map = summary[setting]["map"].as_f64().unwrap();
        assert!(map > 0.0 && map <= 1.0, "{setting}: {summary}");
    }
    assert!(summary["max_min_rank_distance"].as_f64().unwrap() >= 0.0);
}

/// The stage log of `stage`'s cached result in `pipeline`.
fn stage_log(s: &Scratch, pipeline: &str, stage: &str) -> String {
    let shown = s.ok(&["show", stage, "--pipeline", pipeline]).stdout;
    let path = shown
        .lines()
        .find_map(|l| l.trim().strip_prefix("log      "))
        .unwrap();
    std::fs::read_to_string(s.path(path)).unwrap()
}

/// Weights (as raw bytes), losses and learning rates of the cached
/// training of `stage` in `pipeline`.
fn trained(s: &Scratch, pipeline: &str, stage: &str) -> (Vec<u8>, Vec<(u64, u64)>) {
    let model = output_of(s, pipeline, stage, "model").join("model.safetensors");
    let steps = curve(&output_of(s, pipeline, stage, "training"))
        .into_iter()
        .map(|(loss, lr)| (loss.to_bits(), lr.to_bits()))
        .collect();
    (std::fs::read(model).unwrap(), steps)
}

/// Prefix reuse under WSD: in a grid over `steps`, the longer run waits
/// for the shorter one and continues from the state it stored at its decay
/// start; its weights and curve are bit-identical to training the same
/// budget from the start, on one thread and on two, and with only the top
/// layer trained (its state then holds that layer alone). A run whose settings
/// differ in anything but `steps` shares nothing, and `gc` keeps a prefix
/// as long as the record of the run that stored it.
#[test]
fn a_resumed_stable_phase_trains_the_weights_of_a_run_from_the_start() {
    let common = "alpha = 0.5\nbatch_size = 8\nlr = 1e-3\neval_every = 3\nseed = 11\n\
                  lr_schedule = \"wsd\"\nwarmup_steps = 2\ndecay_steps = 3\n";
    // Every weight trains, or only the top layer (whose stored state holds
    // that layer alone; the bottom comes from the model).
    for (threads, layers) in [("1", ""), ("2", ""), ("1", "train_layers = 1\n")] {
        let settings = format!("{common}{layers}");
        let grid = Scratch::new();
        tiny_model(&grid);
        let text = pipeline("grid", &format!("{settings}steps = \"${{steps}}\"\n"));
        grid.write("p.toml", &format!("{text}\n[grid]\nsteps = [14, 8]\n"));
        let until = |s: &Scratch, stage: &str| {
            let mut cmd = s.command(&[
                "run",
                "p.toml",
                "--offline",
                "--mirror",
                &repo("../shared/mirror"),
                "--until",
                stage,
                "--jobs",
                "2",
            ]);
            let ran: common::Ran = cmd
                .env("RAYON_NUM_THREADS", threads)
                .output()
                .unwrap()
                .into();
            assert_eq!(ran.code, 0, "{ran}");
            ran
        };
        until(&grid, "translate");
        until(&grid, "tiny");
        let plan = grid.ok(&["plan", "p.toml"]).stdout;
        assert!(
            plan.lines().any(|l| l.contains("train[steps=14]")
                && l.contains(
                    "resumes from the stable phase at step 5 of train[steps=8] (which runs first)"
                )),
            "{plan}"
        );
        until(&grid, "train");
        let log = stage_log(&grid, "grid", "train[steps=14]");
        assert!(
            log.contains("resumed from the stable phase at step 5 of train[steps=8]"),
            "{log}"
        );
        let resumed = trained(&grid, "grid", "train[steps=14]");

        let alone = Scratch::new();
        tiny_model(&alone);
        alone.write(
            "p.toml",
            &pipeline("alone", &format!("{settings}steps = 14\n")),
        );
        until(&alone, "train");
        let log = stage_log(&alone, "alone", "train");
        assert!(!log.contains("resumed"), "{log}");
        let scratch = trained(&alone, "alone", "train");
        assert_eq!(resumed.1.len(), 14);
        assert!(
            resumed.1 == scratch.1,
            "{threads} thread(s): the curves differ"
        );
        assert!(
            resumed.0 == scratch.0,
            "{threads} thread(s): the weights differ after a resumed stable phase"
        );

        // In the grid's cache: a longer budget resumes from the longest
        // stored prefix (step 11, stored by steps = 14); another alpha
        // shares nothing.
        if threads == "1" && layers.is_empty() {
            for (name, changed, expect) in [
                (
                    "longer",
                    "alpha = 0.5\nsteps = 20\n",
                    Some("at step 11 of train[steps=14]"),
                ),
                ("other", "alpha = 0.25\nsteps = 20\n", None),
            ] {
                let others = settings.replace("alpha = 0.5\n", "");
                grid.write("q.toml", &pipeline(name, &format!("{others}{changed}")));
                let plan = grid.ok(&["plan", "q.toml"]).stdout;
                grid.ok(&[
                    "run",
                    "q.toml",
                    "--offline",
                    "--mirror",
                    &repo("../shared/mirror"),
                    "--until",
                    "train",
                ]);
                let log = stage_log(&grid, name, "train");
                match expect {
                    Some(at) => {
                        assert!(
                            plan.contains(&format!("resumes from the stable phase {at}")),
                            "{plan}"
                        );
                        assert!(
                            log.contains(&format!("resumed from the stable phase {at}")),
                            "{log}"
                        );
                    }
                    None => {
                        assert!(!plan.contains("resumes"), "{plan}");
                        assert!(!log.contains("resumed"), "{log}");
                    }
                }
            }
            let prefixes = || common::count_files(&grid.cache().join("prefixes"));
            assert_eq!(
                prefixes(),
                4,
                "steps 8 and 14, and each 20-step run stored one"
            );
            grid.ok(&["gc", "--keep", "grid"]);
            assert_eq!(prefixes(), 2, "gc keeps the prefixes of kept records only");
            let plan = grid.ok(&["plan", "q.toml"]).stdout;
            assert!(!plan.contains("resumes"), "{plan}");
        }
    }
}

/// A pipeline whose `[search]` halves four alphas over budgets 2, 4, 8
/// (eta 2: 4, then 2, then 1), two seeds per configuration, on the validation objective; a
/// stage reads the winner's models through `train.model[search=best]`.
fn search_pipeline(search: &str) -> String {
    let stages = format!(
        "alpha = \"${{alpha}}\"\nseed = \"${{seed}}\"\nbatch_size = 8\neval_every = 0\n\
         lr_schedule = \"wsd\"\ndecay_steps = 1\n{VALIDATION_STAGES}{WINNER_STAGE}"
    );
    format!(
        "{}\n[grid]\nalpha = [0.0, 0.25, 0.5, 1.0]\nseed = [1, 2]\n\n[search]\n{search}",
        pipeline("search", &stages)
    )
}

/// A stage that reads the search's winner.
const WINNER_STAGE: &str = r#"
[stages.winner_questions]
kind = "encode"
inputs.model = "train.model[search=best]"
inputs.texts = "valid_set"
table = "questions"
text = "question"
id = "qid"
max_len = 24
"#;

const SEARCH: &str = r#"over = ["alpha"]
replicate = "seed"
budget = { stage = "train", param = "steps", min = 2, max = 8, eta = 2 }
objective = { stage = "valid_eval", metrics = ["mono.map", "multi.map"], goal = "max" }
"#;

/// The decision of the rung at `budget`.
fn decision(s: &Scratch, budget: u64) -> serde_json::Value {
    let dir = output_of(s, "search", &format!("search[steps={budget}]"), "decision");
    serde_json::from_slice(&std::fs::read(dir.join("decision.json")).unwrap()).unwrap()
}

/// Successive halving as cached instances: rung 0 trains every alpha and
/// seed, the best 1/eta of the alphas (by the mean over seeds of the
/// objective) go on with twice the budget, the rest and everything
/// downstream of them stop; the objective is the evaluation's own numbers;
/// the winner's models are what `[search=best]` reads; a rerun computes
/// nothing.
#[test]
fn a_search_halves_the_alphas_and_hands_on_its_winner() {
    let s = Scratch::new();
    tiny_model(&s);
    s.write("p.toml", &search_pipeline(SEARCH));
    let plan = s.ok(&["plan", "p.toml"]).stdout;
    assert!(plan.contains("search[steps=2]"), "{plan}");
    let dag = s.ok(&["dag", "p.toml", "--instances"]).stdout;
    assert!(
        dag.lines()
            .any(|l| l.starts_with("train[alpha=0.0,seed=1,steps=4]")
                && l.ends_with("[if search[steps=2] promotes it]")),
        "{dag}"
    );
    let run = || {
        s.xlpipe(&[
            "run",
            "p.toml",
            "--offline",
            "--mirror",
            &repo("../shared/mirror"),
            "--until",
            "winner_questions",
        ])
    };
    let ran = run();
    assert_eq!(ran.code, 0, "{ran}");
    // Each stopped run stops its two encodes and its evaluation: 2 alphas x
    // 2 seeds at each of rungs 1 and 2, and 1 alpha x 2 seeds at rung 2.
    assert!(ran.stdout.contains("stopped by the search 40"), "{ran}");
    // Only the winner's runs keep their stable phases (steps 1, 3 and 7 of
    // each seed's 2-, 4- and 8-step runs); a stopped configuration's go.
    let prefixes = std::fs::read_dir(s.cache().join("prefixes"))
        .unwrap()
        .flatten()
        .map(|family| common::count_files(&family.path()))
        .collect::<Vec<_>>();
    assert_eq!(prefixes, [3, 3], "{ran}");
    assert!(
        ran.stderr
            .contains("stable phases of its configuration are deleted"),
        "{ran}"
    );

    let first = decision(&s, 2);
    let rows = first["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{first}");
    let promoted: Vec<bool> = rows
        .iter()
        .map(|r| r["promoted"].as_bool().unwrap())
        .collect();
    assert_eq!(promoted, [true, true, false, false], "{first}");
    let means: Vec<f64> = rows.iter().map(|r| r["mean"].as_f64().unwrap()).collect();
    assert!(
        means.windows(2).all(|w| w[0] >= w[1]),
        "best first: {means:?}"
    );
    // Each row's objective is the mean over seeds of (mono + multi) / 2 as
    // the evaluation wrote them.
    for row in rows {
        let alpha = row["config"]["alpha"].as_f64().unwrap();
        let mut per_seed = Vec::new();
        for seed in [1, 2] {
            let instance = format!("valid_eval[alpha={alpha:?},seed={seed},steps=2]");
            let summary: serde_json::Value = serde_json::from_slice(
                &std::fs::read(output_of(&s, "search", &instance, "results").join("summary.json"))
                    .unwrap(),
            )
            .unwrap();
            let objective = (summary["mono"]["map"].as_f64().unwrap()
                + summary["multi"]["map"].as_f64().unwrap())
                / 2.0;
            let recorded = row["replicates"][seed.to_string()].as_f64().unwrap();
            assert!((recorded - objective).abs() < 1e-12, "{row}");
            per_seed.push(objective);
        }
        let mean = (per_seed[0] + per_seed[1]) / 2.0;
        assert!(
            (row["mean"].as_f64().unwrap() - mean).abs() < 1e-12,
            "{row}"
        );
    }
    let best_at_rung_0 = rows[0]["config"]["alpha"].as_f64().unwrap();
    let second = decision(&s, 4);
    assert_eq!(second["rows"].as_array().unwrap().len(), 2, "{second}");
    let winner = second["rows"][0]["config"]["alpha"].as_f64().unwrap();
    let last = decision(&s, 8);
    assert_eq!(last["winner"]["alpha"].as_f64(), Some(winner), "{last}");
    assert_eq!(last["rows"].as_array().unwrap().len(), 1, "{last}");

    let plan = s.ok(&["plan", "p.toml"]).stdout;
    let loser = rows[2]["config"]["alpha"].as_f64().unwrap();
    let stopped = format!("train[alpha={loser:?},seed=1,steps=4]");
    assert!(
        plan.lines().any(|l| l.contains("stopped")
            && l.contains(&stopped)
            && l.contains("not promoted at rung 0")),
        "{plan}"
    );
    let searched = ["train", "valid_", "search", "winner_"];
    let rung = plan
        .lines()
        .find(|l| l.contains("search[steps=2]"))
        .unwrap();
    assert!(
        rung.contains(&format!("rung 0: alpha={best_at_rung_0:?} "))
            && rung.contains(" promoted, "),
        "{rung}"
    );
    let instances = plan.lines().skip(1);
    for line in instances.filter(|l| searched.iter().any(|p| l.contains(&format!(" {p}")))) {
        assert!(
            !line.contains("to-run") && !line.contains("pending"),
            "{line}"
        );
    }
    // The winner's 8-step models, one per seed, are what the reader read.
    for seed in [1, 2] {
        let shown = s
            .ok(&[
                "show",
                &format!("winner_questions[seed={seed}]"),
                "--pipeline",
                "search",
            ])
            .stdout;
        let expected = format!("model <- train[alpha={winner:?},seed={seed},steps=8]");
        assert!(shown.contains(&expected), "{shown}");
    }
    let again = run();
    assert_eq!((again.code, again.counts().0), (0, 0), "{again}");

    // The report: every rung's rows, the winner, the cost against the grid.
    // Steps trained: rung 0 trains 8 x 2; the 4 promoted runs continue from
    // step 1 (WSD, one decay step) to 4, then the winner's 2 from step 3 to 8.
    let report = s.ok(&["report", "p.toml"]).stdout;
    let winner_row = format!("| 0 | 2 | alpha={winner:?} | ");
    assert!(
        report.contains(&winner_row) && report.contains("| promoted |"),
        "{report}"
    );
    assert!(
        report.contains(&format!("winner: alpha={winner:?}")),
        "{report}"
    );
    let units = 8 * 2 + 4 * (4 - 1) + 2 * (8 - 3);
    let expected = format!(
        "| budget units trained | {units} | 64 | {:.2} |",
        units as f64 / 64.0
    );
    assert!(report.contains(&expected), "{expected}\n{report}");
    let plot = report
        .lines()
        .find_map(|l| l.strip_prefix("plot: "))
        .unwrap();
    let svg = std::fs::read_to_string(plot).unwrap();
    for alpha in [0.0, 0.25, 0.5, 1.0] {
        assert!(svg.contains(&format!("alpha={alpha:?}")), "{svg}");
    }
    // The last rung carries the whole search.
    assert_eq!(last["history"].as_array().unwrap().len(), 2, "{last}");
}

/// Bad `[search]` input: each error names the file, line and field; an
/// objective metric the evaluation does not write fails its rung with the
/// metrics it does write and where the objective was set.
#[test]
fn a_bad_search_is_located() {
    let s = Scratch::new();
    tiny_model(&s);
    for (bad, line_has, says) in [
        (
            SEARCH.replace("eta = 2", "eta = 1"),
            "eta = 1",
            "search.budget",
        ),
        (
            SEARCH.replace("param = \"steps\"", "param = \"stepz\""),
            "stepz",
            "unknown field `stepz`",
        ),
        (
            SEARCH.replace("over = [\"alpha\"]", "over = [\"alpah\"]"),
            "alpah",
            "did you mean `alpha`",
        ),
        (
            SEARCH.replace("stage = \"valid_eval\"", "stage = \"valid_evl\""),
            "valid_evl",
            "no stage named `valid_evl`",
        ),
    ] {
        s.write("bad.toml", &search_pipeline(&bad));
        let ran = s.xlpipe(&["plan", "bad.toml"]);
        assert_eq!(ran.code, 2, "{ran}");
        let line = search_pipeline(&bad)
            .lines()
            .position(|l| l.contains(line_has))
            .unwrap()
            + 1;
        assert!(
            ran.stderr.contains(&format!("bad.toml:{line}:")),
            "line {line}: {ran}"
        );
        assert!(ran.stderr.contains(says), "{ran}");
    }
    // A budget stage that does not train every configuration.
    let bad = SEARCH.replace("stage = \"train\"", "stage = \"train2\"");
    let text = format!(
        "{}\n[stages.train2]\nkind = \"train\"\ninputs.model = \"tiny\"\n\
         inputs.pairs = \"translate\"\ninit = \"random\"\nalpha = 0.5\nseed = \"${{seed}}\"\n",
        search_pipeline(&bad).replacen("lr_schedule", "steps = 8\nlr_schedule", 1)
    );
    s.write("bad.toml", &text);
    let ran = s.xlpipe(&["plan", "bad.toml"]);
    let line = text.lines().position(|l| l.contains("train2")).unwrap() + 1;
    assert_eq!(ran.code, 2, "{ran}");
    assert!(
        ran.stderr.contains(&format!("bad.toml:{line}:")),
        "line {line}: {ran}"
    );
    assert!(ran.stderr.contains("does not vary over `alpha`"), "{ran}");

    let bad = SEARCH.replace("\"multi.map\"", "\"multi.mapp\"");
    s.write("bad.toml", &search_pipeline(&bad));
    let ran = s.xlpipe(&[
        "run",
        "bad.toml",
        "--offline",
        "--mirror",
        &repo("../shared/mirror"),
        "--until",
        "winner_questions",
    ]);
    assert_eq!(ran.code, 1, "{ran}");
    let line = search_pipeline(&bad)
        .lines()
        .position(|l| l.contains("multi.mapp"))
        .unwrap()
        + 1;
    for expected in [
        "objective metric `multi.mapp` is not in the results".to_string(),
        "multi.map".to_string(),
        format!("see [search] objective at bad.toml:{line}:"),
    ] {
        assert!(ran.stderr.contains(&expected), "{expected}: {ran}");
    }
}

/// Fewer validation pairs than a batch: `train` validates nothing, and says
/// so in its log rather than ignoring `eval_every` quietly.
#[test]
fn too_few_validation_pairs_for_a_batch_are_said_loudly() {
    let s = Scratch::shared();
    tiny_model(&s);
    s.write(
        "p.toml",
        &pipeline(
            "few_validation_pairs",
            "alpha = 0.5\nsteps = 1\nbatch_size = 300\neval_every = 1\nseed = 3\n",
        ),
    );
    let ran = run_until_train(&s);
    assert_eq!(ran.code, 0, "{ran}");
    let log = stage_log(&s, "few_validation_pairs", "train");
    assert!(
        log.contains("fewer than batch_size = 300: no validation, no early stopping"),
        "{log}"
    );
}
