//! Schema evolution: whether a new version of a JSON Schema may follow the previous one,
//! by the rules Confluent Schema Registry applies to JSON Schema (its `json-schema-provider`
//! diff, `io.confluent.kafka.schemaregistry.json.diff`, with the default strict policy).
//!
//! [`diff`] compares the schema data was written with (the writer) to the one a consumer
//! reads it with (the reader) and lists every difference, each named after Confluent's
//! `Difference.Type` and judged compatible or not as its `COMPATIBLE_CHANGES_STRICT` set
//! does. The modes are built on it as the registry builds them: `backward` (a consumer
//! using the new version can read data written with the old one) is the diff old -> new,
//! `forward` (a consumer using the old version can read new data) the diff new -> old,
//! `full` both.
//!
//! What is analysed: `type` (and type arrays; `integer` is part of `number`), `enum` and
//! `const`, `properties` with the content model (`additionalProperties` absent or `true`:
//! open, `false`: closed, a schema: partially open), `required`, `additionalProperties`,
//! string `maxLength` / `minLength` / `pattern` / `format`, number `minimum` / `maximum` /
//! `exclusiveMinimum` / `exclusiveMaximum` / `multipleOf`, array `items` (one schema),
//! `minItems` / `maxItems` / `uniqueItems`, object `minProperties` / `maxProperties`,
//! nested schemas recursively, and `$ref`s within the document (JSON pointers, anchors,
//! embedded `$id`s) followed to check that what they name is unchanged.
//! Annotations (`title`, `description`, `default`, `examples`, ...) never matter. What is
//! not analysed (`allOf` / `anyOf` / `oneOf` / `not`, `if` / `then` / `else`,
//! `patternProperties`, `dependentSchemas`, `prefixItems`, `contains`, `unevaluated*`, a
//! changed `$ref` or its target, ...) is compatible only when unchanged: any change there is
//! an "unanalysed change", refused in every mode.
//!
//! Where this differs from Confluent, it is stricter: `format` is judged like `pattern`
//! (Confluent ignores it; the edge validation asserts it for drafts 4 to 7), and an
//! unanalysed construct is refused where Confluent may prove a change compatible.

use std::collections::{BTreeSet, HashSet};
use std::fmt;

use serde_json::{Map, Value};

/// Nesting beyond this is not analysed (a change below it is refused).
const MAX_DEPTH: usize = 64;
/// Enum values listed in a message at most.
const MAX_LISTED: usize = 5;

/// Keywords whose change is not analysed: only an unchanged one is compatible.
const UNANALYSED: &[&str] = &[
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "unevaluatedProperties",
    "unevaluatedItems",
    "prefixItems",
    "additionalItems",
    "contains",
    "minContains",
    "maxContains",
    "$dynamicRef",
    "$recursiveRef",
    "$anchor",
    "$dynamicAnchor",
    "$recursiveAnchor",
    "$schema",
    "$vocabulary",
];

/// Keywords that validate nothing: a schema of only these accepts anything.
const ANNOTATIONS: &[&str] = &[
    "$id",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "contentMediaType",
    "contentEncoding",
    "contentSchema",
];

/// Upper bounds: adding or decreasing one narrows, removing or increasing it widens.
const UPPER_BOUNDS: &[&str] = &[
    "maxLength",
    "maximum",
    "exclusiveMaximum",
    "maxItems",
    "maxProperties",
];
/// Lower bounds: adding or increasing one narrows, removing or decreasing it widens.
const LOWER_BOUNDS: &[&str] = &[
    "minLength",
    "minimum",
    "exclusiveMinimum",
    "minItems",
    "minProperties",
];

/// A subject's compatibility mode (Confluent's `BACKWARD`, `FORWARD`, `FULL`, `NONE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A consumer using the new version can read data written with the old one.
    Backward,
    /// A consumer using the old version can read data written with the new one.
    Forward,
    /// Both.
    Full,
    /// Not checked.
    None,
}

impl Mode {
    pub const NAMES: &'static [&'static str] = &["backward", "forward", "full", "none"];

    pub fn parse(name: &str) -> Option<Mode> {
        match name {
            "backward" => Some(Mode::Backward),
            "forward" => Some(Mode::Forward),
            "full" => Some(Mode::Full),
            "none" => Some(Mode::None),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Backward => "backward",
            Mode::Forward => "forward",
            Mode::Full => "full",
            Mode::None => "none",
        }
    }

    fn backward(self) -> bool {
        matches!(self, Mode::Backward | Mode::Full)
    }

    fn forward(self) -> bool {
        matches!(self, Mode::Forward | Mode::Full)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The allowed JSON types of a schema: `None` is any type.
type Types = Option<BTreeSet<String>>;

/// What `additionalProperties` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    /// Absent, `true` or an empty schema.
    Open,
    /// `false`.
    Closed,
    /// A schema the other properties must match.
    Schema,
}

/// The content model of an object schema: what it says of properties it does not name.
enum Model<'a> {
    Open,
    Closed,
    /// `additionalProperties` is this schema.
    Partial(&'a Value),
    /// Decided by a keyword not analysed (`patternProperties`, `unevaluatedProperties`).
    Unanalysed(&'static str),
}

/// A property's place in the content model of the schema that does not name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Open,
    Closed,
    /// Partially open, and its `additionalProperties` schema covers the property (or not).
    Partial {
        covered: bool,
    },
}

/// One difference between a writer's schema and a reader's, at a place in the schemas.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// The allowed types differ.
    Type {
        writer: Types,
        reader: Types,
    },
    /// The reader's schema is `false` (accepts nothing) where the writer's accepts values.
    Rejects,
    /// A numeric bound (`maxLength`, `minimum`, ...) was added, removed or moved.
    Bound {
        keyword: &'static str,
        writer: Option<f64>,
        reader: Option<f64>,
    },
    MultipleOf {
        writer: Option<f64>,
        reader: Option<f64>,
    },
    /// `pattern` or `format`.
    Text {
        keyword: &'static str,
        writer: Option<String>,
        reader: Option<String>,
    },
    UniqueItems {
        writer: bool,
        reader: bool,
    },
    /// The allowed values (`enum`, `const`) differ.
    Values {
        keyword: &'static str,
        writer: Option<Vec<Value>>,
        reader: Option<Vec<Value>>,
    },
    /// A property both name is required by one only.
    Required {
        writer: bool,
        reader: bool,
        /// The reader's property schema has a `default`.
        default: bool,
    },
    /// A property the reader names and the writer does not.
    PropertyAdded {
        /// Where the writer's content model puts it.
        writer: Slot,
        required: bool,
        default: bool,
        /// The reader's schema for it accepts anything.
        empty: bool,
    },
    /// A property the writer names and the reader does not.
    PropertyRemoved {
        /// Where the reader's content model puts it.
        reader: Slot,
        /// The writer's schema for it is `false` (the property never occurs).
        never: bool,
    },
    AdditionalProperties {
        writer: Extra,
        reader: Extra,
    },
    /// The reader has an `items` schema and the writer none (or the other way round).
    Items {
        writer: bool,
        reader: bool,
    },
    /// A change in a construct this module does not analyse (`what`: more about it, or
    /// empty).
    Unanalysed {
        what: String,
    },
}

/// A difference found by [`diff`]: where (a JSON pointer into the schema) and what.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub pointer: String,
    pub kind: Kind,
}

impl Change {
    /// Whether a consumer using the reader's schema still reads the writer's data.
    pub fn is_compatible(&self) -> bool {
        judge(&self.kind).1
    }

    /// Confluent's `Difference.Type` for this change (what its diff reports).
    #[cfg(test)]
    pub fn confluent(&self) -> String {
        judge(&self.kind).0
    }

    /// The change in words, told as the evolution from the older version to the newer one:
    /// `inverted` when the writer is the newer version (the forward check).
    pub fn describe(&self, writer: &str, reader: &str, inverted: bool) -> String {
        describe(&self.pointer, &self.kind, writer, reader, inverted)
    }
}

/// Every difference met reading data written with `writer` using `reader` (Confluent's
/// `SchemaDiff.compare(original = writer, update = reader)`), compatible ones included.
pub fn diff(writer: &Value, reader: &Value) -> Vec<Change> {
    let mut d = Diff {
        writer_root: writer,
        reader_root: reader,
        changes: Vec::new(),
    };
    d.schema("", writer, reader, 0);
    d.changes
}

/// One direction in which a new version fails its predecessor.
#[derive(Debug, Clone, PartialEq)]
pub struct Breach {
    /// The version of the consumer that cannot read.
    pub reader: String,
    /// The version the unreadable data is written with.
    pub writer: String,
    /// The incompatible changes, in words.
    pub changes: Vec<String>,
    /// The same changes, as found.
    pub found: Vec<Change>,
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a consumer using {} cannot read {} data ({})",
            self.reader,
            self.writer,
            self.changes.join("; ")
        )
    }
}

