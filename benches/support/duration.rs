//! Durations on the command line. Included by the benches with duration
//! flags (`#[path = "support/duration.rs"]`).

use std::time::Duration;

/// `500ms`, `2s`, `1.5s`, `250 ms`, `1m` (or `1min`); a bare number is
/// seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: f64 = number.parse().map_err(|e| format!("{text:?}: {e}"))?;
    let seconds = match unit.trim() {
        "ms" => number / 1e3,
        "s" => number,
        "m" | "min" => number * 60.0,
        other => return Err(format!("{text:?}: unit {other:?} (ms, s or m)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}
