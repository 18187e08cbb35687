//! Git's pkt-line framing, as the sidechannel uses it from caller to server: each packet is
//! four hex digits of total length (including the four) and a payload of at most 65516 bytes;
//! `0000` (flush) ends the caller's data, standing in for a half-close.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest payload of one packet.
pub const MAX_PAYLOAD: usize = 65516;
/// The flush packet.
pub const FLUSH: &[u8; 4] = b"0000";

/// One decoded packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet {
    Data(Vec<u8>),
    Flush,
}

/// A malformed packet header or an I/O failure.
#[derive(Debug, thiserror::Error)]
pub enum PktError {
    #[error("invalid pkt-line length header {0:?}")]
    BadHeader(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Writes `data` as one or more data packets (no flush).
pub async fn write_data<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> std::io::Result<()> {
    for chunk in data.chunks(MAX_PAYLOAD) {
        w.write_all(format!("{:04x}", chunk.len() + 4).as_bytes())
            .await?;
        w.write_all(chunk).await?;
    }
    Ok(())
}

/// Reads one packet; `Ok(None)` at a clean end of stream before any header byte.
pub async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Packet>, PktError> {
    let mut header = [0u8; 4];
    let mut filled = 0;
    while filled < 4 {
        let n = r.read(&mut header[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(PktError::BadHeader(
                    String::from_utf8_lossy(&header[..filled]).into(),
                ))
            };
        }
        filled += n;
    }
    // Four hex digits and nothing else: `from_str_radix` alone would also take a sign
    // ("+004"), which git never writes.
    if !header.iter().all(u8::is_ascii_hexdigit) {
        return Err(PktError::BadHeader(String::from_utf8_lossy(&header).into()));
    }
    let text =
        std::str::from_utf8(&header).map_err(|_| PktError::BadHeader(format!("{header:?}")))?;
    let len = usize::from_str_radix(text, 16).map_err(|_| PktError::BadHeader(text.into()))?;
    match len {
        0 => Ok(Some(Packet::Flush)),
        1..=3 => Err(PktError::BadHeader(text.into())),
        _ if len - 4 > MAX_PAYLOAD => Err(PktError::BadHeader(text.into())),
        _ => {
            let mut payload = vec![0u8; len - 4];
            r.read_exact(&mut payload).await?;
            Ok(Some(Packet::Data(payload)))
        }
    }
}

/// Copies everything from `src` to `dst` as data packets, then a flush.
pub async fn copy_framed<R, W>(src: &mut R, dst: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let mut total = 0u64;
    loop {
        let n = src.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        write_data(dst, &buf[..n]).await?;
        total += n as u64;
    }
    dst.write_all(FLUSH).await?;
    dst.flush().await?;
    Ok(total)
}

/// Copies the payloads of data packets from `src` to `dst` until a flush; returns the byte
/// count. Ending without a flush is an error: the caller went away mid-stream.
pub async fn copy_unframed<R, W>(src: &mut R, dst: &mut W) -> Result<u64, PktError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        match read_packet(src).await? {
            Some(Packet::Data(data)) => {
                dst.write_all(&data).await?;
                total += data.len() as u64;
            }
            Some(Packet::Flush) => return Ok(total),
            None => {
                return Err(PktError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "stream ended before the flush packet",
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_large_data_in_bounded_packets() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut framed = Vec::new();
        copy_framed(&mut &data[..], &mut framed).await.unwrap();
        assert!(framed.ends_with(FLUSH));
        assert_eq!(&framed[..4], b"fff0");
        let mut out = Vec::new();
        let n = copy_unframed(&mut &framed[..], &mut out).await.unwrap();
        assert_eq!(n as usize, data.len());
        assert_eq!(out, data);
    }

    #[tokio::test]
    async fn rejects_bad_headers_and_missing_flush() {
        for bad in [&b"zzzz"[..], b"0002", b"fff5", b"00", b"+004", b"-004"] {
            assert!(read_packet(&mut &bad[..]).await.is_err(), "{bad:?}");
        }
        let mut out = Vec::new();
        assert!(copy_unframed(&mut &b"0009hello"[..], &mut out)
            .await
            .is_err());
        assert_eq!(read_packet(&mut &b""[..]).await.unwrap(), None);
    }
}
