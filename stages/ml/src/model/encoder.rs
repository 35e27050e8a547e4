//! A BERT / XLM-RoBERTa text encoder in burn: embeddings, post-LN
//! transformer layers, mean or CLS pooling, L2 normalisation.
//!
//! The arithmetic follows Hugging Face's `BertModel` / `XLMRobertaModel`
//! step for step (additive `finfo.min` attention mask, exact-erf GELU,
//! LayerNorm after each residual), so the same weights give the same
//! numbers; `tests/model.rs` checks that against golden outputs.

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::config::{EncoderConfig, Pooling};
use super::cpu_kernels::{
    dropout, embedding, first_rows, gelu, layer_norm, linear, packed_self_attention,
    self_attention, Heads,
};
use super::tokenize::PackedTokens;

#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    pub embeddings: Embeddings<B>,
    pub layers: Vec<Layer<B>>,
    pub pooling: Pooling,
    /// XLM-R counts positions from `pad_token_id + 1`; BERT from 0.
    pub roberta_positions: bool,
    pub pad_token_id: usize,
}

#[derive(Module, Debug)]
pub struct Embeddings<B: Backend> {
    pub word: Embedding<B>,
    pub position: Embedding<B>,
    pub token_type: Embedding<B>,
    pub norm: LayerNorm<B>,
    /// The norm's epsilon (burn's `LayerNorm` keeps its own private).
    pub norm_epsilon: f64,
    /// Dropout probability (while training).
    pub dropout: f64,
}

#[derive(Module, Debug)]
pub struct Layer<B: Backend> {
    pub query: Linear<B>,
    pub key: Linear<B>,
    pub value: Linear<B>,
    pub attention_out: Linear<B>,
    pub attention_norm: LayerNorm<B>,
    pub intermediate: Linear<B>,
    pub output: Linear<B>,
    pub output_norm: LayerNorm<B>,
    /// The norms' epsilon (burn's `LayerNorm` keeps its own private).
    pub norm_epsilon: f64,
    /// Dropout probabilities (while training): after the dense layers, and
    /// on the attention weights.
    pub dropout: f64,
    pub attention_dropout: f64,
    pub heads: usize,
}

impl EncoderConfig {
    /// A randomly initialised encoder of this shape.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Encoder<B> {
        let h = self.hidden_size;
        let norm = || {
            LayerNormConfig::new(h)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        Encoder {
            embeddings: Embeddings {
                word: EmbeddingConfig::new(self.vocab_size, h).init(device),
                position: EmbeddingConfig::new(self.max_position_embeddings, h).init(device),
                token_type: EmbeddingConfig::new(self.type_vocab_size.max(1), h).init(device),
                norm: norm(),
                norm_epsilon: self.layer_norm_eps,
                dropout: self.hidden_dropout_prob,
            },
            layers: (0..self.num_hidden_layers)
                .map(|_| Layer {
                    query: LinearConfig::new(h, h).init(device),
                    key: LinearConfig::new(h, h).init(device),
                    value: LinearConfig::new(h, h).init(device),
                    attention_out: LinearConfig::new(h, h).init(device),
                    attention_norm: norm(),
                    intermediate: LinearConfig::new(h, self.intermediate_size).init(device),
                    output: LinearConfig::new(self.intermediate_size, h).init(device),
                    output_norm: norm(),
                    norm_epsilon: self.layer_norm_eps,
                    dropout: self.hidden_dropout_prob,
                    attention_dropout: self.attention_probs_dropout_prob,
                    heads: self.num_attention_heads,
                })
                .collect(),
            pooling: self.pooling,
            roberta_positions: self.roberta_positions(),
            pad_token_id: self.pad_token_id,
        }
    }
}

