//! What to do after one delivery attempt: done, retry (and when), or give up. Pure code:
//! the clock and the random number come in as arguments, so every case is a unit test.

use std::time::{Duration, SystemTime};

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The service answered; `retry_after` is its parsed `Retry-After`, if any.
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// No answer within the delivery's `timeout_ms`.
    Timeout,
    /// No connection, or it broke before an answer.
    Transport(String),
}

impl Outcome {
    /// The `outcome` label of `eventwire_delivery_attempts_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Status { code, .. } => match code {
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                500..=599 => "5xx",
                _ => "other",
            },
            Outcome::Timeout => "timeout",
            Outcome::Transport(_) => "connection_error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// A 4xx other than 408 / 429: the service refuses this event; trying again cannot help.
    Rejected,
    /// A 1xx / 3xx: redirects are not followed (the URL should name the service itself).
    UnexpectedStatus,
    /// Retryable failures until `max_attempts` was reached.
    AttemptsExhausted,
}

impl GiveUp {
    /// The `eventwire_dlq_reason` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUp::Rejected => "rejected",
            GiveUp::UnexpectedStatus => "unexpected-status",
            GiveUp::AttemptsExhausted => "attempts-exhausted",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Done,
    Retry { after: Duration },
    GiveUp(GiveUp),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// `attempt` is the 1-based number of the attempt that just ended; `random` is any
    /// uniformly random u64 (it picks the jitter).
    pub fn decide(&self, outcome: &Outcome, attempt: u32, random: u64) -> Verdict {
        let retry_after = match outcome {
            Outcome::Status {
                code: 200..=299, ..
            } => return Verdict::Done,
            Outcome::Status {
                code: 408 | 429 | 500..=599,
                retry_after,
            } => *retry_after,
            Outcome::Status {
                code: 400..=499, ..
            } => return Verdict::GiveUp(GiveUp::Rejected),
            Outcome::Status { .. } => return Verdict::GiveUp(GiveUp::UnexpectedStatus),
            Outcome::Timeout | Outcome::Transport(_) => None,
        };
        if attempt >= self.max_attempts {
            return Verdict::GiveUp(GiveUp::AttemptsExhausted);
        }
        // The service's own wish wins, but capped: it holds the whole partition meanwhile.
        let after = match retry_after {
            Some(wish) => wish.min(self.max_backoff),
            None => self.backoff(attempt, random),
        };
        Verdict::Retry { after }
    }

    /// Full jitter (uniform in 0..=cap, cap doubling from `initial_backoff` up to
    /// `max_backoff`): spreads the retries of many sidecars hitting one recovering service.
    pub fn backoff(&self, attempt: u32, random: u64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(32);
        let cap = self
            .initial_backoff
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max_backoff);
        let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(random % cap_ms.saturating_add(1))
    }
}

/// `Retry-After` (RFC 9110 10.2.3): delay seconds or an HTTP-date; a date in the past is
/// zero. Anything else is ignored (`None`), as the header is only a hint.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(1000),
    };

    fn status(code: u16) -> Outcome {
        Outcome::Status {
            code,
            retry_after: None,
        }
    }

    #[test]
    fn two_hundreds_are_done() {
        for code in [200, 201, 202, 204, 299] {
            assert_eq!(POLICY.decide(&status(code), 1, 0), Verdict::Done);
        }
    }

    #[test]
    fn server_errors_timeouts_and_transport_are_retried() {
        for outcome in [
            status(500),
            status(503),
            status(408),
            status(429),
            Outcome::Timeout,
            Outcome::Transport("refused".into()),
        ] {
            assert!(
                matches!(POLICY.decide(&outcome, 1, 0), Verdict::Retry { .. }),
                "{outcome:?}"
            );
        }
    }

    #[test]
    fn client_errors_are_not_retried() {
        for code in [400, 401, 403, 404, 409, 410, 422] {
            assert_eq!(
                POLICY.decide(&status(code), 1, 0),
                Verdict::GiveUp(GiveUp::Rejected)
            );
        }
        for code in [100, 301, 302, 304] {
            assert_eq!(
                POLICY.decide(&status(code), 1, 0),
                Verdict::GiveUp(GiveUp::UnexpectedStatus)
            );
        }
    }

    #[test]
    fn the_last_attempt_gives_up() {
        assert!(matches!(
            POLICY.decide(&status(503), 3, 0),
            Verdict::Retry { .. }
        ));
        assert_eq!(
            POLICY.decide(&status(503), 4, 0),
            Verdict::GiveUp(GiveUp::AttemptsExhausted)
        );
        let once = RetryPolicy {
            max_attempts: 1,
            ..POLICY
        };
        assert_eq!(
            once.decide(&Outcome::Timeout, 1, 0),
            Verdict::GiveUp(GiveUp::AttemptsExhausted)
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        let caps: Vec<u64> = (1..=6)
            .map(|a| {
                (0..2000)
                    .map(|r| POLICY.backoff(a, r).as_millis() as u64)
                    .max()
                    .unwrap()
            })
            .collect();
        assert_eq!(caps, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(POLICY.backoff(1, 0), Duration::ZERO);
        // Huge attempt numbers neither overflow nor exceed the cap.
        assert!(POLICY.backoff(u32::MAX, u64::MAX) <= Duration::from_millis(1000));
    }

    #[test]
    fn retry_after_is_honoured_up_to_max_backoff() {
        let wish = |secs| Outcome::Status {
            code: 503,
            retry_after: Some(Duration::from_secs(secs)),
        };
        let long = RetryPolicy {
            max_backoff: Duration::from_secs(60),
            ..POLICY
        };
        assert_eq!(
            long.decide(&wish(2), 1, 0),
            Verdict::Retry {
                after: Duration::from_secs(2)
            }
        );
        assert_eq!(
            long.decide(&wish(600), 1, 0),
            Verdict::Retry {
                after: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("-5", now), None);
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("", now), None);
        assert_eq!(
            retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }
}
