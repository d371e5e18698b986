//! Delivery status and idempotency, one store: every accepted event by (`source`, `id`).
//!
//! - A second request with the same `source` + `id` within the window gets the first one's
//!   answer (and its current status) instead of a second record; one still in progress is
//!   waited for. The same id with a different payload is a conflict, not a silent replay.
//! - `GET /v1/events/<id>` reads the status: `spooled`, `published` (topic, partition,
//!   offset) or `failed` (why).
//!
//! The durable sink owns the store, so an accepted event's status is written only by what
//! made it durable: `once` on acceptance, the forwarder's `update`, the in-doubt `record`.
//! The HTTP layer reads it through `EventSink`.
//!
//! Final states are appended to `status.log` (JSON lines) and replayed on start, so both
//! survive a restart; writes are not synced: a killed process keeps them (page cache), only a
//! machine crash can lose the newest, which then costs at most a duplicate record.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::sink::{Delivered, EventRecord, Outcome};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum State {
    Spooled,
    Published { partition: i32, offset: i64 },
    Failed { reason: String },
}

impl From<Outcome> for State {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Published(Delivered { partition, offset }) => {
                State::Published { partition, offset }
            }
            Outcome::Spooled => State::Spooled,
        }
    }
}

/// What a client is told about an event: the 202 body and the status resource alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub source: String,
    pub topic: String,
    #[serde(flatten)]
    pub state: State,
}

type Key = (String, String);

struct Entry {
    topic: String,
    fingerprint: u32,
    at_ms: u64,
    /// `None` while the first request is still in progress.
    state: Option<State>,
    done: watch::Sender<bool>,
}

struct Inner {
    entries: HashMap<Key, Entry>,
    /// The latest source per id, so `GET /v1/events/<id>` needs no source.
    latest_source: HashMap<String, String>,
    order: VecDeque<(u64, Key)>,
    log: Option<File>,
    log_lines: usize,
}

pub struct StatusStore {
    inner: Mutex<Inner>,
    path: Option<PathBuf>,
    window: Duration,
    max_entries: usize,
    clock: Clock,
}

/// What `once` made of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Made durable by this request.
    New(Snapshot),
    /// Accepted before: the first answer, with where the event is now.
    Repeat(Snapshot),
    /// The id was accepted before for another topic or payload: that first event.
    Conflict(Snapshot),
}

/// What to do with an incoming event.
enum Begin {
    /// First time seen: make it durable, then call `finish`.
    New,
    /// Seen before: answer with this.
    Known(Snapshot),
    /// The same id with another topic or payload.
    Conflict(Snapshot),
    /// The first request with this id is still in progress: wait, then ask again.
    Wait(watch::Receiver<bool>),
}

#[derive(Serialize, Deserialize)]
struct LogLine {
    id: String,
    source: String,
    topic: String,
    fp: u32,
    at: u64,
    #[serde(flatten)]
    state: State,
}

/// Identifies the payload of an event for conflict detection. Attributes such as `time` are
/// left out: a client retrying with the same Idempotency-Key gets a new `time` from the proxy.
fn fingerprint(event: &EventRecord) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(event.record.topic.as_bytes());
    h.update(&[0]);
    h.update(event.record.key.as_deref().unwrap_or("").as_bytes());
    h.update(&[0]);
    h.update(event.record.value.as_deref().unwrap_or(&[]));
    h.finalize()
}

/// Milliseconds since the epoch, which entries are stamped with and the window is measured
/// in: the system clock, or in tests one that moves only when told to.
#[derive(Debug, Clone)]
enum Clock {
    System,
    #[cfg(test)]
    Manual(std::sync::Arc<std::sync::atomic::AtomicU64>),
}

impl Clock {
    fn now_ms(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            #[cfg(test)]
            Clock::Manual(ms) => ms.load(std::sync::atomic::Ordering::SeqCst),
        }
    }
}

impl StatusStore {
    /// Opens the store, replaying `path` (when given) for entries still in the window.
    pub fn open(path: Option<&Path>, window: Duration, max_entries: usize) -> io::Result<Self> {
        Self::with_clock(path, window, max_entries, Clock::System)
    }

