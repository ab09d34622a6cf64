//! Frames: the unit of the wire protocol.
//!
//! Every frame is a 12-byte header and a payload:
//!
//! ```text
//! offset 0  u32 big-endian  payload length (at most MAX_PAYLOAD)
//! offset 4  u8              kind (FrameKind)
//! offset 5  u8              flags, must be 0
//! offset 6  u16             reserved, must be 0
//! offset 8  u32 big-endian  stream id: the request this frame belongs to
//! offset 12 ...             payload (JSON for requests and responses, raw bytes for data)
//! ```
//!
//! The header is checked as soon as it has arrived, so a peer announcing a huge frame is
//! refused before any of it is buffered. After an error the byte stream cannot be trusted to
//! be aligned on a frame any more: the decoder stays failed and the channel must be closed.

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 12;

/// The largest payload a frame may carry. Data is sent in chunks of at most this size; a
/// request that does not fit is refused by the sender.
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A request, JSON ([`super::Request`]); its stream id is chosen by the host.
    Request,
    /// The final answer to the request with the same stream id, JSON ([`super::Response`]).
    Response,
    /// Raw bytes a command wrote to its standard output.
    Stdout,
    /// Raw bytes a command wrote to its standard error.
    Stderr,
    /// Raw bytes of a file being copied (host to guest for `fs_write`, guest to host for
    /// `fs_read`), or of a command's standard input (host to guest; an empty one ends it).
    Data,
    /// Flow control: the sender of this frame grants its peer more room for data frames on
    /// the stream ([`super::flow`]).
    Credit,
    /// The agent asks for an outbound connection, JSON ([`super::OpenRequest`]), on a stream
    /// of its own id space ([`AGENT_STREAMS`]); the host answers with one response frame, then
    /// both sides carry the connection's bytes in data frames (an empty one ends a direction).
    Open,
    /// Either side tears a connection stream down at once (empty payload): nothing more is
    /// sent on it, and what was in flight is dropped.
    Close,
}

/// Stream ids with this bit set are chosen by the agent (its [`FrameKind::Open`] streams);
/// the host's requests use ids without it, so the two never collide.
pub const AGENT_STREAMS: u32 = 1 << 31;

/// Whether `stream` is one the agent opened.
pub fn is_agent_stream(stream: u32) -> bool {
    stream & AGENT_STREAMS != 0
}

impl FrameKind {
    fn byte(self) -> u8 {
        match self {
            FrameKind::Request => 1,
            FrameKind::Response => 2,
            FrameKind::Stdout => 3,
            FrameKind::Stderr => 4,
            FrameKind::Data => 5,
            FrameKind::Credit => 6,
            FrameKind::Open => 7,
            FrameKind::Close => 8,
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => FrameKind::Request,
            2 => FrameKind::Response,
            3 => FrameKind::Stdout,
            4 => FrameKind::Stderr,
            5 => FrameKind::Data,
            6 => FrameKind::Credit,
            7 => FrameKind::Open,
            8 => FrameKind::Close,
            _ => return None,
        })
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The payload is longer than [`MAX_PAYLOAD`].
    #[error("a frame of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge {
        /// The announced or attempted payload length.
        len: u64,
    },
    /// The kind byte names no known kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Flags or reserved bytes are not zero.
    #[error("reserved frame header bits are set")]
    Reserved,
    /// A credit frame whose payload is not a 4-byte count.
    #[error("a credit frame must carry exactly 4 bytes")]
    BadCredit,
    /// An earlier frame was bad; nothing after it can be decoded.
    #[error("the channel failed earlier and cannot be read any more")]
    Failed,
}

impl FrameError {
    /// The stable code of this error (documented in `docs/errors.md`).
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "PROTO001",
            FrameError::UnknownKind(_) => "PROTO002",
            FrameError::Reserved => "PROTO003",
            FrameError::Failed => "PROTO004",
            FrameError::BadCredit => "PROTO005",
        }
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The request the frame belongs to.
    pub stream: u32,
    /// The payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Whether the frame carries data counted against a stream's window ([`super::flow`]).
    pub fn is_data(&self) -> bool {
        matches!(
            self.kind,
            FrameKind::Stdout | FrameKind::Stderr | FrameKind::Data
        )
    }

    /// The frame's bytes on the wire.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        encode(self.kind, self.stream, &self.payload)
    }
}

/// The bytes of a frame of `kind` on `stream` carrying `payload`, without building a
/// [`Frame`] first.
pub fn encode(kind: FrameKind, stream: u32, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len as usize <= MAX_PAYLOAD)
        .ok_or(FrameError::TooLarge {
            len: payload.len() as u64,
        })?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.extend_from_slice(&[kind.byte(), 0, 0, 0]);
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    Ok(bytes)
}

