//! Coalescing, host-free: events of one rule that arrive while its callouts are in flight
//! wait, and the next free callout takes them all to the sidecar as one
//! `application/cloudevents-batch+json` request. The sidecar's one answer is split back
//! into each event's answer, which its own request then gets as if it had called alone.
//!
//! A lone event (nothing waiting, a callout free) still goes at once in binary mode from its
//! own request: batching adds no wait when there is no load, and takes the per-callout cost
//! (an HTTP exchange in the proxy, one request in the sidecar) off each event under load.
//!
//! Only Envoy: answering one request from another's callout needs
//! `proxy_set_effective_context`, which Kong's engine accepts and ignores.

use crate::answer::Answer;
use crate::config::Batching;
use eventwire_contract::problem;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::VecDeque;

/// One event waiting for a callout: the request it belongs to and the event in the JSON
/// format (`callout::structured`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub context_id: u32,
    pub event: Vec<u8>,
}

/// A callout carrying the events of one rule.
#[derive(Debug)]
pub struct Batch {
    pub rule: usize,
    pub waiting: Vec<Waiting>,
    /// When its callout went (host clock), for the round-trip histogram.
    pub sent_nanos: u64,
}

impl Batch {
    /// The JSON batch format: the events, in order.
    pub fn body(&self) -> Vec<u8> {
        let len = self
            .waiting
            .iter()
            .map(|w| w.event.len() + 1)
            .sum::<usize>()
            + 2;
        let mut body = Vec::with_capacity(len);
        body.push(b'[');
        for (i, w) in self.waiting.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&w.event);
        }
        body.push(b']');
        body
    }
}

#[derive(Default)]
struct Lane {
    in_flight: usize,
    queue: VecDeque<Waiting>,
}

pub struct Coalescer {
    limits: Batching,
    /// The largest batch body: the sidecar refuses a larger request as a whole.
    max_bytes: usize,
    lanes: Vec<Lane>,
    /// A wake-up is on its way to the root context; one is enough for any number of events.
    wake_pending: bool,
    /// Batches in flight by callout token.
    sent: Vec<(u32, Batch)>,
}

