//! Dropout and exact GELU: element by element, in parallel on the CPU
//! backend, and under autodiff as one operation whose backward pass
//! multiplies the gradient by the saved slope (dropout's factors, or
//! gelu'(x)) in parallel too.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::nn::DropoutConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::{flex_tensor, flex_values, on_cpu, zeros, OnCpu, TrackedTensor};
use crate::rng::SplitMix64;
use crate::vector::{exp, widest_fn};

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// Zero each element with probability `prob` and scale the rest by
/// 1 / (1 - prob), while training (autodiff on); the identity otherwise.
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, prob: f64) -> Tensor<B, D> {
    let device = x.device();
    if prob == 0.0 || !B::ad_enabled(&device) {
        return x;
    }
    match on_cpu(x) {
        // On a GPU the backend's own kernel beats drawing on the host.
        OnCpu::Elsewhere(x) => DropoutConfig::new(prob).init().forward(x),
        OnCpu::Plain(..) => unreachable!("autodiff is on"),
        OnCpu::Tracked(x, back) => {
            let factors = mask(
                x.primitive.layout().num_elements(),
                prob,
                dropout_seed::<B>(&device),
            );
            let values = flex_values(&x.primitive);
            let mut dropped = zeros(factors.len());
            dropped
                .par_chunks_mut(CHUNK)
                .zip(values.par_chunks(CHUNK).zip(factors.par_chunks(CHUNK)))
                .for_each(|(out, (x, m))| product(out, x, m));
            back.wrap(scaled(x, dropped, factors))
        }
    }
}

thread_local! {
    /// This thread's stream of dropout seeds, once [`seed_dropout`] set it.
    static DROPOUT_SEEDS: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Draw the CPU kernels' dropout masks on this thread from a stream seeded
/// with `seed`, not from the backend's generator. That generator is one
/// for the whole process: two trainings running side by side (`--jobs 2`)
/// would interleave their draws and each get masks that depend on the
/// other's timing. A stage's work runs on one thread, so a stream per
/// thread is a stream per training.
pub fn seed_dropout(seed: u64) {
    DROPOUT_SEEDS.with(|s| s.set(Some(seed)));
}

/// 63 bits of seed for a dropout mask: from this thread's stream when
/// [`seed_dropout`] set one, else from the backend's generator in three
/// draws below 2^21 (the integer type may be 32 bits wide).
pub(super) fn dropout_seed<B: Backend>(device: &B::Device) -> u64 {
    if let Some(state) = DROPOUT_SEEDS.with(|s| s.get()) {
        let mut stream = SplitMix64(state);
        let seed = stream.next_u64() >> 1;
        DROPOUT_SEEDS.with(|s| s.set(Some(stream.0)));
        return seed;
    }
    Tensor::<B, 1, Int>::random([3], Distribution::Uniform(0.0, 2_097_152.0), device)
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("integer seed draws")
        .into_iter()
        .fold(0u64, |seed, part| (seed << 21) | part as u64)
}

/// Exact (erf) GELU, as Hugging Face's "gelu": x * Phi(x).
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    match on_cpu(x) {
        OnCpu::Elsewhere(x) => burn::tensor::activation::gelu(x),
        OnCpu::Plain(x, back) => {
            let values = flex_values(&x);
            let mut out = zeros(values.len());
            out.par_chunks_mut(CHUNK)
                .zip(values.par_chunks(CHUNK))
                .for_each(|(out, x)| gelu_values(out, x));
            back.wrap(flex_tensor(out, x.layout().shape().clone()))
        }
        OnCpu::Tracked(x, back) => {
            let values = flex_values(&x.primitive);
            let mut out = zeros(values.len());
            let mut slope = zeros(values.len());
            out.par_chunks_mut(CHUNK)
                .zip(slope.par_chunks_mut(CHUNK))
                .zip(values.par_chunks(CHUNK))
                .for_each(|((out, slope), x)| gelu_values_and_slopes(out, slope, x));
            back.wrap(scaled(x, out, slope))
        }
    }
}

/// The operation with output `values` whose gradient is the output's
/// gradient times `slope`, element by element.
fn scaled(x: TrackedTensor, values: Vec<f32>, slope: Vec<f32>) -> TrackedTensor {
    let output = flex_tensor(values, x.primitive.layout().shape().clone());
    match Scaled
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(Arc::new(slope), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

#[derive(Debug)]
struct Scaled;

impl Backward<Flex, 1> for Scaled {
    type State = Arc<Vec<f32>>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad: FlexTensor = grads.consume::<Flex>(&ops.node);
        if let Some(parent) = parent {
            let g = flex_values(&grad);
            let slope = ops.state;
            let mut out = zeros(g.len());
            out.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(slope.par_chunks(CHUNK)))
                .for_each(|(out, (g, s))| product(out, g, s));
            let shape = grad.layout().shape().clone();
            grads.register::<Flex>(parent.id, flex_tensor(out, shape));
        }
    }
}

widest_fn! {
    /// `out = a * b`, element by element.
    fn product / product_at(out: &mut [f32], a: &[f32], b: &[f32]) {
        out.iter_mut()
            .zip(a.iter().zip(b))
            .for_each(|(o, (a, b))| *o = a * b);
    }
}

widest_fn! {
    fn gelu_values / gelu_values_at(out: &mut [f32], x: &[f32]) {
        out.iter_mut()
            .zip(x)
            .for_each(|(o, x)| *o = gelu_and_slope(*x).0);
    }
}

widest_fn! {
    fn gelu_values_and_slopes / gelu_values_and_slopes_at(out: &mut [f32], slope: &mut [f32], x: &[f32]) {
        for ((o, s), x) in out.iter_mut().zip(slope.iter_mut()).zip(x) {
            (*o, *s) = gelu_and_slope(*x);
        }
    }
}

