//! The constants of the data file's format (the layout is in `data.rs`),
//! shared by the decoder (`data`) and the writer (`bin/prep.rs`).

/// The file's first four bytes.
pub const MAGIC: [u8; 4] = *b"NCWT";
/// The format version this crate reads and writes.
pub const VERSION: u32 = 1;
/// Header words before the items.
pub const HEADER_WORDS: usize = 8;
