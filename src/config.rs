//! The filter's configuration: parsed and validated once, in `on_configure`.
//!
//! Every error names the field (`rules[1].key.json_pointer`) so an operator can fix a refused
//! config from the proxy's log line alone. The JSON Schema in `kong/eventwire.meta.json`
//! documents the same fields and defaults; `tests` in this module and the schema test keep
//! the two in agreement.

use crate::redact::{Action, Redaction};
use crate::route::PathPattern;
use serde_json::{Map, Value};
use std::fmt;

pub const DEFAULT_UPSTREAM: &str = "eventwire_sidecar";
pub use eventwire_contract::{
    DEFAULT_CALLOUT_TIMEOUT_MS as DEFAULT_TIMEOUT_MS, DEFAULT_MAX_BODY_BYTES,
    INGEST_PATH as DEFAULT_SIDECAR_PATH, MIN_SECRET_LEN,
};
/// The whole body is held in the VM and copied once more into the callout; above this the
/// proxy's own buffering limits and memory make a bridge the wrong tool.
pub const MAX_MAX_BODY_BYTES: u64 = 16 * 1_048_576;
pub const MAX_TIMEOUT_MS: u64 = 300_000;
/// Rule names end up in metric names, which Kong caps at 256 bytes.
pub const MAX_RULE_NAME: usize = 64;

/// Headers that carry credentials: never copied into an event, whatever the config says.
pub const SENSITIVE_HEADERS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];

/// CloudEvents context attributes the filter sets itself (the distributed-tracing extension
/// included: it comes from `traceparent`, see `trace`); extensions may not reuse them.
const RESERVED_ATTRIBUTES: [&str; 13] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
    "partitionkey",
    "traceparent",
    "tracestate",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer `202` after the sidecar's acknowledgement; the upstream is never called.
    Bridge,
    /// Publish, then let the request continue upstream unchanged.
    Tap,
    /// Let the request go upstream first; publish only when the upstream's status is in
    /// the rule's `publish_on`, then pass its answer on once the event is durable.
    AfterUpstream,
}

/// One entry of `publish_on`: a status, or a class (`2xx` = 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatch {
    Exact(u16),
    Class(u16),
}

impl StatusMatch {
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusMatch::Exact(s) => s == status,
            StatusMatch::Class(c) => status / 100 == c,
        }
    }
}

/// What an `after_upstream` rule takes from the upstream's answer into its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseMap {
    /// The Kafka key (a header or a JSON pointer into the answer); wins over `key`.
    pub key: Option<ValueSource>,
    /// `ce-<attribute>` header that carries the upstream's status.
    pub status: Option<String>,
    /// (lowercased response header, `ce-<attribute>`).
    pub headers: Vec<(String, String)>,
    /// (JSON pointer into the answer, `ce-<attribute>`).
    pub body: Vec<(String, String)>,
    pub max_body_bytes: usize,
}

impl ResponseMap {
    /// Whether the answer's body must be read (and so held back until complete).
    pub fn needs_body(&self) -> bool {
        !self.body.is_empty() || self.key.as_ref().is_some_and(ValueSource::uses_body)
    }
}

/// `response.max_body_bytes` unless set: answers with an id are small.
pub const DEFAULT_MAX_RESPONSE_BODY_BYTES: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Answer the client with the error (503 when the sidecar cannot be reached).
    Reject,
    /// Let the request continue upstream without an event.
    Passthrough,
}

/// Where a per-request value (partition key, subject) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSource {
    Header(String),
    JsonPointer(String),
    PathParam(String),
}

impl ValueSource {
    pub fn uses_body(&self) -> bool {
        matches!(self, ValueSource::JsonPointer(_))
    }
}

impl fmt::Display for ValueSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueSource::Header(h) => write!(f, "header {h}"),
            ValueSource::JsonPointer(p) => write!(f, "JSON pointer {p}"),
            ValueSource::PathParam(p) => write!(f, "path parameter {{{p}}}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sidecar {
    /// Envoy: a cluster name. Kong: a literal `host:port`.
    pub upstream: String,
    pub authority: String,
    pub path: String,
    pub timeout_ms: u64,
    pub batching: Batching,
    /// Where the ingest secret comes from; resolved once by `stream::configure`.
    pub secret: Option<SecretSource>,
    /// `Bearer <secret>`, sent on every callout once resolved.
    pub authorization: Option<String>,
}

/// The ingest secret the sidecar checks (`--ingest-secret-file`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A variable of the VM's environment (Envoy: `vm_config.environment_variables`).
    Env(String),
    /// The secret itself, in the filter config (Kong; or an Envoy config kept secret).
    Value(String),
}

/// Checks a secret as the sidecar does; `None` when it is acceptable.
pub fn weak_secret(secret: &str) -> Option<String> {
    (secret.len() < MIN_SECRET_LEN || !secret.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| format!("the secret must be at least {MIN_SECRET_LEN} visible ASCII characters"))
}

/// Events of one rule that wait while callouts are in flight go to the sidecar together, as
/// one `application/cloudevents-batch+json` callout (Envoy only: Kong's engine cannot answer
/// one request from another's callback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most events in one callout; 1 turns batching off.
    pub max_events: usize,
    /// Callouts of one rule in flight before its events wait and go together.
    pub max_in_flight: usize,
}

pub const DEFAULT_BATCHING: Batching = Batching {
    max_events: 64,
    max_in_flight: 4,
};
/// The sidecar's default `--max-batch-events`.
pub const MAX_BATCH_EVENTS: u64 = 1000;
pub const MAX_IN_FLIGHT: u64 = 1024;

