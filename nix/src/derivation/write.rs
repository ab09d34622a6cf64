//! The ATerm writer, byte for byte Nix's `Derivation::unparse`:
//!
//! ```text
//! Derive([("out","/nix/store/…-hello","","")],[("/nix/store/…-dep.drv",["out"])],
//!        ["/nix/store/…-src"],"x86_64-linux","/bin/sh",["-c","…"],[("name","hello"),…])
//! ```
//!
//! with no newline anywhere. Nix escapes only the builder, the arguments and the environment
//! (`"` `\` and newline, carriage return, tab); names, paths, hashes and `system` are written
//! between quotes as they are.

use std::collections::BTreeSet;

use super::{Derivation, Output};

impl Derivation {
    /// The derivation in ATerm form, exactly as Nix writes it to its `.drv` file.
    pub fn to_aterm(&self) -> String {
        // Store paths order as their text does, so this is the order Nix writes.
        let inputs = self
            .input_drvs
            .iter()
            .map(|(path, outputs)| (path.to_string(), outputs));
        write_aterm(self, Masking::None, inputs)
    }
}

/// Whether output paths are blanked, as Nix does when hashing a derivation for its own
/// output paths (they cannot be part of what they are computed from).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Masking {
    /// Write the derivation as it is.
    None,
    /// Empty every output path and every environment variable named after an output.
    Outputs,
}

/// The ATerm of `drv` with `input_drvs` (in ascending order) in place of its input
/// derivations: the modulo hash puts the input derivations' hashes there.
pub(super) fn write_aterm<'a>(
    drv: &Derivation,
    masking: Masking,
    input_drvs: impl IntoIterator<Item = (impl AsRef<str>, &'a BTreeSet<String>)>,
) -> String {
    let mut out = String::with_capacity(1024);
    out.push_str("Derive([");
    for (i, (name, output)) in drv.outputs.iter().enumerate() {
        comma(&mut out, i);
        let path = match masking {
            Masking::None => output.path().to_string(),
            Masking::Outputs => String::new(),
        };
        let (algo, hash) = match output {
            Output::InputAddressed { .. } => (String::new(), String::new()),
            Output::Fixed { hash, .. } => (hash.method_algo(), hash.hex()),
        };
        out.push('(');
        plain(&mut out, name);
        for field in [&path, &algo, &hash] {
            out.push(',');
            plain(&mut out, field);
        }
        out.push(')');
    }
    out.push_str("],[");
    for (i, (path, outputs)) in input_drvs.into_iter().enumerate() {
        comma(&mut out, i);
        out.push('(');
        plain(&mut out, path.as_ref());
        out.push(',');
        list(&mut out, outputs.iter(), plain);
        out.push(')');
    }
    out.push_str("],");
    let srcs: Vec<String> = drv.input_srcs.iter().map(ToString::to_string).collect();
    list(&mut out, srcs.iter(), plain);
    out.push(',');
    plain(&mut out, &drv.system);
    out.push(',');
    escaped(&mut out, &drv.builder);
    out.push(',');
    list(&mut out, drv.args.iter(), escaped);
    out.push_str(",[");
    for (i, (key, value)) in drv.env.iter().enumerate() {
        comma(&mut out, i);
        out.push('(');
        escaped(&mut out, key);
        out.push(',');
        let masked = masking == Masking::Outputs && drv.outputs.contains_key(key);
        escaped(&mut out, if masked { "" } else { value });
        out.push(')');
    }
    out.push_str("])");
    out
}

fn comma(out: &mut String, index: usize) {
    if index > 0 {
        out.push(',');
    }
}

fn list<'a>(
    out: &mut String,
    items: impl Iterator<Item = &'a String>,
    write: fn(&mut String, &str),
) {
    out.push('[');
    for (i, item) in items.enumerate() {
        comma(out, i);
        write(out, item);
    }
    out.push(']');
}

/// A string Nix writes without escapes.
fn plain(out: &mut String, s: &str) {
    out.push('"');
    out.push_str(s);
    out.push('"');
}

/// A string with Nix's escapes.
fn escaped(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
}
