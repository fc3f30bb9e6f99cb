//! Task events: revocations and expiries, pushed to whoever holds something of a task (SSH
//! sessions, proxy and MCP streams; later the console and minted provider keys) instead of each
//! polling the store.
//!
//! What runs here: in memory on the executor thread. [`TaskEvents::publish`] appends to a small
//! ring (the last [`RING`] events, each with a sequence number) and wakes every listener; a
//! subscriber keeps its cursor and reads what it missed with [`TaskEvents::since`], or learns it
//! fell behind and must re-check what it holds. Waiting for one task to end is
//! `TaskStore::until_unusable`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use event_listener::{Event, EventListener};
use ulid::Ulid;

/// Events kept for subscribers that fall behind.
pub const RING: usize = 256;

/// Something that ended tasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskEvent {
    /// `task` was revoked, and with it `descendants` live tasks below it.
    Revoked {
        /// The task revoked.
        task: Ulid,
        /// Live descendants it took along.
        descendants: usize,
    },
    /// Expired tasks were removed from the store.
    Expired {
        /// How many.
        tasks: usize,
    },
}

/// A subscriber fell more than [`RING`] events behind: it must re-check everything it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lagged;

/// The event ring.
#[derive(Default)]
pub struct TaskEvents {
    ring: RefCell<VecDeque<(u64, TaskEvent)>>,
    next: Cell<u64>,
    wake: Event,
}

impl TaskEvents {
    /// Records `e` and wakes every listener.
    pub fn publish(&self, e: TaskEvent) {
        let seq = self.next.get();
        self.next.set(seq + 1);
        let mut ring = self.ring.borrow_mut();
        if ring.len() == RING {
            ring.pop_front();
        }
        ring.push_back((seq, e));
        drop(ring);
        self.wake.notify(usize::MAX);
    }

    /// The cursor of a subscriber that starts now.
    pub fn cursor(&self) -> u64 {
        self.next.get()
    }

    /// Events at or after `cursor`, and the next cursor.
    pub fn since(&self, cursor: u64) -> Result<(Vec<TaskEvent>, u64), Lagged> {
        let ring = self.ring.borrow();
        let next = self.next.get();
        if cursor < next && ring.front().is_none_or(|(first, _)| *first > cursor) {
            return Err(Lagged);
        }
        let events = ring.iter().filter(|(s, _)| *s >= cursor).map(|(_, e)| e.clone()).collect();
        Ok((events, next))
    }

    /// A listener woken by the next event. Create it, re-check, then await it (no lost wake-up).
    pub fn listen(&self) -> EventListener {
        self.wake.listen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_read_what_they_missed_or_learn_they_lagged() {
        let ev = TaskEvents::default();
        let start = ev.cursor();
        let t = Ulid::from_parts(1, 1);
        let listener = ev.listen();
        ev.publish(TaskEvent::Revoked { task: t, descendants: 2 });
        crate::broker::reactor::block_on(listener); // woken
        let (got, next) = ev.since(start).unwrap();
        assert_eq!(got, vec![TaskEvent::Revoked { task: t, descendants: 2 }]);
        assert_eq!(ev.since(next).unwrap().0, vec![]);
        for i in 0..RING + 1 {
            ev.publish(TaskEvent::Expired { tasks: i });
        }
        assert_eq!(ev.since(next), Err(Lagged), "fell behind the ring");
        assert_eq!(ev.since(ev.cursor()).unwrap().0, vec![]);
    }
}
