//! Metrics logs: both formats round-trip, and a run that dies keeps its rows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::Command;

use negcache_host::report::{column_points, read_series, LogFormat, MetricsLog, Row};

const COLUMNS: &[&str] =
    &["training_loss", "interpretable_loss", "staleness", "prob_pos", "recall_at_10", "mrr_at_10", "steps_per_s"];

/// Step, wall-clock seconds and metrics of one row.
type SampleRow = (u64, f64, Vec<(&'static str, f64)>);

/// Rows exercising missing values, awkward magnitudes and non-finite values.
fn sample_rows() -> Vec<SampleRow> {
    vec![
        (0, 0.0, vec![("training_loss", 4.25), ("interpretable_loss", 4.5), ("prob_pos", 0.1)]),
        (100, 1.5, vec![("training_loss", 0.1 + 0.2), ("staleness", 1e-300), ("steps_per_s", 66.666_666_666_666_67)]),
        (200, 3.25, vec![("recall_at_10", 0.3125), ("mrr_at_10", 0.2)]),
        (
            300,
            4.75,
            vec![("training_loss", f64::NAN), ("interpretable_loss", f64::INFINITY), ("staleness", -f64::INFINITY)],
        ),
        (400, 6.0, vec![]),
        (u64::MAX, 1e9, vec![("training_loss", -0.0), ("prob_pos", 1.0e20)]),
    ]
}

fn write_sample(path: &Path) {
    let mut log = MetricsLog::create(path, COLUMNS).unwrap();
    for (step, wall, values) in sample_rows() {
        log.log_at(step, wall, &values).unwrap();
    }
    log.close().unwrap();
}

/// Compares bit for bit, so that NaN equals NaN and -0.0 differs from 0.0.
fn assert_same(rows: &[Row]) {
    let expected = sample_rows();
    assert_eq!(rows.len(), expected.len());
    for (row, (step, wall, values)) in rows.iter().zip(expected) {
        assert_eq!(row.step, step);
        assert_eq!(row.wall_s.to_bits(), wall.to_bits());
        assert_eq!(row.values.len(), values.len(), "row {step}: {:?}", row.values);
        for (name, value) in values {
            assert_eq!(row.get(name).map(f64::to_bits), Some(value.to_bits()), "row {step}, {name}");
        }
    }
}

#[test]
fn csv_round_trips_with_fixed_columns_and_empty_missing_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.csv");
    write_sample(&path);

    let text = fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "step,wall_s,training_loss,interpretable_loss,staleness,prob_pos,recall_at_10,mrr_at_10,steps_per_s"
    );
    assert_eq!(lines[1], "0,0.0,4.25,4.5,,0.1,,,");
    assert_eq!(lines[5], "400,6.0,,,,,,,");
    assert!(lines[4].contains("NaN,inf,-inf"), "{}", lines[4]);
    assert!(text.ends_with('\n'));

    assert_same(&read_series(&path).unwrap());
}

