//! Runs reference-case files (`shared/spec/reference-cases.md`, format
//! `negcache-reference-v1`, plus the `softmax_loss` kind documented in
//! `fixtures/reference/softmax_loss.md`) against the core.
//!
//! Every case is reported as passed, failed (with its largest deviation) or
//! malformed (with the field and the shape that was expected); a case is
//! never skipped silently.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context};
use negcache::cache::Update;
use negcache::loss::{CacheLoss, LossConfig, LossGrads, TopKOut};
use negcache::softmax::{self, SoftmaxOut};
use negcache::stats::chi_square;
use negcache::{Eviction, Retrieval};
use rand_core::SeedableRng;
use serde_json::Value;

use crate::store::OwnedCache;

/// The format tag a reference file must carry.
pub const FORMAT: &str = "negcache-reference-v1";

/// How a case ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every checked value was within tolerance.
    Pass,
    /// Some value was not; the text names the first such field.
    Fail(String),
    /// The case could not be run: the text says which field and why.
    Malformed(String),
}

/// One case's result.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseResult {
    /// The case's name (or `#index` when it has none).
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// Pass, fail or malformed.
    pub outcome: Outcome,
    /// The largest |got - want| over every checked number (for
    /// `gumbel_distribution`, the smallest chi-square p-value instead).
    pub max_deviation: f64,
    /// The field where the largest deviation occurred.
    pub worst_field: String,
}

impl CaseResult {
    /// Whether the case passed.
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Pass
    }
}

/// Reads and runs a reference file. Errors only when the file as a whole is
/// unusable (unreadable, not JSON, wrong format tag, no `cases` array);
/// problems within a case are reported in its result.
pub fn run_file(path: &Path) -> anyhow::Result<Vec<CaseResult>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let root: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let format = root.get("format").and_then(Value::as_str);
    if format != Some(FORMAT) {
        bail!("{}: field `format` must be \"{FORMAT}\", found {}", path.display(), describe(root.get("format")));
    }
    let Some(cases) = root.get("cases").and_then(Value::as_array) else {
        bail!("{}: field `cases` must be an array of cases, found {}", path.display(), describe(root.get("cases")));
    };
    if cases.is_empty() {
        bail!("{}: field `cases` is empty: a reference file must hold at least one case", path.display());
    }
    let mut seen = std::collections::HashSet::new();
    let mut results = Vec::with_capacity(cases.len());
    for (i, case) in cases.iter().enumerate() {
        let name = case.get("name").and_then(Value::as_str).map_or_else(|| format!("#{i}"), str::to_owned);
        let kind = case.get("kind").and_then(Value::as_str).unwrap_or("?").to_owned();
        let outcome = if !seen.insert(name.clone()) {
            Err(Bad(format!("case #{i}: name `{name}` is used by an earlier case")))
        } else {
            run_case(case)
        };
        results.push(match outcome {
            Ok(check) => CaseResult {
                name,
                kind,
                outcome: match check.failure {
                    None => Outcome::Pass,
                    Some(f) => Outcome::Fail(f),
                },
                max_deviation: check.max_dev,
                worst_field: check.worst,
            },
            Err(Bad(why)) => CaseResult {
                name,
                kind,
                outcome: Outcome::Malformed(why),
                max_deviation: f64::NAN,
                worst_field: String::new(),
            },
        });
    }
    Ok(results)
}

/// Formats results as a table with a closing count.
pub fn table(results: &[CaseResult]) -> String {
    let w = results.iter().map(|r| r.name.len()).max().unwrap_or(4).clamp(4, 48);
    let mut s = String::new();
    let _ = writeln!(s, "{:<w$}  {:<19}  {:<9}  {:>12}  field", "case", "kind", "result", "max dev");
    for r in results {
        let (res, note) = match &r.outcome {
            Outcome::Pass => ("pass", String::new()),
            Outcome::Fail(f) => ("FAIL", format!("  <- {f}")),
            Outcome::Malformed(m) => ("MALFORMED", format!("  <- {m}")),
        };
        let dev = if r.max_deviation.is_nan() { "-".to_owned() } else { format!("{:.3e}", r.max_deviation) };
        let _ = writeln!(s, "{:<w$}  {:<19}  {:<9}  {:>12}  {}{}", r.name, r.kind, res, dev, r.worst_field, note);
    }
    s
}

/// A reason a case is malformed.
#[derive(Debug)]
struct Bad(String);

type Parse<T> = Result<T, Bad>;

/// Accumulates comparisons of computed against expected values.
struct Check {
    abs: f64,
    rel: f64,
    max_dev: f64,
    worst: String,
    failure: Option<String>,
}

impl Check {
    fn new(case: &Value) -> Parse<Self> {
        let (mut abs, mut rel) = (1e-5, 1e-4);
        if let Some(t) = case.get("tolerance").filter(|t| !t.is_null()) {
            if let Some(a) = t.get("abs").filter(|v| !v.is_null()) {
                abs = a.as_f64().ok_or_else(|| Bad("tolerance.abs: expected a number".into()))?;
            }
            if let Some(r) = t.get("rel").filter(|v| !v.is_null()) {
                rel = r.as_f64().ok_or_else(|| Bad("tolerance.rel: expected a number".into()))?;
            }
        }
        Ok(Self { abs, rel, max_dev: 0.0, worst: String::new(), failure: None })
    }

