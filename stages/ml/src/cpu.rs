//! What this CPU can do, read at run time: the vector extensions the
//! matrix products dispatch on, the kernels that dispatch picks, and the
//! machine's measured f32 peak (for benchmarks that report a fraction of
//! it).
//!
//! Why at run time: one binary serves machines with and without AVX-512
//! (the same build runs on a laptop, a cluster's AMD nodes and its Intel
//! ones). `gemm` is built with its `x86-v4` feature, so it carries both its
//! 256-bit FMA and its 512-bit AVX-512 kernels and picks one per call from
//! `is_x86_feature_detected!`; [`gemm_kernels`] applies the same test, so
//! the log line at the start of a run names the kernels that really run.

use std::fmt;

/// The vector extensions the CPU kernels care about, as detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub avx2: bool,
    pub fma: bool,
    pub avx512f: bool,
    /// AVX512-BF16 (`vdpbf16ps`).
    pub avx512_bf16: bool,
    /// Intel AMX tiles with bf16 products, usable by this process only once
    /// Linux grants the tile state (not requested: no AMX kernel here).
    pub amx_bf16: bool,
}

impl Features {
    pub fn detect() -> Features {
        #[cfg(target_arch = "x86_64")]
        {
            Features {
                avx2: std::arch::is_x86_feature_detected!("avx2"),
                fma: std::arch::is_x86_feature_detected!("fma"),
                avx512f: std::arch::is_x86_feature_detected!("avx512f"),
                avx512_bf16: std::arch::is_x86_feature_detected!("avx512bf16"),
                amx_bf16: amx_bf16(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Features {
            avx2: false,
            fma: false,
            avx512f: false,
            avx512_bf16: false,
            amx_bf16: false,
        }
    }
}

/// CPUID leaf 7 EDX bits 22 (AMX-BF16) and 24 (AMX-TILE), and the OS
/// saving the tile state (XCR0 bits 17 and 18).
#[cfg(target_arch = "x86_64")]
fn amx_bf16() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // CPUID is available on every x86-64 CPU; leaf 7 is read only when
    // leaf 0 says it exists.
    let max_leaf = __cpuid(0).eax;
    let edx = if max_leaf >= 7 {
        __cpuid_count(7, 0).edx
    } else {
        0
    };
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    if max_leaf < 7 || edx & (1 << 22) == 0 || edx & (1 << 24) == 0 || !osxsave {
        return false;
    }
    // SAFETY: XGETBV is available when CPUID reports OSXSAVE (checked).
    let xcr0 = unsafe { std::arch::x86_64::_xgetbv(0) };
    xcr0 & (0b11 << 17) == 0b11 << 17
}

/// The f32 matrix-product kernels `gemm` runs on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKernels {
    /// 512-bit AVX-512F microkernels (gemm's `x86-v4`).
    Avx512,
    /// 256-bit AVX2 + FMA microkernels.
    Fma,
    /// Portable scalar code.
    Scalar,
}

/// The kernels `gemm` dispatches to, by the same test it applies.
pub fn gemm_kernels(features: &Features) -> GemmKernels {
    if features.avx512f {
        GemmKernels::Avx512
    } else if features.fma {
        GemmKernels::Fma
    } else {
        GemmKernels::Scalar
    }
}

impl fmt::Display for GemmKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GemmKernels::Avx512 => "avx512f (512-bit)",
            GemmKernels::Fma => "avx2+fma (256-bit)",
            GemmKernels::Scalar => "scalar",
        })
    }
}

/// One line for logs and benchmarks: what was detected and what runs.
pub fn describe() -> String {
    let f = Features::detect();
    let flag = |on: bool, name: &str| {
        if on {
            name.to_string()
        } else {
            format!("no {name}")
        }
    };
    format!(
        "CPU {}: {}, {}, {}, {}, {}; f32 products: gemm {}; element-wise loops: {}; bf16 products: {}",
        model_name().unwrap_or_else(|| "(unknown model)".into()),
        flag(f.avx2, "avx2"),
        flag(f.fma, "fma"),
        flag(f.avx512f, "avx512f"),
        flag(f.avx512_bf16, "avx512_bf16"),
        flag(f.amx_bf16, "amx_bf16"),
        gemm_kernels(&f),
        crate::vector::Width::detect(),
        "none (f32 only in this build)"
    )
}

