//! Per-stream flow control: how a bulk copy and a chatty command share one channel without
//! either starving the other or filling the receiver's memory.
//!
//! Each direction of each stream has a window of [`WINDOW`] bytes. A data frame (stdout,
//! stderr, data) uses up [`cost`] of it: its payload plus its header, so that even empty
//! frames are paid for. The sender stops when a frame would not fit; the receiver, once it
//! has passed the bytes on (written them to a file, a pipe, a client), hands the room back
//! with a credit frame on the same stream, whose payload is the number of bytes returned as a
//! 4-byte big-endian integer. A peer that sends past its window breaks the protocol: the
//! stream is ended with an error.
//!
//! The window starts full when the request is sent, in both directions; a stream's credit
//! frames after it ended are ignored.

use super::frame::{FrameError, HEADER_LEN};

/// Bytes of data frames that may be in flight on one stream in one direction.
pub const WINDOW: u64 = 1024 * 1024;

/// What a data frame with a payload of `len` bytes uses up of its stream's window.
pub fn cost(len: usize) -> u64 {
    (len + HEADER_LEN) as u64
}

/// The payload of a credit frame returning `bytes`.
pub fn credit_payload(bytes: u64) -> [u8; 4] {
    u32::try_from(bytes).unwrap_or(u32::MAX).to_be_bytes()
}

/// The bytes a credit frame returns, refused unless its payload is exactly four bytes.
pub fn parse_credit(payload: &[u8]) -> Result<u64, FrameError> {
    let bytes: [u8; 4] = payload.try_into().map_err(|_| FrameError::BadCredit)?;
    Ok(u32::from_be_bytes(bytes).into())
}

/// The room a sender has left on one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWindow(u64);

impl Default for SendWindow {
    fn default() -> Self {
        Self(WINDOW)
    }
}

impl SendWindow {
    /// The largest payload that fits now (0 when a frame would not).
    pub fn room(&self) -> usize {
        self.0.saturating_sub(HEADER_LEN as u64) as usize
    }

    /// Whether a frame of `len` payload bytes fits now (an empty one costs its header).
    pub fn fits(&self, len: usize) -> bool {
        self.0 >= cost(len)
    }

    /// Uses up the room a frame of `len` bytes takes; the caller checked it fits.
    pub fn spend(&mut self, len: usize) {
        self.0 = self.0.saturating_sub(cost(len));
    }

    /// Adds what a credit frame returned, never beyond a full window (a peer cannot grant
    /// itself more memory on the other side).
    pub fn grant(&mut self, bytes: u64) {
        self.0 = self.0.saturating_add(bytes).min(WINDOW);
    }
}

/// The room a receiver has given its peer on one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveWindow(u64);

impl Default for ReceiveWindow {
    fn default() -> Self {
        Self(WINDOW)
    }
}

impl ReceiveWindow {
    /// Accounts for an arriving frame of `len` bytes; `false` if the peer overran its window.
    pub fn take(&mut self, len: usize) -> bool {
        match self.0.checked_sub(cost(len)) {
            Some(left) => {
                self.0 = left;
                true
            }
            None => false,
        }
    }

    /// Gives back `bytes` once they have been passed on (the caller then sends the credit).
    pub fn restore(&mut self, bytes: u64) {
        self.0 = self.0.saturating_add(bytes).min(WINDOW);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_holds_frames_up_to_its_size_and_credit_refills_it() {
        let mut sender = SendWindow::default();
        let mut receiver = ReceiveWindow::default();
        let mut frames = 0;
        while sender.room() >= 64 * 1024 {
            sender.spend(64 * 1024);
            assert!(receiver.take(64 * 1024));
            frames += 1;
        }
        assert_eq!(frames, 15, "16 frames would overrun 1 MiB by their headers");
        // A sender ignoring its window is caught by the receiver.
        assert!(!receiver.take(64 * 1024));
        let back = cost(64 * 1024) * 2;
        receiver.restore(back);
        sender.grant(parse_credit(&credit_payload(back)).unwrap());
        assert!(sender.room() >= 128 * 1024);
        // Credit never grows a window past its size.
        sender.grant(u64::MAX);
        assert_eq!(sender, SendWindow::default());
    }

    #[test]
    fn empty_frames_are_paid_for() {
        let mut receiver = ReceiveWindow::default();
        let mut accepted = 0u64;
        while receiver.take(0) {
            accepted += 1;
        }
        assert_eq!(accepted, WINDOW / HEADER_LEN as u64);
    }

    #[test]
    fn a_credit_payload_is_four_bytes() {
        assert_eq!(parse_credit(&[0, 1, 0, 0]).unwrap(), 65536);
        assert!(parse_credit(&[0, 1, 0]).is_err());
        assert!(parse_credit(&[0, 0, 0, 1, 0]).is_err());
    }
}
