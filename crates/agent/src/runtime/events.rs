//! The agent's event log: container and process lifecycle events with sequence numbers.
//!
//! The host reads it with `GetEvents(after_seq)`, a long poll it repeats to form a stream. The
//! log is bounded ([`protocol::EVENT_LOG_CAPACITY`]); a reader that falls behind is told how
//! many events it missed instead of blocking the agent.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::unix_nanos;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Started,
    Exited {
        exit_code: i32,
        signal: i32,
        oom_killed: bool,
    },
    Oom,
    Removed,
    Paused,
    Resumed,
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub kind: EventKind,
    pub container_id: String,
    /// "" for the container's init process.
    pub exec_id: String,
    pub pid: u32,
    pub timestamp_unix_nanos: i64,
}

/// What [`EventLog::after`] returns.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EventBatch {
    pub events: Vec<Event>,
    /// Events after the requested seq that the log no longer holds.
    pub dropped: u64,
    /// The highest seq assigned so far.
    pub last_seq: u64,
}

#[derive(Debug, Default)]
struct Log {
    events: VecDeque<Event>,
    last_seq: u64,
}

/// A bounded, sequence-numbered event log with waiting readers.
#[derive(Debug)]
pub struct EventLog {
    capacity: usize,
    log: Mutex<Log>,
    changed: Condvar,
}

impl EventLog {
    pub fn new(capacity: usize) -> EventLog {
        EventLog {
            capacity: capacity.max(1),
            log: Mutex::new(Log::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends an event; returns its seq.
    pub fn publish(&self, kind: EventKind, container_id: &str, exec_id: &str, pid: u32) -> u64 {
        let mut log = self.lock();
        log.last_seq += 1;
        let seq = log.last_seq;
        log.events.push_back(Event {
            seq,
            kind,
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            pid,
            timestamp_unix_nanos: unix_nanos(),
        });
        while log.events.len() > self.capacity {
            log.events.pop_front();
        }
        drop(log);
        self.changed.notify_all();
        seq
    }

    /// Up to `max` events with seq > `after`, waiting up to `wait` while there are none.
    pub fn after(&self, after: u64, max: usize, wait: Duration) -> EventBatch {
        let deadline = Instant::now() + wait;
        let mut log = self.lock();
        while log.last_seq <= after {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            log = self
                .changed
                .wait_timeout(log, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let oldest = log.events.front().map_or(log.last_seq + 1, |e| e.seq);
        // Events after..oldest (exclusive) are gone.
        let dropped = oldest.saturating_sub(after.saturating_add(1));
        let events = log
            .events
            .iter()
            .filter(|e| e.seq > after)
            .take(max)
            .cloned()
            .collect();
        EventBatch {
            events,
            dropped,
            last_seq: log.last_seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    #[test]
    fn sequence_and_overflow() {
        let log = EventLog::new(3);
        for i in 0..5 {
            log.publish(EventKind::Started, "c", "", i);
        }
        let b = log.after(0, 10, Duration::ZERO);
        assert_eq!(b.last_seq, 5);
        assert_eq!(b.dropped, 2);
        assert_eq!(
            b.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        let b = log.after(3, 1, Duration::ZERO);
        assert_eq!((b.events.len(), b.events[0].seq, b.dropped), (1, 4, 0));
        let b = log.after(5, 10, Duration::ZERO);
        assert!(b.events.is_empty());
        assert_eq!(b.dropped, 0);
    }

    #[test]
    fn waits_for_an_event() {
        let log = Arc::new(EventLog::new(8));
        let writer = log.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            writer.publish(
                EventKind::Exited {
                    exit_code: 3,
                    signal: 0,
                    oom_killed: false,
                },
                "c",
                "e1",
                7,
            );
        });
        let b = log.after(0, 10, Duration::from_secs(10));
        t.join().unwrap();
        assert_eq!(b.events.len(), 1);
        assert_eq!(b.events[0].exec_id, "e1");
    }
}
