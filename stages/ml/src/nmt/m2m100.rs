//! M2M100 (and NLLB-200, which shares it) in burn: a pre-LN encoder-decoder
//! transformer with sinusoidal positions, one embedding matrix shared by
//! encoder, decoder and output layer, and a key/value cache for decoding
//! one token at a time.
//!
//! The arithmetic follows Hugging Face's `M2M100ForConditionalGeneration`
//! step for step (scaled embeddings, positions counted from
//! `pad_token_id + 1`, LayerNorm before each block and after each stack,
//! additive `finfo.min` masks), so the same weights give the same logits;
//! `tests/nmt.rs` checks that against golden outputs.

use std::path::Path;

use anyhow::Context;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::store::KeyRemapper;
use burn::tensor::activation::{gelu, relu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;

use crate::model::load::{load_safetensors, safetensors_file};

/// The fields of an M2M100 / NLLB `config.json` the model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct M2m100Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    #[serde(default = "default_activation_function")]
    pub activation_function: String,
    #[serde(default = "default_scale_embedding")]
    pub scale_embedding: bool,
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: usize,
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: usize,
    #[serde(default = "default_eos_token_id")]
    pub decoder_start_token_id: usize,
}

fn default_activation_function() -> String {
    "relu".into()
}
fn default_scale_embedding() -> bool {
    true
}
fn default_pad_token_id() -> usize {
    1
}
fn default_eos_token_id() -> usize {
    2
}

impl M2m100Config {
    pub fn from_file(path: &Path) -> anyhow::Result<M2m100Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: M2m100Config = serde_json::from_str(&text)
            .with_context(|| format!("{} is not an M2M100 / NLLB config", path.display()))?;
        anyhow::ensure!(
            matches!(config.activation_function.as_str(), "relu" | "gelu"),
            "{}: activation_function `{}` is not supported (relu, gelu)",
            path.display(),
            config.activation_function
        );
        anyhow::ensure!(
            config
                .d_model
                .is_multiple_of(config.encoder_attention_heads)
                && config
                    .d_model
                    .is_multiple_of(config.decoder_attention_heads),
            "{}: d_model must divide by the attention heads",
            path.display()
        );
        Ok(config)
    }

    fn init<B: Backend>(&self, device: &B::Device) -> Weights<B> {
        let d = self.d_model;
        let norm = || LayerNormConfig::new(d).with_epsilon(1e-5).init(device);
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        let attention = |heads| Attention {
            q_proj: linear(d, d),
            k_proj: linear(d, d),
            v_proj: linear(d, d),
            out_proj: linear(d, d),
            heads,
        };
        Weights {
            shared: EmbeddingConfig::new(self.vocab_size, d).init(device),
            encoder: EncoderStack {
                layers: (0..self.encoder_layers)
                    .map(|_| EncoderLayer {
                        self_attn: attention(self.encoder_attention_heads),
                        self_attn_layer_norm: norm(),
                        fc1: linear(d, self.encoder_ffn_dim),
                        fc2: linear(self.encoder_ffn_dim, d),
                        final_layer_norm: norm(),
                    })
                    .collect(),
                layer_norm: norm(),
            },
            decoder: DecoderStack {
                layers: (0..self.decoder_layers)
                    .map(|_| DecoderLayer {
                        self_attn: attention(self.decoder_attention_heads),
                        self_attn_layer_norm: norm(),
                        encoder_attn: attention(self.decoder_attention_heads),
                        encoder_attn_layer_norm: norm(),
                        fc1: linear(d, self.decoder_ffn_dim),
                        fc2: linear(self.decoder_ffn_dim, d),
                        final_layer_norm: norm(),
                    })
                    .collect(),
                layer_norm: norm(),
            },
        }
    }
}

/// Field names are Hugging Face's (less `model.`), so loading needs no
/// renaming beyond burn's LayerNorm `gamma`/`beta`.
#[derive(Module, Debug)]
struct Weights<B: Backend> {
    shared: Embedding<B>,
    encoder: EncoderStack<B>,
    decoder: DecoderStack<B>,
}

