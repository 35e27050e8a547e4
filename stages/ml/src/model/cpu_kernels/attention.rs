//! Multi-head self-attention as one operation on the CPU backend, forward
//! and backward.
//!
//! Spelled out in burn's tensor ops, attention is a dozen whole-tensor
//! passes per layer (head split and merge copies, the mask add, softmax's
//! max / exp / sum / divide, dropout), each on one thread under the CPU
//! backend, and as many again in the backward pass: about a third of an
//! mE5-small training step while the other core waited. Here each
//! (sequence, head) pair is one parallel task that reads its queries, keys
//! and values in place from the fused QKV projection, and keeps its
//! scores in cache from the product to the context.
//!
//! The arithmetic is the one burn's ops spell out (`by_ops`, the path on
//! every other backend): scores scaled by 1 / sqrt(head_dim) plus the
//! additive key mask, softmax, the same dropout mask, and the product with
//! the values. The tests compare the two, values and gradients.

use std::borrow::Cow;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::pointwise::{dropout, dropout_seed, mask};
use super::{flex_tensor, flex_values, on_cpu, zeros, OnCpu};
use crate::matmul::product_output;
use crate::vector::{dot, exp, max, sum, widest_fn};

/// The shape of one attention call: `batch` sequences of `seq` tokens,
/// `heads` heads of `head_dim` features each.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl Heads {
    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    fn scale(&self) -> f32 {
        score_scale(self.head_dim)
    }
}

/// The factor on query-key products: 1 / sqrt(head_dim).
fn score_scale(head_dim: usize) -> f32 {
    (1.0 / (head_dim as f64).sqrt()) as f32
}

/// The first row of each of sequences of `lengths` laid one after another.
pub fn first_rows(lengths: &[usize]) -> Vec<usize> {
    lengths
        .iter()
        .scan(0, |next, &len| {
            let first = *next;
            *next += len;
            Some(first)
        })
        .collect()
}

/// Where each sequence lies among the token rows, and the heads: what the
/// fused kernel needs of either layout. A padded batch is `batch` spans of
/// `seq` rows (the key mask hides the padding); packed rows are one span
/// per sequence, of its own length, with nothing to hide.
#[derive(Clone, Debug)]
struct Spans {
    /// First row and length of each sequence.
    starts: Vec<usize>,
    lens: Vec<usize>,
    heads: usize,
    head_dim: usize,
    /// Per task, where its weights start in the flat dropout mask; the
    /// last entry is the mask's length.
    keep_at: Vec<usize>,
    /// Per token row, the sequence it belongs to.
    owner: Vec<usize>,
}

impl Spans {
    fn padded(shape: Heads) -> Spans {
        Spans::new(vec![shape.seq; shape.batch], shape.heads, shape.head_dim)
    }

    /// Sequences of `lens` rows each, one after another.
    fn new(lens: Vec<usize>, heads: usize, head_dim: usize) -> Spans {
        let starts = first_rows(&lens);
        let mut keep_at = vec![0];
        for &len in &lens {
            for _ in 0..heads {
                keep_at.push(keep_at.last().expect("non-empty") + len * len);
            }
        }
        let owner = lens
            .iter()
            .enumerate()
            .flat_map(|(b, &len)| std::iter::repeat_n(b, len))
            .collect();
        Spans {
            starts,
            lens,
            heads,
            head_dim,
            keep_at,
            owner,
        }
    }

    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    fn rows(&self) -> usize {
        self.owner.len()
    }

    /// One task per (sequence, head), in `[sequence, head]` order.
    fn tasks(&self) -> usize {
        self.lens.len() * self.heads
    }

    fn scale(&self) -> f32 {
        score_scale(self.head_dim)
    }

    /// Task `t`'s sequence: its first row and length.
    fn span(&self, t: usize) -> (usize, usize) {
        let b = t / self.heads;
        (self.starts[b], self.lens[b])
    }

