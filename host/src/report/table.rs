//! Summary tables that read well both as plain text and as rendered
//! Markdown.

/// A Markdown (GitHub-flavoured) table with every column padded to its
/// widest cell, so that the pipes line up in plain text too.
///
/// Columns whose non-empty cells all parse as numbers are right-aligned
/// (and marked `---:`), so that digits line up; the rest are left-aligned.
/// Rows shorter than `headers` are padded with empty cells; cells beyond
/// the headers get columns with empty headers rather than being dropped.
/// `|` in a cell is escaped and line breaks become spaces, since either
/// would otherwise break the row. The result ends with a newline.
pub fn markdown_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let n_cols = rows.iter().map(Vec::len).chain([headers.len()]).max().unwrap_or(0);
    if n_cols == 0 {
        return String::new();
    }
    let cell = |s: &str| s.replace(['\n', '\r'], " ").replace('|', "\\|");
    let header: Vec<String> = (0..n_cols).map(|c| cell(headers.get(c).copied().unwrap_or(""))).collect();
    let body: Vec<Vec<String>> =
        rows.iter().map(|r| (0..n_cols).map(|c| r.get(c).map_or_else(String::new, |s| cell(s))).collect()).collect();

    // Character counts rather than bytes, so that names like "α" do not
    // push their column out of line.
    let width = |s: &str| s.chars().count();
    // Three dashes is the shortest delimiter every Markdown dialect accepts.
    let widths: Vec<usize> = (0..n_cols)
        .map(|c| body.iter().map(|r| width(&r[c])).chain([width(&header[c]), 3]).max().unwrap_or(3))
        .collect();
    let numeric: Vec<bool> = (0..n_cols)
        .map(|c| {
            let mut cells = body.iter().map(|r| r[c].trim()).filter(|s| !s.is_empty()).peekable();
            cells.peek().is_some() && cells.all(|s| s.parse::<f64>().is_ok())
        })
        .collect();

    let mut out = String::new();
    let mut push_row = |cells: &[String]| {
        out.push('|');
        for (c, text) in cells.iter().enumerate() {
            let pad = " ".repeat(widths[c] - width(text));
            out.push(' ');
            if numeric[c] {
                out.push_str(&pad);
                out.push_str(text);
            } else {
                out.push_str(text);
                out.push_str(&pad);
            }
            out.push_str(" |");
        }
        out.push('\n');
    };
    push_row(&header);
    let delimiter: Vec<String> = (0..n_cols)
        .map(|c| if numeric[c] { format!("{}:", "-".repeat(widths[c] - 1)) } else { "-".repeat(widths[c]) })
        .collect();
    push_row(&delimiter);
    for row in &body {
        push_row(row);
    }
    out
}

/// A metric with four decimals (`0.4213`), enough to tell apart Recall@10
/// values on a few thousand queries. Negative zero prints as `0.0000`, and
/// NaN and infinities as `NaN`, `inf` and `-inf`.
pub fn fmt_metric(x: f64) -> String {
    // Adding 0.0 turns -0.0 into 0.0; a tiny negative value rounding to zero
    // still prints "-0.0000", which keeps its sign visible deliberately.
    format!("{:.4}", x + 0.0)
}
