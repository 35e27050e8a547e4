//! Row-major matrix products through `gemm` (the crate under burn's CPU
//! backend), for the code that multiplies host buffers itself: exact
//! search and the encoder's CPU kernels. The one place that hands gemm
//! pointers, with the bounds it will touch checked first.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// `dst (+)= beta * lhs * rhs` for row-major `dst` (`m x n`; read only to
/// `accumulate`, so it may be uninitialised otherwise), each operand given
/// by its strides along its rows and columns.
#[allow(clippy::too_many_arguments)]
pub fn product(
    (m, n, k): (usize, usize, usize),
    dst: &mut [MaybeUninit<f32>],
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    assert_eq!(dst.len(), m * n, "product: output size");
    if m == 0 || n == 0 {
        return;
    }
    // The last element gemm reads of each operand, checked here because
    // gemm takes pointers.
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
    };
    assert!(k == 0 || last(m, k, lhs_rs, lhs_cs) < lhs.len());
    assert!(k == 0 || last(k, n, rhs_rs, rhs_cs) < rhs.len());
    let clock = COUNTING.load(Ordering::Relaxed).then(Instant::now);
    // SAFETY: every element gemm reads or writes lies inside the slices
    // (checked above), and `dst` does not overlap the operands. Without
    // `accumulate`, gemm writes `dst` without reading it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<f32>(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
    if let Some(clock) = clock {
        let nanos = clock.elapsed().as_nanos() as u64;
        let (flops, time) = match parallelism {
            gemm::Parallelism::None => (&NARROW_FLOPS, &NARROW_NANOS),
            _ => (&WIDE_FLOPS, &WIDE_NANOS),
        };
        flops.fetch_add(2 * (m * n * k) as u64, Ordering::Relaxed);
        time.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Whether [`product`] counts its FLOPs and time (for benchmarks: the cost,
/// two clock reads a product, is paid only then).
static COUNTING: AtomicBool = AtomicBool::new(false);
static WIDE_FLOPS: AtomicU64 = AtomicU64::new(0);
static WIDE_NANOS: AtomicU64 = AtomicU64::new(0);
static NARROW_FLOPS: AtomicU64 = AtomicU64::new(0);
static NARROW_NANOS: AtomicU64 = AtomicU64::new(0);

/// What the products did while counted: those split over all threads
/// (dense layers; their wall time) apart from those run on one thread
/// inside parallel tasks (attention; time summed over the threads).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProductCounts {
    pub wide_flops: f64,
    pub wide_seconds: f64,
    pub narrow_flops: f64,
    pub narrow_thread_seconds: f64,
}

/// Starts counting the products' FLOPs and time from zero.
pub fn start_counting() {
    for c in [&WIDE_FLOPS, &WIDE_NANOS, &NARROW_FLOPS, &NARROW_NANOS] {
        c.store(0, Ordering::Relaxed);
    }
    COUNTING.store(true, Ordering::Relaxed);
}

/// Stops counting and returns what was counted since [`start_counting`].
pub fn stop_counting() -> ProductCounts {
    COUNTING.store(false, Ordering::Relaxed);
    let read = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
    ProductCounts {
        wide_flops: read(&WIDE_FLOPS),
        wide_seconds: read(&WIDE_NANOS) * 1e-9,
        narrow_flops: read(&NARROW_FLOPS),
        narrow_thread_seconds: read(&NARROW_NANOS) * 1e-9,
    }
}

/// `beta * lhs * rhs` in a new buffer, written once, by gemm.
pub(crate) fn product_output(
    shape: (usize, usize, usize),
    lhs: (&[f32], (usize, usize)),
    rhs: (&[f32], (usize, usize)),
    beta: f32,
    parallelism: gemm::Parallelism,
) -> Vec<f32> {
    let len = shape.0 * shape.1;
    let mut out = Vec::with_capacity(len);
    let dst = &mut out.spare_capacity_mut()[..len];
    product(
        shape,
        dst,
        false,
        lhs.0,
        lhs.1,
        rhs.0,
        rhs.1,
        beta,
        parallelism,
    );
    // SAFETY: gemm wrote every element (`product` without `accumulate`).
    unsafe { out.set_len(len) };
    out
}
