//! What the tests share: reading one sample out of OpenMetrics text.

#![allow(dead_code, reason = "each test binary uses part of it")]

/// The sum of the samples named `name` whose labels include every one of
/// `labels` (0 if there is none): with every label given, one series' value.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(parse_line)
        .filter(|(n, ls, _)| *n == name && labels.iter().all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v)))
        .map(|(_, _, value)| value)
        .sum()
}

/// A sample's labels, unescaped.
type Labels = Vec<(String, String)>;

/// `name{k="v",…} value` or `name value` → its parts; `None` if malformed.
fn parse_line(line: &str) -> Option<(&str, Labels, f64)> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, rest) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, rest)
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, Vec::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// `k="v",k2="v2"} rest` → the pairs (unescaped) and `rest`.
fn parse_labels(mut s: &str) -> Option<(Labels, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches(',');
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        s = &rest[end + 1..];
    }
}
