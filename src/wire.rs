//! The wire protocol of PROTOCOL.md: frame types, the length-prefixed
//! codec, the JSON bodies, and the error codes. The codec checks a frame's
//! length before it reserves a byte, so a peer cannot make the server
//! allocate from an unchecked length.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use tokio_util::codec::{Decoder, Encoder};

/// ALPN protocol id the server offers (PROTOCOL.md Transport).
pub const ALPN: &[u8] = b"tollgate/1";

/// A frame type byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// C→S.
    Hello = 0x01,
    /// S→C.
    Welcome = 0x02,
    /// S→C, then close.
    Reject = 0x03,
    /// C→S.
    Put = 0x10,
    /// Both ways; raw bytes.
    Data = 0x11,
    /// Both ways.
    End = 0x12,
    /// S→C.
    Stored = 0x13,
    /// C→S.
    List = 0x20,
    /// S→C.
    Listing = 0x21,
    /// C→S.
    Get = 0x30,
    /// S→C.
    File = 0x31,
    /// C→S.
    Delete = 0x40,
    /// S→C.
    Deleted = 0x41,
    /// S→C.
    Error = 0x7E,
    /// Both ways.
    Bye = 0x7F,
}

impl Kind {
    /// The type for a byte, if it is one.
    pub fn from_byte(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            0x01 => Hello,
            0x02 => Welcome,
            0x03 => Reject,
            0x10 => Put,
            0x11 => Data,
            0x12 => End,
            0x13 => Stored,
            0x20 => List,
            0x21 => Listing,
            0x30 => Get,
            0x31 => File,
            0x40 => Delete,
            0x41 => Deleted,
            0x7E => Error,
            0x7F => Bye,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Its type.
    pub kind: Kind,
    /// Its payload: JSON, or raw bytes for DATA.
    pub payload: Bytes,
}

impl Frame {
    /// A control frame with a JSON body.
    pub fn json<T: Serialize>(kind: Kind, body: &T) -> Frame {
        Frame {
            kind,
            payload: Bytes::from(serde_json::to_vec(body).expect("wire bodies serialize")),
        }
    }
}

/// A frame the codec cannot accept; each is fatal for the connection.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// `length == 0` (ERROR `bad_frame`).
    #[error("a frame of length 0")]
    Empty,
    /// `length > max_frame + 1` (ERROR `frame_too_large`).
    #[error("a frame of {0} bytes, over the limit")]
    TooLarge(u32),
    /// An unknown type byte (ERROR `protocol_violation`).
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The connection failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Length-prefixed frames: `u32 BE length | u8 type | payload`.
#[derive(Clone, Copy, Debug)]
pub struct FrameCodec {
    max_frame: u32,
}

impl FrameCodec {
    /// A codec that accepts payloads up to `max_frame` bytes.
    pub fn new(max_frame: u32) -> FrameCodec {
        FrameCodec { max_frame }
    }

    /// Changes the largest payload accepted from the next frame on (the
    /// server raises it from `hello_max_frame` to `max_frame` at WELCOME).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// The largest payload accepted now.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        if len == 0 {
            return Err(CodecError::Empty);
        }
        if len > self.max_frame.saturating_add(1) {
            return Err(CodecError::TooLarge(len));
        }
        if src.len() >= 5 && Kind::from_byte(src[4]).is_none() {
            return Err(CodecError::UnknownType(src[4]));
        }
        let total = 4 + len as usize;
        if src.len() < total {
            // Bounded by max_frame above, so this reservation is safe.
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(4);
        let kind = Kind::from_byte(src.get_u8()).ok_or(CodecError::UnknownType(0))?;
        let payload = src.split_to(len as usize - 1).freeze();
        Ok(Some(Frame { kind, payload }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, f: Frame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        let len = u32::try_from(f.payload.len() + 1)
            .map_err(|_| std::io::Error::other("frame too large to send"))?;
        dst.reserve(4 + len as usize);
        dst.put_u32(len);
        dst.put_u8(f.kind as u8);
        dst.extend_from_slice(&f.payload);
        Ok(())
    }
}

/// Decodes a control payload: it must be a JSON object with the required
/// fields of the right types; unknown fields are ignored. The error names
/// the field (PROTOCOL.md Frames).
pub fn parse<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|_| "the payload is not JSON".to_string())?;
    if !value.is_object() {
        return Err("the payload is not a JSON object".into());
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            // serde names a missing field in its own message.
            inner
        } else {
            format!("field `{path}`: {inner}")
        }
    })
}

