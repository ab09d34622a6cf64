//! The host↔guest wire protocol, spoken over the virtio-console agent channel.
//!
//! Length-prefixed [`frame`]s carry JSON requests and responses ([`message`]) and raw data.
//! The host opens every exchange with a request on a stream id of its choosing; the agent
//! answers with data frames on that id (a command's stdout and stderr, kept apart) and exactly
//! one final response. The first request on a channel is [`Request::Hello`], which checks that
//! both sides speak [`PROTOCOL_VERSION`].

pub mod frame;
pub mod message;

pub use frame::{encode, Frame, FrameDecoder, FrameError, FrameKind, HEADER_LEN, MAX_PAYLOAD};
pub use message::{
    codes, BootTimings, ErrorReply, ExecReply, ExecRequest, ExitStatus, FileDone, FsWriteRequest,
    HelloReply, Integrity, Request, Response,
};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
