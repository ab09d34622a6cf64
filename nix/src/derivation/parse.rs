//! The strict ATerm parser. A `.drv` is untrusted input: it may come from any store or
//! download, so the parser refuses what Nix would not have written rather than guess.
//!
//! - At most [`MAX_DRV_SIZE`] bytes; the grammar has a fixed depth, so nothing recurses.
//! - Exactly the layout [`Derivation::to_aterm`] writes: no whitespace, no trailing bytes.
//! - Every list of outputs, inputs, sources and environment entries in ascending order
//!   without repeats, and escapes only where and as Nix writes them (`\"` `\\` `\n` `\r` `\t`
//!   in the builder, arguments and environment; none elsewhere). So any input that parses is
//!   written back byte for byte.
//! - Text is UTF-8; paths are valid store paths; the result passes [`Derivation::validate`].
//!
//! Nix's experimental content-addressed outputs (no path, or a method with no hash) are
//! refused as unsupported (NIX007).

use std::collections::BTreeSet;

use super::{Derivation, Output};
use crate::error::NixError;
use crate::hash::FixedOutputHash;
use crate::store_path::StorePath;

/// The largest `.drv` mvm reads: far above any real derivation (nixpkgs' largest are a few
/// MiB), small enough to hold in memory.
pub const MAX_DRV_SIZE: usize = 32 << 20;

impl Derivation {
    /// Parses the ATerm `bytes` of the derivation called `name` (the `.drv` file's name
    /// without hash part and extension).
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Self, NixError> {
        if bytes.len() > MAX_DRV_SIZE {
            return Err(NixError::TooLarge {
                size: bytes.len() as u64,
                limit: MAX_DRV_SIZE as u64,
            });
        }
        let mut p = Parser { bytes, pos: 0 };
        p.expect("Derive(")?;
        let outputs = p.list(Parser::output)?;
        ascending(&outputs, |(name, ..)| name, "outputs")?;
        p.expect(",")?;
        let input_drvs = p.list(Parser::input_drv)?;
        ascending(&input_drvs, |(path, _)| path, "input derivations")?;
        p.expect(",")?;
        let input_srcs = p.list(Parser::plain)?;
        ascending(&input_srcs, |path| path, "input sources")?;
        p.expect(",")?;
        let system = p.plain()?;
        p.expect(",")?;
        let builder = p.escaped()?;
        p.expect(",")?;
        let args = p.list(Parser::escaped)?;
        p.expect(",")?;
        let env = p.list(Parser::env_entry)?;
        ascending(&env, |(key, _)| key, "environment variables")?;
        p.expect(")")?;
        if p.pos != bytes.len() {
            return Err(p.syntax("bytes after the end of the derivation"));
        }

        let drv = Derivation {
            name: name.to_string(),
            outputs: outputs
                .into_iter()
                .map(|(_, (name, path, algo, hash))| Ok((name, output(&path, &algo, &hash)?)))
                .collect::<Result<_, NixError>>()?,
            input_drvs: input_drvs
                .into_iter()
                .map(|(_, (path, outputs))| Ok((StorePath::parse(&path)?, outputs)))
                .collect::<Result<_, NixError>>()?,
            input_srcs: input_srcs
                .into_iter()
                .map(|(_, path)| StorePath::parse(&path))
                .collect::<Result<_, _>>()?,
            system,
            builder,
            args: args.into_iter().map(|(_, arg)| arg).collect(),
            env: env.into_iter().map(|(_, entry)| entry).collect(),
        };
        drv.validate()?;
        Ok(drv)
    }
}

/// An output from its four fields.
fn output(path: &str, algo: &str, hash: &str) -> Result<Output, NixError> {
    match (algo.is_empty(), hash.is_empty()) {
        (true, true) if path.is_empty() => Err(NixError::Unsupported(
            "an output without a path (a deferred derivation, an experimental Nix feature)".into(),
        )),
        (true, true) => Ok(Output::InputAddressed {
            path: StorePath::parse(path)?,
        }),
        (false, false) => Ok(Output::Fixed {
            hash: FixedOutputHash::from_drv_fields(algo, hash)?,
            path: StorePath::parse(path)?,
        }),
        (false, true) => Err(NixError::Unsupported(
            "a content-addressed output without a fixed hash (an experimental Nix feature)".into(),
        )),
        (true, false) => Err(NixError::Invalid(
            "an output hash without a hash algorithm".into(),
        )),
    }
}

/// Items with the offset each starts at.
type Located<T> = Vec<(usize, T)>;