#[derive(Module, Debug)]
struct EncoderStack<B: Backend> {
    layers: Vec<EncoderLayer<B>>,
    layer_norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
struct DecoderStack<B: Backend> {
    layers: Vec<DecoderLayer<B>>,
    layer_norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
struct Attention<B: Backend> {
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    out_proj: Linear<B>,
    heads: usize,
}

#[derive(Module, Debug)]
struct EncoderLayer<B: Backend> {
    self_attn: Attention<B>,
    self_attn_layer_norm: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
    final_layer_norm: LayerNorm<B>,
}

#[derive(Module, Debug)]
struct DecoderLayer<B: Backend> {
    self_attn: Attention<B>,
    self_attn_layer_norm: LayerNorm<B>,
    encoder_attn: Attention<B>,
    encoder_attn_layer_norm: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
    final_layer_norm: LayerNorm<B>,
}

/// An M2M100 / NLLB translation model.
#[derive(Debug)]
pub struct M2m100<B: Backend> {
    weights: Weights<B>,
    pub config: M2m100Config,
    device: B::Device,
}

/// The encoder's output for a batch of sources, with what cross-attention needs.
#[derive(Clone)]
pub struct Encoded<B: Backend> {
    /// `[batch, source_len, d_model]`.
    pub hidden: Tensor<B, 3>,
    /// Additive mask over source positions, `[batch, 1, 1, source_len]`.
    bias: Tensor<B, 4>,
}

impl<B: Backend> Encoded<B> {
    /// Rows `indices` (e.g. each source repeated once per beam).
    pub fn select(&self, indices: Tensor<B, 1, Int>) -> Encoded<B> {
        Encoded {
            hidden: self.hidden.clone().select(0, indices.clone()),
            bias: self.bias.clone().select(0, indices),
        }
    }
}

/// Keys and values of the decoder's self-attention (growing by one token
/// per step) and cross-attention (the encoder's, computed once), per layer.
#[derive(Clone)]
pub struct DecoderCache<B: Backend> {
    self_kv: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    cross_kv: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// Target tokens seen so far.
    pub length: usize,
}

impl<B: Backend> DecoderCache<B> {
    /// Keep rows `indices` (beam search's surviving hypotheses).
    pub fn select(&self, indices: Tensor<B, 1, Int>) -> DecoderCache<B> {
        let pick = |(k, v): &(Tensor<B, 4>, Tensor<B, 4>)| {
            (
                k.clone().select(0, indices.clone()),
                v.clone().select(0, indices.clone()),
            )
        };
        DecoderCache {
            self_kv: self
                .self_kv
                .iter()
                .map(|kv| kv.as_ref().map(pick))
                .collect(),
            cross_kv: self.cross_kv.iter().map(pick).collect(),
            length: self.length,
        }
    }
}

/// Where checkpoints keep the one embedding matrix that the encoder, the
/// decoder and the output layer share, in order of preference: transformers
/// saves it once as `model.shared.weight`, but some conversions on the hub
/// kept only one of its tied copies.
const SHARED_EMBEDDING_NAMES: [&str; 4] = [
    "model.shared.weight",
    "model.encoder.embed_tokens.weight",
    "model.decoder.embed_tokens.weight",
    "lm_head.weight",
];

/// The tensor names in a safetensors file, from its header (an 8-byte
/// little-endian length, then that many bytes of JSON).
fn safetensors_names(path: &Path) -> anyhow::Result<Vec<String>> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .with_context(|| format!("{}: not a safetensors file (too short)", path.display()))?;
    let length = u64::from_le_bytes(length);
    anyhow::ensure!(
        length <= 100 << 20 && length <= file.metadata()?.len(),
        "{}: not a safetensors file (header of {length} bytes)",
        path.display()
    );
    let mut header = vec![0u8; length as usize];
    file.read_exact(&mut header)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("{}: unreadable safetensors header", path.display()))?;
    Ok(header
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name != "__metadata__")
        .collect())
}

