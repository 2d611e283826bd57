//! What a cache slot can hold besides its embedding.

/// An item stored in the cache: whatever the item tower needs to embed it
/// afresh (hashed token ids, an id, dense features).
///
/// `EMPTY` fills slots that hold nothing yet; it lets the cache be built by
/// a `const fn`. Equality decides the in-cache filter and accidental-hit
/// masking, so two items compare equal exactly when they are the same item.
pub trait Item: Copy + PartialEq {
    /// The value of a slot that holds nothing.
    const EMPTY: Self;
}

macro_rules! zero_item {
    ($($t:ty),*) => {$(
        impl Item for $t {
            const EMPTY: Self = 0 as $t;
        }
    )*};
}
zero_item!(u8, u16, u32, u64, usize, i32, i64, f32);

impl<T: Item, const N: usize> Item for [T; N] {
    const EMPTY: Self = [T::EMPTY; N];
}

impl<A: Item, B: Item> Item for (A, B) {
    const EMPTY: Self = (A::EMPTY, B::EMPTY);
}
