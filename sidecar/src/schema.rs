//! Edge validation: JSON Schemas (draft 2020-12 unless a schema names another) that event
//! data must match before anything is durable. Each schema in `--schema-dir` is known by its
//! `$id`; an event whose `dataschema` names a known schema is checked against it (a filter
//! rule sets `dataschema` on the events it makes), and one that does not match is refused
//! with every failing JSON pointer and keyword. Events naming no schema, or one the sidecar
//! does not know, are not checked.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;
use thiserror::Error;

/// Violations reported at most per event: enough to fix a body, bounded for the answer.
const MAX_VIOLATIONS: usize = 32;

#[derive(Debug, Error)]
#[error("--schema-dir {0}")]
pub struct SchemaError(String);

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
}

impl Schemas {
    /// Every `*.json` file of `dir`; each must be a valid schema with a unique `$id`.
    pub fn load_dir(dir: &Path) -> Result<Schemas, SchemaError> {
        let entries =
            std::fs::read_dir(dir).map_err(|e| SchemaError(format!("{}: {e}", dir.display())))?;
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        let mut schemas = Schemas::default();
        for path in paths {
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

    pub fn add(&mut self, schema: &Value) -> Result<(), String> {
        let id = schema
            .get("$id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or("no `$id`: it is what events name in `dataschema`")?
            .to_string();
        let validator =
            jsonschema::validator_for(schema).map_err(|e| format!("not a valid schema: {e}"))?;
        if self.by_id.insert(id.clone(), validator).is_some() {
            return Err(format!("a second schema with `$id` {id}"));
        }
        Ok(())
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
}
