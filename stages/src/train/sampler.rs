//! Hybrid batch sampling (Elmahdy, Lin, Ahmad, arXiv 2408.10536).
//!
//! Each batch is monolingual with probability `alpha`: queries and passages
//! all in one language. Otherwise it is cross-lingual: queries in language
//! X, passages in language Y != X, so no text is ever paired with itself in
//! the same language. alpha = 1 is X-X-mono, alpha = 0 is X-Y. A batch
//! never holds the same question or passage text twice, because in-batch
//! negatives would then include a copy of the positive.
//!
//! Randomness comes from a seeded SplitMix64, so the same seed and data give
//! the same batches on every machine and after a resume.

use std::collections::{BTreeMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use xlpipe_ml::rng::SplitMix64;

/// How the language of a batch (or both languages of a cross-lingual one)
/// is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LanguageChoice {
    Uniform,
    /// Proportional to the number of pairs each language has.
    Proportional,
}

/// How the monolingual batches are placed among the steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mix {
    /// Each batch is monolingual with probability alpha, independently (the
    /// paper's sampling): over n batches the realised share varies by about
    /// sqrt(alpha (1 - alpha) / n).
    Bernoulli,
    /// Each block of [`STRATUM`] steps holds alpha's share of monolingual
    /// batches (the fractions carried from block to block), in random order
    /// inside the block: the realised share is alpha to within one batch.
    Stratified,
}

/// Steps per block of [`Mix::Stratified`].
pub const STRATUM: usize = 20;

/// The `total` for a sampler whose draws must depend on the step alone
/// (training under WSD, whose stable phase is shared across budgets):
/// stratified blocks are then never cut short by the end of training.
/// A ramp of alpha needs a real total (`train` refuses one under WSD).
pub const NO_HORIZON: usize = usize::MAX;

/// alpha over training: constant, or a linear ramp from `alpha` to
/// `alpha_end` (beyond the paper).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlphaSchedule {
    pub start: f64,
    pub end: f64,
}

impl AlphaSchedule {
    pub fn at(&self, step: usize, total: usize) -> f64 {
        if total <= 1 {
            return self.start;
        }
        let t = step as f64 / (total - 1) as f64;
        self.start + (self.end - self.start) * t.min(1.0)
    }
}

/// Parallel pairs: for pair `i`, its question and passage in every language
/// (`None` where a language lacks it).
pub struct ParallelPairs {
    pub langs: Vec<String>,
    pub questions: Vec<Vec<Option<String>>>,
    pub passages: Vec<Vec<Option<String>>>,
}

impl ParallelPairs {
    pub fn len(&self) -> usize {
        self.questions.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn has(&self, lang: usize, pair: usize) -> bool {
        self.questions[lang][pair].is_some() && self.passages[lang][pair].is_some()
    }
}

/// One training batch: pair indices with the language of each side.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub monolingual: bool,
    pub query_lang: usize,
    pub passage_lang: usize,
    pub pairs: Vec<usize>,
}

/// Realised mix, written next to the trained model.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SamplerStats {
    pub monolingual_batches: usize,
    pub cross_lingual_batches: usize,
    /// Queries and passages drawn per language.
    pub query_languages: BTreeMap<String, usize>,
    pub passage_languages: BTreeMap<String, usize>,
}

pub struct HybridSampler<'a> {
    data: &'a ParallelPairs,
    batch_size: usize,
    schedule: AlphaSchedule,
    choice: LanguageChoice,
    mix: Mix,
    rng: SplitMix64,
    order: VecDeque<usize>,
    /// Stratified: the rest of the current block's draws, and alpha summed
    /// over the blocks so far (plus a random offset in [0, 1)).
    block: VecDeque<bool>,
    credit: f64,
    pub stats: SamplerStats,
}

