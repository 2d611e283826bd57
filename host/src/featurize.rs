//! Dataset text to the fixed-length token lists the towers read, with the
//! core's tokenizer, so the host and a device featurise identically.

use negcache::layers::PAD;
use negcache::tokenizer::{id_token, tokenize, TokenizerConfig};

use crate::data::Dataset;

/// Tokens per query: WordNet hypernym queries are words plus a gloss.
pub const QUERY_TOKENS: usize = 32;
/// Tokens per item: a synset's words and part of speech, plus room for an
/// item-id token.
pub const ITEM_TOKENS: usize = 12;

/// A query's tokens.
pub type QueryTokens = [u32; QUERY_TOKENS];
/// An item's tokens.
pub type ItemTokens = [u32; ITEM_TOKENS];

/// Every query and corpus item of a dataset as token lists.
#[derive(Debug, Clone)]
pub struct Features {
    /// One per query, in dataset order.
    pub queries: Vec<QueryTokens>,
    /// One per corpus document, in dataset order.
    pub items: Vec<ItemTokens>,
}

/// Tokenises `ds`. With `item_id_token`, an item's last position holds a
/// token for its index, so that the item tower can memorise items; items
/// with identical text then stay distinguishable.
pub fn featurize(ds: &Dataset, cfg: &TokenizerConfig, item_id_token: bool) -> Features {
    let queries = ds
        .queries
        .iter()
        .map(|q| {
            let mut t = [PAD; QUERY_TOKENS];
            tokenize(&q.text, cfg, &mut t);
            t
        })
        .collect();
    let items = ds
        .corpus
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut t = [PAD; ITEM_TOKENS];
            let text = if d.title.is_empty() { d.text.clone() } else { format!("{} {}", d.title, d.text) };
            let room = if item_id_token { ITEM_TOKENS - 1 } else { ITEM_TOKENS };
            tokenize(&text, cfg, &mut t[..room]);
            if item_id_token {
                t[ITEM_TOKENS - 1] = id_token(i as u32);
            }
            t
        })
        .collect();
    Features { queries, items }
}
