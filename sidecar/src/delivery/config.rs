//! The deliveries file (`--deliveries-file`): `[[delivery]]` tables, each a topic delivered
//! to an HTTP service. Parsed and checked at start and on each change (the only I/O: reading
//! the `ca_file`s and client certificates and keys); every error names its field (`delivery[1].url: ...`) so a typo is found
//! without reading the code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use toml::{Table, Value};

use crate::subscription_filter::Filter;

/// How an event is put into the HTTP request (CloudEvents HTTP binding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentMode {
    /// `ce-*` headers, the data as the body; a structured-mode record stays structured.
    Binary,
    /// The JSON event format as the body (`application/cloudevents+json`).
    Structured,
}

/// What a delivery keeps in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// A partition's events one at a time, in offset order.
    Partition,
    /// A key's events one at a time, in offset order; keys of a partition side by side.
    Key,
}

/// One delivery subscription, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub name: String,
    pub topic: String,
    pub url: String,
    pub content_mode: ContentMode,
    pub ordering: Order,
    pub group: String,
    pub filter: Option<Filter>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// POSTs in flight at once across the delivery's partitions.
    pub max_in_flight: u32,
    pub dead_letter_topic: Option<String>,
    pub reply_topic: Option<String>,
    /// Reply types routed elsewhere than `reply_topic`.
    pub reply_topic_by_type: BTreeMap<String, String>,
    /// CA certificates trusted for the `https://` url besides the system's.
    pub ca_file: Option<CaFile>,
    /// The client certificate shown to an `https://` service that asks for one (mutual TLS).
    pub client_identity: Option<ClientIdentity>,
}

/// `client_cert_file` and `client_key_file`, read at start and checked by the TLS stack.
#[derive(Clone, PartialEq)]
pub struct ClientIdentity {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// PEM: the certificate, then any intermediates.
    pub cert_pem: Vec<u8>,
    /// PEM, PKCS#8 (`-----BEGIN PRIVATE KEY-----`).
    pub key_pem: Vec<u8>,
}

/// Never prints the key.
impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

/// A `ca_file`, read at start.
#[derive(Debug, Clone, PartialEq)]
pub struct CaFile {
    /// Where it was read (a relative `ca_file` joined to the deliveries file's directory).
    pub path: PathBuf,
    /// Each a DER X.509 certificate the TLS stack has parsed.
    pub certificates: Vec<Vec<u8>>,
}

impl Delivery {
    /// Where a reply of CloudEvent type `ty` goes; `None`: nowhere (it is not published).
    pub fn reply_topic_for(&self, ty: &str) -> Option<&str> {
        self.reply_topic_by_type
            .get(ty)
            .or(self.reply_topic.as_ref())
            .map(String::as_str)
    }

    /// Whether answers are read as possible replies at all.
    pub fn wants_replies(&self) -> bool {
        self.reply_topic.is_some() || !self.reply_topic_by_type.is_empty()
    }
}

/// A deliveries file that cannot be used; `field` is e.g. `delivery[0].url`.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

const DEFAULT_TIMEOUT_MS: u64 = 10_000;
const DEFAULT_MAX_ATTEMPTS: u64 = 8;
const DEFAULT_INITIAL_BACKOFF_MS: u64 = 200;
const DEFAULT_MAX_BACKOFF_MS: u64 = 30_000;
const DEFAULT_MAX_IN_FLIGHT: u64 = 16;
const MAX_IN_FLIGHT: u64 = 1_000;
/// Bounds that catch unit mistakes (seconds written as milliseconds and the like).
const MAX_TIMEOUT_MS: u64 = 600_000;
const MAX_ATTEMPTS: u64 = 1_000;
const MAX_BACKOFF_MS: u64 = 3_600_000;
const MAX_NAME_LEN: usize = 64;

const FIELDS: &[&str] = &[
    "name",
    "topic",
    "url",
    "content_mode",
    "ordering",
    "group",
    "filter",
    "timeout_ms",
    "max_attempts",
    "initial_backoff_ms",
    "max_backoff_ms",
    "max_in_flight",
    "dead_letter_topic",
    "reply_topic",
    "reply_topic_by_type",
    "ca_file",
    "client_cert_file",
    "client_key_file",
];

