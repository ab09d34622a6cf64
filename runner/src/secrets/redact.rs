//! Scrubbing secret values out of a command's output before anyone sees it: every occurrence
//! of a value — as it is, in base64 (standard and URL-safe, with and without padding), hex (either
//! case) and percent-encoding — becomes `[REDACTED:NAME]`.
//!
//! Output arrives in frames that may cut a value anywhere, so a [`Redactor`] holds back the
//! end of what it was given that could be the start of a value (the longest tail that begins
//! some pattern) until more comes or the stream ends ([`Redactor::finish`]): a value split
//! across two frames is found whole, and output that cannot begin one — a prompt, a line of
//! progress — goes out at once.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;

/// The patterns of a launch's secrets and what each is replaced with.
#[derive(Default)]
pub struct Redactions {
    patterns: Vec<(Vec<u8>, Vec<u8>)>,
    longest: usize,
}

impl std::fmt::Debug for Redactions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactions({} patterns)", self.patterns.len())
    }
}

impl Redactions {
    /// Adds `value` (and its encodings) under `name`.
    pub fn add(&mut self, name: &str, value: &[u8]) {
        if value.is_empty() {
            return;
        }
        let label = format!("[REDACTED:{name}]").into_bytes();
        let mut forms = vec![
            value.to_vec(),
            STANDARD.encode(value).into_bytes(),
            STANDARD_NO_PAD.encode(value).into_bytes(),
            URL_SAFE.encode(value).into_bytes(),
            URL_SAFE_NO_PAD.encode(value).into_bytes(),
            hex::encode(value).into_bytes(),
            hex::encode_upper(value).into_bytes(),
            percent_encoded(value),
        ];
        forms.sort();
        forms.dedup();
        for form in forms {
            self.longest = self.longest.max(form.len());
            self.patterns.push((form, label.clone()));
        }
        // Longest first: where one form is a prefix of another (no padding, padding), the
        // whole of the longer one goes.
        self.patterns
            .sort_by_key(|(pattern, _)| std::cmp::Reverse(pattern.len()));
    }

    /// Whether there is nothing to scrub.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// A redactor for one stream.
    pub fn redactor(&self) -> Redactor<'_> {
        Redactor {
            redactions: self,
            pending: Vec::new(),
        }
    }

    /// `bytes` scrubbed whole (a finished text: an error message, a log line).
    pub fn scrub(&self, bytes: &[u8]) -> Vec<u8> {
        let mut redactor = self.redactor();
        let mut out = redactor.push(bytes);
        out.extend(redactor.finish());
        out
    }
}

/// RFC 3986 percent-encoding of every byte but the unreserved ones.
fn percent_encoded(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() * 3);
    for &b in value {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else {
            out.extend(format!("%{b:02X}").into_bytes());
        }
    }
    out
}

/// Scrubs one stream, frame by frame.
pub struct Redactor<'a> {
    redactions: &'a Redactions,
    pending: Vec<u8>,
}

impl Redactor<'_> {
    /// What of `bytes` (after what was held back) can be passed on now, scrubbed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        if self.redactions.is_empty() {
            return bytes.to_vec();
        }
        self.pending.extend_from_slice(bytes);
        let (mut out, done) = self.scrubbed(false);
        out.extend_from_slice(&self.pending[done.0..done.1]);
        self.pending.drain(..done.1);
        out
    }

    /// The rest, at the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        let (mut out, done) = self.scrubbed(true);
        out.extend_from_slice(&self.pending[done.0..]);
        self.pending.clear();
        out
    }

    /// Replaces every whole pattern in `pending`; returns the output so far and the range of
    /// unmatched bytes after the last match that may go out now (`at_end`: all of them).
    fn scrubbed(&self, at_end: bool) -> (Vec<u8>, (usize, usize)) {
        let pending = &self.pending;
        let mut out = Vec::with_capacity(pending.len());
        let mut at = 0;
        let mut i = 0;
        while i < pending.len() {
            let found = self
                .redactions
                .patterns
                .iter()
                .find(|(pattern, _)| pending[i..].starts_with(pattern));
            match found {
                Some((pattern, label)) => {
                    out.extend_from_slice(&pending[at..i]);
                    out.extend_from_slice(label);
                    i += pattern.len();
                    at = i;
                }
                None => i += 1,
            }
        }
        let safe = match at_end {
            true => pending.len(),
            false => self.start_of_a_value(at),
        };
        (out, (at, safe))
    }

    /// Where the longest tail of `pending` after `from` that begins some pattern starts (the
    /// end of `pending` when none does).
    fn start_of_a_value(&self, from: usize) -> usize {
        let pending = &self.pending;
        let earliest = pending
            .len()
            .saturating_sub(self.redactions.longest.saturating_sub(1))
            .max(from);
        (earliest..pending.len())
            .find(|&i| {
                let tail = &pending[i..];
                self.redactions
                    .patterns
                    .iter()
                    .any(|(pattern, _)| pattern.starts_with(tail))
            })
            .unwrap_or(pending.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactions() -> Redactions {
        let mut r = Redactions::default();
        r.add("TOKEN", b"tok-3f9a/b+c");
        r
    }

    #[test]
    fn every_encoding_is_scrubbed() {
        let r = redactions();
        let value = b"tok-3f9a/b+c";
        for form in [
            value.to_vec(),
            STANDARD.encode(value).into_bytes(),
            URL_SAFE_NO_PAD.encode(value).into_bytes(),
            hex::encode(value).into_bytes(),
            hex::encode_upper(value).into_bytes(),
            b"tok-3f9a%2Fb%2Bc".to_vec(),
        ] {
            let mut text = b"before ".to_vec();
            text.extend(&form);
            text.extend(b" after");
            assert_eq!(
                String::from_utf8(r.scrub(&text)).unwrap(),
                "before [REDACTED:TOKEN] after",
                "{}",
                String::from_utf8_lossy(&form)
            );
        }
    }

    #[test]
    fn a_value_cut_at_every_place_is_still_found() {
        let r = redactions();
        let text = b"x=tok-3f9a/b+c;y=tok-3f9a/b+c";
        for cut in 0..=text.len() {
            for second in cut..=text.len() {
                let mut redactor = r.redactor();
                let mut out = redactor.push(&text[..cut]);
                out.extend(redactor.push(&text[cut..second]));
                out.extend(redactor.push(&text[second..]));
                out.extend(redactor.finish());
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    "x=[REDACTED:TOKEN];y=[REDACTED:TOKEN]",
                    "cut at {cut} and {second}"
                );
            }
        }
    }

    #[test]
    fn only_a_possible_start_of_a_value_is_held_back() {
        let r = redactions();
        let mut redactor = r.redactor();
        assert_eq!(redactor.push(b"first line\n"), b"first line\n");
        assert_eq!(redactor.push(b"x=tok-3"), b"x=");
        assert_eq!(redactor.push(b"f"), b"");
        assert_eq!(redactor.push(b"!"), b"tok-3f!");
        assert_eq!(redactor.finish(), b"");
        let long = vec![b'a'; 1000];
        assert_eq!(redactor.push(&long), long);
        let nothing = Redactions::default();
        let mut none = nothing.redactor();
        assert_eq!(none.push(b"abc"), b"abc");
    }
}
