//! Reading and writing datasets in BEIR's on-disk layout.
//!
//! A dataset directory holds `corpus.jsonl`, `queries.jsonl` and
//! `qrels/<split>.tsv`. Each file may be plain or gzip-compressed; the
//! compressed variant carries a `.gz` suffix (`corpus.jsonl.gz`).
//!
//! The reader is meant to accept any BEIR dataset as downloaded, so it is
//! lenient where real files differ (extra JSON fields, numeric ids, `null`
//! titles, a missing qrels header, CRLF line ends, blank lines) and strict
//! where a difference would silently change the data (duplicate ids, qrels
//! naming unknown ids, non-integer scores). Every rejection names the file
//! and the 1-based line so the user can go and look.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use super::{Dataset, Doc, Qrel, Query};

/// Longest line the reader accepts, in bytes (terminator excluded).
///
/// Real BEIR records are at most a few hundred kilobytes; a line far longer
/// than that is almost certainly a file that is not JSONL at all (e.g. a
/// binary blob or a JSON array on one line), and reading it whole could
/// exhaust memory. The reader therefore stops at this bound instead of
/// growing its buffer without limit.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// Read buffer size: large enough that per-call overhead vanishes on
/// multi-gigabyte corpora, small enough not to matter for tiny ones.
const READ_BUFFER: usize = 256 * 1024;

/// The two id spaces a qrel refers to, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// An id from `queries.jsonl`.
    Query,
    /// An id from `corpus.jsonl`.
    Corpus,
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdKind::Query => "query",
            IdKind::Corpus => "corpus",
        })
    }
}

