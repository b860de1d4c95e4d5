//! `C (+)= A · B` on plain f32 slices by the gemm crate (candle's CPU matmul), for the kernels
//! that keep their operands outside tensors: a LoRA projection ([`super::lora_linear`]) and
//! the hand-written training step ([`super::train_step`]). Transposed operands are strides,
//! never copies.

use candle_core::Result;

/// A matrix operand: its elements from the first one, and the distance between rows and
/// between columns (`(data, cols, 1)` row-major; `(data, 1, rows)` is the transpose of a
/// row-major matrix).
pub(crate) type Operand<'a> = (&'a [f32], isize, isize);

/// `dst (m, n) = [dst +] lhs (m, k) @ rhs (k, n)` on rayon's pool (on the calling thread
/// inside [`super::serial`]): `dst` row-major with
/// `dst_rs` elements between rows. Errors if a stride reaches past its slice or is negative.
pub(crate) fn gemm_into(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    (lhs, lhs_rs, lhs_cs): Operand,
    (rhs, rhs_rs, rhs_cs): Operand,
    accumulate: bool,
    dst_rs: usize,
) -> Result<()> {
    let reach = |rows: usize, cols: usize, rs: isize, cs: isize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs.unsigned_abs() + (cols - 1) * cs.unsigned_abs() + 1
        }
    };
    if n > dst_rs
        || dst.len() < reach(m, n, dst_rs as isize, 1)
        || lhs.len() < reach(m, k, lhs_rs, lhs_cs)
        || rhs.len() < reach(k, n, rhs_rs, rhs_cs)
        || lhs_rs < 0
        || lhs_cs < 0
        || rhs_rs < 0
        || rhs_cs < 0
    {
        candle_core::bail!("gemm: the operands do not cover ({m}, {k}) @ ({k}, {n})");
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(0.0);
            }
        }
        return Ok(());
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && !super::is_serial() {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every element the strides reach lies inside its slice (checked above), `dst` is
    // exclusively borrowed and distinct from both operands, and strides are non-negative.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    };
    Ok(())
}
