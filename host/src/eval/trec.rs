//! TREC run and qrels files, the formats trec_eval and pytrec_eval read.
//!
//! * Run: `qid Q0 docid rank score tag`, one line per retrieved document,
//!   rank counting from 1 within each query.
//! * Qrels: `qid 0 docid rel`.
//!
//! Fields are separated by single spaces, so ids and tags may not contain
//! whitespace (or be empty); writing such a value is an error rather than a
//! silently unreadable file. Files are written atomically
//! ([`write_atomically`]): readers never see a half-written file and a failed
//! write leaves any previous file intact.
//!
//! Note that trec_eval ignores the rank column: it re-sorts each query's
//! lines by decreasing score and breaks ties by decreasing docid. Runs whose
//! scores tie may therefore be evaluated in a different order from the one
//! written.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use crate::checkpoint::write_atomically;
use anyhow::{bail, ensure, Context, Result};

use crate::data::{Dataset, Qrel};
use crate::eval::protocol::{Evaluator, Ranking};

/// Results of one query: its index into [`Dataset::queries`] and its ranked
/// (doc index, score) pairs, best first.
pub type QueryResults = (u32, Vec<(u32, f32)>);

/// One parsed line of a run file.
#[derive(Debug, Clone, PartialEq)]
pub struct RunLine {
    /// The query's string id.
    pub query_id: String,
    /// The document's string id.
    pub doc_id: String,
    /// Rank, from 1.
    pub rank: u32,
    /// Score, as f32.
    pub score: f32,
    /// Score as trec_eval reads it (a double): what the ranking is
    /// ordered by, so that scores equal in f32 but not in f64 do not tie.
    pub exact_score: f64,
    /// The run's tag.
    pub tag: String,
    /// The line's number in its file, from 1.
    pub line: usize,
}

/// Writes `run` as a TREC run file at `path` (atomically; see the module
/// docs), naming queries and documents by their ids in `ds`.
pub fn write_run(path: &Path, ds: &Dataset, run: &[QueryResults], tag: &str) -> Result<()> {
    write_atomically(path, |w| write_run_to(w, ds, run, tag))
        .with_context(|| format!("writing run file {}", path.display()))
}

/// Writes `qrels` as a TREC qrels file at `path` (atomically), naming
/// queries and documents by their ids in `ds`.
pub fn write_qrels(path: &Path, ds: &Dataset, qrels: &[Qrel]) -> Result<()> {
    write_atomically(path, |w| write_qrels_to(w, ds, qrels))
        .with_context(|| format!("writing qrels file {}", path.display()))
}

/// [`write_run`] into any writer.
pub fn write_run_to(mut w: impl Write, ds: &Dataset, run: &[QueryResults], tag: &str) -> Result<()> {
    check_field("tag", tag)?;
    for (query, hits) in run {
        let qid = query_id(ds, *query)?;
        for (rank, &(doc, score)) in (1u32..).zip(hits) {
            let did = doc_id(ds, doc)?;
            // trec_eval parses the score with atof; a NaN or infinity would
            // sort unpredictably there.
            ensure!(score.is_finite(), "query {qid}: document {did} has non-finite score {score}");
            writeln!(w, "{qid} Q0 {did} {rank} {score} {tag}")?;
        }
    }
    Ok(())
}

/// [`write_qrels`] into any writer.
pub fn write_qrels_to(mut w: impl Write, ds: &Dataset, qrels: &[Qrel]) -> Result<()> {
    for j in qrels {
        let qid = query_id(ds, j.query)?;
        let did = doc_id(ds, j.doc)?;
        writeln!(w, "{qid} 0 {did} {}", j.score)?;
    }
    Ok(())
}