impl<B: Backend> Encoder<B> {
    /// Token states `[batch, seq, hidden]` for right-padded `input_ids`
    /// with `mask` 1 on real tokens and 0 on padding.
    pub fn hidden_states(
        &self,
        input_ids: Tensor<B, 2, Int>,
        mask: Tensor<B, 2, Int>,
    ) -> Tensor<B, 3> {
        let embedded = self.embedded(input_ids, mask.clone());
        self.layers_on(embedded, mask, 0..self.layers.len())
    }

    /// The states after the embeddings and the first `cut` layers: what a
    /// model trained only above `cut` sees as its input.
    pub fn bottom_states(
        &self,
        input_ids: Tensor<B, 2, Int>,
        mask: Tensor<B, 2, Int>,
        cut: usize,
    ) -> Tensor<B, 3> {
        let embedded = self.embedded(input_ids, mask.clone());
        self.layers_on(embedded, mask, 0..cut)
    }

    /// Pooled, L2-normalised embeddings `[batch, hidden]`.
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>, mask: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let hidden = self.hidden_states(input_ids, mask.clone());
        normalize(pool(hidden, mask, self.pooling))
    }

    /// Pooled, L2-normalised embeddings `[sequences, hidden]` of packed
    /// token rows: no padding anywhere, so the dense layers multiply only
    /// real tokens, all sequences' at once, and attention runs per
    /// sequence. The same numbers as [`Encoder::embed`] up to rounding.
    pub fn embed_packed(&self, tokens: &PackedTokens) -> Tensor<B, 2> {
        self.embed_packed_from(self.packed_states(tokens, 0), &tokens.lengths, 0)
    }

    /// The packed token rows `[rows, hidden]` after the embeddings and the
    /// first `cut` layers: [`Encoder::bottom_states`] without padding.
    pub fn packed_states(&self, tokens: &PackedTokens, cut: usize) -> Tensor<B, 2> {
        let device = self.embeddings.word.weight.device();
        let rows = tokens.ids.len();
        let index = |values: Vec<i64>| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(values, [1, rows]), &device)
        };
        let ids = index(tokens.ids.iter().map(|&id| id as i64).collect());
        // XLM-R counts positions from pad + 1, BERT from 0.
        let first = if self.roberta_positions {
            self.pad_token_id as i64 + 1
        } else {
            0
        };
        let positions = index(
            tokens
                .lengths
                .iter()
                .flat_map(|&len| (0..len as i64).map(move |i| first + i))
                .collect(),
        );
        let mut x = self.embedded_rows(ids, positions);
        for layer in &self.layers[..cut] {
            x = layer.forward(x, &Attend::Packed(&tokens.lengths));
        }
        x
    }

    /// [`Encoder::embed_packed`] continued from `states`, packed rows of
    /// sequences of `lengths` after the first `cut` layers: only the layers
    /// above it run.
    pub fn embed_packed_from(
        &self,
        mut states: Tensor<B, 2>,
        lengths: &[usize],
        cut: usize,
    ) -> Tensor<B, 2> {
        for layer in &self.layers[cut..] {
            states = layer.forward(states, &Attend::Packed(lengths));
        }
        normalize(pool_packed(states, lengths, self.pooling))
    }

    /// [`Encoder::embed`] continued from `states`, the output of
    /// [`Encoder::bottom_states`] at `cut`: only the layers above it run.
    pub fn embed_from(
        &self,
        states: Tensor<B, 3>,
        mask: Tensor<B, 2, Int>,
        cut: usize,
    ) -> Tensor<B, 2> {
        let hidden = self.layers_on(states, mask.clone(), cut..self.layers.len());
        normalize(pool(hidden, mask, self.pooling))
    }

    /// A content hash of everything below `cut`: the embeddings and the
    /// first `cut` layers, value by value. Two encoders with one
    /// fingerprint give the same [`Encoder::bottom_states`], so states stored
    /// from one can feed the other's top layers.
    pub fn bottom_fingerprint(&self, cut: usize) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&(cut as u64).to_le_bytes());
        hasher.update(&[self.roberta_positions as u8]);
        hasher.update(&(self.pad_token_id as u64).to_le_bytes());
        let mut visitor = HashParams {
            hasher: &mut hasher,
            block_values: ROW_BLOCK_VALUES,
        };
        self.embeddings.visit(&mut visitor);
        for layer in &self.layers[..cut.min(self.layers.len())] {
            layer.visit(&mut visitor);
        }
        hasher.finalize().to_hex().to_string()
    }

    /// Word, position and token-type embeddings, normalised (and dropped
    /// out while training).
    fn embedded(&self, input_ids: Tensor<B, 2, Int>, mask: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        let positions = if !self.roberta_positions {
            Tensor::<B, 1, Int>::arange(0..seq as i64, &device)
                .reshape([1, seq])
                .repeat_dim(0, batch)
        } else {
            // XLM-R: real tokens count from pad + 1, padding sits at pad.
            mask.clone().cumsum(1) * mask + self.pad_token_id as i64
        };
        let x = self.embedded_rows(
            input_ids.reshape([1, batch * seq]),
            positions.reshape([1, batch * seq]),
        );
        let hidden = x.dims()[1];
        x.reshape([batch, seq, hidden])
    }

    /// The embeddings of token rows `[1, rows]` at `positions`: `[rows,
    /// hidden]`.
    fn embedded_rows(&self, ids: Tensor<B, 2, Int>, positions: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let rows = ids.dims()[1];
        let token_types = Tensor::<B, 2, Int>::zeros([1, rows], &ids.device());
        let e = &self.embeddings;
        let x = embedding(&e.word, ids)
            + e.position.forward(positions)
            + e.token_type.forward(token_types);
        let hidden = x.dims()[2];
        let x = layer_norm(&e.norm, e.norm_epsilon, x.reshape([rows, hidden]));
        dropout(x, e.dropout)
    }

    /// The transformer layers `range` applied to states `x`.
    fn layers_on(
        &self,
        x: Tensor<B, 3>,
        mask: Tensor<B, 2, Int>,
        range: std::ops::Range<usize>,
    ) -> Tensor<B, 3> {
        // Additive key mask: 0 on tokens, the most negative f32 on padding.
        // Filled, not multiplied: in bf16 that value is -inf, and 0 * -inf
        // would put NaN on every token.
        let [batch, seq, hidden] = x.dims();
        let key_bias = Tensor::<B, 2>::zeros(mask.dims(), &mask.device())
            .mask_fill(mask.equal_elem(0), f32::MIN);
        let attend = Attend::Padded {
            key_bias,
            batch,
            seq,
        };
        let mut rows = x.reshape([batch * seq, hidden]);
        for layer in &self.layers[range] {
            rows = layer.forward(rows, &attend);
        }
        rows.reshape([batch, seq, hidden])
    }
}

