//! Layer normalisation under autodiff on the CPU backend as one operation.
//!
//! burn's CPU backend has a fused, parallel layer norm for inference, but
//! under autodiff the norm is spelled out in a dozen tracked whole-tensor
//! operations (mean, centring, variance, square root, division, scale,
//! shift) and as many in the backward pass, each on one thread. Here the
//! forward pass keeps the normalised rows and their inverse deviations, and
//! the backward pass is one parallel sweep over the rows, plus the
//! parameters' gradients summed down the rows (`column_sums`).

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::nn::LayerNorm;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::{column_sums, flex_tensor, flex_values, on_cpu, zeros, OnCpu};
use crate::vector::{dot, sum, widest_fn};

/// Rows per parallel task.
const ROWS: usize = 64;

/// `norm` applied to the rows of `x` (`[rows, width]`); `epsilon` is the
/// norm's own (burn keeps it private).
pub fn layer_norm<B: Backend>(norm: &LayerNorm<B>, epsilon: f64, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let (x, back) = match on_cpu(x) {
        OnCpu::Tracked(x, back) => (x, back),
        // burn's own kernel, fused and parallel on the CPU backend.
        OnCpu::Plain(x, back) => return norm.forward(back.wrap(x)),
        OnCpu::Elsewhere(x) => return norm.forward(x),
    };
    let gamma = norm.gamma.val();
    let beta = match &norm.beta {
        Some(beta) => beta.val(),
        None => Tensor::zeros(gamma.dims(), &gamma.device()),
    };
    let (OnCpu::Tracked(gamma, _), OnCpu::Tracked(beta, _)) = (on_cpu(gamma), on_cpu(beta)) else {
        unreachable!("one backend")
    };
    let shape = x.primitive.layout().shape().clone();
    let width = shape[1];
    let values = flex_values(&x.primitive);
    let (scale, shift) = (flex_values(&gamma.primitive), flex_values(&beta.primitive));
    let mut out = zeros(values.len());
    let mut normalised = zeros(values.len());
    let mut inverse_deviation = vec![0.0f32; shape[0]];
    out.par_chunks_mut(ROWS * width)
        .zip(normalised.par_chunks_mut(ROWS * width))
        .zip(inverse_deviation.par_chunks_mut(ROWS))
        .zip(values.par_chunks(ROWS * width))
        .for_each(|(((out, normalised), inverse), x)| {
            normalise_rows(out, normalised, inverse, x, &scale, &shift, epsilon as f32)
        });
    let output = flex_tensor(out, shape);
    match Norm
        .prepare::<NoCheckpointing>([x.node.clone(), gamma.node.clone(), beta.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let saved = Saved {
                normalised: Arc::new(normalised),
                inverse_deviation: Arc::new(inverse_deviation),
                gamma: gamma.primitive,
            };
            back.wrap(prep.finish(saved, output))
        }
        OpsKind::UnTracked(prep) => back.wrap(prep.finish(output)),
    }
}

#[derive(Clone, Debug)]
struct Saved {
    /// (x - mean) / sqrt(var + eps), row by row.
    normalised: Arc<Vec<f32>>,
    /// 1 / sqrt(var + eps) of each row.
    inverse_deviation: Arc<Vec<f32>>,
    gamma: FlexTensor,
}

#[derive(Debug)]
struct Norm;

impl Backward<Flex, 3> for Norm {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, gamma_node, beta_node] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        let saved = ops.state;
        let shape = grad.layout().shape().clone();
        let width = shape[1];
        let g = flex_values(&grad);
        let normalised = &saved.normalised;
        if let Some(node) = x_node {
            let gamma = flex_values(&saved.gamma);
            let mut dx = zeros(g.len());
            dx.par_chunks_mut(ROWS * width)
                .zip(g.par_chunks(ROWS * width))
                .zip(normalised.par_chunks(ROWS * width))
                .zip(saved.inverse_deviation.par_chunks(ROWS))
                .for_each(|(((dx, g), normalised), inverse)| {
                    input_gradient_rows(dx, g, normalised, inverse, &gamma)
                });
            grads.register::<Flex>(node.id, flex_tensor(dx, shape));
        }
        if gamma_node.is_none() && beta_node.is_none() {
            return;
        }
        // gamma's gradient sums g x^ down the rows, beta's g.
        let scaled: Vec<f32> = g
            .par_iter()
            .zip(normalised.par_iter())
            .map(|(g, n)| g * n)
            .collect();
        let (d_gamma, d_beta) = (column_sums(&scaled, width), column_sums(&g, width));
        if let Some(node) = gamma_node {
            grads.register::<Flex>(node.id, flex_tensor(d_gamma, [width]));
        }
        if let Some(node) = beta_node {
            grads.register::<Flex>(node.id, flex_tensor(d_beta, [width]));
        }
    }
}

