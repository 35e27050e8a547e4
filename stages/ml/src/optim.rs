//! AdamW with gradient clipping by the global norm: the update of
//! `torch.nn.utils.clip_grad_norm_` followed by `torch.optim.AdamW`, with
//! Hugging Face's convention of no weight decay on biases and LayerNorm
//! weights (every one-dimensional parameter here).
//!
//! Why not burn's `AdamW`: its `GradientClipping::Norm` clips each
//! parameter tensor by that tensor's own norm, which is not what the papers
//! and PyTorch mean by clipping, and its update is a dozen whole-tensor
//! operations, each allocating a fresh tensor. For multilingual encoders,
//! whose word embedding holds most of the weights (96M of
//! multilingual-e5-small's 118M), that cost seconds per step on a CPU. Here
//! each parameter is updated in one fused, parallel pass over its host
//! data, which the CPU backend hands over without copying.
//!
//! On any other backend (a GPU) the same update runs as tensor operations
//! on the device, the moments kept there: moving a multilingual encoder's
//! weights and gradients to the host and back every step would cost more
//! than the step (1.4 GB a step for multilingual-e5-small).

use std::any::Any;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use crate::model::cpu_kernels::is_cpu_backend;
use anyhow::Context;
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use crate::vector::widest_fn;

/// First and second moment estimates of one parameter.
#[derive(Clone, Default)]
struct Moments {
    first: Vec<f32>,
    second: Vec<f32>,
    /// Per block of `BLOCK` elements: whether its moments may be nonzero.
    /// A block whose moments are zero and whose gradient is zero updates
    /// to `p * (1 - lr * decay)` exactly (see `Coefficients::apply`), so
    /// its moments need not be read or written. The word embedding is most
    /// of a multilingual encoder's weights, and a step looks up only a few
    /// thousand of its 250k rows: most of its blocks stay in that state.
    live: Vec<bool>,
}

/// Elements per block of `Moments::live`: 2,048 floats, a few embedding
/// rows, large enough for whole-vector loops.
const BLOCK: usize = 2048;

impl Moments {
    fn zeros(len: usize) -> Moments {
        Moments {
            first: vec![0.0; len],
            second: vec![0.0; len],
            live: vec![false; len.div_ceil(BLOCK)],
        }
    }

    /// Moments read back from a checkpoint: a block is live where any of
    /// its moments is nonzero, as it was when saved (a saved live block of
    /// zeros updates exactly as a dead one).
    fn from_values(first: Vec<f32>, second: Vec<f32>) -> Moments {
        let live = first
            .chunks(BLOCK)
            .zip(second.chunks(BLOCK))
            .map(|(m, v)| m.iter().chain(v).any(|&x| x != 0.0))
            .collect();
        Moments {
            first,
            second,
            live,
        }
    }
}

/// The moments of one parameter where the update runs: host vectors on
/// the CPU backend, device tensors elsewhere.
enum State {
    Host(Moments),
    Device(Box<dyn DeviceMoments>),
}

impl Default for State {
    fn default() -> State {
        State::Host(Moments::default())
    }
}

impl State {
    /// The moments as host vectors (for a checkpoint).
    fn host(&self) -> std::borrow::Cow<'_, Moments> {
        match self {
            State::Host(m) => std::borrow::Cow::Borrowed(m),
            State::Device(d) => std::borrow::Cow::Owned(d.to_host()),
        }
    }
}

/// Moments held as tensors of some backend, type-erased so that `AdamW`
/// needs no backend parameter (checkpoints save and load it as one).
trait DeviceMoments: Send {
    fn to_host(&self) -> Moments;
    fn as_any(&mut self) -> &mut dyn Any;
}

/// First and second moments of one parameter, flattened.
struct TensorMoments<B: Backend> {
    first: Tensor<B, 1>,
    second: Tensor<B, 1>,
}

impl<B: Backend> DeviceMoments for TensorMoments<B> {
    fn to_host(&self) -> Moments {
        let host = |t: &Tensor<B, 1>| -> Vec<f32> {
            f32_data(t.clone().into_data())
                .into_vec()
                .expect("f32 moments")
        };
        Moments::from_values(host(&self.first), host(&self.second))
    }
    fn as_any(&mut self) -> &mut dyn Any {
        self
    }
}

pub struct AdamW {
    pub beta_1: f64,
    pub beta_2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    /// Clip the gradient to this global L2 norm (`None`: never).
    pub max_grad_norm: Option<f64>,
    /// Updates done so far (the bias-correction exponent).
    time: u64,
    /// Per float parameter, in the module's visiting order.
    moments: Vec<State>,
    /// Update through tensor operations even on the CPU backend (tests
    /// compare the two paths there).
    tensor_ops: bool,
}

