//! Text that came from a guest — file names, console lines, agent messages — printed for a
//! person. A terminal obeys the control characters in what it is given: an escape sequence in
//! a file name can retitle the window, rewrite what is on the screen or, on some terminals,
//! make the terminal answer as if the user typed. So every control character (C0, DEL, C1)
//! and every bidirectional override becomes a visible escape (`\x1b`, `\u{9b}`, `\u{202e}`).
//! JSON output is not passed through here: it carries the exact text.

use std::borrow::Cow;

/// What becomes of line breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Newlines {
    /// Kept (and tabs with them): multi-line text such as a console log. A carriage return
    /// just before a line feed is dropped, as a serial console ends its lines so.
    Keep,
    /// Escaped too: one name on one line.
    Escape,
}

/// `text` with its control characters made visible; borrowed when there were none.
pub fn printable(text: &str, newlines: Newlines) -> Cow<'_, str> {
    let kept = |c: char| newlines == Newlines::Keep && matches!(c, '\n' | '\t');
    let unsafe_char = |c: char| (c.is_control() && !kept(c)) || is_bidi_control(c);
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' if newlines == Newlines::Keep && chars.peek() == Some(&'\n') => {}
            c if !unsafe_char(c) => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    Cow::Owned(out)
}

/// The characters that reorder how the text around them is shown (embeddings, overrides,
/// isolates): they can make a name read as something else.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_made_visible() {
        let title = "\u{1b}]0;owned\u{7}name";
        assert_eq!(printable(title, Newlines::Escape), "\\x1b]0;owned\\x07name");
        assert_eq!(printable("a\nb\tc", Newlines::Escape), "a\\nb\\tc");
        assert_eq!(printable("a\nb\tc", Newlines::Keep), "a\nb\tc");
        assert_eq!(printable("line\r\nnext\r", Newlines::Keep), "line\nnext\\r");
        assert_eq!(
            printable("\u{9b}31m\u{7f}", Newlines::Keep),
            "\\u{9b}31m\\x7f"
        );
        assert_eq!(
            printable("abc\u{202e}txt.exe", Newlines::Keep),
            "abc\\u{202e}txt.exe"
        );
        assert!(matches!(
            printable("plain ünïcode", Newlines::Escape),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn nothing_printable_is_left_that_a_terminal_would_obey() {
        for code in 0..0x3000u32 {
            let Some(c) = char::from_u32(code) else {
                continue;
            };
            let shown = printable(&c.to_string(), Newlines::Escape).into_owned();
            assert!(
                !shown.chars().any(|c| c.is_control() || is_bidi_control(c)),
                "{code:#x} shown as {shown:?}"
            );
        }
    }
}
