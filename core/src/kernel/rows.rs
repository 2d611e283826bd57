//! Cached embeddings as the pass reads them: `f32`, int8 with a per-row
//! scale, and bf16 (the conversions are in [`crate::storage`]).

// Decoding loops index several arrays by the component: the form that
// vectorises.
#![allow(clippy::needless_range_loop)]

use crate::storage::{bf16_to_f32, dequantize_i8};

/// Slots per block: the unit in which the pass reads rows (hence defined
/// here, below the pass) and the granularity of the log-sum-exp's running
/// maximum.
/// It is a fixed constant, so the arithmetic (and so every result) is the
/// same whatever register tiling the target uses.
pub const BLOCK: usize = 16;

/// Cached embeddings as the pass reads them: blocks of [`BLOCK`] rows as
/// `f32`, decoded if the storage is quantized.
pub trait Rows<const DIM: usize> {
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
        *out = dequantize_i8(&self.rows[j], self.scales[j]);
    }
}

/// bf16 rows: the upper 16 bits of each `f32` (2x smaller).
#[derive(Debug, Clone, Copy)]
pub struct Bf16Rows<'a, const DIM: usize>(pub &'a [[u16; DIM]]);

impl<const DIM: usize> Rows<DIM> for Bf16Rows<'_, DIM> {
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
