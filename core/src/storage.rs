//! How a cache stores its embeddings, chosen at run time: `f32`, bf16 or
//! int8 with a per-row scale ([`Precision`]); the borrowed views of such
//! storage ([`Stored`], [`StoredMut`]), the fixed-size owners a
//! [`crate::NegativeCache`] is generic over ([`Store`]: [`F32Store`],
//! [`Bf16Store`], [`Int8Store`]) and the conversions between precisions.
//!
//! Everything else in a step stays `f32`: embeddings are encoded when a
//! slot is written and decoded when the pass or the loss reads it. With
//! [`Precision::F32`] nothing is converted, and every result is the same
//! bits as a plain `f32` cache.

// Decoding loops index several arrays by the component: the form that
// vectorises.
#![allow(clippy::needless_range_loop)]

use crate::error::{check_len, Result};

/// The precision of a cache's stored embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Precision {
    /// `f32` rows, as computed: `4 * DIM` bytes per row.
    #[default]
    F32,
    /// bf16 rows (the upper 16 bits of each `f32`, rounded to nearest):
    /// `2 * DIM` bytes per row, a relative error of at most 2^-8 per
    /// component.
    Bf16,
    /// int8 rows with one `f32` scale per row (`max |x| / 127`): `DIM + 4`
    /// bytes per row, an error of at most half a scale step per component.
    Int8,
}

impl Precision {
    /// Bytes one stored row of `dim` components occupies, its scale
    /// included.
    pub const fn bytes_per_row(self, dim: usize) -> usize {
        match self {
            Precision::F32 => 4 * dim,
            Precision::Bf16 => 2 * dim,
            Precision::Int8 => dim + 4,
        }
    }

    /// Its name: `f32`, `bf16` or `int8`.
    pub const fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }
}