/// Why `new` may not follow `old` under `mode`: nothing when it may. `old_name` and
/// `new_name` name the versions in the messages (`v1`, `v2`).
pub fn check(mode: Mode, old_name: &str, old: &Value, new_name: &str, new: &Value) -> Vec<Breach> {
    let mut breaches = Vec::new();
    let mut direction = |writer: (&str, &Value), reader: (&str, &Value), inverted: bool| {
        let found: Vec<Change> = diff(writer.1, reader.1)
            .into_iter()
            .filter(|c| !c.is_compatible())
            .collect();
        if !found.is_empty() {
            breaches.push(Breach {
                reader: reader.0.to_string(),
                writer: writer.0.to_string(),
                changes: found
                    .iter()
                    .map(|c| c.describe(writer.0, reader.0, inverted))
                    .collect(),
                found,
            });
        }
    };
    if mode.backward() {
        direction((old_name, old), (new_name, new), false);
    }
    if mode.forward() {
        direction((new_name, new), (old_name, old), true);
    }
    breaches
}

/// Confluent's name for a change and whether its strict policy accepts it.
fn judge(kind: &Kind) -> (String, bool) {
    let (name, ok): (&str, bool) = match kind {
        Kind::Type { writer, reader } => {
            let single = |t: &Types| t.as_ref().is_some_and(|t| t.len() == 1);
            let multi = |t: &Types| t.as_ref().is_some_and(|t| t.len() > 1);
            if subset(writer, reader) {
                // (Anything may change to the empty schema: Confluent sees no difference.)
                if reader.is_none() || (single(writer) && single(reader)) {
                    ("TYPE_EXTENDED", true)
                } else {
                    ("SUM_TYPE_EXTENDED", true)
                }
            } else if subset(reader, writer) && single(writer) && single(reader) {
                ("TYPE_NARROWED", false)
            } else if subset(reader, writer) && multi(writer) && multi(reader) {
                ("SUM_TYPE_NARROWED", false)
            } else {
                ("TYPE_CHANGED", false)
            }
        }
        Kind::Rejects => ("TYPE_CHANGED", false),
        Kind::Bound {
            keyword,
            writer,
            reader,
        } => {
            let upper = UPPER_BOUNDS.contains(keyword);
            let (what, ok) = match (writer, reader) {
                (None, _) => ("ADDED", false),
                (_, None) => ("REMOVED", true),
                (Some(w), Some(r)) if r > w => ("INCREASED", upper),
                (Some(_), Some(_)) => ("DECREASED", !upper),
            };
            return (format!("{}_{what}", screaming(keyword)), ok);
        }
        Kind::MultipleOf { writer, reader } => match (writer, reader) {
            (None, _) => ("MULTIPLE_OF_ADDED", false),
            (_, None) => ("MULTIPLE_OF_REMOVED", true),
            (Some(w), Some(r)) if divides(*w, *r) => ("MULTIPLE_OF_EXPANDED", false),
            (Some(w), Some(r)) if divides(*r, *w) => ("MULTIPLE_OF_REDUCED", true),
            _ => ("MULTIPLE_OF_CHANGED", false),
        },
        Kind::Text {
            keyword,
            writer,
            reader,
        } => {
            let (what, ok) = match (writer, reader) {
                (None, _) => ("ADDED", false),
                (_, None) => ("REMOVED", true),
                _ => ("CHANGED", false),
            };
            return (format!("{}_{what}", screaming(keyword)), ok);
        }
        Kind::UniqueItems { writer, .. } => {
            if *writer {
                ("UNIQUE_ITEMS_REMOVED", true)
            } else {
                ("UNIQUE_ITEMS_ADDED", false)
            }
        }
        Kind::Values { writer, reader, .. } => match (writer, reader) {
            // Confluent sees a typed schema gaining an `enum` as allOf(type, enum) replacing
            // the type: TYPE_CHANGED; losing it as the allOf narrowed to the type.
            (None, _) => ("TYPE_CHANGED", false),
            (_, None) => ("PRODUCT_TYPE_NARROWED", true),
            (Some(w), Some(r)) if contains_all(r, w) => ("ENUM_ARRAY_EXTENDED", true),
            (Some(w), Some(r)) if contains_all(w, r) => ("ENUM_ARRAY_NARROWED", false),
            _ => ("ENUM_ARRAY_CHANGED", false),
        },
        Kind::Required {
            writer, default, ..
        } => match (writer, default) {
            (true, _) => ("REQUIRED_ATTRIBUTE_REMOVED", true),
            (false, true) => ("REQUIRED_ATTRIBUTE_WITH_DEFAULT_ADDED", true),
            (false, false) => ("REQUIRED_ATTRIBUTE_ADDED", false),
        },
        Kind::PropertyAdded {
            writer,
            required,
            default,
            empty,
        } => match (writer, required, default) {
            (Slot::Open, _, _) if *empty => (
                "PROPERTY_WITH_EMPTY_SCHEMA_ADDED_TO_OPEN_CONTENT_MODEL",
                true,
            ),
            (Slot::Open, true, true) => (
                "REQUIRED_PROPERTY_WITH_DEFAULT_ADDED_TO_OPEN_CONTENT_MODEL",
                false,
            ),
            (Slot::Open, true, false) => ("REQUIRED_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL", false),
            (Slot::Open, false, _) => ("OPTIONAL_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL", false),
            (Slot::Partial { covered: false }, _, _) => (
                "PROPERTY_ADDED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL",
                false,
            ),
            (_, true, true) => (
                "REQUIRED_PROPERTY_WITH_DEFAULT_ADDED_TO_UNOPEN_CONTENT_MODEL",
                true,
            ),
            (_, true, false) => ("REQUIRED_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL", false),
            (_, false, _) => ("OPTIONAL_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL", true),
        },
        Kind::PropertyRemoved { reader, never } => match reader {
            Slot::Open => ("PROPERTY_REMOVED_FROM_OPEN_CONTENT_MODEL", true),
            Slot::Closed if *never => (
                "PROPERTY_WITH_FALSE_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                true,
            ),
            Slot::Closed => ("PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL", false),
            Slot::Partial { covered: true } => (
                "PROPERTY_REMOVED_IS_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL",
                true,
            ),
            Slot::Partial { covered: false } => (
                "PROPERTY_REMOVED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL",
                false,
            ),
        },
        Kind::AdditionalProperties { writer, reader } => match (writer, reader) {
            (Extra::Closed, _) => ("ADDITIONAL_PROPERTIES_ADDED", true),
            (_, Extra::Closed) => ("ADDITIONAL_PROPERTIES_REMOVED", false),
            (Extra::Open, _) => ("ADDITIONAL_PROPERTIES_NARROWED", false),
            _ => ("ADDITIONAL_PROPERTIES_EXTENDED", true),
        },
        Kind::Items { writer, .. } => {
            if *writer {
                ("SCHEMA_REMOVED", true)
            } else {
                ("SCHEMA_ADDED", false)
            }
        }
        Kind::Unanalysed { .. } => ("(unanalysed)", false),
    };
    (name.to_string(), ok)
}

fn empty_map() -> &'static Map<String, Value> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Map::new)
}

/// `maxLength` -> `MAX_LENGTH`.
fn screaming(keyword: &str) -> String {
    let mut out = String::new();
    for c in keyword.chars() {
        if c.is_ascii_uppercase() && !out.is_empty() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Whether `b` is a whole multiple of `a`.
fn divides(a: f64, b: f64) -> bool {
    if a == 0.0 {
        return false;
    }
    let q = b / a;
    q.is_finite() && (q - q.round()).abs() < 1e-9
}

/// Whether every type of `a` is one of `b` (`None`: any type; `integer` is in `number`).
fn subset(a: &Types, b: &Types) -> bool {
    match (a, b) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(a), Some(b)) => a
            .iter()
            .all(|t| b.contains(t) || (t == "integer" && b.contains("number"))),
    }
}

fn contains_all(haystack: &[Value], needles: &[Value]) -> bool {
    needles
        .iter()
        .all(|n| haystack.iter().any(|h| json_eq(h, n)))
}

/// JSON equality as JSON Schema means it (`1` equals `1.0`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || matches!((x.as_f64(), y.as_f64()), (Some(x), Some(y)) if x == y)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// `at` + `/key`, escaped as RFC 6901 wants.
fn child(at: &str, key: &str) -> String {
    format!("{at}/{}", key.replace('~', "~0").replace('/', "~1"))
}

/// A schema accepting anything: `true`, or an object of annotations only.
fn accepts_anything(schema: &Value) -> bool {
    match schema {
        Value::Bool(b) => *b,
        Value::Object(m) => m.keys().all(|k| ANNOTATIONS.contains(&k.as_str())),
        _ => false,
    }
}

fn types(m: &Map<String, Value>) -> Result<Types, ()> {
    let mut set: BTreeSet<String> = match m.get("type") {
        None => return Ok(None),
        Some(Value::String(t)) => [t.clone()].into(),
        Some(Value::Array(ts)) => ts
            .iter()
            .map(|t| t.as_str().map(str::to_string).ok_or(()))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(()),
    };
    if set.contains("number") {
        set.remove("integer");
    }
    Ok(Some(set))
}

/// The values `enum` and `const` allow, and the keyword that says so.
fn allowed(m: &Map<String, Value>) -> Result<Option<(&'static str, Vec<Value>)>, ()> {
    let values = match m.get("enum") {
        None => None,
        Some(Value::Array(v)) => Some(v.clone()),
        Some(_) => return Err(()),
    };
    Ok(match (values, m.get("const")) {
        (None, None) => None,
        (None, Some(c)) => Some(("const", vec![c.clone()])),
        (Some(v), None) => Some(("enum", v)),
        (Some(v), Some(c)) => Some(("enum", v.into_iter().filter(|v| json_eq(v, c)).collect())),
    })
}

