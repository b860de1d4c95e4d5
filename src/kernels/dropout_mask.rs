//! Inverted dropout masks held as bits, drawn in parallel from a seed.
//!
//! A LoRA adapter drops elements of its input (PEFT's `lora_dropout`, each adapted module its
//! own mask) and needs the same mask again in the backward pass. Held as one f32 per element,
//! the masks of a SmolLM2-135M step (batch 4 × 128, every linear layer) take 300 MB and their
//! drawing one `f32` at a time took about 5% of the step. Here a mask is one bit per
//! element (`rows × in / 8` bytes), drawn from ChaCha8 streams of 16 rows each, so the result
//! depends on the seed alone, never on the thread count.
//!
//! An element is dropped when a uniform 32-bit integer `v` is below `t = round(p · 2³²)`, so
//! with probability `t / 2³²`: exactly `p` for every f32 `p ≥ 2⁻⁹`, within 2⁻³³ below. Only
//! `v`'s top byte is drawn unless it equals `t`'s top byte (1 time in 256), when 24 more bits
//! are: about 8.1 random bits per element.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::layers;
use crate::{Error, Result};

/// Rows drawn from one ChaCha8 stream (the unit of parallel work).
const ROWS_PER_STREAM: usize = 16;

/// Which elements of a `(rows, cols)` input survive inverted dropout with probability `p`: a
/// survivor is scaled by `1 / (1 − p)`, the rest are zeroed (Srivastava et al. 2014).
#[derive(Debug, Clone, PartialEq)]
pub struct DropoutMask {
    rows: usize,
    cols: usize,
    p: f32,
    words: usize,   // u64 words per row
    bits: Vec<u64>, // (rows, words): bit j of row r is element (r, j); 1 = kept
}