/// Reads a run file written by [`write_run`] (or any whitespace-separated
/// six-column TREC run), gzip-compressed when its name ends in `.gz`.
pub fn read_run(path: &Path) -> Result<Vec<RunLine>> {
    let file = File::open(path).with_context(|| format!("opening run file {}", path.display()))?;
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let mut out = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(parse_run_line(&line, n + 1).with_context(|| format!("{}:{}", path.display(), n + 1))?);
    }
    Ok(out)
}

fn parse_run_line(line: &str, number: usize) -> Result<RunLine> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [qid, _q0, did, rank, score, tag] = fields.as_slice() else {
        bail!("expected 6 fields, found {}: {line:?}", fields.len());
    };
    Ok(RunLine {
        query_id: (*qid).to_owned(),
        doc_id: (*did).to_owned(),
        rank: rank.parse().with_context(|| format!("bad rank {rank:?}"))?,
        score: score.parse().with_context(|| format!("bad score {score:?}"))?,
        exact_score: score.parse().with_context(|| format!("bad score {score:?}"))?,
        tag: (*tag).to_owned(),
        line: number,
    })
}

/// The rankings a run file holds, under the evaluator's protocol: each
/// query's lines re-ordered as trec_eval orders them (the rank column is
/// ignored, as trec_eval ignores it), after dropping what the protocol
/// drops, cut at its depth.
///
/// # Errors
/// A query or document id the dataset does not have, a non-finite score, or
/// a document listed twice for one query, each naming `path` and the line.
pub fn rankings_of_run(path: &Path, lines: &[RunLine], ds: &Dataset, ev: &Evaluator) -> Result<HashMap<u32, Ranking>> {
    let queries: HashMap<&str, u32> = (0u32..).zip(&ds.queries).map(|(i, q)| (q.id.as_str(), i)).collect();
    let docs: HashMap<&str, u32> = (0u32..).zip(&ds.corpus).map(|(i, d)| (d.id.as_str(), i)).collect();
    let mut by_query: HashMap<u32, HashMap<u32, (f64, f32)>> = HashMap::new();
    for l in lines {
        let at = || format!("{}:{}", path.display(), l.line);
        let q = *queries
            .get(l.query_id.as_str())
            .with_context(|| format!("{}: unknown query id {:?}", at(), l.query_id))?;
        let d =
            *docs.get(l.doc_id.as_str()).with_context(|| format!("{}: unknown document id {:?}", at(), l.doc_id))?;
        ensure!(l.exact_score.is_finite(), "{}: score {} is not finite", at(), l.exact_score);
        if by_query.entry(q).or_default().insert(d, (l.exact_score, l.score)).is_some() {
            bail!("{}: document {:?} is listed twice for query {:?}", at(), l.doc_id, l.query_id);
        }
    }
    let depth = ev.protocol().depth;
    let rank = |q: u32, scored: HashMap<u32, (f64, f32)>| -> Ranking {
        let mut kept: Vec<(u32, f64, f32)> =
            scored.into_iter().filter(|&(d, _)| ev.admits(q, d)).map(|(d, (exact, s))| (d, exact, s)).collect();
        // trec_eval's order on the doubles: score down, then id down.
        kept.sort_by(|a, b| {
            b.1.total_cmp(&a.1)
                .then_with(|| ds.corpus[b.0 as usize].id.as_bytes().cmp(ds.corpus[a.0 as usize].id.as_bytes()))
        });
        kept.truncate(depth);
        kept.into_iter().map(|(d, _, s)| (d, s)).collect()
    };
    Ok(by_query.into_iter().map(|(q, scored)| (q, rank(q, scored))).collect())
}

fn query_id(ds: &Dataset, query: u32) -> Result<&str> {
    let q = ds
        .queries
        .get(query as usize)
        .with_context(|| format!("query index {query} out of range ({} queries)", ds.queries.len()))?;
    check_field("query id", &q.id)?;
    Ok(&q.id)
}

fn doc_id(ds: &Dataset, doc: u32) -> Result<&str> {
    let d = ds
        .corpus
        .get(doc as usize)
        .with_context(|| format!("document index {doc} out of range ({} documents)", ds.corpus.len()))?;
    check_field("document id", &d.id)?;
    Ok(&d.id)
}