/// gelu(x) = x Phi(x) and its derivative Phi(x) + x phi(x).
#[inline(always)]
fn gelu_and_slope(x: f32) -> (f32, f32) {
    let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = exp(-0.5 * x * x) * 0.398_942_3; // 1 / sqrt(2 pi)
    (x * cdf, cdf + x * pdf)
}

/// erf in single precision, as Eigen's and XLA's: a rational function of x
/// on [-4, 4] (erf is +-1 in f32 beyond), within 1e-7 of libm's `erff`,
/// and free of branches so that the loops above vectorise.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    for a in [
        2.770_681_4e-8,
        -2.101_024e-6,
        -5.692_506_4e-5,
        -7.349_906_3e-4,
        -2.954_6e-3,
        -1.609_603_3e-2,
    ] {
        p = p * x2 + a;
    }
    let mut q = -1.456_607_2e-5f32;
    for b in [-2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_474e-2] {
        q = q * x2 + b;
    }
    x * p / q
}

/// `n` factors, each 0 with probability `prob` and 1 / (1 - prob) otherwise:
/// factor i keeps when the high half of draw i of the SplitMix64 stream from
/// `seed` falls below keep * 2^32. Draw i is a function of i alone, so the
/// factors are computed in parallel and do not depend on the thread count.
pub(super) fn mask(n: usize, prob: f64, seed: u64) -> Vec<f32> {
    let keep = 1.0 - prob;
    let scale = (1.0 / keep) as f32;
    let below = (keep * 4_294_967_296.0) as u64;
    (0..n as u64)
        .into_par_iter()
        .map(|i| {
            let draw = SplitMix64(seed.wrapping_add(i.wrapping_mul(SplitMix64::GAMMA))).next_u64();
            if draw >> 32 < below {
                scale
            } else {
                0.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn erf_and_gelu_match_libm() {
        let mut worst_erf = 0.0f32;
        let mut worst_slope = 0.0f32;
        for i in -100_000..=100_000 {
            let x = i as f32 / 10_000.0;
            worst_erf = worst_erf.max((erf(x) - libm::erff(x)).abs());
            // The derivative against a central difference in f64.
            let exact = |x: f64| x * 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            let h = 1e-4;
            let numeric = (exact(x as f64 + h) - exact(x as f64 - h)) / (2.0 * h);
            worst_slope = worst_slope.max((gelu_and_slope(x).1 as f64 - numeric).abs() as f32);
        }
        assert!(worst_erf < 1e-6, "erf differs by {worst_erf}");
        assert!(worst_slope < 1e-5, "gelu' differs by {worst_slope}");
    }

    #[test]
    fn gelu_value_and_gradient_match_burns_under_autodiff() {
        type B = burn::backend::Autodiff<burn::backend::Flex>;
        let device = Default::default();
        let x: Vec<f32> = (-60..60).map(|i| i as f32 / 10.0).collect();
        let weights: Vec<f32> = (0..120).map(|i| (i % 7) as f32 - 3.0).collect();
        let run = |f: fn(Tensor<B, 2>) -> Tensor<B, 2>| {
            let input = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [12, 10]), &device)
                .require_grad();
            let w = Tensor::<B, 2>::from_data(TensorData::new(weights.clone(), [12, 10]), &device);
            let y = f(input.clone());
            let grads = (y.clone() * w).sum().backward();
            let grad = input
                .grad(&grads)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            (y.into_data().to_vec::<f32>().unwrap(), grad)
        };
        let (ours, our_grad) = run(gelu);
        let (burns, burn_grad) = run(burn::tensor::activation::gelu);
        for (a, b) in ours
            .iter()
            .zip(&burns)
            .chain(our_grad.iter().zip(&burn_grad))
        {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn dropout_scales_value_and_gradient_by_the_same_mask() {
        type B = burn::backend::Autodiff<Flex>;
        let device = Default::default();
        let x =
            crate::model::cpu_kernels::test_tensor::<B, 2>([300, 70], 1, &device).require_grad();
        let y = {
            let _generator = crate::model::cpu_kernels::GENERATOR
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            dropout(x.clone(), 0.25)
        };
        let grads = y.clone().sum().backward();
        let read = |t: Tensor<B, 2>| t.into_data().to_vec::<f32>().unwrap();
        let factors = x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        let (x, y) = (read(x), read(y));
        for ((x, y), m) in x.iter().zip(&y).zip(&factors) {
            assert!(*m == 0.0 || (m - 1.0 / 0.75).abs() < 1e-6, "factor {m}");
            assert_eq!(*y, x * m);
        }
        let dropped = factors.iter().filter(|&&m| m == 0.0).count() as f64 / factors.len() as f64;
        assert!((dropped - 0.25).abs() < 0.02, "dropped {dropped}");
    }

    #[test]
    fn mask_keeps_the_expected_share_scaled() {
        let m = mask(1_000_003, 0.1, 42);
        let kept = m.iter().filter(|&&v| v != 0.0).count() as f64 / m.len() as f64;
        assert!((kept - 0.9).abs() < 0.002, "kept {kept}");
        assert!(m.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        // Same seed, same mask; another seed, another mask.
        assert_eq!(m, mask(1_000_003, 0.1, 42));
        assert_ne!(m, mask(1_000_003, 0.1, 43));
        // The mean is preserved.
        let mean = m.iter().map(|&v| v as f64).sum::<f64>() / m.len() as f64;
        assert!((mean - 1.0).abs() < 0.003, "mean {mean}");
    }
}
