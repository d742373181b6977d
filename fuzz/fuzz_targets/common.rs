//! Helpers shared by the wire targets: decode a stream of frames the way a receiver does, and
//! check what came out against properties every decoded message must have.

use fedstat_proto::wire::{decode_frame, decode_payload, encode_frame};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decode frames from the front of `buf` until one is incomplete or invalid, as a receiver
/// reading one stream would; hand each message to `check`. Returns the bytes left after the
/// last whole frame.
pub fn frames<'a, T>(mut buf: &'a [u8], what: &'static str, mut check: impl FnMut(&T)) -> &'a [u8]
where
    T: Serialize + DeserializeOwned,
{
    loop {
        match decode_frame::<T>(buf, what) {
            Ok(Some((msg, used))) => {
                let frame = &buf[..used];
                round_trip(&msg, frame, what);
                check(&msg);
                buf = &buf[used..];
            }
            Ok(None) | Err(_) => return buf,
        }
    }
}

/// Decode one frame from the front of `buf` with the same checks; the message and the bytes
/// after it (a tensor body, say).
pub fn one<'a, T>(buf: &'a [u8], what: &'static str) -> Option<(T, &'a [u8])>
where
    T: Serialize + DeserializeOwned,
{
    let (msg, used) = decode_frame::<T>(buf, what).ok()??;
    round_trip(&msg, &buf[..used], what);
    Some((msg, &buf[used..]))
}

/// A decoded message re-encodes (no bigger than it came: the prefix bounds it), the re-encoding
/// decodes to the same bytes again, and every strict prefix of the original frame asks for more.
fn round_trip<T: Serialize + DeserializeOwned>(msg: &T, frame: &[u8], what: &'static str) {
    let again = encode_frame(msg).expect("a decoded message re-encodes");
    assert!(again.len() <= frame.len(), "re-encoding grew");
    let back: T = decode_payload(&again[4..], what).expect("a re-encoded message decodes");
    assert_eq!(
        encode_frame(&back).expect("encode"),
        again,
        "encoding is not stable"
    );
    let cut = &frame[..frame.len() - 1];
    assert!(
        matches!(decode_frame::<T>(cut, what), Ok(None)),
        "a truncated frame must need more bytes"
    );
}