/// Why a dataset could not be read or written.
///
/// Paths are the actual files involved (with `.gz` when the compressed one
/// was read) and line numbers are 1-based, counting every line including
/// headers and blank lines, so they match what an editor shows.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The dataset directory does not exist.
    #[error("dataset directory {} does not exist", path.display())]
    MissingDir {
        /// The directory asked for.
        path: PathBuf,
    },
    /// The dataset path exists but is not a directory.
    #[error("dataset path {} is not a directory", path.display())]
    NotADirectory {
        /// The path asked for.
        path: PathBuf,
    },
    /// Neither the plain nor the gzip variant of a file exists.
    #[error("missing file: neither {} nor {}.gz exists", path.display(), path.display())]
    MissingFile {
        /// The plain (uncompressed) path.
        path: PathBuf,
    },
    /// A dataset file's path names a directory, a FIFO, a device or
    /// anything else that is not a regular file.
    #[error("{}: not a regular file (it is {kind}); a dataset file must be a plain or gzip file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is instead ("a directory", "a FIFO", ...).
        kind: &'static str,
    },
    /// A record's `_id` cannot be used: empty, containing a tab or a line
    /// break (which the TSV qrels and TREC run files cannot hold), or a
    /// number too large to be read exactly.
    #[error("{}: line {line}: unusable _id {id:?}: {reason}", path.display())]
    BadId {
        /// The file.
        path: PathBuf,
        /// The offending line.
        line: u64,
        /// The id as read.
        id: String,
        /// Why it cannot be used.
        reason: &'static str,
    },
    /// A file exists but could not be opened.
    #[error("cannot open {}: {cause}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        /// (Not an error `source`: its text is already in the message,
        /// and would otherwise be printed twice.)
        cause: io::Error,
    },
    /// Reading failed part-way, e.g. a corrupt or truncated gzip stream.
    #[error("{}: read failed while reading line {line}: {cause}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The line being read when the failure surfaced. Reads are
        /// buffered (and gzip decodes ahead), so the damage may lie in a
        /// later part of the file.
        line: u64,
        /// The underlying error.
        /// (Not an error `source`: its text is already in the message,
        /// and would otherwise be printed twice.)
        cause: io::Error,
    },
    /// A line exceeds [`MAX_LINE_BYTES`].
    #[error("{}: line {line} is longer than 16 MiB", path.display())]
    LineTooLong {
        /// The file.
        path: PathBuf,
        /// The offending line.
        line: u64,
    },
    /// A line is not valid UTF-8.
    #[error("{}: line {line}: invalid UTF-8 at byte {byte} of the line", path.display())]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// The offending line.
        line: u64,
        /// 1-based byte position within the line of the first bad byte.
        byte: usize,
    },
    /// A JSONL line is not syntactically valid JSON.
    #[error("{}: line {line}: invalid JSON at column {column}: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The offending line.
        line: u64,
        /// Column serde reported.
        column: usize,
        /// serde's message.
        message: String,
    },
    /// A JSONL line is valid JSON but not a usable record (a required field
    /// is missing, or has the wrong type).
    #[error("{}: line {line}: bad record at column {column}: {message}", path.display())]
    Record {
        /// The file.
        path: PathBuf,
        /// The offending line.
        line: u64,
        /// Column serde reported.
        column: usize,
        /// serde's message, e.g. "missing field `text`".
        message: String,
    },
    /// An `_id` occurs twice in the same file.
    #[error("{}: line {line}: duplicate _id {id:?} (first defined on line {first_line})", path.display())]
    DuplicateId {
        /// The file.
        path: PathBuf,
        /// The line of the repeat.
        line: u64,
        /// The id.
        id: String,
        /// The line where the id was first defined.
        first_line: u64,
    },
    /// A qrels line does not have three fields.
    #[error(
        "{}: line {line}: expected 3 tab-separated fields (query-id, corpus-id, score), found {found}",
        path.display()
    )]
    FieldCount {
        /// The file.
        path: PathBuf,
        /// The offending line.
        line: u64,
        /// How many fields it has.
        found: usize,
    },
    /// A qrels score is not an integer.
    #[error("{}: line {line}: score {value:?} is not an integer", path.display())]
    BadScore {
        /// The file.
        path: PathBuf,
        /// The offending line.
        line: u64,
        /// The score field as written.
        value: String,
    },
    /// A qrel names an id that the queries or corpus do not define.
    #[error("{}: line {line}: unknown {kind} id {id:?} (not defined in {})", path.display(), defined_in.display())]
    UnknownId {
        /// The qrels file.
        path: PathBuf,
        /// The offending line.
        line: u64,
        /// Which id space.
        kind: IdKind,
        /// The id.
        id: String,
        /// The file that should have defined it.
        defined_in: PathBuf,
    },
    /// A file has no content (or, for JSONL, only blank lines).
    #[error("{}: the file is empty", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// Writing a file failed.
    #[error("cannot write {}: {cause}", path.display())]
    Write {
        /// The file (or directory) being written.
        path: PathBuf,
        /// The underlying error.
        /// (Not an error `source`: its text is already in the message,
        /// and would otherwise be printed twice.)
        cause: io::Error,
    },
    /// The dataset cannot be written in a form that would load back.
    #[error("cannot write {}: {message}", path.display())]
    Unwritable {
        /// The file that would have been written.
        path: PathBuf,
        /// What is wrong with the dataset.
        message: String,
    },
}

/// An `_id` that may be written as a JSON string or a JSON number.
///
/// Some BEIR datasets use numeric ids in JSON but the same ids appear as
/// text in the TSV qrels, so both are normalised to their decimal text.
struct JsonId(String);