    /// Compares numbers; `got` and `want` must have equal length (the
    /// caller checks shapes against the inputs first).
    fn numbers(&mut self, field: &str, got: &[f64], want: &[f64]) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let dev = if g == w { 0.0 } else { (g - w).abs() };
            let dev = if dev.is_nan() { f64::INFINITY } else { dev };
            if self.worst.is_empty() || dev > self.max_dev {
                self.max_dev = dev;
                self.worst = field.to_owned();
            }
            let allowed = self.abs + self.rel * w.abs();
            let within =
                matches!(dev.partial_cmp(&allowed), Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal));
            if !within && self.failure.is_none() {
                self.failure = Some(format!("{field}[{i}]: got {g}, want {w}"));
            }
        }
    }

    fn integers(&mut self, field: &str, got: &[i64], want: &[i64]) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            if g != w && self.failure.is_none() {
                self.failure = Some(format!("{field}[{i}]: got {g}, want {w}"));
                self.worst = field.to_owned();
            }
        }
    }
}

fn describe(v: Option<&Value>) -> String {
    match v {
        None => "nothing (the field is missing)".into(),
        Some(Value::Null) => "null".into(),
        Some(Value::Bool(_)) => "a boolean".into(),
        Some(Value::Number(n)) => format!("the number {n}"),
        Some(Value::String(s)) => format!("the string {s:?}"),
        Some(Value::Array(a)) => format!("an array of {}", a.len()),
        Some(Value::Object(_)) => "an object".into(),
    }
}

/// Field access with the dotted path kept for messages; every field looked
/// at is recorded in `used`, so that fields nothing looked at (misspelled,
/// or not part of the case's kind) are reported instead of ignored.
#[derive(Clone, Copy)]
struct Obj<'a> {
    v: &'a Value,
    path: &'a str,
    used: &'a Used,
}

/// The dotted paths of the fields a case's runner looked at.
type Used = std::cell::RefCell<std::collections::HashSet<String>>;

impl<'a> Obj<'a> {
    fn at(&self, v: &'a Value, path: &'a str) -> Obj<'a> {
        Obj { v, path, used: self.used }
    }
    fn field(&self, name: &str) -> Option<&'a Value> {
        self.used.borrow_mut().insert(self.path(name));
        self.v.get(name).filter(|v| !v.is_null())
    }
    fn path(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        }
    }
    fn required(&self, name: &str, what: &str) -> Parse<&'a Value> {
        self.field(name).ok_or_else(|| Bad(format!("{}: missing; expected {what}", self.path(name))))
    }
    fn number(&self, name: &str) -> Parse<f64> {
        let v = self.required(name, "a number")?;
        v.as_f64().ok_or_else(|| Bad(format!("{}: expected a number, found {}", self.path(name), describe(Some(v)))))
    }
    fn opt_number(&self, name: &str) -> Parse<Option<f64>> {
        self.field(name).map(|_| self.number(name)).transpose()
    }
    fn int(&self, name: &str) -> Parse<i64> {
        let v = self.required(name, "an integer")?;
        v.as_i64().ok_or_else(|| Bad(format!("{}: expected an integer, found {}", self.path(name), describe(Some(v)))))
    }
    fn opt_int(&self, name: &str) -> Parse<Option<i64>> {
        self.field(name).map(|_| self.int(name)).transpose()
    }
    fn boolean(&self, name: &str) -> Parse<bool> {
        let v = self.required(name, "a boolean")?;
        v.as_bool().ok_or_else(|| Bad(format!("{}: expected a boolean, found {}", self.path(name), describe(Some(v)))))
    }
    fn string(&self, name: &str) -> Parse<&'a str> {
        let v = self.required(name, "a string")?;
        v.as_str().ok_or_else(|| Bad(format!("{}: expected a string, found {}", self.path(name), describe(Some(v)))))
    }
    /// A vector of numbers of length `len` (any length when `None`).
    fn vector(&self, name: &str, len: Option<usize>) -> Parse<Vec<f64>> {
        let v = self.required(name, "an array of numbers")?;
        array_of(v, &self.path(name), len, |x| x.as_f64(), "numbers")
    }
    fn opt_vector(&self, name: &str, len: Option<usize>) -> Parse<Option<Vec<f64>>> {
        self.field(name).map(|_| self.vector(name, len)).transpose()
    }
    fn ints(&self, name: &str, len: Option<usize>) -> Parse<Vec<i64>> {
        let v = self.required(name, "an array of integers")?;
        array_of(v, &self.path(name), len, |x| x.as_i64(), "integers")
    }
    fn opt_ints(&self, name: &str, len: Option<usize>) -> Parse<Option<Vec<i64>>> {
        self.field(name).map(|_| self.ints(name, len)).transpose()
    }
    fn bools(&self, name: &str, len: Option<usize>) -> Parse<Vec<bool>> {
        let v = self.required(name, "an array of booleans")?;
        array_of(v, &self.path(name), len, |x| x.as_bool(), "booleans")
    }
    fn opt_bools(&self, name: &str, len: Option<usize>) -> Parse<Option<Vec<bool>>> {
        self.field(name).map(|_| self.bools(name, len)).transpose()
    }
    /// A `rows x cols` matrix; `None` dimensions are taken from the data
    /// (every row must then have the first row's length).
    fn matrix(&self, name: &str, rows: Option<usize>, cols: Option<usize>) -> Parse<Matrix> {
        let v = self.required(name, "a matrix (an array of rows)")?;
        matrix(v, &self.path(name), rows, cols)
    }
    fn opt_matrix(&self, name: &str, rows: Option<usize>, cols: Option<usize>) -> Parse<Option<Matrix>> {
        self.field(name).map(|_| self.matrix(name, rows, cols)).transpose()
    }
    fn int_matrix(&self, name: &str, rows: Option<usize>, cols: Option<usize>) -> Parse<Vec<Vec<i64>>> {
        let v = self.required(name, "a matrix of integers")?;
        let path = self.path(name);
        let arr = v
            .as_array()
            .ok_or_else(|| Bad(format!("{path}: expected an array of rows, found {}", describe(Some(v)))))?;
        check_count(&path, "rows", rows, arr.len())?;
        let cols = cols.or_else(|| arr.first().and_then(Value::as_array).map(Vec::len));
        arr.iter()
            .enumerate()
            .map(|(i, r)| array_of(r, &format!("{path}[{i}]"), cols, |x| x.as_i64(), "integers"))
            .collect()
    }
}

