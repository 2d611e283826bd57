//! What a cache slot can hold besides its embedding, and how items are
//! told apart.

/// An item stored in the cache: whatever the item tower needs to embed it
/// afresh (hashed token ids, an id, dense features).
///
/// `EMPTY` fills slots that hold nothing yet; it lets the cache be built by
/// a `const fn`.
///
/// [`Item::key`] is the item's identity: the in-cache filter and
/// accidental-hit masking compare keys, one integer comparison per slot and
/// query, however large the item is. Two items are the same item exactly
/// when their keys are equal. Integers are their own keys. Arrays and pairs
/// hash their elements' keys into a 64-bit fingerprint ([`mix`]): two
/// different items share a fingerprint with probability about 2^-64 per
/// pair. An item type with an id of its own (a row of a feature table)
/// should return that id.
pub trait Item: Copy {
    /// The value of a slot that holds nothing.
    const EMPTY: Self;
    /// The item's identity (see the trait docs).
    fn key(&self) -> u64;

    /// Whether `self` and `other` are the same value, bit for bit. A cache
    /// slot that already holds an item keeps its key when the same item is
    /// written again, instead of fingerprinting it anew (a corpus of dense
    /// features written into the cache every full-softmax step). `false`
    /// (the default) only means "not known": the key is computed again.
    #[inline]
    fn same(&self, _other: &Self) -> bool {
        false
    }

    /// Each item's [`Item::key`] into `out`, up to the shorter length: the
    /// same values, computed side by side where the type can (an array's
    /// fingerprint is a chain of dependent rounds, so several arrays'
    /// chains run at once). A step keys its batch's positives with it.
    #[inline]
    fn keys(items: &[Self], out: &mut [u64]) {
        for (k, y) in out.iter_mut().zip(items) {
            *k = y.key();
        }
    }
}

/// Where [`fingerprint`] starts.
const FINGERPRINT_SEED: u64 = 0x243F_6A88_85A3_08D3;

/// Arrays keyed side by side in [`Item::keys`].
const KEY_LANES: usize = 8;

/// One round of a 64-bit fingerprint: folds `x` into the running hash
/// `h` (a multiply-rotate round, then SplitMix64's finaliser at the end of
/// [`fingerprint`]). Order matters: `[1, 2]` and `[2, 1]` differ.
#[inline]
pub const fn mix(h: u64, x: u64) -> u64 {
    (h ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29)
}

