//! The durable spool: an append-only, checksummed log of accepted events that are not yet
//! in Kafka.
//!
//! Files in the spool directory:
//! - `<first seq>.seg`: segments of records `[len u32 LE][crc32 u32 LE][payload]`;
//! - `forwarded`: the sequence number below which every record reached Kafka (8 bytes LE).
//!
//! An append is acknowledged only after `fdatasync`; concurrent appends share one sync
//! (group commit on a dedicated thread), so durability costs one disk flush per batch, not
//! per event. A torn record at the end (a crash mid-write) fails its checksum on start and
//! is cut off: it was never acknowledged.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use thiserror::Error;
use tokio::sync::{Notify, oneshot};

use crate::producer::Pending;
use crate::sink::{EventRecord, OutRecord};

/// Segments rotate at this size; a segment is deleted once all its records were forwarded.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Appends written and synced together at most.
const GROUP_COMMIT_MAX: usize = 512;
const RECORD_HEADER: usize = 8;

#[derive(Debug, Error)]
pub enum SpoolError {
    #[error("the spool is full ({0} bytes waiting for the broker)")]
    Full(u64),
    #[error("spool I/O: {0}")]
    Io(#[from] io::Error),
    #[error("the spool writer has stopped")]
    Closed,
}

/// A record waiting in the spool, in acceptance order.
pub struct Entry {
    pub seq: u64,
    pub event: EventRecord,
    /// The delivery still in flight in the producer when the event was spooled: the
    /// forwarder waits for it before sending again, so a late acknowledgement is not
    /// turned into a duplicate.
    pub pending: Option<Pending>,
    size: u64,
}

struct Queue {
    entries: VecDeque<Entry>,
    /// Bytes of records not yet forwarded, for backpressure.
    bytes: u64,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Notify,
    max_bytes: u64,
    /// Events accepted into the spool and not yet forwarded (queued or being forwarded).
    backlog: AtomicU64,
    forwarded_file: Mutex<File>,
    dir: PathBuf,
    segments: Mutex<Vec<(u64, PathBuf)>>,
}

struct Append {
    payload: Vec<u8>,
    event: EventRecord,
    pending: Option<Pending>,
    done: oneshot::Sender<Result<u64, Refused>>,
}

/// An append the spool could not make durable; the in-flight delivery, if one came with
/// it, is handed back so the caller can still learn its outcome.
pub struct Refused {
    pub error: SpoolError,
    pub pending: Option<Pending>,
}

impl std::fmt::Debug for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refused")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Append>,
}

