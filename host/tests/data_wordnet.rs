//! Tests of the WordNet converter on a tiny hand-written database in the
//! `wndb(5WN)` format, and (when installed) on the real WordNet 3.0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use negcache_host::data::wordnet::{self, clean_gloss, ConvertStats, Task, WordNetError};
use negcache_host::data::Dataset;
use tempfile::TempDir;

// `concat!` rather than `\` continuations, which would strip the leading
// spaces that mark header lines.
const HEADER: &str = concat!(
    "  1 This software and database is being provided to you, the LICENSEE, by  \n",
    "  2 Princeton University under the following license.  \n",
    "  3   \n",
    "  4 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.  \n",
);

// Offsets need not be real byte offsets for the converter; they only have
// to be unique within a file and agree with the pointers.
const NOUNS: &str = "\
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 00004000 n 0000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)  \n\
00001930 03 n 01 physical_entity 0 002 @ 00001740 n 0000 ~ 00002452 n 0000 | an entity that has physical existence  \n\
00002137 03 n 02 abstraction 0 abstract_entity 0 001 @ 00001740 n 0000 | a general concept formed by extracting common features from specific examples; \"an example; with a semicolon inside\"- A. Writer  \n\
00002452 03 n 01 thing 0 001 @ 00001930 n 0000 | a separate and self-contained entity; a second definition; \"things fall apart\"; (`thingy' is informal)  \n\
00003000 18 n 01 Ada_Lovelace 0 002 @i 00003100 n 0000 @ 00001930 n 0000 | English mathematician; \"she wrote notes\"  \n\
00003100 18 n 01 mathematician 0 001 @ 00001930 n 0000 | a person skilled in mathematics  \n\
00004000 17 n 01 bank 0 001 @ 00001740 n 0000 | sloping land beside a body of water  \n\
00004100 14 n 01 bank 0 001 @ 00001740 n 0000 | a financial institution  \n\
00004200 17 n 01 riverbank 0 001 @ 00004000 n 0000 | the bank of a river  \n\
00004300 14 n 01 savings_bank 0 001 @ 00004100 n 0000 | a bank for savings  \n";

const VERBS: &str = "\
00001740 29 v 02 breathe 0 respire 0 000 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs; \"I can breathe better\"  \n\
00002325 29 v 01 sigh 0 001 @ 00001740 v 0000 01 + 02 00 | heave or utter a sigh; breathe deeply and heavily; \"She sighed sadly\"  \n";

const ADJECTIVES: &str = "\
00001740 00 a 01 able(p) 0 001 ! 00002098 a 0101 | (usually followed by `to') having the necessary means; \"able to swim\"  \n\
00002098 00 s 02 unable 0 galore(ip) 0 000 | not able  \n";

const ADVERBS: &str = "\
00001837 02 r 01 barely 0 000 | only just: \"barely enough\"  \n\
00001900 02 r 01 so 0 000 | \"an example and nothing else\"  \n";

/// Writes the sample database to a new temporary directory.
fn sample() -> TempDir {
    let dir = TempDir::new().expect("create a temporary directory");
    for (name, body) in [("data.noun", NOUNS), ("data.verb", VERBS), ("data.adj", ADJECTIVES), ("data.adv", ADVERBS)] {
        fs::write(dir.path().join(name), format!("{HEADER}{body}")).expect("write a sample data file");
    }
    dir
}

fn convert(dir: &Path, task: Task, seed: u64, fraction: f64) -> (Dataset, ConvertStats) {
    wordnet::convert(dir, task, seed, fraction).expect("the sample converts")
}

fn doc_text<'a>(ds: &'a Dataset, id: &str) -> &'a str {
    &ds.corpus[ds.doc_index[id] as usize].text
}

fn query_text<'a>(ds: &'a Dataset, id: &str) -> &'a str {
    &ds.queries[ds.query_index[id] as usize].text
}

/// All judgements as (query id, doc id) pairs, whatever the split.
fn pairs(ds: &Dataset) -> Vec<(String, String)> {
    let mut out: Vec<_> = ds
        .qrels
        .values()
        .flatten()
        .map(|q| (ds.queries[q.query as usize].id.clone(), ds.corpus[q.doc as usize].id.clone()))
        .collect();
    out.sort();
    out
}

