//! QEMU's machine protocol (QMP) on the VM's private socket (`qmp.sock`, in the VM's 0700
//! directory): used only to stop and continue the guest's vCPUs. JSON lines: a greeting, the
//! capabilities handshake, then one answer per command, with asynchronous events in between
//! (skipped).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// How long QEMU may take to answer a command.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest line read from QEMU.
const MAX_LINE: u64 = 64 * 1024;

/// A QMP connection, past its handshake.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to the socket QEMU serves and completes the handshake.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.line()?;
        if greeting.get("QMP").is_none() {
            return Err(io::Error::other(format!("not a QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    /// Runs `command` (without arguments) and waits for its answer.
    pub fn execute(&mut self, command: &str) -> io::Result<()> {
        self.send(json!({ "execute": command }), command).map(drop)
    }

    /// Runs `command` with `arguments` and returns what it returned.
    pub fn execute_with(&mut self, command: &str, arguments: Value) -> io::Result<Value> {
        self.send(
            json!({ "execute": command, "arguments": arguments }),
            command,
        )
    }

    fn send(&mut self, request: Value, command: &str) -> io::Result<Value> {
        let mut request = serde_json::to_vec(&request)?;
        request.push(b'\n');
        self.writer.write_all(&request)?;
        loop {
            let mut answer = self.line()?;
            if let Some(returned) = answer.get_mut("return") {
                return Ok(returned.take());
            }
            if let Some(error) = answer.get("error") {
                return Err(io::Error::other(format!("QMP {command}: {error}")));
            }
            // An event: not the answer.
        }
    }

    fn line(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        let read = (&mut self.reader).take(MAX_LINE).read_line(&mut line)?;
        if read == 0 || !line.ends_with('\n') {
            return Err(io::Error::other("QMP: the connection ended mid-answer"));
        }
        serde_json::from_str(&line).map_err(|e| io::Error::other(format!("QMP: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted QEMU: the greeting, then the given lines after each request read.
    fn fake_qemu(
        answers: Vec<&'static str>,
    ) -> (tempfile::TempDir, std::thread::JoinHandle<Vec<String>>) {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("qmp.sock")).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            writer
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut requests = Vec::new();
            for answer in answers {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                requests.push(line.trim().to_string());
                writer.write_all(answer.as_bytes()).unwrap();
            }
            requests
        });
        (dir, server)
    }

    #[test]
    fn commands_are_answered_past_events_and_errors_are_errors() {
        let (dir, server) = fake_qemu(vec![
            "{\"return\": {}}\n",
            "{\"event\": \"STOP\", \"timestamp\": {}}\n{\"return\": {}}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
            "{\"return\": {\"status\": \"completed\"}}\n",
        ]);
        let mut qmp = Qmp::connect(&dir.path().join("qmp.sock")).unwrap();
        qmp.execute("stop").unwrap();
        let error = qmp.execute("cont").unwrap_err();
        assert!(error.to_string().contains("nope"), "{error}");
        let returned = qmp
            .execute_with("query-migrate", json!({"detail": true}))
            .unwrap();
        assert_eq!(returned["status"], "completed");
        let requests = server.join().unwrap();
        assert_eq!(
            requests,
            [
                r#"{"execute":"qmp_capabilities"}"#,
                r#"{"execute":"stop"}"#,
                r#"{"execute":"cont"}"#,
                r#"{"arguments":{"detail":true},"execute":"query-migrate"}"#
            ]
        );
    }
}