impl Spool {
    /// Opens (or creates) the spool and queues every record not yet forwarded.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        fs::create_dir_all(dir)?;
        let mut forwarded_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("forwarded"))?;
        let mut buf = [0u8; 8];
        let forwarded = match forwarded_file.read_exact(&mut buf) {
            Ok(()) => u64::from_le_bytes(buf),
            Err(_) => 0,
        };
        let mut segments = list_segments(dir)?;
        let mut entries = VecDeque::new();
        let mut next_seq = forwarded;
        let last = segments.len().saturating_sub(1);
        for (i, (_, path)) in segments.iter().enumerate() {
            let records = read_segment(path, i == last)?;
            for (seq, event, size) in records {
                next_seq = next_seq.max(seq + 1);
                if seq >= forwarded {
                    entries.push_back(Entry {
                        seq,
                        event,
                        pending: None,
                        size,
                    });
                }
            }
        }
        let bytes = entries.iter().map(|e| e.size).sum();
        if !entries.is_empty() {
            tracing::info!(
                events = entries.len(),
                bytes,
                "spool: replaying events not yet in Kafka"
            );
        }
        let (file, file_len) = open_tail_segment(dir, &mut segments, next_seq)?;
        let shared = Arc::new(Shared {
            backlog: AtomicU64::new(entries.len() as u64),
            queue: Mutex::new(Queue { entries, bytes }),
            ready: Notify::new(),
            max_bytes,
            forwarded_file: Mutex::new(forwarded_file),
            dir: dir.to_path_buf(),
            segments: Mutex::new(segments),
        });
        let (tx, rx) = mpsc::channel();
        let writer_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || write_loop(&writer_shared, rx, file, file_len, next_seq))?;
        shared.ready.notify_one();
        Ok(Spool { shared, writer: tx })
    }

    /// Appends and syncs; resolves to the record's sequence number once it is durable.
    pub async fn append(
        &self,
        event: EventRecord,
        pending: Option<Pending>,
    ) -> Result<u64, Refused> {
        let payload = encode(&event);
        {
            let queue = lock(&self.shared.queue);
            if queue.bytes + payload.len() as u64 > self.shared.max_bytes {
                return Err(Refused {
                    error: SpoolError::Full(queue.bytes),
                    pending,
                });
            }
        }
        // Counted from now, not from the sync: a direct publish that sees no backlog while
        // this event is being written would overtake it.
        self.shared.backlog.fetch_add(1, Ordering::AcqRel);
        let (done, wait) = oneshot::channel();
        let append = Append {
            payload,
            event,
            pending,
            done,
        };
        let closed = |pending| Refused {
            error: SpoolError::Closed,
            pending,
        };
        let result = match self.writer.send(append) {
            Ok(()) => wait.await.unwrap_or_else(|_| Err(closed(None))),
            Err(mpsc::SendError(a)) => Err(closed(a.pending)),
        };
        if result.is_err() {
            self.shared.backlog.fetch_sub(1, Ordering::AcqRel);
        }
        result
    }

    /// Events accepted into the spool and not yet in Kafka.
    pub fn backlog(&self) -> u64 {
        self.shared.backlog.load(Ordering::Acquire)
    }

    /// Waits for the oldest unforwarded record and takes it out of the queue.
    pub async fn next(&self) -> Entry {
        loop {
            let notified = self.shared.ready.notified();
            if let Some(entry) = lock(&self.shared.queue).entries.pop_front() {
                return entry;
            }
            notified.await;
        }
    }

    /// Records that every event up to and including `entry` is in Kafka (or dead-lettered).
    pub fn forwarded(&self, entry: &Entry) {
        {
            let mut queue = lock(&self.shared.queue);
            queue.bytes = queue.bytes.saturating_sub(entry.size);
        }
        self.shared.backlog.fetch_sub(1, Ordering::AcqRel);
        let next = entry.seq + 1;
        // Without a sync: this only narrows what is replayed after a crash, and the page
        // cache survives a killed process.
        let mut file = lock(&self.shared.forwarded_file);
        let written = file
            .seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&next.to_le_bytes()));
        if let Err(e) = written {
            tracing::warn!(error = %e, "spool: cannot record the forwarded position");
        }
        drop(file);
        self.remove_forwarded_segments(next);
    }

    fn remove_forwarded_segments(&self, next: u64) {
        let mut segments = lock(&self.shared.segments);
        // A segment is done when the following one starts at or below `next`.
        while segments.len() > 1 && segments[1].0 <= next {
            let (_, path) = segments.remove(0);
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(error = %e, path = %path.display(), "spool: cannot remove a forwarded segment");
            }
        }
    }

    /// Keeps an event that can never be published (its topic is gone, it is too large) in
    /// `dead-letter.log`, same framing as the segments, for an operator to replay.
    pub fn dead_letter(&self, event: &EventRecord) -> io::Result<()> {
        let mut buf = Vec::new();
        frame(&mut buf, 0, &encode(event));
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.shared.dir.join("dead-letter.log"))?;
        file.write_all(&buf)?;
        file.sync_data()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.seg"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(seq) = seq {
            out.push((seq, path));
        }
    }
    out.sort_by_key(|(seq, _)| *seq);
    Ok(out)
}

fn open_tail_segment(
    dir: &Path,
    segments: &mut Vec<(u64, PathBuf)>,
    next_seq: u64,
) -> io::Result<(File, u64)> {
    if let Some((_, path)) = segments.last() {
        let file = OpenOptions::new().append(true).open(path)?;
        let len = file.metadata()?.len();
        if len < SEGMENT_BYTES {
            return Ok((file, len));
        }
    }
    Ok((new_segment(dir, segments, next_seq)?, 0))
}

fn new_segment(dir: &Path, segments: &mut Vec<(u64, PathBuf)>, first_seq: u64) -> io::Result<File> {
    let path = segment_path(dir, first_seq);
    let file = OpenOptions::new().create(true).append(true).open(&path)?;
    sync_dir(dir);
    if segments.last().is_none_or(|(seq, _)| *seq != first_seq) {
        segments.push((first_seq, path));
    }
    Ok(file)
}

/// A new file's name is durable only once its directory is synced.
fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(error = %e, "spool: cannot sync the spool directory");
    }
}

/// Reads a segment's valid records. In the last segment a bad record is a torn write from a
/// crash: the file is cut there. Elsewhere it is damage: what follows cannot be trusted.
fn read_segment(path: &Path, is_last: bool) -> io::Result<Vec<(u64, EventRecord, u64)>> {
    let data = fs::read(path)?;
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        match decode_at(&data, at) {
            Some((event, seq, size)) => {
                out.push((seq, event, size as u64));
                at += size;
            }
            None => {
                if is_last {
                    tracing::warn!(path = %path.display(), at, dropped = data.len() - at, "spool: discarding a torn record at the end (it was never acknowledged)");
                    OpenOptions::new()
                        .write(true)
                        .open(path)?
                        .set_len(at as u64)?;
                } else {
                    tracing::error!(path = %path.display(), at, "spool: damaged record inside a segment; the rest of this segment is skipped");
                }
                break;
            }
        }
    }
    Ok(out)
}

