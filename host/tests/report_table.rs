//! Summary tables line up as plain text and are valid Markdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use negcache_host::report::{fmt_metric, markdown_table};

fn cells(row: &[&str]) -> Vec<String> {
    row.iter().map(|&c| c.to_owned()).collect()
}

/// Character positions of the unescaped pipes.
fn pipe_columns(line: &str) -> Vec<usize> {
    let chars: Vec<char> = line.chars().collect();
    (0..chars.len()).filter(|&i| chars[i] == '|' && (i == 0 || chars[i - 1] != '\\')).collect()
}

#[test]
fn columns_line_up_and_numbers_are_right_aligned() {
    let rows = vec![
        cells(&["negative cache", &fmt_metric(0.41234), &fmt_metric(0.3)]),
        cells(&["BM25", &fmt_metric(0.3251), &fmt_metric(0.28)]),
        cells(&["popularity", &fmt_metric(0.1123), &fmt_metric(0.05)]),
    ];
    let table = markdown_table(&["method", "Recall@10", "MRR@10"], &rows);
    let expected = "\
| method         | Recall@10 | MRR@10 |
| -------------- | --------: | -----: |
| negative cache |    0.4123 | 0.3000 |
| BM25           |    0.3251 | 0.2800 |
| popularity     |    0.1123 | 0.0500 |
";
    assert_eq!(table, expected);
}

#[test]
fn every_line_has_its_pipes_in_the_same_places() {
    let rows = vec![
        cells(&["α=0.1", "x", "12"]),
        cells(&["a | b", "two\nlines", "-3.5"]),
        cells(&["", "", ""]),
        cells(&["short"]),
        cells(&["extra", "cells", "1", "beyond the headers"]),
    ];
    let table = markdown_table(&["name", "note", "n"], &rows);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2 + rows.len());
    let pipes = pipe_columns(lines[0]);
    assert_eq!(pipes.len(), 5, "a fourth column for the extra cell:\n{table}");
    for line in &lines {
        assert_eq!(pipe_columns(line), pipes, "misaligned:\n{table}");
    }
    assert!(table.contains("a \\| b"));
    assert!(table.contains("two lines"));
    // "n" holds only numbers (and blanks): right-aligned.
    assert!(lines[1].contains("---: |"));
    assert!(lines[2].contains("|   12 |"), "{table}");
}

#[test]
fn empty_inputs() {
    assert_eq!(markdown_table(&[], &[]), "");
    assert_eq!(markdown_table(&["a"], &[]), "| a   |\n| --- |\n");
}

#[test]
fn metrics_have_four_decimals() {
    assert_eq!(fmt_metric(0.41236), "0.4124");
    assert_eq!(fmt_metric(1.0), "1.0000");
    assert_eq!(fmt_metric(-0.0), "0.0000");
    assert_eq!(fmt_metric(12.5), "12.5000");
    assert_eq!(fmt_metric(f64::NAN), "NaN");
    assert_eq!(fmt_metric(f64::INFINITY), "inf");
}