impl<B: Backend> M2m100<B> {
    /// Load a Hugging Face folder (`config.json`, `model.safetensors`).
    pub fn load(dir: &Path, device: &B::Device) -> anyhow::Result<M2m100<B>> {
        let config = M2m100Config::from_file(&dir.join("config.json"))?;
        let weights_file = safetensors_file(dir)?;
        let names = safetensors_names(&weights_file)?;
        let Some(embedding) = SHARED_EMBEDDING_NAMES
            .iter()
            .find(|name| names.iter().any(|n| n == *name))
        else {
            anyhow::bail!(
                "{} has no embedding matrix (looked for {})",
                weights_file.display(),
                SHARED_EMBEDDING_NAMES.join(", ")
            );
        };
        let patterns = vec![
            (
                format!("^{}$", embedding.replace('.', r"\.")),
                "shared.weight",
            ),
            (r"^model\.".to_string(), ""),
        ];
        let mut weights = config.init::<B>(device);
        load_safetensors(
            &mut weights,
            &weights_file,
            KeyRemapper::from_patterns(patterns)?,
            "M2M100",
        )?;
        Ok(M2m100 {
            weights,
            config,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    fn embed(&self, ids: Tensor<B, 2, Int>, positions: &[i64], shape: [usize; 2]) -> Tensor<B, 3> {
        let scale = if self.config.scale_embedding {
            (self.config.d_model as f64).sqrt()
        } else {
            1.0
        };
        let tokens = self.weights.shared.forward(ids).mul_scalar(scale);
        tokens + self.sinusoids(positions, shape)
    }

    /// fairseq's sinusoidal table rows (sin half, then cos half), computed
    /// in f32 as transformers does; the padding position is all zeros.
    fn sinusoids(&self, positions: &[i64], [batch, seq]: [usize; 2]) -> Tensor<B, 3> {
        let d = self.config.d_model;
        let half = d / 2;
        let step = (10000f64.ln() / (half as f64 - 1.0)) as f32;
        let frequencies: Vec<f32> = (0..half).map(|i| (i as f32 * -step).exp()).collect();
        let pad = self.config.pad_token_id as i64;
        let mut table = vec![0f32; positions.len() * d];
        for (row, &p) in table.chunks_mut(d).zip(positions) {
            if p == pad {
                continue;
            }
            for (i, f) in frequencies.iter().enumerate() {
                let angle = p as f32 * f;
                row[i] = angle.sin();
                row[half + i] = angle.cos();
            }
        }
        Tensor::from_data(TensorData::new(table, [batch, seq, d]), &self.device)
    }

    /// Encode right-padded sources (`mask` 1 on real tokens).
    pub fn encode(&self, ids: &[Vec<i64>]) -> Encoded<B> {
        let (flat, mask, shape) = pad_rows(ids, self.config.pad_token_id as i64);
        let pad = self.config.pad_token_id as i64;
        // Real tokens count from pad + 1; padding sits at pad.
        let mut positions = Vec::with_capacity(flat.len());
        for (row, row_mask) in flat.chunks(shape[1]).zip(mask.chunks(shape[1])) {
            let mut seen = 0;
            for (_, &m) in row.iter().zip(row_mask) {
                seen += m;
                positions.push(if m == 1 { seen + pad } else { pad });
            }
        }
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, shape), &self.device);
        let mut x = self.embed(input, &positions, shape);
        let mask_f: Vec<f32> = mask
            .iter()
            .map(|&m| if m == 1 { 0.0 } else { f32::MIN })
            .collect();
        let bias = Tensor::<B, 4>::from_data(
            TensorData::new(mask_f, [shape[0], 1, 1, shape[1]]),
            &self.device,
        );
        for layer in &self.weights.encoder.layers {
            x = layer.forward(x, bias.clone(), self.activation());
        }
        Encoded {
            hidden: self.weights.encoder.layer_norm.forward(x),
            bias,
        }
    }

    fn activation(&self) -> fn(Tensor<B, 2>) -> Tensor<B, 2> {
        if self.config.activation_function == "gelu" {
            gelu
        } else {
            relu
        }
    }

    /// An empty cache for decoding against `encoded`.
    pub fn start_cache(&self, encoded: &Encoded<B>) -> DecoderCache<B> {
        DecoderCache {
            self_kv: vec![None; self.weights.decoder.layers.len()],
            cross_kv: self
                .weights
                .decoder
                .layers
                .iter()
                .map(|l| l.encoder_attn.keys_values(encoded.hidden.clone()))
                .collect(),
            length: 0,
        }
    }

    /// Feed target tokens `ids` `[batch, t]` after the `cache.length` ones
    /// already seen; returns the logits of every position, `[batch, t, vocab]`
    /// (`last_only`: of the last position only, `[batch, 1, vocab]`).
    pub fn decode(
        &self,
        ids: &[Vec<i64>],
        encoded: &Encoded<B>,
        cache: &mut DecoderCache<B>,
        last_only: bool,
    ) -> Tensor<B, 3> {
        let pad = self.config.pad_token_id as i64;
        let batch = ids.len();
        let t = ids[0].len();
        let past = cache.length;
        // As transformers: (running count of non-pad tokens + tokens
        // cached) for real tokens, pad for padding.
        let mut positions = Vec::with_capacity(batch * t);
        for row in ids {
            let mut seen = 0;
            for &id in row {
                if id == pad {
                    positions.push(pad);
                } else {
                    seen += 1;
                    positions.push(seen + past as i64 + pad);
                }
            }
        }
        let flat: Vec<i64> = ids.iter().flatten().copied().collect();
        let input = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [batch, t]), &self.device);
        let mut x = self.embed(input, &positions, [batch, t]);
        // Causal: query i (at past + i) sees keys 0..=past + i.
        let total = past + t;
        let causal: Vec<f32> = (0..t)
            .flat_map(|i| (0..total).map(move |j| if j <= past + i { 0.0 } else { f32::MIN }))
            .collect();
        let self_bias =
            Tensor::<B, 4>::from_data(TensorData::new(causal, [1, 1, t, total]), &self.device);
        for (l, layer) in self.weights.decoder.layers.iter().enumerate() {
            x = layer.forward(
                x,
                &self_bias,
                &mut cache.self_kv[l],
                &cache.cross_kv[l],
                &encoded.bias,
                self.activation(),
            );
        }
        cache.length = total;
        let mut hidden = self.weights.decoder.layer_norm.forward(x);
        let d = self.config.d_model;
        if last_only && t > 1 {
            hidden = hidden.slice([0..batch, t - 1..t, 0..d]);
        }
        let rows = hidden.dims()[1];
        // The output layer is the shared embedding matrix.
        let embedding = self.weights.shared.weight.val();
        hidden
            .reshape([batch * rows, d])
            .matmul(embedding.transpose())
            .reshape([batch, rows, self.config.vocab_size])
    }
}

