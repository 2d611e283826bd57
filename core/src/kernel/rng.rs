//! The per-query random streams of the pass.

use rand_core::RngCore;

/// One query's random stream: SplitMix64, seeded from the caller's
/// generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneRng(u64);

impl LaneRng {
    /// A stream starting from `seed`.
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }
}

impl RngCore for LaneRng {
    #[inline]
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    #[inline]
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        rand_core::impls::fill_bytes_via_next(self, dst)
    }
}