fn check_count(path: &str, what: &str, want: Option<usize>, got: usize) -> Parse<()> {
    match want {
        Some(w) if w != got => Err(Bad(format!("{path}: expected {w} {what}, found {got}"))),
        _ => Ok(()),
    }
}

fn array_of<T>(
    v: &Value,
    path: &str,
    len: Option<usize>,
    f: impl Fn(&Value) -> Option<T>,
    what: &str,
) -> Parse<Vec<T>> {
    let arr =
        v.as_array().ok_or_else(|| Bad(format!("{path}: expected an array of {what}, found {}", describe(Some(v)))))?;
    check_count(path, "entries", len, arr.len())?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            f(x).ok_or_else(|| Bad(format!("{path}[{i}]: expected one of {what}, found {}", describe(Some(x)))))
        })
        .collect()
}

/// A dense row-major matrix.
#[derive(Debug, Clone)]
struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
}

impl Matrix {
    fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
    /// Rows padded with zeros to `D` columns, as f32.
    fn padded<const D: usize>(&self) -> Vec<[f32; D]> {
        (0..self.rows)
            .map(|i| {
                let mut r = [0.0f32; D];
                for (x, &v) in r.iter_mut().zip(self.row(i)) {
                    *x = v as f32;
                }
                r
            })
            .collect()
    }
}

fn matrix(v: &Value, path: &str, rows: Option<usize>, cols: Option<usize>) -> Parse<Matrix> {
    let arr =
        v.as_array().ok_or_else(|| Bad(format!("{path}: expected an array of rows, found {}", describe(Some(v)))))?;
    check_count(path, "rows", rows, arr.len())?;
    let cols = match cols {
        Some(c) => c,
        None => arr.first().and_then(Value::as_array).map_or(0, Vec::len),
    };
    let mut data = Vec::with_capacity(arr.len() * cols);
    for (i, r) in arr.iter().enumerate() {
        let row = array_of(r, &format!("{path}[{i}]"), Some(cols), |x| x.as_f64(), "numbers")
            .map_err(|Bad(m)| Bad(format!("{m} (a {} x {cols} matrix)", rows.unwrap_or(arr.len()))))?;
        data.extend(row);
    }
    Ok(Matrix { rows: arr.len(), cols, data })
}

fn flat<const D: usize>(rows: &[[f32; D]], cols: usize) -> Vec<f64> {
    rows.iter().flat_map(|r| r[..cols].iter().map(|&x| x as f64)).collect()
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Runs a case, then fails it when it has fields its runner never looked
/// at (a misspelled expectation would otherwise pass unchecked).
fn run_case(case: &Value) -> Parse<Check> {
    let used = Used::default();
    used.borrow_mut().extend(["name", "tolerance", "tolerance.abs", "tolerance.rel"].map(String::from));
    let result = run_known_fields(case, &used);
    let mut unknown = Vec::new();
    unused_fields(case, "", &used.borrow(), &mut unknown);
    if unknown.is_empty() {
        return result;
    }
    let kind = case.get("kind").and_then(Value::as_str).unwrap_or("?");
    let list = unknown.join(", ");
    // A case that stopped early has not looked at its later fields; only
    // one that ran through, or found nothing to check, can name them.
    Err(Bad(match result {
        Err(Bad(why)) if why.contains(NOTHING_CHECKED) => format!("{why}; unknown field(s) for a {kind} case: {list}"),
        Err(bad) => return Err(bad),
        Ok(_) => format!("unknown field(s) for a {kind} case, so nothing was checked against them: {list}"),
    }))
}

/// The end of the message of a case whose expectation names no field its
/// kind checks.
const NOTHING_CHECKED: &str = "no known field is given, so nothing would be checked";

/// The non-null fields under `v` whose path is not in `used`.
fn unused_fields(v: &Value, path: &str, used: &std::collections::HashSet<String>, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                if x.is_null() {
                    continue;
                }
                if used.contains(&p) {
                    unused_fields(x, &p, used, out);
                } else {
                    out.push(p);
                }
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate().filter(|(_, x)| x.is_object()) {
                unused_fields(x, &format!("{path}[{i}]"), used, out);
            }
        }
        _ => {}
    }
}

