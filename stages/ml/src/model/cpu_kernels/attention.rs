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
use burn::tensor::Tensor;
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

    /// One task per (sequence, head), in `[batch, heads]` order.
    fn tasks(&self) -> usize {
        self.batch * self.heads
    }

    fn scale(&self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }

    /// Task `t`'s queries, keys and values, each from its first element
    /// in the fused projection (rows `3 * hidden` apart).
    fn parts<'a>(&self, qkv: &'a [f32], t: usize) -> [&'a [f32]; 3] {
        let hidden = self.hidden();
        let (b, h) = (t / self.heads, t % self.heads);
        let at = b * self.seq * 3 * hidden + h * self.head_dim;
        [&qkv[at..], &qkv[at + hidden..], &qkv[at + 2 * hidden..]]
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
    let device = qkv.device();
    match on_cpu(qkv) {
        OnCpu::Elsewhere(qkv) => by_ops(qkv, key_bias, shape, prob),
        OnCpu::Plain(qkv, back) => {
            let bias = bias_values(key_bias);
            back.wrap(forward(&flex_values(&qkv), &bias, shape, None, false).0)
        }
        OnCpu::Tracked(qkv, back) => {
            let bias = bias_values(key_bias);
            match FusedAttention
                .prepare::<NoCheckpointing>([qkv.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let keep = (prob > 0.0).then(|| {
                        Arc::new(mask(
                            shape.tasks() * shape.seq * shape.seq,
                            prob,
                            dropout_seed::<B>(&device),
                        ))
                    });
                    let values = flex_values(&qkv.primitive);
                    let keep_factors = keep.as_deref().map(Vec::as_slice);
                    let (context, probs) = forward(&values, &bias, shape, keep_factors, true);
                    let saved = Saved {
                        shape,
                        qkv: qkv.primitive,
                        probs: Arc::new(probs),
                        keep,
                    };
                    back.wrap(prep.finish(saved, context))
                }
                OpsKind::UnTracked(prep) => {
                    let values = flex_values(&qkv.primitive);
                    let (context, _) = forward(&values, &bias, shape, None, false);
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
    shape: Heads,
    /// The fused projection, `[batch * seq, 3 * hidden]`.
    qkv: FlexTensor,
    /// Each task's attention weights before dropout, `[seq, seq]`.
    probs: Arc<Vec<Vec<f32>>>,
    /// Dropout's factors (0 or 1 / keep), `[batch, heads, seq, seq]`.
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
                saved.shape,
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

/// The context `[batch * seq, hidden]`, and, when `save` (for the
/// backward pass), each task's attention weights before dropout.
fn forward(
    qkv: &[f32],
    key_bias: &[f32],
    shape: Heads,
    keep: Option<&[f32]>,
    save: bool,
) -> (FlexTensor, Vec<Vec<f32>>) {
    let Heads {
        batch,
        seq: s,
        heads,
        head_dim: d,
    } = shape;
    let hidden = shape.hidden();
    let row = 3 * hidden;
    assert_eq!(qkv.len(), batch * s * row, "qkv shape");
    assert_eq!(key_bias.len(), batch * s, "key bias shape");
    // Per task: its heads' context [seq, head_dim] and its weights.
    let per_head: Vec<(Vec<f32>, Vec<f32>)> = (0..shape.tasks())
        .into_par_iter()
        .map(|t| {
            let [q, k, v] = shape.parts(qkv, t);
            let mut p = product_output((s, s, d), (q, (row, 1)), (k, (1, row)), shape.scale(), ONE);
            let b = t / heads;
            softmax_rows(&mut p, &key_bias[b * s..(b + 1) * s]);
            let weights = dropped(&p, keep.map(|keep| &keep[t * s * s..(t + 1) * s * s]));
            let context = product_output((s, d, s), (&weights, (s, 1)), (v, (row, 1)), 1.0, ONE);
            (context, if save { p } else { Vec::new() })
        })
        .collect();
    // The heads interleaved back into tokens.
    let mut context = zeros(batch * s * hidden);
    context
        .par_chunks_mut(hidden)
        .enumerate()
        .for_each(|(token, out)| {
            let (b, i) = (token / s, token % s);
            for (h, out) in out.chunks_exact_mut(d).enumerate() {
                out.copy_from_slice(&per_head[b * heads + h].0[i * d..(i + 1) * d]);
            }
        });
    let probs = per_head.into_iter().map(|(_, p)| p).collect();
    (flex_tensor(context, [batch * s, hidden]), probs)
}

/// The gradient of the fused projection `[batch * seq, 3 * hidden]` from
/// that of the context.
fn backward(
    grad: &[f32],
    qkv: &[f32],
    probs: &[Vec<f32>],
    keep: Option<&[f32]>,
    shape: Heads,
) -> FlexTensor {
    let Heads {
        batch,
        seq: s,
        heads,
        head_dim: d,
    } = shape;
    let hidden = shape.hidden();
    let row = 3 * hidden;
    assert_eq!(grad.len(), batch * s * hidden, "context gradient shape");
    // Per task: the gradients of its queries, keys and values.
    let per_head: Vec<[Vec<f32>; 3]> = (0..shape.tasks())
        .into_par_iter()
        .map(|t| {
            let [q, k, v] = shape.parts(qkv, t);
            let (b, h) = (t / heads, t % heads);
            let g = &grad[b * s * hidden + h * d..];
            let p = &probs[t];
            let keep = keep.map(|keep| &keep[t * s * s..(t + 1) * s * s]);
            // Values: dV = weights^T dC, the weights after dropout.
            let weights = dropped(p, keep);
            let dv = product_output((s, d, s), (&weights, (1, s)), (g, (hidden, 1)), 1.0, ONE);
            // Weights: dW = dC V^T, through dropout's factors.
            let mut ds = product_output((s, s, d), (g, (hidden, 1)), (v, (1, row)), 1.0, ONE);
            softmax_gradient_rows(&mut ds, p, keep, s);
            // Queries and keys, through the scaled product.
            let scale = shape.scale();
            let dq = product_output((s, d, s), (&ds, (s, 1)), (k, (row, 1)), scale, ONE);
            let dk = product_output((s, d, s), (&ds, (1, s)), (q, (row, 1)), scale, ONE);
            [dq, dk, dv]
        })
        .collect();
    let mut d_qkv = zeros(batch * s * row);
    d_qkv
        .par_chunks_mut(row)
        .enumerate()
        .for_each(|(token, out)| {
            let (b, i) = (token / s, token % s);
            for (part, out) in out.chunks_exact_mut(hidden).enumerate() {
                for (h, out) in out.chunks_exact_mut(d).enumerate() {
                    out.copy_from_slice(&per_head[b * heads + h][part][i * d..(i + 1) * d]);
                }
            }
        });
    flex_tensor(d_qkv, [batch * s, row])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu_kernels::{test_tensor, test_values, GENERATOR};
    use burn::tensor::TensorData;

    type Tracked = burn::backend::Autodiff<Flex>;

    const SHAPE: Heads = Heads {
        batch: 3,
        seq: 7,
        heads: 2,
        head_dim: 5,
    };

    fn inputs<B: Backend>(device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) {
        let tokens = SHAPE.batch * SHAPE.seq;
        let qkv = test_tensor([tokens, 3 * SHAPE.hidden()], 1, device);
        let weights = test_tensor([tokens, SHAPE.hidden()], 2, device);
        // Sequence lengths 7, 4 and 1.
        let bias: Vec<f32> = (0..tokens)
            .map(|i| {
                let (b, t) = (i / SHAPE.seq, i % SHAPE.seq);
                if t < [7, 4, 1][b] {
                    0.0
                } else {
                    f32::MIN
                }
            })
            .collect();
        let bias = Tensor::from_data(TensorData::new(bias, [SHAPE.batch, SHAPE.seq]), device);
        (qkv, bias, weights)
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
}