/// What one update did.
pub struct StepReport {
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
}

impl AdamW {
    /// PyTorch's defaults (betas 0.9 / 0.999, eps 1e-8).
    pub fn new(weight_decay: f64, max_grad_norm: Option<f64>) -> AdamW {
        AdamW {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay,
            max_grad_norm,
            time: 0,
            moments: Vec::new(),
            tensor_ops: false,
        }
    }

    /// Whether `B` updates through tensor operations rather than host
    /// loops: every backend but the CPU's.
    fn on_device<B: Backend>(&self) -> bool {
        self.tensor_ops || !is_cpu_backend::<B>()
    }

    /// One update of every parameter of `module` that has a gradient.
    pub fn step<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        lr: f64,
        module: M,
        mut grads: GradientsParams,
    ) -> (M, StepReport) {
        let on_device = self.on_device::<B::InnerBackend>();
        let mut taken = TakeGrads::<B> {
            grads: &mut grads,
            on_device,
            taken: Vec::new(),
        };
        module.visit(&mut taken);
        let taken = taken.taken;
        let grad_norm = global_norm(&taken);
        // As clip_grad_norm_: scale by max / (norm + 1e-6) when that is below 1.
        let grad_scale = match self.max_grad_norm {
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        self.time += 1;
        if self.moments.len() < taken.len() {
            self.moments.resize_with(taken.len(), State::default);
        }
        let mut update = Update::<B> {
            lr,
            grad_scale,
            optimizer: self,
            grads: taken.into_iter(),
            index: 0,
        };
        let module = module.map(&mut update);
        (module, StepReport { grad_norm })
    }

    /// Write the optimizer state (update count and moments) to `path`.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut out = BufWriter::new(std::fs::File::create(path)?);
        out.write_all(&self.time.to_le_bytes())?;
        out.write_all(&(self.moments.len() as u64).to_le_bytes())?;
        for state in &self.moments {
            let m = state.host();
            out.write_all(&(m.first.len() as u64).to_le_bytes())?;
            for values in [&m.first, &m.second] {
                for v in values.iter() {
                    out.write_all(&v.to_le_bytes())?;
                }
            }
        }
        out.into_inner()?.sync_all()?;
        Ok(())
    }

    /// Read back what `save` wrote.
    pub fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut input = BufReader::new(
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?,
        );
        let mut word = [0u8; 8];
        let mut next = |input: &mut BufReader<std::fs::File>| -> anyhow::Result<u64> {
            input.read_exact(&mut word)?;
            Ok(u64::from_le_bytes(word))
        };
        self.time = next(&mut input)?;
        let count = next(&mut input)? as usize;
        self.moments = Vec::with_capacity(count);
        for _ in 0..count {
            let len = next(&mut input)? as usize;
            let read = |input: &mut BufReader<std::fs::File>| -> anyhow::Result<Vec<f32>> {
                let mut bytes = vec![0u8; len * 4];
                input.read_exact(&mut bytes)?;
                Ok(bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect())
            };
            let first = read(&mut input)?;
            let second = read(&mut input)?;
            self.moments
                .push(State::Host(Moments::from_values(first, second)));
        }
        Ok(())
    }
}

/// One parameter's gradient: host values for the CPU loops, or the
/// flattened device tensor.
enum Grad<B: Backend> {
    Host(TensorData),
    Device(Tensor<B, 1>),
}

/// The L2 norm of all gradients together: one number read back per step.
fn global_norm<B: Backend>(grads: &[Option<Grad<B>>]) -> f64 {
    let mut squares = 0.0f64;
    let mut on_device = Vec::new();
    for grad in grads.iter().flatten() {
        match grad {
            Grad::Host(g) => {
                squares += g
                    .as_slice::<f32>()
                    .expect("f32 gradient")
                    .par_iter()
                    .map(|&x| (x as f64) * (x as f64))
                    .sum::<f64>()
            }
            Grad::Device(g) => on_device.push(g.clone().powi_scalar(2).sum()),
        }
    }
    if !on_device.is_empty() {
        squares += f32_data(Tensor::cat(on_device, 0).sum().into_data())
            .as_slice::<f32>()
            .expect("f32 norm")[0] as f64;
    }
    squares.sqrt()
}

