//! `pipe`: an offline, single-machine, incremental task-graph engine for batch file processing.
//!
//! The library does all the work; the `pipe` binary only parses arguments and calls [`cli::main`].
//! The modules follow the data flow of one build (see `ARCHITECTURE.md`):
//!
//! [`spec`] (load + validate the Pipefile) → [`graph`] (compile the DAG, no I/O) →
//! [`plan`] (fingerprints and decisions with reasons) → [`lock`] → [`build`] (the coordinator:
//! [`scheduler`] admits ready stages under quotas, [`stage_job`] runs each on a worker through
//! [`executor`] and [`publish`]es outputs, marker last) → [`state`] records, all written through
//! [`atomic`].

pub mod atomic;
pub mod audit;
pub mod build;
pub mod clean;
pub mod cli;
pub mod event;
pub mod executor;
pub mod fingerprint;
pub mod gc;
pub mod graph;
pub mod hashing;
pub mod inputs;
pub mod lock;
pub mod marker;
pub mod memo;
pub mod plan;
pub mod processes;
pub mod procfs;
pub mod prometheus;
pub mod publish;
pub mod retry;
pub mod runid;
pub mod runlog;
pub mod sandbox;
pub mod scheduler;
pub mod slurm;
pub mod spec;
pub mod stage_job;
pub mod state;
pub mod store;
pub mod watch;
pub mod workers;
pub mod workspace;

/// Version of the fingerprint encoding; bumping it reruns every stage once.
pub const FINGERPRINT_SCHEMA: u32 = 1;
