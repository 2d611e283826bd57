//! Per-step metrics of a training run, as CSV or JSON Lines.
//!
//! A [`MetricsLog`] writes one row per call: the step, the wall-clock seconds
//! since the log was created, and any subset of the metric columns fixed at
//! creation. The format follows the file's extension:
//!
//! * `.csv`: a header `step,wall_s,<columns…>`, then one line per row in that
//!   column order; a metric missing from a row is an empty field.
//! * `.jsonl`: one object per line, keys in the same order as the CSV header;
//!   a missing metric is an omitted key.
//!
//! Numbers are written in Rust's shortest round-trip form, so
//! [`read_series`] gives back exactly the `f64`s that were logged. NaN and
//! infinities (a diverging loss, say) are kept: as `NaN`, `inf` and `-inf` in
//! CSV, and as the strings `"NaN"`, `"inf"` and `"-inf"` in JSON, which has
//! no literal for them.
//!
//! Each row reaches the operating system in a single write as soon as it is
//! logged, so a run that is killed (or panics) keeps every row logged before
//! it; [`MetricsLog::close`] additionally syncs the file to disk, which
//! guards against power loss too. Should a kill ever land inside a row's
//! write, [`read_series`] drops the torn final line rather than failing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// Name of the step column (first in every file).
pub const STEP_COLUMN: &str = "step";
/// Name of the wall-clock column (second in every file): seconds since the
/// log was created.
pub const WALL_COLUMN: &str = "wall_s";

/// The two file formats, chosen by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Comma-separated values with a header line (`.csv`).
    Csv,
    /// One JSON object per line (`.jsonl`).
    Jsonl,
}

impl LogFormat {
    /// The format for `path`'s extension (`.csv` or `.jsonl`, in any case).
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext.eq_ignore_ascii_case("csv") {
            Ok(Self::Csv)
        } else if ext.eq_ignore_ascii_case("jsonl") {
            Ok(Self::Jsonl)
        } else {
            bail!("{}: metrics logs must end in .csv or .jsonl", path.display())
        }
    }
}

/// One logged row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Training step.
    pub step: u64,
    /// Wall-clock seconds since the log was created.
    pub wall_s: f64,
    /// The metrics present in this row, by column name.
    pub values: BTreeMap<String, f64>,
}

impl Row {
    /// The value of `column`, if this row has one.
    pub fn get(&self, column: &str) -> Option<f64> {
        self.values.get(column).copied()
    }
}

/// `(step, value)` for every row that has `column`: ready for
/// [`Series`](super::Series).
pub fn column_points(rows: &[Row], column: &str) -> Vec<(f64, f64)> {
    // Steps beyond 2^53 lose precision as f64; no run gets near that.
    rows.iter().filter_map(|r| r.get(column).map(|v| (r.step as f64, v))).collect()
}

/// Writes metric rows to a CSV or JSONL file; see the module docs.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    format: LogFormat,
    columns: Vec<String>,
    file: File,
    started: Instant,
    /// Reused for every row, so that logging does not allocate once warm.
    line: String,
    /// One slot per column, reused likewise.
    slots: Vec<Option<f64>>,
}

impl MetricsLog {
    /// Like [`Self::create`], but first copies back the rows of an existing
    /// log at `path` whose step is at most `keep_up_to` (`None`: start
    /// afresh). A resumed run keeps what it logged before its checkpoint.
    /// See [`Self::reopen_keeping`].
    pub fn reopen(path: &Path, columns: &[&str], keep_up_to: Option<u64>) -> Result<Self> {
        match keep_up_to {
            Some(step) => Self::reopen_keeping(path, columns, &|r: &Row| r.step <= step),
            None => Self::create(path, columns),
        }
    }

    /// Continues the log at `path` with the rows of it that `keep` accepts.
    ///
    /// The kept rows are written to a temporary file beside `path`, synced,
    /// and renamed over it; later rows are appended. A process killed at any
    /// point leaves either the old log or the new one, never a truncated
    /// one. A log that exists but cannot be read is an error naming it (a
    /// torn last line is not: it is dropped), so rows are never dropped
    /// without a word; a missing log starts afresh.
    pub fn reopen_keeping(path: &Path, columns: &[&str], keep: &dyn Fn(&Row) -> bool) -> Result<Self> {
        let format = LogFormat::from_path(path)?;
        let earlier: Vec<Row> = if path.exists() {
            read_series(path)
                .with_context(|| format!("{}: cannot continue this metrics log; repair or remove it", path.display()))?
                .into_iter()
                .filter(|r| keep(r))
                .collect()
        } else {
            Vec::new()
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
        let mut builder = tempfile::Builder::new();
        builder.prefix(crate::checkpoint::TEMP_PREFIX);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            builder.permissions(fs::Permissions::from_mode(0o666));
        }
        let tmp = builder
            .tempfile_in(dir)
            .with_context(|| format!("{}: cannot create a temporary file beside it", path.display()))?;
        // A second handle on the same open file: it stays valid, and at
        // the file's end, after the rename.
        let file = tmp.as_file().try_clone().with_context(|| format!("writing metrics log {}", path.display()))?;
        let mut log = Self::with_file(path, format, columns, file)?;
        for r in &earlier {
            let values: Vec<(&str, f64)> = columns.iter().filter_map(|c| r.get(c).map(|v| (*c, v))).collect();
            log.log_at(r.step, r.wall_s, &values)?;
        }
        log.file.sync_all().with_context(|| format!("syncing metrics log {}", path.display()))?;
        tmp.persist(path)
            .map_err(|e| e.error)
            .with_context(|| format!("{}: cannot rename the rewritten log into place", path.display()))?;
        Ok(log)
    }

