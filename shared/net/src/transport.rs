//! Frames and tensors over any stream half (QUIC or yamux-over-TCP, see [`crate::session`]):
//! the async edge of `fedstat_proto::wire`. Every read has a byte cap and the caller puts a
//! timeout around it; the caps and the frame budget are the same on both transports.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{Error, Result};
use fedstat_core::aggregate::{Staging, Values};
use fedstat_proto::wire::{decode_payload, encode_frame, frame_len, TensorMeta};

/// Largest piece read from a stream at once while receiving a tensor.
const CHUNK: usize = 256 * 1024;

fn stream_err(what: &'static str, e: impl std::error::Error) -> Error {
    // quinn's errors say "connection lost" and keep the why in their source.
    let mut problem = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        problem = format!("{problem}: {s}");
        source = s.source();
    }
    Error::wire(what, problem)
}

/// Write one frame.
pub async fn write_frame<T: Serialize>(send: &mut (impl AsyncWrite + Unpin), msg: &T) -> Result<()> {
    let bytes = encode_frame(msg)?;
    send.write_all(&bytes).await.map_err(|e| stream_err("stream", e))
}

/// Read one frame. `Ok(None)` when the stream ended cleanly before the frame started.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut (impl AsyncRead + Unpin),
    what: &'static str,
) -> Result<Option<T>> {
    match read_frame_payload(recv, what).await? {
        Some(payload) => Ok(Some(decode_payload(&payload, what)?)),
        None => Ok(None),
    }
}

/// Read one frame's payload without decoding it (to try it as more than one message type).
/// `Ok(None)` when the stream ended cleanly before the frame started.
pub async fn read_frame_payload<R: AsyncRead + Unpin>(
    recv: &mut R,
    what: &'static str,
) -> Result<Option<Vec<u8>>> {
    let mut prefix = [0u8; 4];
    let got = read_full(recv, &mut prefix)
        .await
        .map_err(|e| stream_err(what, e))?;
    if got == 0 {
        return Ok(None);
    }
    if got < prefix.len() {
        return Err(Error::wire(
            what,
            format!("stream finished early ({got} of 4 prefix bytes read)"),
        ));
    }
    let len = frame_len(prefix)?;
    // The prefix is the peer's claim: memory follows the bytes that actually arrive, a piece at
    // a time, and every piece waits for room in the process-wide budget, so thousands of
    // streams announcing 1 MiB and sending nothing more hold almost nothing. The caller's
    // timeout bounds the wait.
    let mut payload = Vec::new();
    let mut held = Vec::new();
    while payload.len() < len {
        let want = (len - payload.len()).min(FRAME_PIECE);
        // `want` <= FRAME_PIECE, far below u32::MAX; the budget is never closed.
        let permit = FRAME_BUDGET
            .acquire_many(want as u32)
            .await
            .map_err(|e| stream_err(what, e))?;
        held.push(permit);
        let start = payload.len();
        payload.resize(start + want, 0);
        let n = read_full(recv, &mut payload[start..])
            .await
            .map_err(|e| stream_err(what, e))?;
        if n < want {
            return Err(Error::wire(
                what,
                format!("stream finished early ({} of {len} bytes read)", start + n),
            ));
        }
    }
    Ok(Some(payload))
}

/// Fill `buf` unless the stream ends first; the bytes read.
async fn read_full<R: AsyncRead + Unpin>(recv: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match recv.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Bytes of partly received frames all connections together may hold (a complete frame is
/// decoded and dropped by its reader at once): with every stream of every connection sending
/// 1 MiB frames slowly, the coordinator still holds at most this much for them.
pub const FRAME_BUDGET_BYTES: usize = 64 << 20;
/// A frame is read and budgeted this many bytes at a time.
const FRAME_PIECE: usize = 64 << 10;
static FRAME_BUDGET: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(FRAME_BUDGET_BYTES);

/// Read a tensor body of the announced size, validating values as they arrive.
pub async fn read_tensor<R: AsyncRead + Unpin>(
    recv: &mut R,
    meta: TensorMeta,
    max_len: u64,
) -> Result<Values> {
    if meta.len > max_len {
        return Err(fedstat_proto::Error::TooLarge {
            what: "tensor",
            size: meta.byte_len()?,
            limit: max_len.saturating_mul(meta.dtype.size() as u64),
        }
        .into());
    }
    let mut remaining = meta.byte_len()? as usize;
    let mut staging = Staging::new(meta.dtype, meta.len as usize);
    let mut chunk = vec![0u8; remaining.min(CHUNK)];
    while remaining > 0 {
        let want = remaining.min(CHUNK);
        let n = recv
            .read(&mut chunk[..want])
            .await
            .map_err(|e| stream_err("tensor stream", e))?;
        if n == 0 {
            return Err(fedstat_core::Error::Rejected(format!(
                "stream ended {remaining} bytes before the tensor did"
            ))
            .into());
        }
        remaining -= n;
        staging.push(&chunk[..n])?;
    }
    Ok(staging.finish()?)
}

/// Read a masked answer's body: `len` bytes of ring elements (any bytes are valid: they are
/// uniformly random to the reader). The caller bounds `len` before calling.
pub async fn read_masked<R: AsyncRead + Unpin>(recv: &mut R, len: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = recv
            .read(&mut out[filled..])
            .await
            .map_err(|e| stream_err("masked answer stream", e))?;
        if n == 0 {
            return Err(fedstat_core::Error::Rejected(format!(
                "stream ended {} bytes before the masked answer did",
                len - filled
            ))
            .into());
        }
        filled += n;
    }
    Ok(out)
}

/// Write a tensor body.
pub async fn write_tensor<W: AsyncWrite + Unpin>(send: &mut W, bytes: &[u8]) -> Result<()> {
    send.write_all(bytes)
        .await
        .map_err(|e| stream_err("tensor stream", e))
}