#[derive(Debug, Clone, Default)]
pub struct Matcher {
    pub route_name: Option<String>,
    pub method: Option<String>,
    pub path: Option<PathPattern>,
}

impl Matcher {
    pub fn matches(&self, route_name: Option<&str>, method: &str, path: &str) -> bool {
        if let Some(want) = &self.route_name
            && route_name != Some(want.as_str())
        {
            return false;
        }
        if let Some(want) = &self.method
            && want != method
        {
            return false;
        }
        match &self.path {
            Some(p) => p.matches(path),
            None => true,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Extension {
    /// Lowercased request header name.
    pub header: String,
    /// The callout header that carries it: `ce-<attribute>`, built once here.
    pub ce_header: String,
}

/// Claims of a JWT payload the proxy verified and forwards (Envoy `jwt_authn`
/// `forward_payload_header`: base64url JSON) copied into extension attributes.
#[derive(Debug, Clone)]
pub struct JwtPayload {
    /// Lowercased request header name that carries the payload.
    pub header: String,
    /// (claim, `ce-<attribute>`) pairs.
    pub claims: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub matcher: Matcher,
    pub mode: Mode,
    pub on_failure: OnFailure,
    pub topic: String,
    pub ce_type: String,
    pub source: Option<String>,
    /// The `dataschema` of the events the rule makes: the `$id` of a schema the sidecar
    /// checks their data against (`--schema-dir`).
    pub dataschema: Option<String>,
    pub subject: Option<ValueSource>,
    pub key: Option<ValueSource>,
    pub extensions: Vec<Extension>,
    pub jwt_payload: Option<JwtPayload>,
    /// Fields taken out of the event's JSON data before it leaves the proxy.
    pub redact: Vec<Redaction>,
    /// The HMAC key of `redact` hashes (the config's `redaction_key`, resolved by
    /// `stream::configure`; empty when the rule hashes nothing).
    pub redaction_key: Vec<u8>,
    /// `after_upstream`: the statuses that publish (default `2xx`).
    pub publish_on: Vec<StatusMatch>,
    /// `after_upstream`: what the event takes from the answer.
    pub response: ResponseMap,
}

impl Rule {
    pub fn needs_json_body(&self) -> bool {
        self.key.as_ref().is_some_and(ValueSource::uses_body)
            || self.subject.as_ref().is_some_and(ValueSource::uses_body)
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub sidecar: Sidecar,
    pub max_body_bytes: usize,
    pub rules: Vec<Rule>,
    /// Where the key of `redact` hashes comes from; resolved once by `stream::configure`.
    pub redaction_key: Option<SecretSource>,
    /// Reading the route name, method or path is a host call; skip those no rule looks at.
    pub needs_route_name: bool,
    pub needs_method: bool,
    pub needs_path: bool,
}

impl Config {
    /// The first rule that matches, in config order.
    pub fn find(&self, route_name: Option<&str>, method: &str, path: &str) -> Option<usize> {
        self.rules
            .iter()
            .position(|r| r.matcher.matches(route_name, method, path))
    }
}

/// The headers Kong's auth plugins set for the authenticated consumer.
pub const KONG_CONSUMER_HEADERS: [(&str, &str); 3] = [
    ("id", "x-consumer-id"),
    ("username", "x-consumer-username"),
    ("credential", "x-credential-identifier"),
];

/// An object's members, taken one by one; what is left when it is done is an unknown field.
/// Written by hand rather than with serde's derive: the derive's type errors pull core's
/// float formatting (~16 KB) into the `.wasm`.
struct Fields {
    members: Map<String, Value>,
    at: String,
}

impl Fields {
    fn of(v: Value, at: &str) -> Result<Fields, ConfigError> {
        match v {
            Value::Object(members) => Ok(Fields {
                members,
                at: at.to_string(),
            }),
            other => Err(err(
                at,
                format!("must be an object, not {}", json_kind(&other)),
            )),
        }
    }

    fn path(&self, name: &str) -> String {
        if self.at.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.at)
        }
    }

    /// A member; `null` counts as absent.
    fn value(&mut self, name: &str) -> Option<Value> {
        self.members.remove(name).filter(|v| !v.is_null())
    }

    fn string(&mut self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.value(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(err(
                self.path(name),
                format!("must be a string, not {}", json_kind(&other)),
            )),
        }
    }

    fn required_string(&mut self, name: &str) -> Result<String, ConfigError> {
        self.string(name)?
            .ok_or_else(|| err(&self.at, format!("missing field `{name}`")))
    }

    fn integer(&mut self, name: &str) -> Result<Option<u64>, ConfigError> {
        match self.value(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                err(
                    self.path(name),
                    format!("must be a non-negative integer, not {}", json_kind(&v)),
                )
            }),
        }
    }

    /// One of `names` (a string enum), e.g. `"bridge"`.
    fn choice<T: Copy>(
        &mut self,
        name: &str,
        options: &[(&str, T)],
    ) -> Result<Option<T>, ConfigError> {
        let Some(given) = self.string(name)? else {
            return Ok(None);
        };
        match options.iter().find(|(n, _)| *n == given) {
            Some((_, v)) => Ok(Some(*v)),
            None => Err(err(
                self.path(name),
                format!(
                    "unknown variant `{given}`, expected one of {}",
                    names(options)
                ),
            )),
        }
    }

    /// Refuses a member nothing took.
    fn done(self) -> Result<(), ConfigError> {
        match self.members.keys().next() {
            None => Ok(()),
            Some(k) => Err(err(&self.at, format!("unknown field `{k}`"))),
        }
    }
}

/// `` `a`, `b` `` for a message listing the accepted names.
fn names<T>(options: &[(&str, T)]) -> String {
    let names: Vec<String> = options.iter().map(|(n, _)| format!("`{n}`")).collect();
    names.join(", ")
}

