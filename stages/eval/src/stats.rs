//! The statistics of a report: mean and 95% confidence interval over seeds
//! (Student's t), and a paired bootstrap over queries.

use xlpipe_ml::rng::SplitMix64;

/// Mean and half-width of the 95% confidence interval (Student's t with
/// n - 1 degrees of freedom); no interval from a single value.
pub fn mean_ci(values: &[f64]) -> (f64, Option<f64>) {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return (mean, None);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, Some(t_975(n - 1) * (variance / n as f64).sqrt()))
}

/// The 97.5% quantile of Student's t distribution (NaN without a degree
/// of freedom).
fn t_975(degrees: usize) -> f64 {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    StudentsT::new(0.0, 1.0, degrees as f64).map_or(f64::NAN, |t| t.inverse_cdf(0.975))
}

/// Paired bootstrap of mean(x - y) over seeds and queries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedBootstrap {
    /// Observed mean difference.
    pub delta: f64,
    /// 95% percentile interval of the resampled mean difference.
    pub ci_low: f64,
    pub ci_high: f64,
    /// Two-sided p-value: twice the smaller share of resampled means on
    /// either side of zero (capped at 1). 0 means below 1 / samples.
    pub p_value: f64,
}

/// `differences[r][i]` is query i's metric under the system minus under the
/// baseline, both at replicate (seed) r; every replicate holds the same
/// queries in the same order. Each of `samples` resamples draws replicates
/// with replacement and, independently, queries with replacement, and takes
/// the mean difference over the drawn replicates x queries: so the interval
/// holds the seed-to-seed variance as well as the query sampling. With one
/// replicate this is the usual paired bootstrap over queries.
pub fn paired_bootstrap(differences: &[Vec<f64>], samples: usize, seed: u64) -> PairedBootstrap {
    let replicates = differences.len();
    let n = differences.first().map_or(0, Vec::len);
    assert!(
        differences.iter().all(|d| d.len() == n),
        "every replicate must hold the same queries"
    );
    let delta = differences.iter().flatten().sum::<f64>() / (replicates * n).max(1) as f64;
    if n == 0 || samples == 0 {
        return PairedBootstrap {
            delta,
            ci_low: f64::NAN,
            ci_high: f64::NAN,
            p_value: f64::NAN,
        };
    }
    let mut rng = SplitMix64(seed);
    let mut weights = vec![0u32; n];
    let mut means: Vec<f64> = (0..samples)
        .map(|_| {
            // Query multiplicities of this resample, shared by its replicates.
            weights.fill(0);
            for _ in 0..n {
                weights[(rng.next_u64() % n as u64) as usize] += 1;
            }
            let drawn: Vec<usize> = if replicates == 1 {
                vec![0]
            } else {
                (0..replicates)
                    .map(|_| (rng.next_u64() % replicates as u64) as usize)
                    .collect()
            };
            let total: f64 = drawn
                .iter()
                .map(|&r| {
                    differences[r]
                        .iter()
                        .zip(&weights)
                        .map(|(d, &w)| d * w as f64)
                        .sum::<f64>()
                })
                .sum();
            total / (drawn.len() * n) as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let quantile = |q: f64| means[((q * samples as f64) as usize).min(samples - 1)];
    let at_most_zero = means.iter().filter(|&&m| m <= 0.0).count() as f64 / samples as f64;
    let at_least_zero = means.iter().filter(|&&m| m >= 0.0).count() as f64 / samples as f64;
    PairedBootstrap {
        delta,
        ci_low: quantile(0.025),
        ci_high: quantile(0.975),
        p_value: (2.0 * at_most_zero.min(at_least_zero)).min(1.0),
    }
}

/// Holm's step-down adjustment of a family of p-values (controls the
/// family-wise error rate at any alpha without assuming independence): the
/// i-th smallest p times (m − i + 1), made monotone, capped at 1. NaN
/// p-values (comparisons that could not be made) stay NaN and do not count
/// in m.
pub fn holm(p_values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p_values.len())
        .filter(|&i| !p_values[i].is_nan())
        .collect();
    order.sort_by(|&a, &b| p_values[a].total_cmp(&p_values[b]));
    let m = order.len();
    let mut adjusted = vec![f64::NAN; p_values.len()];
    let mut running = 0.0f64;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p_values[i]).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}