/// Which tokens a token attends to.
enum Attend<'a, B: Backend> {
    /// Rows of `batch` sequences padded to `seq`; the additive key mask
    /// `[batch, seq]` hides the padding.
    Padded {
        key_bias: Tensor<B, 2>,
        batch: usize,
        seq: usize,
    },
    /// Rows of sequences of these lengths, one after another.
    Packed(&'a [usize]),
}

impl<B: Backend> Layer<B> {
    /// The layer on token rows `[rows, hidden]`. The dense layers see all
    /// rows as one matrix: one large product instead of one per sequence.
    fn forward(&self, tokens: Tensor<B, 2>, attend: &Attend<B>) -> Tensor<B, 2> {
        let hidden = tokens.dims()[1];
        // Queries, keys and values from one product with the three weight
        // matrices side by side: one pass over the tokens, and one gradient
        // for them instead of three to add up.
        let parts = [&self.query, &self.key, &self.value];
        let weight = Tensor::cat(parts.iter().map(|l| l.weight.val()).collect(), 1);
        let bias = Tensor::cat(parts.iter().map(|l| bias(l)).collect(), 0);
        let qkv = linear(tokens.clone(), weight, bias);
        let context = match attend {
            Attend::Padded {
                key_bias,
                batch,
                seq,
            } => {
                let shape = Heads {
                    batch: *batch,
                    seq: *seq,
                    heads: self.heads,
                    head_dim: hidden / self.heads,
                };
                self_attention(qkv, key_bias.clone(), shape, self.attention_dropout)
            }
            Attend::Packed(lengths) => {
                packed_self_attention(qkv, lengths, self.heads, self.attention_dropout)
            }
        };
        let attended = layer_norm(
            &self.attention_norm,
            self.norm_epsilon,
            dropout(dense(&self.attention_out, context), self.dropout) + tokens,
        );
        let inner = gelu(dense(&self.intermediate, attended.clone()));
        layer_norm(
            &self.output_norm,
            self.norm_epsilon,
            dropout(dense(&self.output, inner), self.dropout) + attended,
        )
    }
}