fn run_known_fields(case: &Value, used: &Used) -> Parse<Check> {
    let top = Obj { v: case, path: "", used };
    let kind = top.string("kind")?;
    let inputs = top.at(top.required("inputs", "an object of inputs")?, "inputs");
    let expected = top.at(top.required("expected", "an object of expected values")?, "expected");
    if !inputs.v.is_object() || !expected.v.is_object() {
        return Err(Bad("inputs and expected must be JSON objects".into()));
    }
    let mut check = Check::new(case)?;
    match kind {
        "cache_loss" => with_dim(inputs, "query", |d| match d {
            16 => cache_loss::<16>(inputs, expected, &mut check),
            64 => cache_loss::<64>(inputs, expected, &mut check),
            _ => cache_loss::<1024>(inputs, expected, &mut check),
        })?,
        "cache_update" => cache_update(inputs, expected, &mut check)?,
        "in_cache_filter" => in_cache_filter(inputs, expected, &mut check)?,
        "gumbel_distribution" => gumbel_distribution(inputs, expected, &mut check)?,
        "softmax_loss" => with_dim(inputs, "query", |d| match d {
            16 => softmax_loss::<16>(inputs, expected, &mut check),
            64 => softmax_loss::<64>(inputs, expected, &mut check),
            _ => softmax_loss::<1024>(inputs, expected, &mut check),
        })?,
        other => return Err(Bad(format!("kind: unknown kind {other:?}"))),
    }
    Ok(check)
}

/// Calls `f` with the smallest supported padded dimension that holds the
/// width of matrix `field`.
fn with_dim(inputs: Obj<'_>, field: &str, f: impl FnOnce(usize) -> Parse<()>) -> Parse<()> {
    let m = inputs.matrix(field, None, None)?;
    match m.cols {
        0 => Err(Bad(format!("inputs.{field}: rows must not be empty"))),
        1..=16 => f(16),
        17..=64 => f(64),
        65..=1024 => f(1024),
        d => Err(Bad(format!("inputs.{field}: dimension {d} is above the runner's limit of 1024"))),
    }
}

const MAX_BATCH: usize = 1024;

/// Largest `cache_size` of a `cache_update` case: the host's largest cache.
/// The runner allocates the cache before reading the steps, so a size from
/// the file must be bounded (1e12 slots would abort the process).
const MAX_CACHE_SIZE: usize = 1 << 16;

/// `n` occupied slots with these embeddings and items.
fn filled<I: negcache::Item, const D: usize>(embeddings: Vec<[f32; D]>, items: Vec<I>) -> Parse<OwnedCache<I, D>> {
    let n = embeddings.len();
    if items.len() != n {
        return Err(Bad(format!("{} cache items for {n} cache rows", items.len())));
    }
    let mut c = OwnedCache::new(n).map_err(|e| Bad(e.to_string()))?;
    let mut v = c.as_mut();
    for (j, (e, item)) in embeddings.iter().zip(items).enumerate() {
        v.set_slot(j, e, item, 0, true).map_err(|e| Bad(e.to_string()))?;
    }
    Ok(c)
}

/// `n` empty slots.
fn empty<I: negcache::Item, const D: usize>(n: usize) -> Parse<OwnedCache<I, D>> {
    OwnedCache::new(n).map_err(|e| Bad(e.to_string()))
}