    /// Creates (or truncates) the log at `path`, creating missing parent
    /// directories, with the metric `columns` every row may fill, in the
    /// order they will be written. The wall clock starts now.
    ///
    /// Column names must be non-empty, distinct, not [`STEP_COLUMN`] or
    /// [`WALL_COLUMN`], and free of commas, double quotes and control
    /// characters (so that CSV needs no quoting).
    pub fn create(path: &Path, columns: &[&str]) -> Result<Self> {
        let format = LogFormat::from_path(path)?;
        for (i, &name) in columns.iter().enumerate() {
            check_column_name(name)?;
            ensure!(!columns[..i].contains(&name), "metric column {name:?} is listed twice");
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
        }
        let file = File::create(path).with_context(|| format!("creating metrics log {}", path.display()))?;
        Self::with_file(path, format, columns, file)
    }

    /// A log writing to `file` (empty, at its start): checks the column
    /// names and writes the CSV header.
    fn with_file(path: &Path, format: LogFormat, columns: &[&str], file: File) -> Result<Self> {
        for (i, &name) in columns.iter().enumerate() {
            check_column_name(name)?;
            ensure!(!columns[..i].contains(&name), "metric column {name:?} is listed twice");
        }
        let mut log = Self {
            path: path.to_owned(),
            format,
            columns: columns.iter().map(|&c| c.to_owned()).collect(),
            file,
            started: Instant::now(),
            line: String::new(),
            slots: vec![None; columns.len()],
        };
        if format == LogFormat::Csv {
            log.line =
                [STEP_COLUMN, WALL_COLUMN].into_iter().chain(columns.iter().copied()).collect::<Vec<_>>().join(",");
            log.line.push('\n');
            log.write_line()?;
        }
        Ok(log)
    }

    /// Logs `values` (pairs of column name and value) at `step`, stamped with
    /// the seconds elapsed since [`create`](Self::create).
    pub fn log(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let wall_s = self.elapsed_s();
        self.log_at(step, wall_s, values)
    }

    /// Like [`log`](Self::log) with an explicit wall-clock time, for callers
    /// that keep their own clock (a resumed run, say).
    ///
    /// Every name must be one of the columns given at creation, at most once;
    /// otherwise nothing is written and an error is returned.
    pub fn log_at(&mut self, step: u64, wall_s: f64, values: &[(&str, f64)]) -> Result<()> {
        self.slots.fill(None);
        for &(name, value) in values {
            let Some(i) = self.columns.iter().position(|c| c == name) else {
                bail!("{}: unknown metric {name:?} (columns: {})", self.path.display(), self.columns.join(", "))
            };
            ensure!(self.slots[i].is_none(), "{}: metric {name:?} given twice in one row", self.path.display());
            self.slots[i] = Some(value);
        }

        self.line.clear();
        let line = &mut self.line;
        // Writing into a String cannot fail, so the fmt::Results are ignored.
        match self.format {
            LogFormat::Csv => {
                let _ = write!(line, "{step},");
                push_number(line, wall_s, false);
                for slot in &self.slots {
                    line.push(',');
                    if let Some(v) = *slot {
                        push_number(line, v, false);
                    }
                }
            }
            LogFormat::Jsonl => {
                let _ = write!(line, "{{\"{STEP_COLUMN}\":{step},\"{WALL_COLUMN}\":");
                push_number(line, wall_s, true);
                for (name, slot) in self.columns.iter().zip(&self.slots) {
                    if let Some(v) = *slot {
                        // Names were checked to need no JSON escaping either.
                        let _ = write!(line, ",\"{name}\":");
                        push_number(line, v, true);
                    }
                }
                line.push('}');
            }
        }
        line.push('\n');
        self.write_line()
    }

    /// Seconds since the log was created.
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The metric columns, in file order.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's format.
    pub fn format(&self) -> LogFormat {
        self.format
    }

    /// Syncs the file to disk and closes it. Dropping the log without this
    /// loses nothing on a process exit (rows are already with the OS), only
    /// the guarantee against a machine crash.
    pub fn close(self) -> Result<()> {
        self.file.sync_all().with_context(|| format!("syncing metrics log {}", self.path.display()))
    }

    /// Writes the assembled line in one call: no user-space buffer can hold
    /// rows back from a killed process, and a row is never split across
    /// writes.
    fn write_line(&mut self) -> Result<()> {
        self.file
            .write_all(self.line.as_bytes())
            .with_context(|| format!("writing metrics log {}", self.path.display()))
    }
}

