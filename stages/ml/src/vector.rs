//! Element-wise loops at this CPU's full vector width, chosen at run time,
//! and an `exp` those loops can vectorise.
//!
//! Why: the build targets baseline x86-64, so the loops the compiler
//! vectorises (layer norm, GELU, softmax, dropout, AdamW) run 4 lanes wide
//! even where the CPU has 16-lane AVX-512, and `f32::exp` is a call into
//! libm per element, which no loop around it can vectorise. A kernel
//! written with [`widest_fn!`] is compiled again with AVX-512 and with
//! AVX2 + FMA enabled, and runs the widest this CPU has; [`exp`] is
//! branch-free arithmetic.
//!
//! The width never changes a result: Rust does not fuse a multiply and an
//! add unless asked (`mul_add`, exact either way), and no loop's order of
//! additions depends on the lanes. So one binary gives the same numbers on
//! every x86-64 CPU, which `every_width_gives_the_same_bits` checks.

/// A vector extension the element-wise kernels are compiled for, in
/// order of width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Width {
    /// The build's baseline (SSE2 on x86-64): 4 f32 lanes.
    Baseline,
    /// AVX2 with FMA: 8 lanes.
    Avx2,
    /// AVX-512 (F, VL, BW, DQ): 16 lanes.
    Avx512,
}

impl Width {
    /// The widest this CPU has.
    pub fn detect() -> Width {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") {
                return Width::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Width::Avx2;
            }
        }
        Width::Baseline
    }
}

impl std::fmt::Display for Width {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Width::Avx512 => "avx512 (16 lanes)",
            Width::Avx2 => "avx2+fma (8 lanes)",
            Width::Baseline => "baseline (4 lanes)",
        })
    }
}

/// Defines `fn NAME(args)`, whose body runs compiled for the widest
/// vector extension of this CPU, and `fn NAME_AT(width, args)`, the same
/// at `width` or this CPU's widest if that is narrower (for the tests
/// that compare widths). The loops in the body reach the width only where
/// what they call is inlined: mark helpers `#[inline(always)]`.
///
/// A macro rather than a function taking a closure: a closure is compiled
/// where it is written, without the caller's extensions, unless the
/// inliner happens to take it in (measured: it did not, for the attention
/// kernel's softmax).
macro_rules! widest_fn {
    ($(#[$attr:meta])* $vis:vis fn $name:ident / $at:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            $at($crate::vector::Width::detect(), $($arg),*)
        }

        #[allow(clippy::too_many_arguments)]
        $vis fn $at(width: $crate::vector::Width, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn baseline($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { baseline($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { baseline($($arg),*) }
                match width.min($crate::vector::Width::detect()) {
                    // SAFETY: this CPU has the extensions (`Width::detect`).
                    $crate::vector::Width::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::vector::Width::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::vector::Width::Baseline => {}
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = width;
            baseline($($arg),*)
        }
    };
}
pub(crate) use widest_fn;

/// Partial sums kept by [`sum`] and [`dot`].
const LANES: usize = 16;

/// The sum of `values` in 16 interleaved partial sums, added pairwise at
/// the end: a fixed order (the same on every CPU and at every width) that
/// stays in vector registers, where one running sum would wait on the
/// latency of each addition.
#[inline(always)]
pub fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        lanes.iter_mut().zip(chunk).for_each(|(s, v)| *s += v);
    }
    lanes
        .iter_mut()
        .zip(chunks.remainder())
        .for_each(|(s, v)| *s += v);
    add_lanes(lanes)
}

/// The largest of `values` (negative infinity for none), in 16
/// interleaved maxima so that it vectorises (`f32::max`'s NaN rule keeps
/// a running maximum scalar). A NaN is skipped unless it comes first in
/// its lane; callers meet it again in what they compute from the values.
#[inline(always)]
pub fn max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        lanes
            .iter_mut()
            .zip(chunk)
            .for_each(|(m, &v)| *m = if v > *m { v } else { *m });
    }
    lanes
        .iter_mut()
        .zip(chunks.remainder())
        .for_each(|(m, &v)| *m = if v > *m { v } else { *m });
    lanes
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// The dot product of `a` and `b` (as long as the shorter), summed as
/// [`sum`] does.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0.0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        lanes
            .iter_mut()
            .zip(x.iter().zip(y))
            .for_each(|(s, (x, y))| *s += x * y);
    }
    lanes
        .iter_mut()
        .zip(ca.remainder().iter().zip(cb.remainder()))
        .for_each(|(s, (x, y))| *s += x * y);
    add_lanes(lanes)
}