/// Splits a byte stream into frames, however the bytes were cut into reads.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    /// Where the next frame starts in `buffer`: frames are taken by moving this, and the
    /// consumed bytes dropped only on the next push, so many small frames in one read cost
    /// one move, not one each.
    start: usize,
    failed: bool,
}

impl FrameDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the channel. Call [`FrameDecoder::next_frame`] until it returns
    /// `None` after each push, so that at most one partial frame is ever buffered.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.failed {
            self.buffer.drain(..self.start);
            self.start = 0;
            self.buffer.extend_from_slice(bytes);
        }
    }

    /// The next complete frame, `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.failed {
            return Err(FrameError::Failed);
        }
        let pending = &self.buffer[self.start..];
        let Some(header) = pending.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = match parse_header(header) {
            Ok(header) => header,
            Err(error) => {
                self.failed = true;
                self.buffer = Vec::new();
                self.start = 0;
                return Err(error);
            }
        };
        let end = HEADER_LEN + header.len;
        if pending.len() < end {
            return Ok(None);
        }
        let payload = pending[HEADER_LEN..end].to_vec();
        self.start += end;
        Ok(Some(Frame {
            kind: header.kind,
            stream: header.stream,
            payload,
        }))
    }

    /// Bytes buffered towards a frame not yet complete.
    pub fn buffered(&self) -> usize {
        self.buffer.len() - self.start
    }
}

struct Header {
    len: usize,
    kind: FrameKind,
    stream: u32,
}

fn parse_header(header: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    let [l0, l1, l2, l3, kind, flags, r0, r1, s0, s1, s2, s3] = *header;
    let len = u32::from_be_bytes([l0, l1, l2, l3]);
    if len as usize > MAX_PAYLOAD {
        return Err(FrameError::TooLarge { len: len.into() });
    }
    let kind = FrameKind::from_byte(kind).ok_or(FrameError::UnknownKind(kind))?;
    if flags != 0 || r0 != 0 || r1 != 0 {
        return Err(FrameError::Reserved);
    }
    Ok(Header {
        len: len as usize,
        kind,
        stream: u32::from_be_bytes([s0, s1, s2, s3]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: FrameKind, stream: u32, payload: &[u8]) -> Frame {
        Frame {
            kind,
            stream,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn the_header_is_laid_out_as_documented() {
        let bytes = encode(FrameKind::Stderr, 0x0102_0304, b"hi").unwrap();
        assert_eq!(bytes, [0, 0, 0, 2, 4, 0, 0, 0, 1, 2, 3, 4, b'h', b'i']);
    }

    #[test]
    fn frames_survive_any_split_into_reads() {
        let frames = [
            frame(FrameKind::Request, 1, br#"{"op":"hello","version":1}"#),
            frame(FrameKind::Stdout, 1, &[0xff; 1000]),
            frame(FrameKind::Response, 7, b""),
            frame(FrameKind::Stderr, u32::MAX, &[0; MAX_PAYLOAD]),
            frame(
                FrameKind::Open,
                AGENT_STREAMS | 1,
                br#"{"host":"api.example.com","port":443,"via":"connect"}"#,
            ),
            frame(FrameKind::Data, AGENT_STREAMS | 1, b"\x16\x03\x01"),
            frame(FrameKind::Close, AGENT_STREAMS | 1, b""),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().unwrap()).collect();
        for chunk in [1, 5, 12, 13, 4096, wire.len()] {
            let mut decoder = FrameDecoder::new();
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                decoder.push(piece);
                while let Some(frame) = decoder.next_frame().unwrap() {
                    out.push(frame);
                }
            }
            assert_eq!(out, frames, "split into {chunk}-byte reads");
            assert_eq!(decoder.buffered(), 0);
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_from_its_header_alone() {
        assert_eq!(
            encode(FrameKind::Stdout, 1, &vec![0; MAX_PAYLOAD + 1]),
            Err(FrameError::TooLarge {
                len: MAX_PAYLOAD as u64 + 1
            })
        );
        let mut decoder = FrameDecoder::new();
        decoder.push(&[0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::TooLarge {
                len: u32::MAX.into()
            })
        );
        // Failed for good: the next bytes are not trusted to start a frame.
        decoder.push(&encode(FrameKind::Request, 1, b"{}").unwrap());
        assert_eq!(decoder.next_frame(), Err(FrameError::Failed));
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn unknown_kinds_and_reserved_bits_are_refused() {
        for (header, error) in [
            (
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                FrameError::UnknownKind(0),
            ),
            (
                [0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 1],
                FrameError::UnknownKind(9),
            ),
            ([0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1], FrameError::Reserved),
            ([0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1], FrameError::Reserved),
        ] {
            let mut decoder = FrameDecoder::new();
            decoder.push(&header);
            assert_eq!(decoder.next_frame(), Err(error.clone()));
            assert!(!error.code().is_empty());
        }
    }
}
