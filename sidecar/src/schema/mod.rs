//! Edge validation: JSON Schemas (draft 2020-12 unless a schema names another) that event
//! data must match before anything is durable. Each schema in `--schema-dir` is known by its
//! `$id`; an event whose `dataschema` names a known schema is checked against it (a filter
//! rule sets `dataschema` on the events it makes), and one that does not match is refused
//! with every failing JSON pointer and keyword. Events naming no schema, or one the sidecar
//! does not know, are not checked.
//!
//! Schema evolution: a directory of `--schema-dir` is a subject, the versions of one schema
//! (`subject`); each version is a schema like any other (known by its `$id`, which events
//! name), and at load each must be compatible with its predecessor under the subject's mode
//! (`compat`: Confluent Schema Registry's rules for JSON Schema), or the start is refused.

pub mod compat;
pub mod pin;
pub mod subject;

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use thiserror::Error;

/// Violations reported at most per event: enough to fix a body, bounded for the answer.
const MAX_VIOLATIONS: usize = 32;

#[derive(Debug, Error)]
#[error("--schema-dir {0}")]
pub struct SchemaError(pub(crate) String);

/// One way the data fails its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON pointer into the data (`""`: the data as a whole).
    pub pointer: String,
    pub keyword: String,
    pub message: String,
}

/// Why an event's data was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataError {
    NotJson {
        schema: String,
        reason: String,
    },
    Invalid {
        schema: String,
        violations: Vec<Violation>,
    },
}

#[derive(Default)]
pub struct Schemas {
    by_id: HashMap<String, jsonschema::Validator>,
    subjects: Vec<subject::Subject>,
}

impl Schemas {
    /// Every `*.json` file of `dir` (unversioned), and every directory a subject of
    /// versions (`subject`), each version compatible with the one before it; each schema
    /// must be valid, with an `$id` unique across all. Other files and hidden entries are
    /// skipped.
    pub fn load_dir(dir: &Path) -> Result<Schemas, SchemaError> {
        let entries =
            std::fs::read_dir(dir).map_err(|e| SchemaError(format!("{}: {e}", dir.display())))?;
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
            })
            .collect();
        paths.sort();
        let mut schemas = Schemas::default();
        for path in paths {
            if path.is_dir() {
                schemas.add_subject(&path)?;
                continue;
            }
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let what = path.display();
            let text =
                std::fs::read_to_string(&path).map_err(|e| SchemaError(format!("{what}: {e}")))?;
            let schema: Value = serde_json::from_str(&text)
                .map_err(|e| SchemaError(format!("{what}: not JSON: {e}")))?;
            schemas
                .add(&schema)
                .map_err(|e| SchemaError(format!("{what}: {e}")))?;
        }
        Ok(schemas)
    }

    /// A subject directory: its versions added, then checked against each other.
    fn add_subject(&mut self, dir: &Path) -> Result<(), SchemaError> {
        let (name, compatibility, transitive, versions) = subject::read(dir)?;
        let mut loaded = Vec::new();
        for version in &versions {
            let id = self
                .add(&version.schema)
                .map_err(|e| SchemaError(format!("{}: {e}", version.path.display())))?;
            loaded.push(subject::Loaded {
                number: version.number,
                id,
                path: version.path.clone(),
                digest: pin::digest(&version.schema),
            });
        }
        subject::check(compatibility, transitive, &versions)?;
        self.subjects.push(subject::Subject {
            name,
            compatibility,
            transitive,
            versions: loaded,
        });
        Ok(())
    }

    /// The subjects loaded, in name order.
    pub fn subjects(&self) -> &[subject::Subject] {
        &self.subjects
    }

    /// Adds one schema; its `$id` is returned.
    pub fn add(&mut self, schema: &Value) -> Result<String, String> {
        let id = schema
            .get("$id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or("no `$id`: it is what events name in `dataschema`")?
            .to_string();
        let validator =
            jsonschema::validator_for(schema).map_err(|e| format!("not a valid schema: {e}"))?;
        if self.by_id.contains_key(&id) {
            return Err(format!("a second schema with `$id` {id}"));
        }
        self.by_id.insert(id.clone(), validator);
        Ok(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Checks `data` when `dataschema` names a known schema.
    pub fn check(&self, dataschema: Option<&str>, data: Option<&[u8]>) -> Result<(), DataError> {
        let Some((schema, validator)) = dataschema.and_then(|id| self.by_id.get_key_value(id))
        else {
            return Ok(());
        };
        let schema = schema.clone();
        let value: Value = match data {
            None => Value::Null,
            Some(bytes) => serde_json::from_slice(bytes).map_err(|e| DataError::NotJson {
                schema: schema.clone(),
                reason: e.to_string(),
            })?,
        };
        let violations: Vec<Violation> = validator
            .iter_errors(&value)
            .take(MAX_VIOLATIONS)
            .map(|e| Violation {
                pointer: e.instance_path().to_string(),
                keyword: e.kind().keyword().to_string(),
                message: e.to_string(),
            })
            .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(DataError::Invalid { schema, violations })
        }
    }
}

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataError::NotJson { schema, reason } => {
                write!(
                    f,
                    "the data must be JSON to be checked against {schema}: {reason}"
                )
            }
            DataError::Invalid { schema, violations } => {
                write!(f, "the data does not match {schema}: ")?;
                for (i, v) in violations.iter().enumerate() {
                    let at = if v.pointer.is_empty() {
                        "(the data)"
                    } else {
                        &v.pointer
                    };
                    write!(
                        f,
                        "{}{at}: {} ({})",
                        if i > 0 { "; " } else { "" },
                        v.message,
                        v.keyword
                    )?;
                }
                Ok(())
            }
        }
    }
}

