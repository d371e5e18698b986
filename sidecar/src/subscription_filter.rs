//! Subscription filters in the CloudEvents Subscriptions API dialects: `exact`, `prefix`,
//! `suffix` (attribute -> value, all must hold), `all`, `any` (arrays of filters) and `not`
//! (one filter). Pure code: parsing with errors that name the part at fault, and matching.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use thiserror::Error;

/// An event's context attributes (extensions included) as strings, the form filters compare.
pub type Attributes = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    Exact(Vec<(String, String)>),
    Prefix(Vec<(String, String)>),
    Suffix(Vec<(String, String)>),
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
}

/// A malformed filter; `path` names the part, e.g. `filter[1].prefix`.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{path}: {reason}")]
pub struct FilterError {
    pub path: String,
    pub reason: String,
}

const DIALECTS: &str = "`exact`, `prefix`, `suffix`, `all`, `any` or `not`";
/// Deeper nesting is certainly a mistake, and the limit keeps recursion bounded.
const MAX_DEPTH: usize = 32;

impl Filter {
    /// Parses the `filter` query parameter: one filter object, or an array of filters that
    /// must all hold (the Subscriptions API's `filters` member).
    pub fn parse(text: &str) -> Result<Filter, FilterError> {
        let value: Value = serde_json::from_str(text).map_err(|e| FilterError {
            path: "filter".into(),
            reason: format!("not JSON: {e}"),
        })?;
        Filter::from_value(&value, "filter")
    }

    /// A filter given as a JSON value (a token's forced filter); errors name `path`.
    pub fn from_value(value: &Value, path: &str) -> Result<Filter, FilterError> {
        match value {
            Value::Array(items) => list(items, path, 0).map(Filter::All),
            other => parse_value(other, path, 0),
        }
    }

    /// Both filters must hold (a token's forced filter and the subscriber's own).
    pub fn and(forced: Option<Filter>, own: Option<Filter>) -> Option<Filter> {
        match (forced, own) {
            (Some(f), Some(o)) => Some(Filter::All(vec![f, o])),
            (f, o) => f.or(o),
        }
    }

    pub fn matches(&self, attrs: &Attributes) -> bool {
        let pairs_hold = |pairs: &[(String, String)], test: fn(&str, &str) -> bool| {
            pairs
                .iter()
                .all(|(name, want)| attrs.get(name).is_some_and(|have| test(have, want)))
        };
        match self {
            Filter::Exact(p) => pairs_hold(p, |have, want| have == want),
            Filter::Prefix(p) => pairs_hold(p, |have, want| have.starts_with(want)),
            Filter::Suffix(p) => pairs_hold(p, |have, want| have.ends_with(want)),
            Filter::All(fs) => fs.iter().all(|f| f.matches(attrs)),
            Filter::Any(fs) => fs.iter().any(|f| f.matches(attrs)),
            Filter::Not(f) => !f.matches(attrs),
        }
    }
}

fn fail(path: &str, reason: impl Into<String>) -> FilterError {
    FilterError {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn parse_value(value: &Value, path: &str, depth: usize) -> Result<Filter, FilterError> {
    if depth > MAX_DEPTH {
        return Err(fail(path, format!("nested deeper than {MAX_DEPTH} levels")));
    }
    let Value::Object(object) = value else {
        return Err(fail(
            path,
            format!("a filter is a JSON object with one of {DIALECTS}"),
        ));
    };
    let mut members = object.iter();
    let (Some((dialect, body)), None) = (members.next(), members.next()) else {
        return Err(fail(
            path,
            format!("a filter has exactly one member, one of {DIALECTS}"),
        ));
    };
    let here = format!("{path}.{dialect}");
    match dialect.as_str() {
        "exact" => pairs(body, &here).map(Filter::Exact),
        "prefix" => pairs(body, &here).map(Filter::Prefix),
        "suffix" => pairs(body, &here).map(Filter::Suffix),
        "all" => array(body, &here, depth).map(Filter::All),
        "any" => array(body, &here, depth).map(Filter::Any),
        "not" => parse_value(body, &here, depth + 1).map(|f| Filter::Not(Box::new(f))),
        "sql" => Err(fail(&here, "the CESQL dialect is not supported")),
        other => Err(fail(
            path,
            format!("unknown dialect `{other}`; use one of {DIALECTS}"),
        )),
    }
}

fn array(body: &Value, path: &str, depth: usize) -> Result<Vec<Filter>, FilterError> {
    match body {
        Value::Array(items) if !items.is_empty() => list(items, path, depth + 1),
        Value::Array(_) => Err(fail(path, "needs at least one filter")),
        _ => Err(fail(path, "must be an array of filters")),
    }
}

fn list(items: &[Value], path: &str, depth: usize) -> Result<Vec<Filter>, FilterError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_value(item, &format!("{path}[{i}]"), depth))
        .collect()
}

