//! Lifecycle events for subscribers (CRI `GetContainerEvents`).
//!
//! Container events come from the manager's own operations (created, started, deleted) and
//! from the agent's event log (exits), pod events from pod operations and the VMM supervisor.
//! Each subscriber gets a bounded channel; a subscriber that does not keep up loses events
//! (counted in the log) rather than making the manager block or grow without bound.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;

use crate::lock;

/// Events buffered per subscriber.
pub const SUBSCRIBER_CAPACITY: usize = 1024;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Created (a pod: its VM is ready).
    Created,
    /// Started.
    Started,
    /// Stopped: a container exited, a pod's VM stopped or died.
    Stopped,
    /// Removed.
    Deleted,
}

/// One event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerEvent {
    /// The pod.
    pub pod_id: String,
    /// The container; `None` for an event of the pod itself.
    pub container_id: Option<String>,
    /// What happened.
    pub kind: EventKind,
    /// Unix nanoseconds.
    pub timestamp_nanos: i64,
}

impl ContainerEvent {
    /// A container event, timestamped now.
    pub fn container(pod_id: &str, container_id: &str, kind: EventKind) -> Self {
        ContainerEvent {
            pod_id: pod_id.into(),
            container_id: Some(container_id.into()),
            kind,
            timestamp_nanos: crate::now_nanos(),
        }
    }

    /// A pod event, timestamped now.
    pub fn pod(pod_id: &str, kind: EventKind) -> Self {
        ContainerEvent {
            pod_id: pod_id.into(),
            container_id: None,
            kind,
            timestamp_nanos: crate::now_nanos(),
        }
    }
}

/// The subscribers.
#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<SyncSender<ContainerEvent>>>,
}

impl EventBus {
    /// A new subscription.
    pub fn subscribe(&self) -> Receiver<ContainerEvent> {
        let (tx, rx) = sync_channel(SUBSCRIBER_CAPACITY);
        lock(&self.subscribers).push(tx);
        rx
    }

    /// Sends to every subscriber; drops subscribers that went away.
    pub fn publish(&self, event: ContainerEvent) {
        log::debug!("event {event:?}");
        lock(&self.subscribers).retain(|tx| match tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                log::warn!("an event subscriber is not keeping up: dropping {event:?}");
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// Sends several events in order.
    pub fn publish_all(&self, events: impl IntoIterator<Item = ContainerEvent>) {
        for e in events {
            self.publish(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_out_and_pruning() {
        let bus = EventBus::default();
        let a = bus.subscribe();
        let b = bus.subscribe();
        bus.publish(ContainerEvent::container("p", "c", EventKind::Started));
        assert_eq!(a.try_recv().unwrap().kind, EventKind::Started);
        assert_eq!(b.try_recv().unwrap().container_id.as_deref(), Some("c"));
        drop(b);
        bus.publish(ContainerEvent::pod("p", EventKind::Stopped));
        assert_eq!(lock(&bus.subscribers).len(), 1);
        let e = a.try_recv().unwrap();
        assert_eq!((e.container_id, e.kind), (None, EventKind::Stopped));
    }

    #[test]
    fn a_slow_subscriber_loses_events_without_blocking() {
        let bus = EventBus::default();
        let rx = bus.subscribe();
        for _ in 0..SUBSCRIBER_CAPACITY + 10 {
            bus.publish(ContainerEvent::pod("p", EventKind::Created));
        }
        assert_eq!(rx.try_iter().count(), SUBSCRIBER_CAPACITY);
    }
}