    fn with_clock(
        path: Option<&Path>,
        window: Duration,
        max_entries: usize,
        clock: Clock,
    ) -> io::Result<Self> {
        let store = StatusStore {
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                latest_source: HashMap::new(),
                order: VecDeque::new(),
                log: None,
                log_lines: 0,
            }),
            path: path.map(Path::to_path_buf),
            window,
            max_entries,
            clock,
        };
        if let Some(path) = path {
            store.replay(path)?;
            // Replayed in file order, which compaction does not keep by time.
            store
                .lock()
                .order
                .make_contiguous()
                .sort_unstable_by_key(|(at, _)| *at);
            store.compact()?;
        }
        Ok(store)
    }

    fn replay(&self, path: &Path) -> io::Result<()> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let horizon = self.horizon();
        let mut inner = self.lock();
        for line in BufReader::new(file).lines() {
            // A torn last line from a crash is skipped like any unreadable one.
            let Ok(line) = line else { break };
            let Ok(l) = serde_json::from_str::<LogLine>(&line) else {
                continue;
            };
            if l.at < horizon {
                continue;
            }
            let key = (l.source.clone(), l.id.clone());
            if !inner.entries.contains_key(&key) {
                inner.order.push_back((l.at, key.clone()));
            }
            inner.latest_source.insert(l.id, l.source);
            inner.entries.insert(
                key,
                Entry {
                    topic: l.topic,
                    fingerprint: l.fp,
                    at_ms: l.at,
                    state: Some(l.state),
                    done: watch::Sender::new(true),
                },
            );
        }
        Ok(())
    }

    /// Rewrites the log with the live entries only, then appends to it.
    fn compact(&self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut inner = self.lock();
        let tmp = path.with_extension("log.tmp");
        let mut out = io::BufWriter::new(File::create(&tmp)?);
        let mut lines = 0;
        for ((source, id), e) in &inner.entries {
            if let Some(state) = &e.state {
                write_line(&mut out, id, source, e, state)?;
                lines += 1;
            }
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, path)?;
        inner.log = Some(OpenOptions::new().append(true).open(path)?);
        inner.log_lines = lines;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Accepts an event at most once per `source` + `id` within the window. The first
    /// request runs `make_durable` and records what it made of the event, or forgets the
    /// event when it failed (so that a retry can succeed); a duplicate meanwhile waits for
    /// it, and every later one gets its answer with the event's current status.
    pub async fn once<F, E>(
        &self,
        event: EventRecord,
        make_durable: impl FnOnce(EventRecord) -> F,
    ) -> Result<Accepted, E>
    where
        F: Future<Output = Result<Outcome, E>>,
    {
        let fingerprint = fingerprint(&event);
        if let Some(known) = self.wait_turn(&event, fingerprint).await {
            return Ok(known);
        }
        // The answer needs only the identity; the record (and its body) moves on.
        let (id, source, topic) = (
            event.id.clone(),
            event.source.clone(),
            event.record.topic.clone(),
        );
        match make_durable(event).await {
            Ok(outcome) => {
                self.finish(&id, &source, Some(outcome));
                let state = outcome.into();
                Ok(Accepted::New(Snapshot {
                    id,
                    source,
                    topic,
                    state,
                }))
            }
            Err(e) => {
                self.finish(&id, &source, None);
                Err(e)
            }
        }
    }

    /// `None` once this request may make the event durable; else the answer it gets.
    async fn wait_turn(&self, event: &EventRecord, fingerprint: u32) -> Option<Accepted> {
        loop {
            match self.begin(event, fingerprint) {
                Begin::New => return None,
                Begin::Known(snapshot) => return Some(Accepted::Repeat(snapshot)),
                Begin::Conflict(first) => return Some(Accepted::Conflict(first)),
                Begin::Wait(mut done) => {
                    let _ = done.wait_for(|d| *d).await;
                }
            }
        }
    }

    fn begin(&self, event: &EventRecord, fingerprint: u32) -> Begin {
        let mut inner = self.lock();
        self.expire(&mut inner);
        let key = (event.source.clone(), event.id.clone());
        let Some(e) = inner.entries.get(&key) else {
            insert_in_progress(&mut inner, key, event, fingerprint, self.clock.now_ms());
            return Begin::New;
        };
        let snapshot = |state: &State| Snapshot {
            id: event.id.clone(),
            source: event.source.clone(),
            topic: e.topic.clone(),
            state: state.clone(),
        };
        match &e.state {
            None => Begin::Wait(e.done.subscribe()),
            Some(s) if e.fingerprint != fingerprint || e.topic != event.record.topic => {
                Begin::Conflict(snapshot(s))
            }
            Some(s) => Begin::Known(snapshot(s)),
        }
    }

    /// Ends what `begin` started: records the outcome, or forgets the event when it was not
    /// accepted, and wakes the waiting duplicates.
    fn finish(&self, id: &str, source: &str, outcome: Option<Outcome>) {
        let key = (source.to_owned(), id.to_owned());
        match outcome {
            Some(o) => self.set(&key, State::from(o)),
            None => {
                let mut inner = self.lock();
                if let Some(e) = inner.entries.remove(&key) {
                    e.done.send_replace(true);
                }
                if inner.latest_source.get(id).is_some_and(|s| s == source) {
                    inner.latest_source.remove(id);
                }
            }
        }
    }

    /// The forwarder's update once a spooled event reached Kafka or failed for good.
    pub fn update(&self, id: &str, source: &str, state: State) {
        self.set(&(source.to_owned(), id.to_owned()), state);
    }

    /// Records the state of an event whose request already ended (its entry may be gone):
    /// an in-doubt write that the broker acknowledged after the client heard 503, so that a
    /// retry with the same id gets this answer instead of a second record.
    pub fn record(&self, event: &EventRecord, state: State) {
        let key = (event.source.clone(), event.id.clone());
        {
            let mut inner = self.lock();
            if !inner.entries.contains_key(&key) {
                let at_ms = self.clock.now_ms();
                insert_in_progress(&mut inner, key.clone(), event, fingerprint(event), at_ms);
            }
        }
        self.set(&key, state);
    }

    fn set(&self, key: &Key, state: State) {
        let mut inner = self.lock();
        let Inner {
            entries,
            log,
            log_lines,
            ..
        } = &mut *inner;
        let Some(e) = entries.get_mut(key) else {
            return;
        };
        // The forwarder may record `published` before the request that spooled the event
        // records `spooled`; the later, older news must not win.
        if state == State::Spooled
            && matches!(
                e.state,
                Some(State::Published { .. } | State::Failed { .. })
            )
        {
            e.done.send_replace(true);
            return;
        }
        if let Some(file) = log {
            if let Err(err) = write_line(file, &key.1, &key.0, e, &state) {
                tracing::warn!(error = %err, event_id = %key.1, "status log write failed");
            }
            *log_lines += 1;
        }
        e.state = Some(state);
        e.done.send_replace(true);
        let compact = *log_lines > 4 * entries.len().max(1024);
        drop(inner);
        if compact && let Err(err) = self.compact() {
            tracing::warn!(error = %err, "status log compaction failed");
        }
    }

    /// Events the store holds (settled or in progress).
    pub fn entry_count(&self) -> usize {
        self.lock().entries.len()
    }

    /// The status of an event by id (and source, when ids repeat across sources).
    pub fn get(&self, id: &str, source: Option<&str>) -> Option<Snapshot> {
        let mut inner = self.lock();
        self.expire(&mut inner);
        let source = match source {
            Some(s) => s.to_owned(),
            None => inner.latest_source.get(id)?.clone(),
        };
        let key = (source, id.to_owned());
        let e = inner.entries.get(&key)?;
        Some(Snapshot {
            id: key.1.clone(),
            source: key.0.clone(),
            topic: e.topic.clone(),
            state: e.state.clone()?,
        })
    }

    /// Entries stamped before this are out of the window.
    fn horizon(&self) -> u64 {
        self.clock
            .now_ms()
            .saturating_sub(self.window.as_millis() as u64)
    }

    fn expire(&self, inner: &mut Inner) {
        let horizon = self.horizon();
        while let Some((at, key)) = inner.order.front() {
            // A record whose entry is gone (a refused event) or was re-created later only
            // takes room: drop it without counting it.
            let live = inner.entries.get(key).is_some_and(|e| e.at_ms == *at);
            let over = inner.entries.len() > self.max_entries;
            if live && *at >= horizon && !over {
                break;
            }
            let Some((at, key)) = inner.order.pop_front() else {
                break;
            };
            // Only drop settled entries; one in progress is ended by its request.
            let settled = inner
                .entries
                .get(&key)
                .is_some_and(|e| e.at_ms == at && e.state.is_some());
            if settled {
                inner.entries.remove(&key);
                if inner.latest_source.get(&key.1) == Some(&key.0) {
                    inner.latest_source.remove(&key.1);
                }
            }
        }
    }
}