fn cache_loss<const D: usize>(inputs: Obj<'_>, expected: Obj<'_>, check: &mut Check) -> Parse<()> {
    let q = inputs.matrix("query", None, None)?;
    let (b, d) = (q.rows, q.cols);
    if b == 0 || b > MAX_BATCH {
        return Err(Bad(format!("inputs.query: the batch must have 1 to {MAX_BATCH} rows, found {b}")));
    }
    let p = inputs.matrix("positive", Some(b), Some(d))?;
    let e = inputs.matrix("cache_embeddings", None, Some(d))?;
    let n = e.rows;
    if n == 0 {
        return Err(Bad("inputs.cache_embeddings: the cache must have at least one row".into()));
    }
    let f = inputs.matrix("cache_fresh", Some(n), Some(d))?;
    let alpha = inputs.opt_number("score_scale")?.unwrap_or(1.0) as f32;
    let top_k = match inputs.opt_int("top_k")? {
        None => 0,
        Some(k) if k >= 1 && (k as usize) <= n && n % k as usize == 0 => k as usize,
        Some(k) => return Err(Bad(format!("inputs.top_k: {k} must be a divisor of the cache size {n}"))),
    };
    let bound = if top_k > 0 { top_k } else { n };
    let retrieved = inputs.ints("retrieved", Some(b))?;
    let retrieved: Vec<usize> = retrieved
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            usize::try_from(r)
                .ok()
                .filter(|&r| r < bound)
                .ok_or_else(|| Bad(format!("inputs.retrieved[{i}]: {r} is not in [0, {bound})")))
        })
        .collect::<Parse<_>>()?;

    let (qs, ps, fresh_all) = (q.padded::<D>(), p.padded::<D>(), f.padded::<D>());
    let mut owned = filled(e.padded::<D>(), (0..n as u32).collect())?;
    let cache = owned.as_mut();
    let cfg = LossConfig { score_scale: alpha, top_k, mask_accidental_hits: false };
    let mut loss = Box::new(CacheLoss::<MAX_BATCH, 1>::new());
    let (mut tk_s, mut tk_i) = (vec![0.0f32; b * top_k], vec![0u32; b * top_k]);
    let out = (top_k > 0).then(|| TopKOut { scores: &mut tk_s, slots: &mut tk_i });
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(0);
    loss.score_and_sample(cache.as_ref(), &qs, &ps, None, &cfg, Retrieval::Fixed(&retrieved), &mut rng, out)
        .map_err(|e| Bad(format!("the core rejected the inputs: {e}")))?;
    let negs: Vec<usize> = (0..b).map(|i| loss.negatives(i)[0] as usize).collect();
    let fresh: Vec<[f32; D]> = negs.iter().map(|&j| fresh_all[j]).collect();
    let (mut gq, mut gp, mut gn) = (vec![[0.0; D]; b], vec![[0.0; D]; b], vec![[0.0; D]; b]);
    let grads = LossGrads { query: &mut gq, positive: &mut gp, negative: &mut gn };
    loss.backward(cache.as_ref(), &qs, &ps, &fresh, Some(grads))
        .map_err(|e| Bad(format!("the core rejected the inputs: {e}")))?;

    let mut any = false;
    let mut cmp_vec = |name: &str, got: Vec<f64>, check: &mut Check| -> Parse<()> {
        if let Some(want) = expected.opt_vector(name, Some(got.len()))? {
            check.numbers(name, &got, &want);
            any = true;
        }
        Ok(())
    };
    cmp_vec("prob_pos", widen(loss.prob_pos()), check)?;
    cmp_vec("training_loss", widen(loss.training_loss()), check)?;
    cmp_vec("interpretable_loss", widen(loss.interpretable_loss()), check)?;
    cmp_vec("staleness", widen(loss.staleness()), check)?;
    if let Some(want) = expected.opt_ints("negative_index", Some(b))? {
        check.integers("negative_index", &negs.iter().map(|&j| j as i64).collect::<Vec<_>>(), &want);
        any = true;
    }
    for (name, rows) in [("grad_query", &gq), ("grad_positive", &gp), ("grad_negative", &gn)] {
        if let Some(want) = expected.opt_matrix(name, Some(b), Some(d))? {
            check.numbers(name, &flat(rows, d), &want.data);
            any = true;
        }
    }
    if top_k > 0 {
        if let Some(want) = expected.opt_matrix("top_k_scores", Some(b), Some(top_k))? {
            check.numbers("top_k_scores", &widen(&tk_s), &want.data);
            any = true;
        }
        if let Some(want) = expected
            .field("top_k_indices")
            .map(|_| expected.int_matrix("top_k_indices", Some(b), Some(top_k)))
            .transpose()?
        {
            let got: Vec<i64> = tk_i.iter().map(|&i| i as i64).collect();
            check.integers("top_k_indices", &got, &want.concat());
            any = true;
        }
    } else if expected.field("top_k_scores").is_some() || expected.field("top_k_indices").is_some() {
        return Err(Bad("expected.top_k_scores / top_k_indices given but inputs.top_k is null".into()));
    }
    if !any {
        return Err(Bad(format!("expected: {NOTHING_CHECKED}")));
    }
    Ok(())
}

/// Items of up to 8 numbers, zero-padded.
type Item8 = [f32; 8];