impl<'de> Deserialize<'de> for JsonId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl Visitor<'_> for IdVisitor {
            type Value = JsonId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<JsonId, E> {
                Ok(JsonId(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<JsonId, E> {
                Ok(JsonId(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<JsonId, E> {
                Ok(JsonId(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<JsonId, E> {
                Ok(JsonId(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<JsonId, E> {
                // A number beyond 2^53 (e.g. an integer too large for u64,
                // which serde_json reads as a float) has lost digits, and
                // would only give a false "unknown id" in the qrels.
                if v.abs() >= 9_007_199_254_740_992.0 {
                    return Err(E::custom(format!(
                        "numeric _id {v} is too large to be read exactly; write it as a string"
                    )));
                }
                // A float id can only match a qrels entry if it is integral;
                // print integral values without the ".0" so "12.0" matches "12".
                if v.fract() == 0.0 {
                    Ok(JsonId(format!("{v:.0}")))
                } else {
                    Ok(JsonId(v.to_string()))
                }
            }
        }
        d.deserialize_any(IdVisitor)
    }
}

/// Accepts a string or `null` (as empty); used so that a field can be
/// required to be present yet tolerate `null`, which some datasets write
/// for absent titles or texts.
fn nullable_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize)]
struct CorpusRecord {
    #[serde(rename = "_id")]
    id: JsonId,
    #[serde(default, deserialize_with = "nullable_string")]
    title: String,
    // `deserialize_with` without `default` keeps the field required.
    #[serde(deserialize_with = "nullable_string")]
    text: String,
}

#[derive(Deserialize)]
struct QueryRecord {
    #[serde(rename = "_id")]
    id: JsonId,
    #[serde(deserialize_with = "nullable_string")]
    text: String,
}

#[derive(Serialize)]
struct CorpusOut<'a> {
    #[serde(rename = "_id")]
    id: &'a str,
    title: &'a str,
    text: &'a str,
}

#[derive(Serialize)]
struct QueryOut<'a> {
    #[serde(rename = "_id")]
    id: &'a str,
    text: &'a str,
}

/// Reads a file line by line with a bound on line length, tracking the
/// 1-based line number for error messages.
struct LineReader {
    inner: Box<dyn BufRead>,
    path: PathBuf,
    line: u64,
    buf: Vec<u8>,
}

impl LineReader {
    /// Opens `plain` or, failing that, `plain.gz`.
    ///
    /// The plain file wins when both exist: a user who decompressed a file
    /// to edit it expects the edit to be seen. Compression is detected from
    /// the gzip magic bytes rather than from the name, so a mislabelled file
    /// still reads correctly.
    fn open(plain: &Path) -> Result<Self, DataError> {
        let gz = gz_path(plain);
        // A path that exists but is no regular file (a directory, a FIFO,
        // /dev/zero) is named as such, never reported as missing or read.
        let path = match (regular_file(plain)?, regular_file(&gz)?) {
            (true, _) => plain.to_path_buf(),
            (false, true) => gz,
            (false, false) => return Err(DataError::MissingFile { path: plain.to_path_buf() }),
        };
        let file = File::open(&path).map_err(|source| DataError::Open { path: path.clone(), cause: source })?;
        let mut raw = BufReader::with_capacity(READ_BUFFER, file);
        let magic = match raw.fill_buf() {
            Ok(head) => head.starts_with(&[0x1f, 0x8b]),
            Err(source) => return Err(DataError::Read { path, line: 1, cause: source }),
        };
        let inner: Box<dyn BufRead> = if magic {
            // MultiGzDecoder so that concatenated gzip members (as written
            // by `cat a.gz b.gz` or pigz) are read in full.
            Box::new(BufReader::with_capacity(READ_BUFFER, MultiGzDecoder::new(raw)))
        } else {
            Box::new(raw)
        };
        Ok(LineReader { inner, path, line: 0, buf: Vec::new() })
    }

    /// The next line without its `\n` / `\r\n` terminator, or `None` at the
    /// end of the file. A final line without a terminator is still a line.
    fn next_line(&mut self) -> Result<Option<(u64, &str)>, DataError> {
        self.buf.clear();
        let mut saw_bytes = false;
        loop {
            let available = match self.inner.fill_buf() {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(DataError::Read { path: self.path.clone(), line: self.line + 1, cause: source })
                }
            };
            if available.is_empty() {
                break;
            }
            saw_bytes = true;
            let newline = available.iter().position(|&b| b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            // Check before copying so the buffer never grows past the bound.
            if self.buf.len() + chunk.len() > MAX_LINE_BYTES {
                return Err(DataError::LineTooLong { path: self.path.clone(), line: self.line + 1 });
            }
            self.buf.extend_from_slice(chunk);
            let used = chunk.len() + usize::from(newline.is_some());
            self.inner.consume(used);
            if newline.is_some() {
                break;
            }
        }
        if !saw_bytes {
            return Ok(None);
        }
        self.line += 1;
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        match std::str::from_utf8(&self.buf) {
            // Tools on Windows sometimes start UTF-8 files with a byte order
            // mark, which JSON does not allow; it carries no content.
            Ok(text) if self.line == 1 => Ok(Some((self.line, text.strip_prefix('\u{feff}').unwrap_or(text)))),
            Ok(text) => Ok(Some((self.line, text))),
            Err(e) => {
                Err(DataError::InvalidUtf8 { path: self.path.clone(), line: self.line, byte: e.valid_up_to() + 1 })
            }
        }
    }
}

/// Whether `path` is a regular file (following symbolic links): `false`
/// when nothing is there, an error when something else is.
fn regular_file(path: &Path) -> Result<bool, DataError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(DataError::Open { path: path.to_path_buf(), cause: e }),
    };
    let t = meta.file_type();
    if t.is_file() {
        return Ok(true);
    }
    let kind = if t.is_dir() {
        "a directory"
    } else {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if t.is_fifo() {
                "a FIFO"
            } else if t.is_char_device() || t.is_block_device() {
                "a device"
            } else if t.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            }
        }
        #[cfg(not(unix))]
        {
            "not a regular file"
        }
    };
    Err(DataError::NotAFile { path: path.to_path_buf(), kind })
}

/// Why an `_id` cannot be used, if it cannot.
fn id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("ids must not be empty")
    } else if id.contains(['\t', '\n', '\r']) {
        Some("ids must not contain a tab or a line break (qrels and TREC run files could not hold them)")
    } else {
        None
    }
}