widest_fn! {
    /// Layer norm of the rows of `x` (as wide as `scale`) into `out`,
    /// keeping each row's normalised values and inverse deviation.
    fn normalise_rows / normalise_rows_at(
        out: &mut [f32],
        normalised: &mut [f32],
        inverse: &mut [f32],
        x: &[f32],
        scale: &[f32],
        shift: &[f32],
        epsilon: f32,
    ) {
        let width = scale.len();
        let rows = out
            .chunks_exact_mut(width)
            .zip(normalised.chunks_exact_mut(width))
            .zip(inverse.iter_mut())
            .zip(x.chunks_exact(width));
        for (((out, normalised), inverse), x) in rows {
            let mean = sum(x) / width as f32;
            // The centred values, in `normalised` until it is scaled.
            normalised.iter_mut().zip(x).for_each(|(n, x)| *n = x - mean);
            let variance = dot(normalised, normalised) / width as f32;
            *inverse = 1.0 / (variance + epsilon).sqrt();
            for ((o, n), (g, b)) in out
                .iter_mut()
                .zip(normalised.iter_mut())
                .zip(scale.iter().zip(shift))
            {
                *n *= *inverse;
                *o = *n * g + b;
            }
        }
    }
}

widest_fn! {
    /// dx = r (g gamma - mean(g gamma) - x^ mean(g gamma x^)) for rows as
    /// wide as `gamma`: r the row's inverse deviation, x^ its normalised
    /// values.
    fn input_gradient_rows / input_gradient_rows_at(
        dx: &mut [f32],
        g: &[f32],
        normalised: &[f32],
        inverse: &[f32],
        gamma: &[f32],
    ) {
        let width = gamma.len();
        let rows = dx
            .chunks_exact_mut(width)
            .zip(g.chunks_exact(width))
            .zip(normalised.chunks_exact(width))
            .zip(inverse);
        for (((dx, g), n), r) in rows {
            // g gamma, kept in dx until dx is computed from it.
            dx.iter_mut()
                .zip(g.iter().zip(gamma))
                .for_each(|(d, (g, w))| *d = g * w);
            let mean = sum(dx) / width as f32;
            let mean_dot = dot(dx, n) / width as f32;
            for (dx, n) in dx.iter_mut().zip(n) {
                *dx = r * (*dx - mean - n * mean_dot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu_kernels::{test_tensor, test_values};
    use burn::module::Param;
    use burn::nn::LayerNormConfig;

    type Tracked = burn::backend::Autodiff<Flex>;

    #[test]
    fn layer_norm_matches_burns_in_value_and_gradients() {
        let device = Default::default();
        // Rows spanning three parallel tasks.
        let (rows, width, epsilon) = (2 * ROWS + 5, 24, 1e-5);
        let mut norm: LayerNorm<Tracked> = LayerNormConfig::new(width)
            .with_epsilon(epsilon)
            .init(&device);
        norm.gamma = Param::from_tensor(test_tensor([width], 1, &device));
        norm.beta = Some(Param::from_tensor(test_tensor([width], 2, &device)));
        let run = |ours: bool| {
            let x = test_tensor::<Tracked, 2>([rows, width], 3, &device).require_grad();
            let weights = test_tensor::<Tracked, 2>([rows, width], 4, &device);
            let y = if ours {
                layer_norm(&norm, epsilon, x.clone())
            } else {
                norm.forward(x.clone())
            };
            let grads = (y.clone() * weights).sum().backward();
            let beta = norm.beta.as_ref().unwrap();
            [
                test_values(y),
                test_values(x.grad(&grads).unwrap()),
                test_values(norm.gamma.val().grad(&grads).unwrap()),
                test_values(beta.val().grad(&grads).unwrap()),
            ]
        };
        let (ours, burns) = (run(true), run(false));
        for (what, (a, b)) in ["output", "dx", "dgamma", "dbeta"]
            .iter()
            .zip(ours.iter().zip(&burns))
        {
            assert_eq!(a.len(), b.len());
            for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                assert!((x - y).abs() < 1e-4, "{what}[{i}]: {x} vs {y}");
            }
        }
    }
}