impl DataError {
    /// The problem's `errors` member: each failing pointer and keyword.
    pub fn errors(&self) -> Option<Value> {
        let DataError::Invalid { violations, .. } = self else {
            return None;
        };
        Some(Value::Array(
            violations
                .iter()
                .map(|v| serde_json::json!({"pointer": v.pointer, "keyword": v.keyword, "message": v.message}))
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ORDER: &str = "urn:eventwire:schema:order:v1";

    fn schemas() -> Schemas {
        let mut s = Schemas::default();
        s.add(
            &json!({"$id": ORDER, "type": "object", "required": ["id", "total"],
            "properties": {"id": {"type": "string"}, "total": {"type": "number", "minimum": 0}},
            "additionalProperties": false}),
        )
        .unwrap();
        s
    }

    #[test]
    fn data_is_checked_against_the_schema_it_names() {
        let s = schemas();
        let good = br#"{"id":"o-1","total":9.5}"#;
        assert_eq!(s.check(Some(ORDER), Some(good)), Ok(()));
        assert_eq!(
            s.check(Some("urn:other"), Some(b"not json")),
            Ok(()),
            "unknown: not checked"
        );
        assert_eq!(s.check(None, Some(b"not json")), Ok(()));
        let Err(DataError::Invalid { violations, .. }) =
            s.check(Some(ORDER), Some(br#"{"total":-1,"extra":true}"#))
        else {
            panic!("accepted")
        };
        let got: Vec<(&str, &str)> = violations
            .iter()
            .map(|v| (v.pointer.as_str(), v.keyword.as_str()))
            .collect();
        for want in [
            ("", "required"),
            ("/total", "minimum"),
            ("", "additionalProperties"),
        ] {
            assert!(got.contains(&want), "{want:?} not in {got:?}");
        }
        assert!(matches!(
            s.check(Some(ORDER), Some(b"{nope")),
            Err(DataError::NotJson { .. })
        ));
    }

    #[test]
    fn a_schema_without_id_or_a_broken_one_is_refused_at_load() {
        let mut s = schemas();
        assert!(
            s.add(&json!({"type": "object"}))
                .unwrap_err()
                .contains("$id")
        );
        assert!(
            s.add(&json!({"$id": "x", "type": 5}))
                .unwrap_err()
                .contains("not a valid schema")
        );
        assert!(
            s.add(&json!({"$id": ORDER}))
                .unwrap_err()
                .contains("second")
        );
    }

    /// A schema dir with `files` (path relative to it, text).
    fn dir_with<P: AsRef<str>>(files: &[(P, String)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let path = dir.path().join(path.as_ref());
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    /// Version `n` of order-placed: a closed object with `properties` and `required`.
    fn order(n: u32, properties: Value, required: &[&str]) -> (String, String) {
        (
            format!("order-placed/v{n}.json"),
            json!({"$id": format!("urn:eventwire:schema:order-placed:v{n}"), "type": "object",
                   "properties": properties, "required": required, "additionalProperties": false})
            .to_string(),
        )
    }

    fn load_err(dir: &tempfile::TempDir) -> String {
        match Schemas::load_dir(dir.path()) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_compatible_chain_of_versions_loads_and_each_validates_its_own_data() {
        let dir = dir_with(&[
            order(1, json!({"id": {"type": "string"}}), &["id"]),
            order(
                2,
                json!({"id": {"type": "string"}, "coupon": {"type": "string"}}),
                &["id"],
            ),
            order(
                3,
                json!({"id": {"type": "string"}, "coupon": {"type": "string"},
                       "total": {"type": "number"}}),
                &["id"],
            ),
            ("order-placed/.v4.json.swp".into(), "editor junk".into()),
            (
                "legacy.json".into(),
                json!({"$id": "urn:legacy", "type": "string"}).to_string(),
            ),
            ("README.txt".into(), "not a schema".into()),
        ]);
        let s = Schemas::load_dir(dir.path()).unwrap();
        assert_eq!(s.len(), 4, "three versions and the unversioned schema");
        let [subject] = s.subjects() else {
            panic!("one subject: {:?}", s.subjects());
        };
        assert_eq!(subject.name, "order-placed");
        assert_eq!(subject.compatibility, compat::Mode::Backward);
        assert!(!subject.transitive);
        let versions: Vec<(u32, String, bool)> = subject
            .versions
            .iter()
            .map(|v| {
                let file = format!("order-placed/v{}.json", v.number);
                (v.number, v.id.clone(), v.path.ends_with(file))
            })
            .collect();
        let want: Vec<(u32, String, bool)> = (1..=3)
            .map(|n| (n, format!("urn:eventwire:schema:order-placed:v{n}"), true))
            .collect();
        assert_eq!(versions, want);
        let with_coupon = br#"{"id":"o-1","coupon":"SUMMER"}"#;
        assert_eq!(
            s.check(
                Some("urn:eventwire:schema:order-placed:v2"),
                Some(with_coupon)
            ),
            Ok(())
        );
        let Err(DataError::Invalid { violations, .. }) = s.check(
            Some("urn:eventwire:schema:order-placed:v1"),
            Some(with_coupon),
        ) else {
            panic!("v1 has no coupon")
        };
        assert_eq!(violations[0].keyword, "additionalProperties");
        assert_eq!(s.check(Some("urn:legacy"), Some(br#""x""#)), Ok(()));
    }

    #[test]
    fn an_incompatible_version_refuses_the_start_naming_file_mode_and_changes() {
        let dir = dir_with(&[
            order(
                1,
                json!({"id": {"type": "string"}, "total": {"type": "number"}}),
                &["id"],
            ),
            order(
                2,
                json!({"id": {"type": "string"}, "total": {"type": "integer"},
                       "coupon": {"type": "string"}}),
                &["id", "coupon"],
            ),
        ]);
        let e = load_err(&dir);
        let v2 = dir.path().join("order-placed/v2.json");
        assert_eq!(
            e,
            format!(
                "--schema-dir {}: not backward compatible with v1.json: a consumer using v2 \
                 cannot read v1 data (required property /properties/coupon added; type of \
                 /properties/total narrowed from number to integer)",
                v2.display()
            )
        );
    }

    #[test]
    fn the_mode_comes_from_subject_toml() {
        // v2 adds an optional property to a closed model: backward yes, forward no.
        let versions = || {
            vec![
                order(1, json!({"id": {"type": "string"}}), &["id"]),
                order(
                    2,
                    json!({"id": {"type": "string"}, "note": {"type": "string"}}),
                    &["id"],
                ),
            ]
        };
        let with = |toml: &str| {
            let mut list = versions();
            list.push(("order-placed/subject.toml".into(), toml.into()));
            dir_with(&list)
        };
        assert!(Schemas::load_dir(with("compatibility = \"backward\"\n").path()).is_ok());
        for (toml, how) in [("forward", "forward"), ("full", "fully")] {
            let e = load_err(&with(&format!("compatibility = \"{toml}\"\n")));
            assert!(
                e.contains(&format!(
                    "v2.json: not {how} compatible with v1.json: a consumer using v1 cannot read \
                     v2 data (property /properties/note added while v1's content model is closed)"
                )),
                "{e}"
            );
        }
        let s = Schemas::load_dir(with("compatibility = \"none\"\n").path()).unwrap();
        assert_eq!(s.subjects()[0].compatibility, compat::Mode::None);
    }

    #[test]
    fn transitive_checks_every_earlier_version() {
        // v2 makes `note` required with a default (compatible); v3 drops the default: fine
        // after v2, not after v1, whose data may lack `note`.
        let note = |default: bool| {
            let mut n = json!({"type": "string"});
            if default {
                n["default"] = json!("");
            }
            json!({"id": {"type": "string"}, "note": n})
        };
        let versions = |toml: &str| {
            dir_with(&[
                order(1, note(false), &["id"]),
                order(2, note(true), &["id", "note"]),
                order(3, note(false), &["id", "note"]),
                ("order-placed/subject.toml".into(), toml.into()),
            ])
        };
        assert!(Schemas::load_dir(versions("transitive = false").path()).is_ok());
        let e = load_err(&versions("compatibility = \"backward\"\ntransitive = true"));
        assert!(
            e.contains(
                "order-placed/v3.json: not backward compatible with v1.json: a consumer using v3 \
                 cannot read v1 data (property /properties/note made required)"
            ),
            "{e}"
        );
        assert!(!e.contains("with v2.json"), "v2 is fine: {e}");
    }

    #[test]
    fn a_subject_directory_is_checked_strictly() {
        let v1 = || order(1, json!({"id": {"type": "string"}}), &["id"]);
        let extra = |name: &str, text: &str| {
            dir_with(&[v1(), (format!("order-placed/{name}"), text.into())])
        };
        for (toml, want) in [
            (
                "compatibility = \"backwards\"",
                r#"subject.toml: compatibility: "backwards" is not one of "backward", "forward", "full", "none""#,
            ),
            (
                "compatibility = \"BACKWARD_TRANSITIVE\"",
                "transitive = true",
            ),
            ("compatibility = 1", "compatibility: must be a string"),
            (
                "transitive = \"yes\"",
                "subject.toml: transitive: must be true or false",
            ),
            ("mode = \"full\"", "subject.toml: mode: unknown field"),
            ("compatibility = ", "subject.toml: "),
        ] {
            let e = load_err(&extra("subject.toml", toml));
            assert!(e.contains(want), "{toml}: {e}");
        }
        for name in [
            "v2.jsn",
            "V2.json",
            "v02.json",
            "v0.json",
            "notes.txt",
            "v2.json.bak",
        ] {
            let e = load_err(&extra(name, "{}"));
            assert!(
                e.contains(&format!("order-placed/{name}: not a version")),
                "{name}: {e}"
            );
        }
        let e = load_err(&dir_with(&[
            v1(),
            order(3, json!({"id": {"type": "string"}}), &["id"]),
        ]));
        assert!(e.contains("order-placed/v2.json: missing"), "{e}");
        let empty = dir_with(&[("order-placed/.gitkeep", String::new())]);
        assert!(load_err(&empty).contains("without versions"));
        // The oldest versions may be retired.
        let (path, text) = order(2, json!({"id": {"type": "string"}}), &["id"]);
        let (p3, t3) = order(3, json!({"id": {"type": "string"}}), &["id"]);
        let later = dir_with(&[(path.as_str(), text), (p3.as_str(), t3)]);
        assert_eq!(
            Schemas::load_dir(later.path()).unwrap().subjects()[0]
                .versions
                .len(),
            2
        );
    }

    #[test]
    fn ids_stay_unique_across_subjects_and_unversioned_schemas() {
        let (path, text) = order(1, json!({"id": {"type": "string"}}), &["id"]);
        let dir = dir_with(&[
            (path.as_str(), text),
            (
                "order-placed.json",
                json!({"$id": "urn:eventwire:schema:order-placed:v1"}).to_string(),
            ),
        ]);
        assert!(
            load_err(&dir)
                .contains("a second schema with `$id` urn:eventwire:schema:order-placed:v1")
        );
        let broken = dir_with(&[("order-placed/v1.json", "{nope".into())]);
        assert!(load_err(&broken).contains("order-placed/v1.json: not JSON"));
        let no_id = dir_with(&[("order-placed/v1.json", "{}".into())]);
        assert!(load_err(&no_id).contains("order-placed/v1.json: no `$id`"));
    }
}