    /// Task `t`'s queries, keys and values, each from its first element
    /// in the fused projection (rows `3 * hidden` apart).
    fn parts<'a>(&self, qkv: &'a [f32], t: usize) -> [&'a [f32]; 3] {
        let hidden = self.hidden();
        let at = self.span(t).0 * 3 * hidden + (t % self.heads) * self.head_dim;
        [&qkv[at..], &qkv[at + hidden..], &qkv[at + 2 * hidden..]]
    }

    /// Task `t`'s share of a dropout mask.
    fn keep<'a>(&self, keep: Option<&'a [f32]>, t: usize) -> Option<&'a [f32]> {
        keep.map(|keep| &keep[self.keep_at[t]..self.keep_at[t + 1]])
    }

    /// Row `token`'s sequence, and its place in it.
    fn place(&self, token: usize) -> (usize, usize) {
        let b = self.owner[token];
        (b, token - self.starts[b])
    }
}

/// The attention weights after dropout.
fn dropped<'a>(p: &'a [f32], keep: Option<&[f32]>) -> Cow<'a, [f32]> {
    match keep {
        Some(keep) => Cow::Owned(p.iter().zip(keep).map(|(p, m)| p * m).collect()),
        None => Cow::Borrowed(p),
    }
}

/// Context vectors `[batch * seq, hidden]` from the fused projection
/// `qkv = [queries | keys | values]`, `[batch * seq, 3 * hidden]`, with the
/// additive `key_bias` `[batch, seq]` (0 on tokens, a huge negative number
/// on padding) and dropout `prob` on the attention weights while training.
pub fn self_attention<B: Backend>(
    qkv: Tensor<B, 2>,
    key_bias: Tensor<B, 2>,
    shape: Heads,
    prob: f64,
) -> Tensor<B, 2> {
    fused(
        qkv,
        Spans::padded(shape),
        || bias_values(key_bias.clone()),
        prob,
        |qkv| by_ops(qkv, key_bias.clone(), shape, prob),
    )
}

/// Context vectors `[rows, hidden]` for packed sequences: the token rows
/// of sequences of `lengths` one after another, no padding, each token
/// attending to the tokens of its own sequence. `qkv` is the fused
/// projection `[rows, 3 * hidden]`; `heads` heads share `hidden`.
pub fn packed_self_attention<B: Backend>(
    qkv: Tensor<B, 2>,
    lengths: &[usize],
    heads: usize,
    prob: f64,
) -> Tensor<B, 2> {
    let [rows, width] = qkv.dims();
    let head_dim = width / 3 / heads;
    assert_eq!(heads * head_dim * 3, width, "qkv width");
    assert_eq!(
        lengths.iter().sum::<usize>(),
        rows,
        "lengths cover the rows"
    );
    fused(
        qkv,
        Spans::new(lengths.to_vec(), heads, head_dim),
        || vec![0.0; rows],
        prob,
        |qkv| packed_by_ops(qkv, lengths, heads, prob),
    )
}

