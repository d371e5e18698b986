//! Ingest authentication: `POST /v1/events` only from callers that present one of the
//! sidecar's shared secrets as `Authorization: Bearer <secret>`, i.e. from its proxies'
//! filters (`sidecar.secret` in the filter config).
//!
//! A line may name the topics its secret may publish to after the secret: `<secret>
//! orders,payment-*` (names, or prefixes ending in `*`); without a list, every topic.
//!
//! The secrets come from a file (one per line) or the `EVENTWIRE_INGEST_SECRET` variable,
//! never from the command line, where `ps` shows them. The file is read again when it
//! changes, so a secret is rotated without a restart: add the new line, move the proxies to
//! it, remove the old line. Every secret accepted is compared in full on every request, in
//! time that does not depend on where a wrong secret differs.

use std::path::Path;
use std::sync::Arc;

use axum::http::{HeaderMap, header};
use thiserror::Error;

use super::{TopicPattern, Watched, bearer, constant_time_eq};
pub use eventwire_contract::{MIN_SECRET_LEN, SECRET_ENV};

#[derive(Debug, Error)]
pub enum SecretError {
    #[error("{0}")]
    File(String),
    #[error("{what}: no secret in it (one per line; `#` starts a comment line)")]
    Empty { what: String },
    #[error(
        "{what}, line {line}: a secret must be at least {MIN_SECRET_LEN} visible ASCII characters"
    )]
    Weak { what: String, line: usize },
    #[error("{what}, line {line}: {why}")]
    Topics {
        what: String,
        line: usize,
        why: String,
    },
}

/// One accepted secret (or static subscriber token) and the topics it is good for
/// (`None`: every topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    bytes: Vec<u8>,
    pub topics: Option<Vec<TopicPattern>>,
}

/// What a request's credentials allow: the secret that matched, in the set it was checked
/// against (a reload meanwhile does not change what this request may do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Ingest is open.
    Open,
    Secret(Arc<Vec<Secret>>, usize),
}

/// Why a request was refused: the answer says only that, never which secret was near.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("ingest needs `Authorization: Bearer <secret>` (the filter's `sidecar.secret`)")]
    Missing,
    #[error("the ingest credentials are not accepted")]
    Wrong,
}

pub struct IngestAuth {
    /// `None`: ingest is open (no secret configured).
    secrets: Option<Secrets>,
}

/// Secrets from a file (read again on change) or fixed from the environment.
enum Secrets {
    File(Watched<Vec<Secret>>),
    Fixed(Arc<Vec<Secret>>),
}

impl IngestAuth {
    /// Secrets from `file`, else from [`SECRET_ENV`], else none (open ingest).
    pub fn load(file: Option<&Path>) -> Result<IngestAuth, SecretError> {
        let secrets = match (file, std::env::var(SECRET_ENV)) {
            (Some(path), _) => Some(Secrets::File(
                Watched::load(path, read_file).map_err(SecretError::File)?,
            )),
            (None, Ok(text)) if !text.trim().is_empty() => {
                Some(Secrets::Fixed(Arc::new(parse(&text, SECRET_ENV)?)))
            }
            (None, _) => None,
        };
        Ok(IngestAuth { secrets })
    }

    /// No secret configured: anyone who reaches the listener may publish.
    pub fn is_open(&self) -> bool {
        self.secrets.is_none()
    }

    pub fn secrets(&self) -> usize {
        self.current().map_or(0, |s| s.len())
    }

    fn current(&self) -> Option<Arc<Vec<Secret>>> {
        match self.secrets.as_ref()? {
            Secrets::File(w) => Some(w.get()),
            Secrets::Fixed(s) => Some(s.clone()),
        }
    }

    pub fn check(&self, headers: &HeaderMap) -> Result<Grant, AuthError> {
        let Some(secrets) = self.current() else {
            return Ok(Grant::Open);
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()))
            .ok_or(AuthError::Missing)?;
        let i = matching(&secrets, presented).ok_or(AuthError::Wrong)?;
        Ok(Grant::Secret(secrets, i))
    }

    /// Reads the secret file again if it changed (a no-op for secrets from the environment).
    pub fn reload(&self) {
        if let Some(Secrets::File(w)) = &self.secrets {
            w.reload();
        }
    }
}

/// The index of the secret `presented` is, comparing every secret in full: where a wrong
/// one differs must not show in the time taken.
pub fn matching(secrets: &[Secret], presented: &[u8]) -> Option<usize> {
    let mut matched = None;
    for (i, s) in secrets.iter().enumerate() {
        if constant_time_eq(presented, &s.bytes) {
            matched = Some(i);
        }
    }
    matched
}

impl Grant {
    /// Whether these credentials may publish to `topic`.
    pub fn allows(&self, topic: &str) -> bool {
        let Grant::Secret(secrets, i) = self else {
            return true;
        };
        match secrets.get(*i).map(|s| &s.topics) {
            Some(None) => true,
            Some(Some(patterns)) => patterns.iter().any(|p| p.matches(topic)),
            None => false,
        }
    }
}

pub fn read_file(path: &Path) -> Result<Vec<Secret>, String> {
    let text = super::read_text(path)?;
    parse(&text, &path.display().to_string()).map_err(|e| e.to_string())
}

