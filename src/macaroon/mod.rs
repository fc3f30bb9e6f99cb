//! Task tokens: libmacaroons-compatible V2 macaroons, the caveat language and the reducer.
//!
//! Pure: no I/O, no clock (callers pass `now`). Filled in by the token-engine issue.
