//! Converting Princeton WordNet 3.0 into retrieval datasets in BEIR's layout.
//!
//! Input is the four database files `data.{noun,verb,adj,adv}` as shipped
//! by WordNet (and by Debian's `wordnet-base`), whose format is described
//! in `wndb(5WN)`. Two tasks are built from them; see [`Task`].
//!
//! Ids are `<pos>:<offset>`, e.g. `n:00001740`, where pos is the synset
//! type letter (`n`, `v`, `a`, `s` for adjective satellites, `r`) and the
//! offset is the synset's byte offset in its data file. Offsets alone are
//! not unique across files, the pair is. Queries and items are separate id
//! spaces in BEIR, so a synset that is both has the same id in both files.
//!
//! # Identical texts
//!
//! Distinct synsets can render to the same item text: six noun synsets
//! consist of the single word "bank", so "bank (noun)" occurs six times.
//! They are kept as separate items with their own ids (merging them would
//! conflate different concepts and their different hypernym edges), the
//! number of such repeats is reported in [`ConvertStats`]. Standard
//! evaluation scores them as the distinct items they are; merging them is an
//! explicit, labelled option (`--merge-identical-text`, through
//! [`Dataset::duplicate_text_groups`]). See [`IDENTICAL_TEXT_POLICY`].

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand_core::{RngCore, SeedableRng};
use rand_pcg::Pcg64Mcg;

use super::{Dataset, Doc, Qrel, Query};

/// How items with identical text are handled, for printing beside stats.
pub const IDENTICAL_TEXT_POLICY: &str = "Items whose text is identical \
(e.g. several synsets consisting only of the word \"bank\") are kept as \
separate items with distinct ids, and standard evaluation scores them as \
distinct items; `--merge-identical-text` counts them as one, a non-standard \
option labelled wherever its numbers are printed.";

/// Where Debian keeps WordNet's license, used when the data files carry no
/// license header (e.g. a trimmed copy).
const DEBIAN_COPYRIGHT: &str = "/usr/share/doc/wordnet-base/copyright";

/// Which retrieval task to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Task {
    /// Query: a noun or verb synset ("words; gloss"). Items: every synset
    /// that is some synset's hypernym or instance hypernym, as "words
    /// (part of speech)". Positives: the query's direct hypernyms (`@`) and
    /// instance hypernyms (`@i`). Split by query.
    #[default]
    Hypernyms,
    /// Query: a synset's gloss (definition without examples). Items: every
    /// synset as "words (part of speech)". Positive: the synset the gloss
    /// defines. Split by synset, so a test item is never a training
    /// positive.
    ReverseDictionary,
}

impl Task {
    /// The task's short name, as used on the command line and in directory
    /// names (`hypernyms`, `revdict`).
    pub fn name(self) -> &'static str {
        match self {
            Task::Hypernyms => "hypernyms",
            Task::ReverseDictionary => "revdict",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Task {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "hypernyms" | "hypernym" => Ok(Task::Hypernyms),
            "revdict" | "reverse-dictionary" | "reverse_dictionary" => Ok(Task::ReverseDictionary),
            _ => Err(format!("unknown WordNet task {s:?} (expected \"hypernyms\" or \"revdict\")")),
        }
    }
}

/// Counts describing a conversion.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConvertStats {
    /// The task converted.
    pub task: Task,
    /// Synset lines read from all four data files.
    pub synsets: usize,
    /// Queries written (train and test together).
    pub queries: usize,
    /// Corpus items written.
    pub items: usize,
    /// Queries in the train split.
    pub train_queries: usize,
    /// Queries in the test split.
    pub test_queries: usize,
    /// Judgements in the train split.
    pub train_qrels: usize,
    /// Judgements in the test split.
    pub test_qrels: usize,
    /// Items whose title and text repeat those of an earlier item (each
    /// group of k identical items contributes k - 1).
    pub identical_text_items: usize,
    /// Synsets that gave no query because their gloss is empty once the
    /// examples are removed (reverse dictionary only; they remain items).
    pub skipped_empty_gloss: usize,
}