/// One secret per line, optionally followed by the topics it may publish to; blank lines
/// and `#` comment lines are skipped.
pub fn parse(text: &str, what: &str) -> Result<Vec<Secret>, SecretError> {
    let mut secrets = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_ascii_whitespace();
        let secret = fields.next().unwrap_or_default();
        if secret.len() < MIN_SECRET_LEN || !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SecretError::Weak {
                what: what.to_string(),
                line: i + 1,
            });
        }
        let topics = match (fields.next(), fields.next()) {
            (None, _) => None,
            (Some(list), None) => {
                Some(topic_patterns(list).map_err(|why| SecretError::Topics {
                    what: what.to_string(),
                    line: i + 1,
                    why,
                })?)
            }
            (Some(_), Some(_)) => {
                return Err(SecretError::Topics {
                    what: what.to_string(),
                    line: i + 1,
                    why: "topics are one comma-separated list after the secret".into(),
                });
            }
        };
        secrets.push(Secret {
            bytes: secret.as_bytes().to_vec(),
            topics,
        });
    }
    if secrets.is_empty() {
        return Err(SecretError::Empty {
            what: what.to_string(),
        });
    }
    Ok(secrets)
}

/// `orders,payment-*`: topic names (Kafka's rules) or prefixes ending in `*`.
fn topic_patterns(list: &str) -> Result<Vec<TopicPattern>, String> {
    list.split(',').map(TopicPattern::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const A: &str = "0123456789abcdef-old";
    const B: &str = "0123456789abcdef-new";

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn secrets_parse_one_per_line_and_weak_ones_are_refused() {
        let s = parse(&format!("# rotation\n{A}\n\n  {B}  \n"), "f").unwrap();
        let bytes: Vec<&[u8]> = s.iter().map(|s| s.bytes.as_slice()).collect();
        assert_eq!(bytes, [A.as_bytes(), B.as_bytes()]);
        assert!(s.iter().all(|s| s.topics.is_none()), "no list: every topic");
        assert!(matches!(
            parse("# nothing\n\n", "f"),
            Err(SecretError::Empty { .. })
        ));
        let e = parse(&format!("{A}\nshort\n"), "f").unwrap_err();
        assert!(e.to_string().contains("f, line 2"), "{e}");
        let limited = parse("0123456789abcdef ghij", "f").unwrap();
        assert_eq!(
            limited[0].topics,
            Some(vec![TopicPattern::Exact("ghij".into())]),
            "what follows the secret is its topics"
        );
    }

    #[test]
    fn either_secret_is_accepted_and_nothing_else() {
        let f = file(&format!("{A}\n{B}\n"));
        let auth = IngestAuth::load(Some(f.path())).unwrap();
        assert!(!auth.is_open());
        let index = |g: Result<Grant, AuthError>| match g {
            Ok(Grant::Secret(_, i)) => Some(i),
            _ => None,
        };
        assert_eq!(
            index(auth.check(&headers(Some(&format!("Bearer {A}"))))),
            Some(0)
        );
        assert_eq!(
            index(auth.check(&headers(Some(&format!("bearer {B}"))))),
            Some(1)
        );
        assert_eq!(auth.check(&headers(None)), Err(AuthError::Missing));
        assert_eq!(
            auth.check(&headers(Some(A))),
            Err(AuthError::Missing),
            "no scheme"
        );
        assert_eq!(
            auth.check(&headers(Some("Bearer "))),
            Err(AuthError::Missing)
        );
        let near = format!("Bearer {}", &A[..A.len() - 1]);
        assert_eq!(auth.check(&headers(Some(&near))), Err(AuthError::Wrong));
        let longer = format!("Bearer {A}x");
        assert_eq!(auth.check(&headers(Some(&longer))), Err(AuthError::Wrong));
        assert_eq!(
            auth.check(&headers(Some("Basic abc"))),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_old_secrets() {
        let f = file(&format!("{A}\n"));
        let auth = IngestAuth::load(Some(f.path())).unwrap();
        let with = |s: &str| headers(Some(&format!("Bearer {s}")));
        assert_eq!(auth.check(&with(B)), Err(AuthError::Wrong));
        std::fs::write(f.path(), format!("{A}\n{B}\n")).unwrap();
        auth.reload();
        assert!(auth.check(&with(A)).is_ok() && auth.check(&with(B)).is_ok());
        std::fs::write(f.path(), format!("{B}\n# {A} retired\n")).unwrap();
        auth.reload();
        assert_eq!(
            auth.check(&with(A)),
            Err(AuthError::Wrong),
            "the old one is gone"
        );
        std::fs::write(f.path(), "short\n").unwrap();
        auth.reload();
        assert!(
            auth.check(&with(B)).is_ok(),
            "an invalid file changes nothing"
        );
    }

    #[test]
    fn a_secret_may_be_limited_to_topics() {
        let f = file(&format!("{A} order-placed-events,payment-*\n{B}\n"));
        let auth = IngestAuth::load(Some(f.path())).unwrap();
        let a = auth.check(&headers(Some(&format!("Bearer {A}")))).unwrap();
        let b = auth.check(&headers(Some(&format!("Bearer {B}")))).unwrap();
        assert!(a.allows("order-placed-events"));
        assert!(a.allows("payment-requested-events"), "prefix");
        assert!(!a.allows("order-placed-events-2"), "names are exact");
        assert!(!a.allows("audit"));
        assert!(b.allows("audit"), "no list: every topic");
        assert!(Grant::Open.allows("audit"));
        for bad in ["orders pay", "or*ders", "bad/topic"] {
            let e = parse(&format!("{A} {bad}\n"), "f").unwrap_err();
            assert!(
                matches!(e, SecretError::Topics { line: 1, .. }),
                "{bad}: {e}"
            );
        }
        // A grant keeps the set it was checked against: a reload meanwhile (here: B now
        // first, A gone) does not lend it another secret's topics.
        std::fs::write(f.path(), format!("{B}\n")).unwrap();
        auth.reload();
        assert!(!a.allows("audit"));
    }
}