#[test]
fn jsonl_round_trips_and_omits_missing_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    write_sample(&path);

    let text = fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Keys follow the column order given at creation.
    assert_eq!(lines[0], r#"{"step":0,"wall_s":0.0,"training_loss":4.25,"interpretable_loss":4.5,"prob_pos":0.1}"#);
    assert_eq!(lines[4], r#"{"step":400,"wall_s":6.0}"#);
    assert!(lines[3].contains(r#""training_loss":"NaN","interpretable_loss":"inf","staleness":"-inf""#));
    for line in &lines {
        serde_json::from_str::<serde_json::Value>(line).expect("every line is valid JSON");
    }

    assert_same(&read_series(&path).unwrap());
}

#[test]
fn log_stamps_nondecreasing_wall_clock_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/run/metrics.csv");
    let mut log = MetricsLog::create(&path, &["training_loss"]).unwrap();
    assert_eq!(log.format(), LogFormat::Csv);
    assert_eq!(log.columns(), ["training_loss"]);
    for step in 0..5 {
        log.log(step, &[("training_loss", 1.0 / (step + 1) as f64)]).unwrap();
    }
    drop(log);

    let rows = read_series(&path).unwrap();
    assert_eq!(rows.len(), 5);
    assert!(rows[0].wall_s >= 0.0);
    assert!(rows.windows(2).all(|w| w[0].wall_s <= w[1].wall_s));
    assert_eq!(column_points(&rows, "training_loss")[2], (2.0, 1.0 / 3.0));
}

#[test]
fn column_points_skip_rows_without_the_metric() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    write_sample(&path);
    let rows = read_series(&path).unwrap();
    assert_eq!(column_points(&rows, "recall_at_10"), vec![(200.0, 0.3125)]);
    assert!(column_points(&rows, "no_such_metric").is_empty());
}

#[test]
fn dropped_log_keeps_every_row_and_a_live_log_can_be_read() {
    for name in ["metrics.csv", "metrics.jsonl"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        let mut log = MetricsLog::create(&path, COLUMNS).unwrap();
        for step in 0..3 {
            log.log_at(step, step as f64, &[("training_loss", 2.0 - step as f64)]).unwrap();
        }
        // Readable while the run is still going ...
        assert_eq!(read_series(&path).unwrap().len(), 3, "{name}");
        log.log_at(3, 3.0, &[("recall_at_10", 0.5)]).unwrap();
        // ... and after the log is abandoned without close() or even its
        // destructor, as when a process is killed.
        std::mem::forget(log);
        let rows = read_series(&path).unwrap();
        assert_eq!(rows.len(), 4, "{name}");
        assert_eq!(rows[2].get("training_loss"), Some(0.0));
        assert_eq!(rows[3].get("recall_at_10"), Some(0.5));
    }
}

/// Exit status of the child in `killed_process_keeps_its_rows`.
const KILLED: i32 = 86;

/// Run as a child process by `killed_process_keeps_its_rows`; does nothing
/// on its own.
#[test]
fn child_logs_then_exits() {
    let Some(path) = std::env::var_os("NEGCACHE_TEST_ABORT_LOG") else { return };
    let mut log = MetricsLog::create(Path::new(&path), &["training_loss"]).unwrap();
    for step in 0..10 {
        log.log(step, &[("training_loss", step as f64)]).unwrap();
    }
    // Exits without running a destructor, as a killed process would (abort
    // would do too, but may leave a core dump behind).
    std::process::exit(KILLED);
}

#[test]
fn killed_process_keeps_its_rows() {
    for name in ["metrics.csv", "metrics.jsonl"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        let status = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_logs_then_exits", "--test-threads=1", "--quiet"])
            .env("NEGCACHE_TEST_ABORT_LOG", &path)
            .output()
            .unwrap()
            .status;
        assert_eq!(status.code(), Some(KILLED), "the child did not get to its exit");
        let rows = read_series(&path).unwrap();
        assert_eq!(rows.len(), 10, "{name}");
        assert_eq!(rows[9].get("training_loss"), Some(9.0));
    }
}

#[test]
fn torn_final_line_is_dropped_but_damage_elsewhere_is_an_error() {
    let dir = tempfile::tempdir().unwrap();

    let csv = dir.path().join("torn.csv");
    fs::write(&csv, "step,wall_s,loss\n0,0.0,1.5\n1,0.5,1.25\n2,1.0").unwrap();
    assert_eq!(read_series(&csv).unwrap().len(), 2);

    let jsonl = dir.path().join("torn.jsonl");
    fs::write(&jsonl, "{\"step\":0,\"wall_s\":0.0,\"loss\":1.5}\n{\"step\":1,\"wall_s\":0.5,\"lo").unwrap();
    assert_eq!(read_series(&jsonl).unwrap().len(), 1);

    // A complete final line without its newline is kept.
    let unterminated = dir.path().join("unterminated.jsonl");
    fs::write(&unterminated, "{\"step\":0,\"wall_s\":0.0,\"loss\":1.5}").unwrap();
    assert_eq!(read_series(&unterminated).unwrap()[0].get("loss"), Some(1.5));

    let damaged = dir.path().join("damaged.csv");
    fs::write(&damaged, "step,wall_s,loss\n0,0.0\n1,0.5,1.25\n").unwrap();
    let err = format!("{:#}", read_series(&damaged).unwrap_err());
    assert!(err.contains("line 2"), "{err}");

    let no_step = dir.path().join("no_step.jsonl");
    fs::write(&no_step, "{\"wall_s\":0.0,\"loss\":1.5}\n").unwrap();
    assert!(read_series(&no_step).is_err());
}

#[test]
fn null_reads_as_nan_for_other_writers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pandas.jsonl");
    fs::write(&path, "{\"loss\":null,\"wall_s\":1,\"step\":7}\n\n").unwrap();
    let rows = read_series(&path).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].step, rows[0].wall_s), (7, 1.0));
    assert!(rows[0].get("loss").unwrap().is_nan());
}

