//! One agent channel shared by many exchanges: requests go out on fresh stream ids, and a
//! reader thread hands every frame that comes back to the exchange it belongs to.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use mvm_agent::protocol::{encode, Frame, FrameDecoder, FrameKind, Request};

use crate::client::ClientError;

/// Frames buffered for one exchange before the reader waits for it: a client that reads
/// slowly holds the channel back (bounded memory) rather than the runner filling up.
const ROUTE_DEPTH: usize = 64;

/// Where frames go, by stream id; closed for good once the channel ends.
#[derive(Debug, Default)]
struct RouteTable {
    routes: HashMap<u32, SyncSender<Frame>>,
    closed: bool,
}

type Routes = Arc<Mutex<RouteTable>>;

/// The agent channel, shared.
#[derive(Debug)]
pub struct AgentMux {
    writer: Mutex<UnixStream>,
    routes: Routes,
    next_stream: AtomicU32,
    reader: Option<JoinHandle<()>>,
}

impl AgentMux {
    /// Takes over a channel on which the hello is done (nothing more is expected on it
    /// unasked). Stream ids start above `first_stream`, the last one used on it.
    pub fn new(stream: UnixStream, first_stream: u32) -> io::Result<Self> {
        stream.set_read_timeout(None)?;
        let reading = stream.try_clone()?;
        let routes: Routes = Arc::default();
        let reader = {
            let routes = Arc::clone(&routes);
            std::thread::Builder::new()
                .name("agent-mux".into())
                .spawn(move || route_frames(reading, &routes))?
        };
        Ok(Self {
            writer: Mutex::new(stream),
            routes,
            next_stream: AtomicU32::new(first_stream.wrapping_add(1).max(1)),
            reader: Some(reader),
        })
    }

    /// Sends `request` on a new stream and returns the frames that will answer it: data
    /// frames, then one response. The receiver is disconnected if the channel closes first.
    /// Drop the receiver to stop caring: the rest of the answer is discarded.
    pub fn request(&self, request: &Request) -> Result<Receiver<Frame>, ClientError> {
        self.request_on_stream(request).map(|(_, frames)| frames)
    }

    /// [`AgentMux::request`], also returning the stream id, for requests whose data follows
    /// ([`AgentMux::send_data`]).
    pub fn request_on_stream(
        &self,
        request: &Request,
    ) -> Result<(u32, Receiver<Frame>), ClientError> {
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let payload =
            serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let bytes = encode(FrameKind::Request, stream, &payload)?;
        let (sender, receiver) = mpsc::sync_channel(ROUTE_DEPTH);
        {
            let mut table = lock(&self.routes);
            if table.closed {
                return Err(ClientError::Closed);
            }
            table.routes.insert(stream, sender);
        }
        let written = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write_all(&bytes);
        if let Err(e) = written {
            // Part of a frame may have gone out: nothing after it could be read as frames.
            // The channel is done for every exchange.
            close(&self.routes);
            let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return Err(e.into());
        }
        Ok((stream, receiver))
    }

    /// Sends a data frame on `stream` (the bytes of a file being written).
    pub fn send_data(&self, stream: u32, bytes: &[u8]) -> Result<(), ClientError> {
        let frame = encode(FrameKind::Data, stream, bytes)?;
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = writer.write_all(&frame) {
            close(&self.routes);
            let _ = writer.shutdown(std::net::Shutdown::Both);
            return Err(e.into());
        }
        Ok(())
    }
}

impl AgentMux {
    /// Whether the channel has ended (the guest went away or a write broke it).
    pub fn is_closed(&self) -> bool {
        lock(&self.routes).closed
    }
}

impl Drop for AgentMux {
    fn drop(&mut self) {
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = writer.shutdown(std::net::Shutdown::Both);
        drop(writer);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn lock(routes: &Routes) -> std::sync::MutexGuard<'_, RouteTable> {
    routes.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ends every exchange still waiting, and refuses new ones.
fn close(routes: &Routes) {
    let mut table = lock(routes);
    table.closed = true;
    table.routes.clear();
}

/// Reads frames until the channel closes or breaks, handing each to its exchange; a response
/// ends its exchange. When the channel ends, every exchange still waiting is disconnected.
fn route_frames(mut stream: UnixStream, routes: &Routes) {
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let n = match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        decoder.push(&buffer[..n]);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let last = frame.kind == FrameKind::Response;
                    let stream_id = frame.stream;
                    // Not under the table's lock: the send may wait for a slow reader.
                    let route = if last {
                        lock(routes).routes.remove(&stream_id)
                    } else {
                        lock(routes).routes.get(&stream_id).cloned()
                    };
                    if let Some(route) = route {
                        let _ = route.send(frame);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    close(routes);
                    return;
                }
            }
        }
    }
    close(routes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_agent::protocol::{ExecRequest, Response};
    use mvm_agent::serve::{serve, ServeConfig};
    use std::collections::BTreeMap;

    fn exec(script: &str) -> Request {
        Request::Exec(ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: BTreeMap::new(),
            cwd: None,
            timeout_ms: 10_000,
            stdin: false,
        })
    }

    /// Frames until the response: (stdout, response).
    fn collect(receiver: &Receiver<Frame>) -> (Vec<u8>, Response) {
        let mut stdout = Vec::new();
        loop {
            let frame = receiver.recv().expect("the channel closed");
            match frame.kind {
                FrameKind::Stdout => stdout.extend(frame.payload),
                FrameKind::Response => {
                    return (stdout, serde_json::from_slice(&frame.payload).unwrap())
                }
                _ => {}
            }
        }
    }

    #[test]
    fn exchanges_share_the_channel_and_each_gets_its_own_frames() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let agent = std::thread::spawn(move || serve(&mut guest, &ServeConfig::on_host()));
        let mux = Arc::new(AgentMux::new(host, 0).unwrap());
        let workers: Vec<_> = (0..8)
            .map(|i| {
                let mux = Arc::clone(&mux);
                std::thread::spawn(move || {
                    let receiver = mux
                        .request(&exec(&format!("for n in 1 2 3; do echo {i}-$n; done")))
                        .unwrap();
                    collect(&receiver)
                })
            })
            .collect();
        for (i, worker) in workers.into_iter().enumerate() {
            let (stdout, response) = worker.join().unwrap();
            assert_eq!(stdout, format!("{i}-1\n{i}-2\n{i}-3\n").as_bytes());
            assert!(matches!(response, Response::Exec(_)), "{response:?}");
        }
        let (_, response) = collect(&mux.request(&Request::PowerOff).unwrap());
        assert_eq!(response, Response::PowerOff);
        agent.join().unwrap().unwrap();
        // The agent is gone: a new exchange is refused or ends disconnected, never hangs.
        if let Ok(receiver) = mux.request(&exec("true")) {
            assert!(receiver.recv().is_err());
        }
    }
}
