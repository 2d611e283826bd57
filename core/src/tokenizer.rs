//! Text to a fixed-length list of hashed token ids, in the core so that the
//! host and a device featurise identically.
//!
//! Words are maximal runs of alphanumeric characters, lowercased. Each word
//! becomes one token, `fnv1a("w" + word)`; with character n-grams on, each
//! word also yields the n-grams of `"<" + word + ">"`, hashed as
//! `fnv1a("g" + ngram)`, after all the words (so that truncation to the
//! list's length drops n-grams before words). Unused positions hold
//! [`PAD`]. Ids are 32-bit FNV-1a hashes; a tower takes them modulo its
//! number of buckets.

use crate::layers::PAD;

/// Tokenizer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenizerConfig {
    /// Character n-gram length; 0 turns n-grams off (the default). At most 8.
    pub char_ngrams: u8,
}

impl TokenizerConfig {
    /// Words only.
    pub const DEFAULT: Self = Self { char_ngrams: 0 };
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// An incremental 32-bit FNV-1a hash.
#[derive(Debug, Clone, Copy)]
struct Fnv(u32);

impl Fnv {
    fn with_tag(tag: u8) -> Self {
        let mut h = Fnv(FNV_OFFSET);
        h.byte(tag);
        h
    }
    fn byte(&mut self, b: u8) {
        self.0 = (self.0 ^ b as u32).wrapping_mul(FNV_PRIME);
    }
    fn char(&mut self, c: char) {
        let mut buf = [0u8; 4];
        for &b in c.encode_utf8(&mut buf).as_bytes() {
            self.byte(b);
        }
    }
    /// The id, never [`PAD`].
    fn finish(self) -> u32 {
        if self.0 == PAD {
            PAD - 1
        } else {
            self.0
        }
    }
}

/// The token for an item's identity, for towers that memorise items.
pub fn id_token(id: u32) -> u32 {
    let mut h = Fnv::with_tag(b'i');
    for b in id.to_le_bytes() {
        h.byte(b);
    }
    h.finish()
}

/// Lowercased characters of `text`, with `None` at word breaks.
fn lowered(text: &str) -> impl Iterator<Item = Option<char>> + '_ {
    text.chars().flat_map(|c| {
        let word = c.is_alphanumeric();
        c.to_lowercase().map(move |l| word.then_some(l)).chain(core::iter::once(None).filter(move |_| !word))
    })
}

/// Writes the tokens of `text` into `out`, padding the rest with [`PAD`];
/// returns how many tokens were written (at most `out.len()`).
pub fn tokenize(text: &str, cfg: &TokenizerConfig, out: &mut [u32]) -> usize {
    out.fill(PAD);
    let mut n = 0;
    let mut push = |id: u32| {
        if n < out.len() {
            out[n] = id;
            n += 1;
        }
    };
    // Words.
    let mut word: Option<Fnv> = None;
    for c in lowered(text).chain(core::iter::once(None)) {
        match (c, &mut word) {
            (Some(c), Some(h)) => h.char(c),
            (Some(c), None) => {
                let mut h = Fnv::with_tag(b'w');
                h.char(c);
                word = Some(h);
            }
            (None, Some(h)) => {
                push(h.finish());
                word = None;
            }
            (None, None) => {}
        }
    }
    // Character n-grams of "<word>".
    let k = cfg.char_ngrams.min(8) as usize;
    if k > 0 {
        let mut window: heapless::Deque<char, 8> = heapless::Deque::new();
        let mut in_word = false;
        let emit = |w: &heapless::Deque<char, 8>, push: &mut dyn FnMut(u32)| {
            if w.len() == k {
                let mut h = Fnv::with_tag(b'g');
                w.iter().for_each(|&c| h.char(c));
                push(h.finish());
            }
        };
        for c in lowered(text).chain(core::iter::once(None)) {
            let next = match (c, in_word) {
                (Some(c), false) => {
                    window.clear();
                    in_word = true;
                    [Some('<'), Some(c)]
                }
                (Some(c), true) => [Some(c), None],
                (None, true) => {
                    in_word = false;
                    [Some('>'), None]
                }
                (None, false) => [None, None],
            };
            for ch in next.into_iter().flatten() {
                if window.len() == k {
                    window.pop_front();
                }
                // Cannot fail: the window was just trimmed below k <= 8.
                let _ = window.push_back(ch);
                emit(&window, &mut push);
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(w: &str) -> u32 {
        let mut h = Fnv::with_tag(b'w');
        w.chars().for_each(|c| h.char(c));
        h.finish()
    }

    #[test]
    fn words_are_lowercased_and_split_on_punctuation() {
        let mut out = [0u32; 6];
        let n = tokenize("Big-cat, big CAT!", &TokenizerConfig::DEFAULT, &mut out);
        assert_eq!(n, 4);
        assert_eq!(out, [word("big"), word("cat"), word("big"), word("cat"), PAD, PAD]);
        // FNV-1a of "wa": (((0x811c9dc5 ^ 0x77) * p) ^ 0x61) * p mod 2^32,
        // computed by hand from the published offset basis and prime.
        let h1 = (0x811c_9dc5u32 ^ 0x77).wrapping_mul(0x0100_0193);
        let h2 = (h1 ^ 0x61).wrapping_mul(0x0100_0193);
        tokenize("A", &TokenizerConfig::DEFAULT, &mut out);
        assert_eq!(out[0], h2);
    }

    #[test]
    fn ngrams_follow_words_and_truncation_keeps_words() {
        let cfg = TokenizerConfig { char_ngrams: 3 };
        let mut out = [0u32; 16];
        // "ox" -> words [ox]; trigrams of "<ox>": "<ox", "ox>".
        let n = tokenize("ox", &cfg, &mut out);
        assert_eq!(n, 3);
        assert_eq!(out[0], word("ox"));
        assert_ne!(out[1], out[2]);
        let mut short = [0u32; 2];
        tokenize("red fox", &cfg, &mut short);
        assert_eq!(short, [word("red"), word("fox")]);
        assert_ne!(id_token(1), id_token(2));
        let mut empty = [7u32; 3];
        assert_eq!(tokenize(" ,; ", &cfg, &mut empty), 0);
        assert_eq!(empty, [PAD; 3]);
    }

    #[test]
    fn unicode_lowercase() {
        let mut a = [0u32; 2];
        let mut b = [0u32; 2];
        tokenize("ÉCOLE", &TokenizerConfig::DEFAULT, &mut a);
        tokenize("école", &TokenizerConfig::DEFAULT, &mut b);
        assert_eq!(a, b);
    }
}
