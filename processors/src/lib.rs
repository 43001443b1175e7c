//! Built-in processors of `pipe` and the Rust processor SDK.
//!
//! A processor is the program that does one stage's work. The engine starts it as a child process
//! with the `PIPELINE_*` environment described in `docs/protocol.md`; the built-ins are the `pipe`
//! binary itself (`pipe processor copy|upper`), so they obey exactly the protocol that external
//! processors do and get no private shortcuts.
//!
//! The SDK ([`sdk`]) does everything but the per-chunk transform: reading the environment,
//! streaming inputs in constant memory, mirroring input names into the staging dir, durable
//! checkpoints on line boundaries, exactly-once resume, and fault injection for tests. A processor
//! author implements [`sdk::ChunkTransform`] and calls [`sdk::run`].

pub mod builtins;
pub mod checkpoint;
pub mod failpoint;
pub mod sdk;
pub mod upper;