/// A new entry with no state yet: the event is being made durable.
fn insert_in_progress(
    inner: &mut Inner,
    key: Key,
    event: &EventRecord,
    fingerprint: u32,
    at_ms: u64,
) {
    inner.order.push_back((at_ms, key.clone()));
    inner
        .latest_source
        .insert(event.id.clone(), event.source.clone());
    inner.entries.insert(
        key,
        Entry {
            topic: event.record.topic.clone(),
            fingerprint,
            at_ms,
            state: None,
            done: watch::Sender::new(false),
        },
    );
}

fn write_line(
    out: &mut impl Write,
    id: &str,
    source: &str,
    e: &Entry,
    state: &State,
) -> io::Result<()> {
    let line = LogLine {
        id: id.to_owned(),
        source: source.to_owned(),
        topic: e.topic.clone(),
        fp: e.fingerprint,
        at: e.at_ms,
        state: state.clone(),
    };
    let mut buf = serde_json::to_vec(&line).map_err(io::Error::other)?;
    buf.push(b'\n');
    out.write_all(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::OutRecord;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::sync::oneshot;

    fn ev(id: &str, value: &[u8]) -> EventRecord {
        EventRecord {
            id: id.into(),
            source: "/s".into(),
            record: OutRecord {
                topic: "t".into(),
                key: Some("k".into()),
                headers: vec![("ce_time".into(), "now".into())],
                value: Some(value.to_vec()),
            },
        }
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn first_request_wins_and_duplicates_get_its_answer() {
        let store = StatusStore::open(None, DAY, 100).unwrap();
        let e = ev("a", b"1");
        assert!(matches!(store.begin(&e, fingerprint(&e)), Begin::New));
        assert!(matches!(store.begin(&e, fingerprint(&e)), Begin::Wait(_)));
        let d = Delivered {
            partition: 1,
            offset: 7,
        };
        store.finish("a", "/s", Some(Outcome::Published(d)));
        match store.begin(&e, fingerprint(&e)) {
            Begin::Known(s) => assert_eq!(
                s.state,
                State::Published {
                    partition: 1,
                    offset: 7
                }
            ),
            _ => panic!("expected the first answer"),
        }
        let other = ev("a", b"2");
        assert!(matches!(
            store.begin(&other, fingerprint(&other)),
            Begin::Conflict(_)
        ));
        assert_eq!(store.get("a", None).map(|s| s.topic), Some("t".to_owned()));
        assert!(store.get("zzz", None).is_none());
    }

    #[test]
    fn a_failed_first_attempt_is_forgotten() {
        let store = StatusStore::open(None, DAY, 100).unwrap();
        let e = ev("b", b"1");
        assert!(matches!(store.begin(&e, 1), Begin::New));
        store.finish("b", "/s", None);
        assert!(matches!(store.begin(&e, 1), Begin::New));
    }

    #[test]
    fn states_survive_a_reopen_and_updates_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.log");
        {
            let store = StatusStore::open(Some(&path), DAY, 100).unwrap();
            let e = ev("c", b"1");
            store.begin(&e, fingerprint(&e));
            store.finish("c", "/s", Some(Outcome::Spooled));
            store.update(
                "c",
                "/s",
                State::Published {
                    partition: 0,
                    offset: 3,
                },
            );
        }
        let store = StatusStore::open(Some(&path), DAY, 100).unwrap();
        let e = ev("c", b"1");
        match store.begin(&e, fingerprint(&e)) {
            Begin::Known(s) => assert_eq!(
                s.state,
                State::Published {
                    partition: 0,
                    offset: 3
                }
            ),
            _ => panic!("the entry should have survived the reopen"),
        }
    }

    #[test]
    fn refused_events_leave_nothing_behind() {
        let store = StatusStore::open(None, DAY, 3).unwrap();
        for i in 0..1000 {
            let e = ev(&format!("r{i}"), b"1");
            store.begin(&e, 1);
            store.finish(&e.id, "/s", None);
        }
        let kept = ev("kept", b"1");
        store.begin(&kept, 1);
        store.finish("kept", "/s", Some(Outcome::Spooled));
        // Refusals neither evict the accepted id nor stay in memory.
        assert!(store.get("kept", None).is_some());
        let inner = store.lock();
        assert_eq!(inner.entries.len(), 1);
        assert_eq!(inner.latest_source.len(), 1);
        assert!(inner.order.len() <= 2, "{}", inner.order.len());
    }

    #[test]
    fn a_late_spooled_does_not_overwrite_published() {
        let store = StatusStore::open(None, DAY, 10).unwrap();
        let e = ev("p", b"1");
        store.begin(&e, 1);
        store.update(
            "p",
            "/s",
            State::Published {
                partition: 0,
                offset: 1,
            },
        );
        store.finish("p", "/s", Some(Outcome::Spooled));
        assert_eq!(
            store.get("p", None).map(|s| s.state),
            Some(State::Published {
                partition: 0,
                offset: 1
            })
        );
    }

    #[test]
    fn the_window_and_the_size_bound_expire_entries() {
        let store = StatusStore::open(None, DAY, 2).unwrap();
        for id in ["x", "y", "z"] {
            let e = ev(id, b"1");
            store.begin(&e, 1);
            store.finish(id, "/s", Some(Outcome::Spooled));
        }
        store.get("z", None);
        assert!(store.get("x", None).is_none());
        assert!(store.get("z", None).is_some());
        for window in [Duration::ZERO, Duration::from_secs(60)] {
            let ms = Arc::new(AtomicU64::new(1_000_000));
            let clock = Clock::Manual(ms.clone());
            let store = StatusStore::with_clock(None, window, 100, clock).unwrap();
            let e = ev("w", b"1");
            store.begin(&e, 1);
            store.finish("w", "/s", Some(Outcome::Spooled));
            ms.fetch_add(window.as_millis() as u64, Ordering::SeqCst);
            assert!(
                store.get("w", None).is_some(),
                "{window:?}: at the window's end"
            );
            ms.fetch_add(1, Ordering::SeqCst);
            assert!(
                store.get("w", None).is_none(),
                "{window:?}: past the window"
            );
        }
    }

    #[tokio::test]
    async fn once_makes_an_event_durable_once() {
        let store = Arc::new(StatusStore::open(None, DAY, 100).unwrap());
        let e = ev("o", b"1");
        let (started_tx, started_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel::<()>();
        let first = tokio::spawn({
            let (store, e) = (store.clone(), e.clone());
            async move {
                let durable = |_| async move {
                    let _ = started_tx.send(());
                    let _ = release_rx.await;
                    Ok::<_, ()>(Outcome::Spooled)
                };
                store.once(e, durable).await
            }
        });
        started_rx.await.unwrap();
        assert!(matches!(store.begin(&e, fingerprint(&e)), Begin::Wait(_)));
        let second = tokio::spawn({
            let (store, e) = (store.clone(), e.clone());
            async move {
                let never = |_| async { panic!("a duplicate must not be made durable") };
                store.once::<_, ()>(e, never).await
            }
        });
        release_tx.send(()).unwrap();
        let snapshot = Snapshot {
            id: "o".into(),
            source: "/s".into(),
            topic: "t".into(),
            state: State::Spooled,
        };
        assert_eq!(first.await.unwrap(), Ok(Accepted::New(snapshot.clone())));
        assert_eq!(
            second.await.unwrap(),
            Ok(Accepted::Repeat(snapshot.clone()))
        );
        let other = ev("o", b"2");
        let never = |_| async { panic!("a conflict must not be made durable") };
        assert_eq!(
            store.once::<_, ()>(other, never).await,
            Ok(Accepted::Conflict(snapshot))
        );
    }

    #[tokio::test]
    async fn once_forgets_a_failed_attempt() {
        let store = StatusStore::open(None, DAY, 100).unwrap();
        let e = ev("f", b"1");
        let failed = store.once(e.clone(), |_| async { Err::<Outcome, _>("down") });
        assert_eq!(failed.await, Err("down"));
        assert!(store.get("f", None).is_none());
        let retried = store.once(e, |_| async { Ok::<_, ()>(Outcome::Spooled) });
        assert!(matches!(retried.await, Ok(Accepted::New(_))));
        assert_eq!(store.get("f", None).map(|s| s.state), Some(State::Spooled));
    }

    #[test]
    fn snapshot_json_matches_the_202_body() {
        let s = Snapshot {
            id: "i".into(),
            source: "/s".into(),
            topic: "t".into(),
            state: State::Published {
                partition: 2,
                offset: 9,
            },
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"id":"i","source":"/s","topic":"t","status":"published","partition":2,"offset":9}"#
        );
        let spooled = Snapshot {
            state: State::Spooled,
            ..s
        };
        assert_eq!(
            serde_json::to_string(&spooled).unwrap(),
            r#"{"id":"i","source":"/s","topic":"t","status":"spooled"}"#
        );
    }
}