fn cache_update(inputs: Obj<'_>, expected: Obj<'_>, check: &mut Check) -> Parse<()> {
    const D: usize = 16;
    let n = inputs.int("cache_size")?;
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Bad(format!("inputs.cache_size: {n} must be positive")))?;
    if n > MAX_CACHE_SIZE {
        return Err(Bad(format!("inputs.cache_size: {n} is above the runner's limit of {MAX_CACHE_SIZE} slots")));
    }
    let eviction = if inputs.boolean("use_lru")? { Eviction::Lru } else { Eviction::Fifo };
    let steps = inputs.required("steps", "an array of update calls")?;
    let steps = steps.as_array().ok_or_else(|| Bad("inputs.steps: expected an array of update calls".into()))?;
    let states = expected.required("states", "one state per step")?;
    let states = states.as_array().ok_or_else(|| Bad("expected.states: expected an array".into()))?;
    if steps.is_empty() {
        return Err(Bad("inputs.steps: no update calls, so nothing would be checked".into()));
    }
    check_count("expected.states", "states (one per step)", Some(steps.len()), states.len())?;

    let mut owned: OwnedCache<Item8, D> = empty(n)?;
    let mut dims: Option<(usize, usize)> = None;
    let to_items = |m: &Matrix, path: &str| -> Parse<Vec<Item8>> {
        if m.cols > 8 {
            return Err(Bad(format!("{path}: items of {} numbers are above the runner's limit of 8", m.cols)));
        }
        Ok((0..m.rows).map(|i| core::array::from_fn(|k| if k < m.cols { m.row(i)[k] as f32 } else { 0.0 })).collect())
    };
    if let Some(init) = inputs.field("initial") {
        let init = inputs.at(init, "inputs.initial");
        let e = init.matrix("embeddings", Some(n), None)?;
        if e.cols > D {
            return Err(Bad(format!(
                "inputs.initial.embeddings: dimension {} is above the runner's limit of {D}",
                e.cols
            )));
        }
        let it = init.matrix("items", Some(n), None)?;
        let a = init.ints("age", Some(n))?;
        dims = Some((e.cols, it.cols));
        owned = filled(e.padded::<D>(), to_items(&it, "inputs.initial.items")?)?;
        for (j, &age) in a.iter().enumerate() {
            owned.slots_mut().ages[j] = i32::try_from(age)
                .map_err(|_| Bad(format!("inputs.initial.age[{j}]: {age} does not fit in 32 bits")))?;
        }
    }
    let mut cache = owned.as_mut();

    for (s, (step, want)) in steps.iter().zip(states).enumerate() {
        let path = format!("inputs.steps[{s}]");
        let st = inputs.at(step, &path);
        let ui = st.opt_ints("updated_indices", None)?.unwrap_or_default();
        let u = ui.len();
        let ue = st.opt_matrix("updated_embeddings", Some(u), dims.map(|d| d.0))?;
        let um = st.opt_bools("updated_mask", Some(u))?;
        let ne = st.opt_matrix("new_embeddings", None, dims.map(|d| d.0))?;
        let m = ne.as_ref().map_or(0, |x| x.rows);
        let ni = st.opt_matrix("new_items", Some(m), dims.map(|d| d.1))?;
        let nm = st.opt_bools("new_mask", Some(m))?;
        if u > 0 && ue.is_none() {
            return Err(Bad(format!("{path}.updated_embeddings: missing; expected {u} rows")));
        }
        if m > 0 && ni.is_none() {
            return Err(Bad(format!("{path}.new_items: missing; expected {m} rows")));
        }
        let d_now = ue.as_ref().map(|x| x.cols).or(ne.as_ref().map(|x| x.cols));
        if let (Some(dn), None) = (d_now, dims) {
            dims = Some((dn, ni.as_ref().map_or(1, |x| x.cols)));
        }
        let refresh_indices = ui
            .iter()
            .enumerate()
            .map(|(i, &j)| usize::try_from(j).map_err(|_| Bad(format!("{path}.updated_indices[{i}]: {j} is negative"))))
            .collect::<Parse<Vec<usize>>>()?;
        let ue_rows = ue.map(|x| x.padded::<D>()).unwrap_or_default();
        let ne_rows = ne.map(|x| x.padded::<D>()).unwrap_or_default();
        let ni_rows = match &ni {
            Some(x) => to_items(x, &format!("{path}.new_items"))?,
            None => Vec::new(),
        };
        let up = Update {
            refresh_indices: &refresh_indices,
            refresh_embeddings: &ue_rows,
            refresh_mask: um.as_deref(),
            new_embeddings: &ne_rows,
            new_items: &ni_rows,
            new_mask: nm.as_deref(),
        };
        cache.update(&up, eviction).map_err(|e| Bad(format!("{path}: the core rejected the update: {e}")))?;

        let wpath = format!("expected.states[{s}]");
        let w = expected.at(want, &wpath);
        let r = cache.as_ref();
        const STATE: [&str; 3] = ["embeddings", "items", "age"];
        if STATE.iter().all(|f| w.field(f).is_none()) {
            let others: Vec<String> = want
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| !v.is_null() && !STATE.contains(&k.as_str()))
                .map(|(k, _)| format!("{wpath}.{k}"))
                .collect();
            let unknown =
                if others.is_empty() { String::new() } else { format!("; unknown field(s): {}", others.join(", ")) };
            return Err(Bad(format!(
                "{wpath}: none of embeddings, items or age is given, so nothing would be checked{unknown}"
            )));
        }
        if let Some(we) = w.opt_matrix("embeddings", Some(n), dims.map(|x| x.0))? {
            if we.cols > D {
                return Err(Bad(format!(
                    "{wpath}.embeddings: dimension {} is above the runner's limit of {D}",
                    we.cols
                )));
            }
            check.numbers(
                &format!("states[{s}].embeddings"),
                &flat(r.embeddings().as_f32().expect("a reference cache is f32"), we.cols),
                &we.data,
            );
        }
        if let Some(wi) = w.opt_matrix("items", Some(n), dims.map(|x| x.1))? {
            if wi.cols > 8 {
                return Err(Bad(format!(
                    "{wpath}.items: items of {} numbers are above the runner's limit of 8",
                    wi.cols
                )));
            }
            let got: Vec<f64> = r.items().iter().flat_map(|it| it[..wi.cols].iter().map(|&x| x as f64)).collect();
            check.numbers(&format!("states[{s}].items"), &got, &wi.data);
        }
        if let Some(wa) = w.opt_ints("age", Some(n))? {
            let got: Vec<i64> = r.ages().iter().map(|&a| a as i64).collect();
            check.integers(&format!("states[{s}].age"), &got, &wa);
        }
    }
    Ok(())
}