/// What a JSON value is, for messages.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
    let top: Value = serde_json::from_slice(bytes).map_err(|e| err("", e.to_string()))?;
    if !top.is_object() {
        return Err(err("", "the configuration must be a JSON object"));
    }
    let mut raw = Fields::of(top, "")?;
    let (sidecar, max_body_bytes, rules) = (
        raw.value("sidecar"),
        raw.value("max_body_bytes"),
        raw.value("rules"),
    );
    let redaction_key = raw
        .value("redaction_key")
        .map(|v| parse_secret(v, "redaction_key"))
        .transpose()?;
    raw.done()?;
    let sidecar = parse_sidecar(sidecar)?;
    let max_body_bytes = match max_body_bytes {
        None => DEFAULT_MAX_BODY_BYTES,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_MAX_BODY_BYTES).contains(&n) => n,
            _ => {
                return Err(err(
                    "max_body_bytes",
                    format!("must be an integer from 1 to {MAX_MAX_BODY_BYTES}"),
                ));
            }
        },
    };
    let raw_rules = match rules {
        None => Vec::new(),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(err(
                "rules",
                format!("must be an array, not {}", json_kind(&other)),
            ));
        }
    };
    let mut rules = Vec::with_capacity(raw_rules.len());
    for (i, v) in raw_rules.into_iter().enumerate() {
        let rule = parse_rule(v, i)?;
        if let Some(j) = rules.iter().position(|r: &Rule| r.name == rule.name) {
            return Err(err(
                format!("rules[{i}].name"),
                format!("'{}' is already the name of rules[{j}]", rule.name),
            ));
        }
        rules.push(rule);
    }
    let hashes = |r: &Rule| r.redact.iter().any(|x| x.action == Action::Hash);
    if let (None, Some(i)) = (&redaction_key, rules.iter().position(hashes)) {
        return Err(err(
            format!("rules[{i}].redact"),
            "hashes a field, so the config needs redaction_key ({\"env\": NAME} or {\"value\": KEY})",
        ));
    }
    let needs_route_name = rules.iter().any(|r| r.matcher.route_name.is_some());
    let needs_method = rules.iter().any(|r| r.matcher.method.is_some());
    let needs_path = rules.iter().any(|r| r.matcher.path.is_some());
    Ok(Config {
        sidecar,
        // Bounded by MAX_MAX_BODY_BYTES above, so it fits a 32-bit usize.
        max_body_bytes: max_body_bytes as usize,
        rules,
        redaction_key,
        needs_route_name,
        needs_method,
        needs_path,
    })
}

fn parse_sidecar(v: Option<Value>) -> Result<Sidecar, ConfigError> {
    let mut raw = Fields::of(v.unwrap_or_else(|| Value::Object(Map::new())), "sidecar")?;
    let upstream = raw.string("upstream")?;
    let authority = raw.string("authority")?;
    let path = raw.string("path")?;
    let timeout_ms = raw.integer("timeout_ms")?;
    let (batching, secret) = (raw.value("batching"), raw.value("secret"));
    raw.done()?;
    let upstream = upstream.unwrap_or_else(|| DEFAULT_UPSTREAM.to_string());
    if upstream.is_empty() || upstream.bytes().any(|b| b.is_ascii_whitespace()) {
        return Err(err(
            "sidecar.upstream",
            "must be a non-empty name without spaces",
        ));
    }
    let authority = authority.unwrap_or_else(|| upstream.clone());
    if authority.is_empty() || !authority.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err("sidecar.authority", "must be a non-empty host[:port]"));
    }
    let path = path.unwrap_or_else(|| DEFAULT_SIDECAR_PATH.to_string());
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err(
            "sidecar.path",
            "must start with '/' and hold no spaces",
        ));
    }
    let timeout_ms = timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(err(
            "sidecar.timeout_ms",
            format!("must be from 1 to {MAX_TIMEOUT_MS}"),
        ));
    }
    Ok(Sidecar {
        upstream,
        authority,
        path,
        timeout_ms,
        batching: parse_batching(batching)?,
        secret: secret
            .map(|v| parse_secret(v, "sidecar.secret"))
            .transpose()?,
        authorization: None,
    })
}

/// `{"env": NAME}` or `{"value": SECRET}` at `field`.
fn parse_secret(v: Value, field: &str) -> Result<SecretSource, ConfigError> {
    let mut raw = Fields::of(v, field)?;
    let (env, value) = (raw.string("env")?, raw.string("value")?);
    raw.done()?;
    match (env, value) {
        (Some(name), None) if !name.is_empty() && !name.contains('=') => {
            Ok(SecretSource::Env(name))
        }
        (Some(_), None) => Err(err(
            format!("{field}.env"),
            "must be a variable name (non-empty, no '=')",
        )),
        (None, Some(value)) => match weak_secret(&value) {
            Some(why) => Err(err(format!("{field}.value"), why)),
            None => Ok(SecretSource::Value(value)),
        },
        _ => Err(err(
            field,
            "must be exactly one of {\"env\": NAME} or {\"value\": SECRET}",
        )),
    }
}

