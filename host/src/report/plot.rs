//! Line charts of training curves, as SVG and PNG.
//!
//! [`line_chart`] draws any number of curves plus horizontal reference lines
//! (baselines such as BM25's Recall@10) and writes the same chart twice: an
//! SVG for documents and a PNG for quick viewing.
//!
//! # Fonts
//!
//! No font is embedded. SVG text needs none: the viewer renders it. Laying
//! out the chart (label areas, legend width) needs only glyph widths, and
//! only the PNG needs glyph shapes. So the first chart of a process looks for
//! a TrueType/OpenType font: the file named by the environment variable
//! [`FONT_ENV`], else a few well-known system locations (DejaVu Sans from
//! Debian's `fonts-dejavu-core` first). If none is found, charts are still
//! written, laid out with a built-in font that has widths but no glyphs: the
//! SVG is complete, and the PNG has every line, axis and legend swatch but no
//! text. [`png_font`] tells which case applies.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, ensure, Context, Result};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};
use tempfile::NamedTempFile;

use super::table::fmt_metric;

/// One named curve.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// `(x, y)` points, drawn in the order given. A non-finite coordinate
    /// (a NaN loss, say) breaks the line there rather than failing.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series named `name`.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points }
    }
}

/// Pixel size of both files (the SVG's nominal size).
pub const CHART_SIZE: (u32, u32) = (1100, 650);

/// Environment variable naming a `.ttf`/`.otf` file to render PNG text with,
/// tried before the system locations.
pub const FONT_ENV: &str = "NEGCACHE_PLOT_FONT";

/// Where common systems keep a plain sans-serif font, best first.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", // Debian, Ubuntu: fonts-dejavu-core
    "/usr/share/fonts/TTF/DejaVuSans.ttf",             // Arch
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf", // Fedora
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",          // Alpine, older Fedora
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf", // macOS
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// The family every text element asks for. Registering our font under the
/// generic name means SVG viewers, which never see the font, substitute a
/// sans-serif one rather than their (often serif) default.
const FAMILY: &str = "sans-serif";

/// Colour-blind-friendly and distinct on white (Matplotlib's "tab10").
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Series with at most this many points also get a dot per point: sparse
/// curves (evaluations every few thousand steps) are read point by point.
const MAX_POINTS_WITH_MARKERS: usize = 30;

/// Most ticks per axis.
const TICKS: usize = 8;

/// Writes `<path_stem>.svg` and `<path_stem>.png` (the extension is appended,
/// so dots in the stem are kept), creating missing parent directories.
///
/// Each series is a solid line in its own colour; each reference line
/// `(label, y)` is a dashed horizontal line across the whole chart, listed in
/// the legend with its value. Both axes span the finite data (reference
/// values included) padded by 5% on each side. The legend sits to the right
/// of the plot so that it never hides a curve. Each file is written to a
/// temporary file beside it and renamed into place, so readers never see a
/// half-written chart and a failure leaves any previous chart intact.
///
/// See the module docs for how text is rendered when no font is installed.
pub fn line_chart(
    path_stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    reference_lines: &[(String, f64)],
) -> Result<()> {
    ensure!(path_stem.file_name().is_some(), "chart path {} has no file name", path_stem.display());
    let dir = match path_stem.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    png_font();
    let chart = Chart { family: FAMILY, title, x_label, y_label, series, reference_lines };

    let svg_path = append_extension(path_stem, "svg");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        chart.draw(&root)?;
        root.present().map_err(drawing_error)?;
    }
    let mut tmp = temp_file_in(dir, ".svg")?;
    std::io::Write::write_all(tmp.as_file_mut(), svg.as_bytes())
        .with_context(|| format!("writing {}", svg_path.display()))?;
    publish(tmp, &svg_path).with_context(|| format!("writing {}", svg_path.display()))?;

    // Drawn into memory and encoded here, so that a failed write is an
    // io::Error on a named file (the bitmap backend's own saving reports
    // a debug-printed image error without a path).
    let png_path = append_extension(path_stem, "png");
    let (w, h) = CHART_SIZE;
    let mut pixels = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, CHART_SIZE).into_drawing_area();
        chart.draw(&root)?;
        root.present().map_err(drawing_error)?;
    }
    let mut encoded = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut encoded, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(|e| anyhow!("{}: encoding: {e}", png_path.display()))?;
        writer.write_image_data(&pixels).map_err(|e| anyhow!("{}: encoding: {e}", png_path.display()))?;
        writer.finish().map_err(|e| anyhow!("{}: encoding: {e}", png_path.display()))?;
    }
    let mut tmp = temp_file_in(dir, ".png")?;
    std::io::Write::write_all(tmp.as_file_mut(), &encoded)
        .with_context(|| format!("writing {}", png_path.display()))?;
    publish(tmp, &png_path).with_context(|| format!("writing {}", png_path.display()))?;
    Ok(())
}

