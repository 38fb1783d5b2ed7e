//! The line chart every part but the outages draws (a marker on every
//! point, NaN points skipped, log or linear axes chosen from the values),
//! and what every chart shares: size, font, colors, legend.

use plotters::{
    coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter},
    prelude::*,
};

use crate::harness::Res;

/// The size of every chart, in pixels.
pub(super) const SIZE: (u32, u32) = (800, 480);
/// The font every text is written in (the viewer's own sans-serif).
pub(super) const FONT: &str = "sans-serif";

/// How an axis maps its values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Scale {
    Linear,
    Log,
    /// Logarithmic when the values are all positive and span more than
    /// [`LOG_SPAN`], else linear.
    Auto,
}

/// Largest over smallest beyond which [`Scale::Auto`] is logarithmic.
const LOG_SPAN: f64 = 50.0;

/// One line: its points in any order, NaN ones included (skipped).
pub(super) struct Series {
    pub(super) label: String,
    pub(super) color: RGBColor,
    pub(super) dashed: bool,
    pub(super) points: Vec<(f64, f64)>,
}

/// A chart of lines with a marker on every point.
pub(super) struct LineChart {
    pub(super) title: &'static str,
    pub(super) x_desc: &'static str,
    pub(super) y_desc: &'static str,
    pub(super) x_scale: Scale,
    pub(super) y_scale: Scale,
    pub(super) legend: SeriesLabelPosition,
    pub(super) series: Vec<Series>,
}

impl LineChart {
    /// The SVG document, or `None` when no point can be drawn.
    pub(super) fn render(mut self) -> Res<Option<String>> {
        let x_log = self.x_scale == Scale::Log;
        let y_log = match self.y_scale {
            Scale::Linear => false,
            Scale::Log => true,
            Scale::Auto => {
                let ys: Vec<f64> = self
                    .series
                    .iter()
                    .flat_map(|s| &s.points)
                    .filter(|p| p.0.is_finite() && (!x_log || p.0 > 0.0))
                    .map(|p| p.1)
                    .filter(|y| y.is_finite())
                    .collect();
                let (low, high) = bounds(&ys);
                low > 0.0 && high / low > LOG_SPAN
            }
        };
        for series in &mut self.series {
            series.points.retain(|&(x, y)| drawable(x, x_log) && drawable(y, y_log));
            series.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        self.series.retain(|s| !s.points.is_empty());
        if self.series.is_empty() {
            return Ok(None);
        }
        let xs: Vec<f64> = self.series.iter().flat_map(|s| &s.points).map(|p| p.0).collect();
        let ys: Vec<f64> = self.series.iter().flat_map(|s| &s.points).map(|p| p.1).collect();
        let x = if x_log {
            log_range(&xs, 1.25)
        } else {
            linear_range(&xs, 0.05, 0.05, false)
        };
        // Headroom above the lines for the legend.
        let y = if y_log {
            log_range(&ys, 1.5)
        } else {
            linear_range(&ys, 0.05, 0.2, true)
        };
        let x_desc = if x_log {
            format!("{} (log scale)", self.x_desc)
        } else {
            self.x_desc.to_owned()
        };
        let y_desc = if y_log {
            format!("{} (log scale)", self.y_desc)
        } else {
            self.y_desc.to_owned()
        };
        let descs = (x_desc.as_str(), y_desc.as_str());
        let svg = match (x_log, y_log) {
            (false, false) => self.draw(descs, x, y)?,
            (false, true) => self.draw(descs, x, y.log_scale())?,
            (true, false) => self.draw(descs, x.log_scale().with_key_points(ticks(&xs)), y)?,
            (true, true) => self.draw(descs, x.log_scale().with_key_points(ticks(&xs)), y.log_scale())?,
        };
        Ok(Some(svg))
    }

    fn draw<X, Y>(&self, (x_desc, y_desc): (&str, &str), x: X, y: Y) -> Res<String>
    where
        X: AsRangedCoord<Value = f64>,
        Y: AsRangedCoord<Value = f64>,
        X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
        Y::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(self.title, (FONT, 22))
                .margin(16)
                .x_label_area_size(50)
                .y_label_area_size(72)
                .build_cartesian_2d(x, y)?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .x_label_formatter(&|v| num(*v))
                .y_label_formatter(&|v| num(*v))
                .axis_desc_style((FONT, 15))
                .label_style((FONT, 13))
                .light_line_style(RGBColor(238, 238, 238))
                .draw()?;
            for series in &self.series {
                let style = series.color.stroke_width(2);
                let points = series.points.iter().copied();
                if series.dashed {
                    chart
                        .draw_series(DashedLineSeries::new(points, 8, 5, style))?
                        .label(series.label.as_str())
                        .legend(move |(x, y)| {
                            EmptyElement::at((x, y))
                                + PathElement::new(vec![(0, 0), (8, 0)], style)
                                + PathElement::new(vec![(13, 0), (20, 0)], style)
                        });
                } else {
                    chart
                        .draw_series(LineSeries::new(points, style))?
                        .label(series.label.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                }
                let marker = series.color.filled();
                chart.draw_series(series.points.iter().map(|&p| Circle::new(p, 3, marker)))?;
            }
            legend(&mut chart, self.legend.clone())?;
            root.present()?;
        }
        Ok(svg)
    }
}