fn parse_batching(v: Option<Value>) -> Result<Batching, ConfigError> {
    let Some(v) = v else {
        return Ok(DEFAULT_BATCHING);
    };
    let mut raw = Fields::of(v, "sidecar.batching")?;
    let (max_events, max_in_flight) = (raw.integer("max_events")?, raw.integer("max_in_flight")?);
    raw.done()?;
    let field = |v: Option<u64>, default: usize, max: u64, name: &str| match v {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n as usize),
        Some(_) => Err(err(
            format!("sidecar.batching.{name}"),
            format!("must be from 1 to {max}"),
        )),
    };
    Ok(Batching {
        max_events: field(
            max_events,
            DEFAULT_BATCHING.max_events,
            MAX_BATCH_EVENTS,
            "max_events",
        )?,
        max_in_flight: field(
            max_in_flight,
            DEFAULT_BATCHING.max_in_flight,
            MAX_IN_FLIGHT,
            "max_in_flight",
        )?,
    })
}

fn parse_rule(v: Value, i: usize) -> Result<Rule, ConfigError> {
    let at = |f: &str| format!("rules[{i}].{f}");
    let mut raw = Fields::of(v, &format!("rules[{i}]"))?;
    let name = raw.string("name")?;
    let matcher = raw.value("match");
    let mode = raw.choice(
        "mode",
        &[
            ("bridge", Mode::Bridge),
            ("tap", Mode::Tap),
            ("after_upstream", Mode::AfterUpstream),
        ],
    )?;
    let on_failure = raw.choice(
        "on_failure",
        &[
            ("reject", OnFailure::Reject),
            ("passthrough", OnFailure::Passthrough),
        ],
    )?;
    let topic = raw.required_string("topic")?;
    let ce_type = raw.required_string("type")?;
    let source = raw.string("source")?;
    let dataschema = raw.string("dataschema")?;
    let (subject, key) = (raw.value("subject"), raw.value("key"));
    let raw_extensions = raw.value("extensions");
    let consumer = raw.value("consumer");
    let redact = raw.value("redact");
    let jwt_payload = raw.value("jwt_payload");
    let (publish_on, response) = (raw.value("publish_on"), raw.value("response"));
    raw.done()?;
    let name = name.unwrap_or_else(|| format!("rule-{i}"));
    // The name is the `rule` label of the rule's metrics (`host::rule_metric`).
    let label = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
    if name.is_empty() || name.len() > MAX_RULE_NAME || !name.bytes().all(label) {
        return Err(err(
            at("name"),
            format!("must be 1 to {MAX_RULE_NAME} letters, digits, '_' or '-'"),
        ));
    }
    let matcher = match matcher {
        None => Matcher::default(),
        Some(v) => parse_match(v, &at("match"))?,
    };
    let mode = mode.unwrap_or(Mode::Bridge);
    let on_failure = match on_failure {
        Some(on_failure) => on_failure,
        None => match mode {
            // After upstream the event is the point: a success without it is refused.
            Mode::Bridge | Mode::AfterUpstream => OnFailure::Reject,
            // Tap must never turn a good upstream answer into an error by default.
            Mode::Tap => OnFailure::Passthrough,
        },
    };
    if let Err(e) = eventwire_contract::topic::validate(&topic) {
        return Err(err(at("topic"), e.to_string()));
    }
    if !is_ce_string(&ce_type) {
        return Err(err(
            at("type"),
            "must be a non-empty string without control characters",
        ));
    }
    if let Some(s) = &source
        && (s.is_empty() || s.chars().any(|c| c.is_control() || c == ' '))
    {
        return Err(err(
            at("source"),
            "must be a non-empty URI-reference without spaces",
        ));
    }
    if let Some(s) = &dataschema
        && (s.is_empty() || s.chars().any(|c| c.is_control() || c == ' '))
    {
        return Err(err(
            at("dataschema"),
            "must be a non-empty URI without spaces",
        ));
    }
    let key = key
        .map(|v| parse_value_source(v, &at("key"), &matcher))
        .transpose()?;
    let subject = subject
        .map(|v| parse_value_source(v, &at("subject"), &matcher))
        .transpose()?;
    let mut extensions = Vec::new();
    if let Some(v) = raw_extensions {
        let Value::Object(headers) = v else {
            let why = format!("must be an object, not {}", json_kind(&v));
            return Err(err(at("extensions"), why));
        };
        for (header, attr) in headers {
            let field = format!("rules[{i}].extensions.{header}");
            let Value::String(attr) = attr else {
                return Err(err(
                    &field,
                    "must be an extension attribute name (a string)",
                ));
            };
            let header = validate_header_name(&header).map_err(|e| err(&field, e))?;
            add_extension(&mut extensions, header, &attr, &field)?;
        }
    }
    if let Some(v) = consumer {
        let mut c = Fields::of(v, &at("consumer"))?;
        let attrs = [
            c.string("id")?,
            c.string("username")?,
            c.string("credential")?,
        ];
        c.done()?;
        for ((key, header), attr) in KONG_CONSUMER_HEADERS.iter().zip(attrs) {
            if let Some(attr) = attr {
                let field = format!("rules[{i}].consumer.{key}");
                add_extension(&mut extensions, (*header).to_string(), &attr, &field)?;
            }
        }
    }
    let jwt_payload = jwt_payload
        .map(|v| parse_jwt_payload(v, &at("jwt_payload"), &extensions))
        .transpose()?;
    if mode != Mode::AfterUpstream {
        for (name, given) in [("publish_on", &publish_on), ("response", &response)] {
            if given.is_some() {
                return Err(err(at(name), "only for mode `after_upstream`"));
            }
        }
    }
    let publish_on = match publish_on {
        None => vec![StatusMatch::Class(2)],
        Some(v) => parse_publish_on(v, &at("publish_on"))?,
    };
    let response = match response {
        None => ResponseMap {
            key: None,
            status: None,
            headers: Vec::new(),
            body: Vec::new(),
            max_body_bytes: DEFAULT_MAX_RESPONSE_BODY_BYTES,
        },
        Some(v) => parse_response(v, &at("response"), &extensions)?,
    };
    Ok(Rule {
        name,
        matcher,
        mode,
        on_failure,
        topic,
        ce_type,
        source,
        dataschema,
        subject,
        key,
        extensions,
        jwt_payload,
        redact: redact
            .map(|v| parse_redact(v, &at("redact")))
            .transpose()?
            .unwrap_or_default(),
        redaction_key: Vec::new(),
        publish_on,
        response,
    })
}