/// The font file PNG text is rendered with, or `None` when no font was
/// found and PNGs are written without text (see the module docs). The search
/// happens once per process.
pub fn png_font() -> Option<&'static Path> {
    static CHOSEN: OnceLock<Option<PathBuf>> = OnceLock::new();
    CHOSEN.get_or_init(register_text_font).as_deref()
}

fn register_text_font() -> Option<PathBuf> {
    let from_env = std::env::var_os(FONT_ENV).filter(|p| !p.is_empty()).map(PathBuf::from);
    for path in from_env.into_iter().chain(FONT_CANDIDATES.iter().map(PathBuf::from)) {
        let Ok(bytes) = fs::read(&path) else { continue };
        // Checked before leaking, so a wrong file costs nothing.
        if !is_font(&bytes) {
            continue;
        }
        // plotters keeps registered fonts for the life of the process and
        // takes them as 'static; this runs at most once per candidate.
        if register_font(FAMILY, FontStyle::Normal, Box::leak(bytes.into_boxed_slice())).is_ok() {
            return Some(path);
        }
    }
    // Cannot fail: a unit test parses this font. Were it to, drawing would
    // report plotters' "font unavailable" error rather than panic.
    let _ = register_font(FAMILY, FontStyle::Normal, Box::leak(metrics_only_font().into_boxed_slice()));
    None
}

/// TrueType, OpenType (CFF), Apple TrueType, or a collection.
fn is_font(bytes: &[u8]) -> bool {
    matches!(bytes.get(..4), Some([0, 1, 0, 0] | b"OTTO" | b"true" | b"ttcf"))
}

/// A minimal TrueType font with one glyph that is 0.55 em wide and has no
/// outline: every character measures like an average sans-serif one and
/// draws nothing. It gives plotters the widths it lays charts out with when
/// the system has no font; the SVG's text is then drawn by the viewer and
/// the PNG's is simply absent. The width errs wide, so that labels never
/// overflow the space reserved for them.
fn metrics_only_font() -> Vec<u8> {
    const UNITS_PER_EM: u16 = 1000;
    const ASCENT: i16 = 800;
    const DESCENT: i16 = -200;
    const ADVANCE: u16 = 550;
    let head: &[&[u8]] = &[
        &0x0001_0000_u32.to_be_bytes(), // version 1.0
        &0x0001_0000_u32.to_be_bytes(), // font revision
        &0_u32.to_be_bytes(),           // checksum adjustment (unchecked by readers)
        &0x5F0F_3CF5_u32.to_be_bytes(), // magic number
        &0_u16.to_be_bytes(),           // flags
        &UNITS_PER_EM.to_be_bytes(),
        &0_u64.to_be_bytes(), // created
        &0_u64.to_be_bytes(), // modified
        &0_i16.to_be_bytes(), // bounding box: x min, y min, x max, y max
        &DESCENT.to_be_bytes(),
        &ADVANCE.to_be_bytes(),
        &ASCENT.to_be_bytes(),
        &0_u16.to_be_bytes(), // mac style
        &8_u16.to_be_bytes(), // smallest readable size
        &2_i16.to_be_bytes(), // font direction hint
        &0_i16.to_be_bytes(), // short glyph offsets
        &0_i16.to_be_bytes(), // glyph data format
    ];
    let hhea: &[&[u8]] = &[
        &0x0001_0000_u32.to_be_bytes(),
        &ASCENT.to_be_bytes(),
        &DESCENT.to_be_bytes(),
        &0_i16.to_be_bytes(),   // line gap
        &ADVANCE.to_be_bytes(), // widest advance
        &0_i16.to_be_bytes(),   // min left side bearing
        &0_i16.to_be_bytes(),   // min right side bearing
        &ADVANCE.to_be_bytes(), // max x extent
        &1_i16.to_be_bytes(),   // caret slope rise (upright)
        &0_i16.to_be_bytes(),   // caret slope run
        &0_i16.to_be_bytes(),   // caret offset
        &[0; 8],                // reserved
        &0_i16.to_be_bytes(),   // metric data format
        &1_u16.to_be_bytes(),   // one horizontal metric, shared by all glyphs
    ];
    let hmtx: &[&[u8]] = &[&ADVANCE.to_be_bytes(), &0_i16.to_be_bytes()];
    let maxp: &[&[u8]] = &[&0x0000_5000_u32.to_be_bytes(), &1_u16.to_be_bytes()]; // version 0.5, one glyph

    // Readers binary-search the table directory, so tags must be sorted.
    let tables =
        [(b"head", head.concat()), (b"hhea", hhea.concat()), (b"hmtx", hmtx.concat()), (b"maxp", maxp.concat())];
    let mut font = Vec::new();
    font.extend_from_slice(&0x0001_0000_u32.to_be_bytes()); // TrueType outlines
    font.extend_from_slice(&4_u16.to_be_bytes()); // number of tables
    font.extend_from_slice(&64_u16.to_be_bytes()); // search range: 16 × 4
    font.extend_from_slice(&2_u16.to_be_bytes()); // entry selector: log2(4)
    font.extend_from_slice(&0_u16.to_be_bytes()); // range shift
    let padded = |len: usize| len.next_multiple_of(4);
    let mut offset = font.len() + 16 * tables.len();
    for (tag, data) in &tables {
        let mut padded_data = data.clone();
        padded_data.resize(padded(data.len()), 0);
        let checksum = padded_data
            .chunks_exact(4)
            .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
            .fold(0_u32, u32::wrapping_add);
        font.extend_from_slice(*tag);
        font.extend_from_slice(&checksum.to_be_bytes());
        // The tables total a few hundred bytes: the casts cannot truncate.
        font.extend_from_slice(&(offset as u32).to_be_bytes());
        font.extend_from_slice(&(data.len() as u32).to_be_bytes());
        offset += padded(data.len());
    }
    for (_, data) in &tables {
        font.extend_from_slice(data);
        font.resize(padded(font.len()), 0);
    }
    font
}