/// Right-pad rows with `pad`: (ids, mask, [rows, width]).
fn pad_rows(rows: &[Vec<i64>], pad: i64) -> (Vec<i64>, Vec<i64>, [usize; 2]) {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    for row in rows {
        ids.extend(row);
        mask.extend(std::iter::repeat_n(1, row.len()));
        ids.extend(std::iter::repeat_n(pad, width - row.len()));
        mask.extend(std::iter::repeat_n(0, width - row.len()));
    }
    (ids, mask, [rows.len(), width])
}

impl<B: Backend> Attention<B> {
    /// `[batch, seq, d]` → `[batch, heads, seq, head_dim]`.
    fn split(&self, x: Tensor<B, 2>, batch: usize, seq: usize) -> Tensor<B, 4> {
        let d = x.dims()[1];
        x.reshape([batch, seq, self.heads, d / self.heads])
            .swap_dims(1, 2)
    }

    fn keys_values(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, seq, d] = x.dims();
        let tokens = x.reshape([batch * seq, d]);
        (
            self.split(self.k_proj.forward(tokens.clone()), batch, seq),
            self.split(self.v_proj.forward(tokens), batch, seq),
        )
    }

    /// Attend from `x` `[batch, t, d]` to `keys`/`values`, with an additive `bias`.
    fn attend(
        &self,
        x: Tensor<B, 3>,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        bias: Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let [batch, t, d] = x.dims();
        let head_dim = d / self.heads;
        let q = self.split(self.q_proj.forward(x.reshape([batch * t, d])), batch, t);
        let scores = q
            .matmul(keys.swap_dims(2, 3))
            .mul_scalar((head_dim as f64).powf(-0.5))
            + bias;
        let context = softmax(scores, 3)
            .matmul(values)
            .swap_dims(1, 2)
            .reshape([batch * t, d]);
        self.out_proj.forward(context).reshape([batch, t, d])
    }
}

fn feed_forward<B: Backend>(
    fc1: &Linear<B>,
    fc2: &Linear<B>,
    x: Tensor<B, 3>,
    activation: fn(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, 3> {
    let [batch, t, d] = x.dims();
    fc2.forward(activation(fc1.forward(x.reshape([batch * t, d]))))
        .reshape([batch, t, d])
}

impl<B: Backend> EncoderLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        bias: Tensor<B, 4>,
        activation: fn(Tensor<B, 2>) -> Tensor<B, 2>,
    ) -> Tensor<B, 3> {
        let normed = self.self_attn_layer_norm.forward(x.clone());
        let (k, v) = self.self_attn.keys_values(normed.clone());
        let x = x + self.self_attn.attend(normed, k, v, bias);
        let normed = self.final_layer_norm.forward(x.clone());
        x + feed_forward(&self.fc1, &self.fc2, normed, activation)
    }
}

impl<B: Backend> DecoderLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        self_bias: &Tensor<B, 4>,
        self_kv: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
        cross_kv: &(Tensor<B, 4>, Tensor<B, 4>),
        cross_bias: &Tensor<B, 4>,
        activation: fn(Tensor<B, 2>) -> Tensor<B, 2>,
    ) -> Tensor<B, 3> {
        let normed = self.self_attn_layer_norm.forward(x.clone());
        let (k, v) = self.self_attn.keys_values(normed.clone());
        let (k, v) = match self_kv.take() {
            Some((past_k, past_v)) => (
                Tensor::cat(vec![past_k, k], 2),
                Tensor::cat(vec![past_v, v], 2),
            ),
            None => (k, v),
        };
        *self_kv = Some((k.clone(), v.clone()));
        let x = x + self.self_attn.attend(normed, k, v, self_bias.clone());
        let normed = self.encoder_attn_layer_norm.forward(x.clone());
        let x = x + self.encoder_attn.attend(
            normed,
            cross_kv.0.clone(),
            cross_kv.1.clone(),
            cross_bias.clone(),
        );
        let normed = self.final_layer_norm.forward(x.clone());
        x + feed_forward(&self.fc1, &self.fc2, normed, activation)
    }
}