fn gz_path(plain: &Path) -> PathBuf {
    let mut name = plain.as_os_str().to_owned();
    name.push(".gz");
    PathBuf::from(name)
}

/// Turns a serde error on one line into a [`DataError`], dropping serde's
/// "at line 1 column N" suffix (each record is parsed on its own, so serde's
/// line is always 1 and would contradict the file's line number).
fn json_error(path: &Path, line: u64, e: &serde_json::Error) -> DataError {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
    let path = path.to_path_buf();
    let column = e.column();
    match e.classify() {
        serde_json::error::Category::Data => DataError::Record { path, line, column, message },
        _ => DataError::Json { path, line, column, message },
    }
}

/// Reads a JSONL file, calling `add` for each record. Blank lines are
/// skipped (a trailing newline or an empty last line is common).
fn read_jsonl<T, F>(plain: &Path, mut add: F) -> Result<(), DataError>
where
    T: for<'de> Deserialize<'de>,
    F: FnMut(T, &Path, u64) -> Result<(), DataError>,
{
    let mut reader = LineReader::open(plain)?;
    // A copy, because each line borrows the reader.
    let path = reader.path.clone();
    let mut records = 0usize;
    while let Some((line_no, line)) = reader.next_line()? {
        if line.trim().is_empty() {
            continue;
        }
        // serde reads a struct from a JSON array too (`["q1", "text"]`);
        // a BEIR record is an object.
        if !line.trim_start().starts_with('{') {
            let column = line.len() - line.trim_start().len() + 1;
            let found = match line.trim_start().chars().next() {
                Some('[') => "an array",
                Some('"') => "a string",
                _ => "not an object",
            };
            return Err(DataError::Record {
                path,
                line: line_no,
                column,
                message: format!("expected a JSON object {{\"_id\": ..}}, found {found}"),
            });
        }
        let record: T = serde_json::from_str(line).map_err(|e| json_error(&path, line_no, &e))?;
        add(record, &path, line_no)?;
        records += 1;
    }
    if records == 0 {
        return Err(DataError::Empty { path });
    }
    Ok(())
}