/// The query ids of one split, sorted.
fn split_queries(ds: &Dataset, split: &str) -> Vec<String> {
    let mut ids: Vec<String> = ds.qrels[split].iter().map(|q| ds.queries[q.query as usize].id.clone()).collect();
    ids.sort();
    ids.dedup();
    ids
}

#[test]
fn glosses_lose_their_examples() {
    assert_eq!(
        clean_gloss("a tangible and visible entity; an entity that can cast a shadow; \"it was full of rackets, balls and other objects\""),
        "a tangible and visible entity; an entity that can cast a shadow"
    );
    assert_eq!(
        clean_gloss(
            "that which causes harm; \"the evil that men do lives after them; the good is oft interred\"- Shakespeare"
        ),
        "that which causes harm"
    );
    assert_eq!(
        clean_gloss(
            "in a satisfactory manner; \"she'll do okay\"; (`alright' is a nonstandard variant of `all right')"
        ),
        "in a satisfactory manner"
    );
    assert_eq!(clean_gloss("female of domestic cattle: \"`moo-cow' is a child's term\""), "female of domestic cattle");
    // Quotes inside the definition itself stay.
    assert_eq!(
        clean_gloss("significant progress (especially in the phrase \"make strides\"); \"they made big strides\""),
        "significant progress (especially in the phrase \"make strides\")"
    );
    assert_eq!(clean_gloss("a workplace; as in \"on the job\";"), "a workplace; as in \"on the job\"");
    assert_eq!(clean_gloss("\"only an example\""), "");
    assert_eq!(clean_gloss("  padded   "), "padded");
}

#[test]
fn hypernym_task_from_sample() {
    let dir = sample();
    let (ds, stats) = convert(dir.path(), Task::Hypernyms, 0, 0.3);

    // Queries: nouns and verbs with a hypernym, in file order.
    let query_ids: Vec<&str> = ds.queries.iter().map(|q| q.id.as_str()).collect();
    assert_eq!(
        query_ids,
        [
            "n:00001930",
            "n:00002137",
            "n:00002452",
            "n:00003000",
            "n:00003100",
            "n:00004000",
            "n:00004100",
            "n:00004200",
            "n:00004300",
            "v:00002325",
        ]
    );
    // Items: every hypernym target, in file order.
    let item_ids: Vec<&str> = ds.corpus.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(item_ids, ["n:00001740", "n:00001930", "n:00003100", "n:00004000", "n:00004100", "v:00001740"]);
    assert!(ds.corpus.iter().all(|d| d.title.is_empty()));

    // Text formatting: words (underscores as spaces), then the gloss
    // without examples, attributions or usage notes.
    assert_eq!(doc_text(&ds, "n:00001740"), "entity (noun)");
    assert_eq!(doc_text(&ds, "v:00001740"), "breathe, respire (verb)");
    assert_eq!(
        query_text(&ds, "n:00002137"),
        "abstraction, abstract entity; a general concept formed by extracting common features from specific examples"
    );
    assert_eq!(query_text(&ds, "n:00002452"), "thing; a separate and self-contained entity; a second definition");
    assert_eq!(query_text(&ds, "n:00003000"), "Ada Lovelace; English mathematician");
    assert_eq!(query_text(&ds, "v:00002325"), "sigh; heave or utter a sigh; breathe deeply and heavily");

    // Positives: @ and @i alike.
    let expected: Vec<(String, String)> = [
        ("n:00001930", "n:00001740"),
        ("n:00002137", "n:00001740"),
        ("n:00002452", "n:00001930"),
        ("n:00003000", "n:00001930"),
        ("n:00003000", "n:00003100"),
        ("n:00003100", "n:00001930"),
        ("n:00004000", "n:00001740"),
        ("n:00004100", "n:00001740"),
        ("n:00004200", "n:00004000"),
        ("n:00004300", "n:00004100"),
        ("v:00002325", "v:00001740"),
    ]
    .iter()
    .map(|(q, d)| (q.to_string(), d.to_string()))
    .collect();
    assert_eq!(pairs(&ds), expected);
    assert!(ds.qrels.values().flatten().all(|q| q.score == 1));

    // Splits: round(10 * 0.3) = 3 test queries, disjoint from train, and
    // every query in exactly one split.
    let train = split_queries(&ds, "train");
    let test = split_queries(&ds, "test");
    assert_eq!(test.len(), 3);
    assert_eq!(train.len(), 7);
    assert!(test.iter().all(|q| !train.contains(q)));

    assert_eq!(stats.queries, 10);
    assert_eq!(stats.items, 6);
    assert_eq!(stats.synsets, 16);
    assert_eq!(stats.test_queries, 3);
    assert_eq!(stats.train_queries, 7);
    assert_eq!(stats.train_qrels + stats.test_qrels, 11);
    assert_eq!(stats.train_qrels, ds.qrels["train"].len());
    // The two "bank" synsets render alike.
    assert_eq!(stats.identical_text_items, 1);
    let summary = stats.to_string();
    assert!(summary.contains("10 queries") && summary.contains("scores them as distinct items"), "{summary}");
}