fn pairs(body: &Value, path: &str) -> Result<Vec<(String, String)>, FilterError> {
    let Value::Object(object) = body else {
        return Err(fail(
            path,
            "must be an object of attribute names to string values",
        ));
    };
    if object.is_empty() {
        return Err(fail(path, "names no attribute"));
    }
    object
        .iter()
        .map(|(name, value)| {
            if !is_attribute_name(name) {
                return Err(fail(
                    path,
                    format!("{name:?} is not a CloudEvents attribute name (lower-case a-z, 0-9)"),
                ));
            }
            match value {
                Value::String(s) => Ok((name.clone(), s.clone())),
                _ => Err(fail(path, format!("value of {name:?} must be a string"))),
            }
        })
        .collect()
}

fn is_attribute_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// The attributes of a structured-mode event; `data` is not an attribute. Non-string values
/// (possible in structured mode) compare in their JSON text form, like `true` or `3`.
pub fn attributes_of(event: &Map<String, Value>) -> Attributes {
    event
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "data" | "data_base64"))
        .filter_map(|(name, value)| {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Bool(_) | Value::Number(_) => value.to_string(),
                _ => return None,
            };
            Some((name.clone(), text))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attrs(pairs: &[(&str, &str)]) -> Attributes {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn check(filter: &str, event: &[(&str, &str)]) -> bool {
        Filter::parse(filter).unwrap().matches(&attrs(event))
    }

    const EVENT: &[(&str, &str)] = &[
        ("id", "ord-1"),
        ("type", "com.example.order.placed"),
        ("subject", "customer-42"),
        ("tenant", "acme"),
    ];

    #[test]
    fn exact_prefix_suffix() {
        assert!(check(r#"{"exact":{"subject":"customer-42"}}"#, EVENT));
        assert!(!check(r#"{"exact":{"subject":"customer-4"}}"#, EVENT));
        assert!(check(r#"{"prefix":{"type":"com.example.order."}}"#, EVENT));
        assert!(!check(
            r#"{"prefix":{"type":"com.example.payment."}}"#,
            EVENT
        ));
        assert!(check(r#"{"suffix":{"type":".placed"}}"#, EVENT));
        assert!(!check(r#"{"suffix":{"type":".cancelled"}}"#, EVENT));
        // Several attributes in one dialect must all hold; extensions count.
        assert!(check(
            r#"{"exact":{"subject":"customer-42","tenant":"acme"}}"#,
            EVENT
        ));
        assert!(!check(
            r#"{"exact":{"subject":"customer-42","tenant":"x"}}"#,
            EVENT
        ));
        // A missing attribute never matches, not even an empty prefix.
        assert!(!check(r#"{"prefix":{"missing":""}}"#, EVENT));
        assert!(!check(r#"{"exact":{"missing":""}}"#, EVENT));
    }

    #[test]
    fn all_any_not_and_implicit_all() {
        let order = r#"{"prefix":{"type":"com.example.order."}}"#;
        let other = r#"{"exact":{"subject":"customer-7"}}"#;
        assert!(check(&format!(r#"{{"any":[{other},{order}]}}"#), EVENT));
        assert!(!check(&format!(r#"{{"all":[{other},{order}]}}"#), EVENT));
        assert!(check(&format!(r#"{{"all":[{order}]}}"#), EVENT));
        assert!(check(&format!(r#"{{"not":{other}}}"#), EVENT));
        assert!(!check(&format!(r#"{{"not":{order}}}"#), EVENT));
        assert!(check(&format!(r#"[{order},{{"not":{other}}}]"#), EVENT));
        assert!(!check(&format!(r#"[{order},{other}]"#), EVENT));
        assert!(check(r#"[]"#, EVENT), "no filters: everything");
        assert!(
            check(r#"{"not":{"exact":{"missing":"x"}}}"#, EVENT),
            "not of a missing attribute holds"
        );
    }

    #[test]
    fn malformed_filters_name_the_part() {
        let cases = [
            ("nope", "filter", "not JSON"),
            ("3", "filter", "JSON object"),
            ("{}", "filter", "exactly one member"),
            (
                r#"{"exact":{},"prefix":{}}"#,
                "filter",
                "exactly one member",
            ),
            (
                r#"{"exakt":{"a":"b"}}"#,
                "filter",
                "unknown dialect `exakt`",
            ),
            (r#"{"exact":{}}"#, "filter.exact", "names no attribute"),
            (r#"{"exact":"type"}"#, "filter.exact", "must be an object"),
            (
                r#"[{"exact":{"a":"b"}},{"prefix":{"type":1}}]"#,
                "filter[1].prefix",
                r#"value of "type" must be a string"#,
            ),
            (
                r#"{"suffix":{"Type":"x"}}"#,
                "filter.suffix",
                "not a CloudEvents attribute",
            ),
            (r#"{"all":[]}"#, "filter.all", "at least one"),
            (r#"{"any":{}}"#, "filter.any", "must be an array"),
            (r#"{"any":[{"not":5}]}"#, "filter.any[0].not", "JSON object"),
            (r#"{"sql":"a = 'b'"}"#, "filter.sql", "not supported"),
        ];
        for (text, path, reason) in cases {
            let e = Filter::parse(text).unwrap_err();
            assert_eq!(e.path, path, "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
        let deep = format!(
            "{}{}{}",
            r#"{"not":"#.repeat(40),
            r#"{"exact":{"a":"b"}}"#,
            "}".repeat(40)
        );
        assert!(Filter::parse(&deep).unwrap_err().reason.contains("deeper"));
    }

    #[test]
    fn attributes_of_structured_event() {
        let event = json!({"id": "1", "type": "t", "flag": true, "count": 3,
            "data": {"x": 1}, "data_base64": "AA==", "nested": {"a": 1}});
        let Value::Object(map) = event else {
            unreachable!()
        };
        let a = attributes_of(&map);
        assert_eq!(
            a,
            attrs(&[("count", "3"), ("flag", "true"), ("id", "1"), ("type", "t")])
        );
    }

    type Overrides<'a> = &'a [(&'a str, &'a str)];

    /// The CESQL TCK's "Subscriptions API recreations": each expression rewritten in the
    /// dialects it recreates, over the TCK's default event with its overrides.
    #[test]
    fn cesql_subscriptions_api_recreations() {
        let prefix_src = r#"{"prefix":{"source":"https://"}}"#;
        let prefix_ext = r#"{"prefix":{"myext":"custom"}}"#;
        let suffix_type = r#"{"suffix":{"type":".error"}}"#;
        let suffix_ext = r#"{"suffix":{"myext":"ext"}}"#;
        let exact_id = r#"{"exact":{"id":"myId"}}"#;
        let exact_ext = r#"{"exact":{"myext":"customext"}}"#;
        let id_my = r#"{"prefix":{"id":"my"}}"#;
        let src_ca = r#"{"suffix":{"source":".ca"}}"#;
        let dnf = r#"{"any":[{"all":[{"exact":{"id":"myId"}},{"suffix":{"type":".success"}}]},
            {"all":[{"exact":{"id":"notmyId"}},{"prefix":{"source":"http://"}},{"suffix":{"type":".warning"}}]}]}"#;
        let cnf = r#"[{"any":[{"exact":{"id":"myId"}},{"suffix":{"type":".success"}}]},
            {"any":[{"exact":{"id":"notmyId"}},{"prefix":{"source":"https://"}},{"suffix":{"type":".warning"}}]}]"#;
        let cnf5 = r#"[{"any":[{"exact":{"id":"myId"}},{"suffix":{"type":".success"}}]},
            {"any":[{"exact":{"id":"notmyId"}},{"prefix":{"source":"https://"}},{"suffix":{"type":".warning"}}]},
            {"exact":{"myext":"customext"}}]"#;
        let and = |a: &str, b: &str| format!(r#"{{"all":[{a},{b}]}}"#);
        let or = |a: &str, b: &str| format!(r#"{{"any":[{a},{b}]}}"#);
        let cases: Vec<(&str, String, Overrides, bool)> = vec![
            (
                "Prefix filter (1)",
                prefix_src.into(),
                &[("source", "https://example.com")],
                true,
            ),
            (
                "Prefix filter (2)",
                prefix_src.into(),
                &[("source", "http://example.com")],
                false,
            ),
            (
                "Prefix on extension",
                prefix_ext.into(),
                &[("myext", "customext")],
                true,
            ),
            ("Prefix on missing extension", prefix_ext.into(), &[], false),
            (
                "Suffix filter (1)",
                suffix_type.into(),
                &[("type", "com.github.error")],
                true,
            ),
            (
                "Suffix filter (2)",
                suffix_type.into(),
                &[("type", "com.github.success")],
                false,
            ),
            (
                "Suffix on extension",
                suffix_ext.into(),
                &[("myext", "customext")],
                true,
            ),
            ("Suffix on missing extension", suffix_ext.into(), &[], false),
            ("Exact filter (1)", exact_id.into(), &[("id", "myId")], true),
            (
                "Exact filter (2)",
                exact_id.into(),
                &[("id", "notmyId")],
                false,
            ),
            (
                "Exact on extension",
                exact_ext.into(),
                &[("myext", "customext")],
                true,
            ),
            ("Exact on missing extension", exact_ext.into(), &[], false),
            (
                "Prefix AND Suffix (1)",
                and(id_my, src_ca),
                &[("id", "myId"), ("source", "http://www.some-website.ca")],
                true,
            ),
            (
                "Prefix AND Suffix (2)",
                and(id_my, src_ca),
                &[("id", "myId"), ("source", "http://www.some-website.com")],
                false,
            ),
            (
                "Prefix AND Suffix (3)",
                and(prefix_ext, suffix_type),
                &[("myext", "customext"), ("type", "com.github.error")],
                true,
            ),
            (
                "Prefix AND Suffix (4)",
                and(r#"{"prefix":{"type":"example."}}"#, prefix_ext),
                &[("type", "example.event.type")],
                false,
            ),
            (
                "Prefix OR Suffix (1)",
                or(id_my, src_ca),
                &[("id", "myId"), ("source", "http://www.some-website.ca")],
                true,
            ),
            (
                "Prefix OR Suffix (2)",
                or(id_my, src_ca),
                &[("id", "myId"), ("source", "http://www.some-website.com")],
                true,
            ),
            (
                "Prefix OR Suffix (3)",
                or(id_my, src_ca),
                &[("id", "notmyId"), ("source", "http://www.some-website.ca")],
                true,
            ),
            (
                "Prefix OR Suffix (4)",
                or(id_my, src_ca),
                &[("id", "notmyId"), ("source", "http://www.some-website.com")],
                false,
            ),
            (
                "DNF (1)",
                dnf.into(),
                &[("id", "myId"), ("type", "example.event.success")],
                true,
            ),
            (
                "DNF (2)",
                dnf.into(),
                &[
                    ("id", "notmyId"),
                    ("type", "example.event.warning"),
                    ("source", "http://localhost.localdomain"),
                ],
                true,
            ),
            (
                "DNF (3)",
                dnf.into(),
                &[
                    ("id", "notmyId"),
                    ("type", "example.event.warning"),
                    ("source", "https://localhost.localdomain"),
                ],
                false,
            ),
            (
                "CNF (1)",
                cnf.into(),
                &[
                    ("id", "myId"),
                    ("type", "example.event.warning"),
                    ("source", "http://localhost.localdomain"),
                ],
                true,
            ),
            (
                "CNF (2)",
                cnf.into(),
                &[
                    ("id", "notmyId"),
                    ("type", "example.event.success"),
                    ("source", "http://localhost.localdomain"),
                ],
                true,
            ),
            (
                "CNF (3)",
                cnf.into(),
                &[
                    ("id", "notmyId"),
                    ("type", "example.event.warning"),
                    ("source", "http://localhost.localdomain"),
                ],
                false,
            ),
            (
                "CNF (4)",
                cnf.into(),
                &[
                    ("id", "myId"),
                    ("type", "example.event.success"),
                    ("source", "http://localhost.localdomain"),
                ],
                false,
            ),
            (
                "CNF (5)",
                cnf5.into(),
                &[
                    ("id", "myId"),
                    ("type", "example.event.warning"),
                    ("source", "http://localhost.localdomain"),
                ],
                false,
            ),
        ];
        for (name, filter, overrides, expected) in cases {
            // The TCK's default event; overrides replace its attributes.
            let mut event = attrs(&[
                ("specversion", "1.0"),
                ("id", "123"),
                ("source", "from-galaxy-far-far-away"),
                ("type", "cesql.tck"),
            ]);
            event.extend(attrs(overrides));
            assert_eq!(check_attrs(&filter, &event), expected, "{name}");
        }
    }

    fn check_attrs(filter: &str, event: &Attributes) -> bool {
        Filter::parse(filter)
            .unwrap_or_else(|e| panic!("{filter}: {e}"))
            .matches(event)
    }
}