fn number(m: &Map<String, Value>, keyword: &str) -> Result<Option<f64>, ()> {
    match m.get(keyword) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or(()),
    }
}

fn text(m: &Map<String, Value>, keyword: &str) -> Result<Option<String>, ()> {
    match m.get(keyword) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(()),
    }
}

fn extra(m: &Map<String, Value>) -> Extra {
    match m.get("additionalProperties") {
        None => Extra::Open,
        Some(Value::Bool(false)) => Extra::Closed,
        Some(v) if accepts_anything(v) => Extra::Open,
        Some(_) => Extra::Schema,
    }
}

fn model(m: &Map<String, Value>) -> Model<'_> {
    if m.get("patternProperties")
        .is_some_and(|p| p.as_object().is_none_or(|p| !p.is_empty()))
    {
        return Model::Unanalysed("patternProperties");
    }
    if m.contains_key("unevaluatedProperties") {
        return Model::Unanalysed("unevaluatedProperties");
    }
    match (extra(m), m.get("additionalProperties")) {
        (Extra::Open, _) => Model::Open,
        (Extra::Closed, _) => Model::Closed,
        (Extra::Schema, Some(schema)) => Model::Partial(schema),
        (Extra::Schema, None) => Model::Open,
    }
}

fn required(m: &Map<String, Value>) -> Result<BTreeSet<&str>, ()> {
    match m.get("required") {
        None => Ok(BTreeSet::new()),
        Some(Value::Array(names)) => names.iter().map(|n| n.as_str().ok_or(())).collect(),
        Some(_) => Err(()),
    }
}

fn properties(m: &Map<String, Value>) -> Result<Option<&Map<String, Value>>, ()> {
    match m.get("properties") {
        None => Ok(None),
        Some(Value::Object(p)) => Ok(Some(p)),
        Some(_) => Err(()),
    }
}

/// The schema a `$ref` names in `root`: a JSON pointer (`#`, `#/$defs/a`), an anchor
/// (`#a`, a `$anchor`), or a resource embedded with its `$id` (`urn:x`, `urn:x#/b`).
fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let (base, fragment) = reference.split_once('#').unwrap_or((reference, ""));
    let resource = if base.is_empty() {
        root
    } else {
        find(root, &|m| {
            m.get("$id").and_then(Value::as_str) == Some(base)
        })?
    };
    if fragment.is_empty() || fragment.starts_with('/') {
        if fragment.contains('%') {
            return None;
        }
        return resource.pointer(fragment);
    }
    find(resource, &|m| {
        m.get("$anchor").and_then(Value::as_str) == Some(fragment)
            || m.get("$dynamicAnchor").and_then(Value::as_str) == Some(fragment)
    })
}

/// The first object in `value` (itself included) that `is` holds for.
fn find<'a>(value: &'a Value, is: &dyn Fn(&Map<String, Value>) -> bool) -> Option<&'a Value> {
    match value {
        Value::Object(m) if is(m) => Some(value),
        Value::Object(m) => m.values().find_map(|v| find(v, is)),
        Value::Array(a) => a.iter().find_map(|v| find(v, is)),
        _ => None,
    }
}