#[test]
fn identical_texts_group_to_the_first() {
    let dir = sample();
    let (ds, _) = convert(dir.path(), Task::Hypernyms, 0, 0.1);
    let groups = ds.duplicate_text_groups();
    assert_eq!(groups.len(), ds.corpus.len());
    let first = ds.doc_index["n:00004000"];
    let second = ds.doc_index["n:00004100"];
    assert_eq!(groups[&first], first);
    assert_eq!(groups[&second], first);
    let entity = ds.doc_index["n:00001740"];
    assert_eq!(groups[&entity], entity);
}

#[test]
fn reverse_dictionary_from_sample() {
    let dir = sample();
    let (ds, stats) = convert(dir.path(), Task::ReverseDictionary, 0, 0.25);
    // Every synset is an item; adjective markers are gone and satellites
    // read as adjectives.
    assert_eq!(ds.corpus.len(), 16);
    assert_eq!(doc_text(&ds, "a:00001740"), "able (adjective)");
    assert_eq!(doc_text(&ds, "s:00002098"), "unable, galore (adjective)");
    assert_eq!(doc_text(&ds, "r:00001837"), "barely (adverb)");
    // The adverb "so" has only an example as gloss, so it gives no query.
    assert_eq!(stats.skipped_empty_gloss, 1);
    assert_eq!(ds.queries.len(), 15);
    assert!(!ds.query_index.contains_key("r:00001900"));
    assert_eq!(query_text(&ds, "r:00001837"), "only just");
    assert_eq!(query_text(&ds, "a:00001740"), "(usually followed by `to') having the necessary means");
    // Each gloss judges exactly its own synset.
    let all = pairs(&ds);
    assert_eq!(all.len(), 15);
    assert!(all.iter().all(|(q, d)| q == d));
    // round(15 * 0.25) = 4 test queries; by construction a test item is
    // never a training positive.
    assert_eq!(stats.test_queries, 4);
    assert_eq!(ds.qrels["test"].len(), 4);
    let train_docs: Vec<u32> = ds.qrels["train"].iter().map(|q| q.doc).collect();
    assert!(ds.qrels["test"].iter().all(|q| !train_docs.contains(&q.doc)));
    assert_eq!(stats.identical_text_items, 1);
}

#[test]
fn same_seed_same_dataset_other_seed_other_split() {
    let dir = sample();
    for task in [Task::Hypernyms, Task::ReverseDictionary] {
        let (a, sa) = convert(dir.path(), task, 7, 0.3);
        let (b, sb) = convert(dir.path(), task, 7, 0.3);
        assert_eq!(a.corpus, b.corpus);
        assert_eq!(a.queries, b.queries);
        assert_eq!(a.qrels, b.qrels);
        assert_eq!(sa, sb);
        // Some other seed must split differently (any single seed could
        // coincide by chance with so few queries; ten cannot plausibly).
        let reference = split_queries(&a, "test");
        let differs = (0..10)
            .filter(|&seed| seed != 7)
            .any(|seed| split_queries(&convert(dir.path(), task, seed, 0.3).0, "test") != reference);
        assert!(differs, "{task}: every seed gave the same split");
    }
}

#[test]
fn extreme_fractions() {
    let dir = sample();
    let (ds, stats) = convert(dir.path(), Task::Hypernyms, 0, 0.0);
    assert!(ds.qrels["test"].is_empty());
    assert_eq!(stats.train_queries, 10);
    let (ds, _) = convert(dir.path(), Task::Hypernyms, 0, 1.0);
    assert!(ds.qrels["train"].is_empty());
    for bad in [-0.1, 1.5, f64::NAN] {
        let err = wordnet::convert(dir.path(), Task::Hypernyms, 0, bad).unwrap_err();
        assert!(matches!(err, WordNetError::BadTestFraction(_)), "{err}");
    }
}

