//! Deterministic initramfs images: a `newc` cpio archive, gzip-compressed.
//!
//! The archive holds the guest agent as `/init` and the kernel modules it loads. The same
//! content always gives the same bytes: entries in path order, parents before children,
//! inode numbers assigned in that order, every mtime 0, owner root, and a gzip header with no
//! name and no time. The kernel unpacks it before running `/init`.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// One entry of an initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Directory { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
}

/// Why an entry cannot be added.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// The path is empty, absolute-looking after normalization, or has `.`/`..` components.
    #[error("invalid initramfs path {0:?}")]
    BadPath(String),
    /// Two entries at one path, or a file where a directory is needed.
    #[error("initramfs path {0:?} is already taken")]
    Conflict(String),
    /// Writing failed.
    #[error("writing the initramfs: {0}")]
    Io(#[from] io::Error),
}

/// An initramfs under construction.
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

impl Initramfs {
    /// An empty initramfs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a regular file at `path` (e.g. `init` or `lib/modules/erofs.ko`); its parent
    /// directories are created (mode 0755).
    pub fn add_file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<(), InitramfsError> {
        self.insert(
            path,
            Entry::File {
                mode: mode & 0o7777,
                data,
            },
        )
    }

    /// Adds a directory.
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<(), InitramfsError> {
        self.insert(
            path,
            Entry::Directory {
                mode: mode & 0o7777,
            },
        )
    }

    /// Adds a symbolic link.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), InitramfsError> {
        self.insert(
            path,
            Entry::Symlink {
                target: target.to_string(),
            },
        )
    }

    fn insert(&mut self, path: &str, entry: Entry) -> Result<(), InitramfsError> {
        let path = path.trim_start_matches('/');
        let valid = !path.is_empty()
            && path
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
            && !path.contains('\0');
        if !valid {
            return Err(InitramfsError::BadPath(path.to_string()));
        }
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for component in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                None => {
                    self.entries
                        .insert(parent.clone(), Entry::Directory { mode: 0o755 });
                }
                Some(Entry::Directory { .. }) => {}
                Some(_) => return Err(InitramfsError::Conflict(parent)),
            }
        }
        match self.entries.get(path) {
            Some(Entry::Directory { .. }) if matches!(entry, Entry::Directory { .. }) => {
                self.entries.insert(path.to_string(), entry);
                Ok(())
            }
            Some(_) => Err(InitramfsError::Conflict(path.to_string())),
            None => {
                self.entries.insert(path.to_string(), entry);
                Ok(())
            }
        }
    }

    /// Writes the uncompressed `newc` archive.
    pub fn write_cpio(&self, out: &mut impl Write) -> Result<(), InitramfsError> {
        let mut written = 0u64;
        for (index, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data): (u32, &[u8]) = match entry {
                Entry::Directory { mode } => (S_IFDIR | mode, &[]),
                Entry::File { mode, data } => (S_IFREG | mode, data),
                Entry::Symlink { target } => (S_IFLNK | 0o777, target.as_bytes()),
            };
            let nlink = if matches!(entry, Entry::Directory { .. }) {
                2
            } else {
                1
            };
            written += write_header(out, index as u32 + 1, mode, nlink, data.len() as u32, path)?;
            out.write_all(data)?;
            written += data.len() as u64;
            written += pad(out, written)?;
        }
        written += write_header(out, 0, 0, 1, 0, "TRAILER!!!")?;
        pad(out, written)?;
        Ok(())
    }

    /// Writes the gzip-compressed archive, as the kernel reads it.
    pub fn write_gzip(&self, out: &mut impl Write) -> Result<(), InitramfsError> {
        let mut encoder = flate2::GzBuilder::new()
            .mtime(0)
            .write(out, flate2::Compression::best());
        self.write_cpio(&mut encoder)?;
        encoder.finish()?;
        Ok(())
    }
}

/// Writes one `newc` header and the NUL-terminated name; returns the bytes written.
fn write_header(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: u32,
    name: &str,
) -> io::Result<u64> {
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        size,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    let mut header = String::with_capacity(110);
    header.push_str("070701");
    for field in fields {
        header.push_str(&format!("{field:08x}"));
    }
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    let written = 110 + name.len() as u64 + 1;
    Ok(written + pad(out, written)?)
}

/// Pads to a 4-byte boundary; returns the padding written.
fn pad(out: &mut impl Write, written: u64) -> io::Result<u64> {
    let padding = (4 - written % 4) % 4;
    out.write_all(&[0u8; 3][..padding as usize])?;
    Ok(padding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample() -> Initramfs {
        let mut initramfs = Initramfs::new();
        initramfs
            .add_file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .unwrap();
        initramfs
            .add_file("lib/modules/erofs.ko", 0o644, vec![1, 2, 3, 4, 5])
            .unwrap();
        initramfs.add_symlink("bin/sh", "/init").unwrap();
        initramfs.add_dir("proc", 0o555).unwrap();
        initramfs
    }

    #[test]
    fn deterministic_whatever_the_insertion_order() {
        let mut reversed = Initramfs::new();
        reversed.add_dir("proc", 0o555).unwrap();
        reversed.add_symlink("bin/sh", "/init").unwrap();
        reversed
            .add_file("lib/modules/erofs.ko", 0o644, vec![1, 2, 3, 4, 5])
            .unwrap();
        reversed
            .add_file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        sample().write_gzip(&mut a).unwrap();
        reversed.write_gzip(&mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn refuses_bad_paths_and_conflicts() {
        let mut initramfs = sample();
        for bad in ["", "/", "a/../b", "./x", "a//b"] {
            assert!(
                matches!(
                    initramfs.add_file(bad, 0o644, vec![]),
                    Err(InitramfsError::BadPath(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            initramfs.add_file("init", 0o644, vec![]),
            Err(InitramfsError::Conflict(_))
        ));
        assert!(matches!(
            initramfs.add_file("init/x", 0o644, vec![]),
            Err(InitramfsError::Conflict(_))
        ));
    }

    /// GNU cpio lists and extracts the archive exactly.
    #[test]
    fn gnu_cpio_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("initramfs.cpio");
        let mut bytes = Vec::new();
        sample().write_cpio(&mut bytes).unwrap();
        assert_eq!(bytes.len() % 4, 0);
        std::fs::write(&archive, &bytes).unwrap();
        let out_dir = dir.path().join("x");
        std::fs::create_dir(&out_dir).unwrap();
        let status = Command::new("cpio")
            .args(["-i", "-d", "--quiet", "-F"])
            .arg(&archive)
            .current_dir(&out_dir)
            .status()
            .expect("GNU cpio must be installed (.ci/run installs the cpio package)");
        assert!(status.success());
        assert_eq!(
            std::fs::read(out_dir.join("init")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            std::fs::read(out_dir.join("lib/modules/erofs.ko")).unwrap(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(
            std::fs::read_link(out_dir.join("bin/sh")).unwrap().to_str(),
            Some("/init")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out_dir.join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}