impl<'a> HybridSampler<'a> {
    pub fn new(
        data: &'a ParallelPairs,
        batch_size: usize,
        schedule: AlphaSchedule,
        choice: LanguageChoice,
        mix: Mix,
        seed: u64,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            data.langs.len() >= 2 || schedule.start >= 1.0 && schedule.end >= 1.0,
            "cross-lingual batches (alpha < 1) need at least two languages; the data has {:?}",
            data.langs
        );
        anyhow::ensure!(
            batch_size >= 2,
            "a batch needs at least two pairs for in-batch negatives"
        );
        anyhow::ensure!(
            data.len() >= batch_size,
            "{} pairs cannot fill a batch of {batch_size}",
            data.len()
        );
        let mut rng = SplitMix64(seed);
        let credit = match mix {
            Mix::Bernoulli => 0.0,
            Mix::Stratified => rng.next_f64(),
        };
        Ok(HybridSampler {
            data,
            batch_size,
            schedule,
            choice,
            mix,
            rng,
            order: VecDeque::new(),
            block: VecDeque::new(),
            credit,
            stats: SamplerStats::default(),
        })
    }

    fn language(&mut self, except: Option<usize>) -> usize {
        let weights: Vec<f64> = (0..self.data.langs.len())
            .map(|l| {
                if Some(l) == except {
                    0.0
                } else {
                    match self.choice {
                        LanguageChoice::Uniform => 1.0,
                        LanguageChoice::Proportional => (0..self.data.len())
                            .filter(|&p| self.data.has(l, p))
                            .count() as f64,
                    }
                }
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let mut draw = self.rng.next_f64() * total;
        for (l, w) in weights.iter().enumerate() {
            if draw < *w {
                return l;
            }
            draw -= w;
        }
        weights
            .iter()
            .rposition(|w| *w > 0.0)
            .expect("some language has weight")
    }

    fn refill(&mut self) {
        let mut fresh: Vec<usize> = (0..self.data.len()).collect();
        // Fisher-Yates with the sampler's own generator.
        for i in (1..fresh.len()).rev() {
            let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
            fresh.swap(i, j);
        }
        self.order.extend(fresh);
    }

    /// Stratified: which of the next [`STRATUM`] steps (from `step`) are
    /// monolingual. Their number is alpha summed over the block, rounded by
    /// carrying the fraction to the next block.
    fn plan_block(&mut self, step: usize, total: usize) {
        let len = STRATUM.min(total.saturating_sub(step)).max(1);
        let before = self.credit.floor();
        self.credit += (step..step + len)
            .map(|s| self.schedule.at(s, total))
            .sum::<f64>();
        let count = (self.credit.floor() - before) as usize;
        let mut block: Vec<bool> = (0..len).map(|i| i < count).collect();
        for i in (1..block.len()).rev() {
            let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
            block.swap(i, j);
        }
        self.block.extend(block);
    }

    /// The batch for `step` of `total` steps.
    pub fn next_batch(&mut self, step: usize, total: usize) -> Batch {
        let monolingual = match self.mix {
            Mix::Bernoulli => self.rng.next_f64() < self.schedule.at(step, total),
            Mix::Stratified => {
                if self.block.is_empty() {
                    self.plan_block(step, total);
                }
                self.block.pop_front().expect("planned")
            }
        };
        let query_lang = self.language(None);
        let passage_lang = if monolingual {
            query_lang
        } else {
            self.language(Some(query_lang))
        };
        let mut pairs = Vec::with_capacity(self.batch_size);
        let mut seen_questions = HashSet::new();
        let mut seen_passages = HashSet::new();
        let mut deferred = Vec::new();
        // Two passes over the data at most: a pair that clashes now waits
        // for a later batch instead of being dropped.
        let mut budget = 2 * self.data.len() + self.batch_size;
        while pairs.len() < self.batch_size && budget > 0 {
            budget -= 1;
            if self.order.is_empty() {
                self.refill();
            }
            let p = self.order.pop_front().expect("refilled");
            let (Some(q), Some(d)) = (
                &self.data.questions[query_lang][p],
                &self.data.passages[passage_lang][p],
            ) else {
                deferred.push(p);
                continue;
            };
            if seen_questions.contains(q.as_str()) || seen_passages.contains(d.as_str()) {
                deferred.push(p);
                continue;
            }
            seen_questions.insert(q.as_str());
            seen_passages.insert(d.as_str());
            pairs.push(p);
        }
        for p in deferred.into_iter().rev() {
            self.order.push_front(p);
        }
        if monolingual {
            self.stats.monolingual_batches += 1;
        } else {
            self.stats.cross_lingual_batches += 1;
        }
        *self
            .stats
            .query_languages
            .entry(self.data.langs[query_lang].clone())
            .or_default() += pairs.len();
        *self
            .stats
            .passage_languages
            .entry(self.data.langs[passage_lang].clone())
            .or_default() += pairs.len();
        Batch {
            monolingual,
            query_lang,
            passage_lang,
            pairs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, langs: &[&str]) -> ParallelPairs {
        let text = |kind: &str, l: &str, i: usize| Some(format!("{kind} {l} {}", i % (n - 3)));
        ParallelPairs {
            langs: langs.iter().map(|l| l.to_string()).collect(),
            questions: langs
                .iter()
                .map(|l| (0..n).map(|i| text("q", l, i)).collect())
                .collect(),
            passages: langs
                .iter()
                .map(|l| (0..n).map(|i| text("p", l, i)).collect())
                .collect(),
        }
    }

    #[test]
    fn realised_mix_follows_alpha_and_cross_batches_never_pair_a_language_with_itself() {
        let d = data(200, &["en", "de", "es", "zh"]);
        for alpha in [0.0, 0.5, 1.0] {
            let schedule = AlphaSchedule {
                start: alpha,
                end: alpha,
            };
            let mut sampler = HybridSampler::new(
                &d,
                16,
                schedule,
                LanguageChoice::Uniform,
                Mix::Bernoulli,
                42,
            )
            .unwrap();
            let steps = 2000;
            for step in 0..steps {
                let batch = sampler.next_batch(step, steps);
                assert_eq!(batch.pairs.len(), 16);
                if batch.monolingual {
                    assert_eq!(batch.query_lang, batch.passage_lang);
                } else {
                    assert_ne!(batch.query_lang, batch.passage_lang);
                }
                // No duplicate texts (texts repeat every n - 3 pairs in this data).
                let qs: HashSet<&String> = batch
                    .pairs
                    .iter()
                    .map(|&p| d.questions[batch.query_lang][p].as_ref().unwrap())
                    .collect();
                let ps: HashSet<&String> = batch
                    .pairs
                    .iter()
                    .map(|&p| d.passages[batch.passage_lang][p].as_ref().unwrap())
                    .collect();
                assert_eq!((qs.len(), ps.len()), (16, 16));
            }
            let mono = sampler.stats.monolingual_batches as f64 / steps as f64;
            match alpha {
                0.0 => assert_eq!(sampler.stats.monolingual_batches, 0),
                1.0 => assert_eq!(sampler.stats.cross_lingual_batches, 0),
                // 4 standard deviations of a binomial(2000, 0.5) share.
                _ => assert!(
                    (mono - 0.5).abs() < 4.0 * (0.25f64 / steps as f64).sqrt(),
                    "{mono}"
                ),
            }
            // Uniform language choice: every language is drawn about equally.
            for count in sampler.stats.query_languages.values() {
                let share = *count as f64 / (16 * steps) as f64;
                assert!(
                    (share - 0.25).abs() < 0.03,
                    "{:?}",
                    sampler.stats.query_languages
                );
            }
        }
    }

    #[test]
    fn same_seed_same_batches() {
        let d = data(50, &["en", "de"]);
        let schedule = AlphaSchedule {
            start: 0.5,
            end: 0.5,
        };
        let run = || {
            let mut s =
                HybridSampler::new(&d, 8, schedule, LanguageChoice::Uniform, Mix::Stratified, 7)
                    .unwrap();
            (0..30).map(|i| s.next_batch(i, 30)).collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn stratified_mix_is_alpha_to_within_one_batch_at_every_block() {
        let d = data(60, &["en", "de", "zh"]);
        for alpha in [0.0, 0.1, 0.25, 0.33, 0.5, 0.75, 1.0] {
            let schedule = AlphaSchedule {
                start: alpha,
                end: alpha,
            };
            let mut s =
                HybridSampler::new(&d, 8, schedule, LanguageChoice::Uniform, Mix::Stratified, 9)
                    .unwrap();
            let steps = 137;
            let mut mono = 0usize;
            let mut first_block = Vec::new();
            for step in 0..steps {
                let batch = s.next_batch(step, steps);
                mono += batch.monolingual as usize;
                if step < STRATUM {
                    first_block.push(batch.monolingual);
                }
                if (step + 1) % STRATUM == 0 || step + 1 == steps {
                    let expected = alpha * (step + 1) as f64;
                    assert!(
                        (mono as f64 - expected).abs() < 1.0,
                        "alpha {alpha}: {mono} monolingual in {} steps",
                        step + 1
                    );
                }
            }
            assert_eq!(s.stats.monolingual_batches, mono);
            // The order inside a block is drawn, not a fixed pattern.
            if alpha == 0.5 {
                let alternating = first_block.windows(2).all(|w| w[0] != w[1]);
                assert!(!alternating, "{first_block:?}");
            }
        }
    }

    #[test]
    fn linear_ramp() {
        let s = AlphaSchedule {
            start: 0.0,
            end: 1.0,
        };
        assert_eq!(s.at(0, 11), 0.0);
        assert!((s.at(5, 11) - 0.5).abs() < 1e-12);
        assert_eq!(s.at(10, 11), 1.0);
    }
}