impl DropoutMask {
    /// Draws the mask of a `(rows, cols)` input from `seed`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `p` is not in `[0, 1)` or the size overflows.
    pub fn sample(rows: usize, cols: usize, p: f32, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::InvalidArgument(format!(
                "dropout probability {p} is not in [0, 1)"
            )));
        }
        let words = cols.div_ceil(64);
        let n = rows
            .checked_mul(cols)
            .and(rows.checked_mul(words))
            .ok_or_else(|| {
                Error::InvalidArgument(format!("a dropout mask of {rows} × {cols} overflows"))
            })?;
        let mut bits = vec![0u64; n];
        // Drop when v < t, v uniform in [0, 2³²).
        let t = (p as f64 * 4_294_967_296.0).round() as u64;
        let t_hi = (t >> 24) as u8;
        let t_lo = (t & 0xff_ffff) as u32;
        let draw_block = |(block, out): (usize, &mut [u64])| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(block as u64);
            let block_rows = out.len() / words.max(1);
            let mut bytes = vec![0u8; block_rows * cols];
            rng.fill_bytes(&mut bytes);
            for (row, row_bits) in bytes.chunks_exact(cols.max(1)).zip(out.chunks_mut(words)) {
                for (chunk, bits) in row.chunks(64).zip(row_bits.iter_mut()) {
                    let (below, tied) = compare_bytes(chunk, t_hi);
                    let mut kept = !(below | tied) & ones(chunk.len());
                    // The ties (1 in 256) decided by 24 more bits, in element order.
                    let mut ties = tied;
                    while ties != 0 {
                        let j = ties.trailing_zeros();
                        ties &= ties - 1;
                        if (rng.next_u32() >> 8) >= t_lo {
                            kept |= 1 << j;
                        }
                    }
                    *bits = kept;
                }
            }
        };
        if words > 0 {
            bits.par_chunks_mut(ROWS_PER_STREAM * words)
                .enumerate()
                .for_each(draw_block);
        }
        Ok(Self {
            rows,
            cols,
            p,
            words,
            bits,
        })
    }

    /// `(rows, cols)`, the shape of the input the mask is for.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The dropout probability.
    pub fn p(&self) -> f32 {
        self.p
    }

    /// What survivors are multiplied by, `1 / (1 − p)` in f32.
    pub fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }

    /// Whether element `(row, col)` survives.
    pub fn kept(&self, row: usize, col: usize) -> bool {
        row < self.rows
            && col < self.cols
            && (self.bits[row * self.words + col / 64] >> (col % 64)) & 1 == 1
    }

    /// The mask as `rows × cols` multipliers, 0 or [`DropoutMask::scale`], row-major: what
    /// [`DropoutMask::apply`] multiplies by.
    pub fn to_vec(&self) -> Vec<f32> {
        let scale = self.scale();
        (0..self.rows)
            .flat_map(|r| (0..self.cols).map(move |c| (r, c)))
            .map(|(r, c)| if self.kept(r, c) { scale } else { 0.0 })
            .collect()
    }

    /// `out = x ∘ mask` for a row-major `x` of the mask's shape: each element times 0 or
    /// `1 / (1 − p)`, the same products as multiplying by [`DropoutMask::to_vec`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `x` or `out` is not `rows × cols` long.
    pub fn apply(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let n = self.rows * self.cols;
        if x.len() != n || out.len() != n {
            return Err(Error::InvalidArgument(format!(
                "dropout mask of {} × {} applied to {} elements into {}",
                self.rows,
                self.cols,
                x.len(),
                out.len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let (cols, words, scale) = (self.cols, self.words, self.scale());
        let rows_per_task = (16_384 / cols).max(1);
        out.par_chunks_mut(rows_per_task * cols)
            .zip(x.par_chunks(rows_per_task * cols))
            .enumerate()
            .for_each(|(task, (out, x))| {
                let first = task * rows_per_task;
                for (r, (out, x)) in out.chunks_mut(cols).zip(x.chunks(cols)).enumerate() {
                    let row_bits = &self.bits[(first + r) * words..][..words];
                    apply_row(x, row_bits, scale, out);
                }
            });
        Ok(())
    }
}

/// The lowest `n` bits set (`n` ≤ 64).
fn ones(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1 << n) - 1
    }
}

layers::multiversion! {
    /// Bit `j` of the first word: `bytes[j] < t`; of the second: `bytes[j] == t` (≤ 64 bytes).
    fn compare_bytes(bytes: &[u8], t: u8) -> (u64, u64) {
        let (mut below, mut tied) = (0u64, 0u64);
        for (k, chunk) in bytes.chunks(16).enumerate() {
            let (mut b, mut e) = (0u32, 0u32);
            for (i, &v) in chunk.iter().enumerate() {
                b |= ((v < t) as u32) << i;
                e |= ((v == t) as u32) << i;
            }
            below |= (b as u64) << (16 * k);
            tied |= (e as u64) << (16 * k);
        }
        (below, tied)
    }
}

layers::multiversion! {
    /// `out = x ∘ m` for one row: element `j` times `scale` if bit `j` of `bits` is set, else
    /// times 0.
    fn apply_row(x: &[f32], bits: &[u64], scale: f32, out: &mut [f32]) {
        for (k, (out, x)) in out.chunks_mut(16).zip(x.chunks(16)).enumerate() {
            let m = (bits[k / 4] >> (16 * (k % 4))) as u32;
            let full = (<&mut [f32; 16]>::try_from(&mut *out), <&[f32; 16]>::try_from(x));
            if let (Ok(out), Ok(x)) = full {
                for i in 0..16 {
                    out[i] = x[i] * if (m >> i) & 1 == 1 { scale } else { 0.0 };
                }
            } else {
                for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
                    *o = v * if (m >> i) & 1 == 1 { scale } else { 0.0 };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_seeded_and_drop_about_p() {
        let (rows, cols, p) = (100, 333, 0.2);
        let m = DropoutMask::sample(rows, cols, p, 7).unwrap();
        assert_eq!(m, DropoutMask::sample(rows, cols, p, 7).unwrap());
        assert_ne!(m, DropoutMask::sample(rows, cols, p, 8).unwrap());
        let dropped = (0..rows)
            .flat_map(|r| (0..cols).map(move |c| (r, c)))
            .filter(|&(r, c)| !m.kept(r, c))
            .count() as f64;
        let n = (rows * cols) as f64;
        // Binomial: mean n p, sd sqrt(n p (1 − p)) ≈ 73; 5 sd.
        assert!(
            (dropped - n * 0.2).abs() < 5.0 * (n * 0.2 * 0.8f64).sqrt(),
            "{dropped}"
        );
        // Bits past the last column stay clear.
        assert!(m
            .bits
            .chunks(m.words)
            .all(|row| row[m.words - 1] >> (cols % 64) == 0));
    }

    #[test]
    fn p_zero_keeps_everything_and_the_thread_count_does_not_matter() {
        let m = DropoutMask::sample(40, 70, 0.0, 1).unwrap();
        assert!(m.to_vec().iter().all(|&v| v == 1.0));
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let a = one.install(|| DropoutMask::sample(50, 90, 0.3, 5).unwrap());
        let three = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let b = three.install(|| DropoutMask::sample(50, 90, 0.3, 5).unwrap());
        assert_eq!(a, b);
    }

    #[test]
    fn apply_multiplies_by_the_dense_mask_bit_for_bit() {
        for (rows, cols) in [(3, 5), (17, 64), (33, 130), (1, 1)] {
            let m = DropoutMask::sample(rows, cols, 0.25, 11).unwrap();
            let x: Vec<f32> = (0..rows * cols)
                .map(|i| (i as f32 * 0.37).sin() - 0.2)
                .collect();
            let mut out = vec![f32::NAN; x.len()];
            m.apply(&x, &mut out).unwrap();
            let want: Vec<f32> = x.iter().zip(m.to_vec()).map(|(a, b)| a * b).collect();
            assert_eq!(
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(DropoutMask::sample(2, 2, 1.0, 0).is_err());
        assert!(DropoutMask::sample(2, 2, -0.1, 0).is_err());
        assert!(DropoutMask::sample(2, 2, f32::NAN, 0).is_err());
        assert!(DropoutMask::sample(usize::MAX, 128, 0.1, 0).is_err());
        let m = DropoutMask::sample(2, 3, 0.5, 0).unwrap();
        assert!(m.apply(&[0.0; 5], &mut [0.0; 6]).is_err());
    }
}
