//! Offline guarantee, layer 1: no networking crate in the dependency tree (`Cargo.lock`), no
//! `std::net` (or any other socket API) in the engine's and processors' source, and raw socket // allow-net-mention
//! calls only where the sandbox needs them: the report channel's `AF_UNIX` pair (`channel.rs`)
//! and the loopback canary of `pipe check --sandbox` (`canary.rs`).
//!
//! Adding, say, `socket2` to a Cargo.toml or `use std::net::TcpStream;` to a module fails here. // allow-net-mention

use std::path::{Path, PathBuf};

/// Crates that open network connections or are the socket layer others build on.
const NETWORKING_CRATES: &[&str] = &[
    "reqwest",
    "hyper",
    "hyper-util",
    "h2",
    "h3",
    "ureq",
    "curl",
    "curl-sys",
    "isahc",
    "surf",
    "attohttpc",
    "minreq",
    "http-req",
    "ehttp",
    "tokio",
    "mio",
    "socket2",
    "async-io",
    "async-net",
    "async-std",
    "smol",
    "native-tls",
    "openssl",
    "openssl-sys",
    "rustls",
    "tokio-rustls",
    "hyper-rustls",
    "hyper-tls",
    "quinn",
    "quinn-proto",
    "tungstenite",
    "tokio-tungstenite",
    "websocket",
    "tonic",
    "tarpc",
    "tiny_http",
    "actix-web",
    "axum",
    "warp",
    "rocket",
    "trust-dns-resolver",
    "hickory-resolver",
    "hickory-proto",
    "lettre",
    "ssh2",
    "libssh2-sys",
    "zmq",
    "nng",
    "libp2p",
    "rumqttc",
    "paho-mqtt",
    "redis",
    "postgres",
    "tokio-postgres",
    "mysql",
    "ldap3",
    "suppaftp",
    "ftp",
    "imap",
    "tokio-native-tls",
    "getaddrinfo",
    "dns-lookup",
    "pnet",
    "smoltcp",
    "interfaces",
    "if-addrs",
    "local-ip-address",
];

/// Text that means socket code, forbidden in every source file.
const FORBIDDEN_SOURCE: &[&str] = &[
    "std::net", // allow-net-mention
    "core::net",
    "TcpStream",   // allow-net-mention
    "TcpListener", // allow-net-mention
    "UdpSocket",   // allow-net-mention
    "rustix::net",
    "nix::sys::socket",
    "tokio::net",
];

/// Raw socket calls and the only files allowed to make them.
const RAW_SOCKET_CALLS: &[(&str, &[&str])] = &[
    ("libc::socket(", &["sandbox/canary.rs"]),
    ("libc::connect(", &["sandbox/canary.rs"]),
    ("libc::bind(", &["sandbox/canary.rs"]),
    ("libc::listen(", &["sandbox/canary.rs"]),
    ("libc::accept", &["sandbox/canary.rs"]),
    ("libc::sendto(", &["sandbox/canary.rs"]),
    ("libc::recv(", &["sandbox/canary.rs"]),
    ("libc::recvfrom(", &[]),
    ("libc::socketpair(", &["sandbox/channel.rs"]),
    ("libc::sendmsg(", &["sandbox/channel.rs"]),
    ("libc::recvmsg(", &["sandbox/channel.rs"]),
    ("SYS_connect", &[]),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the engine lives in the workspace")
        .to_path_buf()
}

/// Package names in a Cargo.lock text.
fn locked_packages(lock: &str) -> Vec<String> {
    lock.lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|rest| rest.strip_suffix('"'))
        .map(str::to_string)
        .collect()
}

/// Names from `NETWORKING_CRATES` present in `packages`.
fn networking_in(packages: &[String]) -> Vec<String> {
    packages
        .iter()
        .filter(|p| NETWORKING_CRATES.contains(&p.as_str()))
        .cloned()
        .collect()
}

/// Every violation of the source rules in the Rust files below `roots` (paths shown relative to
/// each root).
fn source_violations(roots: &[PathBuf]) -> Vec<String> {
    let mut found = Vec::new();
    for root in roots {
        for entry in walkdir::WalkDir::new(root)
            .sort_by_file_name()
            .into_iter()
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "rs"))
        {
            let rel = entry
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(entry.path()).unwrap();
            for (n, line) in text.lines().enumerate() {
                for pattern in FORBIDDEN_SOURCE {
                    if line.contains(pattern) {
                        found.push(format!("{rel}:{}: `{pattern}`", n + 1));
                    }
                }
                for (call, allowed) in RAW_SOCKET_CALLS {
                    if line.contains(call) && !allowed.contains(&rel.as_str()) {
                        found.push(format!("{rel}:{}: raw socket call `{call}`", n + 1));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn no_networking_crate_is_in_the_dependency_tree() {
    let lock = std::fs::read_to_string(workspace().join("Cargo.lock")).unwrap();
    let packages = locked_packages(&lock);
    assert!(packages.len() > 20, "Cargo.lock parsed: {packages:?}");
    assert!(
        packages.iter().any(|p| p == "blake3"),
        "a known dependency is seen"
    );
    let bad = networking_in(&packages);
    assert!(
        bad.is_empty(),
        "networking crates in Cargo.lock: {bad:?}; pipe never talks to a network (docs/offline.md)"
    );
}

#[test]
fn no_manifest_enables_the_socket_api_of_rustix_or_nix() {
    for manifest in ["engine/Cargo.toml", "processors/Cargo.toml"] {
        let text = std::fs::read_to_string(workspace().join(manifest)).unwrap();
        for line in text
            .lines()
            .filter(|l| l.starts_with("rustix") || l.starts_with("nix"))
        {
            assert!(
                !line.contains("\"net\"") && !line.contains("\"socket\""),
                "{manifest}: {line}"
            );
        }
    }
}

#[test]
fn the_source_has_no_socket_api_outside_the_sandbox_plumbing() {
    let roots = [
        workspace().join("engine/src"),
        workspace().join("processors/src"),
    ];
    let found = source_violations(&roots);
    assert!(
        found.is_empty(),
        "socket code in the source:\n{}",
        found.join("\n")
    );
}

/// The checks above can fail: each rule is shown a violation.
#[test]
fn the_checks_catch_what_they_are_meant_to() {
    let lock = "[[package]]\nname = \"blake3\"\nversion = \"1\"\n\n[[package]]\nname = \"socket2\"\nversion = \"0.5\"\n";
    assert_eq!(networking_in(&locked_packages(lock)), ["socket2"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("sandbox")).unwrap();
    std::fs::write(dir.path().join("a.rs"), "use std::net::TcpStream;\n").unwrap(); // allow-net-mention
    std::fs::write(
        dir.path().join("b.rs"),
        "let fd = unsafe { libc::socket(2, 1, 0) };\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("sandbox/canary.rs"),
        "let fd = unsafe { libc::socket(2, 1, 0) };\n",
    )
    .unwrap();
    let found = source_violations(&[dir.path().to_path_buf()]);
    assert_eq!(
        found,
        [
            "a.rs:1: `std::net`",  // allow-net-mention
            "a.rs:1: `TcpStream`", // allow-net-mention
            "b.rs:1: raw socket call `libc::socket(`"
        ]
    );
}