impl fmt::Display for ConvertStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WordNet {} task: read {} synsets and wrote {} queries \
             ({} train, {} test) over {} items, with {} train and {} test \
             judgements",
            self.task,
            self.synsets,
            self.queries,
            self.train_queries,
            self.test_queries,
            self.items,
            self.train_qrels,
            self.test_qrels,
        )?;
        if self.skipped_empty_gloss > 0 {
            write!(f, "; {} synsets had an empty gloss and gave no query", self.skipped_empty_gloss)?;
        }
        write!(f, ". {} items repeat the text of an earlier item. {}", self.identical_text_items, IDENTICAL_TEXT_POLICY)
    }
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WordNetError {
    /// The WordNet directory does not exist.
    #[error("WordNet directory {} does not exist", path.display())]
    MissingDir {
        /// The directory asked for.
        path: PathBuf,
    },
    /// A file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A data line does not follow the `wndb(5WN)` format.
    #[error("{}: line {line}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What was wrong.
        message: String,
    },
    /// A hypernym pointer names a synset that no data file defines.
    #[error("{}: line {line}: hypernym pointer to {target}, which is not defined", path.display())]
    DanglingPointer {
        /// The file with the pointer.
        path: PathBuf,
        /// 1-based line number of the pointing synset.
        line: u64,
        /// The target, as `<pos>:<offset>`.
        target: String,
    },
    /// `test_fraction` is not within 0..=1.
    #[error("test fraction {0} is not between 0 and 1")]
    BadTestFraction(f64),
    /// No license notice was found.
    #[error("no WordNet license notice in the header of {} nor in {DEBIAN_COPYRIGHT}", path.display())]
    NoLicense {
        /// The data file whose header was searched.
        path: PathBuf,
    },
}

/// A synset's syntactic category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pos {
    Noun,
    Verb,
    Adjective,
    Satellite,
    Adverb,
}

impl Pos {
    fn from_letter(c: &str) -> Option<Pos> {
        Some(match c {
            "n" => Pos::Noun,
            "v" => Pos::Verb,
            "a" => Pos::Adjective,
            "s" => Pos::Satellite,
            "r" => Pos::Adverb,
            _ => return None,
        })
    }

    fn letter(self) -> char {
        match self {
            Pos::Noun => 'n',
            Pos::Verb => 'v',
            Pos::Adjective => 'a',
            Pos::Satellite => 's',
            Pos::Adverb => 'r',
        }
    }

    /// The data file the synset lives in: satellites are in `data.adj`.
    fn file(self) -> FileKind {
        match self {
            Pos::Noun => FileKind::Noun,
            Pos::Verb => FileKind::Verb,
            Pos::Adjective | Pos::Satellite => FileKind::Adj,
            Pos::Adverb => FileKind::Adv,
        }
    }

    /// The name shown in item texts. Satellites are adjectives to a reader;
    /// the distinction is WordNet-internal.
    fn name(self) -> &'static str {
        match self {
            Pos::Noun => "noun",
            Pos::Verb => "verb",
            Pos::Adjective | Pos::Satellite => "adjective",
            Pos::Adverb => "adverb",
        }
    }
}

/// One of the four data files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FileKind {
    Noun,
    Verb,
    Adj,
    Adv,
}

const FILES: [(FileKind, &str); 4] = [
    (FileKind::Noun, "data.noun"),
    (FileKind::Verb, "data.verb"),
    (FileKind::Adj, "data.adj"),
    (FileKind::Adv, "data.adv"),
];

/// A synset is identified by its file and byte offset: pointers name a
/// target by offset and a pos letter, which for adjectives may say `a` or
/// `s`, so the file (not the letter) is the reliable half of the key.
type Key = (FileKind, u32);

/// A synset as the converter needs it.
#[derive(Debug)]
struct Synset {
    pos: Pos,
    offset: u32,
    /// Words with underscores as spaces and adjective markers removed.
    words: Vec<String>,
    /// Gloss with examples removed.
    gloss: String,
    /// Targets of `@` and `@i` pointers, in file order, without repeats.
    hypernyms: Vec<(Key, String)>,
    /// Where the synset was read, for error messages.
    path_index: usize,
    line: u64,
}

