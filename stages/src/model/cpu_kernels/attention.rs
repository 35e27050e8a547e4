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
use super::{flex_tensor, flex_values, on_cpu, OnCpu};

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
            back.wrap(forward(&flex_values(&qkv), &bias, shape, None, None))
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
                    let mut probs = vec![0.0; shape.tasks() * shape.seq * shape.seq];
                    let values = flex_values(&qkv.primitive);
                    let context = forward(
                        &values,
                        &bias,
                        shape,
                        Some(&mut probs),
                        keep.as_deref().map(Vec::as_slice),
                    );
                    let saved = Saved {
                        shape,
                        qkv: qkv.primitive,
                        probs: Arc::new(probs),
                        keep,
                    };
                    back.wrap(prep.finish(saved, context))
                }
                OpsKind::UnTracked(prep) => {
                    let context = forward(&flex_values(&qkv.primitive), &bias, shape, None, None);
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
    /// The attention weights before dropout, `[batch, heads, seq, seq]`.
    probs: Arc<Vec<f32>>,
    /// Dropout's factors (0 or 1 / keep), laid out as `probs`.
    keep: Option<Arc<Vec<f32>>>,
}

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

/// `dst = beta * lhs * rhs` for row-major `dst` (`m x n`, row stride
/// `dst_rs`), with each operand given by its strides along its rows and
/// columns. One thread: the callers run one of these per task.
#[allow(clippy::too_many_arguments)]
fn product(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    // The bounds gemm will touch, checked here because it takes pointers.
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, dst_rs, 1) < dst.len());
    assert!(last(m, k, lhs_rs, lhs_cs) < lhs.len());
    assert!(last(k, n, rhs_rs, rhs_cs) < rhs.len());
    // SAFETY: every element gemm reads or writes lies inside the slices
    // (checked above), and `dst` does not overlap the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Attention weights in place: `scores` (rows of `seq`) plus the key bias,
/// then softmax along each row.
fn softmax_rows(scores: &mut [f32], key_bias: &[f32]) {
    for row in scores.chunks_exact_mut(key_bias.len()) {
        let mut max = f32::NEG_INFINITY;
        for (x, b) in row.iter_mut().zip(key_bias) {
            *x += b;
            max = max.max(*x);
        }
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for x in row.iter_mut() {
            *x /= sum;
        }
    }
}

/// The context `[batch * seq, hidden]`; the weights go to `probs` (laid
/// out `[batch, heads, seq, seq]`) when given, for the backward pass.
fn forward(
    qkv: &[f32],
    key_bias: &[f32],
    shape: Heads,
    probs: Option<&mut [f32]>,
    keep: Option<&[f32]>,
) -> FlexTensor {
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
    let head = |t: usize, out: &mut [f32], p: &mut [f32]| {
        let (b, h) = (t / heads, t % heads);
        let at = b * s * row + h * d;
        let (q, k, v) = (&qkv[at..], &qkv[at + hidden..], &qkv[at + 2 * hidden..]);
        product((s, s, d), p, s, q, (row, 1), k, (1, row), shape.scale());
        softmax_rows(p, &key_bias[b * s..(b + 1) * s]);
        match keep {
            Some(keep) => {
                let dropped: Vec<f32> = p
                    .iter()
                    .zip(&keep[t * s * s..(t + 1) * s * s])
                    .map(|(p, m)| p * m)
                    .collect();
                product((s, d, s), out, d, &dropped, (s, 1), v, (row, 1), 1.0);
            }
            None => product((s, d, s), out, d, p, (s, 1), v, (row, 1), 1.0),
        }
    };
    // Each task writes its heads' context to its own block, [batch, heads,
    // seq, head_dim]; the blocks are interleaved into tokens afterwards.
    let mut per_head = vec![0.0f32; shape.tasks() * s * d];
    match probs {
        Some(probs) => per_head
            .par_chunks_mut(s * d)
            .zip(probs.par_chunks_mut(s * s))
            .enumerate()
            .for_each(|(t, (out, p))| head(t, out, p)),
        None => per_head
            .par_chunks_mut(s * d)
            .enumerate()
            .for_each(|(t, out)| head(t, out, &mut vec![0.0; s * s])),
    }
    let mut context = vec![0.0f32; batch * s * hidden];
    context
        .par_chunks_mut(hidden)
        .enumerate()
        .for_each(|(token, out)| {
            let (b, i) = (token / s, token % s);
            for (h, out) in out.chunks_exact_mut(d).enumerate() {
                let from = ((b * heads + h) * s + i) * d;
                out.copy_from_slice(&per_head[from..from + d]);
            }
        });
    flex_tensor(context, [batch * s, hidden])
}

