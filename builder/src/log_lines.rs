//! A child's standard error as lines, passed on as they come (Nix's build log, the builder
//! VM's worker), its last few kept to say why the child failed.

use std::collections::VecDeque;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;

/// The longest line passed on; a longer one goes in pieces of this size.
pub const MAX_LINE_BYTES: usize = 4096;

/// Where the lines go, as they come. Its receiver prints them (`mvm_ir::terminal::printable`
/// first: they are a build's bytes).
#[derive(Clone)]
pub struct LogSink(Arc<dyn Fn(&str) + Send + Sync>);

impl LogSink {
    /// Lines to `sink`.
    pub fn new(sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self(Arc::new(sink))
    }

    /// Passes `line` on.
    pub fn line(&self, line: &str) {
        (self.0)(line)
    }
}

impl fmt::Debug for LogSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LogSink")
    }
}

/// Reads `from` to its end, passing each line to `sink` (without its newline, invalid UTF-8
/// replaced, at most [`MAX_LINE_BYTES`] at a time), and returns its last `keep` lines that are
/// not blank. A read error ends it like the end of the stream.
pub fn forward_lines(from: impl Read, sink: Option<&LogSink>, keep: usize) -> Vec<String> {
    let mut reader = BufReader::new(from);
    let mut tail = VecDeque::with_capacity(keep + 1);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES as u64)
            .read_until(b'\n', &mut line);
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        if let Some(sink) = sink {
            sink.line(text);
        }
        if !text.trim().is_empty() {
            tail.push_back(text.to_string());
            if tail.len() > keep {
                tail.pop_front();
            }
        }
    }
    tail.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn lines_pass_on_whole_or_in_bounded_pieces_and_the_tail_is_kept() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let seen = Arc::clone(&seen);
            LogSink::new(move |line| seen.lock().unwrap().push(line.to_string()))
        };
        let long = "x".repeat(MAX_LINE_BYTES + 10);
        let mut input = b"one\n\ntwo \xff\n".to_vec();
        input.extend_from_slice(format!("{long}\nlast").as_bytes());
        let tail = forward_lines(input.as_slice(), Some(&sink), 2);
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0], "one");
        assert_eq!(seen[1], "");
        assert_eq!(seen[2], "two \u{fffd}");
        assert_eq!(seen[3].len(), MAX_LINE_BYTES);
        assert_eq!(seen[4], "x".repeat(10));
        assert_eq!(seen[5], "last");
        assert_eq!(seen.len(), 6);
        assert_eq!(tail, vec!["x".repeat(10), "last".to_string()]);
    }
}
