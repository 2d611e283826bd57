//! Checks of a loaded dataset that the loader cannot make line by line:
//! documents and queries with no text at all.

use std::path::{Path, PathBuf};

use anyhow::bail;

use super::Dataset;

/// The file a dataset's `name` is read from: the plain file when it
/// exists, else the `.gz` one (as the loader chooses), for messages.
pub fn data_file(dir: &Path, name: &str) -> PathBuf {
    let plain = dir.join(name);
    if plain.exists() {
        return plain;
    }
    let mut gz = plain.clone().into_os_string();
    gz.push(".gz");
    let gz = PathBuf::from(gz);
    if gz.exists() {
        gz
    } else {
        plain
    }
}

/// The qrels file of `split`.
pub fn qrels_file(dir: &Path, split: &str) -> PathBuf {
    data_file(dir, &format!("qrels/{split}.tsv"))
}

/// Fails when every document (or every query) has an empty title and text,
/// since no model or BM25 can then tell them apart and every metric would
/// be an artefact of tie-breaking; warns when some have.
pub fn texts(ds: &Dataset, dir: &Path) -> anyhow::Result<()> {
    let blank = |s: &str| s.trim().is_empty();
    let empty_docs = ds.corpus.iter().filter(|d| blank(&d.title) && blank(&d.text)).count();
    let empty_queries = ds.queries.iter().filter(|q| blank(&q.text)).count();
    for (n, of, file, what) in [
        (empty_docs, ds.corpus.len(), "corpus.jsonl", "document"),
        (empty_queries, ds.queries.len(), "queries.jsonl", "query"),
    ] {
        let path = data_file(dir, file);
        if n > 0 && n == of {
            bail!(
                "{}: every {what} has an empty text: nothing can be learned or ranked, and every metric \
                 would only reflect how ties are broken",
                path.display()
            );
        }
        if n > 0 {
            eprintln!("warning: {}: {n} of {of} {what} texts are empty", path.display());
        }
    }
    Ok(())
}
