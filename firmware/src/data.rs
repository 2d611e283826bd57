//! The training data, stored in flash and decoded at compile time.
//!
//! `fixtures/firmware/wordnet-tiny.bin` (written by `src/bin/prep.rs`) is
//! a sequence of little-endian `u32` words:
//!
//! | words | content |
//! |---|---|
//! | 1 | magic `b"NCWT"` (read as a little-endian word) |
//! | 1 | format version, 1 |
//! | 1 | `n_items`: items (hypernym synsets) |
//! | 1 | `n_train`: training queries |
//! | 1 | `n_heldout`: held-out queries |
//! | 1 | `item_len`: tokens per item |
//! | 1 | `query_len`: tokens per query |
//! | 1 | the tokenizer's `char_ngrams` (0: words only) |
//! | `n_items * item_len` | each item's token ids |
//! | `(n_train + n_heldout) * (query_len + 1)` | each query's token ids, then the index of its positive item |
//!
//! Token ids are `negcache::tokenizer::tokenize` of the text with
//! `TokenizerConfig::DEFAULT`, padded with `PAD` (`u32::MAX`); storing ids
//! rather than text spares the device the tokenizer and makes the host and
//! the device read exactly the same inputs.
//!
//! The file is decoded by `const fn`s into typed `static` arrays, so a
//! malformed file fails the build, the decoded arrays sit in flash
//! (`.rodata`) and cost no RAM, and no unaligned or `unsafe` reads happen at
//! run time.

pub use crate::format::{HEADER_WORDS, MAGIC, VERSION};

/// The raw file.
pub const BYTES: &[u8] = include_bytes!("../../fixtures/firmware/wordnet-tiny.bin");

/// Word `i` of the file.
const fn word(i: usize) -> u32 {
    u32::from_le_bytes([BYTES[4 * i], BYTES[4 * i + 1], BYTES[4 * i + 2], BYTES[4 * i + 3]])
}

/// Items in the file.
pub const N_ITEMS: usize = word(2) as usize;
/// Training queries.
pub const N_TRAIN: usize = word(3) as usize;
/// Held-out queries (from the dataset's test split; never trained on).
pub const N_HELDOUT: usize = word(4) as usize;
/// Tokens per item.
pub const ITEM_LEN: usize = word(5) as usize;
/// Tokens per query.
pub const QUERY_LEN: usize = word(6) as usize;

const ITEMS_AT: usize = HEADER_WORDS;
const QUERIES_AT: usize = ITEMS_AT + N_ITEMS * ITEM_LEN;

const _: () = {
    assert!(word(0) == u32::from_le_bytes(MAGIC), "wordnet-tiny.bin: bad magic");
    assert!(word(1) == VERSION, "wordnet-tiny.bin: unsupported version");
    assert!(word(7) == 0, "wordnet-tiny.bin: made with character n-grams; the firmware expects words only");
    assert!(
        BYTES.len() == 4 * (QUERIES_AT + (N_TRAIN + N_HELDOUT) * (QUERY_LEN + 1)),
        "wordnet-tiny.bin: length does not match its header"
    );
    // Query indices are kept in u16 permutations.
    assert!(N_TRAIN <= u16::MAX as usize && N_ITEMS > 0 && N_TRAIN > 0);
};

/// An item's token ids.
pub type ItemTokens = [u32; ITEM_LEN];
/// A query's token ids.
pub type QueryTokens = [u32; QUERY_LEN];

/// A query and the index of its positive item in [`ITEMS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// Token ids.
    pub tokens: QueryTokens,
    /// Index into [`ITEMS`].
    pub positive: u32,
}

const fn decode_items() -> [ItemTokens; N_ITEMS] {
    let mut out = [[0; ITEM_LEN]; N_ITEMS];
    let mut i = 0;
    while i < N_ITEMS {
        let mut t = 0;
        while t < ITEM_LEN {
            out[i][t] = word(ITEMS_AT + i * ITEM_LEN + t);
            t += 1;
        }
        i += 1;
    }
    out
}

const fn decode_queries<const N: usize>(first: usize) -> [Query; N] {
    let mut out = [Query { tokens: [0; QUERY_LEN], positive: 0 }; N];
    let mut i = 0;
    while i < N {
        let at = QUERIES_AT + (first + i) * (QUERY_LEN + 1);
        let mut t = 0;
        while t < QUERY_LEN {
            out[i].tokens[t] = word(at + t);
            t += 1;
        }
        out[i].positive = word(at + QUERY_LEN);
        assert!((out[i].positive as usize) < N_ITEMS, "wordnet-tiny.bin: positive index out of range");
        i += 1;
    }
    out
}

/// The items (hypernym synsets), in the file's order.
pub static ITEMS: [ItemTokens; N_ITEMS] = decode_items();
/// The training queries.
pub static TRAIN: [Query; N_TRAIN] = decode_queries::<N_TRAIN>(0);
/// The held-out queries.
pub static HELDOUT: [Query; N_HELDOUT] = decode_queries::<N_HELDOUT>(N_TRAIN);