#[test]
fn invalid_use_is_an_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    assert!(MetricsLog::create(&dir.path().join("metrics.txt"), COLUMNS).is_err());
    assert!(read_series(&dir.path().join("metrics.tsv")).is_err());
    for bad in [&["a", "a"][..], &["step"], &["wall_s"], &[""], &["a,b"], &["say \"hi\""], &["tab\there"]] {
        assert!(MetricsLog::create(&dir.path().join("bad.csv"), bad).is_err(), "{bad:?}");
    }

    let path = dir.path().join("metrics.csv");
    let mut log = MetricsLog::create(&path, &["loss"]).unwrap();
    assert!(log.log(0, &[("lost", 1.0)]).is_err());
    assert!(log.log(0, &[("loss", 1.0), ("loss", 2.0)]).is_err());
    log.log(1, &[("loss", 3.0)]).unwrap();
    log.close().unwrap();
    let rows = read_series(&path).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].step, 1);
}

#[test]
fn extension_is_case_insensitive_and_create_truncates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("METRICS.JSONL");
    let mut log = MetricsLog::create(&path, &["loss"]).unwrap();
    log.log_at(0, 0.0, &[("loss", 1.0)]).unwrap();
    log.close().unwrap();
    let log = MetricsLog::create(&path, &["loss"]).unwrap();
    assert_eq!(log.format(), LogFormat::Jsonl);
    log.close().unwrap();
    assert!(read_series(&path).unwrap().is_empty());
}

#[cfg(unix)]
#[test]
fn reopening_rewrites_atomically_and_refuses_an_unreadable_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.csv");
    let mut log = MetricsLog::create(&path, &["training_loss"]).unwrap();
    for step in [100, 200, 300] {
        log.log_at(step, step as f64 / 100.0, &[("training_loss", 1.0 / step as f64)]).unwrap();
    }
    drop(log);
    // A row torn by a kill, then a reopen keeping the rows up to step 200.
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str("400,4.0,0.0");
    fs::write(&path, &text).unwrap();
    let inode = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(p).unwrap().ino()
    };
    let before = inode(&path);
    let mut log = MetricsLog::reopen_keeping(&path, &["training_loss"], &|r: &Row| r.step <= 200).unwrap();
    log.log_at(250, 2.5, &[("training_loss", 0.5)]).unwrap();
    log.close().unwrap();
    // Replaced by a rename (a new file), not rewritten in place.
    assert_ne!(inode(&path), before);
    let steps: Vec<u64> = read_series(&path).unwrap().iter().map(|r| r.step).collect();
    assert_eq!(steps, [100, 200, 250]);
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["metrics.csv"], "a temporary file was left");
    // A log that cannot be read is named and left as it is.
    fs::write(&path, "this,is\n1,2\n").unwrap();
    let e = format!("{:#}", MetricsLog::reopen_keeping(&path, &["training_loss"], &|_: &Row| true).unwrap_err());
    assert!(e.contains("metrics.csv") && e.contains("line 1") && e.contains("\"step\""), "{e}");
    assert_eq!(fs::read_to_string(&path).unwrap(), "this,is\n1,2\n");
}
