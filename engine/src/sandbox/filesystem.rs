//! Landlock: what a processor may write (and, for hermetic stages, read), plus TCP and scoping.
//!
//! A Landlock domain is inherited by every child and cannot be lifted. Rules name folders (a rule
//! covers everything beneath) or files. Outside the write rules a processor can create, change,
//! rename or remove nothing: it writes into its staging folder, its private temp folder and the
//! `sandbox.writablePaths` a Pipefile declares. A hermetic stage can in addition read (and execute)
//! only below its read rules; `list` rules allow listing a folder's entries, not reading its files
//! (Python lists the folder of a script to import its sibling modules).
//!
//! With Landlock ABI 4 or later the same domain denies every TCP `bind()`/`connect()` (UDP needs
//! ABI 10: the network namespace covers it), and with ABI 6 it is *scoped*: no connecting to
//! abstract UNIX sockets or signalling processes outside the sandbox. Older kernels get what they
//! support (best effort); the helper reports what was enforced.

use std::path::PathBuf;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use serde::{Deserialize, Serialize};

/// The filesystem part of a processor's sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FsRules {
    /// Folders and files the processor may write into (and read).
    pub write: Vec<PathBuf>,
    /// `Some`: a hermetic stage, which may read and execute only below these. `None`: reads are
    /// not restricted.
    pub read: Option<Vec<PathBuf>>,
    /// Folders whose entries a hermetic stage may list (not read).
    pub list: Vec<PathBuf>,
    /// Deny TCP bind and connect (ABI 4+).
    pub deny_tcp: bool,
}

/// What [`restrict`] enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The kernel's Landlock ABI version.
    pub abi: i32,
    /// TCP bind/connect are denied.
    pub tcp: bool,
    /// Abstract UNIX sockets and signals are scoped to the sandbox.
    pub scoped: bool,
    /// Rule paths that do not exist (nothing to allow there).
    pub missing: Vec<PathBuf>,
}

/// The kernel's Landlock ABI version, `None` when Landlock is not built in or not enabled.
pub fn abi() -> Option<i32> {
    // SAFETY: with LANDLOCK_CREATE_RULESET_VERSION and a null attribute of size 0 the call only
    // returns the ABI version (or an error); it reads and writes no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    (v > 0).then_some(v as i32)
}

/// Restricts the calling (single-threaded) process and its future children to `rules`.
pub fn restrict(rules: &FsRules) -> Result<Applied, String> {
    let version = abi().ok_or("Landlock is not available in this kernel")?;
    let abi = ABI::from(version);
    // Device ioctls and pathname-socket connects are left alone: terminals, and local daemons
    // reached over UNIX sockets (syslog), are not filesystem writes.
    let write: BitFlags<AccessFs> =
        AccessFs::from_write(abi) & !(AccessFs::IoctlDev | AccessFs::ResolveUnix);
    let read: BitFlags<AccessFs> = AccessFs::from_read(abi);
    let handled = if rules.read.is_some() {
        write | read
    } else {
        write
    };
    let failed = |what: &str, err: landlock::RulesetError| format!("Landlock {what}: {err}");
    let mut ruleset = Ruleset::default()
        .handle_access(handled)
        .map_err(|e| failed("ruleset", e))?;
    let tcp = rules.deny_tcp && !AccessNet::from_all(abi).is_empty();
    if tcp {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(|e| failed("network rules", e))?;
    }
    let scoped = !Scope::from_all(abi).is_empty();
    if scoped {
        ruleset = ruleset
            .scope(Scope::from_all(abi))
            .map_err(|e| failed("scoping", e))?;
    }
    let mut created = ruleset.create().map_err(|e| failed("ruleset", e))?;
    let mut missing = Vec::new();
    let mut grants: Vec<(&PathBuf, BitFlags<AccessFs>)> = Vec::new();
    grants.extend(rules.write.iter().map(|p| (p, handled)));
    for p in rules.read.iter().flatten() {
        grants.push((p, read));
    }
    grants.extend(
        rules
            .list
            .iter()
            .map(|p| (p, BitFlags::from(AccessFs::ReadDir))),
    );
    for (path, access) in grants {
        let Ok(meta) = std::fs::metadata(path) else {
            missing.push(path.clone());
            continue;
        };
        let access = if meta.is_dir() {
            access
        } else {
            access & AccessFs::from_file(abi)
        };
        if access.is_empty() {
            continue;
        }
        let fd = PathFd::new(path)
            .map_err(|e| format!("Landlock rule for `{}`: {e}", path.display()))?;
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| failed(&format!("rule for `{}`", path.display()), e))?;
    }
    let status = created
        .restrict_self()
        .map_err(|e| failed("restrict_self", e))?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err("Landlock ruleset not enforced by this kernel".into());
    }
    Ok(Applied {
        abi: version,
        tcp,
        scoped,
        missing,
    })
}
