//! Row-major matrix products through `gemm` (the crate under burn's CPU
//! backend), for the code that multiplies host buffers itself: exact
//! search and the encoder's CPU kernels. The one place that hands gemm
//! pointers, with the bounds it will touch checked first.

use std::mem::MaybeUninit;

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