/// Takes every float parameter's gradient out of `grads`, in visiting order.
struct TakeGrads<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    on_device: bool,
    taken: Vec<Option<Grad<B::InnerBackend>>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for TakeGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let grad = self.grads.remove::<B::InnerBackend, D>(param.id);
        self.taken.push(grad.map(|g| {
            if self.on_device {
                let n = g.shape().num_elements();
                Grad::Device(g.reshape([n]))
            } else {
                Grad::Host(f32_data(g.into_data()))
            }
        }));
    }
}

fn f32_data(data: TensorData) -> TensorData {
    if data.dtype == DType::F32 {
        data
    } else {
        data.convert::<f32>()
    }
}

/// Applies the update to each parameter in the same visiting order.
struct Update<'a, B: AutodiffBackend> {
    lr: f64,
    grad_scale: f64,
    optimizer: &'a mut AdamW,
    grads: std::vec::IntoIter<Option<Grad<B::InnerBackend>>>,
    index: usize,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Update<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let index = self.index;
        self.index += 1;
        let Some(grad) = self.grads.next().flatten() else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let device = tensor.device();
        let require_grad = tensor.is_require_grad();
        let o = &mut *self.optimizer;
        let decay = if D > 1 { o.weight_decay } else { 0.0 };
        let t = o.time as i32;
        let coefficients = Coefficients {
            beta_1: o.beta_1 as f32,
            beta_2: o.beta_2 as f32,
            grad_scale: self.grad_scale as f32,
            keep: (1.0 - self.lr * decay) as f32,
            step_size: (self.lr / (1.0 - o.beta_1.powi(t))) as f32,
            second_correction: (1.0 - o.beta_2.powi(t)).sqrt() as f32,
            epsilon: o.epsilon as f32,
        };
        let inner = match grad {
            Grad::Host(grad) => {
                let mut data = f32_data(tensor.inner().into_data());
                let values = data.as_mut_slice::<f32>().expect("f32 parameter");
                let grad = grad.as_slice::<f32>().expect("f32 gradient");
                let state = &mut o.moments[index];
                if !matches!(state, State::Host(m) if m.first.len() == values.len()) {
                    *state = State::Host(Moments::zeros(values.len()));
                }
                let State::Host(moments) = state else {
                    unreachable!("set just above")
                };
                coefficients.apply_blocks(values, moments, grad);
                Tensor::<B::InnerBackend, D>::from_data(data, &device)
            }
            Grad::Device(grad) => {
                let shape = tensor.shape();
                let n = shape.num_elements();
                let moments = device_moments::<B::InnerBackend>(&mut o.moments[index], n, &device);
                let values = tensor.inner().reshape([n]);
                coefficients
                    .apply_tensors(values, moments, grad)
                    .reshape(shape)
            }
        };
        let mut tensor = Tensor::from_inner(inner);
        if require_grad {
            tensor = tensor.require_grad();
        }
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// `state`'s moments as tensors of `B` with `n` values: those already there,
/// host ones (read from a checkpoint) uploaded, else zeros.
fn device_moments<'a, B: Backend>(
    state: &'a mut State,
    n: usize,
    device: &B::Device,
) -> &'a mut TensorMoments<B> {
    let ready = match state {
        State::Device(d) => d
            .as_any()
            .downcast_mut::<TensorMoments<B>>()
            .is_some_and(|m| m.first.shape().num_elements() == n),
        State::Host(_) => false,
    };
    if !ready {
        let upload = |values: &[f32]| {
            Tensor::<B, 1>::from_data(TensorData::new(values.to_vec(), [n]), device)
        };
        let moments = match state {
            State::Host(m) if m.first.len() == n => TensorMoments {
                first: upload(&m.first),
                second: upload(&m.second),
            },
            _ => TensorMoments {
                first: Tensor::zeros([n], device),
                second: Tensor::zeros([n], device),
            },
        };
        *state = State::Device(Box::new(moments));
    }
    match state {
        State::Device(d) => d.as_any().downcast_mut().expect("set just above"),
        State::Host(_) => unreachable!("set just above"),
    }
}

/// The per-element update of one step, in PyTorch's order of operations.
struct Coefficients {
    beta_1: f32,
    beta_2: f32,
    grad_scale: f32,
    /// 1 - lr * weight_decay
    keep: f32,
    /// lr / (1 - beta_1^t)
    step_size: f32,
    /// sqrt(1 - beta_2^t)
    second_correction: f32,
    epsilon: f32,
}