/// The `model name` line of `/proc/cpuinfo`, where there is one.
fn model_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
}

/// Measured f32 FMA throughput of this machine, all threads of rayon's
/// pool busy: FLOP/s (an FMA counts 2). The ceiling the products are held
/// against in `xlpipe bench`.
pub fn peak_f32_flops(seconds: f64) -> f64 {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    let features = Features::detect();
    let clock = std::time::Instant::now();
    let flops: f64 = (0..threads)
        .into_par_iter()
        .map(|_| {
            let mut done = 0.0;
            while clock.elapsed().as_secs_f64() < seconds {
                done += fma_block(&features);
            }
            done
        })
        .sum();
    flops / clock.elapsed().as_secs_f64()
}

/// Independent FMA chains (enough to hide the FMA latency), at the widest
/// vector width this CPU has; returns the FLOPs done.
fn fma_block(f: &Features) -> f64 {
    const ITERATIONS: usize = 1 << 16;
    #[cfg(target_arch = "x86_64")]
    {
        if f.avx512f {
            // SAFETY: AVX-512F was detected at run time.
            return unsafe { x86::fma_chains_512(ITERATIONS) };
        }
        if f.fma && f.avx2 {
            // SAFETY: FMA and AVX2 were detected at run time.
            return unsafe { x86::fma_chains_256(ITERATIONS) };
        }
    }
    let mut acc = [1.0f32; 8];
    for _ in 0..ITERATIONS {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    (ITERATIONS * 8 * 2) as f64
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 12 independent accumulators: FMA latency (4-5 cycles) times two
    /// ports, with room to spare.
    const CHAINS: usize = 12;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_chains_256(iterations: usize) -> f64 {
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iterations {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        std::hint::black_box(acc);
        (iterations * CHAINS * 8 * 2) as f64
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_chains_512(iterations: usize) -> f64 {
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iterations {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        std::hint::black_box(acc);
        (iterations * CHAINS * 16 * 2) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_choice_follows_the_features() {
        let none = Features {
            avx2: false,
            fma: false,
            avx512f: false,
            avx512_bf16: false,
            amx_bf16: false,
        };
        assert_eq!(gemm_kernels(&none), GemmKernels::Scalar);
        let avx2 = Features {
            avx2: true,
            fma: true,
            ..none
        };
        assert_eq!(gemm_kernels(&avx2), GemmKernels::Fma);
        let avx512 = Features {
            avx512f: true,
            ..avx2
        };
        assert_eq!(gemm_kernels(&avx512), GemmKernels::Avx512);
    }

    #[test]
    fn detection_agrees_with_proc_cpuinfo() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            eprintln!("skipped: no /proc/cpuinfo");
            return;
        };
        let flags: Vec<&str> = info
            .lines()
            .find_map(|l| l.strip_prefix("flags"))
            .map(|l| l.split_whitespace().collect())
            .unwrap_or_default();
        let f = Features::detect();
        assert_eq!(f.avx2, flags.contains(&"avx2"));
        assert_eq!(f.fma, flags.contains(&"fma"));
        assert_eq!(f.avx512f, flags.contains(&"avx512f"));
        assert_eq!(f.avx512_bf16, flags.contains(&"avx512_bf16"));
        // The kernel lists amx_bf16 only where it enables the tile state.
        assert_eq!(f.amx_bf16, flags.contains(&"amx_bf16"));
        let line = describe();
        assert!(line.contains(&gemm_kernels(&f).to_string()), "{line}");
    }

    #[test]
    fn the_peak_is_a_positive_rate() {
        let peak = peak_f32_flops(0.05);
        assert!(peak.is_finite() && peak > 1e8, "{peak}");
    }
}
