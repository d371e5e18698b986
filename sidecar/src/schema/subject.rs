//! A subject: the versions of one schema, in a directory of `--schema-dir` named after it.
//!
//! ```text
//! schemas/order-placed/subject.toml   compatibility = "backward", transitive = false (optional)
//! schemas/order-placed/v1.json        "$id": "urn:eventwire:schema:order-placed:v1"
//! schemas/order-placed/v2.json        "$id": "urn:eventwire:schema:order-placed:v2"
//! ```
//!
//! Versions are `v<N>.json` (N from 1, no leading zeros), numbered without gaps; the oldest
//! ones may be removed once no data names them. Any other visible entry refuses the start
//! (a `v2.jsn` or `V2.json` would otherwise drop a version unnoticed); hidden ones
//! (`.gitkeep`, editor files) are skipped. At load each version is checked against its
//! predecessor, or with `transitive = true` against every earlier one, under the subject's
//! compatibility (Confluent's default: `backward`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::SchemaError;
use super::compat::{self, Mode};

/// A subject as loaded: its versions, oldest first, and how they are checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Subject {
    pub name: String,
    pub compatibility: Mode,
    pub transitive: bool,
    /// Oldest first.
    pub versions: Vec<Loaded>,
}

/// One version as loaded: what events name, and what the file said.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub number: u32,
    pub id: String,
    pub path: PathBuf,
    /// Of the schema's content, not its layout (see `pin`).
    pub digest: String,
}

/// One version file, read and parsed.
pub(super) struct Version {
    pub number: u32,
    pub path: PathBuf,
    pub schema: Value,
}

const CONFIG: &str = "subject.toml";
const FIELDS: &[&str] = &["compatibility", "transitive"];

fn err(path: &Path, reason: impl std::fmt::Display) -> SchemaError {
    SchemaError(format!("{}: {reason}", path.display()))
}

/// `v12.json` -> 12.
fn version_number(file_name: &str) -> Option<u32> {
    let digits = file_name.strip_prefix('v')?.strip_suffix(".json")?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The subject directory's versions (read, parsed, in order) and its `subject.toml`.
pub(super) fn read(dir: &Path) -> Result<(String, Mode, bool, Vec<Version>), SchemaError> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let entries = std::fs::read_dir(dir).map_err(|e| err(dir, e))?;
    let mut paths: Vec<PathBuf> = entries
        .map(|e| e.map(|e| e.path()).map_err(|e| err(dir, e)))
        .collect::<Result<_, _>>()?;
    paths.sort();
    let (mut mode, mut transitive) = (Mode::Backward, false);
    let mut versions = Vec::new();
    for path in paths {
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if file_name.starts_with('.') {
            continue;
        }
        if file_name == CONFIG && path.is_file() {
            (mode, transitive) = config(&path)?;
            continue;
        }
        let Some(number) = version_number(&file_name).filter(|_| path.is_file()) else {
            return Err(err(
                &path,
                format!(
                    "not a version: a subject directory holds `v<N>.json` files (v1.json, \
                     v2.json, ...) and an optional `{CONFIG}`"
                ),
            ));
        };
        let text = std::fs::read_to_string(&path).map_err(|e| err(&path, e))?;
        let schema: Value =
            serde_json::from_str(&text).map_err(|e| err(&path, format!("not JSON: {e}")))?;
        versions.push(Version {
            number,
            path,
            schema,
        });
    }
    versions.sort_by_key(|v| v.number);
    if versions.is_empty() {
        return Err(err(
            dir,
            "a subject directory without versions (v1.json, v2.json, ...)",
        ));
    }
    for pair in versions.windows(2) {
        if let [a, b] = pair
            && b.number != a.number + 1
        {
            return Err(err(
                &dir.join(format!("v{}.json", a.number + 1)),
                format!(
                    "missing: versions are numbered without gaps (v{} is followed by v{}; only \
                     the oldest may be removed)",
                    a.number, b.number
                ),
            ));
        }
    }
    Ok((name, mode, transitive, versions))
}

/// `subject.toml`: `compatibility` and `transitive`, each optional.
fn config(path: &Path) -> Result<(Mode, bool), SchemaError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, e))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| err(path, e))?;
    if let Some(key) = table.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(err(
            path,
            format!("{key}: unknown field (expected `compatibility`, `transitive`)"),
        ));
    }
    let names = Mode::NAMES
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mode = match table.get("compatibility") {
        None => Mode::Backward,
        Some(toml::Value::String(s)) => Mode::parse(s).ok_or_else(|| {
            err(
                path,
                format!(
                    "compatibility: {s:?} is not one of {names} (transitive checks are \
                     `transitive = true`)"
                ),
            )
        })?,
        Some(_) => {
            return Err(err(
                path,
                format!("compatibility: must be a string, one of {names}"),
            ));
        }
    };
    let transitive = match table.get("transitive") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(_) => return Err(err(path, "transitive: must be true or false")),
    };
    Ok((mode, transitive))
}

/// Checks each version against its predecessor (or every earlier one) under `mode`.
pub(super) fn check(mode: Mode, transitive: bool, versions: &[Version]) -> Result<(), SchemaError> {
    if mode == Mode::None {
        return Ok(());
    }
    let how = match mode {
        Mode::Full => "fully",
        other => other.as_str(),
    };
    for (i, new) in versions.iter().enumerate().skip(1) {
        let earlier = if transitive {
            &versions[..i]
        } else {
            &versions[i - 1..i]
        };
        let new_name = format!("v{}", new.number);
        let failures: Vec<String> = earlier
            .iter()
            .rev()
            .filter_map(|old| {
                let old_name = format!("v{}", old.number);
                let breaches = compat::check(mode, &old_name, &old.schema, &new_name, &new.schema);
                (!breaches.is_empty()).then(|| {
                    let why: Vec<String> = breaches.iter().map(ToString::to_string).collect();
                    format!("{old_name}.json: {}", why.join(", and "))
                })
            })
            .collect();
        if !failures.is_empty() {
            return Err(err(
                &new.path,
                format!("not {how} compatible with {}", failures.join("; nor with ")),
            ));
        }
    }
    Ok(())
}
