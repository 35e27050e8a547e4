//! Exact cosine search shared by the evaluations: score every query against
//! every candidate (one matrix product per block of queries), then rank
//! inside candidate pools with trec_eval's order.
//!
//! Ranks are never found by sorting a whole pool: a relevant candidate's
//! rank is one plus the number of pool members ordered before it, and only
//! the members scoring at least the weakest relevant one can be, so one
//! pass over the pool collects those few and the ranks come from them.

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use crate::encode::Embeddings;

/// trec_eval's order of candidates: score descending, ties by id descending.
pub struct TrecOrder {
    /// Position of each candidate when the ids are sorted (the tie-break key).
    id_position: Vec<u32>,
}

impl TrecOrder {
    pub fn new(ids: &[String]) -> TrecOrder {
        let mut by_id: Vec<usize> = (0..ids.len()).collect();
        by_id.sort_by(|&a, &b| ids[a].cmp(&ids[b]));
        let mut id_position = vec![0u32; ids.len()];
        for (position, &c) in by_id.iter().enumerate() {
            id_position[c] = position as u32;
        }
        TrecOrder { id_position }
    }

    /// Whether candidate `a` is ranked before `b`.
    #[inline]
    fn before(&self, scores: &[f32], a: usize, b: usize) -> bool {
        scores[a] > scores[b]
            || (scores[a] == scores[b] && self.id_position[a] > self.id_position[b])
    }

    fn compare(&self, scores: &[f32], a: usize, b: usize) -> std::cmp::Ordering {
        scores[b]
            .total_cmp(&scores[a])
            .then(self.id_position[b].cmp(&self.id_position[a]))
    }

    /// 1-based ranks of `relevant` (members of `pool`) within `pool`, in the
    /// order given.
    pub fn ranks(&self, scores: &[f32], pool: &[usize], relevant: &[usize]) -> Vec<usize> {
        let Some(&weakest) = relevant
            .iter()
            .max_by(|&&a, &&b| self.compare(scores, a, b))
        else {
            return Vec::new();
        };
        let contenders: Vec<usize> = pool
            .iter()
            .copied()
            .filter(|&c| c == weakest || self.before(scores, c, weakest))
            .collect();
        relevant
            .iter()
            .map(|&r| {
                1 + contenders
                    .iter()
                    .filter(|&&c| self.before(scores, c, r))
                    .count()
            })
            .collect()
    }

    /// The first `depth` members of `pool` in ranked order (all when
    /// `depth` is 0 or exceeds the pool).
    pub fn top(&self, scores: &[f32], pool: &[usize], depth: usize) -> Vec<usize> {
        let depth = if depth == 0 {
            pool.len()
        } else {
            depth.min(pool.len())
        };
        if depth * 8 >= pool.len() {
            let mut members = pool.to_vec();
            if depth < members.len() {
                members.select_nth_unstable_by(depth - 1, |&a, &b| self.compare(scores, a, b));
                members.truncate(depth);
            }
            members.sort_unstable_by(|&a, &b| self.compare(scores, a, b));
            return members;
        }
        // A short head of a long pool: one pass that keeps the best `depth`
        // seen so far in ranked order; most members lose to the last of
        // them in one comparison.
        let mut best: Vec<usize> = Vec::with_capacity(depth + 1);
        for &c in pool {
            if best.len() == depth && self.compare(scores, c, best[depth - 1]).is_ge() {
                continue;
            }
            let at = best.partition_point(|&b| self.compare(scores, b, c).is_lt());
            best.insert(at, c);
            best.truncate(depth);
        }
        best
    }
}

/// Score every query against every candidate and call `visit(query, scores)`
/// with the query's row of cosine scores (the vectors are L2-normalised),
/// in parallel; the results come back in query order.
pub fn for_each_query<T: Send>(
    queries: &Embeddings,
    candidates: &Embeddings,
    visit: impl Fn(usize, &[f32]) -> T + Sync,
) -> anyhow::Result<Vec<T>> {
    anyhow::ensure!(
        queries.dim == candidates.dim,
        "query and candidate vectors differ in size ({} vs {})",
        queries.dim,
        candidates.dim
    );
    let (dim, n) = (queries.dim, candidates.ids.len());
    let device = Default::default();
    let candidate_matrix: Tensor<Flex, 2> = Tensor::from_data(
        TensorData::new(candidates.vectors.clone(), [n, dim]),
        &device,
    )
    .transpose();
    // Blocks bound the score matrix held at once (block x candidates floats).
    const BLOCK: usize = 1024;
    let mut results = Vec::with_capacity(queries.ids.len());
    for start in (0..queries.ids.len()).step_by(BLOCK) {
        let end = (start + BLOCK).min(queries.ids.len());
        let block: Tensor<Flex, 2> = Tensor::from_data(
            TensorData::new(
                queries.vectors[start * dim..end * dim].to_vec(),
                [end - start, dim],
            ),
            &device,
        );
        let scores: Vec<f32> = block
            .matmul(candidate_matrix.clone())
            .into_data()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("reading scores: {e:?}"))?;
        results.par_extend(
            scores
                .par_chunks(n.max(1))
                .enumerate()
                .map(|(row, s)| visit(start + row, s)),
        );
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::metrics::trec_order;

    #[test]
    fn ranks_and_top_follow_trec_order() {
        let scores = [0.5f32, 0.9, 0.5, 0.1, 0.5, 0.7];
        let ids: Vec<String> = ["c0", "c1", "c2", "c3", "c4", "c5"]
            .map(String::from)
            .to_vec();
        let order = TrecOrder::new(&ids);
        let mut reference: Vec<(String, f64)> = ids
            .iter()
            .zip(scores)
            .map(|(id, s)| (id.clone(), s as f64))
            .collect();
        trec_order(&mut reference);
        let rank_of = |c: usize| 1 + reference.iter().position(|(id, _)| *id == ids[c]).unwrap();
        let pool: Vec<usize> = (0..6).collect();
        for relevant in [vec![0usize], vec![2, 3], vec![0, 2, 4], vec![1, 5, 3]] {
            let expected: Vec<usize> = relevant.iter().map(|&c| rank_of(c)).collect();
            assert_eq!(order.ranks(&scores, &pool, &relevant), expected);
        }
        let top: Vec<&str> = order
            .top(&scores, &pool, 4)
            .iter()
            .map(|&c| ids[c].as_str())
            .collect();
        assert_eq!(top, ["c1", "c5", "c4", "c2"]);
        assert_eq!(order.top(&scores, &pool, 0).len(), 6);
        // A sub-pool ranks only its members.
        assert_eq!(order.ranks(&scores, &[0, 3], &[3]), vec![2]);
    }

    #[test]
    fn short_head_of_a_long_pool_is_the_sorted_prefix() {
        // Many ties (scores in 50 steps), so the id tie-break decides often.
        let ids: Vec<String> = (0..2000).map(|i| format!("d{i}")).collect();
        let scores: Vec<f32> = (0..2000u64)
            .map(|i| ((i.wrapping_mul(2654435761) >> 7) % 50) as f32 / 50.0)
            .collect();
        let order = TrecOrder::new(&ids);
        let pool: Vec<usize> = (0..2000).rev().collect();
        let mut sorted = pool.clone();
        sorted.sort_by(|&a, &b| order.compare(&scores, a, b));
        for depth in [1, 10, 100] {
            assert_eq!(order.top(&scores, &pool, depth), sorted[..depth], "{depth}");
        }
    }
}