#[test]
fn license_comes_from_the_header() {
    let dir = sample();
    let text = wordnet::license_text(dir.path()).unwrap();
    assert!(text.starts_with("This software and database is being provided"), "{text}");
    assert!(text.contains("\n\nWordNet 3.0 Copyright 2006 by Princeton University."));
    // Line numbers and the trailing spaces are gone.
    assert!(!text.contains("  \n") && !text.contains("\n4 "), "{text:?}");
}

#[test]
fn malformed_line_names_file_and_line() {
    let dir = sample();
    let broken = format!("{HEADER}{VERBS}00003000 29 v 01 run 0 00x | go fast\n");
    fs::write(dir.path().join("data.verb"), broken).unwrap();
    let message = wordnet::convert(dir.path(), Task::Hypernyms, 0, 0.1).unwrap_err().to_string();
    assert!(message.contains("data.verb") && message.contains("line 7") && message.contains("p_cnt"), "{message}");
}

#[test]
fn dangling_hypernym_is_an_error() {
    let dir = sample();
    let broken = format!("{HEADER}{NOUNS}00005000 03 n 01 orphan 0 001 @ 09999999 n 0000 | lost  \n");
    fs::write(dir.path().join("data.noun"), broken).unwrap();
    let message = wordnet::convert(dir.path(), Task::Hypernyms, 0, 0.1).unwrap_err().to_string();
    assert!(
        message.contains("data.noun") && message.contains("line 15") && message.contains("n:09999999"),
        "{message}"
    );
}

#[test]
fn missing_data_file() {
    let dir = sample();
    fs::remove_file(dir.path().join("data.adv")).unwrap();
    let message = wordnet::convert(dir.path(), Task::Hypernyms, 0, 0.1).unwrap_err().to_string();
    assert!(message.contains("data.adv"), "{message}");
}

#[test]
fn task_names_parse() {
    assert_eq!("hypernyms".parse::<Task>().unwrap(), Task::Hypernyms);
    assert_eq!("revdict".parse::<Task>().unwrap(), Task::ReverseDictionary);
    assert_eq!(Task::default(), Task::Hypernyms);
    assert!("synonyms".parse::<Task>().is_err());
}

const SYSTEM_WORDNET: &str = "/usr/share/wordnet";

#[test]
fn converts_the_installed_wordnet() {
    let dir = Path::new(SYSTEM_WORDNET);
    if !dir.join("data.noun").is_file() {
        println!("skipped: no WordNet at {SYSTEM_WORDNET} (install Debian's wordnet-base)");
        return;
    }
    let (ds, stats) = convert(dir, Task::Hypernyms, 0, 0.1);
    println!("{stats}");
    assert!((15_000..=30_000).contains(&stats.items), "{} items", stats.items);
    assert!((80_000..=110_000).contains(&stats.queries), "{} queries", stats.queries);
    assert_eq!(stats.synsets, 117_659, "WordNet 3.0 has 117,659 synsets");
    // Ten per cent of the queries, rounded.
    assert_eq!(stats.test_queries, (stats.queries as f64 * 0.1).round() as usize);
    let test_share = stats.test_qrels as f64 / (stats.train_qrels + stats.test_qrels) as f64;
    assert!((0.08..0.12).contains(&test_share), "{test_share}");
    assert_eq!(doc_text(&ds, "n:00001740"), "entity (noun)");
    assert_eq!(query_text(&ds, "n:00001930"), "physical entity; an entity that has physical existence");
    // No example survives in any query.
    assert!(ds.queries.iter().all(|q| !q.text.contains("; \"")));

    let (ds, stats) = convert(dir, Task::ReverseDictionary, 0, 0.1);
    println!("{stats}");
    assert_eq!(stats.items, 117_659);
    assert_eq!(stats.queries + stats.skipped_empty_gloss, 117_659);
    assert!(ds.queries.iter().all(|q| !q.text.is_empty()));
    let per_query: HashMap<u32, usize> = ds.qrels.values().flatten().fold(HashMap::new(), |mut m, q| {
        *m.entry(q.query).or_default() += 1;
        m
    });
    assert!(per_query.values().all(|&n| n == 1));
}