/// Everything [`line_chart`] draws, independent of the backend.
struct Chart<'a> {
    /// Font family of all text; a parameter only so that tests can use a
    /// family of their own without touching the process-wide one.
    family: &'a str,
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    series: &'a [Series],
    reference_lines: &'a [(String, f64)],
}

struct LegendEntry {
    label: String,
    color: RGBColor,
    dashed: bool,
    marker: bool,
}

impl Chart<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        let family = self.family;
        root.fill(&WHITE).map_err(drawing_error)?;
        let area = root.margin(10, 10, 10, 10);
        let body = if self.title.is_empty() {
            area
        } else {
            area.titled(self.title, (family, 26).into_font().color(&BLACK)).map_err(drawing_error)?
        };

        let (x_range, y_range) = self.ranges();
        let entries = self.legend_entries();
        let legend_font = (family, 16).into_font().color(&BLACK);
        let (body_w, _) = body.dim_in_pixel();
        let mut label_w = 0;
        for e in &entries {
            label_w = label_w.max(body.estimate_text_size(&e.label, &legend_font).map_err(drawing_error)?.0);
        }
        // Swatch and padding around the widest label, but never more than
        // 40% of the width: an absurdly long name runs off the edge instead
        // of squeezing the plot to nothing.
        let legend_w = if entries.is_empty() { 0 } else { (label_w + 70).min(body_w * 2 / 5) };
        let (plot_area, legend_area) = body.split_horizontally(body_w - legend_w);

        const MARGIN: i32 = 10;
        let x_ticks = tick_formatter(x_range);
        let y_ticks = tick_formatter(y_range);
        let mut chart = ChartBuilder::on(&plot_area)
            .margin(MARGIN)
            .x_label_area_size(60)
            .y_label_area_size(75)
            .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)
            .map_err(drawing_error)?;
        chart
            .configure_mesh()
            .x_desc(self.x_label)
            .y_desc(self.y_label)
            .axis_desc_style((family, 18).into_font().color(&BLACK))
            .label_style((family, 15).into_font().color(&BLACK))
            .bold_line_style(RGBColor(220, 220, 220))
            .light_line_style(RGBColor(244, 244, 244))
            .max_light_lines(4)
            .x_labels(TICKS)
            .y_labels(TICKS)
            .x_label_formatter(&x_ticks)
            .y_label_formatter(&y_ticks)
            .draw()
            .map_err(drawing_error)?;

        let n = self.series.len();
        for (j, (_, value)) in self.reference_lines.iter().enumerate() {
            if value.is_finite() {
                let style = PALETTE[(n + j) % PALETTE.len()].stroke_width(2);
                let line = [(x_range.0, *value), (x_range.1, *value)];
                chart.draw_series(DashedLineSeries::new(line, 10, 6, style)).map_err(drawing_error)?;
            }
        }
        // Curves after reference lines, so that a curve crossing a baseline
        // stays visible on top of it.
        for (i, s) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let segments = finite_segments(&s.points);
            let markers = shows_markers(&s.points);
            chart
                .draw_series(segments.iter().map(|seg| PathElement::new(seg.clone(), color.stroke_width(2))))
                .map_err(drawing_error)?;
            // A lone point between NaNs has no line to show it: dot it
            // even on a dense curve.
            let dots = segments.iter().filter(|seg| markers || seg.len() == 1).flatten();
            chart.draw_series(dots.map(|&p| Circle::new(p, 3, color.filled()))).map_err(drawing_error)?;
        }

        if !entries.is_empty() {
            draw_legend(&legend_area, &entries, legend_font, MARGIN)?;
        }
        Ok(())
    }

    /// Each axis spans the finite values, reference lines included in y,
    /// padded by 5% on each side.
    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        let points = || self.series.iter().flat_map(|s| &s.points).filter(|(x, y)| x.is_finite() && y.is_finite());
        let x = padded_range(points().map(|p| p.0));
        let y = padded_range(points().map(|p| p.1).chain(self.reference_lines.iter().map(|r| r.1)));
        (x, y)
    }

    fn legend_entries(&self) -> Vec<LegendEntry> {
        let n = self.series.len();
        let curves = self.series.iter().enumerate().map(|(i, s)| LegendEntry {
            label: s.name.clone(),
            color: PALETTE[i % PALETTE.len()],
            dashed: false,
            marker: shows_markers(&s.points),
        });
        let references = self.reference_lines.iter().enumerate().map(|(j, (name, value))| LegendEntry {
            label: format!("{name} ({})", fmt_metric(*value)),
            color: PALETTE[(n + j) % PALETTE.len()],
            dashed: true,
            marker: false,
        });
        curves.chain(references).collect()
    }
}