/// HELLO: the fields admission decides on (`policy::Hello`), decoded here.
pub type Hello = crate::policy::Hello;

/// HELLO as a client writes it.
#[derive(Serialize, Default)]
pub struct HelloOut<'a> {
    /// Protocol version.
    pub protocol: i64,
    /// Client id.
    pub client_id: &'a str,
    /// Issued secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<&'a str>,
    /// Customer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<&'a str>,
    /// Enrollment key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enroll_key: Option<&'a str>,
    /// Kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'a str>,
    /// Hostname.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<&'a str>,
    /// Schedule.
    pub schedule: &'a str,
    /// Intent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent: Option<&'a str>,
}

/// WELCOME.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Welcome {
    /// Session id.
    pub session: String,
    /// Client id.
    pub client_id: String,
    /// Customer name.
    pub customer: String,
    /// Reseller name; null for the Default Customer.
    pub reseller: Option<String>,
    /// Whether this HELLO registered the client.
    pub registered: bool,
    /// The issued secret, only when one was issued.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub secret: Option<String>,
    /// Upload rate in force now (bytes/s); null = unthrottled.
    pub rate: Option<u64>,
    /// Bytes the client may still store; null = unlimited.
    pub space_left: Option<u64>,
    /// Largest DATA payload accepted.
    pub max_frame: u32,
}

/// REJECT.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Code for programs.
    pub code: String,
    /// Message for people.
    pub message: String,
    /// With `rate_limited`: seconds to wait before trying again
    /// (PROTOCOL.md Additions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// ERROR.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    /// Code for programs.
    pub code: String,
    /// Message for people.
    pub message: String,
    /// Whether the server closes after it.
    pub fatal: bool,
}

/// PUT.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Put {
    /// Client path.
    pub path: String,
    /// Exact byte count that follows.
    pub size: u64,
    /// Permission bits (e.g. 420 for 0644); optional (PROTOCOL.md Additions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Modification time, RFC 3339; optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<String>,
}

/// Largest `mode` a PUT may carry: permission bits with setuid, setgid and
/// sticky (0o7777).
pub const MAX_MODE: u32 = 0o7777;

impl Put {
    /// Checks `mode` and `mtime` and puts `mtime` in its canonical form
    /// (UTC, as the server returns it). The error names the field.
    pub fn checked_meta(&self) -> Result<(Option<u32>, Option<String>), String> {
        if let Some(m) = self.mode
            && m > MAX_MODE
        {
            return Err(format!(
                "field `mode`: {m} is not permission bits (at most {MAX_MODE}, 0o7777)"
            ));
        }
        let mtime = match &self.mtime {
            None => None,
            Some(t) if t.len() > 64 => {
                return Err("field `mtime`: longer than an RFC 3339 instant".into());
            }
            Some(t) => match t.parse::<jiff::Timestamp>() {
                Ok(ts) => Some(ts.to_string()),
                Err(_) => {
                    return Err(format!(
                        "field `mtime`: {:?} is not an RFC 3339 instant such as \"2026-11-30T08:15:00Z\"",
                        crate::config::escape_log(t, 64)
                    ));
                }
            },
        };
        Ok((self.mode, mtime))
    }
}

/// END.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct End {
    /// SHA-256, 64 lowercase hex.
    pub sha256: String,
}

/// STORED and FILE.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct FileInfo {
    /// Client path.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256.
    pub sha256: String,
    /// Permission bits from PUT; null when it had none.
    #[serde(default)]
    pub mode: Option<u32>,
    /// Modification time from PUT (RFC 3339); null when it had none.
    #[serde(default)]
    pub mtime: Option<String>,
}

/// LIST.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct List {
    /// Only paths starting with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// One LISTING entry.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Client path.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256.
    pub sha256: String,
    /// RFC 3339 UTC: when the server stored it.
    pub modified: String,
    /// Permission bits from PUT; null when it had none.
    #[serde(default)]
    pub mode: Option<u32>,
    /// Modification time from PUT (RFC 3339); null when it had none.
    #[serde(default)]
    pub mtime: Option<String>,
}