/// Inserts `id` into `index`, failing with the line of its first definition
/// if it is already there.
fn insert_unique(
    index: &mut HashMap<String, u32>,
    lines: &mut Vec<u64>,
    id: String,
    path: &Path,
    line: u64,
) -> Result<(), DataError> {
    let next = u32::try_from(lines.len()).map_err(|_| DataError::Read {
        path: path.to_path_buf(),
        line,
        cause: io::Error::other("more than 2^32 records"),
    })?;
    match index.entry(id) {
        std::collections::hash_map::Entry::Occupied(e) => {
            let first_line = lines.get(*e.get() as usize).copied().unwrap_or(0);
            Err(DataError::DuplicateId { path: path.to_path_buf(), line, id: e.key().clone(), first_line })
        }
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(next);
            lines.push(line);
            Ok(())
        }
    }
}

/// Loads a BEIR dataset from `dir`, reading the qrels of each of `splits`
/// (e.g. `&["train", "test"]`).
///
/// Each file is read from its plain name or, if that is absent, from the
/// name with `.gz` appended. Documents and queries keep file order; qrels
/// are resolved to indices and keep file order within each split.
pub fn load(dir: &Path, splits: &[&str]) -> Result<Dataset, DataError> {
    if !dir.exists() {
        return Err(DataError::MissingDir { path: dir.to_path_buf() });
    }
    if !dir.is_dir() {
        return Err(DataError::NotADirectory { path: dir.to_path_buf() });
    }
    let mut ds = Dataset::default();

    let corpus_path = dir.join("corpus.jsonl");
    let mut lines = Vec::new();
    read_jsonl(&corpus_path, |r: CorpusRecord, path, line| {
        if let Some(reason) = id_problem(&r.id.0) {
            return Err(DataError::BadId { path: path.to_path_buf(), line, id: r.id.0, reason });
        }
        insert_unique(&mut ds.doc_index, &mut lines, r.id.0.clone(), path, line)?;
        ds.corpus.push(Doc { id: r.id.0, title: r.title, text: r.text });
        Ok(())
    })?;

    let queries_path = dir.join("queries.jsonl");
    let mut lines = Vec::new();
    read_jsonl(&queries_path, |r: QueryRecord, path, line| {
        if let Some(reason) = id_problem(&r.id.0) {
            return Err(DataError::BadId { path: path.to_path_buf(), line, id: r.id.0, reason });
        }
        insert_unique(&mut ds.query_index, &mut lines, r.id.0.clone(), path, line)?;
        ds.queries.push(Query { id: r.id.0, text: r.text });
        Ok(())
    })?;

    for split in splits {
        let path = dir.join("qrels").join(format!("{split}.tsv"));
        let qrels = read_qrels(&path, &ds, &queries_path, &corpus_path)?;
        ds.qrels.insert((*split).to_owned(), qrels);
    }
    Ok(ds)
}

/// Splits a qrels line into fields: on tabs as BEIR writes them, or on runs
/// of whitespace when the line has no tab at all (hand-made files).
fn qrel_fields(line: &str) -> Vec<&str> {
    if line.contains('\t') {
        line.split('\t').map(str::trim).collect()
    } else {
        line.split_whitespace().collect()
    }
}

