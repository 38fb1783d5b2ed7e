//! `lightbox bench --quick` runs, measures every part and fills every
//! table (the etcd rows where etcd is installed, a "skipped" line where
//! not), and draws the charts: the command cannot rot. No number is
//! checked against a speed (numbers belong to the benchmark): what is
//! checked is what must hold whatever the machine, such as CACHED reads
//! calling no upstream and answering with both upstreams down. With
//! `LIGHTBOX_REQUIRE_ETCD=1` (CI) the etcd rows must be there.

use std::{ffi::OsStr, process::Command};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_lightbox");

fn rows<'a>(report: &'a Value, part: &str) -> &'a Vec<Value> {
    report[part]
        .as_array()
        .unwrap_or_else(|| panic!("no {part} in the report"))
}

fn number(row: &Value, path: &[&str]) -> f64 {
    let mut value = row;
    for key in path {
        value = &value[key];
    }
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {row}"))
}

/// Runs `lightbox bench --quick --json` with `args`; answers its report.
fn bench_json(args: &[&OsStr]) -> Value {
    let output = Command::new(BIN)
        .args(["bench", "--quick", "--json"])
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap_or_else(|err| panic!("run lightbox bench: {err}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "lightbox bench --quick {args:?} failed: {stderr}"
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| panic!("the report is not JSON ({err}): {stderr}"))
}

#[test]
fn bench_quick_measures_every_part_and_draws_the_charts() {
    let charts = tempfile::tempdir().unwrap_or_else(|err| panic!("a temporary directory: {err}"));
    let report = bench_json(&["--plot".as_ref(), charts.path().as_os_str()]);
    assert!(report["header"]["cores"].as_u64().is_some_and(|cores| cores >= 1));
    assert_eq!(report["header"]["quick"], Value::Bool(true));
    let etcd = !rows(&report, "skipped")
        .iter()
        .any(|line| line.as_str().is_some_and(|l| l.starts_with("etcd")));
    if std::env::var_os("LIGHTBOX_REQUIRE_ETCD").is_some_and(|on| on == "1") {
        assert!(
            etcd,
            "LIGHTBOX_REQUIRE_ETCD=1, and the bench skipped etcd: {:?}",
            report["skipped"]
        );
    }

    // Slowness: two delays, two modes; CACHED calls no upstream, FRESH does.
    let slowness = rows(&report, "slowness");
    assert_eq!(slowness.len(), 4, "{slowness:?}");
    for row in slowness {
        let calls = number(row, &["upstream_calls_per_request"]);
        match row["mode"].as_str() {
            Some("CACHED") => assert_eq!(calls, 0.0, "a cached read calls no upstream: {row}"),
            Some("FRESH") => assert!(calls >= 2.0, "a fresh read calls Users and Contracts: {row}"),
            other => panic!("mode {other:?}"),
        }
        assert!(number(row, &["latency", "p99_ms"]).is_finite());
    }

    // Propagation: measured.
    assert!(number(&report["propagation"], &["p99_ms"]).is_finite());

    // Outages: four scenarios, two modes; CACHED answers through all of them.
    let outage = rows(&report, "outage");
    assert_eq!(outage.len(), 8, "{outage:?}");
    for row in outage {
        let success = number(row, &["success_rate"]);
        match (row["scenario"].as_str(), row["mode"].as_str()) {
            (_, Some("CACHED")) => assert_eq!(success, 1.0, "CACHED keeps answering: {row}"),
            (Some("both down"), Some("FRESH")) => assert_eq!(success, 0.0, "FRESH needs its upstreams: {row}"),
            _ => {}
        }
    }

    // Many users: each client count has CACHED, FRESH and the ceiling.
    let load = rows(&report, "load");
    assert_eq!(load.len(), 6, "{load:?}");
    for row in load {
        assert!(number(row, &["requests_per_s"]) > 0.0, "{row}");
        assert_eq!(number(row, &["errors"]), 0.0, "{row}");
        if row["cell"] == "CACHED" {
            assert_eq!(number(row, &["upstream_calls_per_s"]), 0.0, "{row}");
        }
    }

    // Fan-out: every write reached every watcher, on every system measured.
    let fanout = rows(&report, "fanout");
    assert_eq!(fanout.len(), if etcd { 6 } else { 3 }, "{fanout:?}");
    for row in fanout {
        let (watchers, writes) = (number(row, &["watchers"]), number(row, &["writes"]));
        assert_eq!(number(row, &["deliveries"]), watchers * writes, "{row}");
        assert!(number(row, &["writer", "p99_ms"]).is_finite(), "{row}");
        assert!(number(row, &["writes_per_s"]) > 0.0, "{row}");
        if watchers > 0.0 {
            assert!(number(row, &["last", "p99_ms"]).is_finite(), "{row}");
            // Compared with the writer alone at the same pace.
            assert!(number(row, &["writer_vs_alone"]) > 0.0, "{row}");
        }
    }

    // Unary: two client counts, Lightbox and (where installed) etcd.
    let unary = rows(&report, "unary");
    assert_eq!(unary.len(), if etcd { 4 } else { 2 }, "{unary:?}");

    // The charts.
    for chart in ["slowness.svg", "outage.svg", "load.svg", "fanout.svg", "memory.svg"] {
        let text = std::fs::read_to_string(charts.path().join(chart)).unwrap_or_else(|err| panic!("{chart}: {err}"));
        assert!(text.contains("<svg"), "{chart} is an SVG");
    }
}

/// A part left out with `--only` is named among the skipped, so that its
/// empty table is not read as a measurement of nothing.
#[test]
fn bench_only_names_the_parts_it_left_out() {
    let report = bench_json(&["--no-etcd", "--only", "unary"].map(OsStr::new));
    let skipped: Vec<&str> = rows(&report, "skipped").iter().filter_map(Value::as_str).collect();
    for part in ["slowness, outages, many users", "watch fan-out"] {
        assert!(
            skipped.contains(&format!("{part}: not run (--only)").as_str()),
            "{part} among the skipped: {skipped:?}"
        );
    }
    assert!(!skipped.iter().any(|line| line.starts_with("unary")), "{skipped:?}");
    assert!(!rows(&report, "unary").is_empty(), "the part asked for ran");
    assert!(rows(&report, "fanout").is_empty() && rows(&report, "slowness").is_empty());
}
