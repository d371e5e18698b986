//! One schema: `kong/eventwire.meta.json` (what Kong validates with, and the reference docs)
//! and the filter's own parser must agree on every example.

use eventwire::config;
use eventwire_e2e::{EnvoyConfig, repo_root};
use serde_json::Value;

fn read_json(rel: &str) -> Value {
    let path = repo_root().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// How many examples each table holds. A table that silently loses rows (a bad merge, a
// truncated file, a directory not read) must fail; adding a case means raising its count.
const VALID_EXAMPLES: usize = 5; // tests/config/valid/*.json and envoy/envoy.yaml's config
const INVALID_CASES: usize = 59; // tests/config/invalid.json
const PARSER_ONLY_CASES: usize = 9; // tests/config/parser-only.json

fn validator() -> jsonschema::Validator {
    let meta = read_json("kong/eventwire.meta.json");
    jsonschema::draft4::new(&meta["config_schema"]).unwrap_or_else(|e| panic!("schema: {e}"))
}

/// `rules[0].key.header` -> `/rules/0/key/header`.
fn pointer(field: &str) -> String {
    if field.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    for part in field.split('.') {
        match part.split_once('[') {
            Some((name, idx)) => {
                out.push('/');
                out.push_str(name);
                out.push('/');
                out.push_str(idx.trim_end_matches(']'));
            }
            None => {
                out.push('/');
                out.push_str(part);
            }
        }
    }
    out
}

#[test]
fn valid_examples_pass_schema_and_parser() {
    let v = validator();
    let mut examples: Vec<(String, String)> = Vec::new();
    let dir = repo_root().join("tests/config/valid");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.map(|e| e.path()).unwrap_or_default();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        examples.push((path.display().to_string(), text));
    }
    examples.push((
        "envoy/envoy.yaml".into(),
        EnvoyConfig::shipped().filter_json(),
    ));
    assert_eq!(examples.len(), VALID_EXAMPLES, "valid examples");
    for (name, text) in examples {
        let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let errors: Vec<String> = v
            .iter_errors(&json)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{name} fails the schema: {errors:?}");
        if let Err(e) = config::parse(text.as_bytes()) {
            panic!("{name} fails the parser: {e}");
        }
    }
}

#[test]
fn invalid_examples_fail_schema_and_parser_at_the_same_field() {
    let v = validator();
    let table = read_json("tests/config/invalid.json");
    let cases = table.as_array().cloned().unwrap_or_default();
    assert_eq!(
        cases.len(),
        INVALID_CASES,
        "cases in tests/config/invalid.json"
    );
    for case in cases {
        let field = case["field"].as_str().unwrap_or_default();
        let cfg = &case["config"];
        match config::parse(cfg.to_string().as_bytes()) {
            Ok(_) => panic!("parser accepted {cfg}"),
            Err(e) => assert_eq!(e.field, field, "parser named another field for {cfg}: {e}"),
        }
        let want = pointer(field);
        let paths: Vec<String> = v
            .iter_errors(cfg)
            .map(|e| e.instance_path().to_string())
            .collect();
        assert!(!paths.is_empty(), "schema accepted {cfg}");
        // Schema errors point at the offending value or, for missing/unknown members, its object.
        assert!(
            paths
                .iter()
                .any(|p| want == *p || want.starts_with(&format!("{p}/"))),
            "schema errors {paths:?} do not point at {want} for {cfg}"
        );
    }
}

#[test]
fn parser_only_rules_are_documented_and_enforced() {
    let v = validator();
    let table = read_json("tests/config/parser-only.json");
    let cases = table.as_array().cloned().unwrap_or_default();
    assert_eq!(
        cases.len(),
        PARSER_ONLY_CASES,
        "cases in tests/config/parser-only.json"
    );
    for case in cases {
        let field = case["field"].as_str().unwrap_or_default();
        let cfg = &case["config"];
        assert!(case["why"].as_str().is_some_and(|w| !w.is_empty()));
        match config::parse(cfg.to_string().as_bytes()) {
            Ok(_) => panic!("parser accepted {cfg}"),
            Err(e) => assert_eq!(e.field, field, "{e}"),
        }
        // The schema cannot express these; it must at least not reject them elsewhere.
        assert!(
            v.is_valid(cfg),
            "{cfg} now fails the schema: move it to invalid.json"
        );
    }
}
