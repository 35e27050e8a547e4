//! The dense layer `x W + b` on the CPU backend, forward and backward, as
//! matrix products straight into their output buffers.
//!
//! burn's CPU backend builds every product's output through a zeroed byte
//! vector that it then copies into an aligned buffer, adds the bias in a
//! second, one-threaded broadcasting pass, and sums the bias gradient on
//! one thread too: together about a tenth of an mE5-small training step.
//! Here the output starts as the bias rows and the product accumulates onto
//! them; the bias gradient is summed in parallel (`column_sums`).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::{column_sums, flex_tensor, flex_values, on_cpu, OnCpu};
use crate::matmul::{product, product_output};

/// The products here are large: gemm splits them over all threads.
const ALL: gemm::Parallelism = gemm::Parallelism::Rayon(0);

/// `x W + b` for `x` `[rows, in]`, `weight` `[in, out]` (burn's layout)
/// and `bias` `[out]`.
pub fn linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Tensor<B, 1>,
) -> Tensor<B, 2> {
    let (x, back) = match on_cpu(x) {
        OnCpu::Elsewhere(x) => return burn::tensor::module::linear(x, weight, Some(bias)),
        OnCpu::Plain(x, back) => {
            let (OnCpu::Plain(w, _), OnCpu::Plain(b, _)) = (on_cpu(weight), on_cpu(bias)) else {
                unreachable!("one backend")
            };
            return back.wrap(forward(&x, &w, &b));
        }
        OnCpu::Tracked(x, back) => (x, back),
    };
    let (OnCpu::Tracked(w, _), OnCpu::Tracked(b, _)) = (on_cpu(weight), on_cpu(bias)) else {
        unreachable!("one backend")
    };
    let output = forward(&x.primitive, &w.primitive, &b.primitive);
    match Dense
        .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => back.wrap(prep.finish((x.primitive, w.primitive), output)),
        OpsKind::UnTracked(prep) => back.wrap(prep.finish(output)),
    }
}

fn dims(t: &FlexTensor) -> [usize; 2] {
    let shape = t.layout().shape();
    [shape[0], shape[1]]
}

fn forward(x: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor) -> FlexTensor {
    let ([rows, inputs], [w_in, outputs]) = (dims(x), dims(weight));
    assert_eq!(inputs, w_in, "linear: input width");
    let (x, weight, bias) = (flex_values(x), flex_values(weight), flex_values(bias));
    assert_eq!(bias.len(), outputs, "linear: bias width");
    // The output starts as the bias rows, and the product adds onto them.
    let mut out = Vec::with_capacity(rows * outputs);
    let dst = &mut out.spare_capacity_mut()[..rows * outputs];
    dst.par_chunks_mut(outputs).for_each(|row| {
        for (o, b) in row.iter_mut().zip(bias.iter()) {
            o.write(*b);
        }
    });
    product(
        (rows, outputs, inputs),
        dst,
        true,
        &x,
        (inputs, 1),
        &weight,
        (outputs, 1),
        1.0,
        ALL,
    );
    // SAFETY: every element was written above, then updated by gemm.
    unsafe { out.set_len(rows * outputs) };
    flex_tensor(out, [rows, outputs])
}

#[derive(Debug)]
struct Dense;

impl Backward<Flex, 3> for Dense {
    /// The input and the weight.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, w_node, b_node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let (x, weight) = ops.state;
        let ([rows, inputs], [_, outputs]) = (dims(&x), dims(&weight));
        let g = flex_values(&grad);
        if let Some(node) = x_node {
            // dx = g W^T
            let w = flex_values(&weight);
            let shape = (rows, inputs, outputs);
            let dx = product_output(shape, (&g, (outputs, 1)), (&w, (1, outputs)), 1.0, ALL);
            grads.register::<Flex>(node.id, flex_tensor(dx, [rows, inputs]));
        }
        if let Some(node) = w_node {
            // dW = x^T g
            let x = flex_values(&x);
            let shape = (inputs, outputs, rows);
            let dw = product_output(shape, (&x, (1, inputs)), (&g, (outputs, 1)), 1.0, ALL);
            grads.register::<Flex>(node.id, flex_tensor(dw, [inputs, outputs]));
        }
        if let Some(node) = b_node {
            let db = column_sums(&g, outputs);
            grads.register::<Flex>(node.id, flex_tensor(db, [outputs]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu_kernels::{test_tensor, test_values};

    type Tracked = burn::backend::Autodiff<Flex>;

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-4, "{what}[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn dense_layer_matches_burns_in_value_and_gradients() {
        let device = Default::default();
        // Rows spanning two blocks of the bias gradient's sum.
        let (rows, inputs, outputs) = (256 + 37, 19, 23);
        let run = |f: fn(
            Tensor<Tracked, 2>,
            Tensor<Tracked, 2>,
            Tensor<Tracked, 1>,
        ) -> Tensor<Tracked, 2>| {
            let x = test_tensor::<Tracked, 2>([rows, inputs], 1, &device).require_grad();
            let w = test_tensor::<Tracked, 2>([inputs, outputs], 2, &device).require_grad();
            let b = test_tensor::<Tracked, 1>([outputs], 3, &device).require_grad();
            let weights = test_tensor::<Tracked, 2>([rows, outputs], 4, &device);
            let y = f(x.clone(), w.clone(), b.clone());
            let grads = (y.clone() * weights).sum().backward();
            [
                test_values(y),
                test_values(x.grad(&grads).unwrap()),
                test_values(w.grad(&grads).unwrap()),
                test_values(b.grad(&grads).unwrap()),
            ]
        };
        let ours = run(linear);
        let burns = run(|x, w, b| burn::tensor::module::linear(x, w, Some(b)));
        for (what, (a, b)) in ["output", "dx", "dW", "db"]
            .iter()
            .zip(ours.iter().zip(&burns))
        {
            assert_close(a, b, what);
        }
        // Inference takes the same path without the graph.
        let x = test_tensor::<Flex, 2>([rows, inputs], 1, &device);
        let w = test_tensor::<Flex, 2>([inputs, outputs], 2, &device);
        let b = test_tensor::<Flex, 1>([outputs], 3, &device);
        let plain = test_values(linear(x.clone(), w.clone(), b.clone()));
        assert_close(
            &plain,
            &test_values(burn::tensor::module::linear(x, w, Some(b))),
            "output",
        );
    }
}