impl Synset {
    fn id(&self) -> String {
        format!("{}:{:08}", self.pos.letter(), self.offset)
    }

    fn words_text(&self) -> String {
        self.words.join(", ")
    }

    /// An item: the words and the part of speech, e.g. "entity (noun)".
    fn item_text(&self) -> String {
        format!("{} ({})", self.words_text(), self.pos.name())
    }
}

/// All synsets of a WordNet directory, in file order (noun, verb, adj,
/// adv; by offset within each).
struct WordNet {
    synsets: Vec<Synset>,
    by_key: HashMap<Key, usize>,
}

/// Removes the usage examples (and anything after them) from a raw gloss,
/// keeping the definition.
///
/// A gloss is a definition followed by `;`-separated examples in double
/// quotes, sometimes with an attribution after the closing quote
/// (`"..."- Shakespeare`) or a usage note after the examples. The gloss is
/// split at semicolons that are not inside quotes, and everything from the
/// first segment that starts with a quote is dropped; usage notes after the
/// examples often name the word itself (``(`alright' is a nonstandard
/// variant of `all right')``), which would give the answer away in a reverse
/// dictionary. A few glosses introduce their example with a colon instead
/// (`...: "mobilization of the troops"`); the definition is cut there too.
/// Quotes inside a definition (`the phrase "make strides"`) are kept.
pub fn clean_gloss(raw: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut in_quote = false;
    let mut start = 0;
    let mut segments = Vec::new();
    for (i, c) in raw.char_indices() {
        match c {
            '"' => in_quote = !in_quote,
            ';' if !in_quote => {
                segments.push(&raw[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    segments.push(&raw[start..]);
    for segment in segments {
        let segment = segment.trim();
        if segment.starts_with('"') {
            break;
        }
        if let Some(colon) = segment.find(": \"") {
            kept.push(segment[..colon].trim_end());
            break;
        }
        if !segment.is_empty() {
            kept.push(segment);
        }
    }
    kept.retain(|s| !s.is_empty());
    kept.join("; ")
}

/// A word as written in a data file, made readable: underscores become
/// spaces and the adjective position markers `(a)`, `(p)` and `(ip)` that
/// data.adj appends are removed.
fn clean_word(raw: &str) -> String {
    let bare = ["(a)", "(p)", "(ip)"].iter().find_map(|marker| raw.strip_suffix(marker)).unwrap_or(raw);
    bare.replace('_', " ")
}

/// Parses one synset line of a data file; `Err` carries the message that
/// becomes a [`WordNetError::Syntax`].
fn parse_synset(line: &str, file: FileKind) -> Result<(Synset, Vec<(String, String)>), String> {
    // The gloss is everything after the first '|'; words and pointers
    // never contain one.
    let (head, gloss) = line.split_once('|').ok_or_else(|| "no '|' separating the gloss".to_owned())?;
    let mut tokens = head.split_ascii_whitespace();
    let mut next = |what: &str| tokens.next().ok_or_else(|| format!("line ends before the {what} field"));

    let offset_text = next("synset_offset")?;
    let offset = offset_text
        .parse::<u32>()
        .ok()
        .filter(|_| offset_text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("synset_offset {offset_text:?} is not a decimal number"))?;
    next("lex_filenum")?;
    let ss_type = next("ss_type")?;
    let pos = Pos::from_letter(ss_type).ok_or_else(|| format!("ss_type {ss_type:?} is not one of n, v, a, s, r"))?;
    if pos.file() != file {
        return Err(format!("ss_type {ss_type:?} does not belong in this file"));
    }
    let w_cnt_text = next("w_cnt")?;
    let w_cnt = usize::from_str_radix(w_cnt_text, 16)
        .map_err(|_| format!("w_cnt {w_cnt_text:?} is not a hexadecimal number"))?;
    if w_cnt == 0 {
        return Err("w_cnt is 0: a synset has at least one word".to_owned());
    }
    let mut words = Vec::with_capacity(w_cnt);
    for _ in 0..w_cnt {
        words.push(clean_word(next("word")?));
        next("lex_id")?;
    }
    let p_cnt_text = next("p_cnt")?;
    let p_cnt = p_cnt_text.parse::<usize>().map_err(|_| format!("p_cnt {p_cnt_text:?} is not a decimal number"))?;
    // Pointers are resolved by the caller, which knows all synsets; here
    // they are only collected as (symbol-filtered) textual targets.
    let mut pointers = Vec::new();
    for _ in 0..p_cnt {
        let symbol = next("pointer_symbol")?;
        let target_offset = next("pointer synset_offset")?;
        let target_pos = next("pointer pos")?;
        next("pointer source/target")?;
        if symbol == "@" || symbol == "@i" {
            pointers.push((target_pos.to_owned(), target_offset.to_owned()));
        }
    }
    // Anything left (verb frames) is not needed.
    let synset =
        Synset { pos, offset, words, gloss: clean_gloss(gloss.trim()), hypernyms: Vec::new(), path_index: 0, line: 0 };
    Ok((synset, pointers))
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> WordNetError + '_ {
    move |source| WordNetError::Io { path: path.to_path_buf(), source }
}

/// Reads and cross-links the four data files.
fn read_wordnet(dir: &Path) -> Result<WordNet, WordNetError> {
    if !dir.is_dir() {
        return Err(WordNetError::MissingDir { path: dir.to_path_buf() });
    }
    let mut synsets = Vec::new();
    let mut by_key = HashMap::new();
    let mut paths = Vec::new();
    // Pointers in textual form, resolved once every file has been read
    // (hypernyms can point forward, and verbs never point into nouns but
    // the format does not forbid cross-file pointers).
    let mut raw_pointers: Vec<Vec<(String, String)>> = Vec::new();
    for (file, name) in FILES {
        let path = dir.join(name);
        let path_index = paths.len();
        let reader = BufReader::new(File::open(&path).map_err(io_error(&path))?);
        let mut found = 0usize;
        let mut line_no = 0u64;
        for line in reader.lines() {
            let line = line.map_err(io_error(&path))?;
            line_no += 1;
            // The license header's lines begin with two spaces, which is
            // how the format marks them.
            if line.starts_with("  ") || line.trim().is_empty() {
                continue;
            }
            let (mut synset, pointers) = parse_synset(&line, file).map_err(|message| WordNetError::Syntax {
                path: path.clone(),
                line: line_no,
                message,
            })?;
            synset.path_index = path_index;
            synset.line = line_no;
            if by_key.insert((file, synset.offset), synsets.len()).is_some() {
                return Err(WordNetError::Syntax {
                    path,
                    line: line_no,
                    message: format!("synset_offset {:08} occurs twice", synset.offset),
                });
            }
            synsets.push(synset);
            raw_pointers.push(pointers);
            found += 1;
        }
        if found == 0 {
            return Err(WordNetError::Syntax {
                path,
                line: line_no,
                message: "the file contains no synsets".to_owned(),
            });
        }
        paths.push(path);
    }

    for (index, pointers) in raw_pointers.into_iter().enumerate() {
        let mut resolved: Vec<(Key, String)> = Vec::new();
        for (pos_letter, offset_text) in pointers {
            let Some(synset) = synsets.get(index) else {
                break;
            };
            let syntax = |message: String| WordNetError::Syntax {
                path: paths.get(synset.path_index).cloned().unwrap_or_default(),
                line: synset.line,
                message,
            };
            let pos = Pos::from_letter(&pos_letter)
                .ok_or_else(|| syntax(format!("pointer pos {pos_letter:?} is not one of n, v, a, s, r")))?;
            let offset = offset_text
                .parse::<u32>()
                .map_err(|_| syntax(format!("pointer offset {offset_text:?} is not a decimal number")))?;
            let key = (pos.file(), offset);
            let Some(&target) = by_key.get(&key) else {
                return Err(WordNetError::DanglingPointer {
                    path: paths.get(synset.path_index).cloned().unwrap_or_default(),
                    line: synset.line,
                    target: format!("{pos_letter}:{offset_text}"),
                });
            };
            let target_id = synsets.get(target).map(Synset::id).unwrap_or_default();
            if !resolved.iter().any(|(k, _)| *k == key) {
                resolved.push((key, target_id));
            }
        }
        if let Some(synset) = synsets.get_mut(index) {
            synset.hypernyms = resolved;
        }
    }
    Ok(WordNet { synsets, by_key })
}

/// An integer uniformly distributed in `0..n` (`n > 0`), by Lemire's
/// multiply-and-reject method: unbiased, and one multiplication per draw
/// in the common case.
fn below(rng: &mut impl RngCore, n: u64) -> u64 {
    // 2^64 mod n: products whose low half falls below this would make the
    // lowest values slightly more likely, so they are redrawn.
    let threshold = n.wrapping_neg() % n;
    loop {
        let product = u128::from(rng.next_u64()) * u128::from(n);
        if (product as u64) >= threshold {
            return (product >> 64) as u64;
        }
    }
}

/// Fisher–Yates shuffle. Written out rather than taken from `rand` so the
/// order for a given seed depends only on this code and the PCG stream,
/// not on a library's choice of algorithm, keeping datasets reproducible.
fn shuffle<T>(items: &mut [T], rng: &mut impl RngCore) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// For `n` queries, whether each is in the test split: a seeded shuffle,
/// with the first `round(n * test_fraction)` positions going to test.
fn test_membership(n: usize, seed: u64, test_fraction: f64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, &mut Pcg64Mcg::seed_from_u64(seed));
    let n_test = ((n as f64) * test_fraction).round() as usize;
    let mut is_test = vec![false; n];
    for &i in order.iter().take(n_test.min(n)) {
        if let Some(slot) = is_test.get_mut(i) {
            *slot = true;
        }
    }
    is_test
}

/// Assembles a dataset, building the id indices.
fn assemble(corpus: Vec<Doc>, queries: Vec<Query>, is_test: &[bool], positives: &[Vec<u32>]) -> Dataset {
    let doc_index = (0u32..).zip(&corpus).map(|(i, d)| (d.id.clone(), i)).collect();
    let query_index = (0u32..).zip(&queries).map(|(i, q)| (q.id.clone(), i)).collect();
    let mut train = Vec::new();
    let mut test = Vec::new();
    for ((query, docs), &test_query) in (0u32..).zip(positives).zip(is_test) {
        let split = if test_query { &mut test } else { &mut train };
        split.extend(docs.iter().map(|&doc| Qrel { query, doc, score: 1 }));
    }
    let qrels = HashMap::from([("train".to_owned(), train), ("test".to_owned(), test)]);
    Dataset { corpus, queries, doc_index, query_index, qrels }
}

/// Converts the WordNet database in `wordnet_dir` (the directory holding
/// `data.noun` etc., e.g. `/usr/share/wordnet`) into a dataset for `task`,
/// with splits `train` and `test`.
///
/// Queries are assigned to the test split by a Fisher–Yates shuffle driven
/// by `Pcg64Mcg::seed_from_u64(seed)`; `round(queries * test_fraction)` of
/// them go to test. The same input, task, seed and fraction always give
/// the same dataset. Queries, items and judgements are in WordNet file
/// order (noun, verb, adjective, adverb; by offset), whatever the split.
///
/// Synsets with identical item text are kept apart; see the module
/// documentation and [`IDENTICAL_TEXT_POLICY`].
pub fn convert(
    wordnet_dir: &Path,
    task: Task,
    seed: u64,
    test_fraction: f64,
) -> Result<(Dataset, ConvertStats), WordNetError> {
    if !(0.0..=1.0).contains(&test_fraction) {
        return Err(WordNetError::BadTestFraction(test_fraction));
    }
    let wn = read_wordnet(wordnet_dir)?;
    let mut stats = ConvertStats { task, synsets: wn.synsets.len(), ..ConvertStats::default() };

    let mut corpus = Vec::new();
    let mut queries = Vec::new();
    // For each query, the corpus indices of its positives.
    let mut positives: Vec<Vec<u32>> = Vec::new();
    match task {
        Task::Hypernyms => {
            // Items are the hypernym targets; mark them first so that the
            // corpus comes out in file order rather than discovery order.
            let mut is_item = vec![false; wn.synsets.len()];
            for s in &wn.synsets {
                for (key, _) in &s.hypernyms {
                    if let Some(&t) = wn.by_key.get(key) {
                        if let Some(flag) = is_item.get_mut(t) {
                            *flag = true;
                        }
                    }
                }
            }
            let mut corpus_of: HashMap<String, u32> = HashMap::new();
            for ((s, _), doc) in wn.synsets.iter().zip(&is_item).filter(|(_, &item)| item).zip(0u32..) {
                corpus_of.insert(s.id(), doc);
                corpus.push(Doc { id: s.id(), title: String::new(), text: s.item_text() });
            }
            for s in &wn.synsets {
                if !matches!(s.pos, Pos::Noun | Pos::Verb) || s.hypernyms.is_empty() {
                    continue;
                }
                let text = if s.gloss.is_empty() { s.words_text() } else { format!("{}; {}", s.words_text(), s.gloss) };
                queries.push(Query { id: s.id(), text });
                positives.push(s.hypernyms.iter().filter_map(|(_, id)| corpus_of.get(id).copied()).collect());
            }
        }
        Task::ReverseDictionary => {
            for (s, doc) in wn.synsets.iter().zip(0u32..) {
                corpus.push(Doc { id: s.id(), title: String::new(), text: s.item_text() });
                if s.gloss.is_empty() {
                    stats.skipped_empty_gloss += 1;
                    continue;
                }
                queries.push(Query { id: s.id(), text: s.gloss.clone() });
                positives.push(vec![doc]);
            }
        }
    }

    let is_test = test_membership(queries.len(), seed, test_fraction);
    let ds = assemble(corpus, queries, &is_test, &positives);
    stats.queries = ds.queries.len();
    stats.items = ds.corpus.len();
    stats.test_queries = is_test.iter().filter(|&&t| t).count();
    stats.train_queries = stats.queries - stats.test_queries;
    stats.train_qrels = ds.qrels.get("train").map_or(0, Vec::len);
    stats.test_qrels = ds.qrels.get("test").map_or(0, Vec::len);
    stats.identical_text_items = ds.identical_text_count();
    Ok((ds, stats))
}

/// WordNet's license notice, to be shipped as `LICENSE-WORDNET` beside
/// converted data (the license requires the notice on all copies).
///
/// Taken from the header of `data.noun` (its lines begin with two spaces
/// and a line number, which are removed), or, if that file has no header,
/// from the WordNet stanza of Debian's copyright file.
pub fn license_text(wordnet_dir: &Path) -> Result<String, WordNetError> {
    let path = wordnet_dir.join("data.noun");
    let reader = BufReader::new(File::open(&path).map_err(io_error(&path))?);
    let mut lines = Vec::new();
    for line in reader.lines() {
        let line = line.map_err(io_error(&path))?;
        if !line.starts_with("  ") {
            break;
        }
        let text = line.trim_start().trim_start_matches(|c: char| c.is_ascii_digit());
        lines.push(text.strip_prefix(' ').unwrap_or(text).trim_end().to_owned());
    }
    if lines.iter().all(|l| l.is_empty()) {
        lines = debian_license().unwrap_or_default();
    }
    while lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    let first = lines.iter().position(|l| !l.is_empty());
    match first {
        Some(first) => {
            let mut text = lines.split_off(first).join("\n");
            text.push('\n');
            Ok(text)
        }
        None => Err(WordNetError::NoLicense { path }),
    }
}

/// The WordNet license paragraph of Debian's machine-readable copyright
/// file: the indented lines after `License: WordNet...`, with the format's
/// " ." blank-line marker turned back into blank lines.
fn debian_license() -> Option<Vec<String>> {
    let text = std::fs::read_to_string(DEBIAN_COPYRIGHT).ok()?;
    let mut lines = text.lines().skip_while(|l| !l.starts_with("License: WordNet"));
    lines.next()?;
    Some(
        lines
            .take_while(|l| l.starts_with(' '))
            .map(|l| match l.trim() {
                "." => String::new(),
                t => t.to_owned(),
            })
            .collect(),
    )
}
