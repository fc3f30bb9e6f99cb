//! A small, bounded pool for blocking work (Argon2 hashing, fsync), so the executor never stalls.
//!
//! What runs here: up to `threads` OS threads named `ephyr-blocking`, started lazily on first use,
//! fed from a bounded queue. A full queue makes callers wait (backpressure) rather than spawning
//! more threads: on a 1 vCPU / 512 MB box a burst of password hashes must queue, not fan out.

use std::sync::{Arc, Mutex};
use std::thread;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// The pool. Cheap to clone.
#[derive(Clone)]
pub struct BlockingPool {
    tx: async_channel::Sender<Job>,
    rx: async_channel::Receiver<Job>,
    started: Arc<Mutex<usize>>,
    threads: usize,
}

impl BlockingPool {
    /// A pool of at most `threads` threads and `queue` waiting jobs.
    pub fn new(threads: usize, queue: usize) -> Self {
        let (tx, rx) = async_channel::bounded(queue.max(1));
        Self { tx, rx, started: Arc::new(Mutex::new(0)), threads: threads.max(1) }
    }

    fn ensure_thread(&self) {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        // Start another thread only when every existing one might be busy.
        if *started < self.threads && (*started == 0 || !self.rx.is_empty()) {
            let rx = self.rx.clone();
            let spawned = thread::Builder::new().name("ephyr-blocking".into()).spawn(move || {
                while let Ok(job) = rx.recv_blocking() {
                    job();
                }
            });
            if spawned.is_ok() {
                *started += 1;
            }
        }
    }

    /// Runs `f` on the pool and returns its result. `None` if the pool is shut down.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = async_channel::bounded(1);
        let job: Job = Box::new(move || {
            let _ = tx.send_blocking(f());
        });
        self.tx.send(job).await.ok()?;
        self.ensure_thread();
        rx.recv().await.ok()
    }

    /// Number of threads started so far.
    pub fn threads_started(&self) -> usize {
        *self.started.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_jobs_on_at_most_n_threads() {
        let pool = BlockingPool::new(2, 8);
        let results = crate::broker::reactor::block_on(async {
            let mut out = Vec::new();
            for i in 0..20u64 {
                out.push(pool.run(move || i * 2).await.unwrap());
            }
            out
        });
        assert_eq!(results.iter().sum::<u64>(), 380);
        assert!(pool.threads_started() <= 2);
    }
}