/// LISTING.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Listing {
    /// Entries of this page.
    pub entries: Vec<Entry>,
    /// More pages follow.
    pub more: bool,
}

/// GET and DELETE.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PathOnly {
    /// Client path.
    pub path: String,
}

/// DELETED.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Deleted {
    /// Client path.
    pub path: String,
    /// Bytes freed.
    pub freed: u64,
}

/// BYE.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Bye {
    /// Why the server ends the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An ERROR code (PROTOCOL.md ERROR). Codes never change meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed or misplaced request.
    BadRequest,
    /// A path against the rules.
    BadPath,
    /// No room for the upload.
    QuotaExceeded,
    /// More or fewer bytes than PUT announced.
    SizeMismatch,
    /// The digest differs.
    ChecksumMismatch,
    /// No such file.
    NotFound,
    /// Disk full or I/O failure.
    StorageError,
    /// A frame over the limit.
    FrameTooLarge,
    /// A frame of length 0.
    BadFrame,
    /// An unknown or misplaced frame type.
    ProtocolViolation,
    /// Something failed inside the server.
    Internal,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadRequest,
        ErrorCode::BadPath,
        ErrorCode::QuotaExceeded,
        ErrorCode::SizeMismatch,
        ErrorCode::ChecksumMismatch,
        ErrorCode::NotFound,
        ErrorCode::StorageError,
        ErrorCode::FrameTooLarge,
        ErrorCode::BadFrame,
        ErrorCode::ProtocolViolation,
        ErrorCode::Internal,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadPath => "bad_path",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::SizeMismatch => "size_mismatch",
            ErrorCode::ChecksumMismatch => "checksum_mismatch",
            ErrorCode::NotFound => "not_found",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// RFC 3339 UTC for a Unix time.
pub fn rfc3339(secs: i64) -> String {
    jiff::Timestamp::from_second(secs)
        .map_or_else(|_| "1970-01-01T00:00:00Z".into(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(max: u32, bytes: &[u8]) -> Result<Option<Frame>, CodecError> {
        FrameCodec::new(max).decode(&mut BytesMut::from(bytes))
    }

    #[test]
    fn codec_round_trip_and_limits() {
        let mut buf = BytesMut::new();
        let f = Frame {
            kind: Kind::Data,
            payload: Bytes::from_static(b"abc"),
        };
        FrameCodec::new(16).encode(f.clone(), &mut buf).unwrap();
        assert_eq!(&buf[..], b"\0\0\0\x04\x11abc");
        assert_eq!(decode(16, &buf).unwrap(), Some(f));
        assert!(
            decode(16, &buf[..6]).unwrap().is_none(),
            "partial frame waits"
        );
        assert!(matches!(
            decode(16, b"\0\0\0\0\x01"),
            Err(CodecError::Empty)
        ));
        assert!(matches!(
            decode(16, b"\0\0\0\x12\x11"),
            Err(CodecError::TooLarge(18))
        ));
        assert!(
            decode(16, b"\0\0\0\x11\x11").unwrap().is_none(),
            "max_frame + 1 is allowed"
        );
        assert!(matches!(
            decode(16, b"\0\0\0\x02\x55x"),
            Err(CodecError::UnknownType(0x55))
        ));
    }

    #[test]
    fn a_huge_length_allocates_nothing() {
        let mut codec = FrameCodec::new(1 << 20);
        let mut buf = BytesMut::from(&[0xFF, 0xFF, 0xFF, 0xF0, 0x11][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(CodecError::TooLarge(0xFFFF_FFF0))
        ));
        assert!(buf.capacity() < 1024, "capacity grew to {}", buf.capacity());
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = parse::<Put>(br#"{"path": "a"}"#).unwrap_err();
        assert!(e.contains("size"), "{e}");
        let e = parse::<Put>(br#"{"path": "a", "size": "big"}"#).unwrap_err();
        assert!(e.contains("`size`"), "{e}");
        assert!(
            parse::<Put>(b"[1]")
                .unwrap_err()
                .contains("not a JSON object")
        );
        assert!(parse::<Put>(b"\xff").unwrap_err().contains("not JSON"));
        let ok: Put = parse(br#"{"path": "a", "size": 3, "future": true}"#).unwrap();
        assert_eq!(ok.size, 3);
    }
}
