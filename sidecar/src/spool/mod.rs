//! The durable spool: an append-only, checksummed log of accepted events that are not yet
//! in Kafka.
//!
//! Files in the spool directory:
//! - `<first seq>.seg`: segments of checksummed records (`codec`);
//! - `forwarded`: the sequence number below which every record reached Kafka (8 bytes LE).
//!
//! An append is acknowledged only after `fdatasync`; concurrent appends share one sync
//! (group commit on a dedicated thread), so durability costs one disk flush per batch, not
//! per event. A torn record at the end (a crash mid-write) fails its checksum on start and
//! is cut off: it was never acknowledged.

mod codec;
mod segment;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use thiserror::Error;
use tokio::sync::{Notify, oneshot};

use crate::producer::Pending;
use crate::sink::EventRecord;

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
        let (forwarded_file, forwarded) = open_forwarded(dir)?;
        let mut segments = segment::list_segments(dir)?;
        let (entries, next_seq) = replay(&segments, forwarded)?;
        let bytes = entries.iter().map(|e| e.size).sum();
        let (file, file_len) = segment::open_tail_segment(dir, &mut segments, next_seq)?;
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
            .spawn(move || segment::write_loop(&writer_shared, rx, file, file_len, next_seq))?;
        shared.ready.notify_one();
        Ok(Spool { shared, writer: tx })
    }

    /// Appends and syncs; resolves to the record's sequence number once it is durable.
    pub async fn append(
        &self,
        event: EventRecord,
        pending: Option<Pending>,
    ) -> Result<u64, Refused> {
        let payload = codec::encode(&event);
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

    /// Bytes of the records not yet forwarded (what `--spool-max-bytes` bounds).
    pub fn bytes(&self) -> u64 {
        lock(&self.shared.queue).bytes
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
        codec::frame(&mut buf, 0, &codec::encode(event));
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.shared.dir.join("dead-letter.log"))?;
        file.write_all(&buf)?;
        file.sync_data()
    }
}

/// The `forwarded` file and the sequence number it holds (0 when new or unreadable).
fn open_forwarded(dir: &Path) -> io::Result<(File, u64)> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("forwarded"))?;
    let mut buf = [0u8; 8];
    let forwarded = match file.read_exact(&mut buf) {
        Ok(()) => u64::from_le_bytes(buf),
        Err(_) => 0,
    };
    Ok((file, forwarded))
}

/// The records not yet forwarded, in order, and the next sequence number.
fn replay(
    segments: &[(u64, PathBuf)],
    forwarded: u64,
) -> Result<(VecDeque<Entry>, u64), SpoolError> {
    let mut entries = VecDeque::new();
    let mut next_seq = forwarded;
    let last = segments.len().saturating_sub(1);
    for (i, (_, path)) in segments.iter().enumerate() {
        for (seq, event, size) in segment::read_segment(path, i == last)? {
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
    if !entries.is_empty() {
        let bytes: u64 = entries.iter().map(|e| e.size).sum();
        tracing::info!(
            events = entries.len(),
            bytes,
            "spool: replaying events not yet in Kafka"
        );
    }
    Ok((entries, next_seq))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::codec::tests::event;
    use super::segment::list_segments;
    use super::*;

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