/// Values per block of [`for_each_row_block`] (4 MB of f32).
pub(super) const ROW_BLOCK_VALUES: usize = 1 << 20;

/// Hand `tensor`'s f32 bytes, in order, to `each` in blocks of whole rows
/// (of dimension 0) of about `block_values` values, at least one row: a copy
/// of a 384 MB word embedding into fresh memory costs more in page faults
/// than hashing or writing it, a few megabytes at a time do not.
pub(super) fn for_each_row_block<B: Backend, const D: usize, E>(
    tensor: &Tensor<B, D>,
    block_values: usize,
    mut each: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let dims = tensor.dims();
    let row: usize = dims[1..].iter().product();
    let rows_per_block = (block_values / row.max(1)).max(1);
    let mut start = 0;
    while start < dims[0] {
        let rows = rows_per_block.min(dims[0] - start);
        let block = tensor.clone().narrow(0, start, rows).into_data();
        each(block.convert::<f32>().as_bytes())?;
        start += rows;
    }
    Ok(())
}

/// Feeds every float parameter's shape and f32 values to a hasher.
struct HashParams<'a> {
    hasher: &'a mut blake3::Hasher,
    block_values: usize,
}

impl<B: Backend> ModuleVisitor<B> for HashParams<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let tensor = param.val();
        for d in tensor.dims() {
            self.hasher.update(&(d as u64).to_le_bytes());
        }
        // The same bytes, in order, as the whole tensor's.
        let Ok(()) = for_each_row_block::<_, D, std::convert::Infallible>(
            &tensor,
            self.block_values,
            |bytes| {
                self.hasher.update(bytes);
                Ok(())
            },
        );
    }
}

/// A dense layer's bias, zeros where it has none.
fn bias<B: Backend>(layer: &Linear<B>) -> Tensor<B, 1> {
    match &layer.bias {
        Some(bias) => bias.val(),
        None => Tensor::zeros([layer.weight.dims()[1]], &layer.weight.device()),
    }
}

/// `layer` applied to rows of `x`.
fn dense<B: Backend>(layer: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    linear(x, layer.weight.val(), bias(layer))
}

/// Mean over real tokens, or the first token's state.
pub fn pool<B: Backend>(
    hidden: Tensor<B, 3>,
    mask: Tensor<B, 2, Int>,
    pooling: Pooling,
) -> Tensor<B, 2> {
    let [batch, seq, size] = hidden.dims();
    match pooling {
        Pooling::Cls => hidden
            .slice([0..batch, 0..1, 0..size])
            .reshape([batch, size]),
        Pooling::Mean => {
            let weights = mask.float().reshape([batch, seq, 1]);
            let summed = (hidden * weights.clone()).sum_dim(1).reshape([batch, size]);
            let counts = weights.sum_dim(1).reshape([batch, 1]).clamp_min(1e-9);
            summed / counts
        }
    }
}

