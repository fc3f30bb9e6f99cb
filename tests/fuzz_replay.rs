//! The fuzz smoke: every committed corpus entry and seed (`fuzz/corpus/<target>`,
//! `fuzz/seeds/<target>`) goes through its target's checks (`ephyr::fuzzing`), then a few
//! thousand inputs mutated from them (a fixed PRNG, so a failure repeats). A failure names the
//! file or the mutation. The real runs are `scripts/fuzz.sh` (docs/RELIABILITY.md).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Mutated inputs per target, after the replay.
const MUTATIONS: usize = 1500;

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in ["seeds", "corpus"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        for e in entries.flatten() {
            if let Ok(bytes) = std::fs::read(e.path()) {
                out.push((e.path(), bytes));
            }
        }
    }
    out.sort();
    out
}

/// xorshift64*: enough to mutate with, and the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `base` (and sometimes a splice with `other`): flip, insert, delete, repeat.
fn mutate(rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let special = b"\"\\{}[]<>:,=\n\r\0\xff'$`;|&*/.%";
                v.insert(at, special[rng.below(special.len())]);
            }
            2 if at < v.len() => {
                let end = (at + 1 + rng.below(16)).min(v.len());
                v.drain(at..end);
            }
            3 if at < v.len() => {
                let end = (at + 1 + rng.below(32)).min(v.len());
                let piece = v[at..end].to_vec();
                for _ in 0..1 + rng.below(8) {
                    v.splice(at..at, piece.iter().copied());
                }
            }
            4 if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(64)).min(other.len());
                v.splice(at..at, other[from..end].iter().copied());
            }
            _ => v.insert(at, rng.next() as u8),
        }
    }
    v.truncate(64 * 1024);
    v
}

/// The checks run with the stack the broker's own thread has (8 MiB, Linux's default for a main
/// thread), not the test harness's 2 MiB: a debug build's frames are several times larger, and
/// one committed `shell_command` input (parsed in 65 ms by a release build) needs more than
/// 2 MiB of them in brush-parser.
#[test]
fn every_fuzz_target_passes_its_corpus_and_mutations_of_it() {
    std::thread::Builder::new()
        .name("fuzz-replay".into())
        .stack_size(8 << 20)
        .spawn(replay_every_target)
        .unwrap()
        .join()
        .unwrap();
}

fn replay_every_target() {
    let mut failures = Vec::new();
    let mut total = 0;
    for &(name, check) in ephyr::fuzzing::TARGETS {
        let corpus = inputs(name);
        assert!(!corpus.is_empty(), "fuzz target {name} has no seeds (fuzz/seeds/{name})");
        for (path, bytes) in &corpus {
            total += 1;
            if catch_unwind(AssertUnwindSafe(|| check(bytes))).is_err() {
                failures.push(format!("{name}: {}", path.display()));
            }
        }
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
        for i in 0..MUTATIONS {
            let base = &corpus[rng.below(corpus.len())].1;
            let other = &corpus[rng.below(corpus.len())].1;
            let input = mutate(&mut rng, base, other);
            total += 1;
            if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
                failures.push(format!("{name}: mutation {i}: {:?}", String::from_utf8_lossy(&input)));
                break;
            }
        }
    }
    assert!(failures.is_empty(), "{} of {total} inputs failed:\n{}", failures.len(), failures.join("\n"));
}
