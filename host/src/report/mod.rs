//! Reporting on training runs: metric logs, charts and summary tables.
//!
//! * [`log`]: [`MetricsLog`] writes per-step metrics as CSV or JSON Lines,
//!   row by row, and [`read_series`] reads them back.
//! * [`plot`]: [`line_chart`] draws curves and baselines as SVG and PNG.
//! * [`table`]: [`markdown_table`] and [`fmt_metric`] for text summaries.

pub mod log;
pub mod plot;
pub mod table;

pub use log::{column_points, read_series, LogFormat, MetricsLog, Row, STEP_COLUMN, WALL_COLUMN};
pub use plot::{line_chart, png_font, Series, CHART_SIZE, FONT_ENV};
pub use table::{fmt_metric, markdown_table};
