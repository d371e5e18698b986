//! A version, once loaded, does not change. Events name their schema version by `$id`, and
//! consumers, replays and dead-letter tools read old data with the version it names: an
//! edited version would silently change the meaning of data already on a topic (the reason a
//! schema registry refuses to overwrite a version). The sidecar records each version's digest
//! in its data directory the first time it loads it, and refuses to start when a file no
//! longer matches: a change is a new version.
//!
//! The digest is of the schema's content (object keys sorted, no whitespace), so re-indenting
//! or reordering a file is not a change. Removing a version (the oldest, once no data names
//! it) is allowed; its record stays, so it cannot come back changed either.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::SchemaError;
use super::subject::Subject;

/// In `--data-dir`.
pub const FILE: &str = "schema-versions.json";

/// `sha256:<hex>` of the schema's canonical form.
pub fn digest(schema: &Value) -> String {
    let mut text = String::new();
    canonical(schema, &mut text);
    let hash = Sha256::digest(text.as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in hash.iter() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Compact JSON with object keys sorted at every level, whatever the map's order.
fn canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(key) {
                    canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Checks every version of `subjects` against the digests in `file` and records the new
/// ones; how many were new. A changed version is refused, naming its file.
pub fn check(subjects: &[Subject], file: &Path) -> Result<usize, SchemaError> {
    let fail = |reason: String| SchemaError(format!("{}: {reason}", file.display()));
    let mut known: BTreeMap<String, String> = match std::fs::read(file) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| fail(format!("not the map of `$id` to digest it should be: {e}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(fail(e.to_string())),
    };
    let mut added = 0;
    for subject in subjects {
        for version in &subject.versions {
            match known.get(&version.id) {
                Some(recorded) if *recorded == version.digest => {}
                Some(_) => {
                    return Err(SchemaError(format!(
                        "{}: changed since this sidecar first loaded it (`$id` {}; digest in {}): \
                         data already published may name this version, so it must not change. \
                         Put the change in v{}.json; to accept this edit on purpose, remove its \
                         line from that file",
                        version.path.display(),
                        version.id,
                        file.display(),
                        subject.versions.last().map_or(1, |v| v.number) + 1,
                    )));
                }
                None => {
                    known.insert(version.id.clone(), version.digest.clone());
                    added += 1;
                }
            }
        }
    }
    if added > 0 {
        write(file, &known).map_err(|e| fail(format!("cannot record the versions: {e}")))?;
    }
    Ok(added)
}

/// One `$id` per line (easy to read, and to remove one), replaced atomically.
fn write(file: &Path, known: &BTreeMap<String, String>) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(known).map_err(std::io::Error::other)?;
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, text + "\n")?;
    std::fs::rename(&tmp, file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Schemas;
    use serde_json::json;

    fn subject_dir(versions: &[Value]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let subject = dir.path().join("order-placed");
        std::fs::create_dir(&subject).unwrap();
        for (i, v) in versions.iter().enumerate() {
            std::fs::write(subject.join(format!("v{}.json", i + 1)), v.to_string()).unwrap();
        }
        dir
    }

    fn v(n: u32, id_type: &str) -> Value {
        json!({"$id": format!("urn:t:order:v{n}"), "type": "object",
               "properties": {"id": {"type": id_type}}})
    }

    fn check_dir(dir: &Path, file: &Path) -> Result<usize, SchemaError> {
        let schemas = Schemas::load_dir(dir).unwrap();
        check(schemas.subjects(), file)
    }

    #[test]
    fn layout_is_not_content() {
        let a: Value =
            serde_json::from_str(r#"{"b": [1, {"y": 2, "x": "é"}], "a": null}"#).unwrap();
        let b: Value =
            serde_json::from_str("{\"a\":null,\n \"b\":[1,{\"x\":\"é\",\"y\":2}]}").unwrap();
        assert_eq!(digest(&a), digest(&b));
        assert_ne!(
            digest(&a),
            digest(&json!({"a": null, "b": [1, {"x": "é", "y": 3}]}))
        );
        assert!(digest(&a).starts_with("sha256:") && digest(&a).len() == 7 + 64);
    }

    #[test]
    fn versions_are_recorded_once_and_an_edit_is_refused() {
        let data = tempfile::tempdir().unwrap();
        let file = data.path().join(FILE);
        let dir = subject_dir(&[v(1, "string")]);
        assert_eq!(check_dir(dir.path(), &file).unwrap(), 1);
        assert_eq!(check_dir(dir.path(), &file).unwrap(), 0, "nothing new");
        // A new version is recorded besides the first.
        let dir = subject_dir(&[v(1, "string"), v(2, "string")]);
        assert_eq!(check_dir(dir.path(), &file).unwrap(), 1);
        let recorded: BTreeMap<String, String> =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(recorded.len(), 2);
        // v1 edited (still compatible with v2, so only the pin can catch it).
        let mut edited = v(1, "string");
        edited["properties"]["id"]["maxLength"] = json!(8);
        let dir = subject_dir(&[edited, v(2, "string")]);
        let e = check_dir(dir.path(), &file).unwrap_err().to_string();
        assert!(e.contains("order-placed/v1.json: changed since"), "{e}");
        assert!(
            e.contains("urn:t:order:v1") && e.contains("Put the change in v3.json"),
            "{e}"
        );
        // The record is untouched by a refused start.
        let after: BTreeMap<String, String> =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(after, recorded);
    }

    #[test]
    fn a_broken_record_file_is_refused_not_overwritten() {
        let data = tempfile::tempdir().unwrap();
        let file = data.path().join(FILE);
        std::fs::write(&file, "{nope").unwrap();
        let dir = subject_dir(&[v(1, "string")]);
        let e = check_dir(dir.path(), &file).unwrap_err().to_string();
        assert!(e.contains("schema-versions.json: not the map"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "{nope");
    }
}
