//! Deadlines that share one wait: the timeouts every request carries (reading its headers and
//! body, waiting for a remote's answer) almost never fire, yet a timer of their own for each
//! would cost a timerfd re-arm (and with async-io a reactor notification) per request. Here each
//! [`Deadline`] only enters a sorted table; the thread's reactor (`reactor::block_on`) sleeps no
//! longer than the earliest entry ([`next`]) and wakes what has expired ([`fire`]).
//!
//! What runs here: table updates and expiry on the thread that polls the deadlines. On a thread
//! whose reactor is not driven (a foreign `block_on`), a deadline is a plain `async_io::Timer`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Table {
    /// Pending deadlines by (instant, id), with the waker of the future that waits for each.
    entries: BTreeMap<(Instant, u64), Waker>,
    next_id: u64,
}

thread_local! {
    static TABLE: RefCell<Table> = RefCell::default();
}

/// A future that completes at `when`: in the shared table when this thread's reactor is driven,
/// else on a timer of its own.
#[derive(Debug)]
pub struct Deadline {
    when: Instant,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Not polled yet.
    New,
    /// In the table under this id.
    Listed(u64),
    /// The reactor is not driven on this thread: a timer of its own.
    Own(async_io::Timer),
    Done,
}

impl Deadline {
    /// Completes at `when`.
    pub fn at(when: Instant) -> Self {
        Self { when, state: State::New }
    }

    /// Completes after `d`.
    pub fn after(d: Duration) -> Self {
        Self::at(Instant::now() + d)
    }

    fn unlist(&mut self) {
        if let State::Listed(id) = self.state {
            let key = (self.when, id);
            let _ = TABLE.try_with(|t| t.borrow_mut().entries.remove(&key));
        }
        self.state = State::Done;
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let State::Own(timer) = &mut this.state {
            return Pin::new(timer).poll(cx).map(|_| ());
        }
        if matches!(this.state, State::Done) || Instant::now() >= this.when {
            this.unlist();
            return Poll::Ready(());
        }
        let when = this.when;
        if !crate::broker::reactor::driven() {
            let mut timer = async_io::Timer::at(when);
            let r = Pin::new(&mut timer).poll(cx).map(|_| ());
            this.state = State::Own(timer);
            return r;
        }
        TABLE.with(|t| {
            let mut t = t.borrow_mut();
            let id = match this.state {
                State::Listed(id) => id,
                _ => {
                    t.next_id += 1;
                    let id = t.next_id;
                    this.state = State::Listed(id);
                    id
                }
            };
            match t.entries.get_mut(&(when, id)) {
                Some(w) if w.will_wake(cx.waker()) => {}
                Some(w) => w.clone_from(cx.waker()),
                None => {
                    t.entries.insert((when, id), cx.waker().clone());
                }
            }
        });
        Poll::Pending
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.unlist();
    }
}

impl hyper::rt::Sleep for Deadline {}

/// `f`'s output, or `None` when `when` comes first.
pub async fn before<T>(when: Instant, f: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(f.await) }, async {
        Deadline::at(when).await;
        None
    })
    .await
}

/// `f`'s output, or `None` when it takes longer than `d`.
pub async fn within<T>(d: Duration, f: impl Future<Output = T>) -> Option<T> {
    before(Instant::now() + d, f).await
}

/// hyper's timer (header read timeouts) on the shared table.
#[derive(Clone, Copy, Debug, Default)]
pub struct HyperTimer;

impl hyper::rt::Timer for HyperTimer {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline::after(d))
    }

    fn sleep_until(&self, when: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline::at(when))
    }
}

/// The earliest pending deadline of this thread (the reactor sleeps no longer).
pub fn next() -> Option<Instant> {
    TABLE.try_with(|t| t.borrow().entries.first_key_value().map(|((w, _), _)| *w)).ok().flatten()
}

/// Wakes every deadline of this thread that is due at `now`.
pub fn fire(now: Instant) {
    let expired: Vec<Waker> = TABLE
        .try_with(|t| {
            let mut t = t.borrow_mut();
            let mut expired = Vec::new();
            while let Some(entry) = t.entries.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                expired.push(entry.remove());
            }
            expired
        })
        .unwrap_or_default();
    for w in expired {
        w.wake();
    }
}

/// The reactor stopped being driven on this thread: the entries go back to their futures, which
/// then arm timers of their own.
pub(crate) fn undriven() {
    let wakers: Vec<Waker> =
        TABLE.try_with(|t| std::mem::take(&mut t.borrow_mut().entries).into_values().collect()).unwrap_or_default();
    for w in wakers {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    fn run_local<T>(f: impl Future<Output = T>) -> T {
        crate::broker::reactor::block_on(f)
    }

    #[test]
    fn deadlines_fire_in_order_and_dropped_ones_never() {
        let fired = Rc::new(RefCell::new(Vec::new()));
        run_local(async {
            let ex = smol::LocalExecutor::new();
            let start = Instant::now();
            let mut tasks = Vec::new();
            for (i, ms) in [60u64, 20, 40].into_iter().enumerate() {
                let fired = fired.clone();
                tasks.push(ex.spawn(async move {
                    Deadline::after(Duration::from_millis(ms)).await;
                    fired.borrow_mut().push((i, start.elapsed()));
                }));
            }
            // One that is dropped before its time leaves nothing behind.
            let dropped = ex.spawn(async { Deadline::after(Duration::from_millis(30)).await });
            ex.run(async {
                Deadline::after(Duration::from_millis(5)).await;
                drop(dropped);
                for t in tasks {
                    t.await;
                }
            })
            .await;
        });
        let fired = fired.borrow();
        assert_eq!(fired.iter().map(|f| f.0).collect::<Vec<_>>(), vec![1, 2, 0]);
        for (i, at) in fired.iter() {
            let want = Duration::from_millis([60, 20, 40][*i]);
            assert!(*at >= want, "deadline {i} fired early: {at:?} < {want:?}");
        }
        assert!(TABLE.with(|t| t.borrow().entries.is_empty()), "entries left in the table");
    }

    #[test]
    fn an_earlier_deadline_shortens_the_wait_and_without_a_driven_reactor_a_timer_serves() {
        run_local(async {
            // The reactor sleeps until the 500 ms one; the 20 ms one must still fire on time.
            let long = Deadline::after(Duration::from_millis(500));
            let short = Deadline::after(Duration::from_millis(20));
            let start = Instant::now();
            futures_lite::future::or(long, short).await;
            assert!(start.elapsed() < Duration::from_millis(400), "{:?}", start.elapsed());
        });
        // The reactor is not driven on this thread (a foreign block_on): a plain timer.
        let start = Instant::now();
        smol::block_on(Deadline::after(Duration::from_millis(10)));
        assert!(start.elapsed() >= Duration::from_millis(10));
    }
}