fn collect_refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "$ref" {
                    if let Some(r) = v.as_str() {
                        out.push(r);
                    }
                } else {
                    collect_refs(v, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

struct Diff<'a> {
    writer_root: &'a Value,
    reader_root: &'a Value,
    changes: Vec<Change>,
}

impl<'a> Diff<'a> {
    fn push(&mut self, pointer: String, kind: Kind) {
        self.changes.push(Change { pointer, kind });
    }

    fn unanalysed(&mut self, pointer: String, what: impl Into<String>) {
        self.push(pointer, Kind::Unanalysed { what: what.into() });
    }

    /// Whether two subschemas mean the same: equal, and every `$ref` in them names equal
    /// schemas in both documents.
    fn same(&self, writer: &Value, reader: &Value) -> bool {
        self.same_in(writer, reader, &mut HashSet::new())
    }

    fn same_in<'v>(&self, writer: &'v Value, reader: &Value, seen: &mut HashSet<&'v str>) -> bool
    where
        'a: 'v,
    {
        if !json_eq(writer, reader) {
            return false;
        }
        let mut refs = Vec::new();
        collect_refs(writer, &mut refs);
        for reference in refs {
            if !seen.insert(reference) {
                continue;
            }
            match (
                resolve(self.writer_root, reference),
                resolve(self.reader_root, reference),
            ) {
                (Some(w), Some(r)) => {
                    if !self.same_in(w, r, seen) {
                        return false;
                    }
                }
                // Named nowhere in the documents: the same only if nothing changed at all.
                (None, None) => {
                    if !json_eq(self.writer_root, self.reader_root) {
                        return false;
                    }
                }
                _ => return false,
            }
        }
        true
    }

    fn schema(&mut self, at: &str, writer: &'a Value, reader: &'a Value, depth: usize) {
        if depth > MAX_DEPTH {
            if !self.same(writer, reader) {
                self.unanalysed(
                    at.to_string(),
                    format!("nested deeper than {MAX_DEPTH} levels"),
                );
            }
            return;
        }
        match (writer, reader) {
            // Nothing is written there: anything reads it.
            (Value::Bool(false), _) => return,
            (_, Value::Bool(false)) => {
                self.push(at.to_string(), Kind::Rejects);
                return;
            }
            _ => {}
        }
        let empty = empty_map();
        let (w, r) = match (writer, reader) {
            (Value::Object(w), Value::Object(r)) => (w, r),
            (Value::Object(w), Value::Bool(true)) => (w, empty),
            (Value::Bool(true), Value::Object(r)) => (empty, r),
            (Value::Bool(true), Value::Bool(true)) => return,
            _ => {
                if !json_eq(writer, reader) {
                    self.unanalysed(at.to_string(), "not a schema object");
                }
                return;
            }
        };
        self.types(at, w, r);
        self.values(at, w, r);
        for keyword in UPPER_BOUNDS.iter().chain(LOWER_BOUNDS) {
            match (number(w, keyword), number(r, keyword)) {
                (Ok(wv), Ok(rv)) => {
                    if wv != rv {
                        self.push(
                            child(at, keyword),
                            Kind::Bound {
                                keyword,
                                writer: wv,
                                reader: rv,
                            },
                        );
                    }
                }
                // Not a number (draft-04's boolean `exclusiveMaximum`): unanalysed.
                _ => self.keyword_unanalysed(at, keyword, w, r),
            }
        }
        match (number(w, "multipleOf"), number(r, "multipleOf")) {
            (Ok(wv), Ok(rv)) => {
                if wv != rv {
                    self.push(
                        child(at, "multipleOf"),
                        Kind::MultipleOf {
                            writer: wv,
                            reader: rv,
                        },
                    );
                }
            }
            _ => self.keyword_unanalysed(at, "multipleOf", w, r),
        }
        for keyword in ["pattern", "format"] {
            match (text(w, keyword), text(r, keyword)) {
                (Ok(wv), Ok(rv)) => {
                    if wv != rv {
                        self.push(
                            child(at, keyword),
                            Kind::Text {
                                keyword,
                                writer: wv,
                                reader: rv,
                            },
                        );
                    }
                }
                _ => self.keyword_unanalysed(at, keyword, w, r),
            }
        }
        let unique = |m: &Map<String, Value>| match m.get("uniqueItems") {
            None => Some(false),
            Some(v) => v.as_bool(),
        };
        match (unique(w), unique(r)) {
            (Some(wv), Some(rv)) => {
                if wv != rv {
                    self.push(
                        child(at, "uniqueItems"),
                        Kind::UniqueItems {
                            writer: wv,
                            reader: rv,
                        },
                    );
                }
            }
            _ => self.keyword_unanalysed(at, "uniqueItems", w, r),
        }
        self.object(at, w, r, depth);
        self.items(at, w, r, depth);
        self.reference(at, w, r);
        for keyword in UNANALYSED {
            self.keyword_unanalysed(at, keyword, w, r);
        }
    }

    /// A change of `keyword` at `at`, if any, as unanalysed.
    fn keyword_unanalysed(
        &mut self,
        at: &str,
        keyword: &str,
        w: &Map<String, Value>,
        r: &Map<String, Value>,
    ) {
        let same = match (w.get(keyword), r.get(keyword)) {
            (None, None) => true,
            (Some(a), Some(b)) => self.same(a, b),
            _ => false,
        };
        if !same {
            self.unanalysed(child(at, keyword), "");
        }
    }

    fn types(&mut self, at: &str, w: &Map<String, Value>, r: &Map<String, Value>) {
        match (types(w), types(r)) {
            (Ok(wt), Ok(rt)) => {
                if !(subset(&wt, &rt) && subset(&rt, &wt)) {
                    self.push(
                        at.to_string(),
                        Kind::Type {
                            writer: wt,
                            reader: rt,
                        },
                    );
                }
            }
            _ => self.keyword_unanalysed(at, "type", w, r),
        }
    }

    fn values(&mut self, at: &str, w: &Map<String, Value>, r: &Map<String, Value>) {
        match (allowed(w), allowed(r)) {
            (Ok(wv), Ok(rv)) => {
                let keyword = match (&wv, &rv) {
                    (Some(("enum", _)), _) | (_, Some(("enum", _))) => "enum",
                    _ => "const",
                };
                let wv = wv.map(|(_, v)| v);
                let rv = rv.map(|(_, v)| v);
                let same = match (&wv, &rv) {
                    (None, None) => true,
                    (Some(a), Some(b)) => contains_all(a, b) && contains_all(b, a),
                    _ => false,
                };
                if !same {
                    self.push(
                        child(at, keyword),
                        Kind::Values {
                            keyword,
                            writer: wv,
                            reader: rv,
                        },
                    );
                }
            }
            _ => {
                self.keyword_unanalysed(at, "enum", w, r);
                self.keyword_unanalysed(at, "const", w, r);
            }
        }
    }

    fn object(
        &mut self,
        at: &str,
        w: &'a Map<String, Value>,
        r: &'a Map<String, Value>,
        depth: usize,
    ) {
        let (Ok(wp), Ok(rp), Ok(wreq), Ok(rreq)) =
            (properties(w), properties(r), required(w), required(r))
        else {
            self.keyword_unanalysed(at, "properties", w, r);
            self.keyword_unanalysed(at, "required", w, r);
            return;
        };
        let (wp, rp) = (wp.unwrap_or(empty_map()), rp.unwrap_or(empty_map()));
        let names: BTreeSet<&str> = wp
            .keys()
            .chain(rp.keys())
            .map(String::as_str)
            .chain(wreq.iter().copied())
            .chain(rreq.iter().copied())
            .collect();
        for name in names {
            let here = child(&child(at, "properties"), name);
            let has_default = |p: Option<&Value>| p.is_some_and(|p| p.get("default").is_some());
            match (wp.get(name), rp.get(name)) {
                (None, Some(reader)) => {
                    self.property_added(&here, w, name, reader, rreq.contains(name), depth);
                    continue;
                }
                (Some(writer), None) => self.property_removed(&here, r, writer, depth),
                (Some(writer), Some(reader)) => self.schema(&here, writer, reader, depth + 1),
                (None, None) => {}
            }
            let (wr, rr) = (wreq.contains(name), rreq.contains(name));
            if wr != rr {
                let pointer = if wp.contains_key(name) || rp.contains_key(name) {
                    here
                } else {
                    child(&child(at, "required"), name)
                };
                self.push(
                    pointer,
                    Kind::Required {
                        writer: wr,
                        reader: rr,
                        default: has_default(rp.get(name)),
                    },
                );
            }
        }
        let (we, re) = (extra(w), extra(r));
        if we != re {
            self.push(
                child(at, "additionalProperties"),
                Kind::AdditionalProperties {
                    writer: we,
                    reader: re,
                },
            );
        } else if we == Extra::Schema
            && let (Some(ws), Some(rs)) =
                (w.get("additionalProperties"), r.get("additionalProperties"))
        {
            self.schema(&child(at, "additionalProperties"), ws, rs, depth + 1);
        }
    }

    /// A property only the reader names; the writer's content model says what its data may
    /// hold under that name.
    fn property_added(
        &mut self,
        at: &str,
        w: &'a Map<String, Value>,
        name: &str,
        reader: &'a Value,
        required: bool,
        depth: usize,
    ) {
        let slot = match model(w) {
            Model::Open => Slot::Open,
            Model::Closed => Slot::Closed,
            Model::Partial(extra) => Slot::Partial {
                covered: self.covered(at, extra, reader, depth),
            },
            Model::Unanalysed(keyword) => {
                self.unanalysed(
                    at.to_string(),
                    format!("property `{name}` added where `{keyword}` applies"),
                );
                return;
            }
        };
        self.push(
            at.to_string(),
            Kind::PropertyAdded {
                writer: slot,
                required,
                default: reader.get("default").is_some(),
                empty: accepts_anything(reader),
            },
        );
    }

    /// A property only the writer names; the reader's content model says whether it still
    /// reads data holding it.
    fn property_removed(
        &mut self,
        at: &str,
        r: &'a Map<String, Value>,
        writer: &'a Value,
        depth: usize,
    ) {
        let slot = match model(r) {
            Model::Open => Slot::Open,
            Model::Closed => Slot::Closed,
            Model::Partial(extra) => Slot::Partial {
                covered: self.covered(at, writer, extra, depth),
            },
            Model::Unanalysed(keyword) => {
                self.unanalysed(
                    at.to_string(),
                    format!("property removed where `{keyword}` applies"),
                );
                return;
            }
        };
        self.push(
            at.to_string(),
            Kind::PropertyRemoved {
                reader: slot,
                never: matches!(writer, Value::Bool(false)),
            },
        );
    }

    /// Whether `reader` reads all `writer` data; its incompatible changes are kept.
    fn covered(&mut self, at: &str, writer: &'a Value, reader: &'a Value, depth: usize) -> bool {
        let before = self.changes.len();
        self.schema(at, writer, reader, depth + 1);
        let mut covered = true;
        let mut i = before;
        while i < self.changes.len() {
            if self.changes[i].is_compatible() {
                self.changes.remove(i);
            } else {
                covered = false;
                i += 1;
            }
        }
        covered
    }

    fn items(
        &mut self,
        at: &str,
        w: &'a Map<String, Value>,
        r: &'a Map<String, Value>,
        depth: usize,
    ) {
        let schema = |m: &'a Map<String, Value>| match m.get("items") {
            None => Ok(None),
            Some(v @ (Value::Object(_) | Value::Bool(_))) => {
                Ok(Some(v).filter(|v| !accepts_anything(v)))
            }
            Some(_) => Err(()),
        };
        match (schema(w), schema(r)) {
            (Ok(None), Ok(None)) => {}
            (Ok(Some(ws)), Ok(Some(rs))) => self.schema(&child(at, "items"), ws, rs, depth + 1),
            (Ok(ws), Ok(rs)) => self.push(
                child(at, "items"),
                Kind::Items {
                    writer: ws.is_some(),
                    reader: rs.is_some(),
                },
            ),
            // An array of schemas (a tuple before draft 2020-12).
            _ => self.keyword_unanalysed(at, "items", w, r),
        }
    }

    fn reference(&mut self, at: &str, w: &Map<String, Value>, r: &Map<String, Value>) {
        let same = match (w.get("$ref"), r.get("$ref")) {
            (None, None) => return,
            (Some(a), Some(b)) => {
                // Equal references whose targets are equal (followed through their own refs).
                let wrapped_w = Value::Object(Map::from_iter([("$ref".to_string(), a.clone())]));
                let wrapped_r = Value::Object(Map::from_iter([("$ref".to_string(), b.clone())]));
                self.same(&wrapped_w, &wrapped_r)
            }
            _ => false,
        };
        if !same {
            let what = match w.get("$ref").or(r.get("$ref")).and_then(Value::as_str) {
                Some(name) => format!("{name} or the schema it names changed"),
                None => String::new(),
            };
            self.unanalysed(child(at, "$ref"), what);
        }
    }
}

/// Where a message puts a change.
fn place(pointer: &str) -> String {
    if pointer.is_empty() {
        "the root".to_string()
    } else {
        pointer.to_string()
    }
}

/// The parent of a keyword's pointer (`/properties/a/maxLength` -> `/properties/a`).
fn owner(pointer: &str) -> String {
    place(pointer.rsplit_once('/').map_or("", |(head, _)| head))
}

fn show_types(t: &Types) -> String {
    match t {
        None => "any type".to_string(),
        Some(t) if t.len() == 1 => t.iter().next().cloned().unwrap_or_default(),
        Some(t) => format!("[{}]", t.iter().cloned().collect::<Vec<_>>().join(", ")),
    }
}

fn show_values(values: &[Value]) -> String {
    let mut shown: Vec<String> = values
        .iter()
        .take(MAX_LISTED)
        .map(Value::to_string)
        .collect();
    if values.len() > MAX_LISTED {
        shown.push(format!("and {} more", values.len() - MAX_LISTED));
    }
    shown.join(", ")
}