/// A cache's embeddings, borrowed for reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stored<'a, const DIM: usize> {
    /// `f32` rows.
    F32(&'a [[f32; DIM]]),
    /// bf16 rows ([`f32_to_bf16`]).
    Bf16(&'a [[u16; DIM]]),
    /// int8 rows and one scale per row ([`quantize_i8`]): component `d` of
    /// row `j` is `scales[j] * rows[j][d]`.
    Int8 {
        /// The quantized components.
        rows: &'a [[i8; DIM]],
        /// One scale per row, as many as rows.
        scales: &'a [f32],
    },
}

impl<'a, const DIM: usize> Stored<'a, DIM> {
    /// The number of rows.
    pub fn len(&self) -> usize {
        match self {
            Stored::F32(r) => r.len(),
            Stored::Bf16(r) => r.len(),
            Stored::Int8 { rows, .. } => rows.len(),
        }
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How the rows are stored.
    pub fn precision(&self) -> Precision {
        match self {
            Stored::F32(_) => Precision::F32,
            Stored::Bf16(_) => Precision::Bf16,
            Stored::Int8 { .. } => Precision::Int8,
        }
    }

    /// Row `j`, decoded to `f32`. Panics if `j` is out of range (callers
    /// index slots they have checked).
    #[inline]
    pub fn row(&self, j: usize) -> [f32; DIM] {
        match self {
            Stored::F32(r) => r[j],
            Stored::Bf16(r) => r[j].map(bf16_to_f32),
            Stored::Int8 { rows, scales } => dequantize_i8(&rows[j], scales[j]),
        }
    }

    /// Whether every stored value is finite (for int8, every scale).
    pub fn all_finite(&self) -> bool {
        match self {
            Stored::F32(r) => r.as_flattened().iter().all(|x| x.is_finite()),
            Stored::Bf16(r) => r.as_flattened().iter().all(|&h| bf16_to_f32(h).is_finite()),
            Stored::Int8 { scales, .. } => scales.iter().all(|x| x.is_finite()),
        }
    }

    /// The rows themselves if they are stored as `f32`.
    pub fn as_f32(&self) -> Option<&'a [[f32; DIM]]> {
        match self {
            Stored::F32(r) => Some(r),
            _ => None,
        }
    }

    /// Checks that an int8 storage has one scale per row.
    pub fn check(&self) -> Result<()> {
        match self {
            Stored::Int8 { rows, scales } => check_len("scales", rows.len(), scales.len()),
            _ => Ok(()),
        }
    }
}

/// A cache's embeddings, borrowed for writing: rows are encoded to the
/// storage's precision as they are written.
#[derive(Debug)]
pub enum StoredMut<'a, const DIM: usize> {
    /// `f32` rows.
    F32(&'a mut [[f32; DIM]]),
    /// bf16 rows.
    Bf16(&'a mut [[u16; DIM]]),
    /// int8 rows and one scale per row.
    Int8 {
        /// The quantized components.
        rows: &'a mut [[i8; DIM]],
        /// One scale per row, as many as rows.
        scales: &'a mut [f32],
    },
}

impl<const DIM: usize> StoredMut<'_, DIM> {
    /// The same rows, for reading.
    pub fn as_ref(&self) -> Stored<'_, DIM> {
        match self {
            StoredMut::F32(r) => Stored::F32(r),
            StoredMut::Bf16(r) => Stored::Bf16(r),
            StoredMut::Int8 { rows, scales } => Stored::Int8 { rows, scales },
        }
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.as_ref().len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes row `j`, encoded to the storage's precision. Panics if `j`
    /// is out of range (callers index slots they have checked).
    #[inline]
    pub fn set(&mut self, j: usize, x: &[f32; DIM]) {
        match self {
            StoredMut::F32(r) => r[j] = *x,
            StoredMut::Bf16(r) => r[j] = x.map(f32_to_bf16_finite),
            StoredMut::Int8 { rows, scales } => (rows[j], scales[j]) = quantize_i8(x),
        }
    }

    /// Sets every row to zero.
    pub fn clear(&mut self) {
        self.clear_past(0);
    }

    /// Sets rows `from..` to zero.
    pub fn clear_past(&mut self, from: usize) {
        match self {
            StoredMut::F32(r) => r.iter_mut().skip(from).for_each(|r| *r = [0.0; DIM]),
            StoredMut::Bf16(r) => r.iter_mut().skip(from).for_each(|r| *r = [0; DIM]),
            StoredMut::Int8 { rows, scales } => {
                rows.iter_mut().skip(from).for_each(|r| *r = [0; DIM]);
                scales.iter_mut().skip(from).for_each(|s| *s = 0.0);
            }
        }
    }

    /// Checks that an int8 storage has one scale per row.
    pub fn check(&self) -> Result<()> {
        self.as_ref().check()
    }
}

/// Fixed-size embedding storage for `CAP` rows, owned by a
/// [`crate::NegativeCache`] (and so placeable in a `static`).
pub trait Store<const CAP: usize, const DIM: usize> {
    /// All rows zero.
    const ZERO: Self;
    /// How the rows are stored.
    const PRECISION: Precision;
    /// The first `n` rows (`n <= CAP`), for reading.
    fn stored(&self, n: usize) -> Stored<'_, DIM>;
    /// The first `n` rows (`n <= CAP`), for writing.
    fn stored_mut(&mut self, n: usize) -> StoredMut<'_, DIM>;
}

/// `CAP` `f32` rows: the default storage of a [`crate::NegativeCache`].
#[derive(Debug, Clone)]
pub struct F32Store<const CAP: usize, const DIM: usize>(pub [[f32; DIM]; CAP]);

/// `CAP` bf16 rows.
#[derive(Debug, Clone)]
pub struct Bf16Store<const CAP: usize, const DIM: usize>(pub [[u16; DIM]; CAP]);

/// `CAP` int8 rows and their scales.
#[derive(Debug, Clone)]
pub struct Int8Store<const CAP: usize, const DIM: usize> {
    /// The quantized components.
    pub rows: [[i8; DIM]; CAP],
    /// One scale per row.
    pub scales: [f32; CAP],
}

impl<const CAP: usize, const DIM: usize> Store<CAP, DIM> for F32Store<CAP, DIM> {
    const ZERO: Self = Self([[0.0; DIM]; CAP]);
    const PRECISION: Precision = Precision::F32;
    fn stored(&self, n: usize) -> Stored<'_, DIM> {
        Stored::F32(&self.0[..n])
    }
    fn stored_mut(&mut self, n: usize) -> StoredMut<'_, DIM> {
        StoredMut::F32(&mut self.0[..n])
    }
}

impl<const CAP: usize, const DIM: usize> Store<CAP, DIM> for Bf16Store<CAP, DIM> {
    const ZERO: Self = Self([[0; DIM]; CAP]);
    const PRECISION: Precision = Precision::Bf16;
    fn stored(&self, n: usize) -> Stored<'_, DIM> {
        Stored::Bf16(&self.0[..n])
    }
    fn stored_mut(&mut self, n: usize) -> StoredMut<'_, DIM> {
        StoredMut::Bf16(&mut self.0[..n])
    }
}

