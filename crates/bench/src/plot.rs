//! Charts of a [`Report`] (`lightbox bench --plot DIR`): one SVG file per
//! part that has data, 800×480, each with a title, axis labels with their
//! units and a legend.
//!
//! Only plotters' SVG backend is built: text is written as `<text>`
//! elements that the viewer lays out, so no font files are read (the
//! layout uses plotters' estimate of a text's width). Values that were not
//! measured (NaN) are never drawn; a chart with nothing left to draw is not
//! written.

mod line;

use std::path::{Path, PathBuf};

use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use self::line::{FONT, LineChart, SIZE, Scale, Series, by_name, color, distinct, legend};
use crate::{
    harness::Res,
    report::{FanoutRow, LoadRow, OutageRow, Report, SlownessRow},
};

const SLOWNESS_TITLE: &str = "Slowness: ListPhotos latency vs latency injected per upstream";
const OUTAGE_TITLE: &str = "Down or overloaded: ListPhotos answered OK while upstreams fail";
const LOAD_TITLE: &str = "Many users: ListPhotos throughput vs concurrent clients";
const FANOUT_TITLE: &str = "Watch fan-out: write acknowledged to last watcher, p99";
const MEMORY_TITLE: &str = "Watch fan-out: server memory per idle watch stream";

/// Writes the charts of `report` into `dir` (created if missing):
/// `slowness.svg`, `outage.svg`, `load.svg`, `fanout.svg` and `memory.svg`,
/// each only if its part of the report has something to draw. Returns the
/// paths written, in that order.
pub fn write_charts(report: &Report, dir: &Path) -> Res<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let charts = [
        ("slowness.svg", slowness(&report.slowness)?),
        ("outage.svg", outage(&report.outage)?),
        ("load.svg", load(&report.load)?),
        ("fanout.svg", fanout(&report.fanout)?),
        ("memory.svg", memory(&report.fanout)?),
    ];
    let mut written = Vec::new();
    for (name, svg) in charts {
        if let Some(svg) = svg {
            let path = dir.join(name);
            std::fs::write(&path, svg).map_err(|e| format!("writing {}: {e}", path.display()))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// `ListPhotos` p99 (solid) and p50 (dashed) against the injected delay, per mode.
fn slowness(rows: &[SlownessRow]) -> Res<Option<String>> {
    let mut series = Vec::new();
    for (index, mode) in distinct(rows.iter().map(|r| r.mode.as_str())).into_iter().enumerate() {
        let of_mode = || rows.iter().filter(move |r| r.mode == mode);
        for (quantile, dashed, pick) in [
            ("p99", false, pick_p99 as fn(&SlownessRow) -> f64),
            ("p50", true, pick_p50),
        ] {
            series.push(Series {
                label: format!("{mode} {quantile}"),
                color: color(mode, index),
                dashed,
                points: of_mode().map(|r| (r.delay_ms as f64, pick(r))).collect(),
            });
        }
    }
    LineChart {
        title: SLOWNESS_TITLE,
        x_desc: "latency injected on each upstream, ms",
        y_desc: "ListPhotos latency, ms",
        x_scale: Scale::Linear,
        y_scale: Scale::Auto,
        legend: SeriesLabelPosition::UpperLeft,
        series,
    }
    .render()
}

fn pick_p99(row: &SlownessRow) -> f64 {
    row.latency.p99_ms
}

fn pick_p50(row: &SlownessRow) -> f64 {
    row.latency.p50_ms
}

/// Requests per second against concurrent clients, per cell.
fn load(rows: &[LoadRow]) -> Res<Option<String>> {
    LineChart {
        title: LOAD_TITLE,
        x_desc: "concurrent clients, one request in flight each",
        y_desc: "answers per second",
        x_scale: Scale::Log,
        y_scale: Scale::Auto,
        legend: SeriesLabelPosition::UpperLeft,
        series: by_name(rows, |r| &r.cell, |r| Some((r.clients as f64, r.requests_per_s))),
    }
    .render()
}

/// Last-watcher p99 against watchers, per system (the writer alone skipped).
fn fanout(rows: &[FanoutRow]) -> Res<Option<String>> {
    LineChart {
        title: FANOUT_TITLE,
        x_desc: "watch streams",
        y_desc: "write acknowledged to last watcher, p99, ms",
        x_scale: Scale::Log,
        y_scale: Scale::Auto,
        legend: SeriesLabelPosition::UpperLeft,
        series: by_name(
            rows,
            |r| &r.system,
            |r| (r.watchers > 0).then_some((r.watchers as f64, r.last.p99_ms)),
        ),
    }
    .render()
}

/// Server memory per idle stream against watchers, per system.
fn memory(rows: &[FanoutRow]) -> Res<Option<String>> {
    LineChart {
        title: MEMORY_TITLE,
        x_desc: "watch streams",
        y_desc: "server memory per stream, KiB",
        x_scale: Scale::Log,
        y_scale: Scale::Auto,
        legend: SeriesLabelPosition::UpperRight,
        series: by_name(
            rows,
            |r| &r.system,
            |r| {
                r.memory_per_stream_kib
                    .filter(|_| r.watchers > 0)
                    .map(|kib| (r.watchers as f64, kib))
            },
        ),
    }
    .render()
}

/// Success rate per scenario: one bar per mode, grouped by scenario.
fn outage(rows: &[OutageRow]) -> Res<Option<String>> {
    let scenarios = distinct(rows.iter().map(|r| r.scenario.as_str()));
    let modes = distinct(rows.iter().map(|r| r.mode.as_str()));
    // (scenario, mode, percent), measured ones only.
    let bars: Vec<(usize, usize, f64)> = rows
        .iter()
        .filter(|r| r.success_rate.is_finite())
        .filter_map(|r| {
            let scenario = scenarios.iter().position(|s| *s == r.scenario)?;
            let mode = modes.iter().position(|m| *m == r.mode)?;
            Some((scenario, mode, r.success_rate.clamp(0.0, 1.0) * 100.0))
        })
        .collect();
    if bars.is_empty() {
        return Ok(None);
    }

    // Integer axes, so that their tick marks can be chosen (plotters has no
    // labels for chosen ticks on an f64 axis): x in hundredths of a
    // scenario's slot, y in tenths of a percent.
    const SLOT: i32 = 100;
    const PERCENT: i32 = 10;
    let slots = scenarios.len() as i32;
    let x = (-SLOT / 2..slots * SLOT - SLOT / 2).with_key_points((0..slots).map(|i| i * SLOT).collect());
    // Room above 100 % for the legend and the values written over the bars.
    let y = (0..125 * PERCENT).with_key_points((0..=5).map(|i| i * 20 * PERCENT).collect());
    let scenario_label = |v: &i32| {
        if v % SLOT == 0 {
            usize::try_from(v / SLOT)
                .ok()
                .and_then(|i| scenarios.get(i))
                .map_or_else(String::new, |s| (*s).to_owned())
        } else {
            String::new()
        }
    };
    let percent_label = |v: &i32| (v / PERCENT).to_string();
    let width = SLOT * 8 / 10 / modes.len().max(1) as i32;
    let gap = (width / 12).max(1);
    let height = |pct: f64| (pct * f64::from(PERCENT)).round() as i32;
    let value_style = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(OUTAGE_TITLE, (FONT, 22))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(64)
            .build_cartesian_2d(x, y)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("what is wrong with the upstreams")
            .y_desc("answered OK, %")
            .x_label_formatter(&scenario_label)
            .y_label_formatter(&percent_label)
            .axis_desc_style((FONT, 15))
            .label_style((FONT, 13))
            .draw()?;
        for (m, mode) in modes.iter().enumerate() {
            let fill = color(mode, m).filled();
            let left = |scenario: usize| scenario as i32 * SLOT - SLOT * 4 / 10 + m as i32 * width;
            let mine = || bars.iter().filter(move |b| b.1 == m);
            chart
                .draw_series(mine().map(|&(s, _, pct)| {
                    Rectangle::new([(left(s) + gap, 0), (left(s) + width - gap, height(pct))], fill)
                }))?
                .label(*mode)
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], fill));
            chart.draw_series(mine().map(|&(s, _, pct)| {
                Text::new(
                    format!("{pct:.1} %"),
                    (left(s) + width / 2, height(pct)),
                    value_style.clone(),
                )
            }))?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        root.present()?;
    }
    Ok(Some(svg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Latency;

    fn latency(p50_ms: f64, p99_ms: f64) -> Latency {
        Latency {
            p50_ms,
            p99_ms,
            max_ms: p99_ms * 1.5,
        }
    }

    fn slowness(delay_ms: u64, mode: &str, p50_ms: f64, p99_ms: f64) -> SlownessRow {
        SlownessRow {
            delay_ms,
            mode: mode.into(),
            requests: 100,
            latency: latency(p50_ms, p99_ms),
            upstream_calls_per_request: if mode == "FRESH" { 2.0 } else { 0.0 },
        }
    }

    fn outage(scenario: &str, mode: &str, success_rate: f64) -> OutageRow {
        OutageRow {
            scenario: scenario.into(),
            mode: mode.into(),
            requests: 100,
            success_rate,
            latency: latency(1.0, 2.0),
        }
    }

    fn fanout(system: &str, watchers: usize, last_p99_ms: f64, memory_per_stream_kib: Option<f64>) -> FanoutRow {
        FanoutRow {
            system: system.into(),
            watchers,
            writes: 10,
            writes_per_s: 50.0,
            deliveries: 10 * watchers,
            each: latency(last_p99_ms / 2.0, last_p99_ms),
            last: latency(last_p99_ms / 2.0, last_p99_ms),
            last_from_send: latency(last_p99_ms, last_p99_ms * 2.0),
            events_per_s: 1000.0,
            memory_per_stream_kib,
            writer: latency(0.5, 1.0),
            server_cpu_us_per_delivery: None,
            writer_vs_alone: None,
            runs_last_p99_ms: vec![last_p99_ms],
            runs_writer_p99_ms: vec![1.0],
        }
    }

    fn read(path: &Path) -> Res<String> {
        Ok(std::fs::read_to_string(path)?)
    }

    fn assert_svg(text: &str, title: &str) {
        assert!(
            text.starts_with("<svg") || text.starts_with("<?xml"),
            "{}",
            &text[..text.len().min(200)]
        );
        assert!(text.trim_end().ends_with("</svg>"));
        assert!(text.contains(title), "{title} in the chart");
        assert!(!text.contains("NaN"), "no NaN drawn");
    }

    #[test]
    fn every_part_with_data_gets_its_chart_and_the_empty_one_none() -> Res<()> {
        let report = Report {
            slowness: vec![
                slowness(0, "CACHED", 0.4, 0.9),
                slowness(0, "FRESH", 0.8, 1.6),
                slowness(50, "CACHED", 0.4, f64::NAN),
                slowness(50, "FRESH", 101.0, 104.0),
                slowness(200, "FRESH", 401.0, 409.0),
                slowness(200, "CACHED", 0.5, 1.0),
            ],
            outage: vec![
                outage("Users down", "CACHED", 1.0),
                outage("Users down", "FRESH", 0.0),
                outage("both at 30 % errors", "CACHED", 0.997),
                outage("both at 30 % errors", "FRESH", f64::NAN),
            ],
            load: Vec::new(),
            fanout: vec![
                fanout("Lightbox", 0, f64::NAN, None),
                fanout("Lightbox", 1, 0.3, Some(f64::NAN)),
                fanout("Lightbox", 100, 0.9, Some(12.5)),
                fanout("Lightbox", 10_000, 40.0, Some(9.0)),
                fanout("etcd", 1, 0.5, None),
                fanout("etcd", 100, 3.0, Some(30.0)),
            ],
            ..Report::default()
        };
        let dir = tempfile::TempDir::new()?;
        let out = dir.path().join("charts");
        let written = write_charts(&report, &out)?;
        let names: Vec<String> = written
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["slowness.svg", "outage.svg", "fanout.svg", "memory.svg"]);
        assert!(!out.join("load.svg").exists(), "no chart for the empty part");

        let slowness = read(&out.join("slowness.svg"))?;
        assert_svg(&slowness, SLOWNESS_TITLE);
        for label in [
            "CACHED p99",
            "CACHED p50",
            "FRESH p99",
            "FRESH p50",
            "latency injected on each upstream, ms",
        ] {
            assert!(slowness.contains(label), "{label} in the slowness chart");
        }
        let outage = read(&out.join("outage.svg"))?;
        assert_svg(&outage, OUTAGE_TITLE);
        for label in ["Users down", "both at 30 % errors", "99.7 %", "CACHED", "FRESH"] {
            assert!(outage.contains(label), "{label} in the outage chart");
        }
        let fanout = read(&out.join("fanout.svg"))?;
        assert_svg(&fanout, FANOUT_TITLE);
        for label in ["Lightbox", "etcd", "10000", "(log scale)"] {
            assert!(fanout.contains(label), "{label} in the fan-out chart");
        }
        assert_svg(&read(&out.join("memory.svg"))?, MEMORY_TITLE);
        Ok(())
    }

    #[test]
    fn one_point_nothing_measured_and_nothing_at_all_do_not_panic() -> Res<()> {
        let dir = tempfile::TempDir::new()?;
        // Nothing at all: no file, the directory still made.
        assert!(write_charts(&Report::default(), dir.path())?.is_empty());

        // Rows, but nothing measured: no file either.
        let unmeasured = Report {
            slowness: vec![slowness(10, "CACHED", f64::NAN, f64::NAN)],
            outage: vec![outage("both down", "FRESH", f64::NAN)],
            fanout: vec![fanout("etcd", 0, 1.0, Some(3.0))],
            ..Report::default()
        };
        assert!(write_charts(&unmeasured, dir.path())?.is_empty());

        // One point per chart (degenerate ranges), zero values included.
        let single = Report {
            slowness: vec![slowness(0, "CACHED", 0.0, 0.0)],
            outage: vec![outage("both down", "FRESH", 0.0)],
            load: vec![LoadRow {
                clients: 1,
                cell: "minimal tonic server".into(),
                requests_per_s: 5000.0,
                latency: latency(0.1, 0.2),
                upstream_calls_per_s: 0.0,
                errors: 0,
            }],
            fanout: vec![fanout("Lightbox", 1, 0.2, Some(4.0))],
            ..Report::default()
        };
        let written = write_charts(&single, &dir.path().join("single"))?;
        assert_eq!(written.len(), 5);
        assert_svg(&read(&dir.path().join("single/load.svg"))?, LOAD_TITLE);
        Ok(())
    }
}
