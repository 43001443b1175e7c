//! The guard fails closed: on a machine where no runtime layer can be applied, `pipe build`
//! refuses to run anything (exit 2, with an explanation) unless `--offline-guard=static`, which is
//! then recorded. "No layer" is made real by starting `pipe` under a seccomp filter that denies
//! exactly the system calls the layers need (`unshare`, `seccomp`, `landlock_create_ruleset`).

#![cfg(target_os = "linux")]

mod util;

use std::os::unix::process::CommandExt;
use std::process::Command;

use util::{pipe_bin, Project, Run};

const PIPEFILE: &str = r#"{"version": 1, "stages": [
  {"name": "copy", "processor": {"builtin": "copy", "version": "1"}, "inputs": ["input"], "outputDir": "out"}
]}"#;

fn project() -> Project {
    Project::new()
        .file("Pipefile.json", PIPEFILE)
        .file("input/a.txt", "alpha\n")
}

fn ins(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// A filter under which the layers cannot be set up: `unshare` and `seccomp` fail with EPERM
/// (unless `only_landlock`), `landlock_create_ruleset` with EOPNOTSUPP (Landlock disabled).
fn no_layers_filter(only_landlock: bool) -> Vec<libc::sock_filter> {
    let ret = libc::BPF_RET | libc::BPF_K;
    let jeq = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | e as u32;
    let denied = |nr: libc::c_long| if only_landlock { u32::MAX } else { nr as u32 };
    vec![
        ins(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        ins(jeq, denied(libc::SYS_unshare), 3, 0),
        ins(jeq, denied(libc::SYS_seccomp), 2, 0),
        ins(jeq, libc::SYS_landlock_create_ruleset as u32, 3, 0),
        ins(ret, libc::SECCOMP_RET_ALLOW, 0, 0),
        ins(ret, errno(libc::EPERM), 0, 0),
        ins(ret, errno(libc::EPERM), 0, 0),
        ins(ret, errno(libc::EOPNOTSUPP), 0, 0),
    ]
}

/// Runs `pipe ARGS` in `project` under [`no_layers_filter`].
fn pipe_without_layers(project: &Project, args: &[&str]) -> Run {
    pipe_under(project, args, no_layers_filter(false))
}

/// Runs `pipe ARGS` in `project` under the seccomp filter `program`.
fn pipe_under(project: &Project, args: &[&str], program: Vec<libc::sock_filter>) -> Run {
    let mut command = Command::new(pipe_bin());
    command
        .args(args)
        .current_dir(project.path())
        .env("NO_COLOR", "1");
    // SAFETY: between fork and exec the closure only makes two system calls (prctl, seccomp) on
    // the program prepared above; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = command.output().expect("pipe runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn without_any_runtime_layer_a_build_refuses_to_run_and_says_why() {
    let project = project();
    let before = project.tree();
    let run = pipe_without_layers(&project, &["build"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("no runtime offline layer is available on this machine"),
        "{}",
        run.stderr
    );
    for layer in ["network namespace:", "seccomp:", "Landlock:"] {
        assert!(
            run.stderr.contains(layer),
            "explains {layer}\n{}",
            run.stderr
        );
    }
    assert!(
        run.stderr.contains("--offline-guard=static"),
        "{}",
        run.stderr
    );
    assert_eq!(project.tree(), before, "nothing ran, nothing was written");
}

#[test]
fn the_static_guard_runs_anyway_and_records_it() {
    let project = project();
    let run = pipe_without_layers(&project, &["build", "--offline-guard=static"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("--offline-guard=static"),
        "{}",
        run.stderr
    );
    assert_eq!(project.read("out/a.txt"), "alpha\n");
    let record: serde_json::Value =
        serde_json::from_str(&project.read("state/stage_copy.json")).unwrap();
    let sandbox = &record["attempts"][0]["sandbox"];
    assert_eq!(sandbox["guard"], "static", "{record}");
    assert_eq!(sandbox["netns"], false);
    assert_eq!(sandbox["seccomp"], false);
    assert_eq!(sandbox["landlock"], false);
    let audit = project.read("state/audit.jsonl");
    let offline: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["action"] == "run.offline")
        .collect();
    assert_eq!(offline.len(), 1, "{audit}");
    assert_eq!(
        offline[0]["data"]["guard"], "static",
        "the audit log records the weaker guard"
    );
}

#[test]
fn a_normal_build_records_every_layer_it_applied() {
    let project = project();
    let run = project.pipe(&["build"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let record: serde_json::Value =
        serde_json::from_str(&project.read("state/stage_copy.json")).unwrap();
    let sandbox = &record["attempts"][0]["sandbox"];
    assert_eq!(sandbox["guard"], "strict", "{record}");
    assert_eq!(sandbox["netns"], true);
    assert_eq!(sandbox["seccomp"], true);
    assert_eq!(sandbox["landlock"], true);
    assert_eq!(sandbox["violations"], "notify");
}

#[test]
fn without_landlock_a_hermetic_stage_refuses_to_run_and_others_are_warned() {
    let hermetic = PIPEFILE.replace(
        r#""outputDir": "out"}"#,
        r#""outputDir": "out", "hermetic": true}"#,
    );
    assert_ne!(hermetic, PIPEFILE);
    let project = project().file("Pipefile.json", &hermetic);
    let run = pipe_under(&project, &["build"], no_layers_filter(true));
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("stage `copy` is hermetic, which needs Landlock"),
        "{}",
        run.stderr
    );
    project.write("Pipefile.json", PIPEFILE);
    let run = pipe_under(&project, &["build"], no_layers_filter(true));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("warning: no Landlock"),
        "{}",
        run.stderr
    );
    let record: serde_json::Value =
        serde_json::from_str(&project.read("state/stage_copy.json")).unwrap();
    let sandbox = &record["attempts"][0]["sandbox"];
    assert_eq!(
        (
            sandbox["netns"].clone(),
            sandbox["seccomp"].clone(),
            sandbox["landlock"].clone()
        ),
        (true.into(), true.into(), false.into()),
        "{record}"
    );
}
