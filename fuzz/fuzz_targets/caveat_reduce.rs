//! Caveat parser and reducer: arbitrary caveat lists must reduce or fail cleanly, and appending
//! any caveat to a list that reduces must give a subset (monotonicity).
#![no_main]
use ephyr::macaroon::reduce;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Caveats separated by newlines; the last line is the appended one.
    let lines: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    let (base, extra) = lines.split_at(lines.len().saturating_sub(1));
    if let Ok(before) = reduce(base.iter().copied()) {
        if let Ok(after) = reduce(base.iter().copied().chain(extra.iter().copied())) {
            assert!(after.envelope.is_subset_of(&before.envelope), "appending {:?} widened the envelope", extra);
            if before.task().is_some() && !extra.iter().any(|e| e.starts_with(b"task = ")) {
                assert_eq!(after.task(), before.task());
            }
        }
    }
});
