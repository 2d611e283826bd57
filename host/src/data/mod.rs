//! Retrieval datasets in BEIR's layout, and converters that write it.
//!
//! A dataset directory holds `corpus.jsonl`, `queries.jsonl` and
//! `qrels/{train,dev,test}.tsv`, each optionally gzip-compressed (`.gz`).

use std::collections::HashMap;

/// One corpus document (an item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// The document's `_id`.
    pub id: String,
    /// Its `title` (empty when absent).
    pub title: String,
    /// Its `text`.
    pub text: String,
}

/// One query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The query's `_id`.
    pub id: String,
    /// Its `text`.
    pub text: String,
}

/// One relevance judgement, with ids resolved to indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qrel {
    /// Index into [`Dataset::queries`].
    pub query: u32,
    /// Index into [`Dataset::corpus`].
    pub doc: u32,
    /// The judgement's score (relevance grade; > 0 is relevant).
    pub score: i32,
}

/// A loaded dataset: documents and queries in file order, ids resolved.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// The corpus, in file order.
    pub corpus: Vec<Doc>,
    /// The queries, in file order.
    pub queries: Vec<Query>,
    /// `_id` to index into `corpus`.
    pub doc_index: HashMap<String, u32>,
    /// `_id` to index into `queries`.
    pub query_index: HashMap<String, u32>,
    /// Judgements per split name (`train`, `dev`, `test`), in file order.
    pub qrels: HashMap<String, Vec<Qrel>>,
}

pub mod beir;
pub mod check;
pub mod dedup;
pub mod wordnet;

pub use beir::DataError;
pub use wordnet::{ConvertStats, Task, WordNetError};
