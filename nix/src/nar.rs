//! NAR, the Nix ARchive: the one serialisation of a file tree that Nix hashes for store paths
//! and `nix-store --dump` prints. Written here from the format in Dolstra's thesis (fig. 5.2).
//!
//! Everything is a sequence of *strings*: a little-endian u64 length, the bytes, zero padding
//! to a multiple of 8. A node is `( type regular [executable ""] contents <bytes> )`,
//! `( type symlink target <target> )` or `( type directory entry ( name <n> node <node> )… )`
//! after the magic `nix-archive-1`. Only what Nix keeps is kept, so the archive is
//! deterministic: directory entries sorted by name bytes, a file's executable bit (the
//! owner's), symlink targets as they are (never followed); no times, owners or other modes.
//! Sockets, FIFOs and devices cannot be archived (NIX011).
//!
//! Not implemented yet: reading (unpacking) a NAR.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use crate::error::NixError;
use crate::hash::Sha256Writer;

/// Writes the NAR of the file, symlink or directory at `path` to `out`.
pub fn write_nar(path: &Path, out: &mut impl Write) -> Result<(), NixError> {
    let mut nar = NarWriter { out };
    nar.string(b"nix-archive-1", path)?;
    nar.node(path)
}

/// The sha256 of the NAR of `path`, the hash `nix-store --add` puts in its store path.
pub fn nar_sha256(path: &Path) -> Result<[u8; 32], NixError> {
    let mut hasher = Sha256Writer::default();
    write_nar(path, &mut hasher)?;
    Ok(hasher.finish())
}

struct NarWriter<'a, W> {
    out: &'a mut W,
}

impl<W: Write> NarWriter<'_, W> {
    fn node(&mut self, path: &Path) -> Result<(), NixError> {
        let io_err = |e| NixError::io(path, e);
        let meta = fs::symlink_metadata(path).map_err(io_err)?;
        let kind = meta.file_type();
        self.strings(&[b"(", b"type"], path)?;
        if kind.is_file() {
            self.string(b"regular", path)?;
            if meta.permissions().mode() & 0o100 != 0 {
                self.strings(&[b"executable", b""], path)?;
            }
            self.string(b"contents", path)?;
            self.file_contents(path, meta.len())?;
        } else if kind.is_symlink() {
            let target = fs::read_link(path).map_err(io_err)?;
            self.strings(
                &[b"symlink", b"target", target.as_os_str().as_bytes()],
                path,
            )?;
        } else if kind.is_dir() {
            self.string(b"directory", path)?;
            let mut names = fs::read_dir(path)
                .map_err(io_err)?
                .map(|entry| entry.map(|e| e.file_name()))
                .collect::<io::Result<Vec<_>>>()
                .map_err(io_err)?;
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                self.strings(&[b"entry", b"(", b"name", name.as_bytes(), b"node"], path)?;
                self.node(&path.join(&name))?;
                self.string(b")", path)?;
            }
        } else {
            return Err(NixError::Unarchivable {
                path: path.to_path_buf(),
                reason: unarchivable(kind),
            });
        }
        self.string(b")", path)
    }

    /// A file's contents as one string, streamed; a file that changes size while it is read
    /// is an error rather than a corrupt archive.
    fn file_contents(&mut self, path: &Path, len: u64) -> Result<(), NixError> {
        let io_err = |e| NixError::io(path, e);
        self.out.write_all(&len.to_le_bytes()).map_err(io_err)?;
        let file = File::open(path).map_err(io_err)?;
        let copied = io::copy(&mut file.take(len), self.out).map_err(io_err)?;
        if copied != len {
            return Err(io_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file shrank from {len} to {copied} bytes while archived"),
            )));
        }
        self.padding(len, path)
    }

    fn strings(&mut self, items: &[&[u8]], path: &Path) -> Result<(), NixError> {
        items.iter().try_for_each(|item| self.string(item, path))
    }

    fn string(&mut self, bytes: &[u8], path: &Path) -> Result<(), NixError> {
        let len = bytes.len() as u64;
        self.out
            .write_all(&len.to_le_bytes())
            .and_then(|()| self.out.write_all(bytes))
            .map_err(|e| NixError::io(path, e))?;
        self.padding(len, path)
    }

    fn padding(&mut self, len: u64, path: &Path) -> Result<(), NixError> {
        let pad = (8 - len % 8) % 8;
        self.out
            .write_all(&[0u8; 8][..pad as usize])
            .map_err(|e| NixError::io(path, e))
    }
}

fn unarchivable(kind: fs::FileType) -> &'static str {
    if kind.is_socket() {
        "a socket cannot be put in a NAR"
    } else if kind.is_fifo() {
        "a FIFO cannot be put in a NAR"
    } else {
        "a device node cannot be put in a NAR"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nar_of(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        write_nar(path, &mut out).unwrap();
        out
    }

    /// NAR strings as the format defines them, to spell expected archives out.
    fn strings(items: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for item in items {
            out.extend_from_slice(&(item.len() as u64).to_le_bytes());
            out.extend_from_slice(item);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out
    }

    #[test]
    fn a_file_is_one_node() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"hello").unwrap();
        let expected = strings(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"hello",
            b")",
        ]);
        assert_eq!(nar_of(&file), expected);

        fs::set_permissions(&file, fs::Permissions::from_mode(0o700)).unwrap();
        let nar = nar_of(&file);
        assert!(nar.windows(b"executable".len()).any(|w| w == b"executable"));
    }

    #[test]
    fn entries_are_sorted_by_bytes_and_links_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("b"), b"").unwrap();
        std::os::unix::fs::symlink("/nowhere", dir.path().join("a")).unwrap();
        fs::create_dir(dir.path().join("B")).unwrap();
        let expected = strings(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"B",
            b"node",
            b"(",
            b"type",
            b"directory",
            b")",
            b")",
            b"entry",
            b"(",
            b"name",
            b"a",
            b"node",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"/nowhere",
            b")",
            b")",
            b"entry",
            b"(",
            b"name",
            b"b",
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"",
            b")",
            b")",
            b")",
        ]);
        assert_eq!(nar_of(dir.path()), expected);
    }

    #[test]
    fn refuses_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("p");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let err = write_nar(dir.path(), &mut Vec::new()).unwrap_err();
        assert_eq!(err.code(), "NIX011", "{err}");
    }
}
