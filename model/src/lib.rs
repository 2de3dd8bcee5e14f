//! The socket ownership word of roomcast's outbox, built alone so that `--cfg loom` swaps its
//! atomics for loom's without rebuilding the server. The model is in `tests/ownership.rs`.

#[path = "../../src/outbox/word.rs"]
pub mod word;
