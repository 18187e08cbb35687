//! The targets, one file per parser.

use crate::engine::{fnv, Target};

pub mod auth;
pub mod config;
pub mod duration;
pub mod first_message;
pub mod message_counter;
pub mod pktline;
pub mod rewrite;

/// Every target, in the order `praefect-fuzz run` takes them.
pub fn all() -> Vec<Target> {
    vec![
        first_message::TARGET,
        rewrite::TARGET,
        message_counter::TARGET,
        auth::HEADER,
        auth::TOKEN,
        pktline::TARGET,
        duration::TARGET,
        config::TARGET,
    ]
}

/// The target named `name`.
pub fn find(name: &str) -> Option<Target> {
    all().into_iter().find(|t| t.name == name)
}

/// Splittings of `data` into chunks, as the network may deliver it: whole, byte by byte, and
/// at points drawn from the input's own hash (so that a saved input replays the same way).
pub fn splittings(data: &[u8]) -> Vec<Vec<&[u8]>> {
    let mut out = vec![vec![data], data.chunks(1).collect()];
    let mut state = fnv(data) | 1;
    let mut chunks = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        // xorshift: cheap, and only has to scatter the cut points.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let take = 1 + (state % 9) as usize;
        let (head, tail) = rest.split_at(take.min(rest.len()));
        chunks.push(head);
        rest = tail;
    }
    out.push(chunks);
    out
}

/// Runs a future that never waits on anything outside it (readers over memory).
pub(crate) fn block_on<F: std::future::Future>(future: F) -> F::Output {
    futures::executor::block_on(future)
}
