//! The numbers the README and docs/results publish are the ones stored in
//! result files that one named command regenerates:
//!
//! * README.md's results table (between `<!-- results:default -->` and
//!   `<!-- /results -->`) against `docs/results/default/summary.json`,
//!   written by `negcache train --out docs/results/default`.
//! * Every decimal figure in docs/results/README.md, as a whole number,
//!   against the result files it draws on (the markdown tables and JSON
//!   results the commands named there write, and the fixtures' reference
//!   values).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The five metrics of a `Metrics` JSON object, as the README prints them.
fn row_of(m: &Value) -> Vec<String> {
    ["recall_at_1", "recall_at_10", "recall_at_100", "mrr_at_10", "ndcg_at_10"]
        .iter()
        .map(|k| format!("{:.4}", m[*k].as_f64().unwrap_or_else(|| panic!("no {k} in {m}"))))
        .collect()
}

/// The text between `<!-- results:NAME -->` and `<!-- /results -->`.
fn block<'a>(text: &'a str, name: &str) -> &'a str {
    let open = format!("<!-- results:{name} -->");
    let start = text.find(&open).unwrap_or_else(|| panic!("README.md has no {open} marker")) + open.len();
    let end = text[start..].find("<!-- /results -->").expect("an unclosed results block") + start;
    &text[start..end]
}

/// The table rows of a markdown block: first cell, then the other cells.
fn rows(block: &str) -> Vec<(String, Vec<String>)> {
    block
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---") && !l.starts_with("| system"))
        .map(|l| {
            let cells: Vec<String> = l.trim_matches('|').split('|').map(|c| c.trim().to_owned()).collect();
            (cells[0].clone(), cells[1..].to_vec())
        })
        .collect()
}

#[test]
fn readme_table_is_the_stored_default_run() {
    let readme = read("README.md");
    let summary: Value = serde_json::from_str(&read("docs/results/default/summary.json")).unwrap();
    let table = rows(block(&readme, "default"));
    let want = [
        ("negcache towers", row_of(&summary["summary"]["metrics"])),
        ("BM25", row_of(&summary["baselines"]["bm25"])),
        ("popularity", row_of(&summary["baselines"]["popularity"])),
    ];
    assert_eq!(table.len(), want.len(), "README table rows: {table:?}");
    for ((name, cells), (want_name, want_cells)) in table.iter().zip(&want) {
        assert!(name.starts_with(want_name), "row {name:?}, expected {want_name:?}");
        assert_eq!(cells, want_cells, "README row {name:?} differs from docs/results/default/summary.json");
    }
    // The protocol sentence and the training time quoted beside the table.
    let text = block(&readme, "default");
    let protocol = summary["protocol"].as_str().unwrap();
    assert!(text.contains(protocol), "README does not state the run's protocol {protocol:?}");
    let steps = summary["summary"]["steps"].as_f64().unwrap();
    let secs = summary["summary"]["train_seconds"].as_f64().unwrap();
    let quoted = format!("{secs:.0} s ({:.0} steps/s)", steps / secs);
    assert!(text.contains(&quoted), "README does not quote the run's training time {quoted:?}");
}

/// Every stored result file under `dir`: markdown tables, JSON results.
fn result_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            result_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "md" || e == "json")
            && !path.ends_with("docs/results/README.md")
        {
            out.push(path);
        }
    }
}

/// Every decimal figure in docs/results/README.md occurs
/// in one of the stored result files it draws on (the tables `negcache
/// compare` writes, the runs' JSON results and summaries, fixtures' reference
/// values).
#[test]
fn results_readme_quotes_stored_figures() {
    let doc = read("docs/results/README.md");
    let mut files = Vec::new();
    result_files(&root().join("docs/results"), &mut files);
    result_files(&root().join("fixtures/data/synthetic-recsys"), &mut files);
    result_files(&root().join("fixtures/eval"), &mut files);
    result_files(&root().join("fixtures/expected"), &mut files);
    let mut sources = String::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        sources.push_str(&text);
        sources.push(' ');
        // JSON holds full precision; add the printed forms of its metrics.
        if path.extension().is_some_and(|e| e == "json") {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                add_printed(&v, &mut sources);
            }
        }
    }
    // Whole numbers only: "0.35" must be a figure of a file, not the start
    // of "0.3529".
    let stored: std::collections::HashSet<&str> = decimals(&sources).collect();
    let missing: Vec<&str> = decimals(&doc).filter(|t| !stored.contains(t)).collect();
    assert!(missing.is_empty(), "docs/results/README.md quotes figures found in no result file: {missing:?}");
}

/// The decimal numbers of a text ("0.3529", "734.5"), as written.
fn decimals(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|t| t.trim_matches('.'))
        .filter(|t| t.split_once('.').is_some_and(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains('.')))
}

/// Appends every number of a JSON value printed with 3 and 4 decimals.
fn add_printed(v: &Value, out: &mut String) {
    match v {
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                out.push_str(&format!(" {x:.3} {x:.4} "));
            }
        }
        Value::Array(a) => a.iter().for_each(|x| add_printed(x, out)),
        Value::Object(o) => o.values().for_each(|x| add_printed(x, out)),
        _ => {}
    }
}
