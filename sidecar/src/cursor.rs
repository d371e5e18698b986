//! Subscription positions. A cursor is the complete Kafka position of a subscription: for
//! every partition the next offset to read, written `p:o,p:o,...`. Because it is Kafka's
//! position and not a session id, any sidecar instance can resume from it.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::cloudevent::validate;

/// Partition -> next offset to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor(BTreeMap<i32, i64>);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CursorError {
    #[error("empty cursor")]
    Empty,
    #[error("`{0}` is not `partition:offset`")]
    NotAPair(String),
    #[error("partition `{0}` is not a non-negative integer")]
    BadPartition(String),
    #[error("offset `{0}` is not a non-negative integer")]
    BadOffset(String),
    #[error("partition {0} appears twice")]
    Duplicate(i32),
}

impl Cursor {
    pub fn new(positions: impl IntoIterator<Item = (i32, i64)>) -> Self {
        Cursor(positions.into_iter().collect())
    }

    pub fn get(&self, partition: i32) -> Option<i64> {
        self.0.get(&partition).copied()
    }

    pub fn set(&mut self, partition: i32, offset: i64) {
        self.0.insert(partition, offset);
    }

    pub fn iter(&self) -> impl Iterator<Item = (i32, i64)> + '_ {
        self.0.iter().map(|(p, o)| (*p, *o))
    }

    /// Whether a record at `offset` in `partition` comes at or after this position, i.e.
    /// has not been delivered yet. Unknown partitions were never read, so everything counts.
    pub fn is_due(&self, partition: i32, offset: i64) -> bool {
        self.get(partition).is_none_or(|next| offset >= next)
    }

    /// Moves past a delivered record.
    pub fn advance(&mut self, partition: i32, offset: i64) {
        self.0.insert(partition, offset + 1);
    }

    /// Whether this position has reached `target` in every partition `target` names.
    pub fn reached(&self, target: &Cursor) -> bool {
        target
            .iter()
            .all(|(p, o)| self.get(p).is_some_and(|mine| mine >= o))
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (p, o)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{p}:{o}")?;
        }
        Ok(())
    }
}

impl FromStr for Cursor {
    type Err = CursorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Err(CursorError::Empty);
        }
        let mut cursor = Cursor::default();
        for pair in s.split(',') {
            let (p, o) = pair
                .split_once(':')
                .ok_or_else(|| CursorError::NotAPair(pair.to_owned()))?;
            let partition = non_negative(p).ok_or_else(|| CursorError::BadPartition(p.into()))?;
            let partition =
                i32::try_from(partition).map_err(|_| CursorError::BadPartition(p.into()))?;
            let offset = non_negative(o).ok_or_else(|| CursorError::BadOffset(o.into()))?;
            if cursor.0.insert(partition, offset).is_some() {
                return Err(CursorError::Duplicate(partition));
            }
        }
        Ok(cursor)
    }
}

fn non_negative(s: &str) -> Option<i64> {
    // `parse` alone would accept a leading `+`.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Where a subscription starts (`from=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFrom {
    Latest,
    Earliest,
    Cursor(Cursor),
    /// Milliseconds since the Unix epoch.
    Time(i64),
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "expected `latest`, `earliest`, a cursor like `0:16,1:8` or an RFC 3339 time like \
     2024-05-01T12:00:00Z; got {value:?} ({reason})"
)]
pub struct StartFromError {
    pub value: String,
    pub reason: String,
}

impl FromStr for StartFrom {
    type Err = StartFromError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| StartFromError {
            value: s.to_owned(),
            reason,
        };
        match s {
            "latest" => Ok(StartFrom::Latest),
            "earliest" => Ok(StartFrom::Earliest),
            // A time always has a `T` at index 10 and a cursor never has letters.
            _ if s
                .as_bytes()
                .get(10)
                .is_some_and(|b| matches!(b, b'T' | b't')) =>
            {
                validate::timestamp(s).map_err(err)?;
                epoch_millis(s)
                    .map(StartFrom::Time)
                    .ok_or_else(|| err("time out of range".into()))
            }
            _ => s
                .parse()
                .map(StartFrom::Cursor)
                .map_err(|e: CursorError| err(e.to_string())),
        }
    }
}

