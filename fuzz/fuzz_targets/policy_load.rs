//! Policy loader: arbitrary text loads or fails with located problems, never panics; a policy that
//! loads can be asked any SSH question without panicking.
#![no_main]
use ephyr::broker::policy::{authorize, Action, ActionKind, Policy, Principal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Policy::parse(text, "fuzz.yaml") {
        Ok(p) => {
            for agent in p.agents.keys() {
                for target in p.targets.keys() {
                    let _ = authorize(&p, &Principal { agent, token: None, delegators: &[] }, &Action::new(None, ActionKind::Ssh { target, role: "read" }));
                }
            }
        }
        Err(e) => assert!(!e.problems.is_empty()),
    }
});
