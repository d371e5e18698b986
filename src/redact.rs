//! Redaction before publish: a rule's `redact` list takes fields out of the event's JSON data
//! before it leaves the proxy, so they never reach the sidecar, Kafka or a subscriber.
//!
//! Each entry is a JSON pointer (RFC 6901, plus `*` for every member or element at that
//! level) and an action: `drop` removes the member (an array element becomes `null`, so the
//! positions after it keep their meaning), `mask` replaces the value with [`MASK`], `hash`
//! with the keyed HMAC-SHA256 of the value in lower-case hex (strings hash their UTF-8 text,
//! other values their compact JSON), so equal values stay joinable across events without the
//! value itself. Pointers that match nothing change nothing.

use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

/// What a masked value becomes.
pub const MASK: &str = "***";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Drop,
    Mask,
    Hash,
}

impl Action {
    /// The config's names for them.
    pub const BY_NAME: [(&'static str, Action); 3] = [
        ("drop", Action::Drop),
        ("mask", Action::Mask),
        ("hash", Action::Hash),
    ];
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redaction {
    /// The pointer's reference tokens, unescaped (`~1` -> `/`, `~0` -> `~`).
    pub path: Vec<String>,
    pub pointer: String,
    pub action: Action,
}

impl Redaction {
    /// `pointer` must start with `/` and name at least one member.
    pub fn parse(pointer: &str, action: Action) -> Result<Redaction, String> {
        let Some(rest) = pointer.strip_prefix('/') else {
            return Err(format!("'{pointer}' must start with '/'"));
        };
        let path = rest
            .split('/')
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect();
        Ok(Redaction {
            path,
            pointer: pointer.to_string(),
            action,
        })
    }
}

/// Applies every redaction to `data`; `key` is the HMAC key (config guarantees one when a
/// redaction hashes).
pub fn apply(data: &mut Value, redactions: &[Redaction], key: &[u8]) {
    for r in redactions {
        walk(data, &r.path, r.action, key);
    }
}

fn walk(v: &mut Value, path: &[String], action: Action, key: &[u8]) {
    let Some((token, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        return act(v, token, action, key);
    }
    match v {
        Value::Object(m) if token == "*" => m.values_mut().for_each(|c| walk(c, rest, action, key)),
        Value::Array(a) if token == "*" => a.iter_mut().for_each(|c| walk(c, rest, action, key)),
        Value::Object(m) => {
            if let Some(c) = m.get_mut(token) {
                walk(c, rest, action, key);
            }
        }
        Value::Array(a) => {
            if let Some(c) = index(token).and_then(|i| a.get_mut(i)) {
                walk(c, rest, action, key);
            }
        }
        _ => {}
    }
}

/// The last step: `token` names the member(s) of `parent` to act on.
fn act(parent: &mut Value, token: &str, action: Action, key: &[u8]) {
    match (parent, action) {
        (Value::Object(m), Action::Drop) if token == "*" => m.clear(),
        (Value::Object(m), Action::Drop) => {
            m.remove(token);
        }
        (Value::Object(m), _) if token == "*" => {
            m.values_mut().for_each(|c| replace(c, action, key))
        }
        (Value::Object(m), _) => {
            if let Some(c) = m.get_mut(token) {
                replace(c, action, key);
            }
        }
        (Value::Array(a), _) if token == "*" => a.iter_mut().for_each(|c| replace(c, action, key)),
        (Value::Array(a), _) => {
            if let Some(c) = index(token).and_then(|i| a.get_mut(i)) {
                replace(c, action, key);
            }
        }
        _ => {}
    }
}

fn replace(v: &mut Value, action: Action, key: &[u8]) {
    *v = match action {
        Action::Drop => Value::Null,
        Action::Mask => Value::String(MASK.to_string()),
        Action::Hash => Value::String(hash(v, key)),
    };
}

/// A decimal array index without leading zeros (RFC 6901 section 4).
fn index(token: &str) -> Option<usize> {
    let ok = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    ok.then(|| token.parse().ok()).flatten()
}

pub fn hash(v: &Value, key: &[u8]) -> String {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return MASK.to_string();
    };
    match v {
        Value::String(s) => mac.update(s.as_bytes()),
        other => mac.update(other.to_string().as_bytes()),
    }
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(64);
    for b in digest {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn r(p: &str, a: Action) -> Redaction {
        Redaction::parse(p, a).unwrap()
    }

    #[test]
    fn drop_mask_and_hash_what_the_pointers_name() {
        let mut v = json!({"id": "o-1", "card": {"number": "4111", "cvv": 123},
            "email": "a@example.com", "items": [{"sku": "x", "note": "n1"}, {"sku": "y", "note": "n2"}],
            "a/b": 1, "tags": ["keep", "secret"]});
        apply(
            &mut v,
            &[
                r("/card/cvv", Action::Drop),
                r("/card/number", Action::Mask),
                r("/email", Action::Hash),
                r("/items/*/note", Action::Drop),
                r("/a~1b", Action::Mask),
                r("/tags/1", Action::Drop),
                r("/missing/deep", Action::Drop),
            ],
            b"k",
        );
        assert_eq!(v["card"], json!({"number": MASK}));
        assert_eq!(v["items"], json!([{"sku": "x"}, {"sku": "y"}]));
        assert_eq!(v["a/b"], MASK);
        assert_eq!(v["tags"], json!(["keep", null]));
        assert_eq!(v["id"], "o-1");
        let h = v["email"].as_str().unwrap();
        assert_eq!(h.len(), 64);
        assert_eq!(
            h,
            hash(&json!("a@example.com"), b"k"),
            "equal values, equal hashes"
        );
        assert_ne!(
            h,
            hash(&json!("a@example.com"), b"other key"),
            "the key matters"
        );
        assert_ne!(h, hash(&json!("b@example.com"), b"k"));
    }

    #[test]
    fn hash_is_hmac_sha256_hex() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            hash(&json!("what do ya want for nothing?"), b"Jefe"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hash(&json!(42), b"k"),
            hash(&json!("42"), b"k"),
            "numbers hash their text"
        );
    }

    #[test]
    fn pointers_must_be_absolute() {
        assert!(Redaction::parse("card", Action::Drop).is_err());
        assert_eq!(r("/a~0b/~1", Action::Drop).path, ["a~b", "/"]);
        assert_eq!(index("01"), None);
        assert_eq!(index("10"), Some(10));
    }
}