/// Milliseconds since the epoch of a timestamp that `validate::timestamp` accepted.
fn epoch_millis(s: &str) -> Option<i64> {
    let num = |range: std::ops::Range<usize>| s.get(range)?.parse::<i64>().ok();
    let days = days_from_civil(num(0..4)?, num(5..7)?, num(8..10)?);
    let seconds = days * 86_400 + num(11..13)? * 3600 + num(14..16)? * 60 + num(17..19)?;
    let rest = &s[19..];
    let (fraction, zone) = match rest.strip_prefix('.') {
        Some(after) => {
            let n = after.bytes().take_while(u8::is_ascii_digit).count();
            (&after[..n], &after[n..])
        }
        None => ("", rest),
    };
    // Milliseconds are what Kafka timestamps carry; finer digits cannot matter.
    let millis = format!("{fraction:0<3}").get(..3)?.parse::<i64>().ok()?;
    let offset = match zone.as_bytes().first()? {
        b'Z' | b'z' => 0,
        sign => {
            let minutes =
                zone.get(1..3)?.parse::<i64>().ok()? * 60 + zone.get(4..6)?.parse::<i64>().ok()?;
            if *sign == b'-' { -minutes } else { minutes }
        }
    };
    Some((seconds - offset * 60) * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_errors() {
        let c: Cursor = "0:16,1:8,2:4".parse().unwrap();
        assert_eq!(c.to_string(), "0:16,1:8,2:4");
        assert_eq!(c.get(1), Some(8));
        assert_eq!(
            "2:4,0:16".parse::<Cursor>().unwrap().to_string(),
            "0:16,2:4"
        );
        assert_eq!("".parse::<Cursor>(), Err(CursorError::Empty));
        assert_eq!(
            "0".parse::<Cursor>(),
            Err(CursorError::NotAPair("0".into()))
        );
        assert_eq!(
            "x:1".parse::<Cursor>(),
            Err(CursorError::BadPartition("x".into()))
        );
        assert_eq!(
            "0:+1".parse::<Cursor>(),
            Err(CursorError::BadOffset("+1".into()))
        );
        assert_eq!(
            "0:-1".parse::<Cursor>(),
            Err(CursorError::BadOffset("-1".into()))
        );
        assert_eq!("0:1,0:2".parse::<Cursor>(), Err(CursorError::Duplicate(0)));
        assert_eq!(
            "99999999999:1".parse::<Cursor>(),
            Err(CursorError::BadPartition("99999999999".into()))
        );
    }

    #[test]
    fn cursor_advances_and_compares() {
        let mut c = Cursor::new([(0, 5), (1, 0)]);
        assert!(!c.is_due(0, 4) && c.is_due(0, 5) && c.is_due(7, 0));
        c.advance(0, 5);
        assert_eq!(c.to_string(), "0:6,1:0");
        assert!(c.reached(&Cursor::new([(0, 6)])));
        assert!(!c.reached(&Cursor::new([(0, 6), (1, 1)])));
        assert!(!c.reached(&Cursor::new([(2, 0)])), "unknown partition");
    }

    #[test]
    fn start_from_forms() {
        assert_eq!("latest".parse(), Ok(StartFrom::Latest));
        assert_eq!("earliest".parse(), Ok(StartFrom::Earliest));
        assert_eq!("0:3".parse(), Ok(StartFrom::Cursor(Cursor::new([(0, 3)]))));
        assert_eq!("1970-01-01T00:00:01.5Z".parse(), Ok(StartFrom::Time(1500)));
        assert_eq!(
            "2024-05-01T12:00:00Z".parse(),
            Ok(StartFrom::Time(1_714_564_800_000))
        );
        assert_eq!(
            "2024-05-01T14:30:00.123456+02:30".parse(),
            Ok(StartFrom::Time(1_714_564_800_123))
        );
        assert_eq!(
            "2000-02-29T00:00:00-01:00".parse(),
            Ok(StartFrom::Time(951_786_000_000))
        );
        for bad in ["newest", "2024-05-01T25:00:00Z", "0:1,", "", "2024-05-01"] {
            let e = bad.parse::<StartFrom>().unwrap_err();
            assert!(e.to_string().contains("expected `latest`"), "{bad}: {e}");
        }
    }
}