/// The fused kernel on the CPU backend, `elsewhere` on every other one.
/// `key_bias` gives the additive key mask, one value per token row.
fn fused<B: Backend>(
    qkv: Tensor<B, 2>,
    spans: Spans,
    key_bias: impl FnOnce() -> Vec<f32>,
    prob: f64,
    elsewhere: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, 2> {
    let device = qkv.device();
    match on_cpu(qkv) {
        OnCpu::Elsewhere(qkv) => elsewhere(qkv),
        OnCpu::Plain(qkv, back) => {
            back.wrap(forward(&flex_values(&qkv), &key_bias(), &spans, None, false).0)
        }
        OnCpu::Tracked(qkv, back) => {
            let bias = key_bias();
            match FusedAttention
                .prepare::<NoCheckpointing>([qkv.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let keep = (prob > 0.0).then(|| {
                        Arc::new(mask(
                            *spans.keep_at.last().expect("non-empty"),
                            prob,
                            dropout_seed::<B>(&device),
                        ))
                    });
                    let values = flex_values(&qkv.primitive);
                    let keep_factors = keep.as_deref().map(Vec::as_slice);
                    let (context, probs) = forward(&values, &bias, &spans, keep_factors, true);
                    let saved = Saved {
                        spans: Arc::new(spans),
                        qkv: qkv.primitive,
                        probs: Arc::new(probs),
                        keep,
                    };
                    back.wrap(prep.finish(saved, context))
                }
                OpsKind::UnTracked(prep) => {
                    let values = flex_values(&qkv.primitive);
                    let (context, _) = forward(&values, &bias, &spans, None, false);
                    back.wrap(prep.finish(context))
                }
            }
        }
    }
}

/// The same attention in burn's tensor ops, for every other backend.
fn by_ops<B: Backend>(
    qkv: Tensor<B, 2>,
    key_bias: Tensor<B, 2>,
    shape: Heads,
    prob: f64,
) -> Tensor<B, 2> {
    let Heads {
        batch,
        seq,
        heads,
        head_dim,
    } = shape;
    let hidden = shape.hidden();
    let part = |i: usize| {
        qkv.clone()
            .narrow(1, i * hidden, hidden)
            .reshape([batch, seq, heads, head_dim])
            .swap_dims(1, 2)
    };
    let scores = part(0)
        .matmul(part(1).swap_dims(2, 3))
        .mul_scalar(shape.scale())
        + key_bias.reshape([batch, 1, 1, seq]);
    dropout(softmax(scores, 3), prob)
        .matmul(part(2))
        .swap_dims(1, 2)
        .reshape([batch * seq, hidden])
}

/// Packed attention in burn's tensor ops: the rows laid out as a padded
/// batch (a row of zeros in the gaps), [`by_ops`], and the real rows back.
fn packed_by_ops<B: Backend>(
    qkv: Tensor<B, 2>,
    lengths: &[usize],
    heads: usize,
    prob: f64,
) -> Tensor<B, 2> {
    let device = qkv.device();
    let [rows, width] = qkv.dims();
    let (batch, seq) = (lengths.len(), lengths.iter().copied().max().unwrap_or(1));
    let (mut to_padded, mut to_packed, mut bias) = (Vec::new(), Vec::new(), Vec::new());
    for (b, (&len, start)) in lengths.iter().zip(first_rows(lengths)).enumerate() {
        for i in 0..seq {
            // Row `rows` is the appended row of zeros.
            to_padded.push(if i < len {
                (start + i) as i64
            } else {
                rows as i64
            });
            bias.push(if i < len { 0.0 } else { f32::MIN });
        }
        to_packed.extend((0..len).map(|i| (b * seq + i) as i64));
    }
    let index = |values: Vec<i64>| {
        let n = values.len();
        Tensor::<B, 1, Int>::from_data(TensorData::new(values, [n]), &device)
    };
    let padded =
        Tensor::cat(vec![qkv, Tensor::zeros([1, width], &device)], 0).select(0, index(to_padded));
    let key_bias = Tensor::from_data(TensorData::new(bias, [batch, seq]), &device);
    let shape = Heads {
        batch,
        seq,
        heads,
        head_dim: width / 3 / heads,
    };
    by_ops(padded, key_bias, shape, prob).select(0, index(to_packed))
}

fn bias_values<B: Backend>(key_bias: Tensor<B, 2>) -> Vec<f32> {
    key_bias
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 key bias")
}

/// What the backward pass reads.
#[derive(Clone, Debug)]
struct Saved {
    spans: Arc<Spans>,
    /// The fused projection, `[rows, 3 * hidden]`.
    qkv: FlexTensor,
    /// Each task's attention weights before dropout, `[len, len]`.
    probs: Arc<Vec<Vec<f32>>>,
    /// Dropout's factors (0 or 1 / keep), task after task.
    keep: Option<Arc<Vec<f32>>>,
}

/// The products here are small: one task, one thread.
const ONE: gemm::Parallelism = gemm::Parallelism::None;

#[derive(Debug)]
struct FusedAttention;

impl Backward<Flex, 1> for FusedAttention {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(parent) = parent {
            let saved = ops.state;
            let d_qkv = backward(
                &flex_values(&grad),
                &flex_values(&saved.qkv),
                &saved.probs,
                saved.keep.as_deref().map(Vec::as_slice),
                &saved.spans,
            );
            grads.register::<Flex>(parent.id, d_qkv);
        }
    }
}

widest_fn! {
    /// Attention weights in place: `scores` (rows of `seq`) plus the key
    /// bias, then softmax along each row.
    fn softmax_rows / softmax_rows_at(scores: &mut [f32], key_bias: &[f32]) {
        for row in scores.chunks_exact_mut(key_bias.len()) {
            row.iter_mut().zip(key_bias).for_each(|(x, b)| *x += b);
            let top = max(row);
            row.iter_mut().for_each(|x| *x -= top);
        }
        // One pass over all rows: a row is often shorter than a few
        // vectors, and its remainder would run lane by lane.
        scores.iter_mut().for_each(|x| *x = exp(*x));
        for row in scores.chunks_exact_mut(key_bias.len()) {
            let total = sum(row);
            row.iter_mut().for_each(|x| *x /= total);
        }
    }
}

