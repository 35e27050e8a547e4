//! The encoder's operations on burn's CPU backend, forward and, under
//! autodiff, backward, as parallel host loops and direct matrix products;
//! burn's own kernels on every other backend.
//!
//! Why: under the CPU backend burn runs element-wise operations on the
//! calling thread while the other cores wait, spells softmax, layer norm
//! and GELU out in a dozen tracked whole-tensor passes each, and builds
//! every product's output through a zeroed buffer that it then copies. At
//! the start this was over half of an mE5-small training step. Each
//! operation here is one autodiff node (burn-autodiff's `Backward`) whose
//! forward and backward passes run on all cores:
//!
//! - `linear`: `x W + b`, the product accumulating onto the bias rows;
//! - `self_attention`: per (sequence, head) task, scores, mask, softmax,
//!   dropout and context in cache, from the fused QKV projection, for a
//!   padded batch or for packed sequences (no padding, no mask);
//! - `layer_norm`: one sweep over the rows each way;
//! - `dropout`, `gelu`: element-wise, the backward pass a product with the
//!   saved slope. Dropout's mask is drawn from SplitMix64 streams, one per
//!   chunk, seeded from the backend's generator (runs stay reproducible
//!   under `Backend::seed`, for any thread count); GELU's erf is Eigen's
//!   rational approximation, which vectorises.
//!
//! Sums across rows (bias, gamma and beta gradients) add fixed blocks in a
//! fixed order, so results do not depend on the thread count. Each
//! module's tests check value and gradients against burn's own operations.

mod attention;
mod embedding;
mod layer_norm;
mod linear;
mod pointwise;

pub use attention::{first_rows, packed_self_attention, self_attention, Heads};
pub use embedding::embedding;
pub use layer_norm::layer_norm;
pub use linear::linear;
pub use pointwise::{dropout, gelu, seed_dropout};

use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::marker::PhantomData;
use std::mem::MaybeUninit;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

/// A tensor of burn's CPU backend under autodiff.
type TrackedTensor = burn::tensor::ops::FloatTensor<Autodiff<Flex>>;

/// Where a tensor lives: burn's CPU backend, plain or under autodiff (f32
/// only), or elsewhere.
enum OnCpu<B: Backend, const D: usize> {
    Plain(FlexTensor, Back<B>),
    Tracked(TrackedTensor, Back<B>),
    Elsewhere(Tensor<B, D>),
}

/// Turns a result of the CPU path back into a tensor of `B`.
struct Back<B>(PhantomData<B>);

impl<B: Backend> Back<B> {
    /// `primitive` is `B`'s float primitive (`on_cpu` checked `B`).
    fn wrap<T: 'static, const D: usize>(&self, primitive: T) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(cast(primitive)))
    }
}

fn on_cpu<B: Backend, const D: usize>(x: Tensor<B, D>) -> OnCpu<B, D> {
    let backend = TypeId::of::<B>();
    if x.dtype() != DType::F32 {
        OnCpu::Elsewhere(x)
    } else if backend == TypeId::of::<Flex>() {
        OnCpu::Plain(cast(x.into_primitive().tensor()), Back(PhantomData))
    } else if backend == TypeId::of::<Autodiff<Flex>>() {
        OnCpu::Tracked(cast(x.into_primitive().tensor()), Back(PhantomData))
    } else {
        OnCpu::Elsewhere(x)
    }
}

/// Whether `B` is burn's CPU backend, plain or under autodiff: where these
/// kernels run, and where packed tokens (no padding) pay. Elsewhere packed
/// attention is gathered into a padded batch and scattered back, which
/// costs more than the padding saves (measured on an H200: a training step
/// 692 ms packed against 542 ms as one padded batch, mE5-small's shape).
pub fn is_cpu_backend<B: Backend>() -> bool {
    let backend = TypeId::of::<B>();
    backend == TypeId::of::<Flex>() || backend == TypeId::of::<Autodiff<Flex>>()
}

/// `value` as the type it is (checked by the callers through `TypeId`).
fn cast<T: 'static, U: 'static>(value: T) -> U {
    *(Box::new(value) as Box<dyn Any>)
        .downcast::<U>()
        .unwrap_or_else(|_| unreachable!("the backend's type was checked"))
}

/// The values of a CPU tensor in row-major order, copied only when its
/// layout is not already that.
fn flex_values(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(values) => Cow::Borrowed(values),
        None => Cow::Owned(
            t.to_contiguous()
                .into_data()
                .into_vec()
                .expect("f32 tensor"),
        ),
    }
}

/// `len` zeros, written in parallel: `vec![0.0; len]` zeroes on the calling
/// thread alone, which for the kernels' large buffers kept the other cores
/// waiting.
fn zeros(len: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(len);
    values.spare_capacity_mut()[..len]
        .par_chunks_mut(1 << 16)
        .for_each(|chunk| chunk.fill(MaybeUninit::new(0.0)));
    // SAFETY: all `len` elements were written just above.
    unsafe { values.set_len(len) };
    values
}

/// The sums down the columns of `rows` (row-major, `width` wide): partial
/// sums over fixed blocks of rows, in parallel, added in block order, so
/// the result does not depend on the thread count.
fn column_sums(rows: &[f32], width: usize) -> Vec<f32> {
    const BLOCK: usize = 256;
    let partial: Vec<Vec<f32>> = rows
        .par_chunks(BLOCK * width)
        .map(|block| {
            let mut sums = vec![0.0f32; width];
            for row in block.chunks_exact(width) {
                sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            sums
        })
        .collect();
    let mut sums = vec![0.0f32; width];
    for block in partial {
        sums.iter_mut().zip(block).for_each(|(s, v)| *s += v);
    }
    sums
}

fn flex_tensor(values: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Held by the tests that draw from the backend's generator (dropout
/// seeds), which is shared by all the tests running at the same time.
#[cfg(test)]
static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Inputs for the kernels' tests, drawn on the host (see `GENERATOR`).
#[cfg(test)]
fn test_tensor<B: Backend, const D: usize>(
    dims: [usize; D],
    seed: u64,
    device: &B::Device,
) -> Tensor<B, D> {
    let mut rng = crate::rng::SplitMix64(seed);
    let n = dims.iter().product();
    let values: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 * 4.0 - 2.0).collect();
    Tensor::from_data(TensorData::new(values, dims), device)
}

/// A tensor's values, for the kernels' tests.
#[cfg(test)]
fn test_values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec().expect("f32 tensor")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_cpu_backend_counts_as_it() {
        assert!(is_cpu_backend::<Flex>());
        assert!(is_cpu_backend::<Autodiff<Flex>>());
        // Another backend type (any but these two): packed tokens do not pay there.
        assert!(!is_cpu_backend::<Autodiff<Autodiff<Flex>>>());
    }
}