/// [`pool`] over packed token rows `[rows, size]` of sequences of
/// `lengths`: the mean as a product with a `[sequences, rows]` matrix of
/// 1 / length weights, or each sequence's first row.
pub fn pool_packed<B: Backend>(
    rows: Tensor<B, 2>,
    lengths: &[usize],
    pooling: Pooling,
) -> Tensor<B, 2> {
    let device = rows.device();
    let total = rows.dims()[0];
    match pooling {
        Pooling::Cls => {
            let firsts: Vec<i64> = first_rows(lengths).iter().map(|&r| r as i64).collect();
            let n = firsts.len();
            rows.select(0, Tensor::from_data(TensorData::new(firsts, [n]), &device))
        }
        Pooling::Mean => {
            let mut weights = vec![0.0f32; lengths.len() * total];
            for (b, (&len, start)) in lengths.iter().zip(first_rows(lengths)).enumerate() {
                weights[b * total + start..b * total + start + len].fill(1.0 / len as f32);
            }
            let weights = TensorData::new(weights, [lengths.len(), total]);
            Tensor::from_data(weights, &device).matmul(rows)
        }
    }
}

/// Rows scaled to unit length (as `torch.nn.functional.normalize`).
pub fn normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norms = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12);
    x / norms
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TokenBatch;
    use burn::backend::Flex;

    fn tiny(model_type: &str, pooling: Pooling) -> Encoder<Flex> {
        let config: EncoderConfig = serde_json::from_value(serde_json::json!({
            "model_type": model_type, "vocab_size": 50, "hidden_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24,
            "max_position_embeddings": 20, "pad_token_id": 1,
        }))
        .unwrap();
        EncoderConfig { pooling, ..config }.init(&Default::default())
    }

    /// Hashing in row blocks hashes the same bytes as hashing each tensor
    /// whole (what fingerprints stored with frozen states were made by).
    #[test]
    fn fingerprint_blocks_hash_the_whole_tensors() {
        let encoder = tiny("xlm-roberta", Pooling::Mean);
        let hash = |block_values: usize| {
            let mut hasher = blake3::Hasher::new();
            let mut visitor = HashParams {
                hasher: &mut hasher,
                block_values,
            };
            encoder.embeddings.visit(&mut visitor);
            encoder.layers[0].visit(&mut visitor);
            hasher.finalize()
        };
        // A 50 x 16 word embedding in blocks of 3 rows (48 values), the
        // last one short; a row at a time; and each tensor whole.
        let whole = hash(usize::MAX);
        assert_eq!(hash(48), whole);
        assert_eq!(hash(1), whole);
    }

    /// Packed rows give a padded batch's embeddings, for both position
    /// schemes and both poolings.
    #[test]
    fn packed_tokens_embed_as_a_padded_batch() {
        let rows: Vec<Vec<u32>> = vec![
            vec![0, 5, 9, 13, 2],
            vec![0, 7, 2],
            vec![0, 11, 12, 14, 15, 16, 2],
            vec![0],
        ];
        for model_type in ["bert", "xlm-roberta"] {
            for pooling in [Pooling::Mean, Pooling::Cls] {
                let encoder = tiny(model_type, pooling);
                let (ids, mask) = TokenBatch::from_rows(&rows, 1).tensors(&Default::default());
                let padded: Vec<f32> = encoder.embed(ids, mask).into_data().to_vec().unwrap();
                let packed: Vec<f32> = encoder
                    .embed_packed(&PackedTokens::from_rows(&rows))
                    .into_data()
                    .to_vec()
                    .unwrap();
                assert_eq!(padded.len(), packed.len());
                for (i, (a, b)) in padded.iter().zip(&packed).enumerate() {
                    // NaN fails: no comparison with it holds.
                    assert!(
                        (a - b).abs() <= 1e-5,
                        "{model_type} {pooling:?} [{i}]: {a} vs {b}"
                    );
                }
            }
        }
    }
}