fn err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Parses the file's text; a relative `ca_file` is read from `dir` (the file's directory).
/// An empty file (or one without `[[delivery]]`) means none.
pub fn parse(text: &str, dir: &Path) -> Result<Vec<Delivery>, ConfigError> {
    let root: Table = toml::from_str(text).map_err(|e| err("deliveries file", e.to_string()))?;
    if let Some(key) = root.keys().find(|k| *k != "delivery") {
        return Err(err(
            key.as_str(),
            "unknown field (expected `[[delivery]]` tables)",
        ));
    }
    let entries = match root.get("delivery") {
        None => return Ok(Vec::new()),
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err(err("delivery", "must be `[[delivery]]` tables")),
    };
    let deliveries = entries
        .iter()
        .enumerate()
        .map(|(i, entry)| match entry {
            Value::Table(table) => delivery(table, &format!("delivery[{i}]"), dir),
            _ => Err(err(format!("delivery[{i}]"), "must be a table")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_unique(&deliveries)?;
    Ok(deliveries)
}

fn delivery(table: &Table, at: &str, dir: &Path) -> Result<Delivery, ConfigError> {
    if let Some(key) = table.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(err(format!("{at}.{key}"), "unknown field"));
    }
    let name = name(table, at)?;
    let max_backoff_ms = int(
        table,
        at,
        "max_backoff_ms",
        DEFAULT_MAX_BACKOFF_MS,
        1,
        MAX_BACKOFF_MS,
    )?;
    let initial_backoff_ms = int(
        table,
        at,
        "initial_backoff_ms",
        DEFAULT_INITIAL_BACKOFF_MS,
        1,
        max_backoff_ms,
    )?;
    let group = match string(table, at, "group")? {
        Some(group) if group.is_empty() => {
            return Err(err(format!("{at}.group"), "must not be empty"));
        }
        Some(group) => group,
        None => format!("eventwire-delivery-{name}"),
    };
    let url = url(table, at)?;
    Ok(Delivery {
        topic: topic(table, at, "topic")?.ok_or_else(|| err(format!("{at}.topic"), "missing"))?,
        ca_file: ca_file(table, at, dir, &url)?,
        client_identity: client_identity(table, at, dir, &url)?,
        url,
        content_mode: content_mode(table, at)?,
        ordering: ordering(table, at)?,
        group,
        filter: filter(table, at)?,
        timeout: Duration::from_millis(int(
            table,
            at,
            "timeout_ms",
            DEFAULT_TIMEOUT_MS,
            1,
            MAX_TIMEOUT_MS,
        )?),
        // The bound above fits in u32.
        max_attempts: u32::try_from(int(
            table,
            at,
            "max_attempts",
            DEFAULT_MAX_ATTEMPTS,
            1,
            MAX_ATTEMPTS,
        )?)
        .unwrap_or(u32::MAX),
        initial_backoff: Duration::from_millis(initial_backoff_ms),
        max_backoff: Duration::from_millis(max_backoff_ms),
        // The bound fits in u32.
        max_in_flight: u32::try_from(int(
            table,
            at,
            "max_in_flight",
            DEFAULT_MAX_IN_FLIGHT,
            1,
            MAX_IN_FLIGHT,
        )?)
        .unwrap_or(u32::MAX),
        dead_letter_topic: topic(table, at, "dead_letter_topic")?,
        reply_topic: topic(table, at, "reply_topic")?,
        reply_topic_by_type: topics_by_type(table, at)?,
        name,
    })
}

/// Names label log lines and form the default group id, so they stay short and plain.
fn name(table: &Table, at: &str) -> Result<String, ConfigError> {
    let field = format!("{at}.name");
    let name = string(table, at, "name")?.ok_or_else(|| err(&field, "missing"))?;
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(plain) {
        return Err(err(
            field,
            format!("must be 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 _ -"),
        ));
    }
    Ok(name)
}

fn string(table: &Table, at: &str, key: &str) -> Result<Option<String>, ConfigError> {
    match table.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(err(format!("{at}.{key}"), "must be a string")),
    }
}

fn topic(table: &Table, at: &str, key: &str) -> Result<Option<String>, ConfigError> {
    let topic = string(table, at, key)?;
    if let Some(t) = &topic {
        eventwire_contract::topic::validate(t)
            .map_err(|e| err(format!("{at}.{key}"), e.to_string()))?;
    }
    Ok(topic)
}

fn content_mode(table: &Table, at: &str) -> Result<ContentMode, ConfigError> {
    match string(table, at, "content_mode")?.as_deref() {
        None | Some("binary") => Ok(ContentMode::Binary),
        Some("structured") => Ok(ContentMode::Structured),
        Some(_) => Err(err(
            format!("{at}.content_mode"),
            "must be \"binary\" or \"structured\"",
        )),
    }
}

fn ordering(table: &Table, at: &str) -> Result<Order, ConfigError> {
    match string(table, at, "ordering")?.as_deref() {
        None | Some("partition") => Ok(Order::Partition),
        Some("key") => Ok(Order::Key),
        Some(_) => Err(err(
            format!("{at}.ordering"),
            "must be \"partition\" or \"key\"",
        )),
    }
}

/// `{ "<CloudEvent type>" = "<topic>" }`.
fn topics_by_type(table: &Table, at: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let field = format!("{at}.reply_topic_by_type");
    let entries = match table.get("reply_topic_by_type") {
        None => return Ok(BTreeMap::new()),
        Some(Value::Table(entries)) => entries,
        Some(_) => return Err(err(field, "must be a table of type = \"topic\"")),
    };
    entries
        .iter()
        .map(|(ty, topic)| {
            let at = format!("{field}.\"{ty}\"");
            if ty.is_empty() {
                return Err(err(at, "a CloudEvent type is not empty"));
            }
            let Value::String(topic) = topic else {
                return Err(err(at, "must be a topic name (a string)"));
            };
            eventwire_contract::topic::validate(topic).map_err(|e| err(&at, e.to_string()))?;
            Ok((ty.clone(), topic.clone()))
        })
        .collect()
}

/// `http://` or `https://` (the server's certificate checked against the system's CAs and
/// the `ca_file`, never skipped).
fn url(table: &Table, at: &str) -> Result<String, ConfigError> {
    let field = format!("{at}.url");
    let url = string(table, at, "url")?.ok_or_else(|| err(&field, "missing"))?;
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| err(&field, "must start with http:// or https://"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(err(field, "not a URL with a host"));
    }
    Ok(url)
}

/// A PEM file of one or more CA certificates, read and parsed now so that a wrong path or
/// file stops the start rather than every delivery attempt.
fn ca_file(table: &Table, at: &str, dir: &Path, url: &str) -> Result<Option<CaFile>, ConfigError> {
    let field = format!("{at}.ca_file");
    let Some(given) = string(table, at, "ca_file")? else {
        return Ok(None);
    };
    if given.is_empty() {
        return Err(err(field, "must not be empty"));
    }
    if !url.starts_with("https://") {
        return Err(err(field, "only used with an https:// url"));
    }
    let path = dir.join(&given);
    let shown = path.display();
    let pem = std::fs::read(&path).map_err(|e| err(&field, format!("cannot read {shown}: {e}")))?;
    let certificates =
        pem_certificates(&pem).map_err(|reason| err(&field, format!("{shown}: {reason}")))?;
    Ok(Some(CaFile { path, certificates }))
}

/// `client_cert_file` with `client_key_file` (both or neither), read and handed to the TLS
/// stack now, so a wrong path, a key in the wrong format or a key that is not the
/// certificate's stops the start rather than every delivery attempt.
fn client_identity(
    table: &Table,
    at: &str,
    dir: &Path,
    url: &str,
) -> Result<Option<ClientIdentity>, ConfigError> {
    let (cert_field, key_field) = (
        format!("{at}.client_cert_file"),
        format!("{at}.client_key_file"),
    );
    let cert = string(table, at, "client_cert_file")?;
    let key = string(table, at, "client_key_file")?;
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(_), None) => return Err(err(key_field, "missing: client_cert_file needs its key")),
        (None, Some(_)) => {
            return Err(err(
                cert_field,
                "missing: client_key_file needs its certificate",
            ));
        }
        (Some(cert), Some(key)) => (cert, key),
    };
    if !url.starts_with("https://") {
        return Err(err(cert_field, "only used with an https:// url"));
    }
    let read = |field: &str, given: &str| {
        if given.is_empty() {
            return Err(err(field, "must not be empty"));
        }
        let path = dir.join(given);
        let pem = std::fs::read(&path)
            .map_err(|e| err(field, format!("cannot read {}: {e}", path.display())))?;
        Ok((path, pem))
    };
    let (cert_path, cert_pem) = read(&cert_field, &cert)?;
    let (key_path, key_pem) = read(&key_field, &key)?;
    pem_certificates(&cert_pem)
        .map_err(|reason| err(&cert_field, format!("{}: {reason}", cert_path.display())))?;
    if !key_pem
        .windows(PKCS8_BEGIN.len())
        .any(|w| w == PKCS8_BEGIN.as_bytes())
    {
        return Err(err(
            key_field,
            format!(
                "{}: no PKCS#8 key ({PKCS8_BEGIN}); convert one with `openssl pkcs8 -topk8 -nocrypt`",
                key_path.display()
            ),
        ));
    }
    identity(&cert_pem, &key_pem).map_err(|why| {
        err(
            key_field,
            format!(
                "{} with {}: not a usable client identity ({why})",
                key_path.display(),
                cert_path.display()
            ),
        )
    })?;
    Ok(Some(ClientIdentity {
        cert_path,
        key_path,
        cert_pem,
        key_pem,
    }))
}