/// Refuses a list whose keys are not strictly ascending (out of order or repeated).
fn ascending<T, K: Ord + ?Sized>(
    items: &Located<T>,
    key: impl Fn(&T) -> &K,
    what: &str,
) -> Result<(), NixError> {
    match items.windows(2).find(|w| key(&w[0].1) >= key(&w[1].1)) {
        Some(w) => Err(NixError::NotCanonical {
            offset: w[1].0,
            reason: format!("{what} out of order or repeated"),
        }),
        None => Ok(()),
    }
}

struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn expect(&mut self, literal: &str) -> Result<(), NixError> {
        if self.bytes[self.pos..].starts_with(literal.as_bytes()) {
            self.pos += literal.len();
            Ok(())
        } else {
            Err(self.syntax(format!("expected {literal:?}")))
        }
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.bytes.get(self.pos).copied();
        self.pos += usize::from(byte.is_some());
        byte
    }

    /// `[item,item,…]`.
    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, NixError>,
    ) -> Result<Located<T>, NixError> {
        self.expect("[")?;
        let mut items = Vec::new();
        if self.bytes.get(self.pos) == Some(&b']') {
            self.pos += 1;
            return Ok(items);
        }
        loop {
            let start = self.pos;
            items.push((start, item(self)?));
            match self.next() {
                Some(b',') => {}
                Some(b']') => return Ok(items),
                _ => {
                    self.pos = self.pos.saturating_sub(1);
                    return Err(self.syntax("expected ',' or ']'"));
                }
            }
        }
    }

    /// `(name,path,algo,hash)`.
    fn output(&mut self) -> Result<(String, String, String, String), NixError> {
        self.expect("(")?;
        let name = self.plain()?;
        self.expect(",")?;
        let path = self.plain()?;
        self.expect(",")?;
        let algo = self.plain()?;
        self.expect(",")?;
        let hash = self.plain()?;
        self.expect(")")?;
        Ok((name, path, algo, hash))
    }

    /// `(path,[output,…])`.
    fn input_drv(&mut self) -> Result<(String, BTreeSet<String>), NixError> {
        self.expect("(")?;
        let path = self.plain()?;
        self.expect(",")?;
        let outputs = self.list(Parser::plain)?;
        ascending(&outputs, |name| name, "output names")?;
        self.expect(")")?;
        Ok((path, outputs.into_iter().map(|(_, name)| name).collect()))
    }

    /// `(key,value)`.
    fn env_entry(&mut self) -> Result<(String, String), NixError> {
        self.expect("(")?;
        let key = self.escaped()?;
        self.expect(",")?;
        let value = self.escaped()?;
        self.expect(")")?;
        Ok((key, value))
    }

    /// A string Nix writes without escapes.
    fn plain(&mut self) -> Result<String, NixError> {
        self.string(false)
    }

    /// A string Nix writes with escapes.
    fn escaped(&mut self) -> Result<String, NixError> {
        self.string(true)
    }

    fn string(&mut self, escapes: bool) -> Result<String, NixError> {
        self.expect("\"")?;
        let start = self.pos;
        let mut text = Vec::new();
        loop {
            let at = self.pos;
            match self.next() {
                None => {
                    self.pos = start;
                    return Err(self.syntax("unterminated string"));
                }
                Some(b'"') => break,
                Some(b'\\') if !escapes => {
                    return Err(not_canonical(at, "an escape where Nix writes none"))
                }
                Some(b'\\') => text.push(match self.next() {
                    Some(c @ (b'"' | b'\\')) => c,
                    Some(b'n') => b'\n',
                    Some(b'r') => b'\r',
                    Some(b't') => b'\t',
                    None => {
                        self.pos = start;
                        return Err(self.syntax("unterminated string"));
                    }
                    Some(_) => return Err(not_canonical(at, "an escape Nix does not write")),
                }),
                Some(b'\n' | b'\r' | b'\t') if escapes => {
                    return Err(not_canonical(
                        at,
                        "a raw newline, carriage return or tab where Nix writes an escape",
                    ))
                }
                Some(byte) => text.push(byte),
            }
        }
        String::from_utf8(text).map_err(|_| NixError::Syntax {
            offset: start,
            reason: "a string that is not UTF-8".into(),
        })
    }

    fn syntax(&self, reason: impl Into<String>) -> NixError {
        NixError::Syntax {
            offset: self.pos,
            reason: reason.into(),
        }
    }
}

fn not_canonical(offset: usize, reason: &str) -> NixError {
    NixError::NotCanonical {
        offset,
        reason: reason.into(),
    }
}
