//! The container a VM state file is written in: a fixed header that says
//! what the file is and which format version it holds, a body, and a
//! SHA-256 of everything before it.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "HUSKSNAP"
//!      8     4  format version (u32, little endian)
//!     12     4  reserved, 0
//!     16     8  body length in bytes (u64, little endian)
//!     24     n  body: the state as JSON
//!   24+n    32  SHA-256 of bytes 0 .. 24+n
//! ```
//!
//! A reader checks, in this order, the magic, the version, the length
//! against what is there, and the checksum, and only then decodes the body:
//! a file from another husk, a truncated copy or a flipped bit is refused
//! with its own error before a byte of it is believed.

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// What every state file starts with.
pub const MAGIC: [u8; 8] = *b"HUSKSNAP";
/// The format this husk writes and the only one it reads. Bump it whenever
/// the body's shape changes in a way an older reader would misread.
pub const FORMAT_VERSION: u32 = 2;
/// Bytes before the body.
pub const HEADER_LEN: usize = 24;
/// Bytes of the checksum after the body.
pub const CHECKSUM_LEN: usize = 32;
/// The largest body a reader accepts (a guard against a length field that
/// would make it allocate without bound); real ones are well under 1 MiB.
pub const MAX_BODY_LEN: u64 = 64 << 20;

