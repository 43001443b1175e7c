//! The static scan: network imports in Python processors, reported with file:line:col and the
//! rule that matched, before anything runs (`pipe check`, and every `pipe build`).
//!
//! It is a fast early warning, not the enforcement: it reads the processor's own files (the
//! script in its argv, `python -c` code, `python -m` modules of the project, and every Python file
//! of `processor.files`), not what they import in turn, and it cannot see a module name computed
//! at run time. The runtime layers catch those.
//!
//! What counts, on properly tokenized source (a word in a string or comment is not an import):
//! `import M` / `from M import N` where `M` (or `M.N`) is a network module of [`MODULES`];
//! `__import__("M")` / `importlib.import_module("M")` with a literal `M`; the asyncio network
//! calls ([`ASYNCIO_CALLS`]) on `asyncio` or, in a file that imports asyncio, on any object (an
//! event loop); and `urllib.request` / `http.client`-style attribute access.

use std::path::{Path, PathBuf};

use super::pytokens::{tokenize, Kind, Token};
use crate::spec::{Processor, Spec, Stage};

/// Network modules (a module matches itself and its submodules) and the rule id each reports.
pub const MODULES: &[(&str, &str)] = &[
    ("socket", "socket"),
    ("_socket", "socket"),
    ("ssl", "ssl"),
    ("_ssl", "ssl"),
    ("socketserver", "socketserver"),
    ("http.client", "http"),
    ("http.server", "http"),
    ("urllib.request", "urllib"),
    ("urllib.robotparser", "urllib"),
    ("urllib3", "urllib3"),
    ("requests", "requests"),
    ("httpx", "httpx"),
    ("aiohttp", "aiohttp"),
    ("ftplib", "ftplib"),
    ("smtplib", "smtplib"),
    ("poplib", "poplib"),
    ("imaplib", "imaplib"),
    ("nntplib", "nntplib"),
    ("telnetlib", "telnetlib"),
    ("xmlrpc", "xmlrpc"),
    ("websocket", "websocket"),
    ("websockets", "websockets"),
    ("paramiko", "paramiko"),
];

/// asyncio functions and event-loop methods that open network connections or servers.
pub const ASYNCIO_CALLS: &[&str] = &[
    "open_connection",
    "start_server",
    "create_connection",
    "create_server",
    "create_datagram_endpoint",
];

/// Every rule id (what `offline.allowStaticFindings` may list), sorted; computed once (validation
/// asks for every stage).
pub fn rule_ids() -> &'static [&'static str] {
    static IDS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    IDS.get_or_init(|| {
        let mut ids: Vec<&str> = MODULES.iter().map(|(_, id)| *id).collect();
        ids.push("asyncio");
        ids.sort();
        ids.dedup();
        ids
    })
}

/// The rule a module name matches.
pub fn module_rule(module: &str) -> Option<&'static str> {
    MODULES.iter().find_map(|(m, id)| {
        let matches = module == *m
            || (module.starts_with(m) && module.as_bytes().get(m.len()) == Some(&b'.'));
        matches.then_some(*id)
    })
}

/// One match in one source text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub line: usize,
    pub column: usize,
    pub rule: &'static str,
    /// What was found, e.g. "import of network module `socket`".
    pub what: String,
}

/// One finding of a stage's scan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    pub stage: String,
    /// The file as the Pipefile names it (relative to its folder), or where `-c` code comes from.
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub rule: &'static str,
    pub message: String,
    /// The stage allows this rule (`offline.allowStaticFindings`).
    pub allowed: bool,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: stage `{}`: {} (rule `{}`)",
            self.file, self.line, self.column, self.stage, self.message, self.rule
        )
    }
}

fn is_name(t: Option<&Token>, text: &str) -> bool {
    t.is_some_and(|t| t.kind == Kind::Name && t.text == text)
}

fn is_op(t: Option<&Token>, op: &str) -> bool {
    t.is_some_and(|t| t.kind == Kind::Op && t.text == op)
}

/// Reads a dotted name starting at `i`: (name, first token, index after it).
fn dotted(tokens: &[Token], mut i: usize) -> Option<(String, &Token, usize)> {
    let first = tokens
        .get(i)
        .filter(|t| t.kind == Kind::Name && t.text != "import")?;
    let mut name = first.text.clone();
    i += 1;
    while is_op(tokens.get(i), ".") && tokens.get(i + 1).is_some_and(|t| t.kind == Kind::Name) {
        name.push('.');
        name.push_str(&tokens[i + 1].text);
        i += 2;
    }
    Some((name, first, i))
}