fn in_cache_filter(inputs: Obj<'_>, expected: Obj<'_>, check: &mut Check) -> Parse<()> {
    let cache_items = inputs.int_matrix("cache_items", None, None)?;
    let f = cache_items.first().map_or(0, Vec::len);
    let new_items = inputs.int_matrix("new_items", None, if cache_items.is_empty() { None } else { Some(f) })?;
    if f > 16 || new_items.first().is_some_and(|r| r.len() > 16) {
        return Err(Bad("items of more than 16 integers are above the runner's limit".into()));
    }
    let pad = |r: &Vec<i64>| -> [i64; 16] { core::array::from_fn(|k| r.get(k).copied().unwrap_or(0)) };
    let mut owned: OwnedCache<[i64; 16], 1> = if cache_items.is_empty() {
        empty(1)?
    } else {
        filled(vec![[0.0]; cache_items.len()], cache_items.iter().map(pad).collect())?
    };
    let cache = owned.as_mut();
    let new: Vec<[i64; 16]> = new_items.iter().map(pad).collect();
    let mut keep = vec![false; new.len()];
    cache.as_ref().filter_new(&new, &mut keep).map_err(|e| Bad(e.to_string()))?;
    let want = expected.bools("keep", Some(new.len()))?;
    let as_int = |v: &[bool]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
    check.integers("keep", &as_int(&keep), &as_int(&want));
    Ok(())
}

/// Draws per sampler for a `gumbel_distribution` case.
pub const GUMBEL_DRAWS: usize = 100_000;

fn gumbel_distribution(inputs: Obj<'_>, expected: Obj<'_>, check: &mut Check) -> Parse<()> {
    let scores = inputs.vector("scores", None)?;
    let k = scores.len();
    if k < 2 {
        return Err(Bad(format!("inputs.scores: expected at least 2 scores, found {k}")));
    }
    let inv_temp = inputs.number("inv_temp")? as f32;
    let probs = expected.vector("probabilities", Some(k))?;
    // The scores become a one-dimensional cache scored by the query (1):
    // alpha * <1, s_j> = s_j exactly.
    let mut owned = filled(scores.iter().map(|&s| [s as f32]).collect(), (0..k as u32).collect())?;
    let cache = owned.as_mut();
    let cfg = LossConfig { score_scale: 1.0, top_k: 0, mask_accidental_hits: false };
    let mut loss = CacheLoss::<1, 1>::new();
    let mut worst_p = f64::INFINITY;
    for (name, retrieval, seed) in
        [("gumbel", Retrieval::Gumbel { inv_temp }, 1u64), ("exp_jump", Retrieval::ExpJump { inv_temp }, 2u64)]
    {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
        let mut counts = vec![0u64; k];
        for _ in 0..GUMBEL_DRAWS {
            loss.score_and_sample(cache.as_ref(), &[[1.0]], &[[0.0]], None, &cfg, retrieval, &mut rng, None)
                .map_err(|e| Bad(format!("the core rejected the inputs: {e}")))?;
            counts[loss.negatives(0)[0] as usize] += 1;
        }
        let Some(t) = chi_square(&counts, &probs) else {
            return Err(Bad("expected.probabilities: fewer than two cells have an expected count of 5".into()));
        };
        if t.p_value < worst_p {
            worst_p = t.p_value;
            check.worst = format!("{name} chi2 p");
        }
        if t.p_value < 0.001 && check.failure.is_none() {
            check.failure =
                Some(format!("{name}: chi-square {:.1} on {} dof, p = {:.2e}", t.statistic, t.dof, t.p_value));
        }
    }
    check.max_dev = worst_p;
    Ok(())
}

