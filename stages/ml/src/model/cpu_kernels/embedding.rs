//! The word-embedding lookup under autodiff on the CPU backend.
//!
//! The gradient of a lookup is a table of zeros with the looked-up rows'
//! gradients added in. burn's CPU backend builds that table (for
//! multilingual-e5-small 250k x 384 floats, 384 MB) as a zeroed byte
//! vector copied into an aligned buffer, then copies it once more before
//! adding the rows, all on one thread. Here it is zeroed once, on all
//! cores, and the rows added in. (Not `calloc`'s fresh pages: the binary
//! keeps freed memory in its heap, `src/main.rs`, so `calloc` gets a reused
//! block and clears it on one thread; measured in a training step on a
//! 2-core Xeon, that memset was 9% of the samples.)

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::nn::Embedding;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use burn_flex::Flex;
use rayon::prelude::*;

use super::{flex_tensor, flex_values, on_cpu, zeros, OnCpu};

/// The rows of `table` for `ids` `[batch, seq]`: `[batch, seq, width]`.
pub fn embedding<B: Backend>(table: &Embedding<B>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let OnCpu::Tracked(weight, back) = on_cpu(table.weight.val()) else {
        // Without autodiff burn's own lookup is as fast.
        return table.forward(ids);
    };
    let [batch, seq] = ids.dims();
    let ids: Vec<usize> = ids
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("integer ids")
        .into_iter()
        .map(|id| id as usize)
        .collect();
    let shape = weight.primitive.layout().shape().clone();
    let (rows, width) = (shape[0], shape[1]);
    if let Some(id) = ids.iter().find(|&&id| id >= rows) {
        panic!("embedding: id {id} is outside the table's {rows} rows");
    }
    let values = flex_values(&weight.primitive);
    let mut out = zeros(ids.len() * width);
    out.par_chunks_mut(width)
        .zip(ids.par_iter())
        .for_each(|(out, &id)| out.copy_from_slice(&values[id * width..(id + 1) * width]));
    let output = flex_tensor(out, [batch, seq, width]);
    match Lookup
        .prepare::<NoCheckpointing>([weight.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => back.wrap(prep.finish((ids.into(), rows), output)),
        OpsKind::UnTracked(prep) => back.wrap(prep.finish(output)),
    }
}

#[derive(Debug)]
struct Lookup;

impl Backward<Flex, 1> for Lookup {
    /// The ids looked up and the table's row count.
    type State = (std::sync::Arc<[usize]>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node);
        if let Some(parent) = parent {
            let (ids, rows) = ops.state;
            let g = flex_values(&grad);
            let width = g.len() / ids.len().max(1);
            let mut table = zeros(rows * width);
            for (&id, g) in ids.iter().zip(g.chunks_exact(width)) {
                let row = &mut table[id * width..(id + 1) * width];
                row.iter_mut().zip(g).for_each(|(t, g)| *t += g);
            }
            grads.register::<Flex>(parent.id, flex_tensor(table, [rows, width]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cpu_kernels::test_tensor;
    use burn::module::Param;
    use burn::nn::EmbeddingConfig;
    use burn::tensor::TensorData;

    type Tracked = burn::backend::Autodiff<Flex>;

    #[test]
    fn lookup_matches_burns_in_value_and_gradient() {
        let device = Default::default();
        let mut table: Embedding<Tracked> = EmbeddingConfig::new(11, 6).init(&device);
        table.weight = Param::from_tensor(test_tensor([11, 6], 1, &device));
        // Repeated ids: their gradients add up.
        let ids = || {
            Tensor::<Tracked, 2, Int>::from_data(
                TensorData::new(vec![3i64, 0, 10, 3, 7, 3, 1, 0], [2, 4]),
                &device,
            )
        };
        let weights = test_tensor::<Tracked, 3>([2, 4, 6], 2, &device);
        let run = |ours: bool| {
            let y = if ours {
                embedding(&table, ids())
            } else {
                table.forward(ids())
            };
            let grads = (y.clone() * weights.clone()).sum().backward();
            let grad = table.weight.val().grad(&grads).unwrap();
            (
                y.into_data().to_vec::<f32>().unwrap(),
                grad.into_data().to_vec::<f32>().unwrap(),
            )
        };
        let (ours, burns) = (run(true), run(false));
        assert_eq!(ours.0, burns.0);
        for (a, b) in ours.1.iter().zip(&burns.1) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
