//! The sidechannel's pkt-line reader and writer (`wire::pktline`). Properties: packets read
//! from any byte stream, delivered in any chunks, are a strict model's (four hex digits of
//! total length, `0000` flush, nothing over 65520); `copy_unframed` writes exactly the
//! payloads before the flush and fails without one; and `copy_framed` then `copy_unframed`
//! gives the input back.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use praefect_wire::pktline::{copy_framed, copy_unframed, read_packet, Packet, MAX_PAYLOAD};
use tokio::io::{AsyncRead, ReadBuf};

use super::{block_on, splittings};
use crate::engine::Target;

pub const TARGET: Target = Target {
    name: "pktline",
    about: "read_packet and copy_unframed over chunked streams against a strict model; framing round trip",
    check,
    dictionary,
    max_len: 4096,
};

fn dictionary() -> Vec<Vec<u8>> {
    vec![
        b"0000".to_vec(),
        b"0004".to_vec(),
        b"0005a".to_vec(),
        b"0001".to_vec(),
        b"fff0".to_vec(),
        b"fff1".to_vec(),
        b"FFF0".to_vec(),
        b"+004".to_vec(),
        b"-004".to_vec(),
        b" 004".to_vec(),
    ]
}

/// A reader that hands out its data in the given chunks, one per read at most.
struct Chunked(VecDeque<Vec<u8>>);

impl Chunked {
    fn new(chunks: &[&[u8]]) -> Self {
        Chunked(chunks.iter().map(|c| c.to_vec()).collect())
    }
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(front) = self.0.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.drain(..n);
            if front.is_empty() {
                self.0.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// What the strict model reads: packets up to the first bad one or the end.
#[derive(Debug, PartialEq)]
enum Step {
    Packet(Packet),
    /// A clean end before any header byte.
    End,
    /// A bad header, or a stream that ends inside a packet.
    Error,
}

fn model(stream: &[u8]) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut rest = stream;
    loop {
        if rest.is_empty() {
            steps.push(Step::End);
            return steps;
        }
        let Some(header) = rest.get(..4) else {
            steps.push(Step::Error);
            return steps;
        };
        if !header.iter().all(u8::is_ascii_hexdigit) {
            steps.push(Step::Error);
            return steps;
        }
        let len = header.iter().fold(0usize, |acc, b| {
            acc * 16 + (*b as char).to_digit(16).unwrap_or(0) as usize
        });
        match len {
            0 => {
                steps.push(Step::Packet(Packet::Flush));
                rest = &rest[4..];
            }
            1..=3 => {
                steps.push(Step::Error);
                return steps;
            }
            _ if len - 4 > MAX_PAYLOAD => {
                steps.push(Step::Error);
                return steps;
            }
            _ => match rest.get(4..len) {
                Some(payload) => {
                    steps.push(Step::Packet(Packet::Data(payload.to_vec())));
                    rest = &rest[len..];
                }
                None => {
                    steps.push(Step::Error);
                    return steps;
                }
            },
        }
    }
}

fn check(stream: &[u8]) -> String {
    let expected = model(stream);
    // What copy_unframed must write: the payloads up to the first flush, or an error.
    let mut unframed = Vec::new();
    let mut flushed = false;
    for step in &expected {
        match step {
            Step::Packet(Packet::Data(data)) => unframed.extend_from_slice(data),
            Step::Packet(Packet::Flush) => {
                flushed = true;
                break;
            }
            _ => break,
        }
    }
    for (n, chunks) in splittings(stream).into_iter().enumerate() {
        let mut reader = Chunked::new(&chunks);
        let mut steps = Vec::new();
        loop {
            let step = match block_on(read_packet(&mut reader)) {
                Ok(Some(packet)) => Step::Packet(packet),
                Ok(None) => Step::End,
                Err(_) => Step::Error,
            };
            let last = !matches!(step, Step::Packet(_));
            steps.push(step);
            if last {
                break;
            }
        }
        assert_eq!(steps, expected, "splitting {n}");

        let mut out = Vec::new();
        let result = block_on(copy_unframed(&mut Chunked::new(&chunks), &mut out));
        if flushed {
            assert_eq!(result.ok(), Some(unframed.len() as u64), "splitting {n}");
            assert_eq!(out, unframed, "splitting {n}");
        } else {
            assert!(result.is_err(), "no flush, yet copy_unframed succeeded");
        }

        let mut framed = Vec::new();
        block_on(copy_framed(&mut Chunked::new(&chunks), &mut framed)).expect("writes to memory");
        let mut back = Vec::new();
        block_on(copy_unframed(&mut &framed[..], &mut back)).expect("our own framing reads back");
        assert_eq!(back, stream, "framing round trip, splitting {n}");
    }
    let packets = expected.len() - 1;
    format!(
        "{} packets/{:?}",
        packets.min(4),
        expected.last().map(|s| match s {
            Step::Packet(_) => "packet",
            Step::End => "end",
            Step::Error => "error",
        })
    )
}