/// A boxed legend, one entry per row, its top level with the plot's top.
/// Drawn by hand rather than with plotters' series labels, which can only
/// sit inside the plot and would cover curves.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[LegendEntry],
    font: TextStyle<'_>,
    top: i32,
) -> Result<()> {
    const ROW_H: i32 = 26;
    let (w, _) = area.dim_in_pixel();
    let right = i32::try_from(w).unwrap_or(i32::MAX) - 2;
    // Rows past the image's height are invisible anyway; the cap only keeps
    // the arithmetic below from overflowing.
    let rows = i32::try_from(entries.len()).unwrap_or(i32::MAX).min(10_000);
    let frame = ShapeStyle { color: RGBColor(190, 190, 190).to_rgba(), filled: false, stroke_width: 1 };
    area.draw(&Rectangle::new([(0, top), (right, top + rows * ROW_H + 12)], frame)).map_err(drawing_error)?;
    let font = font.pos(Pos::new(HPos::Left, VPos::Center));
    for (k, e) in (0..).zip(entries) {
        let y = top + 6 + k * ROW_H + ROW_H / 2;
        let (x0, x1) = (10, 42);
        let style = e.color.stroke_width(2);
        if e.dashed {
            area.draw(&DashedPathElement::new(vec![(x0, y), (x1, y)], 8, 4, style)).map_err(drawing_error)?;
        } else {
            area.draw(&PathElement::new(vec![(x0, y), (x1, y)], style)).map_err(drawing_error)?;
        }
        if e.marker {
            area.draw(&Circle::new(((x0 + x1) / 2, y), 3, e.color.filled())).map_err(drawing_error)?;
        }
        area.draw(&Text::new(e.label.as_str(), (x1 + 10, y), font.clone())).map_err(drawing_error)?;
    }
    Ok(())
}

/// `(min, max)` of the finite values padded by 5% of the span on each side.
/// A single value gets ±5% of itself (±0.5 if zero), and no values at all
/// the range 0 to 1, so that an empty run still yields a chart.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.05
    } else if lo != 0.0 {
        lo.abs() * 0.05
    } else {
        0.5
    };
    (lo - pad, hi + pad)
}

/// The runs of consecutive finite points.
fn finite_segments(points: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    points.split(|(x, y)| !(x.is_finite() && y.is_finite())).filter(|seg| !seg.is_empty()).map(<[_]>::to_vec).collect()
}

/// Whether a curve is sparse enough to get a dot per point.
fn shows_markers(points: &[(f64, f64)]) -> bool {
    points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()).count() <= MAX_POINTS_WITH_MARKERS
}

