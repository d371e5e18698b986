//! A parser of the Prometheus text exposition format (0.0.4, and the sample lines of
//! OpenMetrics), for asserting on what `/metrics` (the sidecar) or `/stats/prometheus`
//! (Envoy) report. Samples are matched by their exact name and exact label set, so a test
//! never counts a neighbouring series by accident: histograms are their `_bucket` (with
//! `le`), `_sum` and `_count` samples, each looked up by that name.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// One sample line: `name{labels} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Everything one scrape reported.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    samples: Vec<Sample>,
    types: HashMap<String, String>,
    help: HashMap<String, String>,
}

/// A line that is not valid exposition format, with its (1-based) number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for ParseError {}

/// Parses a scrape; panics (naming the line) on anything malformed, which is what a test
/// wants from an exporter that must emit valid text.
pub fn parse(text: &str) -> Samples {
    try_parse(text).unwrap_or_else(|e| panic!("invalid exposition format: {e}\n{text}"))
}

pub fn try_parse(text: &str) -> Result<Samples, ParseError> {
    let mut samples = Samples::default();
    for (i, line) in text.lines().enumerate() {
        let fail = |reason: String| ParseError {
            line: i + 1,
            reason,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            samples.comment(comment).map_err(fail)?;
            continue;
        }
        samples.samples.push(sample(line).map_err(fail)?);
    }
    Ok(samples)
}

impl Samples {
    /// The value of the one sample named `name` whose labels are exactly `labels` (no more,
    /// no fewer; order does not matter). `&[]` matches `name 3` and `name{} 3` alike.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && same_labels(&s.labels, labels))
            .map(|s| s.value)
    }

    /// Every sample named exactly `name`, whatever its labels.
    pub fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The sum over every series named `name` (0 when there is none).
    pub fn sum(&self, name: &str) -> f64 {
        self.series(name).map(|s| s.value).sum()
    }

    /// The `# TYPE` of a family (`counter`, `gauge`, `histogram`, ...).
    pub fn type_of(&self, family: &str) -> Option<&str> {
        self.types.get(family).map(String::as_str)
    }

    pub fn help(&self, family: &str) -> Option<&str> {
        self.help.get(family).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// `# HELP name text`, `# TYPE name type`; any other comment is ignored.
    fn comment(&mut self, comment: &str) -> Result<(), String> {
        let comment = comment.trim_start();
        let (keyword, rest) = comment.split_once(' ').unwrap_or((comment, ""));
        let (family, text) = rest.trim_start().split_once(' ').unwrap_or((rest, ""));
        match keyword {
            "HELP" | "TYPE" if family.is_empty() => Err(format!("`# {keyword}` without a name")),
            "HELP" => {
                self.help.insert(family.into(), unescape_help(text));
                Ok(())
            }
            "TYPE" => {
                self.types.insert(family.into(), text.trim().into());
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn same_labels(have: &BTreeMap<String, String>, want: &[(&str, &str)]) -> bool {
    have.len() == want.len()
        && want
            .iter()
            .all(|(k, v)| have.get(*k).is_some_and(|have| have == v))
}

/// `name`, optional `{labels}`, value, optional timestamp.
fn sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .ok_or_else(|| format!("no value in `{line}`"))?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err(format!("invalid metric name `{name}`"));
    }
    let after_name = line[name_end..].trim_start();
    let (labels, rest) = match after_name.strip_prefix('{') {
        Some(after) => labels(after)?,
        None => (BTreeMap::new(), after_name),
    };
    let mut fields = rest.split_ascii_whitespace();
    let value = fields
        .next()
        .ok_or_else(|| format!("no value for `{name}`"))?;
    let value = number(value).ok_or_else(|| format!("invalid value `{value}` for `{name}`"))?;
    if let Some(ts) = fields.next()
        && ts.parse::<f64>().is_err()
    {
        return Err(format!("invalid timestamp `{ts}` for `{name}`"));
    }
    if let Some(extra) = fields.next() {
        return Err(format!("unexpected `{extra}` after the sample of `{name}`"));
    }
    Ok(Sample {
        name: name.into(),
        labels,
        value,
    })
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The labels after `{`, up to its `}`; returns them and what follows.
fn labels(mut s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let eq = s.find('=').ok_or("a label without `=`")?;
        let key = s[..eq].trim();
        if !valid_name(key) || key.contains(':') {
            return Err(format!("invalid label name `{key}`"));
        }
        let after = s[eq + 1..].trim_start();
        let quoted = after
            .strip_prefix('"')
            .ok_or_else(|| format!("label `{key}`: value not quoted"))?;
        let (value, rest) =
            label_value(quoted).ok_or_else(|| format!("label `{key}`: unterminated value"))?;
        if labels.insert(key.to_owned(), value).is_some() {
            return Err(format!("label `{key}` given twice"));
        }
        s = rest.trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err(format!("expected `,` or `}}` after label `{key}`"));
        }
    }
}

/// An escaped label value up to its closing quote (`\\`, `\"`, `\n`); the value and the
/// rest of the line after the quote.
fn label_value(s: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

fn unescape_help(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some('n')) => {
                out.push('\n');
                chars.next();
            }
            ('\\', Some('\\')) => {
                out.push('\\');
                chars.next();
            }
            (c, _) => out.push(c),
        }
    }
    out
}

