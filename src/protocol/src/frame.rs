//! Framing: a 4-byte big-endian length, then that many bytes of JSON. The
//! length is checked against [`MAX_FRAME`] before anything is allocated, so
//! a peer cannot make the reader allocate more than that.

use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The largest frame either side accepts (an OCI runtime spec with many
/// mounts and env vars fits easily).
pub const MAX_FRAME: usize = 1 << 20;

/// A frame that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed mid-frame.
    #[error("the connection failed")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection between frames.
    #[error("the peer closed the connection")]
    Closed,
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// The frame is not the JSON expected.
    #[error("invalid message")]
    Json(#[from] serde_json::Error),
}

/// Reads the next frame's raw bytes; `Ok(None)` on a clean close between
/// frames.
pub fn read_raw<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(Some(buf))
}

/// Reads and decodes the next frame.
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let raw = read_raw(r)?.ok_or(FrameError::Closed)?;
    Ok(serde_json::from_slice(&raw)?)
}

/// Encodes `msg` into one frame's bytes.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Encodes and writes one frame (a single write, so frames from several
/// threads sharing a locked writer never interleave).
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_clean_close() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &serde_json::json!({"a": 1})).unwrap();
        write_frame(&mut buf, &"second").unwrap();
        let mut r = &buf[..];
        let v: serde_json::Value = read_frame(&mut r).unwrap();
        assert_eq!(v["a"], 1);
        let s: String = read_frame(&mut r).unwrap();
        assert_eq!(s, "second");
        assert!(matches!(
            read_frame::<_, String>(&mut r),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn oversized_truncated_and_garbage_frames() {
        let huge = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert!(matches!(
            read_raw(&mut &huge[..]),
            Err(FrameError::TooLarge(_))
        ));
        let truncated = [0u8, 0, 0, 10, b'{'];
        assert!(matches!(
            read_raw(&mut &truncated[..]),
            Err(FrameError::Io(_))
        ));
        let half_len = [0u8, 0];
        assert!(matches!(
            read_raw(&mut &half_len[..]),
            Err(FrameError::Io(_))
        ));
        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"{x}");
        assert!(matches!(
            read_frame::<_, serde_json::Value>(&mut &garbage[..]),
            Err(FrameError::Json(_))
        ));
    }

    #[test]
    fn messages_leave_the_cause_to_the_source() {
        use std::error::Error;
        let io = FrameError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        let json = FrameError::from(serde_json::from_str::<u32>("x").unwrap_err());
        for e in [io, json] {
            let cause = e.source().expect("a source").to_string();
            assert!(!e.to_string().contains(&cause), "{e} repeats {cause}");
        }
    }
}