/// `[201, "2xx"]`: statuses 100-599 and classes `1xx`-`5xx`; not empty.
fn parse_publish_on(v: Value, field: &str) -> Result<Vec<StatusMatch>, ConfigError> {
    let Value::Array(items) = v else {
        return Err(err(
            field,
            format!("must be an array, not {}", json_kind(&v)),
        ));
    };
    if items.is_empty() {
        return Err(err(field, "must name at least one status"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let class = |s: &str| match s.as_bytes() {
                [c @ b'1'..=b'5', b'x', b'x'] => Some(u16::from(c - b'0')),
                _ => None,
            };
            match item {
                Value::Number(n) => n
                    .as_u64()
                    .filter(|s| (100..=599).contains(s))
                    .map(|s| StatusMatch::Exact(s as u16)),
                Value::String(s) => class(s).map(StatusMatch::Class),
                _ => None,
            }
            .ok_or_else(|| {
                err(
                    format!("{field}[{i}]"),
                    "must be a status from 100 to 599 or a class \"1xx\" to \"5xx\"",
                )
            })
        })
        .collect()
}

/// `response`: key, status, headers, body, max_body_bytes. Attributes must not clash
/// with the rule's request-side extensions.
fn parse_response(v: Value, field: &str, taken: &[Extension]) -> Result<ResponseMap, ConfigError> {
    let mut f = Fields::of(v, field)?;
    let key = f.value("key");
    let status = f.string("status")?;
    let (headers, body) = (f.value("headers"), f.value("body"));
    let max = f.integer("max_body_bytes")?;
    f.done()?;
    let mut attrs: Vec<String> = taken.iter().map(|x| x.ce_header.clone()).collect();
    let mut attribute = |attr: &str, at: &str| -> Result<String, ConfigError> {
        validate_extension_name(attr).map_err(|e| err(at, e))?;
        let ce = format!("ce-{attr}");
        if attrs.contains(&ce) {
            return Err(err(at, format!("extension '{attr}' is set twice")));
        }
        attrs.push(ce.clone());
        Ok(ce)
    };
    let key = match key {
        None => None,
        Some(v) => match value_source(v, &format!("{field}.key"))? {
            ValueSource::Header(h) => Some(ValueSource::Header(
                validate_header_name(&h).map_err(|e| err(format!("{field}.key.header"), e))?,
            )),
            ValueSource::JsonPointer(p) => {
                validate_json_pointer(&p)
                    .map_err(|e| err(format!("{field}.key.json_pointer"), e))?;
                Some(ValueSource::JsonPointer(p))
            }
            ValueSource::PathParam(_) => {
                return Err(err(
                    format!("{field}.key"),
                    "an answer has no path: use `header` or `json_pointer`",
                ));
            }
        },
    };
    let status = match status {
        None => None,
        Some(attr) => Some(attribute(&attr, &format!("{field}.status"))?),
    };
    let mut pairs = |v: Option<Value>, name: &str, check: fn(&str) -> Result<String, String>| {
        let at = format!("{field}.{name}");
        let Some(v) = v else {
            return Ok(Vec::new());
        };
        let Value::Object(map) = v else {
            return Err(err(
                &at,
                format!("must be an object, not {}", json_kind(&v)),
            ));
        };
        let mut out = Vec::with_capacity(map.len());
        for (from, attr) in map {
            let at = format!("{at}.{from}");
            let Value::String(attr) = attr else {
                return Err(err(&at, "must be an extension attribute name (a string)"));
            };
            let from = check(&from).map_err(|e| err(&at, e))?;
            out.push((from, attribute(&attr, &at)?));
        }
        Ok(out)
    };
    let headers = pairs(headers, "headers", validate_header_name)?;
    let body = pairs(body, "body", |p| {
        validate_json_pointer(p).map(|()| p.to_string())
    })?;
    let max_body_bytes = match max {
        None => DEFAULT_MAX_RESPONSE_BODY_BYTES,
        Some(n) if (1..=MAX_MAX_BODY_BYTES).contains(&n) => n as usize,
        Some(_) => {
            return Err(err(
                format!("{field}.max_body_bytes"),
                format!("must be an integer from 1 to {MAX_MAX_BODY_BYTES}"),
            ));
        }
    };
    Ok(ResponseMap {
        key,
        status,
        headers,
        body,
        max_body_bytes,
    })
}

fn add_extension(
    extensions: &mut Vec<Extension>,
    header: String,
    attr: &str,
    field: &str,
) -> Result<(), ConfigError> {
    validate_extension_name(attr).map_err(|e| err(field, e))?;
    let ce_header = format!("ce-{attr}");
    if extensions.iter().any(|x| x.ce_header == ce_header) {
        return Err(err(field, format!("extension '{attr}' is set twice")));
    }
    if extensions.iter().any(|x| x.header == header) {
        return Err(err(field, format!("header '{header}' is copied twice")));
    }
    extensions.push(Extension { header, ce_header });
    Ok(())
}

fn parse_match(v: Value, field: &str) -> Result<Matcher, ConfigError> {
    let mut m = Fields::of(v, field)?;
    let (route_name, method, path) = (
        m.string("route_name")?,
        m.string("method")?,
        m.string("path")?,
    );
    m.done()?;
    if let Some(r) = &route_name
        && r.is_empty()
    {
        return Err(err(format!("{field}.route_name"), "must not be empty"));
    }
    if let Some(m) = &method
        && (m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
    {
        return Err(err(
            format!("{field}.method"),
            "must be an upper-case HTTP method such as POST",
        ));
    }
    let path = path
        .as_deref()
        .map(PathPattern::parse)
        .transpose()
        .map_err(|e| err(format!("{field}.path"), e.0))?;
    Ok(Matcher {
        route_name,
        method,
        path,
    })
}

fn parse_value_source(v: Value, field: &str, m: &Matcher) -> Result<ValueSource, ConfigError> {
    let src = value_source(v, field)?;
    match &src {
        ValueSource::Header(h) => {
            let lower = validate_header_name(h).map_err(|e| err(format!("{field}.header"), e))?;
            return Ok(ValueSource::Header(lower));
        }
        ValueSource::JsonPointer(p) => {
            if let Err(e) = validate_json_pointer(p) {
                return Err(err(format!("{field}.json_pointer"), e));
            }
        }
        ValueSource::PathParam(name) => {
            if !m.path.as_ref().is_some_and(|p| p.has_param(name)) {
                return Err(err(
                    format!("{field}.path_param"),
                    format!("match.path has no {{{name}}} segment"),
                ));
            }
        }
    }
    Ok(src)
}

/// `{"header": "x-jwt-payload", "claims": {"sub": "principal"}}`: claim -> attribute, each
/// attribute unused by the rule's header extensions.
fn parse_jwt_payload(
    v: Value,
    field: &str,
    extensions: &[Extension],
) -> Result<JwtPayload, ConfigError> {
    let mut f = Fields::of(v, field)?;
    let header = f.required_string("header")?;
    let claims = f.value("claims");
    f.done()?;
    let header = validate_header_name(&header).map_err(|e| err(format!("{field}.header"), e))?;
    let Some(Value::Object(map)) = claims else {
        return Err(err(
            format!("{field}.claims"),
            "must be an object of claim -> extension attribute",
        ));
    };
    let mut out = JwtPayload {
        header,
        claims: Vec::with_capacity(map.len()),
    };
    for (claim, attr) in map {
        let at = format!("{field}.claims.{claim}");
        let Value::String(attr) = attr else {
            return Err(err(at, "must be an extension attribute name (a string)"));
        };
        validate_extension_name(&attr).map_err(|e| err(&at, e))?;
        let ce_header = format!("ce-{attr}");
        let taken = extensions.iter().any(|x| x.ce_header == ce_header)
            || out.claims.iter().any(|(_, h)| *h == ce_header);
        if taken {
            return Err(err(at, format!("extension '{attr}' is set twice")));
        }
        out.claims.push((claim, ce_header));
    }
    if out.claims.is_empty() {
        return Err(err(format!("{field}.claims"), "names no claim"));
    }
    Ok(out)
}

/// `[{"pointer": "/card/number", "action": "mask"}, ...]`.
fn parse_redact(v: Value, field: &str) -> Result<Vec<Redaction>, ConfigError> {
    let Value::Array(items) = v else {
        return Err(err(
            field,
            format!("must be an array, not {}", json_kind(&v)),
        ));
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("{field}[{i}]");
            let mut f = Fields::of(item, &at)?;
            let pointer = f.required_string("pointer")?;
            let action = f.choice("action", &Action::BY_NAME)?;
            f.done()?;
            let action = action.ok_or_else(|| err(&at, "missing field `action`"))?;
            Redaction::parse(&pointer, action).map_err(|e| err(format!("{at}.pointer"), e))
        })
        .collect()
}

/// `{"header": NAME}`, `{"json_pointer": POINTER}` or `{"path_param": NAME}`: exactly one.
fn value_source(v: Value, field: &str) -> Result<ValueSource, ConfigError> {
    type Make = fn(String) -> ValueSource;
    const KINDS: [(&str, Make); 3] = [
        ("header", ValueSource::Header),
        ("json_pointer", ValueSource::JsonPointer),
        ("path_param", ValueSource::PathParam),
    ];
    let mut f = Fields::of(v, field)?;
    let mut found = None;
    for (kind, make) in KINDS {
        if let Some(s) = f.string(kind)? {
            if found.is_some() {
                return Err(err(field, "must have exactly one member"));
            }
            found = Some(make(s));
        }
    }
    if let Some(other) = f.members.keys().next() {
        return Err(err(
            field,
            format!(
                "unknown variant `{other}`, expected one of {}",
                names(&KINDS)
            ),
        ));
    }
    found.ok_or_else(|| err(field, format!("must name one of {}", names(&KINDS))))
}

/// Lowercases a header name and refuses the ones that carry credentials.
fn validate_header_name(h: &str) -> Result<String, String> {
    let lower = h.to_ascii_lowercase();
    if lower.is_empty() || !lower.bytes().all(is_token_byte) {
        return Err(format!("'{h}' is not a valid header name"));
    }
    if SENSITIVE_HEADERS.contains(&lower.as_str()) {
        return Err(format!(
            "'{lower}' carries credentials and is never copied into events"
        ));
    }
    Ok(lower)
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub fn validate_extension_name(attr: &str) -> Result<(), String> {
    if attr.is_empty()
        || !attr
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!(
            "extension name '{attr}' must be lower-case letters and digits only"
        ));
    }
    if RESERVED_ATTRIBUTES.contains(&attr) {
        return Err(format!("'{attr}' is a reserved CloudEvents attribute"));
    }
    Ok(())
}