impl Coefficients {
    /// The update of one parameter, block by block in parallel, skipping
    /// the moments where they and the gradient are zero.
    fn apply_blocks(&self, p: &mut [f32], moments: &mut Moments, g: &[f32]) {
        p.par_chunks_mut(BLOCK)
            .zip(moments.first.par_chunks_mut(BLOCK))
            .zip(moments.second.par_chunks_mut(BLOCK))
            .zip(moments.live.par_iter_mut())
            .zip(g.par_chunks(BLOCK))
            .for_each(|((((p, m), v), live), g)| {
                if !*live && g.iter().all(|&x| x == 0.0) {
                    // m and v stay 0, and 0 / (sqrt(0) + eps) is 0: what
                    // `update` computes, bit for bit.
                    decay(p, self.keep);
                } else {
                    *live = true;
                    update(self, p, m, v, g);
                }
            });
    }
}

impl Coefficients {
    /// [`update`] in tensor operations, on whatever device `p` is: the
    /// moments updated in place, the new parameter values returned.
    fn apply_tensors<B: Backend>(
        &self,
        p: Tensor<B, 1>,
        moments: &mut TensorMoments<B>,
        g: Tensor<B, 1>,
    ) -> Tensor<B, 1> {
        let grad = g.mul_scalar(self.grad_scale);
        let m = moments.first.clone().mul_scalar(self.beta_1)
            + grad.clone().mul_scalar(1.0 - self.beta_1);
        let v = moments.second.clone().mul_scalar(self.beta_2)
            + (grad.clone() * grad).mul_scalar(1.0 - self.beta_2);
        let denominator = v
            .clone()
            .sqrt()
            .div_scalar(self.second_correction)
            .add_scalar(self.epsilon);
        let p = p.mul_scalar(self.keep) - m.clone().mul_scalar(self.step_size) / denominator;
        moments.first = m;
        moments.second = v;
        p
    }
}

widest_fn! {
    /// `p *= keep`: the update of parameters whose moments and gradient are 0.
    fn decay / decay_at(p: &mut [f32], keep: f32) {
        p.iter_mut().for_each(|p| *p *= keep);
    }
}

