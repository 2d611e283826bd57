//! Cached embeddings as the pass reads them: `f32`, int8 with a per-row
//! scale, bf16, and an int8 view of `f32` rows; the conversions between
//! them.

// Decoding loops index several arrays by the component: the form that
// vectorises.
#![allow(clippy::needless_range_loop)]

/// Slots per block: the unit in which the pass reads rows (hence defined
/// here, below the pass) and the granularity of the log-sum-exp's running
/// maximum.
/// It is a fixed constant, so the arithmetic (and so every result) is the
/// same whatever register tiling the target uses.
pub const BLOCK: usize = 16;

/// Cached embeddings as the pass reads them: blocks of [`BLOCK`] rows as
/// `f32`, decoded if the storage is quantized.
pub trait Rows<const DIM: usize> {
    /// Bytes one row occupies in this storage.
    const BYTES_PER_ROW: usize;
    /// The number of rows.
    fn len(&self) -> usize;
    /// Whether there are no rows.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Rows `j0 .. j0 + BLOCK` (all in range) as `f32`: borrowed from the
    /// storage, or decoded into `buf`.
    fn block<'b>(&'b self, j0: usize, buf: &'b mut [[f32; DIM]; BLOCK]) -> &'b [[f32; DIM]; BLOCK];
    /// Row `j` as `f32`.
    fn row(&self, j: usize, out: &mut [f32; DIM]);
}

/// `f32` rows, as the cache stores them.
#[derive(Debug, Clone, Copy)]
pub struct F32Rows<'a, const DIM: usize>(pub &'a [[f32; DIM]]);

impl<const DIM: usize> Rows<DIM> for F32Rows<'_, DIM> {
    const BYTES_PER_ROW: usize = 4 * DIM;
    #[inline]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn block<'b>(&'b self, j0: usize, buf: &'b mut [[f32; DIM]; BLOCK]) -> &'b [[f32; DIM]; BLOCK] {
        match <&[[f32; DIM]; BLOCK]>::try_from(&self.0[j0..j0 + BLOCK]) {
            Ok(b) => b,
            Err(_) => buf,
        }
    }
    #[inline]
    fn row(&self, j: usize, out: &mut [f32; DIM]) {
        *out = self.0[j];
    }
}

/// Int8 rows with one `f32` scale per row: component `d` of row `j` is
/// `scales[j] * rows[j][d]`. `4 * DIM / (DIM + 4)` times smaller than
/// `f32` (3.76x at `DIM` 64).
#[derive(Debug, Clone, Copy)]
pub struct I8Rows<'a, const DIM: usize> {
    /// The quantized components.
    pub rows: &'a [[i8; DIM]],
    /// One scale per row.
    pub scales: &'a [f32],
}

impl<const DIM: usize> Rows<DIM> for I8Rows<'_, DIM> {
    const BYTES_PER_ROW: usize = DIM + 4;
    #[inline]
    fn len(&self) -> usize {
        self.rows.len().min(self.scales.len())
    }
    #[inline(always)]
    fn block<'b>(&'b self, j0: usize, buf: &'b mut [[f32; DIM]; BLOCK]) -> &'b [[f32; DIM]; BLOCK] {
        for (s, out) in buf.iter_mut().enumerate() {
            self.row(j0 + s, out);
        }
        buf
    }
    #[inline(always)]
    fn row(&self, j: usize, out: &mut [f32; DIM]) {
        let (r, k) = (&self.rows[j], self.scales[j]);
        for d in 0..DIM {
            out[d] = k * r[d] as f32;
        }
    }
}

/// Quantizes a row to int8 with a per-row scale `max |x| / 127`, rounding
/// to nearest (ties to even). A zero row gets scale 0.
pub fn quantize_i8<const DIM: usize>(x: &[f32; DIM]) -> ([i8; DIM], f32) {
    // 1.5 * 2^23: adding it rounds |v| <= 2^22 to an integer.
    const MAGIC: f32 = 12_582_912.0;
    let m = x.iter().fold(0.0f32, |m, &v| if v.abs() > m { v.abs() } else { m });
    if !(m > 0.0 && m.is_finite()) {
        return ([0; DIM], 0.0);
    }
    let scale = m / 127.0;
    let inv = 127.0 / m;
    let mut q = [0i8; DIM];
    for d in 0..DIM {
        let v = (x[d] * inv + MAGIC) - MAGIC;
        q[d] = v.clamp(-127.0, 127.0) as i8;
    }
    (q, scale)
}

/// bf16 rows: the upper 16 bits of each `f32` (2x smaller).
#[derive(Debug, Clone, Copy)]
pub struct Bf16Rows<'a, const DIM: usize>(pub &'a [[u16; DIM]]);

impl<const DIM: usize> Rows<DIM> for Bf16Rows<'_, DIM> {
    const BYTES_PER_ROW: usize = 2 * DIM;
    #[inline]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn block<'b>(&'b self, j0: usize, buf: &'b mut [[f32; DIM]; BLOCK]) -> &'b [[f32; DIM]; BLOCK] {
        for (s, out) in buf.iter_mut().enumerate() {
            self.row(j0 + s, out);
        }
        buf
    }
    #[inline(always)]
    fn row(&self, j: usize, out: &mut [f32; DIM]) {
        let r = &self.0[j];
        for d in 0..DIM {
            out[d] = bf16_to_f32(r[d]);
        }
    }
}

/// `f32` to bf16, rounding to nearest (ties to even); NaN stays NaN.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// bf16 to `f32` (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `f32` rows read through int8 quantization (per-row scale, as
/// [`quantize_i8`]): the scores an int8 cache would give, from an `f32`
/// cache. The `int8-scoring` feature makes training score its cache this
/// way, to measure what an int8 cache costs in accuracy.
#[derive(Debug, Clone, Copy)]
pub struct QuantizedView<'a, const DIM: usize>(pub &'a [[f32; DIM]]);

impl<const DIM: usize> Rows<DIM> for QuantizedView<'_, DIM> {
    const BYTES_PER_ROW: usize = DIM + 4;
    #[inline]
    fn len(&self) -> usize {
        self.0.len()
    }
    #[inline]
    fn block<'b>(&'b self, j0: usize, buf: &'b mut [[f32; DIM]; BLOCK]) -> &'b [[f32; DIM]; BLOCK] {
        for (s, out) in buf.iter_mut().enumerate() {
            self.row(j0 + s, out);
        }
        buf
    }
    #[inline]
    fn row(&self, j: usize, out: &mut [f32; DIM]) {
        let (q, k) = quantize_i8(&self.0[j]);
        for d in 0..DIM {
            out[d] = k * q[d] as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_and_int8_round_trip() {
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0)), 1.0);
        assert_eq!(bf16_to_f32(f32_to_bf16(-0.5)), -0.5);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: rounds to even (1).
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        let x = [0.5f32, -0.25, 0.125, 0.0];
        let (q, k) = quantize_i8(&x);
        assert_eq!(q, [127, -64, 32, 0]);
        assert!((k - 0.5 / 127.0).abs() < 1e-9);
        assert_eq!(quantize_i8(&[0.0f32; 4]), ([0; 4], 0.0));
    }
}
