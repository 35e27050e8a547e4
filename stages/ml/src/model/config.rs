//! Encoder shape from a Hugging Face `config.json`.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// How token states become one text embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Average of the real tokens' states (E5, sentence-transformers).
    #[default]
    Mean,
    /// The first token's state.
    Cls,
}

/// The fields of a BERT / XLM-R `config.json` the encoder uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncoderConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Not from the file: chosen by the pipeline.
    #[serde(skip)]
    pub pooling: Pooling,
}

fn default_type_vocab_size() -> usize {
    1
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_dropout() -> f64 {
    0.1
}

fn default_hidden_act() -> String {
    "gelu".into()
}

impl EncoderConfig {
    pub fn from_file(path: &Path, pooling: Pooling) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut config: EncoderConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a BERT / XLM-R config", path.display()))?;
        anyhow::ensure!(
            matches!(
                config.model_type.as_str(),
                "bert" | "xlm-roberta" | "roberta"
            ),
            "{}: model_type `{}` is not supported (bert, xlm-roberta, roberta)",
            path.display(),
            config.model_type
        );
        anyhow::ensure!(
            config.hidden_act == "gelu",
            "{}: hidden_act `{}` is not supported (gelu)",
            path.display(),
            config.hidden_act
        );
        anyhow::ensure!(
            config
                .hidden_size
                .is_multiple_of(config.num_attention_heads),
            "{}: hidden_size is not a multiple of num_attention_heads",
            path.display()
        );
        config.pooling = pooling;
        Ok(config)
    }

    /// RoBERTa-family models number positions after the padding index.
    pub fn roberta_positions(&self) -> bool {
        self.model_type != "bert"
    }
}
