//! What the offline sandbox costs one processor attempt, measured where it is paid: the executor
//! running a trivial processor (`/bin/true`) through the re-exec helper, with every layer and with
//! none, against a plain fork+exec of the same program; plus the once-per-build probe.
//!
//! A benchmark, not a test: ignored by default. Run it on the release profile:
//!
//! ```text
//! cargo test --release -p pipe-engine --test sandbox_overhead -- --ignored --nocapture
//! ```

#![cfg(target_os = "linux")]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use pipe_engine::executor::{self, Invocation};
use pipe_engine::sandbox::{FsRules, Guard, HelperSpec, Policy, Probe, SYSTEM_WRITE};

const RUNS: usize = 200;

fn pipe_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pipe"))
}

fn summary(label: &str, mut times: Vec<Duration>) -> f64 {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = times.iter().map(|d| ms(*d)).sum::<f64>() / times.len() as f64;
    let median = ms(times[times.len() / 2]);
    let p90 = ms(times[times.len() * 9 / 10]);
    println!("  {label:48} mean {mean:6.2}  median {median:6.2}  p90 {p90:6.2} ms");
    median
}

fn invocation(dir: &std::path::Path, policy: Policy) -> Invocation {
    Invocation {
        argv: vec!["/bin/true".into()],
        env: vec![("PIPELINE_STAGE".into(), "bench".into())],
        cwd: dir.to_path_buf(),
        log: dir.join("attempt.log"),
        timeout: None,
        cpu_set: None,
        memory_limit_mb: None,
        virtual_memory_mb: None,
        sandbox: policy,
    }
}

fn time_executor(dir: &std::path::Path, policy: &Policy) -> Vec<Duration> {
    let never = AtomicBool::new(false);
    (0..RUNS + 5)
        .map(|_| {
            let inv = invocation(dir, policy.clone());
            let t = Instant::now();
            let outcome = executor::run(&inv, &never, &mut |_| {}, &mut |_| Ok(())).unwrap();
            let elapsed = t.elapsed();
            assert!(outcome.succeeded(), "{outcome:?}");
            elapsed
        })
        .skip(5)
        .collect()
}

#[test]
#[ignore = "a benchmark: cargo test --release -p pipe-engine --test sandbox_overhead -- --ignored --nocapture"]
fn sandbox_overhead_per_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let exe = pipe_bin();
    let probe_times: Vec<Duration> = (0..RUNS / 4)
        .map(|_| {
            let t = Instant::now();
            Probe::run(&exe).unwrap();
            t.elapsed()
        })
        .collect();
    let probe = Probe::run(&exe).unwrap();
    assert!(
        probe.netns.ok && probe.seccomp.ok && probe.landlock.ok,
        "{probe:?}"
    );
    let strict = Policy {
        exe: exe.clone(),
        guard: Guard::Strict,
        spec: HelperSpec {
            netns: true,
            seccomp: true,
            landlock: Some(FsRules {
                write: [staging.clone()]
                    .into_iter()
                    .chain(SYSTEM_WRITE.iter().map(PathBuf::from))
                    .collect(),
                deny_tcp: true,
                ..FsRules::default()
            }),
            require: true,
        },
        ..Policy::default()
    };
    let layer = |netns, seccomp, landlock: bool| Policy {
        spec: HelperSpec {
            netns,
            seccomp,
            landlock: landlock.then(|| strict.spec.landlock.clone().unwrap()),
            require: false,
        },
        ..strict.clone()
    };
    let direct: Vec<Duration> = (0..RUNS + 5)
        .map(|_| {
            let t = Instant::now();
            let status = Command::new("/bin/true").status().unwrap();
            let elapsed = t.elapsed();
            assert!(status.success());
            elapsed
        })
        .skip(5)
        .collect();
    println!(
        "\none attempt of /bin/true, {RUNS} runs each ({}):",
        exe.display()
    );
    let base = summary("fork+exec, no executor (reference)", direct);
    let helper = summary(
        "executor, helper only (--offline-guard=static)",
        time_executor(dir.path(), &Policy::unconfined(&exe)),
    );
    summary(
        "executor, helper + netns",
        time_executor(dir.path(), &layer(true, false, false)),
    );
    summary(
        "executor, helper + Landlock",
        time_executor(dir.path(), &layer(false, false, true)),
    );
    summary(
        "executor, helper + seccomp (notify)",
        time_executor(dir.path(), &layer(false, true, false)),
    );
    let all = summary(
        "executor, every layer (strict)",
        time_executor(dir.path(), &strict),
    );
    let probe_ms = summary("probe (`pipe __exec --probe`, once per build)", probe_times);
    println!(
        "  every layer vs helper only: {:+.2} ms per attempt; vs plain fork+exec: {:+.2} ms; probe {:.2} ms per build",
        all - helper,
        all - base,
        probe_ms
    );
}