impl Coalescer {
    pub fn new(limits: Batching, max_bytes: usize, rules: usize) -> Coalescer {
        Coalescer {
            limits,
            max_bytes,
            lanes: (0..rules).map(|_| Lane::default()).collect(),
            wake_pending: false,
            sent: Vec::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.limits.max_events > 1
    }

    /// Whether a new event of `rule` takes a callout of its own now (then counted in
    /// flight until [`Coalescer::done`]); otherwise it must [`Coalescer::wait`].
    pub fn direct(&mut self, rule: usize) -> bool {
        let max = self.limits.max_in_flight;
        match self.lanes.get_mut(rule) {
            Some(lane) if lane.queue.is_empty() && lane.in_flight < max => {
                lane.in_flight += 1;
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Queues an event; `true` when the root context must be woken to send it.
    pub fn wait(&mut self, rule: usize, waiting: Waiting) -> bool {
        match self.lanes.get_mut(rule) {
            Some(lane) => lane.queue.push_back(waiting),
            None => return false,
        }
        !std::mem::replace(&mut self.wake_pending, true)
    }

    /// Takes the last event queued for `rule` back (it could not wait after all).
    pub fn take_back(&mut self, rule: usize) -> Option<Waiting> {
        self.lanes.get_mut(rule)?.queue.pop_back()
    }

    /// A direct callout of `rule` ended (answered, or its request went away); `true` when
    /// the root context must be woken for the events waiting.
    pub fn done(&mut self, rule: usize) -> bool {
        let Some(lane) = self.lanes.get_mut(rule) else {
            return false;
        };
        lane.in_flight = lane.in_flight.saturating_sub(1);
        !lane.queue.is_empty() && !std::mem::replace(&mut self.wake_pending, true)
    }

    /// The root context runs now; later events need a new wake-up.
    pub fn woken(&mut self) {
        self.wake_pending = false;
    }

    /// The next batch to send: the waiting events of a rule with a callout free, in order,
    /// up to `max_events` and the byte limit (at least one). Counted in flight.
    pub fn next_batch(&mut self) -> Option<Batch> {
        let (max_events, max_in_flight) = (self.limits.max_events, self.limits.max_in_flight);
        let (rule, lane) = self
            .lanes
            .iter_mut()
            .enumerate()
            .find(|(_, l)| !l.queue.is_empty() && l.in_flight < max_in_flight)?;
        let mut waiting = Vec::new();
        let mut bytes = 2;
        while let Some(next) = lane.queue.front() {
            let size = next.event.len() + 1;
            if !waiting.is_empty() && (waiting.len() == max_events || bytes + size > self.max_bytes)
            {
                break;
            }
            bytes += size;
            waiting.extend(lane.queue.pop_front());
        }
        lane.in_flight += 1;
        Some(Batch {
            rule,
            waiting,
            sent_nanos: 0,
        })
    }

    pub fn sent(&mut self, token: u32, batch: Batch) {
        self.sent.push((token, batch));
    }

    /// The batch a callout answer belongs to (no longer in flight).
    pub fn answered(&mut self, token: u32) -> Option<Batch> {
        let at = self.sent.iter().position(|(t, _)| *t == token)?;
        let (_, batch) = self.sent.swap_remove(at);
        self.unsent(&batch);
        Some(batch)
    }

    /// A batch that could not be sent, or whose answer came: its callout is free again.
    pub fn unsent(&mut self, batch: &Batch) {
        if let Some(lane) = self.lanes.get_mut(batch.rule) {
            lane.in_flight = lane.in_flight.saturating_sub(1);
        }
    }

    /// Events to go again, ahead of the later ones.
    pub fn requeue(&mut self, rule: usize, waiting: Vec<Waiting>) {
        if let Some(lane) = self.lanes.get_mut(rule) {
            for w in waiting.into_iter().rev() {
                lane.queue.push_front(w);
            }
        }
    }
}

/// What each event of a batch gets from the sidecar's one answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Split<'a> {
    /// One answer per event, in batch order.
    Each(Vec<Answer<'a>>),
    /// The same answer for every event (a refusal of the whole batch, or no answer).
    All,
    /// The sidecar refused the batch for the event at `index` alone: that event gets the
    /// answer, the others go again.
    One { index: usize },
}

/// Splits the sidecar's answer to a batch of `events` events.
pub fn split<'a>(answer: &'a Answer<'_>, events: usize) -> Split<'a> {
    match answer.status {
        Some(202 | 207) => each(&answer.body, events).map_or(Split::All, Split::Each),
        Some(400..=599) if answer.is_problem() => {
            let index = serde_json::from_slice::<Value>(&answer.body)
                .ok()
                .and_then(|p| p.get("index")?.as_u64());
            match index {
                Some(i) if (i as usize) < events && events > 1 => Split::One { index: i as usize },
                _ => Split::All,
            }
        }
        _ => Split::All,
    }
}

fn each(body: &[u8], events: usize) -> Option<Vec<Answer<'_>>> {
    let items = array_items(body, b"{\"events\":")?;
    if items.len() != events {
        return None;
    }
    items.into_iter().map(event_answer).collect()
}

/// An accepted event gets what the sidecar answers for one event alone: `202`, the event's
/// JSON as the sidecar wrote it and its `Location`; a refused one its problem.
fn event_answer(raw: &[u8]) -> Option<Answer<'_>> {
    let item: Value = serde_json::from_slice(raw).ok()?;
    match item.get("problem") {
        Some(p) => {
            let status = u16::try_from(p.get("status")?.as_u64()?).ok()?;
            Some(Answer {
                status: Some(status),
                content_type: Some(Cow::Borrowed(problem::CONTENT_TYPE.as_bytes())),
                retry_after: (status == 503)
                    .then_some(Cow::Borrowed(problem::RETRY_AFTER_SECONDS.as_bytes())),
                body: Cow::Owned(serde_json::to_vec(p).ok()?),
                ..Answer::default()
            })
        }
        None => Some(Answer {
            status: Some(202),
            content_type: Some(Cow::Borrowed(b"application/json")),
            location: Some(Cow::Owned(
                eventwire_contract::event_location(item.get("id")?.as_str()?).into_bytes(),
            )),
            body: Cow::Borrowed(raw),
            ..Answer::default()
        }),
    }
}

/// The items of the JSON array that follows `prefix` (the sidecar's compact answer), as
/// the bytes they are written with: a scan for the commas between them at depth one, minding
/// strings. `None` unless the body is exactly `prefix[...]}`.
fn array_items<'a>(body: &'a [u8], prefix: &[u8]) -> Option<Vec<&'a [u8]>> {
    let rest = body.strip_prefix(prefix)?.strip_suffix(b"}")?;
    let inner = rest.strip_prefix(b"[")?.strip_suffix(b"]")?;
    let mut items = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut start) = (0usize, false, false, 0);
    for (i, &b) in inner.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.checked_sub(1)?,
            b',' if depth == 0 => {
                items.push(inner[start..i].trim_ascii());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 || in_string {
        return None;
    }
    if start < inner.len() {
        items.push(inner[start..].trim_ascii());
    }
    Some(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const LIMITS: Batching = Batching {
        max_events: 3,
        max_in_flight: 2,
    };

    fn w(id: u32) -> Waiting {
        Waiting {
            context_id: id,
            event: format!(r#"{{"id":"{id}"}}"#).into_bytes(),
        }
    }

    fn ids(b: &Batch) -> Vec<u32> {
        b.waiting.iter().map(|w| w.context_id).collect()
    }

    #[test]
    fn events_go_alone_until_the_callouts_are_taken_then_together() {
        let mut c = Coalescer::new(LIMITS, 1 << 20, 2);
        assert!(c.direct(0) && c.direct(0), "two callouts free");
        assert!(!c.direct(0), "both taken: wait");
        assert!(c.direct(1), "another rule has its own callouts");
        assert!(c.wait(0, w(1)), "the first waiting event wakes the root");
        assert!(!c.wait(0, w(2)), "one wake-up is enough");
        for id in 3..=5 {
            c.wait(0, w(id));
        }
        assert!(!c.direct(0), "events wait behind the queue, in order");
        c.woken();
        assert!(c.next_batch().is_none(), "no callout free yet");
        assert!(c.done(0), "a callout ended with events waiting: wake");
        c.woken();
        let b = c.next_batch().unwrap();
        assert_eq!(
            (b.rule, ids(&b)),
            (0, vec![1, 2, 3]),
            "max_events per batch"
        );
        assert_eq!(b.body(), br#"[{"id":"1"},{"id":"2"},{"id":"3"}]"#);
        assert!(c.next_batch().is_none(), "both callouts taken again");
        c.sent(7, b);
        let b = c.answered(7).unwrap();
        assert!(c.answered(7).is_none());
        c.requeue(0, b.waiting);
        assert_eq!(
            ids(&c.next_batch().unwrap()),
            vec![1, 2, 3],
            "requeued first"
        );
        assert!(c.next_batch().is_none(), "the queue is empty");
    }

    #[test]
    fn a_batch_stays_under_the_byte_limit_but_takes_one_event_always() {
        let mut c = Coalescer::new(
            Batching {
                max_events: 64,
                max_in_flight: 1,
            },
            30,
            1,
        );
        c.wait(0, w(1));
        c.wait(0, w(22));
        c.wait(0, w(333));
        c.wait(
            0,
            Waiting {
                context_id: 4,
                event: vec![b'x'; 100],
            },
        );
        let b = c.next_batch().unwrap();
        assert_eq!(ids(&b), vec![1, 22], "2 + 9 + 10 bytes fit, the third not");
        c.unsent(&b);
        assert_eq!(ids(&c.next_batch().unwrap()), vec![333]);
        c.done(0);
        assert_eq!(ids(&c.next_batch().unwrap()), vec![4], "too big, alone");
    }

    fn answer(status: u16, content_type: &'static str, body: &'static str) -> Answer<'static> {
        Answer {
            status: Some(status),
            content_type: Some(Cow::Borrowed(content_type.as_bytes())),
            body: Cow::Borrowed(body.as_bytes()),
            ..Answer::default()
        }
    }

    #[test]
    fn answers_split_per_event() {
        let ok = answer(
            207,
            "application/json",
            r#"{"events":[{"id":"a b","source":"/s","topic":"t","status":"published","partition":0,"offset":5},
                {"id":"b","source":"/s","problem":{"type":"urn:eventwire:problem:idempotency-conflict","status":409}},
                {"id":"c","source":"/s","problem":{"type":"urn:eventwire:problem:spool-full","status":503}}]}"#,
        );
        let Split::Each(each) = split(&ok, 3) else {
            panic!("{:?}", split(&ok, 3));
        };
        assert_eq!(each[0].status, Some(202));
        assert_eq!(
            &*each[0].body,
            br#"{"id":"a b","source":"/s","topic":"t","status":"published","partition":0,"offset":5}"#,
            "the event's JSON as the sidecar wrote it"
        );
        assert_eq!(each[0].location.as_deref(), Some(&b"/v1/events/a%20b"[..]));
        assert_eq!(
            (each[1].status, each[1].retry_after.as_deref()),
            (Some(409), None)
        );
        assert!(each[1].is_problem());
        let p: Value = serde_json::from_slice(&each[1].body).unwrap();
        assert_eq!(p["type"], "urn:eventwire:problem:idempotency-conflict");
        assert_eq!(each[2].retry_after.as_deref(), Some(&b"1"[..]));
        assert_eq!(split(&ok, 2), Split::All, "an answer for other events");

        let one = answer(
            400,
            problem::CONTENT_TYPE,
            r#"{"type":"urn:eventwire:problem:invalid-cloudevent","status":400,"index":1}"#,
        );
        assert_eq!(split(&one, 3), Split::One { index: 1 });
        assert_eq!(split(&one, 1), Split::All);
        let all = answer(404, problem::CONTENT_TYPE, r#"{"status":404}"#);
        assert_eq!(split(&all, 3), Split::All);
        let unavailable = Answer::default();
        assert_eq!(split(&unavailable, 3), Split::All);
        assert_eq!(split(&answer(202, "application/json", "{"), 1), Split::All);
        let tricky = answer(
            202,
            "application/json",
            r#"{"events":[{"id":"a,]}\"b","source":"/s"},{"id":"c","source":"/s"}]}"#,
        );
        let Split::Each(each) = split(&tricky, 2) else {
            panic!("commas and brackets in strings are not separators");
        };
        assert_eq!(
            each[0].location.as_deref(),
            Some(&b"/v1/events/a%2C%5D%7D%22b"[..])
        );
    }
}
