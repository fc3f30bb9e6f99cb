//! Audit throughput and the latency it adds to a request (record -> durable on disk), with
//! group commit. Not divan: an open-loop load generator.
//!
//! Run: `cargo bench --bench audit_load -- [DIR] [RATE] [SECONDS]`
//! (defaults: /var/tmp 20000 5). DIR's filesystem decides the fsync cost (try /dev/shm too).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ephyr::broker::audit::{AuditConfig, AuditLog, AuditSink, Event, Kind};
use ephyr::broker::blocking::BlockingPool;
use ephyr::broker::metrics::Metrics;

fn event(i: u64) -> Event {
    Event::new(Kind::Decision, "authorize")
        .agent("claude")
        .task("01ARZ3NDEKTSV4RRFFQ69G5FAV", vec!["01ARZ3NDEKTSV4RRFFQ69G5FAV".into()])
        .action(serde_json::json!({ "tool": "list_targets", "n": i }))
        .allow()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let base = args.first().cloned().unwrap_or_else(|| "/var/tmp".into());
    let rate: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let secs: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let dir = std::path::Path::new(&base).join(format!("ephyr-audit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ex = Rc::new(smol::LocalExecutor::new());
    let metrics = Rc::new(Metrics::default());
    let log = AuditLog::open(&dir, BlockingPool::new(2, 1024), AuditConfig::default(), metrics.clone()).unwrap();
    ephyr::broker::reactor::block_on(ex.run(async {
        ex.spawn(log.clone().run_flusher()).detach();
        // Open loop: `rate` events per second, released every millisecond, each timed until durable.
        let lat = Rc::new(RefCell::new(Vec::with_capacity((rate * secs) as usize)));
        let start = Instant::now();
        let total = rate * secs;
        let mut sent = 0u64;
        while sent < total {
            let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
            while sent < due {
                let t0 = Instant::now();
                let ticket = log.record(event(sent)).unwrap();
                let lat = lat.clone();
                ex.spawn(async move {
                    ticket.durable().await.unwrap();
                    lat.borrow_mut().push(t0.elapsed().as_secs_f64() * 1e6);
                })
                .detach();
                sent += 1;
            }
            ephyr::broker::deadline::Deadline::after(Duration::from_micros(500)).await;
        }
        log.flushed().await.unwrap();
        let elapsed = start.elapsed().as_secs_f64();
        while lat.borrow().len() < total as usize {
            ephyr::broker::deadline::Deadline::after(Duration::from_millis(1)).await;
        }
        let mut l = lat.borrow().clone();
        l.sort_by(f64::total_cmp);
        let text = metrics.render();
        let batches = text.lines().find(|x| x.starts_with("ephyr_audit_write_duration_seconds_count")).and_then(|x| x.split_whitespace().nth(1)).unwrap_or("?").to_owned();
        println!(
            "open loop {rate}/s for {secs}s on {base}: {} events in {elapsed:.2}s ({:.0}/s), {batches} batches; added latency us: p50 {:.0} p90 {:.0} p99 {:.0} max {:.0}",
            l.len(),
            l.len() as f64 / elapsed,
            pct(&l, 0.5),
            pct(&l, 0.9),
            pct(&l, 0.99),
            l[l.len() - 1]
        );
        // Closed loop: 64 producers, each waiting for durability before the next event.
        let done = Rc::new(RefCell::new(0u64));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for p in 0..64u64 {
            let (log, done) = (log.clone(), done.clone());
            tasks.push(ex.spawn(async move {
                let mut i = 0;
                while start.elapsed() < Duration::from_secs(3) {
                    log.record(event(p * 1_000_000 + i)).unwrap().durable().await.unwrap();
                    *done.borrow_mut() += 1;
                    i += 1;
                }
            }));
        }
        for t in tasks {
            t.await;
        }
        println!("closed loop, 64 producers waiting for durability: {:.0} events/s", *done.borrow() as f64 / start.elapsed().as_secs_f64());
    }));
    let _ = std::fs::remove_dir_all(&dir);
}
