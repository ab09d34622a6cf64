//! The host's end of an agent served on a thread of the test, over a socket pair.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mvm_agent::serve::{serve, Ended, ServeConfig, ServeError};
use mvm_protocol::{encode, Frame, FrameDecoder, FrameKind, Request};

/// How long the host waits for the agent to say something, or to end, before failing.
pub const SILENCE: Duration = Duration::from_secs(20);

/// An agent serving on its own thread, and the host's end of its channel.
pub struct Agent {
    channel: UnixStream,
    decoder: FrameDecoder,
    serving: Option<JoinHandle<Result<Ended, ServeError>>>,
}

impl Agent {
    /// Starts serving with `config`.
    pub fn start(config: ServeConfig) -> Self {
        let (channel, mut agent_end) = UnixStream::pair().unwrap();
        channel.set_read_timeout(Some(SILENCE)).unwrap();
        let serving = std::thread::spawn(move || serve(&mut agent_end, &config));
        Self {
            channel,
            decoder: FrameDecoder::new(),
            serving: Some(serving),
        }
    }

    /// Sends `request` on `stream`.
    pub fn send(&mut self, stream: u32, request: &Request) {
        let payload = serde_json::to_vec(request).unwrap();
        self.channel
            .write_all(&encode(FrameKind::Request, stream, &payload).unwrap())
            .unwrap();
    }

    /// The next frame; fails the test after [`SILENCE`] without one, never waiting longer.
    pub fn frame(&mut self) -> Frame {
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                return frame;
            }
            let mut buffer = [0; 64 * 1024];
            match self.channel.read(&mut buffer) {
                Ok(0) => panic!("the agent closed the channel"),
                Ok(n) => self.decoder.push(&buffer[..n]),
                // A signal cut the wait short (a read with a timeout is not restarted).
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("the agent sent nothing for {SILENCE:?} ({e})"),
            }
        }
    }

    /// How serving ended; fails the test if it goes on for [`SILENCE`].
    pub fn ended(mut self) -> Result<Ended, ServeError> {
        let serving = self.serving.take().expect("joined once");
        let deadline = Instant::now() + SILENCE;
        while !serving.is_finished() {
            assert!(Instant::now() < deadline, "the agent still serves");
            std::thread::sleep(Duration::from_millis(10));
        }
        serving.join().unwrap()
    }
}
