//! Loopback ports for the processes a test starts.
//!
//! Why not port 0 and take what the kernel gives: a process started later must be told its
//! port, so the port is free only "a moment ago" when the process binds it. A port the
//! kernel hands out for port 0 comes from the ephemeral range, the same range it picks the
//! local ports of outgoing connections from, and the tests make many (clients, node and
//! database connections). So now and then a router failed to start with "Address
//! already in use" on such a port (seen in CI: `abuse::connections::hostile_handshakes_and_resets_are_cut_off`). Ports here come from just below the ephemeral
//! range, which the kernel never hands out by itself, and each is handed out once per test
//! process.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// How many ports below the ephemeral range are used.
const SPAN: u32 = 12_000;
/// No port below this one is used, whatever the ephemeral range.
const FLOOR: u32 = 10_000;

/// A loopback port that was free a moment ago, below the kernel's ephemeral range and not
/// handed out before by this process.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, span) = range();
    // Test binaries run one after the other; starting each at its own offset keeps a port a
    // finished binary's process may still hold (TIME_WAIT, a lingering child) out of the way.
    let offset = std::process::id() % span;
    for _ in 0..span {
        let candidate = low + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(candidate) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("finding a free port")
}

/// The first port used and how many: the `SPAN` ports below the ephemeral range's start
/// (`/proc/sys/net/ipv4/ip_local_port_range`, Linux's default 32768 where it cannot be read),
/// not below `FLOOR`.
fn range() -> (u32, u32) {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let low = ephemeral_start.saturating_sub(SPAN).max(FLOOR);
    (low, ephemeral_start.saturating_sub(low).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_not_repeated() {
        let (low, span) = range();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        for port in &ports {
            let port = u32::from(*port);
            assert!(
                port >= low && port < low + span,
                "{port} outside {low}..{}",
                low + span
            );
        }
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
    }
}