fn read_qrels(plain: &Path, ds: &Dataset, queries_path: &Path, corpus_path: &Path) -> Result<Vec<Qrel>, DataError> {
    let mut reader = LineReader::open(plain)?;
    // A copy, because each line borrows the reader.
    let path = reader.path.clone();
    let mut out = Vec::new();
    let mut first = true;
    while let Some((line_no, line)) = reader.next_line()? {
        if line.trim().is_empty() {
            continue;
        }
        let is_first = std::mem::replace(&mut first, false);
        let fields = qrel_fields(line);
        let (qid, did, score) = match fields.as_slice() {
            [q, d, s] => (*q, *d, *s),
            _ => return Err(DataError::FieldCount { path: path.clone(), line: line_no, found: fields.len() }),
        };
        let score = match score.parse::<i32>() {
            Ok(s) => s,
            // BEIR writes a `query-id corpus-id score` header, but not every
            // tool does; so the first line counts as a header exactly when
            // it cannot be a judgement (its score is not a number and its
            // query id is not a known query).
            Err(_) if is_first && !ds.query_index.contains_key(qid) => continue,
            Err(_) => return Err(DataError::BadScore { path: path.clone(), line: line_no, value: score.to_owned() }),
        };
        let query = *ds.query_index.get(qid).ok_or_else(|| DataError::UnknownId {
            path: path.clone(),
            line: line_no,
            kind: IdKind::Query,
            id: qid.to_owned(),
            defined_in: queries_path.to_path_buf(),
        })?;
        let doc = *ds.doc_index.get(did).ok_or_else(|| DataError::UnknownId {
            path: path.clone(),
            line: line_no,
            kind: IdKind::Corpus,
            id: did.to_owned(),
            defined_in: corpus_path.to_path_buf(),
        })?;
        out.push(Qrel { query, doc, score });
    }
    // Zero bytes is an error (almost certainly a failed download); a file
    // with only a header is a legitimate split with no judgements.
    if reader.line == 0 {
        return Err(DataError::Empty { path });
    }
    Ok(out)
}