widest_fn! {
    /// AdamW's update of the parameters `p` and moments `m`, `v` from the
    /// gradient `g`, as PyTorch computes it.
    fn update / update_at(c: &Coefficients, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        // Equal lengths, said once, so that the loop runs without bounds checks.
        let n = p.len();
        let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
        for i in 0..n {
            let grad = g[i] * c.grad_scale;
            m[i] = c.beta_1 * m[i] + (1.0 - c.beta_1) * grad;
            v[i] = c.beta_2 * v[i] + (1.0 - c.beta_2) * grad * grad;
            let denominator = v[i].sqrt() / c.second_correction + c.epsilon;
            p[i] = p[i] * c.keep - c.step_size * m[i] / denominator;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coefficients(t: i32) -> Coefficients {
        let (lr, beta_1, beta_2): (f64, f64, f64) = (3e-5, 0.9, 0.999);
        Coefficients {
            beta_1: beta_1 as f32,
            beta_2: beta_2 as f32,
            grad_scale: 0.7,
            keep: (1.0 - lr * 0.01) as f32,
            step_size: (lr / (1.0 - beta_1.powi(t))) as f32,
            second_correction: (1.0 - beta_2.powi(t)).sqrt() as f32,
            epsilon: 1e-8,
        }
    }

    /// Gradients of an embedding-like table: a few rows per step, different
    /// rows each step, so blocks turn live at different steps; one row of
    /// negative zeros.
    fn sparse_gradient(len: usize, step: u64) -> Vec<f32> {
        let mut rng = crate::rng::SplitMix64(step);
        let mut g = vec![0.0f32; len];
        for _ in 0..5 {
            let row = (rng.next_f64() * (len / 384) as f64) as usize;
            for x in &mut g[row * 384..(row + 1) * 384] {
                *x = rng.next_f64() as f32 - 0.5;
            }
        }
        g[..384].iter_mut().for_each(|x| *x = -0.0);
        g
    }

    #[test]
    fn skipping_zero_blocks_is_bit_identical_to_the_full_update() {
        let len = 384 * 997 + 5; // a partial last block
        let start: Vec<f32> = (0..len).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
        let (mut p_full, mut m_full, mut v_full) = (start.clone(), vec![0.0; len], vec![0.0; len]);
        let (mut p_fast, mut moments) = (start, Moments::zeros(len));
        for step in 1..=6 {
            let c = coefficients(step);
            let g = sparse_gradient(len, step as u64);
            update(&c, &mut p_full, &mut m_full, &mut v_full, &g);
            c.apply_blocks(&mut p_fast, &mut moments, &g);
            if step == 3 {
                // A checkpoint read back in the middle.
                let (m, v) = (moments.first.clone(), moments.second.clone());
                moments = Moments::from_values(m, v);
            }
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&p_fast), bits(&p_full));
        assert_eq!(bits(&moments.first), bits(&m_full));
        assert_eq!(bits(&moments.second), bits(&v_full));
        // Most blocks were skipped (the point of it), some were not.
        let live = moments.live.iter().filter(|&&l| l).count();
        assert!(
            live > 0 && live < moments.live.len() / 2,
            "{live} live blocks"
        );
    }

    #[test]
    fn a_nan_gradient_in_a_dead_block_reaches_the_weights() {
        let len = 3 * BLOCK;
        let mut p = vec![1.0f32; len];
        let mut moments = Moments::zeros(len);
        let mut g = vec![0.0f32; len];
        g[BLOCK + 7] = f32::NAN;
        coefficients(1).apply_blocks(&mut p, &mut moments, &g);
        assert!(p[BLOCK + 7].is_nan());
        assert_eq!(moments.live, vec![false, true, false]);
    }

    /// A small module's training under both update paths: the tensor
    /// operations a GPU runs against the host loops, step by step, with a
    /// checkpoint saved by one path and read back by the other.
    #[test]
    fn tensor_operations_update_as_the_host_loops() {
        use burn::backend::{Autodiff, Flex};
        use burn::nn::{Linear, LinearConfig};
        type B = Autodiff<Flex>;
        let device = Default::default();
        // Two models of equal values that share no tensors (under autodiff,
        // clones that share parameters also share their graph nodes).
        let fresh = || {
            let values = |n: usize, k: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| (((i * k) % 17) as f32 - 8.0) * 0.05)
                    .collect()
            };
            let mut model = LinearConfig::new(24, 16).init::<B>(&device);
            model.weight = burn::module::Param::from_tensor(Tensor::from_data(
                TensorData::new(values(24 * 16, 5), [24, 16]),
                &device,
            ));
            model.bias = Some(burn::module::Param::from_tensor(Tensor::from_data(
                TensorData::new(values(16, 3), [16]),
                &device,
            )));
            model
        };
        B::seed(&device, 7);
        let x = Tensor::<B, 2>::random([8, 24], burn::tensor::Distribution::Default, &device);
        let grads = |model: &Linear<B>| {
            let loss = (model.forward(x.clone()) - 0.3).powi_scalar(2).sum();
            GradientsParams::from_grads(loss.backward(), model)
        };
        let values = |model: &Linear<B>| -> Vec<f32> {
            let mut v = model.weight.val().into_data().into_vec::<f32>().unwrap();
            v.extend(
                model
                    .bias
                    .as_ref()
                    .unwrap()
                    .val()
                    .into_data()
                    .into_vec::<f32>()
                    .unwrap(),
            );
            v
        };
        let dir = std::env::temp_dir().join(format!("xlpipe-adamw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (mut host, mut tensors) = (fresh(), fresh());
        let mut host_optimizer = AdamW::new(0.01, Some(0.5));
        let mut tensor_optimizer = AdamW::new(0.01, Some(0.5));
        tensor_optimizer.tensor_ops = true;
        for step in 0..6 {
            if step == 3 {
                // The tensor path's state read back into a host optimizer,
                // the host one's into a tensor optimizer: the paths swap.
                tensor_optimizer.save(&dir.join("t.bin")).unwrap();
                host_optimizer.save(&dir.join("h.bin")).unwrap();
                tensor_optimizer = AdamW::new(0.01, Some(0.5));
                tensor_optimizer.load(&dir.join("h.bin")).unwrap();
                tensor_optimizer.tensor_ops = true;
                host_optimizer = AdamW::new(0.01, Some(0.5));
                host_optimizer.load(&dir.join("t.bin")).unwrap();
                std::mem::swap(&mut host, &mut tensors);
            }
            let (g_host, g_tensors) = (grads(&host), grads(&tensors));
            let (h, host_report) = host_optimizer.step(1e-2, host, g_host);
            let (t, tensor_report) = tensor_optimizer.step(1e-2, tensors, g_tensors);
            (host, tensors) = (h, t);
            let norms = (host_report.grad_norm, tensor_report.grad_norm);
            assert!(
                (norms.0 - norms.1).abs() <= 1e-5 * norms.0 && norms.0 > 0.5,
                "step {step}: gradient norms {norms:?} (clipped to 0.5 from above)"
            );
            let (a, b) = (values(&host), values(&tensors));
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| {
                    if x.is_nan() || y.is_nan() {
                        f32::INFINITY
                    } else {
                        (x - y).abs()
                    }
                })
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-6, "step {step}: parameters differ by {worst}");
            assert!(matches!(tensor_optimizer.moments[0], State::Device(_)));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