/// The gradient of the fused projection `[batch * seq, 3 * hidden]` from
/// that of the context.
fn backward(
    grad: &[f32],
    qkv: &[f32],
    probs: &[f32],
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
    // Per task: the gradients of its queries, keys and values, one block
    // each, [batch, heads, 3, seq, head_dim].
    let mut per_head = vec![0.0f32; shape.tasks() * 3 * s * d];
    per_head
        .par_chunks_mut(3 * s * d)
        .enumerate()
        .for_each(|(t, out)| {
            let (b, h) = (t / heads, t % heads);
            let at = b * s * row + h * d;
            let (q, k, v) = (&qkv[at..], &qkv[at + hidden..], &qkv[at + 2 * hidden..]);
            let g = &grad[b * s * hidden + h * d..];
            let p = &probs[t * s * s..(t + 1) * s * s];
            let keep = keep.map(|keep| &keep[t * s * s..(t + 1) * s * s]);
            let (dq, rest) = out.split_at_mut(s * d);
            let (dk, dv) = rest.split_at_mut(s * d);
            // Values: dV = weights^T dC, the weights after dropout.
            match keep {
                Some(keep) => {
                    let dropped: Vec<f32> = p.iter().zip(keep).map(|(p, m)| p * m).collect();
                    product((s, d, s), dv, d, &dropped, (1, s), g, (hidden, 1), 1.0);
                }
                None => product((s, d, s), dv, d, p, (1, s), g, (hidden, 1), 1.0),
            }
            // Weights: dW = dC V^T, through dropout's factors.
            let mut ds = vec![0.0f32; s * s];
            product((s, s, d), &mut ds, s, g, (hidden, 1), v, (1, row), 1.0);
            if let Some(keep) = keep {
                ds.iter_mut().zip(keep).for_each(|(x, m)| *x *= m);
            }
            // Scores, through softmax: dS = P (dW - rowsum(dW P)).
            for (ds, p) in ds.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
                let dot: f32 = ds.iter().zip(p).map(|(g, p)| g * p).sum();
                ds.iter_mut().zip(p).for_each(|(g, p)| *g = p * (*g - dot));
            }
            // Queries and keys, through the scaled product.
            product((s, d, s), dq, d, &ds, (s, 1), k, (row, 1), shape.scale());
            product((s, d, s), dk, d, &ds, (1, s), q, (row, 1), shape.scale());
        });
    let mut d_qkv = vec![0.0f32; batch * s * row];
    d_qkv
        .par_chunks_mut(row)
        .enumerate()
        .for_each(|(token, out)| {
            let (b, i) = (token / s, token % s);
            for (part, out) in out.chunks_exact_mut(hidden).enumerate() {
                for (h, out) in out.chunks_exact_mut(d).enumerate() {
                    let from = (((b * heads + h) * 3 + part) * s + i) * d;
                    out.copy_from_slice(&per_head[from..from + d]);
                }
            }
        });
    flex_tensor(d_qkv, [batch * s, row])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu_kernels::{test_tensor, GENERATOR};
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

    fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    #[test]
    fn fused_attention_matches_burns_ops_at_inference() {
        let device = Default::default();
        let (qkv, bias, _) = inputs::<Flex>(&device);
        let fused = self_attention(qkv.clone(), bias.clone(), SHAPE, 0.1);
        let ops = by_ops(qkv, bias, SHAPE, 0.1);
        assert_close(&values(fused), &values(ops), "context");
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
                (values(context), values(qkv.grad(&grads).unwrap()))
            };
            let (fused, fused_grad) = run(self_attention);
            let (ops, ops_grad) = run(by_ops);
            assert_close(&fused, &ops, "context");
            assert_close(&fused_grad, &ops_grad, "qkv gradient");
        }
    }
}
