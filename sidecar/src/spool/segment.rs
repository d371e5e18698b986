//! The spool's files: segments (`<first seq>.seg`, rotated at `SEGMENT_BYTES`), reading them
//! back on start, and the writer thread that appends and syncs in groups.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use super::codec::{decode_at, frame, framed_len};
use super::{Append, Entry, Refused, Shared, SpoolError, lock};
use crate::sink::EventRecord;

/// Segments rotate at this size; a segment is deleted once all its records were forwarded.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Appends written and synced together at most.
const GROUP_COMMIT_MAX: usize = 512;

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.seg"))
}

pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
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

pub fn open_tail_segment(
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
pub fn read_segment(path: &Path, is_last: bool) -> io::Result<Vec<(u64, EventRecord, u64)>> {
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

/// The writer thread: takes what has queued up (up to `GROUP_COMMIT_MAX`), writes and syncs
/// it once, then answers every append of the batch.
pub fn write_loop(
    shared: &Shared,
    rx: mpsc::Receiver<Append>,
    file: File,
    len: u64,
    next_seq: u64,
) {
    let mut tail = Tail {
        file,
        len,
        next_seq,
    };
    while let Ok(first) = rx.recv() {
        let batch = take_batch(&rx, first);
        if tail.len >= SEGMENT_BYTES {
            tail.rotate(shared);
        }
        let first_seq = tail.next_seq;
        match tail.append(&batch) {
            Ok(()) => publish_batch(shared, batch, first_seq),
            Err(e) => {
                tracing::error!(error = %e, "spool: write failed; the events were not accepted");
                tail.start_over(shared);
                refuse_batch(batch, &e);
            }
        }
    }
}

fn take_batch(rx: &mpsc::Receiver<Append>, first: Append) -> Vec<Append> {
    let mut batch = vec![first];
    while batch.len() < GROUP_COMMIT_MAX {
        match rx.try_recv() {
            Ok(a) => batch.push(a),
            Err(_) => break,
        }
    }
    batch
}

/// The segment appends go to.
struct Tail {
    file: File,
    len: u64,
    next_seq: u64,
}

impl Tail {
    fn rotate(&mut self, shared: &Shared) {
        let mut segments = lock(&shared.segments);
        match open_tail_segment(&shared.dir, &mut segments, self.next_seq) {
            Ok((file, len)) => (self.file, self.len) = (file, len),
            Err(e) => tracing::error!(error = %e, "spool: cannot start a new segment"),
        }
    }

    /// Writes and syncs the batch. Its sequence numbers are used up even when this fails, so
    /// a record that did land complete (and may be replayed) stays distinct from later ones.
    fn append(&mut self, batch: &[Append]) -> io::Result<()> {
        let mut buf = Vec::new();
        for a in batch {
            frame(&mut buf, self.next_seq, &a.payload);
            self.next_seq += 1;
        }
        self.file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// After a failed write: cut back what reached the file, and go on in a new segment
    /// anyway, since should the cut fail too, later records must not follow damaged bytes.
    fn start_over(&mut self, shared: &Shared) {
        let _ = self.file.set_len(self.len);
        let mut segments = lock(&shared.segments);
        match new_segment(&shared.dir, &mut segments, self.next_seq) {
            Ok(file) => (self.file, self.len) = (file, 0),
            Err(e) => tracing::error!(error = %e, "spool: cannot start a new segment"),
        }
    }
}

fn refuse_batch(batch: Vec<Append>, e: &io::Error) {
    for a in batch {
        let _ = a.done.send(Err(Refused {
            error: SpoolError::Io(io::Error::new(e.kind(), e.to_string())),
            pending: a.pending,
        }));
    }
}

fn publish_batch(shared: &Shared, batch: Vec<Append>, first_seq: u64) {
    let mut queue = lock(&shared.queue);
    for (a, seq) in batch.into_iter().zip(first_seq..) {
        let size = framed_len(a.payload.len());
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