/// A p-value as text: a resampling p of 0 only says "below 1 / samples".
pub fn p_text(p: f64, samples: usize) -> String {
    if p.is_nan() {
        "–".into()
    } else if p == 0.0 {
        format!("< {}", 1.0 / samples as f64)
    } else {
        format!("{p:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holm_adjusts_step_down() {
        // Worked by hand from the definition: sorted 0.01, 0.02, 0.03, 0.04
        // times 4, 3, 2, 1 = 0.04, 0.06, 0.06, 0.04, made monotone.
        let adjusted = holm(&[0.03, 0.01, 0.04, 0.02]);
        let expected = [0.06, 0.04, 0.06, 0.06];
        for (a, e) in adjusted.iter().zip(expected) {
            assert!((a - e).abs() < 1e-12, "{adjusted:?}");
        }
        // Capped at 1; NaN left out of the family.
        let capped = holm(&[0.6, f64::NAN, 0.7]);
        assert_eq!(capped[0], 1.0);
        assert!(capped[1].is_nan());
        assert!((capped[2] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn mean_and_t_interval() {
        let (mean, ci) = mean_ci(&[1.0, 2.0, 3.0]);
        assert_eq!(mean, 2.0);
        // sd = 1, n = 3: t(0.975, 2) / sqrt(3), t from scipy.stats.t.ppf.
        assert!((ci.unwrap() - 4.302_652_729_696_142 / 3f64.sqrt()).abs() < 1e-9);
        assert_eq!(mean_ci(&[5.0]), (5.0, None));
    }

    #[test]
    fn bootstrap_separates_a_shift_from_noise() {
        let mut rng = SplitMix64(3);
        let noise: Vec<f64> = (0..500)
            .map(|_| (rng.next_u64() % 1000) as f64 / 1000.0 - 0.5)
            .collect();
        let shifted: Vec<f64> = noise.iter().map(|x| x + 0.2).collect();
        let clear = paired_bootstrap(&[shifted], 1000, 1);
        assert!(clear.p_value < 0.01 && clear.ci_low > 0.1, "{clear:?}");
        let centred: Vec<f64> = noise
            .iter()
            .map(|x| x - noise.iter().sum::<f64>() / 500.0)
            .collect();
        let none = paired_bootstrap(&[centred], 1000, 1);
        assert!(
            none.p_value > 0.5 && none.ci_low < 0.0 && none.ci_high > 0.0,
            "{none:?}"
        );
        assert_eq!(p_text(0.0, 1000), "< 0.001");
        assert_eq!(p_text(0.0421, 1000), "0.042");
    }

    /// Student's t 97.5% quantile found independently of the table: the
    /// density integrated numerically (Simpson) and inverted by bisection.
    fn t_975_by_integration(degrees: usize) -> f64 {
        let nu = degrees as f64;
        let log_c = libm::lgamma((nu + 1.0) / 2.0)
            - libm::lgamma(nu / 2.0)
            - 0.5 * (nu * std::f64::consts::PI).ln();
        let density = |x: f64| (log_c - (nu + 1.0) / 2.0 * (1.0 + x * x / nu).ln()).exp();
        let mass = |t: f64| {
            let n = 4000;
            let h = t / n as f64;
            let sum: f64 = (0..=n)
                .map(|i| {
                    let w = if i == 0 || i == n {
                        1.0
                    } else if i % 2 == 1 {
                        4.0
                    } else {
                        2.0
                    };
                    w * density(i as f64 * h)
                })
                .sum();
            sum * h / 3.0
        };
        let (mut low, mut high) = (0.0, 20.0);
        for _ in 0..60 {
            let mid = (low + high) / 2.0;
            if mass(mid) < 0.475 {
                low = mid;
            } else {
                high = mid;
            }
        }
        (low + high) / 2.0
    }

    #[test]
    fn t_quantiles_match_an_independent_computation() {
        for degrees in (1..=45).chain([60, 120, 1000]) {
            let reference = t_975_by_integration(degrees);
            let ours = t_975(degrees);
            assert!(
                (ours - reference).abs() < 1e-6,
                "t_975({degrees}) = {ours}, integration gives {reference}"
            );
        }
    }

    #[test]
    fn seed_variance_widens_the_interval() {
        // Three seeds whose mean differences are +0.15, -0.05 and +0.05:
        // the queries alone look decisive, the seeds do not agree.
        let mut rng = SplitMix64(11);
        let seeds: Vec<Vec<f64>> = [0.15, -0.05, 0.05]
            .iter()
            .map(|offset| {
                (0..800)
                    .map(|_| offset + ((rng.next_u64() % 1000) as f64 / 1000.0 - 0.5) * 0.2)
                    .collect()
            })
            .collect();
        let queries_only: Vec<f64> = (0..800)
            .map(|i| seeds.iter().map(|s| s[i]).sum::<f64>() / 3.0)
            .collect();
        let narrow = paired_bootstrap(&[queries_only], 2000, 5);
        let wide = paired_bootstrap(&seeds, 2000, 5);
        assert!((narrow.delta - wide.delta).abs() < 1e-12);
        assert!(narrow.p_value < 0.001, "{narrow:?}");
        assert!(
            wide.ci_high - wide.ci_low > 10.0 * (narrow.ci_high - narrow.ci_low),
            "{wide:?} vs {narrow:?}"
        );
        assert!(wide.p_value > 0.05 && wide.ci_low < 0.0, "{wide:?}");
    }
}