const PKCS8_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";

/// The identity the HTTP client presents, as the TLS stack builds it.
pub fn identity(cert_pem: &[u8], key_pem: &[u8]) -> Result<reqwest::Identity, String> {
    reqwest::Identity::from_pkcs8_pem(cert_pem, key_pem)
        .map_err(|e| std::error::Error::source(&e).map_or(e.to_string(), ToString::to_string))
}

/// The `CERTIFICATE` blocks of a PEM file as DER, each parsed by the TLS stack. Other blocks
/// (a key, parameters) are skipped; a file with no certificate at all is refused.
fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut certificates = Vec::new();
    for der in CertificateDer::pem_slice_iter(pem) {
        let der = der.map_err(|e| format!("not PEM ({e})"))?;
        let n = certificates.len() + 1;
        reqwest::Certificate::from_der(&der).map_err(|e| {
            let why = std::error::Error::source(&e).map_or(e.to_string(), ToString::to_string);
            format!("certificate {n} is not an X.509 certificate ({why})")
        })?;
        certificates.push(der.to_vec());
    }
    if certificates.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    Ok(certificates)
}

fn int(
    table: &Table,
    at: &str,
    key: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let field = || format!("{at}.{key}");
    let value = match table.get(key) {
        None => return Ok(default),
        Some(Value::Integer(n)) => *n,
        Some(_) => return Err(err(field(), "must be an integer")),
    };
    u64::try_from(value)
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| err(field(), format!("must be {min} to {max}")))
}