widest_fn! {
    /// The gradient of the scores from that of the weights after dropout
    /// (`ds`, in place; rows of `seq`): through dropout's factors `keep`,
    /// then softmax, dS = P (dW - rowsum(dW P)).
    fn softmax_gradient_rows / softmax_gradient_rows_at(
        ds: &mut [f32],
        probs: &[f32],
        keep: Option<&[f32]>,
        seq: usize,
    ) {
        if let Some(keep) = keep {
            ds.iter_mut().zip(keep).for_each(|(x, m)| *x *= m);
        }
        for (ds, p) in ds.chunks_exact_mut(seq).zip(probs.chunks_exact(seq)) {
            let dot = dot(ds, p);
            ds.iter_mut().zip(p).for_each(|(g, p)| *g = p * (*g - dot));
        }
    }
}

/// The context `[rows, hidden]`, and, when `save` (for the backward
/// pass), each task's attention weights before dropout.
fn forward(
    qkv: &[f32],
    key_bias: &[f32],
    spans: &Spans,
    keep: Option<&[f32]>,
    save: bool,
) -> (FlexTensor, Vec<Vec<f32>>) {
    let (hidden, d) = (spans.hidden(), spans.head_dim);
    let row = 3 * hidden;
    assert_eq!(qkv.len(), spans.rows() * row, "qkv shape");
    assert_eq!(key_bias.len(), spans.rows(), "key bias shape");
    // Per task: its head's context [len, head_dim] and its weights.
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..spans.tasks())
        .into_par_iter()
        .map(|t| {
            let [q, k, v] = spans.parts(qkv, t);
            let (start, s) = spans.span(t);
            let mut p = product_output((s, s, d), (q, (row, 1)), (k, (1, row)), spans.scale(), ONE);
            softmax_rows(&mut p, &key_bias[start..start + s]);
            let weights = dropped(&p, spans.keep(keep, t));
            let context = product_output((s, d, s), (&weights, (s, 1)), (v, (row, 1)), 1.0, ONE);
            (context, if save { p } else { Vec::new() })
        })
        .collect();
    // The heads interleaved back into tokens.
    let mut context = zeros(spans.rows() * hidden);
    context
        .par_chunks_mut(hidden)
        .enumerate()
        .for_each(|(token, out)| {
            let (b, i) = spans.place(token);
            for (h, out) in out.chunks_exact_mut(d).enumerate() {
                out.copy_from_slice(&per_head[b * spans.heads + h].0[i * d..(i + 1) * d]);
            }
        });
    let probs = per_head.into_iter().map(|(_, p)| p).collect();
    (flex_tensor(context, [spans.rows(), hidden]), probs)
}

