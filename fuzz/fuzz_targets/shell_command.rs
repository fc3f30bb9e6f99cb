//! SSH command policy: any text parses to a judged command or a refusal with a reason, never a
//! panic or a stack overflow; what is allowed has only literal words.
#![no_main]
use ephyr::command::{CommandPolicy, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = std::str::from_utf8(data) else { return };
    let policy = CommandPolicy { globs: true, redirections: true, ..Default::default() };
    if let Ok(parsed) = Parsed::parse(cmd) {
        assert!(!parsed.commands.is_empty());
        if policy.check(&parsed, cmd).is_ok() {
            for c in &parsed.commands {
                assert!(!c.words[0].value.is_empty() && !c.words[0].glob);
            }
        }
    }
});