/// SplitMix64's finaliser: spreads every input bit over the output.
#[inline]
pub const fn finish(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The fingerprint of a sequence of keys (its length included).
pub fn fingerprint(keys: impl Iterator<Item = u64>) -> u64 {
    let mut h = FINGERPRINT_SEED;
    let mut n = 0u64;
    for k in keys {
        h = mix(h, k);
        n += 1;
    }
    fingerprint_end(h, n)
}

/// A fingerprint's last step: `n` keys were folded into `h`.
#[inline]
const fn fingerprint_end(h: u64, n: u64) -> u64 {
    finish(mix(h, n))
}

macro_rules! integer_item {
    ($($t:ty => $u:ty),*) => {$(
        impl Item for $t {
            const EMPTY: Self = 0;
            #[inline]
            fn key(&self) -> u64 {
                *self as $u as u64
            }
            #[inline]
            fn same(&self, other: &Self) -> bool {
                self == other
            }
        }
    )*};
}
integer_item!(u8 => u8, u16 => u16, u32 => u32, u64 => u64, usize => usize, i32 => u32, i64 => u64);

impl Item for f32 {
    const EMPTY: Self = 0.0;
    #[inline]
    fn key(&self) -> u64 {
        u64::from(self.to_bits())
    }
    #[inline]
    fn same(&self, other: &Self) -> bool {
        self.to_bits() == other.to_bits()
    }
}

impl<T: Item, const N: usize> Item for [T; N] {
    const EMPTY: Self = [T::EMPTY; N];
    fn key(&self) -> u64 {
        fingerprint(self.iter().map(Item::key))
    }
    fn same(&self, other: &Self) -> bool {
        // Every element, without an early exit, so that it vectorises.
        self.iter().zip(other).fold(true, |all, (a, b)| all & a.same(b))
    }
    /// [`KEY_LANES`] arrays' fingerprints at a time, their rounds
    /// interleaved: [`fingerprint`]'s rounds in its order for each.
    fn keys(items: &[Self], out: &mut [u64]) {
        let n = items.len().min(out.len());
        let (items, out) = (&items[..n], &mut out[..n]);
        let mut whole = items.chunks_exact(KEY_LANES);
        let mut outs = out.chunks_exact_mut(KEY_LANES);
        for (group, keys) in (&mut whole).zip(&mut outs) {
            let mut h = [FINGERPRINT_SEED; KEY_LANES];
            for i in 0..N {
                for (h, y) in h.iter_mut().zip(group) {
                    *h = mix(*h, y[i].key());
                }
            }
            for (k, h) in keys.iter_mut().zip(h) {
                *k = fingerprint_end(h, N as u64);
            }
        }
        for (k, y) in outs.into_remainder().iter_mut().zip(whole.remainder()) {
            *k = y.key();
        }
    }
}

impl<A: Item, B: Item> Item for (A, B) {
    const EMPTY: Self = (A::EMPTY, B::EMPTY);
    fn key(&self) -> u64 {
        fingerprint([self.0.key(), self.1.key()].into_iter())
    }
    fn same(&self, other: &Self) -> bool {
        self.0.same(&other.0) && self.1.same(&other.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_side_by_side_are_each_items_key() {
        fn check<T: Item + core::fmt::Debug>(items: &[T]) {
            for n in 0..=items.len() {
                let mut out = [0u64; 40];
                T::keys(&items[..n], &mut out);
                for (k, y) in out.iter().zip(&items[..n]) {
                    assert_eq!(*k, y.key(), "{y:?} of {n}");
                }
                assert!(out[n..].iter().all(|&k| k == 0), "past the items");
            }
        }
        let floats: [[f32; 5]; 19] =
            core::array::from_fn(|j| core::array::from_fn(|i| (j * 5 + i) as f32 * 0.25 - 3.0));
        check(&floats);
        let tokens: [[u32; 7]; 17] = core::array::from_fn(|j| core::array::from_fn(|i| (j * 31 + i * 7) as u32));
        check(&tokens);
        let nested: [[[u8; 3]; 2]; 9] = core::array::from_fn(|j| [[j as u8, 1, 2], [3, j as u8, 5]]);
        check(&nested);
        check(&[[0u16; 0]; 10]);
        check(&[(1u32, 2u32), (3, 4)]);
        // A shorter output takes the first keys.
        let mut two = [0u64; 2];
        <[u32; 7]>::keys(&tokens, &mut two);
        assert_eq!(two, [tokens[0].key(), tokens[1].key()]);
    }

    #[test]
    fn integers_are_their_own_keys() {
        assert_eq!(7u32.key(), 7);
        assert_eq!((-1i32).key(), u64::from(u32::MAX));
        assert_eq!(u64::MAX.key(), u64::MAX);
    }

    #[test]
    fn fingerprints_see_order_length_and_every_element() {
        let a = [1u32, 2, 3, 0];
        assert_ne!(a.key(), [2u32, 1, 3, 0].key());
        assert_ne!(a.key(), [1u32, 2, 3, 1].key());
        assert_ne!([0u32; 3].key(), [0u32; 4].key());
        assert_eq!(a.key(), [1u32, 2, 3, 0].key());
        assert_ne!((1u32, 2u32).key(), (2u32, 1u32).key());
    }

    #[test]
    fn same_is_bitwise_equality() {
        assert!([1u32, 2].same(&[1, 2]) && ![1u32, 2].same(&[1, 3]));
        assert!([0.5f32, -1.0].same(&[0.5, -1.0]));
        // Equal as numbers, not as bits; and NaN is itself.
        assert!(![0.0f32].same(&[-0.0]));
        assert!(f32::NAN.same(&f32::NAN));
        assert!((3u8, [2.0f32; 3]).same(&(3, [2.0; 3])) && !(3u8, 1.0f32).same(&(4, 1.0)));
        // An item without its own `same` is never known to be the same.
        #[derive(Clone, Copy)]
        struct Id(u32);
        impl Item for Id {
            const EMPTY: Self = Id(0);
            fn key(&self) -> u64 {
                u64::from(self.0)
            }
        }
        assert!(!Id(1).same(&Id(1)));
    }

    #[test]
    fn no_collisions_among_many_small_arrays() {
        // 40,000 arrays that differ in one or two small entries: a weak
        // hash would collide here.
        let mut keys: heapless::Vec<u64, 40000> = heapless::Vec::new();
        for a in 0..200u32 {
            for b in 0..200u32 {
                keys.push([a, b, 0, 0, 7].key()).unwrap();
            }
        }
        keys.sort_unstable();
        assert!(keys.windows(2).all(|w| w[0] != w[1]));
    }
}