/// Draws the legend of `chart` at `position`, over a white box.
pub(super) fn legend<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> Res<()>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .position(position)
        .margin(12)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}

/// One series per name (in order of first appearance) of `rows`, with the
/// point each row gives (`None`: not on this chart).
pub(super) fn by_name<R>(
    rows: &[R],
    name: impl Fn(&R) -> &String,
    point: impl Fn(&R) -> Option<(f64, f64)>,
) -> Vec<Series> {
    distinct(rows.iter().map(|r| name(r).as_str()))
        .into_iter()
        .enumerate()
        .map(|(index, label)| Series {
            label: label.to_owned(),
            color: color(label, index),
            dashed: false,
            points: rows.iter().filter(|r| name(r) == label).filter_map(&point).collect(),
        })
        .collect()
}

/// The values of `names` without repeats, in order of first appearance.
pub(super) fn distinct<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = Vec::new();
    for name in names {
        if !seen.contains(&name) {
            seen.push(name);
        }
    }
    seen
}

/// The color of a series: the same one for a mode, cell or system on every
/// chart; others take the palette in turn.
pub(super) fn color(name: &str, index: usize) -> RGBColor {
    const PALETTE: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    match name {
        "CACHED" | "Lightbox" => PALETTE[0],
        "FRESH" => PALETTE[1],
        "etcd" => PALETTE[2],
        "minimal tonic server" => RGBColor(110, 110, 110),
        _ => PALETTE[index % PALETTE.len()],
    }
}

/// Whether `value` can be placed on an axis (finite; positive on a log one).
fn drawable(value: f64, log: bool) -> bool {
    value.is_finite() && (!log || value > 0.0)
}

/// Smallest and largest of `values` (NaN, NaN when empty).
fn bounds(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::NAN, f64::NAN), |(low, high), &v| (low.min(v), high.max(v)))
}

/// A linear axis over `values` (not empty, finite), padded by the shares
/// `below` and `above` of its span; from 0 when `from_zero` and the values
/// are positive. A single value gets a span around it.
fn linear_range(values: &[f64], below: f64, above: f64, from_zero: bool) -> std::ops::Range<f64> {
    let (mut low, high) = bounds(values);
    if from_zero && low > 0.0 {
        low = 0.0;
    }
    if high - low <= f64::EPSILON * high.abs().max(1.0) {
        let half = if high.abs() > 0.0 { high.abs() * 0.5 } else { 1.0 };
        return if from_zero && low >= 0.0 {
            0.0..high + half * 2.0
        } else {
            low - half..high + half
        };
    }
    let span = high - low;
    let low = if from_zero && low == 0.0 {
        0.0
    } else {
        low - span * below
    };
    low..high + span * above
}

/// A log axis over `values` (not empty, positive), widened by `factor` on
/// each side (by at least 2 when there is one value).
fn log_range(values: &[f64], factor: f64) -> std::ops::Range<f64> {
    let (low, high) = bounds(values);
    let factor = if high / low < 1.0 + 1e-9 {
        factor.max(2.0)
    } else {
        factor
    };
    low / factor..high * factor
}

/// The tick marks of a log x axis: the values measured, at most a dozen.
fn ticks(values: &[f64]) -> Vec<f64> {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    values.dedup();
    let step = values.len().div_ceil(12).max(1);
    values.into_iter().step_by(step).collect()
}

/// A tick label: whole numbers as such, others with up to three decimals.
fn num(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude < 1e-9 {
        return "0".into();
    }
    let text = if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    };
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_never_empty() {
        for values in [&[0.0][..], &[5.0], &[-3.0], &[2.0, 2.0]] {
            let range = linear_range(values, 0.05, 0.2, true);
            assert!(range.end > range.start, "{values:?}: {range:?}");
            let range = linear_range(values, 0.05, 0.05, false);
            assert!(range.end > range.start, "{values:?}: {range:?}");
        }
        let range = log_range(&[10.0], 1.25);
        assert!(range.start < 10.0 && range.end > 10.0);
        assert_eq!(ticks(&[100.0, 1.0, 100.0, 10_000.0]), [1.0, 100.0, 10_000.0]);
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(num(10_000.0), "10000");
        assert_eq!(num(2.5), "2.5");
        assert_eq!(num(0.30000000000000004), "0.3");
        assert_eq!(num(-0.0), "0");
        assert_eq!(num(16.0), "16");
    }
}