/// Why a state file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Shorter than a header and a checksum.
    #[error("the file is {0} bytes, too short to be a husk snapshot")]
    TooShort(usize),
    /// Not a husk state file at all.
    #[error("not a husk snapshot (wrong magic)")]
    BadMagic,
    /// Written by a husk with another format.
    #[error("snapshot format version {found}; this husk reads version {FORMAT_VERSION}")]
    Version {
        /// The version in the file.
        found: u32,
    },
    /// The body length in the header is absurd.
    #[error("the header announces a body of {0} bytes, more than a snapshot can hold")]
    BodyTooLarge(u64),
    /// Fewer bytes than the header announces: a truncated copy.
    #[error("the file is truncated: {have} bytes, the header announces {want}")]
    Truncated {
        /// Bytes in the file.
        have: usize,
        /// Bytes the header says it has.
        want: usize,
    },
    /// More bytes than the header announces.
    #[error("the file has {0} bytes after its checksum")]
    TrailingBytes(usize),
    /// The checksum does not match: the file was changed or damaged.
    #[error("the checksum does not match: the file is corrupt")]
    Checksum,
    /// The body passed every check but does not decode.
    #[error("the state in the file does not decode")]
    Decode(#[source] serde_json::Error),
    /// The state could not be encoded.
    #[error("the state cannot be encoded")]
    Encode(#[source] serde_json::Error),
}

/// Encodes `state` as a complete state file.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FormatError> {
    let body = serde_json::to_vec(state).map_err(FormatError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CHECKSUM_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    Ok(out)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Checks a state file and returns its body, not yet decoded.
pub fn verify(file: &[u8]) -> Result<&[u8], FormatError> {
    if file.len() < HEADER_LEN + CHECKSUM_LEN {
        // Even a short file says what it is, if it can.
        if file.len() >= MAGIC.len() && file[..MAGIC.len()] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        return Err(FormatError::TooShort(file.len()));
    }
    if file[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = le_u32(&file[8..12]);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let body_len = le_u64(&file[16..24]);
    if body_len > MAX_BODY_LEN {
        return Err(FormatError::BodyTooLarge(body_len));
    }
    // MAX_BODY_LEN keeps this from overflowing.
    let want = HEADER_LEN + body_len as usize + CHECKSUM_LEN;
    if file.len() < want {
        return Err(FormatError::Truncated {
            have: file.len(),
            want,
        });
    }
    if file.len() > want {
        return Err(FormatError::TrailingBytes(file.len() - want));
    }
    let (signed, sum) = file.split_at(want - CHECKSUM_LEN);
    if Sha256::digest(signed).as_slice() != sum {
        return Err(FormatError::Checksum);
    }
    Ok(&signed[HEADER_LEN..])
}

/// Checks and decodes a state file.
pub fn decode<T: DeserializeOwned>(file: &[u8]) -> Result<T, FormatError> {
    serde_json::from_slice(verify(file)?).map_err(FormatError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Sample {
        name: String,
        regs: Vec<u64>,
        lapic: kvm_bindings::kvm_lapic_state,
    }

    fn sample() -> Sample {
        let mut lapic = kvm_bindings::kvm_lapic_state::default();
        lapic.regs[0x20] = 7;
        lapic.regs[1023] = -3;
        Sample {
            name: "vm".into(),
            regs: vec![1, u64::MAX, 0x1234],
            lapic,
        }
    }

    #[test]
    fn a_state_round_trips() {
        let file = encode(&sample()).unwrap();
        assert_eq!(&file[..8], b"HUSKSNAP");
        let back: Sample = decode(&file).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn another_format_version_is_refused_before_anything_else() {
        let mut file = encode(&sample()).unwrap();
        let next = FORMAT_VERSION + 1;
        file[8..12].copy_from_slice(&next.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&file),
            Err(FormatError::Version { found }) if found == next
        ));
        // Even with its checksum fixed up: the version decides.
        let n = file.len();
        let sum = Sha256::digest(&file[..n - CHECKSUM_LEN]);
        file[n - CHECKSUM_LEN..].copy_from_slice(&sum);
        assert!(matches!(
            decode::<Sample>(&file),
            Err(FormatError::Version { found }) if found == next
        ));
    }

    #[test]
    fn a_flipped_bit_anywhere_in_the_body_fails_the_checksum() {
        let file = encode(&sample()).unwrap();
        for at in [HEADER_LEN, HEADER_LEN + 10, file.len() - CHECKSUM_LEN - 1] {
            let mut bad = file.clone();
            bad[at] ^= 0x01;
            assert!(
                matches!(decode::<Sample>(&bad), Err(FormatError::Checksum)),
                "byte {at}"
            );
        }
        let mut bad = file.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x80;
        assert!(matches!(decode::<Sample>(&bad), Err(FormatError::Checksum)));
        // The reserved word is covered too.
        let mut bad = file;
        bad[12] = 1;
        assert!(matches!(decode::<Sample>(&bad), Err(FormatError::Checksum)));
    }

    #[test]
    fn truncated_and_padded_files_are_refused() {
        let file = encode(&sample()).unwrap();
        for len in [file.len() - 1, file.len() - CHECKSUM_LEN, HEADER_LEN + 40] {
            assert!(
                matches!(
                    decode::<Sample>(&file[..len]),
                    Err(FormatError::Truncated { .. })
                ),
                "{len} bytes"
            );
        }
        for len in [0, 5, 30] {
            assert!(
                matches!(
                    decode::<Sample>(&file[..len]),
                    Err(FormatError::TooShort(_))
                ),
                "{len} bytes"
            );
        }
        let mut long = file.clone();
        long.push(0);
        assert!(matches!(
            decode::<Sample>(&long),
            Err(FormatError::TrailingBytes(1))
        ));
    }

    #[test]
    fn other_files_and_absurd_lengths_are_refused() {
        assert!(matches!(
            decode::<Sample>(b"\x7fELF\x02\x01\x01\0 and then some more bytes of an ELF file"),
            Err(FormatError::BadMagic)
        ));
        assert!(matches!(
            decode::<Sample>(b"not a snapshot"),
            Err(FormatError::BadMagic)
        ));
        let mut file = encode(&sample()).unwrap();
        file[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&file),
            Err(FormatError::BodyTooLarge(u64::MAX))
        ));
    }

    #[test]
    fn a_body_of_the_wrong_shape_is_a_decode_error() {
        let file = encode(&serde_json::json!({"name": 1})).unwrap();
        assert!(matches!(
            decode::<Sample>(&file),
            Err(FormatError::Decode(_))
        ));
    }
}
