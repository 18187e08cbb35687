//! `metrics::grpc::MessageCounter`, which counts the gRPC messages of a forwarded byte stream
//! as it passes, in whatever chunks it passes. Properties: the count is the model's (messages
//! parsed from the whole stream at once), for every splitting of the stream, and it never
//! decreases.

use praefect::metrics::grpc::MessageCounter;

use super::splittings;
use crate::engine::Target;

pub const TARGET: Target = Target {
    name: "message_counter",
    about: "MessageCounter over chunked streams against whole-stream parsing",
    check,
    dictionary,
    max_len: 4096,
};

fn dictionary() -> Vec<Vec<u8>> {
    vec![
        vec![0, 0, 0, 0, 0],
        vec![0, 0, 0, 0, 1, b'x'],
        vec![1, 0, 0, 0, 2, b'x', b'y'],
        vec![0, 0, 0, 0, 5],
        vec![0, 0xff, 0xff, 0xff, 0xff],
    ]
}

/// The messages complete in `stream`, parsed at once, and the bytes left after them.
fn model(stream: &[u8]) -> (u64, usize) {
    let mut count = 0;
    let mut pos = 0usize;
    while let Some(header) = stream.get(pos..pos + 5) {
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if stream.len() - pos - 5 < len {
            break;
        }
        count += 1;
        pos += 5 + len;
    }
    (count, stream.len() - pos)
}

fn check(stream: &[u8]) -> String {
    let (expected, left) = model(stream);
    for (n, chunks) in splittings(stream).into_iter().enumerate() {
        let mut counter = MessageCounter::default();
        let mut counted = 0u64;
        for chunk in chunks {
            counted = counted
                .checked_add(counter.feed(chunk))
                .expect("the count overflowed");
        }
        assert_eq!(counted, expected, "splitting {n}");
    }
    // Outcome: the count and where the stream stops (between messages, in a header, in a
    // body), the states the counter carries from one chunk to the next.
    let state = match left {
        0 => "between messages",
        1..=4 => "in a header",
        _ => "in a body",
    };
    format!("{} messages/{state}", expected.min(8))
}
