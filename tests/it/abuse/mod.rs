//! Abuse cases against a real router over real gitnodes: slow and hostile clients, oversized
//! and malformed input, path escapes, token games. Each test attacks one weakness, then checks
//! that the router is alive and serves a normal call, and bounds the router's memory and open
//! file descriptors during the attack (read from /proc). One file per group of issues.

mod auth;
mod connections;
mod messages;
mod paths;
mod sidechannels;

/// The resident memory (kB) and open file descriptors of process `pid`, from /proc.
pub fn rss_and_fds(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss_kb, fds)
}