fn write_loop(
    shared: &Shared,
    rx: mpsc::Receiver<Append>,
    mut file: File,
    mut file_len: u64,
    mut next_seq: u64,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        if file_len >= SEGMENT_BYTES {
            let mut segments = lock(&shared.segments);
            match open_tail_segment(&shared.dir, &mut segments, next_seq) {
                Ok((f, len)) => (file, file_len) = (f, len),
                Err(e) => tracing::error!(error = %e, "spool: cannot start a new segment"),
            }
        }
        let mut buf = Vec::new();
        let mut seqs = Vec::with_capacity(batch.len());
        for a in &batch {
            seqs.push(next_seq);
            frame(&mut buf, next_seq, &a.payload);
            next_seq += 1;
        }
        let written = file.write_all(&buf).and_then(|()| file.sync_data());
        match written {
            Ok(()) => {
                file_len += buf.len() as u64;
                publish_batch(shared, batch, &seqs);
            }
            Err(e) => {
                tracing::error!(error = %e, "spool: write failed; the events were not accepted");
                // Cut back what reached the file, and go on in a new segment anyway: should
                // the cut fail too, later records must not follow damaged bytes. The batch's
                // sequence numbers are not reused, so a record that did land complete (and may
                // be replayed) stays distinct.
                let _ = file.set_len(file_len);
                let mut segments = lock(&shared.segments);
                match new_segment(&shared.dir, &mut segments, next_seq) {
                    Ok(f) => (file, file_len) = (f, 0),
                    Err(e) => tracing::error!(error = %e, "spool: cannot start a new segment"),
                }
                drop(segments);
                for a in batch {
                    let _ = a.done.send(Err(Refused {
                        error: SpoolError::Io(io::Error::new(e.kind(), e.to_string())),
                        pending: a.pending,
                    }));
                }
            }
        }
    }
}

fn publish_batch(shared: &Shared, batch: Vec<Append>, seqs: &[u64]) {
    let mut queue = lock(&shared.queue);
    for (a, &seq) in batch.into_iter().zip(seqs) {
        let size = (RECORD_HEADER + 8 + a.payload.len()) as u64;
        queue.bytes += size;
        queue.entries.push_back(Entry {
            seq,
            event: a.event,
            pending: a.pending,
            size,
        });
        let _ = a.done.send(Ok(seq));
    }
    drop(queue);
    shared.ready.notify_one();
}

/// `[len][crc][seq u64][payload]`; the checksum covers seq and payload.
fn frame(buf: &mut Vec<u8>, seq: u64, payload: &[u8]) {
    let mut body = Vec::with_capacity(8 + payload.len());
    body.extend_from_slice(&seq.to_le_bytes());
    body.extend_from_slice(payload);
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    buf.extend_from_slice(&body);
}

/// The record at `at`: (event, seq, bytes used), or `None` when torn or corrupt.
fn decode_at(data: &[u8], at: usize) -> Option<(EventRecord, u64, usize)> {
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

fn encode(e: &EventRecord) -> Vec<u8> {
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

fn decode(payload: &[u8]) -> Option<EventRecord> {
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
mod tests {
    use super::*;

    fn event(i: u32) -> EventRecord {
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

    #[tokio::test]
    async fn appended_events_survive_a_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5 {
            assert_eq!(spool.append(event(i), None).await.unwrap(), u64::from(i));
        }
        let first = spool.next().await;
        assert_eq!(first.event, event(0));
        spool.forwarded(&first);
        assert_eq!(spool.backlog(), 4);
        drop(spool);
        let reopened = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(reopened.backlog(), 4);
        for i in 1..5 {
            let e = reopened.next().await;
            assert_eq!((e.seq, &e.event), (u64::from(i), &event(i)));
            reopened.forwarded(&e);
        }
        // New appends continue the sequence.
        assert_eq!(reopened.append(event(9), None).await.unwrap(), 5);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 20).unwrap();
            spool.append(event(1), None).await.unwrap();
            spool.append(event(2), None).await.unwrap();
        }
        let (_, seg) = list_segments(dir.path()).unwrap().pop().unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        // A crash in the middle of writing a third record.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.backlog(), 2);
        assert_eq!(fs::metadata(&seg).unwrap().len(), len);
        assert_eq!(spool.append(event(3), None).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_full_spool_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 100).unwrap();
        spool.append(event(1), None).await.unwrap();
        assert!(matches!(
            spool.append(event(2), None).await,
            Err(Refused {
                error: SpoolError::Full(_),
                ..
            })
        ));
        let e = spool.next().await;
        spool.forwarded(&e);
        assert!(spool.append(event(2), None).await.is_ok());
    }
}