/// RFC 6901: "" or "/"-prefixed tokens where '~' is only followed by '0' or '1'.
fn validate_json_pointer(p: &str) -> Result<(), String> {
    if !p.is_empty() && !p.starts_with('/') {
        return Err(format!("'{p}' must be empty or start with '/'"));
    }
    let bytes = p.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'~' && !matches!(bytes.get(i + 1), Some(b'0' | b'1')) {
            return Err(format!("'{p}': '~' must be followed by '0' or '1'"));
        }
    }
    Ok(())
}

fn is_ce_string(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const ORDERS: &str = r#"{
        "sidecar": {"upstream": "sidecar", "timeout_ms": 2000},
        "rules": [{
            "name": "orders",
            "match": {"route_name": "orders", "method": "POST", "path": "/orders"},
            "topic": "order-placed-events",
            "type": "com.example.order.placed",
            "key": {"json_pointer": "/id"},
            "extensions": {"X-Tenant": "tenant"}
        }, {
            "match": {"path": "/payments/{id}"},
            "mode": "tap",
            "topic": "payments",
            "type": "com.example.payment",
            "key": {"path_param": "id"},
            "subject": {"header": "x-customer"}
        }]
    }"#;

    fn ok(json: &str) -> Config {
        match parse(json.as_bytes()) {
            Ok(c) => c,
            Err(e) => panic!("refused: {e}"),
        }
    }

    #[test]
    fn defaults_apply() {
        let c = ok(r#"{"rules": []}"#);
        assert_eq!(c.sidecar.upstream, DEFAULT_UPSTREAM);
        assert_eq!(c.sidecar.authority, DEFAULT_UPSTREAM);
        assert_eq!(c.sidecar.path, DEFAULT_SIDECAR_PATH);
        assert_eq!(c.sidecar.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(c.sidecar.batching, DEFAULT_BATCHING);
        assert_eq!(c.max_body_bytes as u64, DEFAULT_MAX_BODY_BYTES);
        assert!(!c.needs_route_name && !c.needs_method && !c.needs_path);
        let empty = ok("{}");
        assert!(empty.rules.is_empty());
    }

    #[test]
    fn full_config_compiles() {
        let c = ok(ORDERS);
        assert!(c.needs_route_name && c.needs_method && c.needs_path);
        let r = &c.rules[0];
        assert_eq!(r.mode, Mode::Bridge);
        assert_eq!(r.on_failure, OnFailure::Reject);
        assert_eq!(r.extensions[0].header, "x-tenant");
        assert_eq!(r.extensions[0].ce_header, "ce-tenant");
        assert!(r.needs_json_body());
        let tap = &c.rules[1];
        assert_eq!(tap.name, "rule-1");
        assert_eq!(tap.mode, Mode::Tap);
        assert_eq!(tap.on_failure, OnFailure::Passthrough);
        assert_eq!(tap.key, Some(ValueSource::PathParam("id".into())));
        assert!(!tap.needs_json_body());
        assert_eq!(c.find(Some("orders"), "POST", "/orders"), Some(0));
        assert_eq!(c.find(Some("other"), "POST", "/orders"), None);
        assert_eq!(c.find(None, "GET", "/payments/9"), Some(1));
        assert_eq!(c.find(None, "GET", "/"), None);
    }

    #[test]
    fn kong_consumer_becomes_extensions() {
        let c = ok(
            r#"{"rules":[{"topic":"t","type":"x","extensions":{"x-tenant":"tenant"},
                "consumer":{"id":"consumerid","credential":"credential"}}]}"#,
        );
        let got: Vec<(&str, &str)> = c.rules[0]
            .extensions
            .iter()
            .map(|e| (e.header.as_str(), e.ce_header.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("x-tenant", "ce-tenant"),
                ("x-consumer-id", "ce-consumerid"),
                ("x-credential-identifier", "ce-credential")
            ]
        );
    }

    /// Each invalid config is refused with the field and the reason an operator needs.
    #[test]
    fn invalid_configs_name_the_field() {
        let rule = |extra: &str| format!(r#"{{"rules":[{{"topic":"t","type":"com.x"{extra}}}]}}"#);
        let cases: Vec<(String, &str, &str)> = vec![
            ("not json".into(), "", "expected"),
            ("[]".into(), "", "JSON object"),
            (r#"{"rulez":[]}"#.into(), "", "unknown field `rulez`"),
            (r#"{"sidecar":{"upstream":""}}"#.into(), "sidecar.upstream", "non-empty"),
            (r#"{"sidecar":{"upstrem":"x"}}"#.into(), "sidecar", "unknown field `upstrem`"),
            (r#"{"sidecar":{"path":"v1"}}"#.into(), "sidecar.path", "start with '/'"),
            (r#"{"sidecar":{"timeout_ms":0}}"#.into(), "sidecar.timeout_ms", "from 1"),
            (r#"{"sidecar":{"timeout_ms":-5}}"#.into(), "sidecar.timeout_ms", "non-negative integer"),
            (
                r#"{"sidecar":{"batching":{"max_events":0}}}"#.into(),
                "sidecar.batching.max_events",
                "from 1 to 1000",
            ),
            (
                r#"{"sidecar":{"batching":{"max_in_flight":2000}}}"#.into(),
                "sidecar.batching.max_in_flight",
                "from 1 to 1024",
            ),
            (
                r#"{"sidecar":{"secret":{"value":"short"}}}"#.into(),
                "sidecar.secret.value",
                "at least 16",
            ),
            (
                r#"{"sidecar":{"secret":{"env":""}}}"#.into(),
                "sidecar.secret.env",
                "variable name",
            ),
            (
                r#"{"sidecar":{"secret":{}}}"#.into(),
                "sidecar.secret",
                "exactly one",
            ),
            (
                r#"{"sidecar":{"batching":{"size":2}}}"#.into(),
                "sidecar.batching",
                "unknown field",
            ),
            (r#"{"max_body_bytes":0}"#.into(), "max_body_bytes", "from 1"),
            (r#"{"max_body_bytes":"1MB"}"#.into(), "max_body_bytes", "integer"),
            (r#"{"rules":[{"type":"x"}]}"#.into(), "rules[0]", "missing field `topic`"),
            (r#"{"rules":[{"topic":"t"}]}"#.into(), "rules[0]", "missing field `type`"),
            (rule(r#","topc":"x""#), "rules[0]", "unknown field `topc`"),
            (r#"{"rules":[{"topic":"a b","type":"x"}]}"#.into(), "rules[0].topic", "not allowed"),
            (r#"{"rules":[{"topic":"","type":"x"}]}"#.into(), "rules[0].topic", "1 to 249"),
            (r#"{"rules":[{"topic":"t","type":""}]}"#.into(), "rules[0].type", "non-empty"),
            (rule(r#","mode":"mirror""#), "rules[0].mode", "unknown variant `mirror`"),
            (rule(r#","on_failure":"drop""#), "rules[0].on_failure", "unknown variant `drop`"),
            (rule(r#","source":"a b""#), "rules[0].source", "URI-reference"),
            (rule(r#","match":{"method":"post"}"#), "rules[0].match.method", "upper-case"),
            (rule(r#","match":{"path":"orders"}"#), "rules[0].match.path", "start with '/'"),
            (rule(r#","match":{"route_name":""}"#), "rules[0].match.route_name", "empty"),
            (rule(r#","name":"orders v1""#), "rules[0].name", "letters, digits"),
            (rule(r#","match":{"host":"x"}"#), "rules[0].match", "unknown field `host`"),
            (rule(r#","key":{"json_pointer":"id"}"#), "rules[0].key.json_pointer", "start with '/'"),
            (rule(r#","key":{"json_pointer":"/a~2"}"#), "rules[0].key.json_pointer", "'~'"),
            (rule(r#","key":{"path_param":"id"}"#), "rules[0].key.path_param", "no {id}"),
            (rule(r#","key":{"header":"x y"}"#), "rules[0].key.header", "valid header name"),
            (rule(r#","key":{"header":"Authorization"}"#), "rules[0].key.header", "credentials"),
            (rule(r#","key":{"cookie":"a"}"#), "rules[0].key", "unknown variant `cookie`"),
            (rule(r#","subject":{"header":"cookie"}"#), "rules[0].subject.header", "credentials"),
            (
                rule(r#","extensions":{"proxy-authorization":"auth"}"#),
                "rules[0].extensions.proxy-authorization",
                "credentials",
            ),
            (rule(r#","extensions":{"x-a":"My.Ext"}"#), "rules[0].extensions.x-a", "lower-case"),
            (rule(r#","extensions":{"x-a":"id"}"#), "rules[0].extensions.x-a", "reserved"),
            (
                rule(r#","extensions":{"x-a":"t","x-b":"t"}"#),
                "rules[0].extensions.x-b",
                "set twice",
            ),
            (rule(r#","consumer":{"id":"X"}"#), "rules[0].consumer.id", "lower-case"),
            (rule(r#","consumer":{"group":"g"}"#), "rules[0].consumer", "unknown field `group`"),
            (rule(r#","redact":{}"#), "rules[0].redact", "array"),
            (rule(r#","dataschema":"a b""#), "rules[0].dataschema", "URI"),
            (rule(r#","jwt_payload":{"claims":{"sub":"p"}}"#), "rules[0].jwt_payload", "missing field `header`"),
            (rule(r#","jwt_payload":{"header":"x-p","claims":{}}"#), "rules[0].jwt_payload.claims", "no claim"),
            (rule(r#","jwt_payload":{"header":"x-p","claims":{"sub":"Sub"}}"#), "rules[0].jwt_payload.claims.sub", "lower-case"),
            (
                rule(r#","extensions":{"x-a":"p"},"jwt_payload":{"header":"x-p","claims":{"sub":"p"}}"#),
                "rules[0].jwt_payload.claims.sub",
                "set twice",
            ),
            (rule(r#","redact":[{"pointer":"card","action":"drop"}]"#), "rules[0].redact[0].pointer", "start with '/'"),
            (rule(r#","redact":[{"pointer":"/c","action":"erase"}]"#), "rules[0].redact[0].action", "unknown variant `erase`"),
            (rule(r#","redact":[{"pointer":"/c"}]"#), "rules[0].redact[0]", "missing field `action`"),
            (rule(r#","redact":[{"pointer":"/c","action":"hash"}]"#), "rules[0].redact", "redaction_key"),
            (r#"{"redaction_key":{"value":"short"}}"#.into(), "redaction_key.value", "at least 16"),
            (
                rule(r#","extensions":{"x-consumer-id":"c"},"consumer":{"id":"d"}"#),
                "rules[0].consumer.id",
                "copied twice",
            ),
            (
                r#"{"rules":[{"name":"a","topic":"t","type":"x"},{"name":"a","topic":"t","type":"x"}]}"#.into(),
                "rules[1].name",
                "already the name of rules[0]",
            ),
        ];
        for (json, field, msg) in cases {
            match parse(json.as_bytes()) {
                Ok(_) => panic!("accepted: {json}"),
                Err(e) => {
                    assert_eq!(e.field, field, "{json}: {e}");
                    assert!(e.message.contains(msg), "{json}: '{e}' lacks '{msg}'");
                }
            }
        }
    }
}