/// The gradient of the fused projection `[rows, 3 * hidden]` from that of
/// the context.
fn backward(
    grad: &[f32],
    qkv: &[f32],
    probs: &[Vec<f32>],
    keep: Option<&[f32]>,
    spans: &Spans,
) -> FlexTensor {
    let (hidden, d) = (spans.hidden(), spans.head_dim);
    let row = 3 * hidden;
    assert_eq!(grad.len(), spans.rows() * hidden, "context gradient shape");
    // Per task: the gradients of its queries, keys and values.
    let per_head: Vec<[Vec<f32>; 3]> = (0..spans.tasks())
        .into_par_iter()
        .map(|t| {
            let [q, k, v] = spans.parts(qkv, t);
            let (start, s) = spans.span(t);
            let g = &grad[start * hidden + (t % spans.heads) * d..];
            let p = &probs[t];
            let keep = spans.keep(keep, t);
            // Values: dV = weights^T dC, the weights after dropout.
            let weights = dropped(p, keep);
            let dv = product_output((s, d, s), (&weights, (1, s)), (g, (hidden, 1)), 1.0, ONE);
            // Weights: dW = dC V^T, through dropout's factors.
            let mut ds = product_output((s, s, d), (g, (hidden, 1)), (v, (1, row)), 1.0, ONE);
            softmax_gradient_rows(&mut ds, p, keep, s);
            // Queries and keys, through the scaled product.
            let scale = spans.scale();
            let dq = product_output((s, d, s), (&ds, (s, 1)), (k, (row, 1)), scale, ONE);
            let dk = product_output((s, d, s), (&ds, (1, s)), (q, (row, 1)), scale, ONE);
            [dq, dk, dv]
        })
        .collect();
    let mut d_qkv = zeros(spans.rows() * row);
    d_qkv
        .par_chunks_mut(row)
        .enumerate()
        .for_each(|(token, out)| {
            let (b, i) = spans.place(token);
            for (part, out) in out.chunks_exact_mut(hidden).enumerate() {
                for (h, out) in out.chunks_exact_mut(d).enumerate() {
                    out.copy_from_slice(&per_head[b * spans.heads + h][part][i * d..(i + 1) * d]);
                }
            }
        });
    flex_tensor(d_qkv, [spans.rows(), row])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu_kernels::{test_tensor, test_values, GENERATOR};

    type Tracked = burn::backend::Autodiff<Flex>;

    const SHAPE: Heads = Heads {
        batch: 3,
        seq: 7,
        heads: 2,
        head_dim: 5,
    };

    /// The lengths of `SHAPE`'s sequences: packed, the rows of its padded
    /// batch that hold tokens.
    const LENGTHS: [usize; 3] = [7, 4, 1];

    /// The additive key mask of `SHAPE`'s padded batch, row by row.
    fn padded_bias() -> Vec<f32> {
        (0..SHAPE.batch * SHAPE.seq)
            .map(|i| {
                if i % SHAPE.seq < LENGTHS[i / SHAPE.seq] {
                    0.0
                } else {
                    f32::MIN
                }
            })
            .collect()
    }

    fn inputs<B: Backend>(device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) {
        let tokens = SHAPE.batch * SHAPE.seq;
        let qkv = test_tensor([tokens, 3 * SHAPE.hidden()], 1, device);
        let weights = test_tensor([tokens, SHAPE.hidden()], 2, device);
        let bias = TensorData::new(padded_bias(), [SHAPE.batch, SHAPE.seq]);
        (qkv, Tensor::from_data(bias, device), weights)
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-5, "{what}[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn fused_attention_matches_burns_ops_at_inference() {
        let device = Default::default();
        let (qkv, bias, _) = inputs::<Flex>(&device);
        let fused = self_attention(qkv.clone(), bias.clone(), SHAPE, 0.1);
        let ops = by_ops(qkv, bias, SHAPE, 0.1);
        assert_close(&test_values(fused), &test_values(ops), "context");
    }

    #[test]
    fn fused_attention_matches_burns_ops_in_value_and_gradient() {
        let device = Default::default();
        for prob in [0.0, 0.3] {
            let run = |f: fn(
                Tensor<Tracked, 2>,
                Tensor<Tracked, 2>,
                Heads,
                f64,
            ) -> Tensor<Tracked, 2>| {
                let (qkv, bias, weights) = inputs::<Tracked>(&device);
                let qkv = qkv.require_grad();
                // The dropout seed is drawn from the generator, reseeded here.
                let _generator = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
                Tracked::seed(&device, 5);
                let context = f(qkv.clone(), bias, SHAPE, prob);
                let grads = (context.clone() * weights).sum().backward();
                (test_values(context), test_values(qkv.grad(&grads).unwrap()))
            };
            let (fused, fused_grad) = run(self_attention);
            let (ops, ops_grad) = run(by_ops);
            assert_close(&fused, &ops, "context");
            assert_close(&fused_grad, &ops_grad, "qkv gradient");
        }
    }

    fn real_rows(padded: &[f32], width: usize) -> Vec<f32> {
        let mut rows = Vec::new();
        for (b, &len) in LENGTHS.iter().enumerate() {
            let at = b * SHAPE.seq * width;
            rows.extend_from_slice(&padded[at..at + len * width]);
        }
        rows
    }

    fn packed_inputs<B: Backend>(device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let rows: usize = LENGTHS.iter().sum();
        let qkv = test_tensor([rows, 3 * SHAPE.hidden()], 3, device);
        let weights = test_tensor([rows, SHAPE.hidden()], 4, device);
        (qkv, weights)
    }

    #[test]
    fn packed_attention_matches_burns_ops_in_value_and_gradient() {
        let device = Default::default();
        type Attend = fn(Tensor<Tracked, 2>, &[usize], usize, f64) -> Tensor<Tracked, 2>;
        let run = |f: Attend| {
            let (qkv, weights) = packed_inputs::<Tracked>(&device);
            let qkv = qkv.require_grad();
            let context = f(qkv.clone(), &LENGTHS, SHAPE.heads, 0.0);
            let grads = (context.clone() * weights).sum().backward();
            (test_values(context), test_values(qkv.grad(&grads).unwrap()))
        };
        let (fused, fused_grad) = run(packed_self_attention);
        let (ops, ops_grad) = run(packed_by_ops);
        assert_close(&fused, &ops, "context");
        assert_close(&fused_grad, &ops_grad, "qkv gradient");
        // Inference: no dropout whatever the probability.
        let (qkv, _) = packed_inputs::<Flex>(&device);
        let fused = packed_self_attention(qkv.clone(), &LENGTHS, SHAPE.heads, 0.1);
        let ops = packed_by_ops(qkv, &LENGTHS, SHAPE.heads, 0.1);
        assert_close(&test_values(fused), &test_values(ops), "inference context");
    }

    /// With dropout the packed layout's mask is its own; laid out in the
    /// padded batch it must give the padded kernel's values and gradients
    /// on the real rows (checked against burn's ops above).
    #[test]
    fn packed_attention_with_dropout_equals_the_padded_kernel_on_real_rows() {
        let device = Default::default();
        let packed = Spans::new(LENGTHS.to_vec(), SHAPE.heads, SHAPE.head_dim);
        let padded = Spans::padded(SHAPE);
        let width = 3 * SHAPE.hidden();
        let (qkv, grad) = packed_inputs::<Flex>(&device);
        let (qkv, grad) = (test_values(qkv), test_values(grad));
        let keep = mask(*packed.keep_at.last().unwrap(), 0.3, 11);
        // The same values, factors and upstream gradient in the padded
        // layout; padding rows hold values that must not matter.
        let mut padded_qkv =
            test_values(test_tensor::<Flex, 1>([padded.rows() * width], 9, &device));
        let mut padded_grad = vec![0.0; padded.rows() * SHAPE.hidden()];
        let mut padded_keep = vec![1.0; *padded.keep_at.last().unwrap()];
        for token in 0..packed.rows() {
            let (b, i) = packed.place(token);
            let at = b * SHAPE.seq + i;
            padded_qkv[at * width..(at + 1) * width]
                .copy_from_slice(&qkv[token * width..(token + 1) * width]);
            let hidden = SHAPE.hidden();
            padded_grad[at * hidden..(at + 1) * hidden]
                .copy_from_slice(&grad[token * hidden..(token + 1) * hidden]);
        }
        for t in 0..packed.tasks() {
            let len = packed.span(t).1;
            let from = packed.keep(Some(&keep), t).unwrap();
            let to = &mut padded_keep[padded.keep_at[t]..padded.keep_at[t + 1]];
            for (r, row) in from.chunks_exact(len).enumerate() {
                to[r * SHAPE.seq..r * SHAPE.seq + len].copy_from_slice(row);
            }
        }
        let bias = padded_bias();
        let (context, probs) = forward(&qkv, &vec![0.0; packed.rows()], &packed, Some(&keep), true);
        let (padded_context, padded_probs) =
            forward(&padded_qkv, &bias, &padded, Some(&padded_keep), true);
        let values = |t: FlexTensor| t.into_data().into_vec::<f32>().unwrap();
        assert_close(
            &values(context),
            &real_rows(&values(padded_context), SHAPE.hidden()),
            "context",
        );
        let d_qkv = backward(&grad, &qkv, &probs, Some(&keep), &packed);
        let padded_d_qkv = backward(
            &padded_grad,
            &padded_qkv,
            &padded_probs,
            Some(&padded_keep),
            &padded,
        );
        assert_close(
            &values(d_qkv),
            &real_rows(&values(padded_d_qkv), width),
            "qkv gradient",
        );
    }
}