fn softmax_loss<const D: usize>(inputs: Obj<'_>, expected: Obj<'_>, check: &mut Check) -> Parse<()> {
    let method = inputs.string("method")?;
    let q = inputs.matrix("query", None, None)?;
    let (b, d) = (q.rows, q.cols);
    let alpha = inputs.opt_number("score_scale")?.unwrap_or(1.0) as f32;
    let qs = q.padded::<D>();
    let f32s = |v: Option<Vec<f64>>| v.map(|v| v.iter().map(|&x| x as f32).collect::<Vec<f32>>());
    let mut loss = vec![0.0f32; b];
    let mut gq = vec![[0.0f32; D]; b];
    let mut gp = vec![[0.0f32; D]; b];
    let mut shared_rows = 0;
    let mut gs: Vec<[f32; D]> = Vec::new();
    let mut scratch = vec![softmax::LogSumExp::EMPTY; b];
    let (summary, shared_name) = match method {
        "in_batch" => {
            let p = inputs.matrix("positive", Some(b), Some(d))?.padded::<D>();
            let ids = inputs.opt_ints("positive_ids", Some(b))?;
            let lq = f32s(inputs.opt_vector("log_q", Some(b))?);
            let out = SoftmaxOut {
                scratch: &mut scratch,
                loss: Some(&mut loss),
                grad_query: Some(&mut gq),
                grad_positive: Some(&mut gp),
                grad_shared: None,
            };
            (softmax::in_batch(&qs, &p, ids.as_deref(), lq.as_deref(), alpha, out), None)
        }
        "sampled" => {
            let p = inputs.matrix("positive", Some(b), Some(d))?.padded::<D>();
            let negs = inputs.matrix("negatives", None, Some(d))?;
            shared_rows = negs.rows;
            gs = vec![[0.0; D]; shared_rows];
            let pl = f32s(inputs.opt_vector("positive_log_q", Some(b))?);
            let nl = f32s(inputs.opt_vector("negative_log_q", Some(shared_rows))?);
            let pid = inputs.opt_ints("positive_ids", Some(b))?;
            let nid = inputs.opt_ints("negative_ids", Some(shared_rows))?;
            let mut sink = |j: usize, g: &[f32; D]| gs[j] = *g;
            let out = SoftmaxOut {
                scratch: &mut scratch,
                loss: Some(&mut loss),
                grad_query: Some(&mut gq),
                grad_positive: Some(&mut gp),
                grad_shared: Some(&mut sink),
            };
            let r = softmax::sampled(
                &qs,
                &p,
                &negs.padded::<D>(),
                pl.as_deref(),
                nl.as_deref(),
                pid.as_deref(),
                nid.as_deref(),
                alpha,
                out,
            );
            (r, Some("grad_negatives"))
        }
        "full" => {
            let corpus = inputs.matrix("corpus", None, Some(d))?;
            shared_rows = corpus.rows;
            gs = vec![[0.0; D]; shared_rows];
            let idx = inputs.ints("positive_index", Some(b))?;
            let idx = idx
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    usize::try_from(x)
                        .ok()
                        .filter(|&x| x < shared_rows)
                        .ok_or_else(|| Bad(format!("inputs.positive_index[{i}]: {x} is not in [0, {shared_rows})")))
                })
                .collect::<Parse<Vec<usize>>>()?;
            let mut sink = |j: usize, g: &[f32; D]| gs[j] = *g;
            let out = SoftmaxOut {
                scratch: &mut scratch,
                loss: Some(&mut loss),
                grad_query: Some(&mut gq),
                grad_positive: None,
                grad_shared: Some(&mut sink),
            };
            (softmax::full(&qs, &corpus.padded::<D>(), &idx, alpha, out), Some("grad_corpus"))
        }
        other => {
            return Err(Bad(format!("inputs.method: unknown method {other:?}; expected in_batch, sampled or full")))
        }
    };
    let summary = summary.map_err(|e| Bad(format!("the core rejected the inputs: {e}")))?;
    let mut any = false;
    if let Some(w) = expected.opt_vector("loss", Some(b))? {
        check.numbers("loss", &widen(&loss), &w);
        any = true;
    }
    if let Some(w) = expected.opt_number("mean_loss")? {
        check.numbers("mean_loss", &[summary.loss as f64], &[w]);
        any = true;
    }
    if let Some(w) = expected.opt_number("grad_scale")? {
        check.numbers("grad_scale", &[summary.grad_scale as f64], &[w]);
        any = true;
    }
    if let Some(w) = expected.opt_matrix("grad_query", Some(b), Some(d))? {
        check.numbers("grad_query", &flat(&gq, d), &w.data);
        any = true;
    }
    if method != "full" {
        if let Some(w) = expected.opt_matrix("grad_positive", Some(b), Some(d))? {
            check.numbers("grad_positive", &flat(&gp, d), &w.data);
            any = true;
        }
    }
    if let Some(name) = shared_name {
        if let Some(w) = expected.opt_matrix(name, Some(shared_rows), Some(d))? {
            check.numbers(name, &flat(&gs, d), &w.data);
            any = true;
        }
    }
    if !any {
        return Err(Bad(format!("expected: {NOTHING_CHECKED}")));
    }
    Ok(())
}