fn check_column_name(name: &str) -> Result<()> {
    ensure!(!name.is_empty(), "metric column names must not be empty");
    ensure!(
        name != STEP_COLUMN && name != WALL_COLUMN,
        "metric column {name:?} is reserved for the step and wall-clock columns"
    );
    ensure!(
        !name.chars().any(|c| c == ',' || c == '"' || c == '\\' || c.is_control()),
        "metric column {name:?} must not contain commas, quotes, backslashes or control characters"
    );
    Ok(())
}

/// Appends `x` in shortest round-trip form (`{:?}` rather than `{}`, which
/// would spell 1e-300 with 300 zeros). JSON has no literal for non-finite
/// numbers, so there they become strings.
fn push_number(line: &mut String, x: f64, json: bool) {
    if x.is_finite() || !json {
        let _ = write!(line, "{x:?}");
    } else {
        let _ = write!(line, "\"{x:?}\"");
    }
}

/// Reads a log written by [`MetricsLog`] (the format chosen by extension, as
/// there). Rows come back in file order.
///
/// A final line without its newline that does not parse is taken to be a
/// row torn by a killed writer and skipped; any other malformed line is an
/// error naming the line.
pub fn read_series(path: &Path) -> Result<Vec<Row>> {
    let format = LogFormat::from_path(path)?;
    let text = fs::read_to_string(path).with_context(|| format!("reading metrics log {}", path.display()))?;

    let mut rows = Vec::new();
    let mut header: Option<Vec<String>> = None;
    let mut lines = text.split_inclusive('\n').enumerate().peekable();
    while let Some((i, raw)) = lines.next() {
        let torn_candidate = lines.peek().is_none() && !raw.ends_with('\n');
        let line = raw.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        let parsed = match (format, &header) {
            (LogFormat::Csv, None) => {
                header = Some(parse_csv_header(line).with_context(|| format!("{}: line {}", path.display(), i + 1))?);
                continue;
            }
            (LogFormat::Csv, Some(names)) => parse_csv_row(names, line),
            (LogFormat::Jsonl, _) => parse_json_row(line),
        };
        match parsed {
            Ok(row) => rows.push(row),
            Err(_) if torn_candidate => break,
            Err(e) => return Err(e.context(format!("{}: line {}", path.display(), i + 1))),
        }
    }
    if format == LogFormat::Csv && header.is_none() && !text.is_empty() {
        bail!("{}: no CSV header line", path.display());
    }
    Ok(rows)
}

fn parse_csv_header(line: &str) -> Result<Vec<String>> {
    let names: Vec<String> = line.split(',').map(|s| s.trim().to_owned()).collect();
    for required in [STEP_COLUMN, WALL_COLUMN] {
        ensure!(names.iter().any(|n| n == required), "CSV header {line:?} lacks a {required:?} column");
    }
    Ok(names)
}

fn parse_csv_row(names: &[String], line: &str) -> Result<Row> {
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    ensure!(fields.len() == names.len(), "{} fields where the header has {}", fields.len(), names.len());
    let mut row = Row { step: 0, wall_s: f64::NAN, values: BTreeMap::new() };
    for (name, field) in names.iter().zip(fields) {
        if name == STEP_COLUMN {
            row.step = field.parse().with_context(|| format!("step {field:?} is not a whole number"))?;
        } else if name == WALL_COLUMN {
            row.wall_s = parse_f64(field)?;
        } else if !field.is_empty() {
            row.values.insert(name.clone(), parse_f64(field)?);
        }
    }
    Ok(row)
}

fn parse_json_row(line: &str) -> Result<Row> {
    let Value::Object(object) = serde_json::from_str::<Value>(line)? else { bail!("not a JSON object") };
    let mut row = Row { step: 0, wall_s: f64::NAN, values: BTreeMap::new() };
    let mut seen_step = false;
    let mut seen_wall = false;
    for (name, value) in object {
        if name == STEP_COLUMN {
            row.step = value.as_u64().with_context(|| format!("step {value} is not a whole number"))?;
            seen_step = true;
        } else if name == WALL_COLUMN {
            row.wall_s = json_f64(&value).with_context(|| format!("{WALL_COLUMN} {value} is not a number"))?;
            seen_wall = true;
        } else {
            let x = json_f64(&value).with_context(|| format!("metric {name:?}: {value} is not a number"))?;
            row.values.insert(name, x);
        }
    }
    ensure!(seen_step && seen_wall, "row lacks {STEP_COLUMN:?} or {WALL_COLUMN:?}");
    Ok(row)
}

/// A JSON value as written by [`push_number`]. `null` also reads as NaN,
/// since that is how other writers (pandas, serde_json) spell it.
fn json_f64(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => parse_f64(s).ok().filter(|x| !x.is_finite()),
        Value::Null => Some(f64::NAN),
        _ => None,
    }
}

fn parse_f64(field: &str) -> Result<f64> {
    field.parse().with_context(|| format!("{field:?} is not a number"))
}
