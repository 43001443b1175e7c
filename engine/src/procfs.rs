//! Reading processes from `/proc`: process-group memory for the watchdog, start times for
//! recognising a process again after `pipe` restarted.
//!
//! Why not cgroups: the machines' cgroups belong to the host and `pipe` must not create or change
//! them; a process group is what `pipe` controls, and summing its members' resident memory a few
//! times a second is enough to stop a runaway processor long before the machine suffers.

use std::fs;

/// What `/proc/<pid>/stat` says about a process (the fields `pipe` needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub pgrp: i32,
    /// Start time after boot, in clock ticks: with the pid, identifies a process across time.
    pub start_time: u64,
    /// Resident set size in pages.
    pub rss_pages: u64,
}

/// Parses the content of `/proc/<pid>/stat`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses, so split at the
    // last `)`.
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); field N is rest[N - 3].
    Some(ProcStat {
        pid,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
        rss_pages: fields.get(21)?.parse().ok()?,
    })
}

/// The stat of one process, if it exists.
pub fn stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// This process's peak resident memory since its last `exec` (`VmHWM`), in KiB.
pub fn own_peak_rss_kb() -> Option<u64> {
    parse_peak_rss_kb(&fs::read_to_string("/proc/self/status").ok()?)
}

/// The `VmHWM` of a `/proc/<pid>/status` text, in KiB.
fn parse_peak_rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let value = line["VmHWM:".len()..].trim().strip_suffix("kB")?;
    value.trim().parse().ok()
}

/// Total resident memory of every process in group `pgrp`, in KiB.
pub fn group_rss_kb(pgrp: i32) -> u64 {
    let page_kb = (rustix::param::page_size() / 1024) as u64;
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat)
        .filter(|s| s.pgrp == pgrp)
        .map(|s| s.rss_pages * page_kb)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_peak_resident_memory_from_a_status_text_and_of_this_process() {
        let status = "Name:\tpipe\nVmPeak:\t  20000 kB\nVmHWM:\t    8132 kB\nVmRSS:\t    8000 kB\n";
        assert_eq!(parse_peak_rss_kb(status), Some(8132));
        assert_eq!(parse_peak_rss_kb("Name:\tpipe\n"), None);
        assert!(own_peak_rss_kb().is_some_and(|kb| kb > 0));
    }

    #[test]
    fn parses_stat_lines_even_with_odd_command_names() {
        let line = "4242 (my (odd) proc) S 1 4240 4240 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 987654 10000000 321 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            s,
            ProcStat {
                pid: 4242,
                pgrp: 4240,
                start_time: 987654,
                rss_pages: 321
            }
        );
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn reads_this_process() {
        let me = stat(std::process::id() as i32).unwrap();
        assert_eq!(me.pid, std::process::id() as i32);
        assert!(me.rss_pages > 0);
        assert!(group_rss_kb(me.pgrp) >= me.rss_pages * 4);
    }
}
