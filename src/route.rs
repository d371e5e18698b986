//! Route matching: which rule (if any) a request belongs to.
//!
//! Patterns are compiled once at configure time; matching walks the path's segments without
//! allocating, because it runs for every request on every route, enabled or not.

use std::fmt;

/// One segment of a compiled path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: any single segment.
    Any,
    /// `{name}`: any single segment, captured for `path_param` keys.
    Param(String),
    /// `**` (last only): the rest of the path, zero or more segments.
    Rest,
}

/// A compiled path pattern such as `/orders/{id}/items/*` or `/events/**`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternError(pub String);

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PathPattern {
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        let Some(rest) = pattern.strip_prefix('/') else {
            return Err(PatternError("must start with '/'".into()));
        };
        if pattern.contains(['?', '#']) {
            return Err(PatternError(
                "must not contain '?' or '#' (the query is not matched)".into(),
            ));
        }
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let mut segments = Vec::with_capacity(parts.len());
        let mut names: Vec<&str> = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let seg = match *part {
                "**" if i + 1 == parts.len() => Segment::Rest,
                "**" => {
                    return Err(PatternError(
                        "'**' is allowed only as the last segment".into(),
                    ));
                }
                "*" => Segment::Any,
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => {
                    let name = &p[1..p.len() - 1];
                    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                        return Err(PatternError(format!(
                            "parameter name '{name}' may hold only letters, digits and '_'"
                        )));
                    }
                    if names.contains(&name) {
                        return Err(PatternError(format!("parameter '{name}' appears twice")));
                    }
                    names.push(name);
                    Segment::Param(name.to_string())
                }
                p if p.contains(['{', '}', '*']) => {
                    return Err(PatternError(format!(
                        "segment '{p}': use a whole segment '*', '**' or '{{name}}'"
                    )));
                }
                p => Segment::Literal(p.to_string()),
            };
            segments.push(seg);
        }
        Ok(PathPattern { segments })
    }

    pub fn has_param(&self, name: &str) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Param(n) if n == name))
    }

    /// Matches the path part of a `:path` (the query string is ignored).
    pub fn matches(&self, path: &str) -> bool {
        self.walk(path, None).is_some()
    }

    /// The raw (still percent-encoded) segment captured by `{name}`.
    pub fn capture<'p>(&self, path: &'p str, name: &str) -> Option<&'p str> {
        self.walk(path, Some(name)).flatten()
    }

    /// Walks pattern and path together. Outer `None`: no match; inner: the capture, if asked.
    fn walk<'p>(&self, path: &'p str, want: Option<&str>) -> Option<Option<&'p str>> {
        let path = strip_query(path);
        let mut parts = path.strip_prefix('/')?.split('/');
        // "/" has one empty segment; treat it as none so that pattern "/" matches it.
        let mut parts_peek = if path == "/" { None } else { parts.next() };
        let mut captured = None;
        for seg in &self.segments {
            if *seg == Segment::Rest {
                return Some(captured);
            }
            let part = parts_peek?;
            match seg {
                Segment::Literal(lit) if lit != part => return None,
                Segment::Param(n) if Some(n.as_str()) == want => captured = Some(part),
                _ => {}
            }
            parts_peek = parts.next();
        }
        match parts_peek {
            None => Some(captured),
            // A trailing slash is a distinct resource in HTTP, except on the root.
            Some(_) => None,
        }
    }
}

pub fn strip_query(path: &str) -> &str {
    match path.find(['?', '#']) {
        Some(i) => &path[..i],
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn p(s: &str) -> PathPattern {
        match PathPattern::parse(s) {
            Ok(p) => p,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    #[test]
    fn literal_paths_match_exactly() {
        let pat = p("/orders");
        assert!(pat.matches("/orders"));
        assert!(pat.matches("/orders?x=1"));
        assert!(!pat.matches("/orders/"));
        assert!(!pat.matches("/orders/1"));
        assert!(!pat.matches("/order"));
        assert!(!pat.matches("orders"));
    }

    #[test]
    fn root_pattern() {
        let pat = p("/");
        assert!(pat.matches("/"));
        assert!(pat.matches("/?q"));
        assert!(!pat.matches("/a"));
    }

    #[test]
    fn wildcards_and_params() {
        let pat = p("/orders/{id}/items/*");
        assert!(pat.matches("/orders/42/items/7"));
        assert!(!pat.matches("/orders/42/items"));
        assert!(!pat.matches("/orders/42/items/7/x"));
        assert_eq!(pat.capture("/orders/42/items/7?a=b", "id"), Some("42"));
        assert_eq!(pat.capture("/orders/42/items/7", "nope"), None);
        assert!(pat.has_param("id"));
        assert!(!pat.has_param("x"));
    }

    #[test]
    fn rest_matches_zero_or_more() {
        let pat = p("/events/**");
        assert!(pat.matches("/events"));
        assert!(pat.matches("/events/a/b/c"));
        assert!(!pat.matches("/eventsx"));
        let all = p("/**");
        assert!(all.matches("/"));
        assert!(all.matches("/anything/at/all"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for (bad, why) in [
            ("orders", "start with '/'"),
            ("/a/**/b", "last segment"),
            ("/a*", "whole segment"),
            ("/{a}/{a}", "twice"),
            ("/{a-b}", "letters"),
            ("/a?b=1", "query"),
        ] {
            match PathPattern::parse(bad) {
                Ok(_) => panic!("{bad} accepted"),
                Err(e) => assert!(e.0.contains(why), "{bad}: {e}"),
            }
        }
    }
}