/// The push side's filter format, as JSON text or as TOML (an inline table or array).
fn filter(table: &Table, at: &str) -> Result<Option<Filter>, ConfigError> {
    let field = format!("{at}.filter");
    let json = match table.get("filter") {
        None => return Ok(None),
        Some(Value::String(text)) => {
            serde_json::from_str(text).map_err(|e| err(&field, format!("not JSON: {e}")))?
        }
        Some(value) => serde_json::to_value(value).map_err(|e| err(&field, e.to_string()))?,
    };
    Filter::from_value(&json, &field)
        .map(Some)
        .map_err(|e| err(e.path, e.reason))
}

/// Two deliveries of one name would share a group by default and confuse every log line.
fn check_unique(deliveries: &[Delivery]) -> Result<(), ConfigError> {
    for (i, d) in deliveries.iter().enumerate() {
        if deliveries[..i].iter().any(|other| other.name == d.name) {
            return Err(err(
                format!("delivery[{i}].name"),
                format!("`{}` is used twice", d.name),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[[delivery]]
name = "payments"
topic = "order-placed-events"
url = "http://127.0.0.1:9000/orders"
"#;

    /// `ca_file`s relative to the current directory.
    fn parse_text(text: &str) -> Result<Vec<Delivery>, ConfigError> {
        parse(text, Path::new(""))
    }

    fn error(text: &str) -> String {
        parse_text(text).unwrap_err().to_string()
    }

    fn with(extra: &str) -> String {
        format!("{MINIMAL}{extra}\n")
    }

    #[test]
    fn minimal_gets_defaults() {
        let d = &parse_text(MINIMAL).unwrap()[0];
        assert_eq!(d.name, "payments");
        assert_eq!(d.topic, "order-placed-events");
        assert_eq!(d.url, "http://127.0.0.1:9000/orders");
        assert_eq!(d.group, "eventwire-delivery-payments");
        assert_eq!(d.content_mode, ContentMode::Binary);
        assert_eq!(d.ordering, Order::Partition);
        assert_eq!(d.filter, None);
        assert_eq!(d.timeout, Duration::from_millis(10_000));
        assert_eq!(d.max_attempts, 8);
        assert_eq!(d.initial_backoff, Duration::from_millis(200));
        assert_eq!(d.max_backoff, Duration::from_millis(30_000));
        assert_eq!(d.max_in_flight, 16);
        assert_eq!(d.dead_letter_topic, None);
        assert_eq!(d.reply_topic, None);
        assert!(d.reply_topic_by_type.is_empty());
        assert!(!d.wants_replies());
    }

    #[test]
    fn replies_route_by_type_then_to_reply_topic() {
        let d = &parse_text(&with(
            r#"reply_topic = "payments"
reply_topic_by_type = { "com.example.payment.failed" = "payments.failed" }"#,
        ))
        .unwrap()[0];
        assert!(d.wants_replies());
        assert_eq!(
            d.reply_topic_for("com.example.payment.failed"),
            Some("payments.failed")
        );
        assert_eq!(d.reply_topic_for("anything.else"), Some("payments"));
        let only_by_type = &parse_text(&with(r#"reply_topic_by_type = { "t" = "x" }"#)).unwrap()[0];
        assert_eq!(only_by_type.reply_topic_for("t"), Some("x"));
        assert_eq!(only_by_type.reply_topic_for("u"), None);
    }

    #[test]
    fn every_field_is_read() {
        let d = &parse_text(&with(
            r#"group = "g1"
content_mode = "structured"
ordering = "key"
timeout_ms = 500
max_attempts = 3
initial_backoff_ms = 10
max_backoff_ms = 100
max_in_flight = 2
dead_letter_topic = "orders.dlq"
reply_topic = "orders.replies"
filter = { prefix = { type = "com.example." } }"#,
        ))
        .unwrap()[0];
        assert_eq!(d.group, "g1");
        assert_eq!(d.content_mode, ContentMode::Structured);
        assert_eq!(d.ordering, Order::Key);
        assert_eq!(d.timeout, Duration::from_millis(500));
        assert_eq!(d.max_attempts, 3);
        assert_eq!(d.initial_backoff, Duration::from_millis(10));
        assert_eq!(d.max_backoff, Duration::from_millis(100));
        assert_eq!(d.max_in_flight, 2);
        assert_eq!(d.dead_letter_topic.as_deref(), Some("orders.dlq"));
        assert_eq!(d.reply_topic.as_deref(), Some("orders.replies"));
        assert_eq!(
            d.filter,
            Some(Filter::Prefix(vec![("type".into(), "com.example.".into())]))
        );
    }

    #[test]
    fn filter_as_json_text_is_the_push_sides_format() {
        let d = &parse_text(&with(
            r#"filter = '[{"exact":{"subject":"a"}},{"not":{"exact":{"type":"x"}}}]'"#,
        ))
        .unwrap()[0];
        let attrs = [
            ("subject".to_string(), "a".to_string()),
            ("type".into(), "y".into()),
        ]
        .into();
        assert!(d.filter.as_ref().unwrap().matches(&attrs));
    }

    #[test]
    fn empty_file_has_no_deliveries() {
        assert_eq!(parse_text("").unwrap(), Vec::new());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (with("colour = 1"), "delivery[0].colour: unknown field"),
            (
                with("timeout_ms = 0"),
                "delivery[0].timeout_ms: must be 1 to 600000",
            ),
            (
                with("timeout_ms = \"5s\""),
                "delivery[0].timeout_ms: must be an integer",
            ),
            (
                with("max_attempts = -1"),
                "delivery[0].max_attempts: must be 1 to 1000",
            ),
            (
                with("initial_backoff_ms = 40000"),
                "delivery[0].initial_backoff_ms: must be 1 to 30000",
            ),
            (
                with("dead_letter_topic = \"a b\""),
                "delivery[0].dead_letter_topic: character ' ' is not allowed",
            ),
            (with("group = \"\""), "delivery[0].group: must not be empty"),
            (
                with("content_mode = \"json\""),
                "delivery[0].content_mode: must be \"binary\" or \"structured\"",
            ),
            (
                with("max_in_flight = 0"),
                "delivery[0].max_in_flight: must be 1 to 1000",
            ),
            (
                with("reply_topic_by_type = \"x\""),
                "delivery[0].reply_topic_by_type: must be a table",
            ),
            (
                with(r#"reply_topic_by_type = { "t" = 1 }"#),
                "delivery[0].reply_topic_by_type.\"t\": must be a topic name",
            ),
            (
                with(r#"reply_topic_by_type = { "t" = "a/b" }"#),
                "delivery[0].reply_topic_by_type.\"t\": character '/'",
            ),
            (with("filter = { sql = \"x\" }"), "delivery[0].filter"),
            (with("filter = '{'"), "delivery[0].filter: not JSON"),
            (
                "[[delivery]]\nname = \"a\"\nurl = \"http://h/\"".into(),
                "delivery[0].topic: missing",
            ),
            (
                "[[delivery]]\nname = \"a\"\ntopic = \"t\"".into(),
                "delivery[0].url: missing",
            ),
            (
                "[[delivery]]\ntopic = \"t\"\nurl = \"http://h/\"".into(),
                "delivery[0].name: missing",
            ),
            (
                MINIMAL.replace("payments", "pay ments"),
                "delivery[0].name: must be 1 to 64",
            ),
            (
                MINIMAL.replace("http://127.0.0.1:9000", "ftp://x"),
                "delivery[0].url: must start with http:// or https://",
            ),
            (
                MINIMAL.replace("http://127.0.0.1:9000/orders", "https://"),
                "delivery[0].url: not a URL with a host",
            ),
            (
                with("ca_file = \"ca.pem\""),
                "delivery[0].ca_file: only used with an https:// url",
            ),
            (
                MINIMAL.replace("http://", "https://") + "ca_file = 1\n",
                "delivery[0].ca_file: must be a string",
            ),
            (
                MINIMAL.replace("http://", "https://") + "ca_file = \"\"\n",
                "delivery[0].ca_file: must not be empty",
            ),
            (
                MINIMAL.replace("127.0.0.1:9000/orders", ""),
                "delivery[0].url: not a URL with a host",
            ),
            (
                MINIMAL.replace("http://", "https://") + "client_cert_file = \"c.pem\"\n",
                "delivery[0].client_key_file: missing: client_cert_file needs its key",
            ),
            (
                MINIMAL.replace("http://", "https://") + "client_key_file = \"c.key\"\n",
                "delivery[0].client_cert_file: missing: client_key_file needs its certificate",
            ),
            (
                with("ordering = \"offset\""),
                "delivery[0].ordering: must be \"partition\" or \"key\"",
            ),
            (
                with("client_cert_file = \"c.pem\"\nclient_key_file = \"c.key\""),
                "delivery[0].client_cert_file: only used with an https:// url",
            ),
            (
                MINIMAL.replace("http://", "https://")
                    + "client_cert_file = \"no-such.pem\"\nclient_key_file = \"c.key\"\n",
                "delivery[0].client_cert_file: cannot read no-such.pem",
            ),
            (
                MINIMAL.replace("http://", "https://")
                    + "client_cert_file = \"\"\nclient_key_file = \"c.key\"\n",
                "delivery[0].client_cert_file: must not be empty",
            ),
            (
                format!("{MINIMAL}{MINIMAL}"),
                "delivery[1].name: `payments` is used twice",
            ),
            ("deliveries = 1".into(), "deliveries: unknown field"),
            (
                "delivery = 1".into(),
                "delivery: must be `[[delivery]]` tables",
            ),
            ("[[delivery]\n".into(), "deliveries file: "),
        ];
        for (text, want) in cases {
            let got = error(&text);
            assert!(
                got.starts_with(want),
                "{text:?}: got {got:?}, want {want:?}"
            );
        }
    }

    /// A self-signed CA certificate (P-256, CN "eventwire unit-test CA"); only parsed here.
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBmDCCAT+gAwIBAgIUcqpNqBgg0cGLbK0TRB2MtijLTWAwCgYIKoZIzj0EAwIw
ITEfMB0GA1UEAwwWZXZlbnR3aXJlIHVuaXQtdGVzdCBDQTAgFw0yNjEyMDcxMjMy
NDVaGA8yMTI2MTExMzEyMzI0NVowITEfMB0GA1UEAwwWZXZlbnR3aXJlIHVuaXQt
dGVzdCBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABByXq3jAnVQ6gKC0EJ4y
GET/u+XxboO8mpZ7wIRm25YOW2J70luOkbvBWvdbQxJIMjnS4OXI8bzx//PzIJRW
xoejUzBRMB0GA1UdDgQWBBSBGJj0JUwcrO/0RNJYCCi1sZhLNDAfBgNVHSMEGDAW
gBSBGJj0JUwcrO/0RNJYCCi1sZhLNDAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49
BAMCA0cAMEQCIEggIKZY33yna+bkMOBiPuXqheL0aV5zcjkFqfchxwKmAiARcWqX
uVSXavZzhFcFlAZyRLLyVaBvA16fAQQpTrpoqg==
-----END CERTIFICATE-----
";

    /// `MINIMAL` over https with `ca_file = "<name>"`, parsed in a directory holding the
    /// file `name` with `contents` (none when `None`).
    fn with_ca_file(name: &str, contents: Option<&str>) -> Result<Delivery, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        if let Some(contents) = contents {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        let text = format!(
            "{}ca_file = \"{name}\"\n",
            MINIMAL.replace("http://", "https://")
        );
        parse(&text, dir.path()).map(|mut d| d.remove(0))
    }

    #[test]
    fn https_without_ca_file_uses_the_system_cas_only() {
        let d = &parse_text(&MINIMAL.replace("http://", "https://")).unwrap()[0];
        assert_eq!(d.url, "https://127.0.0.1:9000/orders");
        assert_eq!(d.ca_file, None);
    }

    #[test]
    fn ca_file_is_read_from_the_deliveries_files_directory() {
        let d = with_ca_file("ca.pem", Some(CA_PEM)).unwrap();
        let ca = d.ca_file.unwrap();
        assert!(ca.path.is_absolute() && ca.path.ends_with("ca.pem"));
        assert_eq!(ca.certificates.len(), 1);
        assert_eq!(ca.certificates[0][0], 0x30, "DER: a SEQUENCE");

        // A bundle (two certificates) with a key block between, which is skipped.
        let bundle = format!(
            "{CA_PEM}-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{CA_PEM}"
        );
        let d = with_ca_file("bundle.pem", Some(&bundle)).unwrap();
        assert_eq!(d.ca_file.unwrap().certificates.len(), 2);

        // An absolute path is taken as is.
        let dir = tempfile::tempdir().unwrap();
        let absolute = dir.path().join("abs.pem");
        std::fs::write(&absolute, CA_PEM).unwrap();
        let d = with_ca_file(absolute.to_str().unwrap(), None).unwrap();
        assert_eq!(d.ca_file.unwrap().path, absolute);
    }

    #[test]
    fn unusable_ca_files_stop_the_start() {
        let not_der = "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n";
        let cases = [
            (None, "cannot read "),
            (Some(""), "no PEM certificate"),
            (Some("hello"), "no PEM certificate"),
            (
                Some("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
                "no PEM certificate",
            ),
            (
                Some("-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n"),
                "not PEM",
            ),
            (Some("-----BEGIN CERTIFICATE-----\nMIIB\n"), "not PEM"),
            (Some(not_der), "certificate 1 is not an X.509 certificate"),
        ];
        for (contents, want) in cases {
            let got = with_ca_file("ca.pem", contents).unwrap_err();
            assert_eq!(got.field, "delivery[0].ca_file", "{contents:?}");
            assert!(
                got.reason.contains("ca.pem") && got.reason.contains(want),
                "{contents:?}: got {:?}, want {want:?}",
                got.reason
            );
        }
        let second = with_ca_file("ca.pem", Some(&format!("{CA_PEM}{not_der}"))).unwrap_err();
        assert!(second.reason.contains("certificate 2 is not"), "{second}");
    }

    #[test]
    fn second_entry_errors_say_index_1() {
        let text = format!(
            "{}{}",
            MINIMAL,
            MINIMAL
                .replace("payments", "b")
                .replace("http://", "ftp://")
        );
        assert!(error(&text).starts_with("delivery[1].url:"));
    }
}