/// Labels for the ticks of an axis spanning `range`: every label gets the
/// same number of decimals, enough to tell neighbouring ticks apart, and
/// magnitudes too large or small for plain decimals to fit the label area
/// switch to scientific notation.
fn tick_formatter(range: (f64, f64)) -> impl Fn(&f64) -> String {
    let magnitude = range.0.abs().max(range.1.abs());
    // plotters puts at most `TICKS` ticks on the axis, so they are at least
    // this far apart.
    let spacing = (range.1 - range.0) / TICKS as f64;
    let scientific = !(1e-3..1e6).contains(&magnitude);
    let decimals = (-spacing.log10().floor()).clamp(0.0, 9.0) as usize;
    move |&x| {
        // The tick at zero is computed, and may come out as ±1e-17.
        if x.abs() < spacing * 1e-6 {
            "0".to_owned()
        } else if scientific {
            format!("{x:.2e}")
        } else {
            format!("{x:.decimals$}")
        }
    }
}

fn append_extension(stem: &Path, ext: &str) -> PathBuf {
    let mut name = OsString::from(stem.as_os_str());
    name.push(".");
    name.push(ext);
    PathBuf::from(name)
}

/// A temporary file in `dir`, which must be the target's directory for the
/// final rename to be atomic.
fn temp_file_in(dir: &Path, suffix: &str) -> Result<NamedTempFile> {
    tempfile::Builder::new()
        .prefix(crate::checkpoint::TEMP_PREFIX)
        .suffix(suffix)
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))
}

/// Makes the finished temporary file durable and renames it to `path`.
fn publish(tmp: NamedTempFile, path: &Path) -> Result<()> {
    // Temporary files are created owner-only; charts are meant to be shared
    // like any other output file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file().set_permissions(fs::Permissions::from_mode(0o644))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn drawing_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_only_font_registers_and_lays_out_text() {
        let family = "negcache-test-metrics-only";
        assert!(register_font(family, FontStyle::Normal, Box::leak(metrics_only_font().into_boxed_slice())).is_ok());
        let series = [Series::new("cache <loss>", vec![(0.0, 2.0), (1.0, 1.5), (2.0, 1.2)])];
        let refs = [("BM25".to_owned(), 1.3)];
        let chart = Chart {
            family,
            title: "No font",
            x_label: "step",
            y_label: "loss",
            series: &series,
            reference_lines: &refs,
        };
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
            chart.draw(&root).unwrap();
            root.present().unwrap();
        }
        // Text is there (escaped) even though the font has no glyphs.
        assert!(svg.contains("cache &lt;loss&gt;"), "{svg}");
        assert!(svg.contains("BM25 (1.3000)"));
        assert!(svg.contains("No font"));

        // The bitmap backend draws nothing for the glyphless font but still
        // draws the chart.
        let (w, h) = CHART_SIZE;
        let mut pixels = vec![0_u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut pixels, CHART_SIZE).into_drawing_area();
            chart.draw(&root).unwrap();
            root.present().unwrap();
        }
        assert!(pixels.chunks_exact(3).any(|p| p == [31, 119, 180]), "the first series' colour is drawn");
    }

    #[test]
    fn ranges_are_padded_and_degenerate_cases_are_usable() {
        assert_eq!(padded_range([0.0, 10.0].into_iter()), (-0.5, 10.5));
        assert_eq!(padded_range([2.0].into_iter()), (1.9, 2.1));
        assert_eq!(padded_range([0.0, f64::NAN].into_iter()), (-0.5, 0.5));
        assert_eq!(padded_range(std::iter::empty()), (0.0, 1.0));
    }

    #[test]
    fn non_finite_points_split_the_line() {
        let segs = finite_segments(&[(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0), (3.0, 4.0), (f64::INFINITY, 0.0)]);
        assert_eq!(segs, vec![vec![(0.0, 1.0)], vec![(2.0, 3.0), (3.0, 4.0)]]);
    }

    #[test]
    fn tick_labels_have_consistent_decimals() {
        let steps = tick_formatter((-500.0, 10500.0));
        assert_eq!(steps(&2000.0), "2000");
        assert_eq!(steps(&-1e-13), "0");
        let recall = tick_formatter((0.18, 0.42));
        assert_eq!(recall(&0.2), "0.20");
        assert_eq!(recall(&0.25), "0.25");
        let big = tick_formatter((0.0, 3e6));
        assert_eq!(big(&2.5e6), "2.50e6");
        let small = tick_formatter((0.0, 2e-4));
        assert_eq!(small(&1e-4), "1.00e-4");
    }

    #[test]
    fn stems_keep_their_dots() {
        assert_eq!(append_extension(Path::new("runs/v1.2/recall"), "svg"), PathBuf::from("runs/v1.2/recall.svg"));
        assert_eq!(append_extension(Path::new("lr0.1"), "png"), PathBuf::from("lr0.1.png"));
    }
}