/// A field of a space-separated line must be non-empty and whitespace-free.
fn check_field(what: &str, value: &str) -> Result<()> {
    ensure!(
        !value.is_empty() && !value.chars().any(char::is_whitespace),
        "{what} {value:?} is empty or contains whitespace"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Doc, Query};

    fn dataset() -> Dataset {
        let corpus = ["d1", "d2", "d3"]
            .iter()
            .map(|id| Doc { id: (*id).into(), title: String::new(), text: String::new() })
            .collect();
        let queries = ["q1", "q2"].iter().map(|id| Query { id: (*id).into(), text: String::new() }).collect();
        Dataset { corpus, queries, ..Dataset::default() }
    }

    #[test]
    fn run_round_trip() {
        let ds = dataset();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.trec");
        let run = vec![(1, vec![(2, 3.5), (0, 1.25)]), (0, vec![(1, 0.1)])];
        write_run(&path, &ds, &run, "bm25").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "q2 Q0 d3 1 3.5 bm25\nq2 Q0 d1 2 1.25 bm25\nq1 Q0 d2 1 0.1 bm25\n");
        let lines = read_run(&path).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[1],
            RunLine {
                query_id: "q2".into(),
                doc_id: "d1".into(),
                rank: 2,
                score: 1.25,
                exact_score: 1.25,
                tag: "bm25".into(),
                line: 2
            }
        );
        // The score survives the round trip exactly.
        assert_eq!(lines[2].score, 0.1f32);
        // Only the target file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn qrels_file() {
        let ds = dataset();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.qrels");
        let qrels = [Qrel { query: 0, doc: 2, score: 1 }, Qrel { query: 1, doc: 0, score: 0 }];
        write_qrels(&path, &ds, &qrels).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "q1 0 d3 1\nq2 0 d1 0\n");
    }

    #[test]
    fn failed_write_keeps_previous_file() {
        let ds = dataset();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.trec");
        write_run(&path, &ds, &[(0, vec![(0, 1.0)])], "ok").unwrap();
        // Out-of-range doc, bad tag, non-finite score: all rejected.
        assert!(write_run(&path, &ds, &[(0, vec![(0, 2.0), (7, 1.0)])], "x").is_err());
        assert!(write_run(&path, &ds, &[(0, vec![(0, 1.0)])], "two words").is_err());
        assert!(write_run(&path, &ds, &[(0, vec![(0, f32::NAN)])], "x").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "q1 Q0 d1 1 1 ok\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn run_scores_are_ordered_as_doubles() {
        // 1.00000001 and 1.00000002 are the same f32; as doubles (what
        // trec_eval reads) d1 is ahead of d3, although d3 would win a tie.
        let mut ds = dataset();
        ds.qrels.insert("test".into(), vec![Qrel { query: 0, doc: 0, score: 1 }]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.trec");
        std::fs::write(&path, "q1 Q0 d3 1 1.00000001 x\nq1 Q0 d1 2 1.00000002 x\n").unwrap();
        let lines = read_run(&path).unwrap();
        let ev =
            Evaluator::new(&ds, "test", crate::eval::Protocol { depth: 100, ..crate::eval::Protocol::BEIR }).unwrap();
        let r = rankings_of_run(&path, &lines, &ds, &ev).unwrap();
        assert_eq!(r[&0].iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 2]);
    }

    #[test]
    fn ids_with_spaces_are_rejected() {
        let mut ds = dataset();
        ds.corpus[0].id = "a b".into();
        assert!(write_run_to(Vec::new(), &ds, &[(0, vec![(0, 1.0)])], "t").is_err());
        assert!(write_qrels_to(Vec::new(), &ds, &[Qrel { query: 0, doc: 0, score: 1 }]).is_err());
    }
}