fn describe(pointer: &str, kind: &Kind, writer: &str, reader: &str, inverted: bool) -> String {
    // `before` / `after`: the older and the newer version's side of a change.
    fn order<T>(writer: T, reader: T, inverted: bool) -> (T, T) {
        if inverted {
            (reader, writer)
        } else {
            (writer, reader)
        }
    }
    let at = place(pointer);
    match kind {
        Kind::Type {
            writer: w,
            reader: r,
        } => {
            let (before, after) = order(w, r, inverted);
            let verb = if subset(before, after) {
                "widened"
            } else if subset(after, before) {
                "narrowed"
            } else {
                "changed"
            };
            format!(
                "type of {at} {verb} from {} to {}",
                show_types(before),
                show_types(after)
            )
        }
        Kind::Rejects => {
            if inverted {
                format!("{at} was `false` (no value) and now accepts values")
            } else {
                format!("{at} is now `false` (no value is valid)")
            }
        }
        Kind::Bound {
            keyword,
            writer: w,
            reader: r,
        } => {
            let of = owner(pointer);
            match order(w, r, inverted) {
                (None, Some(v)) => format!("{keyword} {v} added to {of}"),
                (Some(v), None) => format!("{keyword} {v} removed from {of}"),
                (Some(b), Some(a)) => {
                    let verb = if a > b { "increased" } else { "decreased" };
                    format!("{keyword} of {of} {verb} from {b} to {a}")
                }
                (None, None) => format!("{keyword} of {of} changed"),
            }
        }
        Kind::MultipleOf {
            writer: w,
            reader: r,
        } => {
            let of = owner(pointer);
            match order(w, r, inverted) {
                (None, Some(v)) => format!("multipleOf {v} added to {of}"),
                (Some(v), None) => format!("multipleOf {v} removed from {of}"),
                (Some(b), Some(a)) => format!("multipleOf of {of} changed from {b} to {a}"),
                (None, None) => format!("multipleOf of {of} changed"),
            }
        }
        Kind::Text {
            keyword,
            writer: w,
            reader: r,
        } => {
            let of = owner(pointer);
            match order(w, r, inverted) {
                (None, Some(v)) => format!("{keyword} {v:?} added to {of}"),
                (Some(v), None) => format!("{keyword} {v:?} removed from {of}"),
                (Some(b), Some(a)) => format!("{keyword} of {of} changed from {b:?} to {a:?}"),
                (None, None) => format!("{keyword} of {of} changed"),
            }
        }
        Kind::UniqueItems {
            writer: w,
            reader: r,
        } => {
            let (_, after) = order(w, r, inverted);
            let of = owner(pointer);
            if *after {
                format!("uniqueItems added to {of}")
            } else {
                format!("uniqueItems removed from {of}")
            }
        }
        Kind::Values {
            keyword,
            writer: w,
            reader: r,
        } => {
            let of = owner(pointer);
            match order(w, r, inverted) {
                (None, Some(v)) => format!("{keyword} [{}] added to {of}", show_values(v)),
                (Some(_), None) => format!("{keyword} removed from {of}"),
                (Some(b), Some(a)) => {
                    let gone: Vec<Value> = b
                        .iter()
                        .filter(|v| !a.iter().any(|x| json_eq(x, v)))
                        .cloned()
                        .collect();
                    let new: Vec<Value> = a
                        .iter()
                        .filter(|v| !b.iter().any(|x| json_eq(x, v)))
                        .cloned()
                        .collect();
                    let mut parts = Vec::new();
                    if !gone.is_empty() {
                        parts.push(format!("{} removed", show_values(&gone)));
                    }
                    if !new.is_empty() {
                        parts.push(format!("{} added", show_values(&new)));
                    }
                    format!("{keyword} of {of} changed: {}", parts.join(", "))
                }
                (None, None) => format!("{keyword} of {of} changed"),
            }
        }
        Kind::Required {
            writer: w,
            reader: r,
            default,
        } => {
            let (_, after) = order(w, r, inverted);
            if *after {
                let default = if *default { " (it has a default)" } else { "" };
                format!("property {at} made required{default}")
            } else {
                format!("property {at} made optional")
            }
        }
        Kind::PropertyAdded {
            writer: slot,
            required,
            ..
        } => {
            let which = if *required { "required" } else { "optional" };
            let verb = if inverted { "removed" } else { "added" };
            match slot {
                Slot::Open => format!(
                    "{which} property {at} {verb} while {writer}'s content model is open, so \
                     {writer} data may hold any value under that name"
                ),
                Slot::Closed | Slot::Partial { covered: true } => {
                    format!("{which} property {at} {verb}")
                }
                Slot::Partial { covered: false } => format!(
                    "property {at} {verb}, not covered by {writer}'s additionalProperties schema"
                ),
            }
        }
        Kind::PropertyRemoved { reader: slot, .. } => {
            let verb = if inverted { "added" } else { "removed" };
            match slot {
                Slot::Open => format!("property {at} {verb}"),
                Slot::Closed => {
                    format!("property {at} {verb} while {reader}'s content model is closed")
                }
                Slot::Partial { .. } => format!(
                    "property {at} {verb}, not covered by {reader}'s additionalProperties schema"
                ),
            }
        }
        Kind::AdditionalProperties {
            writer: w,
            reader: r,
        } => {
            let show = |e: &Extra| match e {
                Extra::Open => "open (absent or true)",
                Extra::Closed => "closed (false)",
                Extra::Schema => "a schema",
            };
            let (before, after) = order(w, r, inverted);
            format!(
                "additionalProperties of {} changed from {} to {}",
                owner(pointer),
                show(before),
                show(after)
            )
        }
        Kind::Items {
            writer: w,
            reader: r,
        } => {
            let (_, after) = order(w, r, inverted);
            let of = owner(pointer);
            if *after {
                format!("items schema added to {of}")
            } else {
                format!("items schema removed from {of}")
            }
        }
        Kind::Unanalysed { what } if what.is_empty() => format!("unanalysed change at {at}"),
        Kind::Unanalysed { what } => format!("unanalysed change at {at}: {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What a mode says of a pair: accepted (and the Confluent difference found that it
    /// accepts; "" when the diff finds nothing), or refused with the Confluent difference
    /// type that refuses it and the words naming the change.
    #[derive(Debug, Clone, Copy)]
    enum Want {
        Accepts(&'static str),
        Refuses(&'static str, &'static str),
    }
    use Want::{Accepts, Refuses};

    struct Row {
        what: &'static str,
        old: Value,
        new: Value,
        /// Old -> new: a consumer using the new version reads old data.
        backward: Want,
        /// New -> old: a consumer using the old version reads new data.
        forward: Want,
    }

    /// An object schema; `closed`: `additionalProperties: false`.
    fn object(closed: bool, properties: Value, required: &[&str]) -> Value {
        let mut schema = json!({"type": "object", "properties": properties, "required": required});
        if closed {
            schema["additionalProperties"] = json!(false);
        }
        schema
    }

    fn closed(properties: Value, required: &[&str]) -> Value {
        object(true, properties, required)
    }

    fn open(properties: Value, required: &[&str]) -> Value {
        object(false, properties, required)
    }

    /// The compatibility table. Each row: old and new version, what `backward` (diff old ->
    /// new) and `forward` (diff new -> old) say, with the `Difference.Type` Confluent's
    /// `json-schema-provider` reports for it and whether its `COMPATIBLE_CHANGES_STRICT`
    /// holds it. `full` is both, `none` accepts all (checked for every row below).
    #[allow(clippy::too_many_lines)]
    fn rows() -> Vec<Row> {
        let id = json!({"type": "string"});
        vec![
            // Adding a property: the writer's content model decides. A closed one
            // (additionalProperties false) never held it: OPTIONAL_PROPERTY_ADDED_TO_UNOPEN_
            // CONTENT_MODEL is compatible; the other way the old reader refuses the new
            // property: PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL.
            Row {
                what: "optional field added, closed model",
                old: closed(json!({"id": id}), &["id"]),
                new: closed(json!({"id": id, "coupon": {"type": "string"}}), &["id"]),
                backward: Accepts("OPTIONAL_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL"),
                forward: Refuses(
                    "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                    "property /properties/coupon added while v1's content model is closed",
                ),
            },
            // An open model may already hold anything under the new name:
            // OPTIONAL_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL is not in the strict set.
            // Reading new data with the old open schema: PROPERTY_REMOVED_FROM_OPEN_CONTENT_MODEL.
            Row {
                what: "optional field added, open model",
                old: open(json!({"id": id}), &["id"]),
                new: open(json!({"id": id, "coupon": {"type": "string"}}), &["id"]),
                backward: Refuses(
                    "OPTIONAL_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
                    "optional property /properties/coupon added while v1's content model is open",
                ),
                forward: Accepts("PROPERTY_REMOVED_FROM_OPEN_CONTENT_MODEL"),
            },
            // ... unless its schema accepts anything:
            // PROPERTY_WITH_EMPTY_SCHEMA_ADDED_TO_OPEN_CONTENT_MODEL.
            Row {
                what: "field with an empty schema added, open model",
                old: open(json!({"id": id}), &["id"]),
                new: open(
                    json!({"id": id, "extra": {"description": "anything"}}),
                    &["id"],
                ),
                backward: Accepts("PROPERTY_WITH_EMPTY_SCHEMA_ADDED_TO_OPEN_CONTENT_MODEL"),
                forward: Accepts("PROPERTY_REMOVED_FROM_OPEN_CONTENT_MODEL"),
            },
            // REQUIRED_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL: old data lacks it.
            Row {
                what: "required field added, closed model",
                old: closed(json!({"id": id}), &["id"]),
                new: closed(
                    json!({"id": id, "coupon": {"type": "string"}}),
                    &["id", "coupon"],
                ),
                backward: Refuses(
                    "REQUIRED_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL",
                    "required property /properties/coupon added",
                ),
                forward: Refuses(
                    "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                    "property /properties/coupon added while v1's content model is closed",
                ),
            },
            // REQUIRED_PROPERTY_WITH_DEFAULT_ADDED_TO_UNOPEN_CONTENT_MODEL: the reader has a
            // default for old data.
            Row {
                what: "required field with a default added, closed model",
                old: closed(json!({"id": id}), &["id"]),
                new: closed(
                    json!({"id": id, "coupon": {"type": "string", "default": ""}}),
                    &["id", "coupon"],
                ),
                backward: Accepts("REQUIRED_PROPERTY_WITH_DEFAULT_ADDED_TO_UNOPEN_CONTENT_MODEL"),
                forward: Refuses(
                    "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                    "property /properties/coupon added while v1's content model is closed",
                ),
            },
            // REQUIRED_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL.
            Row {
                what: "required field added, open model",
                old: open(json!({"id": id}), &["id"]),
                new: open(
                    json!({"id": id, "coupon": {"type": "string"}}),
                    &["id", "coupon"],
                ),
                backward: Refuses(
                    "REQUIRED_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
                    "required property /properties/coupon added while v1's content model is open",
                ),
                forward: Accepts("PROPERTY_REMOVED_FROM_OPEN_CONTENT_MODEL"),
            },
            // Removing a property: the reader's content model decides. A closed reader refuses
            // old data holding it: PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL.
            Row {
                what: "optional field removed, closed model",
                old: closed(json!({"id": id, "note": {"type": "string"}}), &["id"]),
                new: closed(json!({"id": id}), &["id"]),
                backward: Refuses(
                    "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                    "property /properties/note removed while v2's content model is closed",
                ),
                forward: Accepts("OPTIONAL_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL"),
            },
            // An open reader ignores it: PROPERTY_REMOVED_FROM_OPEN_CONTENT_MODEL. The old
            // reader of new (open) data: OPTIONAL_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL.
            Row {
                what: "optional field removed, open model",
                old: open(json!({"id": id, "note": {"type": "string"}}), &["id"]),
                new: open(json!({"id": id}), &["id"]),
                backward: Accepts("PROPERTY_REMOVED_FROM_OPEN_CONTENT_MODEL"),
                forward: Refuses(
                    "OPTIONAL_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
                    "optional property /properties/note removed while v2's content model is open",
                ),
            },
            Row {
                what: "required field removed, closed model",
                old: closed(
                    json!({"id": id, "note": {"type": "string"}}),
                    &["id", "note"],
                ),
                new: closed(json!({"id": id}), &["id"]),
                backward: Refuses(
                    "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                    "property /properties/note removed while v2's content model is closed",
                ),
                forward: Refuses(
                    "REQUIRED_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL",
                    "required property /properties/note removed",
                ),
            },
            Row {
                what: "required field removed, open model",
                old: open(
                    json!({"id": id, "note": {"type": "string"}}),
                    &["id", "note"],
                ),
                new: open(json!({"id": id}), &["id"]),
                backward: Accepts("PROPERTY_REMOVED_FROM_OPEN_CONTENT_MODEL"),
                forward: Refuses(
                    "REQUIRED_PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
                    "required property /properties/note removed while v2's content model is open",
                ),
            },
            // A property that could never occur: PROPERTY_WITH_FALSE_REMOVED_FROM_CLOSED_CONTENT_MODEL.
            Row {
                what: "`false` field removed, closed model",
                old: closed(json!({"id": id, "legacy": false}), &["id"]),
                new: closed(json!({"id": id}), &["id"]),
                backward: Accepts("PROPERTY_WITH_FALSE_REMOVED_FROM_CLOSED_CONTENT_MODEL"),
                forward: Accepts("OPTIONAL_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL"),
            },
            // REQUIRED_ATTRIBUTE_ADDED / REQUIRED_ATTRIBUTE_REMOVED.
            Row {
                what: "field made required",
                old: closed(json!({"id": id, "note": {"type": "string"}}), &["id"]),
                new: closed(
                    json!({"id": id, "note": {"type": "string"}}),
                    &["id", "note"],
                ),
                backward: Refuses(
                    "REQUIRED_ATTRIBUTE_ADDED",
                    "property /properties/note made required",
                ),
                forward: Accepts("REQUIRED_ATTRIBUTE_REMOVED"),
            },
            Row {
                what: "field made optional",
                old: closed(
                    json!({"id": id, "note": {"type": "string"}}),
                    &["id", "note"],
                ),
                new: closed(json!({"id": id, "note": {"type": "string"}}), &["id"]),
                backward: Accepts("REQUIRED_ATTRIBUTE_REMOVED"),
                forward: Refuses(
                    "REQUIRED_ATTRIBUTE_ADDED",
                    "property /properties/note made optional",
                ),
            },
            // NumberSchemaDiff: integer -> number TYPE_EXTENDED, number -> integer TYPE_NARROWED.
            Row {
                what: "type widened (integer to number)",
                old: closed(json!({"total": {"type": "integer"}}), &[]),
                new: closed(json!({"total": {"type": "number"}}), &[]),
                backward: Accepts("TYPE_EXTENDED"),
                forward: Refuses(
                    "TYPE_NARROWED",
                    "type of /properties/total widened from integer to number",
                ),
            },
            Row {
                what: "type narrowed (number to integer)",
                old: closed(json!({"total": {"type": "number"}}), &[]),
                new: closed(json!({"total": {"type": "integer"}}), &[]),
                backward: Refuses(
                    "TYPE_NARROWED",
                    "type of /properties/total narrowed from number to integer",
                ),
                forward: Accepts("TYPE_EXTENDED"),
            },
            // A type array is a sum type: SUM_TYPE_EXTENDED; the sum read by a single type is
            // TYPE_CHANGED, a smaller sum SUM_TYPE_NARROWED.
            Row {
                what: "type widened (string to [string, null])",
                old: closed(json!({"note": {"type": "string"}}), &[]),
                new: closed(json!({"note": {"type": ["string", "null"]}}), &[]),
                backward: Accepts("SUM_TYPE_EXTENDED"),
                forward: Refuses(
                    "TYPE_CHANGED",
                    "type of /properties/note widened from string to [null, string]",
                ),
            },
            Row {
                what: "type narrowed ([string, null, integer] to [string, null])",
                old: closed(
                    json!({"note": {"type": ["string", "null", "integer"]}}),
                    &[],
                ),
                new: closed(json!({"note": {"type": ["string", "null"]}}), &[]),
                backward: Refuses(
                    "SUM_TYPE_NARROWED",
                    "type of /properties/note narrowed from [integer, null, string] to [null, string]",
                ),
                forward: Accepts("SUM_TYPE_EXTENDED"),
            },
            Row {
                what: "type changed (string to number)",
                old: closed(json!({"id": {"type": "string"}}), &[]),
                new: closed(json!({"id": {"type": "number"}}), &[]),
                backward: Refuses(
                    "TYPE_CHANGED",
                    "type of /properties/id changed from string to number",
                ),
                forward: Refuses(
                    "TYPE_CHANGED",
                    "type of /properties/id changed from string to number",
                ),
            },
            // EnumSchemaDiff: ENUM_ARRAY_EXTENDED (compatible), _NARROWED, _CHANGED.
            Row {
                what: "enum value added",
                old: closed(json!({"status": {"enum": ["placed", "paid"]}}), &[]),
                new: closed(
                    json!({"status": {"enum": ["placed", "paid", "shipped"]}}),
                    &[],
                ),
                backward: Accepts("ENUM_ARRAY_EXTENDED"),
                forward: Refuses(
                    "ENUM_ARRAY_NARROWED",
                    r#"enum of /properties/status changed: "shipped" added"#,
                ),
            },
            Row {
                what: "enum value removed",
                old: closed(json!({"status": {"enum": ["placed", "paid"]}}), &[]),
                new: closed(json!({"status": {"enum": ["placed"]}}), &[]),
                backward: Refuses(
                    "ENUM_ARRAY_NARROWED",
                    r#"enum of /properties/status changed: "paid" removed"#,
                ),
                forward: Accepts("ENUM_ARRAY_EXTENDED"),
            },
            Row {
                what: "enum value replaced",
                old: closed(json!({"status": {"enum": ["placed", "paid"]}}), &[]),
                new: closed(json!({"status": {"enum": ["placed", "settled"]}}), &[]),
                backward: Refuses(
                    "ENUM_ARRAY_CHANGED",
                    r#"enum of /properties/status changed: "paid" removed, "settled" added"#,
                ),
                forward: Refuses(
                    "ENUM_ARRAY_CHANGED",
                    r#"enum of /properties/status changed: "paid" removed, "settled" added"#,
                ),
            },
            // A typed schema gaining an enum becomes allOf(type, enum) for Confluent:
            // TYPE_CHANGED; losing it, PRODUCT_TYPE_NARROWED (compatible).
            Row {
                what: "enum added to a string",
                old: closed(json!({"status": {"type": "string"}}), &[]),
                new: closed(
                    json!({"status": {"type": "string", "enum": ["placed", "paid"]}}),
                    &[],
                ),
                backward: Refuses(
                    "TYPE_CHANGED",
                    r#"enum ["placed", "paid"] added to /properties/status"#,
                ),
                forward: Accepts("PRODUCT_TYPE_NARROWED"),
            },
            // ConstSchemaDiff: ENUM_ARRAY_CHANGED.
            Row {
                what: "const changed",
                old: closed(json!({"kind": {"const": "order"}}), &[]),
                new: closed(json!({"kind": {"const": "purchase"}}), &[]),
                backward: Refuses(
                    "ENUM_ARRAY_CHANGED",
                    r#"const of /properties/kind changed: "order" removed, "purchase" added"#,
                ),
                forward: Refuses("ENUM_ARRAY_CHANGED", "const of /properties/kind changed"),
            },
            // StringSchemaDiff: MAX_LENGTH_INCREASED / _REMOVED and MIN_LENGTH_DECREASED /
            // _REMOVED are compatible; added, decreased (max), increased (min) are not.
            Row {
                what: "maxLength decreased",
                old: closed(json!({"id": {"type": "string", "maxLength": 80}}), &[]),
                new: closed(json!({"id": {"type": "string", "maxLength": 40}}), &[]),
                backward: Refuses(
                    "MAX_LENGTH_DECREASED",
                    "maxLength of /properties/id decreased from 80 to 40",
                ),
                forward: Accepts("MAX_LENGTH_INCREASED"),
            },
            Row {
                what: "maxLength added",
                old: closed(json!({"id": {"type": "string"}}), &[]),
                new: closed(json!({"id": {"type": "string", "maxLength": 40}}), &[]),
                backward: Refuses("MAX_LENGTH_ADDED", "maxLength 40 added to /properties/id"),
                forward: Accepts("MAX_LENGTH_REMOVED"),
            },
            Row {
                what: "minLength increased",
                old: closed(json!({"id": {"type": "string", "minLength": 1}}), &[]),
                new: closed(json!({"id": {"type": "string", "minLength": 3}}), &[]),
                backward: Refuses(
                    "MIN_LENGTH_INCREASED",
                    "minLength of /properties/id increased from 1 to 3",
                ),
                forward: Accepts("MIN_LENGTH_DECREASED"),
            },
            // PATTERN_ADDED / _CHANGED are not compatible, PATTERN_REMOVED is.
            Row {
                what: "pattern added",
                old: closed(json!({"id": {"type": "string"}}), &[]),
                new: closed(json!({"id": {"type": "string", "pattern": "^o-"}}), &[]),
                backward: Refuses("PATTERN_ADDED", r#"pattern "^o-" added to /properties/id"#),
                forward: Accepts("PATTERN_REMOVED"),
            },
            // NumberSchemaDiff: MINIMUM_DECREASED and MAXIMUM_INCREASED are compatible.
            Row {
                what: "minimum lowered",
                old: closed(json!({"total": {"type": "number", "minimum": 0}}), &[]),
                new: closed(json!({"total": {"type": "number", "minimum": -10}}), &[]),
                backward: Accepts("MINIMUM_DECREASED"),
                forward: Refuses(
                    "MINIMUM_INCREASED",
                    "minimum of /properties/total decreased from 0 to -10",
                ),
            },
            Row {
                what: "maximum lowered",
                old: closed(json!({"total": {"type": "number", "maximum": 1000}}), &[]),
                new: closed(json!({"total": {"type": "number", "maximum": 500}}), &[]),
                backward: Refuses(
                    "MAXIMUM_DECREASED",
                    "maximum of /properties/total decreased from 1000 to 500",
                ),
                forward: Accepts("MAXIMUM_INCREASED"),
            },
            // MULTIPLE_OF_REDUCED (a divisor of the old one) is compatible, _EXPANDED not.
            Row {
                what: "multipleOf reduced",
                old: closed(json!({"total": {"type": "number", "multipleOf": 0.5}}), &[]),
                new: closed(
                    json!({"total": {"type": "number", "multipleOf": 0.25}}),
                    &[],
                ),
                backward: Accepts("MULTIPLE_OF_REDUCED"),
                forward: Refuses(
                    "MULTIPLE_OF_EXPANDED",
                    "multipleOf of /properties/total changed from 0.5 to 0.25",
                ),
            },
            // ArraySchemaDiff: UNIQUE_ITEMS_ADDED is not compatible, _REMOVED is.
            Row {
                what: "uniqueItems added",
                old: closed(json!({"lines": {"type": "array"}}), &[]),
                new: closed(
                    json!({"lines": {"type": "array", "uniqueItems": true}}),
                    &[],
                ),
                backward: Refuses(
                    "UNIQUE_ITEMS_ADDED",
                    "uniqueItems added to /properties/lines",
                ),
                forward: Accepts("UNIQUE_ITEMS_REMOVED"),
            },
            // The items schema is compared recursively; one appearing is SCHEMA_ADDED.
            Row {
                what: "array items narrowed",
                old: closed(
                    json!({"lines": {"type": "array", "items": {"type": "number"}}}),
                    &[],
                ),
                new: closed(
                    json!({"lines": {"type": "array", "items": {"type": "integer"}}}),
                    &[],
                ),
                backward: Refuses(
                    "TYPE_NARROWED",
                    "type of /properties/lines/items narrowed from number to integer",
                ),
                forward: Accepts("TYPE_EXTENDED"),
            },
            Row {
                what: "items schema added",
                old: closed(json!({"lines": {"type": "array"}}), &[]),
                new: closed(
                    json!({"lines": {"type": "array", "items": {"type": "string"}}}),
                    &[],
                ),
                backward: Refuses("SCHEMA_ADDED", "items schema added to /properties/lines"),
                forward: Accepts("SCHEMA_REMOVED"),
            },
            // Nested objects recursively, reported by JSON pointer.
            Row {
                what: "nested field's type narrowed",
                old: closed(
                    json!({"customer": {"type": "object", "properties": {"age": {"type": "number"}}}}),
                    &[],
                ),
                new: closed(
                    json!({"customer": {"type": "object", "properties": {"age": {"type": "integer"}}}}),
                    &[],
                ),
                backward: Refuses(
                    "TYPE_NARROWED",
                    "type of /properties/customer/properties/age narrowed from number to integer",
                ),
                forward: Accepts("TYPE_EXTENDED"),
            },
            // ObjectSchemaDiff.compareAdditionalProperties: closing an open model is
            // ADDITIONAL_PROPERTIES_REMOVED, opening ADDITIONAL_PROPERTIES_ADDED, a schema
            // replacing `true` ADDITIONAL_PROPERTIES_NARROWED.
            Row {
                what: "open model closed",
                old: open(json!({"id": id}), &[]),
                new: closed(json!({"id": id}), &[]),
                backward: Refuses(
                    "ADDITIONAL_PROPERTIES_REMOVED",
                    "additionalProperties of the root changed from open (absent or true) to closed (false)",
                ),
                forward: Accepts("ADDITIONAL_PROPERTIES_ADDED"),
            },
            Row {
                what: "closed model opened",
                old: closed(json!({"id": id}), &[]),
                new: open(json!({"id": id}), &[]),
                backward: Accepts("ADDITIONAL_PROPERTIES_ADDED"),
                forward: Refuses(
                    "ADDITIONAL_PROPERTIES_REMOVED",
                    "additionalProperties of the root changed from closed (false) to open (absent or true)",
                ),
            },
            Row {
                what: "additionalProperties schema added to an open model",
                old: open(json!({"id": id}), &[]),
                new: json!({"type": "object", "properties": {"id": id},
                            "additionalProperties": {"type": "string"}}),
                backward: Refuses(
                    "ADDITIONAL_PROPERTIES_NARROWED",
                    "additionalProperties of the root changed from open (absent or true) to a schema",
                ),
                forward: Accepts("ADDITIONAL_PROPERTIES_EXTENDED"),
            },
            // A partially open model (additionalProperties a schema): a property added or
            // removed is compatible when that schema covers it
            // (PROPERTY_ADDED_IS_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL, reported with the
            // required-ness difference, here OPTIONAL_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL).
            Row {
                what: "field added, covered by a partially open model",
                old: json!({"type": "object", "properties": {"id": id},
                            "additionalProperties": {"type": "string"}}),
                new: json!({"type": "object", "properties": {"id": id, "note": {"type": "string"}},
                            "additionalProperties": {"type": "string"}}),
                backward: Accepts("OPTIONAL_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL"),
                forward: Accepts("PROPERTY_REMOVED_IS_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL"),
            },
            Row {
                what: "field added, not covered by a partially open model",
                old: json!({"type": "object", "properties": {"id": id},
                            "additionalProperties": {"type": "string"}}),
                new: json!({"type": "object", "properties": {"id": id, "n": {"type": "integer"}},
                            "additionalProperties": {"type": "string"}}),
                backward: Refuses(
                    "PROPERTY_ADDED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL",
                    "property /properties/n added, not covered by v1's additionalProperties schema",
                ),
                forward: Refuses(
                    "PROPERTY_REMOVED_NOT_COVERED_BY_PARTIALLY_OPEN_CONTENT_MODEL",
                    "property /properties/n added, not covered by v1's additionalProperties schema",
                ),
            },
            // DESCRIPTION_CHANGED, TITLE_CHANGED, DEFAULT_CHANGED: annotations never matter.
            Row {
                what: "annotations changed",
                old: closed(
                    json!({"id": {"type": "string", "description": "the id"}}),
                    &[],
                ),
                new: json!({"title": "Order", "type": "object", "additionalProperties": false,
                            "properties": {"id": {"type": "string", "description": "order id",
                                                  "examples": ["o-1"], "default": "o-0"}}}),
                backward: Accepts(""),
                forward: Accepts(""),
            },
            // Not analysed here: a changed anyOf is refused in every mode (Confluent would
            // find SUM_TYPE_EXTENDED, compatible backward).
            Row {
                what: "anyOf changed (unanalysed)",
                old: closed(
                    json!({"note": {"anyOf": [{"type": "string"}, {"type": "null"}]}}),
                    &[],
                ),
                new: closed(
                    json!({"note": {"anyOf": [{"type": "string"}, {"type": "null"}, {"type": "integer"}]}}),
                    &[],
                ),
                backward: Refuses(
                    "(unanalysed)",
                    "unanalysed change at /properties/note/anyOf",
                ),
                forward: Refuses(
                    "(unanalysed)",
                    "unanalysed change at /properties/note/anyOf",
                ),
            },
            // ... an unchanged one is fine.
            Row {
                what: "anyOf unchanged, field added to a closed model",
                old: closed(
                    json!({"note": {"anyOf": [{"type": "string"}, {"type": "null"}]}}),
                    &[],
                ),
                new: closed(
                    json!({"note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                           "id": {"type": "string"}}),
                    &[],
                ),
                backward: Accepts("OPTIONAL_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL"),
                forward: Refuses(
                    "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                    "property /properties/id added while v1's content model is closed",
                ),
            },
            // A local $ref is followed: its target changing is an unanalysed change at the
            // reference (Confluent compares the targets).
            Row {
                what: "$ref target changed (unanalysed)",
                old: json!({"$defs": {"money": {"type": "number"}}, "type": "object",
                            "properties": {"total": {"$ref": "#/$defs/money"}}}),
                new: json!({"$defs": {"money": {"type": "integer"}}, "type": "object",
                            "properties": {"total": {"$ref": "#/$defs/money"}}}),
                backward: Refuses(
                    "(unanalysed)",
                    "unanalysed change at /properties/total/$ref",
                ),
                forward: Refuses(
                    "(unanalysed)",
                    "unanalysed change at /properties/total/$ref",
                ),
            },
            Row {
                what: "$ref target unchanged, an unused definition added",
                old: json!({"$defs": {"money": {"type": "number"}}, "type": "object",
                            "properties": {"total": {"$ref": "#/$defs/money"}}}),
                new: json!({"$defs": {"money": {"type": "number"}, "cents": {"type": "integer"}},
                            "type": "object", "properties": {"total": {"$ref": "#/$defs/money"}}}),
                backward: Accepts(""),
                forward: Accepts(""),
            },
        ]
    }

    #[test]
    fn the_compatibility_table_follows_confluents_json_schema_rules() {
        for row in rows() {
            let what = row.what;
            for (mode, want) in [(Mode::Backward, row.backward), (Mode::Forward, row.forward)] {
                let breaches = check(mode, "v1", &row.old, "v2", &row.new);
                let (writer, reader) = match mode {
                    Mode::Backward => (&row.old, &row.new),
                    _ => (&row.new, &row.old),
                };
                match want {
                    Accepts(name) => {
                        assert!(breaches.is_empty(), "{what}: {mode} refused: {breaches:?}");
                        let found = diff(writer, reader);
                        if name.is_empty() {
                            assert!(found.is_empty(), "{what}: {mode}: {found:?}");
                        } else {
                            assert!(
                                found
                                    .iter()
                                    .any(|c| c.confluent() == name && c.is_compatible()),
                                "{what}: {mode}: no compatible {name} in {found:?}"
                            );
                        }
                    }
                    Refuses(name, words) => {
                        assert_eq!(breaches.len(), 1, "{what}: {mode} accepted");
                        let breach = &breaches[0];
                        let (r, w) = if mode == Mode::Backward {
                            ("v2", "v1")
                        } else {
                            ("v1", "v2")
                        };
                        assert_eq!((breach.reader.as_str(), breach.writer.as_str()), (r, w));
                        assert!(
                            breach.found.iter().any(|c| c.confluent() == name),
                            "{what}: {mode}: no {name} in {:?}",
                            breach.found
                        );
                        let text = breach.to_string();
                        assert!(
                            text.starts_with(&format!(
                                "a consumer using {r} cannot read {w} data ("
                            )),
                            "{what}: {text}"
                        );
                        assert!(
                            text.contains(words),
                            "{what}: {mode}: {text:?} lacks {words:?}"
                        );
                    }
                }
            }
            let refused = [row.backward, row.forward]
                .iter()
                .filter(|w| matches!(w, Refuses(..)))
                .count();
            assert_eq!(
                check(Mode::Full, "v1", &row.old, "v2", &row.new).len(),
                refused,
                "{what}: full is backward and forward"
            );
            assert!(check(Mode::None, "v1", &row.old, "v2", &row.new).is_empty());
            assert!(
                check(Mode::Full, "v1", &row.old, "v1", &row.old).is_empty(),
                "{what}: a version is compatible with itself"
            );
        }
    }

    #[test]
    fn every_change_is_named_together() {
        let old = closed(
            json!({"id": {"type": "string"}, "total": {"type": "number"}}),
            &["id"],
        );
        let new = closed(
            json!({"id": {"type": "string"}, "total": {"type": "integer"},
                   "coupon": {"type": "string"}}),
            &["id", "coupon"],
        );
        let breaches = check(Mode::Backward, "v1", &old, "v2", &new);
        assert_eq!(
            breaches.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "a consumer using v2 cannot read v1 data (required property /properties/coupon \
              added; type of /properties/total narrowed from number to integer)"
            ]
        );
    }

    #[test]
    fn boolean_schemas_and_pointers_are_handled() {
        // `true` accepts anything: narrowing it to a type is a change, `false` rejects all.
        let found = diff(&json!(true), &json!({"type": "string"}));
        assert_eq!(found.len(), 1);
        assert!(!found[0].is_compatible());
        assert!(
            diff(&json!({"type": "string"}), &json!(true))
                .iter()
                .all(Change::is_compatible)
        );
        assert!(diff(&json!(false), &json!({"type": "string"})).is_empty());
        let found = diff(&json!({"type": "string"}), &json!(false));
        assert_eq!(
            found[0].describe("v1", "v2", false),
            "the root is now `false` (no value is valid)"
        );
        // Pointers escape `/` and `~` (RFC 6901).
        let found = diff(
            &closed(json!({"a/b~c": {"type": "number"}}), &[]),
            &closed(json!({"a/b~c": {"type": "integer"}}), &[]),
        );
        assert_eq!(found[0].pointer, "/properties/a~1b~0c");
        // A malformed keyword is not analysed: unchanged is fine, changed is refused.
        let odd = |v| json!({"type": "object", "properties": {"n": {"maximum": v}}});
        assert!(diff(&odd(json!("x")), &odd(json!("x"))).is_empty());
        assert!(!diff(&odd(json!("x")), &odd(json!("y")))[0].is_compatible());
    }

    #[test]
    fn references_are_followed_to_what_they_name() {
        let doc = |money: Value, reference: &str, extra: bool| {
            let mut d = json!({"$defs": {"money": money}, "type": "object",
                               "additionalProperties": false,
                               "properties": {"total": {"$ref": reference}}});
            if extra {
                d["properties"]["note"] = json!({"type": "string"});
            }
            d
        };
        let number = json!({"$anchor": "money", "$id": "urn:money", "type": "number"});
        let integer = json!({"$anchor": "money", "$id": "urn:money", "type": "integer"});
        for reference in ["#/$defs/money", "#money", "urn:money"] {
            // What it names changed: refused, at the reference.
            let found = diff(
                &doc(number.clone(), reference, false),
                &doc(integer.clone(), reference, false),
            );
            assert_eq!(found.len(), 1, "{reference}: {found:?}");
            assert_eq!(found[0].pointer, "/properties/total/$ref");
            assert!(!found[0].is_compatible());
            // Unchanged, something else changed: the reference is fine.
            let found = diff(
                &doc(number.clone(), reference, false),
                &doc(number.clone(), reference, true),
            );
            assert!(
                found.iter().all(Change::is_compatible),
                "{reference}: {found:?}"
            );
        }
        // A reference to nothing in the document counts as unchanged only if nothing changed.
        let lost = |extra| doc(json!({"type": "number"}), "#nowhere", extra);
        assert!(diff(&lost(false), &lost(false)).is_empty());
        assert!(
            !diff(&lost(false), &lost(true))
                .iter()
                .all(Change::is_compatible)
        );
        // A cycle is followed once.
        let tree = |t: &str| {
            json!({"$defs": {"node": {"type": "object", "properties":
            {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}, "v": {"type": t}}}},
            "$ref": "#/$defs/node"})
        };
        assert!(diff(&tree("number"), &tree("number")).is_empty());
        assert!(
            !diff(&tree("number"), &tree("integer"))
                .iter()
                .all(Change::is_compatible)
        );
    }

    #[test]
    fn deep_nesting_stops_at_the_limit() {
        let mut old = json!({"type": "string"});
        let mut new = json!({"type": "number"});
        for _ in 0..200 {
            old = json!({"type": "object", "properties": {"a": old}});
            new = json!({"type": "object", "properties": {"a": new}});
        }
        let found = diff(&old, &new);
        assert_eq!(found.len(), 1);
        assert!(matches!(&found[0].kind, Kind::Unanalysed { what } if what.contains("deeper")));
    }
}
