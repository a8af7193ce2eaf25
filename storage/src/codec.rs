//! The one place where values are turned into bytes and back, for disk and wire alike.
//!
//! Every encoded value starts with a format-version byte so a future layout can be told apart,
//! and decoding is bounded so a corrupt length prefix cannot make us allocate gigabytes. A
//! value that cannot be read is refused with an error naming the type asked for (and, for a
//! newer layout, both versions); it is never taken for something else. Which *cluster format*
//! may be sent or proposed at all is `crate::version`'s business.

use serde::{de::DeserializeOwned, Serialize};

/// Format version written in front of every encoded value.
pub const FORMAT_VERSION: u8 = 1;

/// Largest value we will ever decode (a log entry carrying the largest allowed message).
pub const DECODE_BYTES_MAX: usize = 128 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty value")]
    Empty,
    #[error(
        "{type_name} in encoding version {found}, newer than this build reads \
         (version {FORMAT_VERSION})"
    )]
    Version { type_name: &'static str, found: u8 },
    #[error("malformed {type_name}: {why}")]
    Decode {
        type_name: &'static str,
        why: String,
    },
    #[error("cannot encode value: {0}")]
    Encode(String),
    #[error("trailing bytes after value")]
    Trailing,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_BYTES_MAX>()
}

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // Encoding our own in-memory types cannot fail except on a size limit overflow, which is a
    // programmer error (values are bounded before they get here).
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .expect("encoding an in-memory value failed");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let type_name = std::any::type_name::<T>();
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::Version {
            type_name,
            found: version,
        });
    }
    let (value, used) =
        bincode::serde::decode_from_slice(body, config()).map_err(|e| CodecError::Decode {
            type_name,
            why: e.to_string(),
        })?;
    if used != body.len() {
        return Err(CodecError::Trailing);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_garbage() {
        // Goal: values survive encode/decode, and bad bytes give errors rather than panics.
        let v = (42u64, String::from("inbox"), vec![1u8, 2, 3]);
        let bytes = encode(&v);
        assert_eq!(decode::<(u64, String, Vec<u8>)>(&bytes).unwrap(), v);
        assert!(matches!(decode::<u64>(&[]), Err(CodecError::Empty)));
        let newer = decode::<u64>(&[9, 1]).unwrap_err();
        assert!(matches!(newer, CodecError::Version { found: 9, .. }));
        assert_eq!(
            newer.to_string(),
            "u64 in encoding version 9, newer than this build reads (version 1)"
        );
        let wrong = decode::<bool>(&[FORMAT_VERSION, 7]).unwrap_err();
        assert!(wrong.to_string().starts_with("malformed bool: "), "{wrong}");
        let mut trailing = encode(&7u64);
        trailing.push(0);
        assert!(matches!(
            decode::<u64>(&trailing),
            Err(CodecError::Trailing)
        ));
        // A huge announced length must fail without allocating.
        let bomb = [
            FORMAT_VERSION,
            0xfd,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0x7f,
        ];
        assert!(decode::<Vec<u8>>(&bomb).is_err());
    }

    /// The same two shapes, with byte fields as serde sequences (as stored before
    /// `serde_bytes`) and as byte strings (as message bodies are declared now).
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum AsSequence {
        Deliver { key: u8, body: Vec<u8> },
        Body(Option<Vec<u8>>),
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum AsBytes {
        Deliver {
            key: u8,
            #[serde(with = "serde_bytes")]
            body: Vec<u8>,
        },
        Body(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    }

    #[test]
    fn byte_fields_encode_the_same_as_sequences_and_as_byte_strings() {
        // Goal: declaring a body `serde_bytes` (one copy instead of a call per byte) changes
        // no stored or sent byte, so logs, snapshots and peers of either build agree.
        let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let pairs = [
            (
                AsSequence::Deliver {
                    key: 7,
                    body: body.clone(),
                },
                AsBytes::Deliver {
                    key: 7,
                    body: body.clone(),
                },
            ),
            (
                AsSequence::Body(Some(body.clone())),
                AsBytes::Body(Some(body)),
            ),
            (AsSequence::Body(None), AsBytes::Body(None)),
            (AsSequence::Body(Some(vec![])), AsBytes::Body(Some(vec![]))),
        ];
        for (seq, bytes) in pairs {
            let encoded = encode(&seq);
            assert_eq!(encoded, encode(&bytes), "{seq:?}");
            assert_eq!(decode::<AsBytes>(&encoded).unwrap(), bytes);
            assert_eq!(decode::<AsSequence>(&encode(&bytes)).unwrap(), seq);
        }
        // The length bound holds for byte strings too.
        let mut bomb = vec![FORMAT_VERSION, 1, 1, 0xfd];
        bomb.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(decode::<AsBytes>(&bomb).is_err());
    }
}