/// The partial sums added pairwise, in a fixed order.
#[inline(always)]
fn add_lanes(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    lanes[0]
}

/// e^x in single precision, within 2 ulp of libm's `expf` on the range
/// where the result is a normal number, 0 below it, without branches or
/// calls so that the loops around it vectorise. Cephes' `expf`: x is split
/// into n ln 2 and r with |r| <= ln 2 / 2, e^r comes from a polynomial and
/// 2^n goes into the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, the first exact in few bits, so that n * LN2_HI
    // is exact and r keeps its low bits.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer
    // (SSE2 has no rounding instruction; `round` would be a libm call).
    const ROUND: f32 = 12_582_912.0;
    let lowest = -87.336_55; // ln of the smallest normal f32
    let clamped = x.clamp(lowest, 88.722_83); // ln of the largest f32
    let shifted = clamped * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = p * r + c;
    }
    let e_r = p * r * r + r + 1.0;
    // n in [-126, 128] as an integer: the low bits of `shifted` (integer
    // arithmetic, where a float-to-integer conversion would saturate
    // lane by lane). 2^n is then the exponent field alone, except at
    // n = 128, which is 2 * 2^127.
    let n = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let top = (n == 128) as i32;
    let scale = f32::from_bits(((n - top + 127) as u32) << 23);
    let value = e_r * scale * (1 + top) as f32;
    if x < lowest {
        0.0
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two positive floats.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0;
        let mut at = 0.0;
        let (lo, hi) = (-87.3f32, 88.3f32);
        let n = 2_000_000;
        for i in 0..=n {
            let x = lo + (hi - lo) * i as f32 / n as f32;
            let (ours, libm) = (exp(x), libm::expf(x));
            assert!(ours.is_finite(), "exp({x}) = {ours}");
            let d = ulps(ours, libm);
            if d > worst {
                (worst, at) = (d, x);
            }
        }
        assert!(worst <= 2, "{worst} ulp at {at}");
        // The ends: 0 below the normal range, infinity never.
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(ulps(exp(88.7), libm::expf(88.7)) <= 2);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn sum_and_dot_are_the_sums_in_f64_within_rounding() {
        let mut rng = crate::rng::SplitMix64(3);
        for n in [0, 1, 15, 16, 17, 100, 1023] {
            let a: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 - 0.5).collect();
            let exact_sum: f64 = a.iter().map(|&x| x as f64).sum();
            let exact_dot: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let bound = 1e-6 * (n as f64 + 1.0);
            assert!((sum(&a) as f64 - exact_sum).abs() <= bound, "sum of {n}");
            assert!(
                (dot(&a, &b) as f64 - exact_dot).abs() <= bound,
                "dot of {n}"
            );
        }
        assert!(sum(&[1.0, f32::NAN]).is_nan());
        let values: Vec<f32> = (0..37).map(|i| ((i * 17) % 37) as f32 - 20.0).collect();
        assert_eq!(max(&values), 16.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    widest_fn! {
        /// A softmax-like loop, as the kernels run them.
        fn work / work_at(x: &[f32]) -> Vec<f32> {
            let mut out: Vec<f32> = x.iter().map(|&v| exp(v) * 0.5 + v.abs().sqrt() / 3.0).collect();
            let total = sum(&out) + dot(&out, x);
            out.iter_mut().for_each(|v| *v /= total);
            out
        }
    }

    #[test]
    fn every_width_gives_the_same_bits() {
        let mut rng = crate::rng::SplitMix64(7);
        let x: Vec<f32> = (0..10_007)
            .map(|_| rng.next_f64() as f32 * 20.0 - 10.0)
            .collect();
        let baseline = work_at(Width::Baseline, &x);
        let widths = match Width::detect() {
            Width::Avx512 => vec![Width::Avx2, Width::Avx512],
            Width::Avx2 => vec![Width::Avx2],
            Width::Baseline => {
                eprintln!("skipped: this CPU has neither AVX2 nor AVX-512");
                vec![]
            }
        };
        assert_eq!(work(&x), work_at(Width::detect(), &x));
        for width in widths {
            let wide = work_at(width, &x);
            assert!(
                wide.iter()
                    .zip(&baseline)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{width} differs from the baseline"
            );
        }
    }
}