/// Scans one Python source text.
pub fn scan_source(source: &str) -> Vec<Hit> {
    let tokens = tokenize(source);
    let mut hits: Vec<Hit> = Vec::new();
    let imports_asyncio = tokens.iter().any(|t| is_name(Some(t), "asyncio"));
    let mut hit = |t: &Token, rule: &'static str, what: String| {
        hits.push(Hit {
            line: t.line,
            column: t.col,
            rule,
            what,
        });
    };
    let mut i = 0;
    while i < tokens.len() {
        let t = &tokens[i];
        if t.kind != Kind::Name {
            i += 1;
            continue;
        }
        match t.text.as_str() {
            "import" => {
                // import a.b [as c], d ...
                let mut j = i + 1;
                while let Some((module, first, next)) = dotted(&tokens, j) {
                    if let Some(rule) = module_rule(&module) {
                        hit(first, rule, format!("import of network module `{module}`"));
                    }
                    j = next;
                    if is_name(tokens.get(j), "as") {
                        j += 2;
                    }
                    if !is_op(tokens.get(j), ",") {
                        break;
                    }
                    j += 1;
                }
                i = j.max(i + 1);
            }
            "from" => {
                let mut j = i + 1;
                let mut level = 0;
                while is_op(tokens.get(j), ".") {
                    level += 1;
                    j += 1;
                }
                let (base, base_token, after) = match dotted(&tokens, j) {
                    Some((name, tok, next)) => (name, Some(tok), next),
                    None => (String::new(), None, j),
                };
                if !is_name(tokens.get(after), "import") {
                    i += 1; // `yield from x`, `raise e from x`
                    continue;
                }
                let mut k = after + 1;
                let parenthesised = is_op(tokens.get(k), "(");
                if parenthesised {
                    k += 1;
                }
                let mut names = Vec::new();
                while let Some(name) = tokens.get(k).filter(|t| t.kind == Kind::Name) {
                    names.push(name);
                    k += 1;
                    if is_name(tokens.get(k), "as") {
                        k += 2;
                    }
                    if !is_op(tokens.get(k), ",") {
                        break;
                    }
                    k += 1;
                }
                if level == 0 {
                    if let (Some(rule), Some(tok)) = (module_rule(&base), base_token) {
                        hit(tok, rule, format!("import from network module `{base}`"));
                    } else {
                        for name in &names {
                            let full = format!("{base}.{}", name.text);
                            if let Some(rule) = module_rule(&full) {
                                hit(name, rule, format!("import of network module `{full}`"));
                            } else if base == "asyncio"
                                && ASYNCIO_CALLS.contains(&name.text.as_str())
                            {
                                hit(
                                    name,
                                    "asyncio",
                                    format!("import of asyncio network call `{}`", name.text),
                                );
                            }
                        }
                    }
                }
                i = k.max(i + 1);
            }
            "__import__" | "import_module" if is_op(tokens.get(i + 1), "(") => {
                let mut literal = String::new();
                let mut k = i + 2;
                while let Some(s) = tokens.get(k).filter(|t| t.kind == Kind::Str) {
                    match &s.value {
                        Some(v) => literal.push_str(v),
                        None => {
                            literal.clear();
                            break;
                        }
                    }
                    k += 1;
                }
                if let Some(rule) = module_rule(&literal) {
                    hit(
                        t,
                        rule,
                        format!(
                            "dynamic import of network module `{literal}` ({}())",
                            t.text
                        ),
                    );
                }
                i += 1;
            }
            name if ASYNCIO_CALLS.contains(&name)
                && is_op(tokens.get(i + 1), "(")
                && i >= 2
                && is_op(tokens.get(i - 1), ".") =>
            {
                let object = &tokens[i - 2];
                let on_asyncio = is_name(Some(object), "asyncio");
                let on_loop = object.kind == Kind::Name
                    && imports_asyncio
                    && object.text != "socket"
                    && !is_op(tokens.get(i.wrapping_sub(3)), ".");
                if on_asyncio || on_loop {
                    hit(t, "asyncio", format!("asyncio network call `{name}()`"));
                }
                i += 1;
            }
            "urllib" | "http"
                if is_op(tokens.get(i + 1), ".") && (i == 0 || !is_op(tokens.get(i - 1), ".")) =>
            {
                if let Some((module, _, next)) = dotted(&tokens, i) {
                    let two: Vec<&str> = module.split('.').take(2).collect();
                    let prefix = two.join(".");
                    if let Some(rule) = module_rule(&prefix) {
                        hit(t, rule, format!("use of network module `{prefix}`"));
                    }
                    i = next;
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    hits.sort_by_key(|h| (h.line, h.column));
    hits.dedup_by_key(|h| (h.line, h.column));
    hits
}

/// Whether `path` holds Python: by extension, or a `#!` line naming python.
fn is_python(path: &Path, head: &[u8]) -> bool {
    if matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("py" | "pyw")
    ) {
        return true;
    }
    head.starts_with(b"#!")
        && head
            .split(|b| *b == b'\n')
            .next()
            .is_some_and(|line| line.windows(6).any(|w| w == b"python"))
}

fn is_python_program(program: &str) -> bool {
    let base = program.rsplit('/').next().unwrap_or(program);
    base.starts_with("python") || base.starts_with("pypy")
}

/// Largest file the scan reads.
const MAX_FILE: u64 = 16 * 1024 * 1024;

/// Scans every Python source a stage's processor is made of.
pub fn scan_stage(spec: &Spec, stage: &Stage) -> Vec<Finding> {
    let Processor::Command { argv, files, .. } = &stage.processor else {
        return Vec::new(); // built-ins: Rust, covered by the dependency test
    };
    let mut sources: Vec<(String, PathBuf)> = Vec::new();
    let mut inline: Vec<(String, String)> = Vec::new();
    for file in files {
        let path = spec.path(file);
        if path.is_dir() {
            for entry in walkdir::WalkDir::new(&path)
                .sort_by_file_name()
                .into_iter()
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_file())
            {
                let shown = match entry.path().strip_prefix(&spec.root) {
                    Ok(rel) => rel.display().to_string(),
                    Err(_) => entry.path().display().to_string(),
                };
                sources.push((shown, entry.path().to_path_buf()));
            }
        } else {
            sources.push((file.clone(), path));
        }
    }
    if argv.first().is_some_and(|p| is_python_program(p)) {
        let mut j = 1;
        while j < argv.len() {
            match argv[j].as_str() {
                "-c" if j + 1 < argv.len() => {
                    inline.push((
                        format!("{} (processor.command[{}])", spec.file, j + 1),
                        argv[j + 1].clone(),
                    ));
                    break;
                }
                "-m" if j + 1 < argv.len() => {
                    let module = argv[j + 1].replace('.', "/");
                    for candidate in [format!("{module}.py"), format!("{module}/__main__.py")] {
                        if spec.path(&candidate).is_file() {
                            sources.push((candidate.clone(), spec.path(&candidate)));
                        }
                    }
                    break;
                }
                a if a.starts_with('-') => j += 1,
                _ => break,
            }
        }
    }
    let allowed = &stage.offline.allow_static_findings;
    let mut findings = Vec::new();
    let mut add = |file: &str, hits: Vec<Hit>| {
        for h in hits {
            findings.push(Finding {
                stage: stage.name.clone(),
                file: file.to_string(),
                line: h.line,
                column: h.column,
                rule: h.rule,
                message: h.what,
                allowed: allowed.iter().any(|a| a == h.rule),
            });
        }
    };
    sources.sort();
    sources.dedup();
    for (shown, path) in sources {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.len() > MAX_FILE {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        if !is_python(&path, &bytes[..bytes.len().min(256)]) {
            continue;
        }
        add(&shown, scan_source(&String::from_utf8_lossy(&bytes)));
    }
    for (shown, code) in inline {
        add(&shown, scan_source(&code));
    }
    findings
}

/// Scans the stages `indices` of `spec`.
pub fn scan(spec: &Spec, indices: impl IntoIterator<Item = usize>) -> Vec<Finding> {
    indices
        .into_iter()
        .flat_map(|i| scan_stage(spec, &spec.stages[i]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(src: &str) -> Vec<(usize, usize, &'static str)> {
        scan_source(src)
            .into_iter()
            .map(|h| (h.line, h.column, h.rule))
            .collect()
    }

    #[test]
    fn every_import_form_is_found_where_it_is() {
        let cases: &[(&str, (usize, usize, &str))] = &[
            ("import socket\n", (1, 8, "socket")),
            ("import os, ssl as s\n", (1, 12, "ssl")),
            ("import http.client\n", (1, 8, "http")),
            ("from http import client\n", (1, 18, "http")),
            ("from urllib.request import urlopen\n", (1, 6, "urllib")),
            ("from urllib import request\n", (1, 20, "urllib")),
            ("from xmlrpc import client\n", (1, 6, "xmlrpc")),
            ("import requests, httpx, aiohttp\n", (1, 8, "requests")),
            ("if x:\n    import urllib3\n", (2, 12, "urllib3")),
            (
                "try: import ftplib\nexcept ImportError: pass\n",
                (1, 13, "ftplib"),
            ),
            ("import smtplib\n", (1, 8, "smtplib")),
            ("import poplib\n", (1, 8, "poplib")),
            ("import imaplib\n", (1, 8, "imaplib")),
            ("import telnetlib\n", (1, 8, "telnetlib")),
            ("import socketserver\n", (1, 8, "socketserver")),
            ("import websocket\n", (1, 8, "websocket")),
            (
                "from websockets.sync.client import connect\n",
                (1, 6, "websockets"),
            ),
            ("import paramiko\n", (1, 8, "paramiko")),
            ("m = __import__('socket')\n", (1, 5, "socket")),
            (
                "import importlib\nm = importlib.import_module(\"http.client\")\n",
                (2, 15, "http"),
            ),
            (
                "from importlib import import_module as im\nimport_module('ssl')\n",
                (2, 1, "ssl"),
            ),
            (
                "import asyncio\nasyncio.open_connection('h', 1)\n",
                (2, 9, "asyncio"),
            ),
            (
                "import asyncio\nasync def f(loop):\n    await loop.create_datagram_endpoint(P)\n",
                (3, 16, "asyncio"),
            ),
            ("from asyncio import start_server\n", (1, 21, "asyncio")),
            (
                "import urllib\nurllib.request.urlopen(u)\n",
                (2, 1, "urllib"),
            ),
            (
                "s = f\"{__import__('socket').gethostname()}\"\n",
                (1, 8, "socket"),
            ),
            ("(\n  __import__(\n    'ssl'\n  )\n)\n", (2, 3, "ssl")),
        ];
        for (src, expected) in cases {
            let found = rules(src);
            assert!(
                found.contains(expected),
                "{src:?}: expected {expected:?} in {found:?}"
            );
        }
    }

    #[test]
    fn words_in_strings_comments_and_harmless_modules_are_not_findings() {
        let src = r#"
"""A processor that never does `import socket`."""
# import requests
import json, os, urllib.parse
from http import HTTPStatus
from urllib.parse import urlparse
from . import socket
from .ssl import thing
msg = "import socket; __import__('ssl')"
raw = r'\' import socket'
name = f"{x} import ssl {{__import__('ssl')}}"
def start_server():
    pass
start_server()
obj.create_connection(1)
yield_from = 1
def g():
    yield from requests_like()
    raise ValueError("x") from socket_error
socket_path = "/tmp/socket"
__import__(name)
"#;
        assert_eq!(rules(src), []);
    }

    #[test]
    fn socket_create_connection_is_the_socket_rule_only() {
        let src = "import socket, asyncio\nsocket.create_connection(('h', 1))\n";
        assert_eq!(rules(src), [(1, 8, "socket")]);
    }

    #[test]
    fn rule_ids_cover_the_issue_list() {
        let ids = rule_ids();
        for id in [
            "socket",
            "ssl",
            "http",
            "urllib",
            "urllib3",
            "requests",
            "httpx",
            "aiohttp",
            "ftplib",
            "smtplib",
            "poplib",
            "imaplib",
            "telnetlib",
            "xmlrpc",
            "socketserver",
            "websocket",
            "websockets",
            "paramiko",
            "asyncio",
        ] {
            assert!(ids.contains(&id), "{id}");
        }
        assert_eq!(module_rule("http"), None);
        assert_eq!(module_rule("urllib.parse"), None);
        assert_eq!(module_rule("sockets"), None);
        assert_eq!(module_rule("xmlrpc.client"), Some("xmlrpc"));
    }
}
