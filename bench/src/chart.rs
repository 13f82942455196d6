//! A grouped bar chart as a PNG, drawn with plotters' bitmap backend. The font is DejaVu Sans,
//! compiled in, so no system fonts (or fontconfig) are needed.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

const FONT: &str = "sans-serif";

/// One series of bars: a value per category (`None` or a non-positive value: no bar).
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: (u8, u8, u8),
    pub values: Vec<Option<f64>>,
}

/// Why the chart could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the chart: {0}")]
pub struct ChartError(String);

fn err<E: std::fmt::Debug>(e: E) -> ChartError {
    ChartError(format!("{e:?}"))
}

fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TrueType file, so this only fails if it is not.
        let _ = register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Draws `series` as groups of bars, one group per category, on a logarithmic value axis.
/// Categories are labelled with up to two lines (split at `\n`).
pub fn bar_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[Series],
) -> Result<(), ChartError> {
    register();
    let values = series
        .iter()
        .flat_map(|s| s.values.iter().flatten().copied())
        .filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo > hi { (1.0, 10.0) } else { (lo, hi) };
    // Bars start from a whole decade; the top leaves room for the legend.
    let y_min = 10f64.powf(lo.log10().floor());
    let y_max = hi * 3.0;
    let n = categories.len().max(1) as f64;

    let root = BitMapBackend::new(path, (1400, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 26))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..n, (y_min..y_max).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(y_label)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .y_label_formatter(&|v| format_count(*v))
        .draw()
        .map_err(err)?;

    let width = 0.8 / series.len().max(1) as f64;
    for (si, s) in series.iter().enumerate() {
        let (r, g, b) = s.color;
        let color = RGBColor(r, g, b);
        let bars = s.values.iter().enumerate().filter_map(|(ci, v)| {
            let v = (*v).filter(|v| *v > 0.0)?;
            let x0 = ci as f64 + 0.1 + si as f64 * width;
            Some(Rectangle::new(
                [(x0, y_min), (x0 + width * 0.92, v)],
                color.filled(),
            ))
        });
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(s.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT, 16))
        .draw()
        .map_err(err)?;

    // Category labels under each group, in pixels below the x axis.
    let style = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (ci, label) in categories.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(ci as f64 + 0.5, y_min));
        for (line, text) in label.split('\n').take(2).enumerate() {
            root.draw(&Text::new(
                text.to_string(),
                (x, y + 8 + 18 * line as i32),
                style.clone(),
            ))
            .map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// One line of [`line_chart`]: points (x, y) drawn in one of the chart's panels.
#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    pub color: (u8, u8, u8),
    /// Which panel (0 the top one).
    pub panel: usize,
    pub points: Vec<(f64, f64)>,
}

/// Draws `lines` over a shared x axis, in panels stacked top to bottom (one per `y_labels`
/// entry), each on a linear value axis from 0.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_labels: &[&str],
    lines: &[Line],
) -> Result<(), ChartError> {
    register();
    let panels = y_labels.len().max(1);
    let x_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(0f64, f64::max)
        .max(1e-3);
    let root = BitMapBackend::new(path, (1400, 420 * panels as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, (FONT, 26)).map_err(err)?;
    for (i, area) in root.split_evenly((panels, 1)).iter().enumerate() {
        let mine: Vec<&Line> = lines.iter().filter(|l| l.panel == i).collect();
        let y_max = mine
            .iter()
            .flat_map(|l| l.points.iter().map(|p| p.1))
            .fold(0f64, f64::max)
            * 1.25;
        let mut chart = ChartBuilder::on(area)
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(90)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max.max(1.0))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_labels.get(i).copied().unwrap_or(""))
            .label_style((FONT, 16))
            .axis_desc_style((FONT, 18))
            .draw()
            .map_err(err)?;
        for l in mine {
            let (r, g, b) = l.color;
            let color = RGBColor(r, g, b);
            let drawn = chart
                .draw_series(std::iter::once(PathElement::new(
                    l.points.clone(),
                    color.stroke_width(2),
                )))
                .map_err(err)?;
            // A line without a name continues an earlier one's legend entry.
            if !l.name.is_empty() {
                drawn.label(l.name.clone()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 3), (x + 14, y + 3)], color.filled())
                });
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font((FONT, 16))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// `1.2k`, `35k`, `1.1M` for axis labels.
fn format_count(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.png");
        bar_chart(
            &path,
            "test",
            "IOPS",
            &["a\nqd1".to_string(), "b\nqd32".to_string()],
            &[
                Series {
                    name: "one".into(),
                    color: (200, 0, 0),
                    values: vec![Some(1000.0), Some(50_000.0)],
                },
                Series {
                    name: "two".into(),
                    color: (0, 0, 200),
                    values: vec![None, Some(70_000.0)],
                },
            ],
        )
        .expect("chart drawn");
        let bytes = std::fs::read(&path).expect("png written");
        assert_eq!(&bytes[1..4], b"PNG");
    }

    #[test]
    fn draws_lines_in_panels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("l.png");
        let line = |name: &str, panel, points: Vec<(f64, f64)>| Line {
            name: name.into(),
            color: (200, 0, 0),
            panel,
            points,
        };
        line_chart(
            &path,
            "test",
            "minutes",
            &["RSS (MiB)", "fds"],
            &[
                line("rss", 0, vec![(0.0, 20.0), (1.0, 22.0)]),
                line("", 0, vec![(1.5, 18.0), (2.0, 21.0)]),
                line("fds", 1, vec![(0.0, 40.0), (2.0, 41.0)]),
            ],
        )
        .expect("chart drawn");
        let bytes = std::fs::read(&path).expect("png written");
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(bytes.len() > 1000, "{} bytes", bytes.len());
    }
}