/// Writes `ds` to `dir` in BEIR's layout, gzip-compressed (`.gz` names) or
/// plain, creating `dir` and `dir/qrels` as needed.
///
/// Every file is written to a temporary file in its destination directory
/// and then renamed over the destination, so a reader never sees a half
/// written file and a failed write leaves the previous file intact. The
/// variant with the other compression (e.g. `corpus.jsonl` when writing
/// `corpus.jsonl.gz`) is removed afterwards, because [`load`] prefers the
/// plain file and would otherwise read stale data.
///
/// The dataset is checked first, and nothing is written, if it could not
/// be loaded back: an empty corpus or query set, duplicate ids, qrels
/// pointing outside the corpus or queries, ids containing tabs or line
/// breaks (which would corrupt the TSV), or split names that are not plain
/// file names.
pub fn write(dir: &Path, ds: &Dataset, gzip: bool) -> Result<(), DataError> {
    let corpus_path = dir.join("corpus.jsonl");
    let queries_path = dir.join("queries.jsonl");
    let qrels_dir = dir.join("qrels");
    check_writable(dir, ds, &corpus_path, &queries_path)?;

    std::fs::create_dir_all(&qrels_dir)
        .map_err(|source| DataError::Write { path: qrels_dir.clone(), cause: source })?;

    write_atomic(&corpus_path, gzip, |w| {
        for d in &ds.corpus {
            let record = CorpusOut { id: &d.id, title: &d.title, text: &d.text };
            serde_json::to_writer(&mut *w, &record)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })?;
    write_atomic(&queries_path, gzip, |w| {
        for q in &ds.queries {
            serde_json::to_writer(&mut *w, &QueryOut { id: &q.id, text: &q.text })?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })?;

    // Sorted so that output (and any error) does not depend on hash order.
    let mut splits: Vec<&String> = ds.qrels.keys().collect();
    splits.sort();
    for split in splits {
        let path = qrels_dir.join(format!("{split}.tsv"));
        let qrels = ds.qrels.get(split).map(Vec::as_slice).unwrap_or(&[]);
        write_atomic(&path, gzip, |w| {
            w.write_all(b"query-id\tcorpus-id\tscore\n")?;
            for q in qrels {
                // Indices were validated in `check_writable`.
                let (Some(query), Some(doc)) = (ds.queries.get(q.query as usize), ds.corpus.get(q.doc as usize)) else {
                    return Err(io::Error::other("qrel index out of range"));
                };
                writeln!(w, "{}\t{}\t{}", query.id, doc.id, q.score)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn check_writable(dir: &Path, ds: &Dataset, corpus_path: &Path, queries_path: &Path) -> Result<(), DataError> {
    let fail = |path: &Path, message: String| DataError::Unwritable { path: path.to_path_buf(), message };
    if ds.corpus.is_empty() {
        return Err(fail(corpus_path, "the corpus is empty".into()));
    }
    if ds.queries.is_empty() {
        return Err(fail(queries_path, "there are no queries".into()));
    }
    let mut seen = HashSet::new();
    for d in &ds.corpus {
        if !seen.insert(d.id.as_str()) {
            return Err(fail(corpus_path, format!("duplicate document id {:?}", d.id)));
        }
    }
    seen.clear();
    for q in &ds.queries {
        if !seen.insert(q.id.as_str()) {
            return Err(fail(queries_path, format!("duplicate query id {:?}", q.id)));
        }
    }
    let bad_id = |id: &str| id.is_empty() || id.contains(['\t', '\n', '\r']);
    for (split, qrels) in &ds.qrels {
        let path = dir.join("qrels").join(format!("{split}.tsv"));
        if split.is_empty()
            || split.starts_with('.')
            || split.contains(['/', '\\', '\0'])
            || Path::new(split).components().count() != 1
        {
            return Err(fail(&path, format!("split name {split:?} is not a plain file name")));
        }
        for q in qrels {
            let query = ds
                .queries
                .get(q.query as usize)
                .ok_or_else(|| fail(&path, format!("qrel names query index {} of {}", q.query, ds.queries.len())))?;
            let doc = ds
                .corpus
                .get(q.doc as usize)
                .ok_or_else(|| fail(&path, format!("qrel names document index {} of {}", q.doc, ds.corpus.len())))?;
            for id in [&query.id, &doc.id] {
                if bad_id(id) {
                    return Err(fail(&path, format!("id {id:?} is empty or contains a tab or line break")));
                }
            }
        }
    }
    Ok(())
}

/// Writes the file `plain` (or `plain.gz` when `gzip`) atomically: `body`
/// writes the uncompressed content into a temporary file in the same
/// directory (through gzip if asked), which is synced and then renamed over
/// the destination. The variant with the other compression is then removed.
fn write_atomic<F>(plain: &Path, gzip: bool, body: F) -> Result<(), DataError>
where
    F: FnOnce(&mut dyn Write) -> io::Result<()>,
{
    let (path, other) =
        if gzip { (gz_path(plain), plain.to_path_buf()) } else { (plain.to_path_buf(), gz_path(plain)) };
    let werr = |source: io::Error| DataError::Write { path: path.clone(), cause: source };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // The temporary file must live in the destination directory: a rename
    // is only atomic within one file system.
    let mut builder = tempfile::Builder::new();
    builder.prefix(".negcache-write-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // tempfile creates files readable by the owner only, which suits
        // secrets but not datasets meant to be shared; 0666 lets the umask
        // decide, as for any newly created file.
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(parent).map_err(werr)?;
    {
        let buffered = BufWriter::with_capacity(READ_BUFFER, tmp.as_file_mut());
        if gzip {
            // Best compression: these files are written once (by the
            // converter) and read many times, and the bundled copies live
            // in the repository. GzEncoder writes a zero mtime, so equal
            // data gives byte-identical files.
            let mut enc = GzEncoder::new(buffered, Compression::best());
            body(&mut enc).map_err(werr)?;
            enc.finish().map_err(werr)?.flush().map_err(werr)?;
        } else {
            let mut buffered = buffered;
            body(&mut buffered).map_err(werr)?;
            buffered.flush().map_err(werr)?;
        }
    }
    // Sync before the rename so that a crash cannot leave the new name
    // pointing at incompletely written data.
    tmp.as_file().sync_all().map_err(werr)?;
    tmp.persist(&path).map_err(|e| werr(e.error))?;

    match std::fs::remove_file(&other) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataError::Write { path: other, cause: source }),
    }
}
