//! The spool's on-disk forms: a record frame `[len u32 LE][crc32 u32 LE][seq u64 LE][event]`
//! (the checksum covers seq and event) and the event's own length-prefixed encoding.

use crate::sink::{EventRecord, OutRecord};

const RECORD_HEADER: usize = 8;

/// Bytes a framed record of a `payload_len`-byte event takes.
pub fn framed_len(payload_len: usize) -> u64 {
    (RECORD_HEADER + 8 + payload_len) as u64
}

pub fn frame(buf: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let mut body = Vec::with_capacity(8 + payload.len());
    body.extend_from_slice(&seq.to_le_bytes());
    body.extend_from_slice(payload);
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    buf.extend_from_slice(&body);
}

/// The record at `at`: (event, seq, bytes used), or `None` when torn or corrupt.
pub fn decode_at(data: &[u8], at: usize) -> Option<(EventRecord, u64, usize)> {
    let header = data.get(at..at + RECORD_HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    let body = data.get(at + RECORD_HEADER..at + RECORD_HEADER + len)?;
    if len < 8 || crc32fast::hash(body) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(body[..8].try_into().ok()?);
    let event = decode(&body[8..])?;
    Some((event, seq, RECORD_HEADER + len))
}

pub fn encode(e: &EventRecord) -> Vec<u8> {
    let r = &e.record;
    let mut out = Vec::with_capacity(64 + r.value.as_ref().map_or(0, Vec::len));
    put_str(&mut out, &e.id);
    put_str(&mut out, &e.source);
    put_str(&mut out, &r.topic);
    put_opt(&mut out, r.key.as_deref().map(str::as_bytes));
    out.extend_from_slice(&(r.headers.len() as u32).to_le_bytes());
    for (k, v) in &r.headers {
        put_str(&mut out, k);
        put_str(&mut out, v);
    }
    put_opt(&mut out, r.value.as_deref());
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_opt(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            put_bytes(out, b);
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.data.get(..n)?, self.data.get(n..)?);
        self.data = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<usize> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()?;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
    fn opt(&mut self) -> Option<Option<&'a [u8]>> {
        match self.take(1)?[0] {
            0 => Some(None),
            _ => Some(Some(self.bytes()?)),
        }
    }
}

pub fn decode(payload: &[u8]) -> Option<EventRecord> {
    let mut r = Reader { data: payload };
    let id = r.string()?;
    let source = r.string()?;
    let topic = r.string()?;
    let key = match r.opt()? {
        Some(k) => Some(String::from_utf8(k.to_vec()).ok()?),
        None => None,
    };
    let n = r.u32()?;
    let mut headers = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        headers.push((r.string()?, r.string()?));
    }
    let value = r.opt()?.map(<[u8]>::to_vec);
    Some(EventRecord {
        id,
        source,
        record: OutRecord {
            topic,
            key,
            headers,
            value,
        },
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn event(i: u32) -> EventRecord {
        EventRecord {
            id: format!("id-{i}"),
            source: "/s".into(),
            record: OutRecord {
                topic: "t".into(),
                key: i.is_multiple_of(2).then(|| format!("k{i}")),
                headers: vec![("ce_id".into(), format!("id-{i}"))],
                value: (!i.is_multiple_of(3)).then(|| vec![0, 1, 0xff, i as u8]),
            },
        }
    }

    #[test]
    fn encoding_round_trips() {
        for i in 0..6 {
            let e = event(i);
            assert_eq!(decode(&encode(&e)), Some(e));
        }
        let mut buf = Vec::new();
        frame(&mut buf, 42, &encode(&event(1)));
        let (e, seq, used) = decode_at(&buf, 0).unwrap();
        assert_eq!((e, seq, used), (event(1), 42, buf.len()));
        // Any flipped byte is caught by the checksum.
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(decode_at(&bad, 0).is_none(), "flip at {i} not caught");
        }
    }
}
