//! Charts: both files are written, complete, and replaced atomically.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;

use negcache_host::report::{line_chart, png_font, Series};

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

fn curves() -> Vec<Series> {
    let cache = (0..=100).map(|i| (i as f64 * 10.0, 0.4 - 0.3 * (-(i as f64) / 25.0).exp())).collect();
    let in_batch = (0..=100).map(|i| (i as f64 * 10.0, 0.35 - 0.25 * (-(i as f64) / 20.0).exp())).collect();
    vec![Series::new("negative cache", cache), Series::new("in-batch & co", in_batch)]
}

fn baselines() -> Vec<(String, f64)> {
    vec![("BM25".to_owned(), 0.3251), ("popularity".to_owned(), 0.1123)]
}

fn assert_png(path: &Path) {
    let bytes = fs::read(path).unwrap();
    assert_eq!(bytes[..8], PNG_SIGNATURE, "{} is not a PNG", path.display());
    assert!(bytes.len() > 1024, "{} is only {} bytes", path.display(), bytes.len());
    // The IHDR chunk follows the signature: width and height, big-endian.
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), negcache_host::report::CHART_SIZE);
}

#[test]
fn writes_an_svg_and_a_png_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("recall_at_10");
    line_chart(&stem, "Recall@10 on the test split", "step", "Recall@10", &curves(), &baselines()).unwrap();

    let svg = fs::read_to_string(dir.path().join("recall_at_10.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    for text in
        ["Recall@10 on the test split", "negative cache", "in-batch &amp; co", "BM25 (0.3251)", "popularity (0.1123)"]
    {
        assert!(svg.contains(text), "the SVG lacks {text:?}");
    }
    // Reference lines are dashed, i.e. drawn as many short segments: BM25's
    // (the third colour, after the two curves) spans the plot in dashes.
    assert!(svg.matches(r##"stroke="#2CA02C""##).count() > 20);
    assert_png(&dir.path().join("recall_at_10.png"));

    // The temporary files were renamed into place, not left behind.
    let mut names: Vec<String> =
        fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["recall_at_10.png", "recall_at_10.svg"]);
}

#[test]
fn replaces_an_existing_chart_and_keeps_dots_in_the_stem() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("runs/lr0.1/loss");
    line_chart(&stem, "first", "step", "loss", &curves(), &[]).unwrap();
    line_chart(&stem, "second", "step", "loss", &curves()[..1], &[]).unwrap();
    let svg = fs::read_to_string(dir.path().join("runs/lr0.1/loss.svg")).unwrap();
    assert!(svg.contains("second") && !svg.contains("first"));
    assert!(!svg.contains("in-batch"));
    assert_png(&dir.path().join("runs/lr0.1/loss.png"));
}

#[test]
fn degenerate_data_still_yields_a_chart() {
    let dir = tempfile::tempdir().unwrap();
    let awkward = [
        Series::new("empty", vec![]),
        Series::new("single point", vec![(5.0, 2.0)]),
        Series::new("diverged", vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, f64::INFINITY), (3.0, 0.5)]),
    ];
    let refs = [("undefined".to_owned(), f64::NAN)];
    line_chart(&dir.path().join("awkward"), "", "x", "y", &awkward, &refs).unwrap();
    let svg = fs::read_to_string(dir.path().join("awkward.svg")).unwrap();
    assert!(svg.contains("diverged") && svg.contains("undefined (NaN)"));
    assert_png(&dir.path().join("awkward.png"));

    line_chart(&dir.path().join("nothing"), "Nothing yet", "step", "loss", &[], &[]).unwrap();
    assert_png(&dir.path().join("nothing.png"));
}

#[test]
fn the_reported_font_exists() {
    // Without any font the charts are still written (see the module docs);
    // with one, it is a real file.
    if let Some(path) = png_font() {
        assert!(path.is_file(), "{}", path.display());
    }
}