impl<const CAP: usize, const DIM: usize> Store<CAP, DIM> for Int8Store<CAP, DIM> {
    const ZERO: Self = Self { rows: [[0; DIM]; CAP], scales: [0.0; CAP] };
    const PRECISION: Precision = Precision::Int8;
    fn stored(&self, n: usize) -> Stored<'_, DIM> {
        Stored::Int8 { rows: &self.rows[..n], scales: &self.scales[..n] }
    }
    fn stored_mut(&mut self, n: usize) -> StoredMut<'_, DIM> {
        StoredMut::Int8 { rows: &mut self.rows[..n], scales: &mut self.scales[..n] }
    }
}

/// Quantizes a row to int8 with a per-row scale `max |x| / 127`, rounding
/// to nearest (ties to even). A zero or non-finite row gets scale 0 and
/// zero components.
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

/// An int8 row and its scale back to `f32`: `scale * q[d]`.
#[inline(always)]
pub fn dequantize_i8<const DIM: usize>(q: &[i8; DIM], scale: f32) -> [f32; DIM] {
    let mut out = [0.0; DIM];
    for d in 0..DIM {
        out[d] = scale * q[d] as f32;
    }
    out
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

/// [`f32_to_bf16`], except that a finite value beyond bf16's largest
/// finite magnitude (about 3.39e38) becomes that magnitude, not infinity:
/// what a cache stores from a finite embedding stays finite.
#[inline]
pub fn f32_to_bf16_finite(x: f32) -> u16 {
    let h = f32_to_bf16(x);
    if x.is_finite() && !bf16_to_f32(h).is_finite() {
        h - 1 // one step below infinity, same sign
    } else {
        h
    }
}

/// bf16 to `f32` (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
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
        // The largest finite f32 rounds to bf16 infinity; a cache stores
        // bf16's largest finite value instead.
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::MAX)), f32::INFINITY);
        assert_eq!(bf16_to_f32(f32_to_bf16_finite(f32::MAX)), f32::from_bits(0x7F7F_0000));
        assert_eq!(bf16_to_f32(f32_to_bf16_finite(-f32::MAX)), -f32::from_bits(0x7F7F_0000));
        assert_eq!(f32_to_bf16_finite(1.5), f32_to_bf16(1.5));
        let x = [0.5f32, -0.25, 0.125, 0.0];
        let (q, k) = quantize_i8(&x);
        assert_eq!(q, [127, -64, 32, 0]);
        assert!((k - 0.5 / 127.0).abs() < 1e-9);
        assert_eq!(quantize_i8(&[0.0f32; 4]), ([0; 4], 0.0));
        assert_eq!(dequantize_i8(&q, k), [0.5, -64.0 * k, 32.0 * k, 0.0]);
    }

    /// Each precision decodes what it stored within its stated error:
    /// exactly for f32, 2^-8 relative per component for bf16, half a
    /// scale step (`max |x| / 254`) for int8.
    #[test]
    fn stored_rows_decode_within_their_precision() {
        let x = [0.3f32, -0.71, 0.0, 0.052, 1.0e-3, -0.6];
        let m = 0.71f32;
        let mut f = [[0.0f32; 6]; 2];
        let mut h = [[0u16; 6]; 2];
        let (mut q, mut s) = ([[0i8; 6]; 2], [0.0f32; 2]);
        let stores =
            [StoredMut::F32(&mut f), StoredMut::Bf16(&mut h), StoredMut::Int8 { rows: &mut q, scales: &mut s }];
        for mut st in stores {
            st.set(1, &x);
            let got = st.as_ref().row(1);
            assert_eq!(st.as_ref().row(0), [0.0; 6]);
            for d in 0..6 {
                let err = (got[d] - x[d]).abs();
                let bound = match st.as_ref().precision() {
                    Precision::F32 => 0.0,
                    Precision::Bf16 => x[d].abs() / 256.0,
                    Precision::Int8 => m / 254.0 * 1.0001,
                };
                assert!(err <= bound, "{:?} component {d}: {} vs {}", st.as_ref().precision(), got[d], x[d]);
            }
            st.clear();
            assert_eq!(st.as_ref().row(1), [0.0; 6]);
        }
        assert_eq!(Precision::Int8.bytes_per_row(64), 68);
        assert_eq!(Precision::Bf16.bytes_per_row(64), 128);
        assert_eq!(Precision::F32.bytes_per_row(64), 256);
    }
}
