//! The files that make a trained model folder a sentence-transformers model
//! (and so an MTEB one), loaded with no arguments: the modules (Transformer,
//! Pooling as trained, Normalize), the training caps and prompts, and a
//! model card saying what made the model.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context;
use serde_json::json;

use super::{DecayShape, LrSchedule, TrainParams};
use xlpipe_ml::model::Pooling;

/// What the card says about the run beside its params.
pub(super) struct RunFacts<'a> {
    /// The instance, e.g. `train[alpha=0.5,seed=1]`.
    pub instance: &'a str,
    /// The producer of the `model` input.
    pub base: &'a str,
    pub steps_run: usize,
    pub best_val_loss: Option<f64>,
    pub train_pairs: usize,
    pub langs: &'a [String],
    pub layers: usize,
}

/// The version these files follow (their format changed little since 3.0).
const ST_VERSION: &str = "3.0.0";

pub(super) fn write_folder(dir: &Path, p: &TrainParams, run: &RunFacts) -> anyhow::Result<()> {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)
            .context("reading the model's config.json")?;
    let hidden = config["hidden_size"]
        .as_u64()
        .context("config.json has no hidden_size")?;
    let write = |name: &str, value: serde_json::Value| -> anyhow::Result<()> {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut text = serde_json::to_string_pretty(&value)?;
        text.push('\n');
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write(
        "modules.json",
        json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]),
    )?;
    write(
        "sentence_bert_config.json",
        json!({"max_seq_length": p.passage_max_len, "do_lower_case": false}),
    )?;
    // The prefix is part of the text the encoder pools over (E5 style).
    write(
        "1_Pooling/config.json",
        json!({
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": p.pooling == Pooling::Cls,
            "pooling_mode_mean_tokens": p.pooling == Pooling::Mean,
            "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false,
            "pooling_mode_weightedmean_tokens": false,
            "pooling_mode_lasttoken": false,
            "include_prompt": true,
        }),
    )?;
    // Normalize has no config; its folder only has to exist.
    std::fs::create_dir_all(dir.join("2_Normalize"))?;
    // `query` / `document`: the prompt names MTEB asks for.
    write(
        "config_sentence_transformers.json",
        json!({
            "__version__": {"sentence_transformers": ST_VERSION},
            "prompts": {"query": p.query_prefix, "document": p.passage_prefix},
            "default_prompt_name": null,
            "similarity_fn_name": "cosine",
            "model_type": "SentenceTransformer",
        }),
    )?;
    std::fs::write(dir.join("README.md"), model_card(p, run)).context("writing the model card")?;
    Ok(())
}

fn model_card(p: &TrainParams, run: &RunFacts) -> String {
    let langs: BTreeSet<&str> = run.langs.iter().map(String::as_str).collect();
    let mut yaml = String::from("---\n");
    yaml += "library_name: sentence-transformers\n";
    yaml += "pipeline_tag: sentence-similarity\n";
    if let Some(base) = &p.base_model {
        yaml += &format!("base_model: {base}\n");
    }
    yaml += "language:\n";
    for l in &langs {
        yaml += &format!("- {l}\n");
    }
    yaml += "tags:\n- sentence-transformers\n- sentence-similarity\n- feature-extraction\n- xlpipe\n- hybrid-batch-training\n";
    yaml += "---\n\n";

    let layers = match p.train_layers {
        Some(n) if n < run.layers => format!("the top {n} of {} layers", run.layers),
        _ if p.freeze_embeddings => format!("all {} layers, embeddings frozen", run.layers),
        _ => format!("all {} layers and the embeddings", run.layers),
    };
    let alpha = match p.alpha_end {
        Some(end) => format!("{} to {end} (linear ramp)", p.alpha),
        None => p.alpha.to_string(),
    };
    let base = p.base_model.as_deref().unwrap_or(run.base);
    let stopped = if run.steps_run < p.steps {
        format!(
            " (stopped at {}: {} validations without a better loss)",
            run.steps_run,
            p.patience.unwrap_or(0)
        )
    } else {
        String::new()
    };
    let best = run
        .best_val_loss
        .map(|v| format!("{v:.4} (these weights)"))
        .unwrap_or_else(|| "not validated (the last step's weights)".into());
    let rows = [
        ("base model", base.to_string()),
        (
            "alpha (share of monolingual batches)",
            format!("{alpha}, {:?} mix", p.mix),
        ),
        ("seed", p.seed.to_string()),
        ("steps", format!("{}{stopped}", p.steps)),
        ("batch size", p.batch_size.to_string()),
        (
            "learning rate",
            match p.lr_schedule {
                LrSchedule::Linear => format!("{} (warmup {})", p.lr, p.warmup_ratio),
                LrSchedule::Wsd => format!(
                    "{} (warmup-stable-decay: warmup {} steps, decay {:?} over the last {})",
                    p.lr,
                    p.warmup_steps.unwrap_or(0),
                    p.decay_shape.unwrap_or(DecayShape::OneMinusSqrt),
                    p.decay_steps.unwrap_or(0)
                ),
            },
        ),
        ("layers trained", layers),
        ("pooling", format!("{:?}, L2-normalised", p.pooling)),
        (
            "caps (tokens)",
            format!("query {}, passage {}", p.query_max_len, p.passage_max_len),
        ),
        (
            "prefixes",
            format!("`{}` / `{}`", p.query_prefix, p.passage_prefix),
        ),
        (
            "training pairs",
            format!(
                "{} in {} languages: {}",
                run.train_pairs,
                langs.len(),
                langs.iter().copied().collect::<Vec<_>>().join(", ")
            ),
        ),
        ("validation loss", best),
    ];
    let mut card = yaml;
    card += &format!(
        "# {}\n\nA multilingual text encoder fine-tuned by xlpipe's `train` stage with \
         hybrid batches (each batch monolingual with probability alpha, else cross-lingual; \
         InfoNCE over in-batch negatives).\n\n| | |\n|---|---|\n",
        run.instance
    );
    for (name, value) in rows {
        card += &format!("| {name} | {value} |\n");
    }
    card += &format!(
        "\n## Use\n\n```python\nfrom sentence_transformers import SentenceTransformer\n\n\
         model = SentenceTransformer(\"path/to/this/folder\")\n\
         queries = model.encode([\"Wie viele Einwohner hat Berlin?\"], prompt_name=\"query\")\n\
         passages = model.encode([\"Berlin hat 3,7 Millionen Einwohner.\"], prompt_name=\"document\")\n\
         print(model.similarity(queries, passages))\n```\n\n\
         The prompts (`query` = `{}`, `document` = `{}`) are those of training; MTEB finds them \
         by these names. Evaluation results are in the pipeline's report \
         (`xlpipe report`), not here: they come later in the pipeline than this folder.\n",
        p.query_prefix, p.passage_prefix
    );
    card
}
