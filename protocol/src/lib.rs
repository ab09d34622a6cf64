//! `mvm-protocol`: the contract between the host and mvm's guest agent, shared by the agent
//! (`mvm-agent`) and the runner (`mvm-runner`) so that neither links the other: the wire
//! protocol spoken over the virtio-console port named [`PORT_NAME`], and the dm-verity
//! parameters the kernel command line carries to the agent ([`cmdline`]).
//!
//! The wire protocol:
//! Length-prefixed [`frame`]s carry JSON requests and responses ([`message`]) and raw data.
//! The host opens every exchange with a request on a stream id of its choosing; the agent
//! answers with data frames on that id (a command's stdout and stderr, kept apart) and exactly
//! one final response. The first request on a channel is [`Request::Hello`], which checks that
//! both sides speak [`PROTOCOL_VERSION`]. Data frames are flow-controlled per stream ([`flow`]).
//! The one exchange the agent opens is an outbound connection ([`FrameKind::Open`], on its own
//! stream ids), which the host answers and then carries byte for byte, or refuses.

pub mod cmdline;
pub mod flow;
pub mod frame;
pub mod message;
pub mod service;

pub use frame::{
    encode, is_agent_stream, Frame, FrameDecoder, FrameError, FrameKind, AGENT_STREAMS, HEADER_LEN,
    MAX_PAYLOAD,
};
pub use message::{
    codes, is_mount_point, BootTimings, ErrorReply, ExecReply, ExecRequest, ExitStatus, FileDone,
    FileInfo, FileKind, FsWriteRequest, HelloReply, Integrity, OpenRequest, ProcessInfo, Request,
    Response, SecretHex, TtySize, Via, RENEW_ENTROPY_BYTES, SPAWN_OUTPUT_TAIL,
};

/// The name the host gives the agent's port (QEMU: `virtserialport,name=`; mvm's own VMM:
/// its named console port).
pub const PORT_NAME: &str = "mvm.agent";

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 2;