/// Go's `ParseFloat` spellings the format allows, `+Inf`/`-Inf`/`NaN` included.
fn number(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIDECAR: &str = r#"# HELP eventwire_ingest_requests_total Answered requests.
# TYPE eventwire_ingest_requests_total counter
eventwire_ingest_requests_total{outcome="accepted"} 5
eventwire_ingest_requests_total{outcome="invalid-cloudevent"} 2
# HELP eventwire_produce_duration_seconds Time to ack.
# TYPE eventwire_produce_duration_seconds histogram
eventwire_produce_duration_seconds_sum 0.0123
eventwire_produce_duration_seconds_count 3
eventwire_produce_duration_seconds_bucket{le="0.001"} 0
eventwire_produce_duration_seconds_bucket{le="0.005"} 2
eventwire_produce_duration_seconds_bucket{le="+Inf"} 3
# TYPE eventwire_push_consumer_lag gauge
eventwire_push_consumer_lag{topic="orders",partition="0"} 4
eventwire_push_consumer_lag{partition="1",topic="orders"} 0
eventwire_events_in_flight 0
"#;

    #[test]
    fn names_and_label_sets_match_exactly() {
        let s = parse(SIDECAR);
        let requests = "eventwire_ingest_requests_total";
        assert_eq!(s.get(requests, &[("outcome", "accepted")]), Some(5.0));
        assert_eq!(
            s.get(requests, &[("outcome", "invalid-cloudevent")]),
            Some(2.0)
        );
        assert_eq!(
            s.get(requests, &[]),
            None,
            "a subset of labels does not match"
        );
        assert_eq!(
            s.get(requests, &[("outcome", "accepted"), ("x", "y")]),
            None,
            "nor does a superset"
        );
        assert_eq!(
            s.get("eventwire_ingest_requests", &[("outcome", "accepted")]),
            None
        );
        assert_eq!(s.sum(requests), 7.0);
        assert_eq!(s.series(requests).count(), 2);
        let lag = "eventwire_push_consumer_lag";
        assert_eq!(
            s.get(lag, &[("partition", "0"), ("topic", "orders")]),
            Some(4.0)
        );
        assert_eq!(
            s.get(lag, &[("topic", "orders"), ("partition", "1")]),
            Some(0.0)
        );
        assert_eq!(s.get("eventwire_events_in_flight", &[]), Some(0.0));
        assert_eq!(s.type_of(requests), Some("counter"));
        assert_eq!(s.help(requests), Some("Answered requests."));
        assert_eq!(s.type_of(lag), Some("gauge"));
        assert_eq!(s.len(), 10);
    }

    #[test]
    fn histograms_are_their_bucket_sum_and_count() {
        let s = parse(SIDECAR);
        let h = "eventwire_produce_duration_seconds";
        assert_eq!(s.type_of(h), Some("histogram"));
        assert_eq!(s.get(&format!("{h}_count"), &[]), Some(3.0));
        assert_eq!(s.get(&format!("{h}_sum"), &[]), Some(0.0123));
        let bucket = format!("{h}_bucket");
        assert_eq!(s.get(&bucket, &[("le", "+Inf")]), Some(3.0));
        assert_eq!(s.get(&bucket, &[("le", "0.005")]), Some(2.0));
        assert_eq!(s.get(h, &[]), None);
    }

    #[test]
    fn envoy_style_lines_and_escapes() {
        let text = concat!(
            "# TYPE envoy_cluster_upstream_rq counter\n",
            "envoy_cluster_upstream_rq{} 3\n",
            "envoy_cluster_upstream_rq{envoy_response_code=\"202\",envoy_cluster_name=\"sidecar\"} 9\n",
            "envoy_server_live{} 1 1700000000000\n",
            "odd{path=\"a\\\"b\\\\c\\nd\",empty=\"\",} -Inf\n",
            "nan_gauge NaN\n",
            "spaced { a = \"1\" , b=\"x,}y\" } 2.5e3\n",
            "# a free comment\n",
            "\n",
        );
        let s = parse(text);
        assert_eq!(s.get("envoy_cluster_upstream_rq", &[]), Some(3.0));
        assert_eq!(
            s.get(
                "envoy_cluster_upstream_rq",
                &[
                    ("envoy_cluster_name", "sidecar"),
                    ("envoy_response_code", "202")
                ]
            ),
            Some(9.0)
        );
        assert_eq!(s.get("envoy_server_live", &[]), Some(1.0));
        assert_eq!(
            s.get("odd", &[("path", "a\"b\\c\nd"), ("empty", "")]),
            Some(f64::NEG_INFINITY)
        );
        assert!(s.get("nan_gauge", &[]).is_some_and(f64::is_nan));
        assert_eq!(s.get("spaced", &[("a", "1"), ("b", "x,}y")]), Some(2500.0));
        assert_eq!(s.len(), 6);
    }

    #[test]
    fn malformed_lines_are_named() {
        let cases = [
            ("m", "no value"),
            ("m{a=\"1\"}", "no value"),
            ("m{a=1} 2", "not quoted"),
            ("m{a=\"1} 2", "unterminated"),
            ("m{a=\"1\" b=\"2\"} 2", "expected"),
            ("m{a=\"1\",a=\"2\"} 2", "twice"),
            ("m{1a=\"1\"} 2", "invalid label name"),
            ("9m 2", "invalid metric name"),
            ("m two", "invalid value"),
            ("m 1 2 3", "unexpected"),
            ("# TYPE", "without a name"),
        ];
        for (line, reason) in cases {
            let text = format!("ok 1\n{line}\n");
            let e = try_parse(&text).expect_err(line);
            assert_eq!(e.line, 2, "{line}");
            assert!(e.reason.contains(reason), "{line}: {e}");
        }
    }
}
