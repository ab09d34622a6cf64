//! The staged root filesystem tree.
//!
//! Layer application builds a [`Tree`]; the EROFS writer consumes it. Nodes live in an arena and
//! are referred to by [`NodeId`]; a directory maps entry names (raw bytes) to node ids, so a
//! hardlink is simply a second entry naming the same id. Regular file contents are appended to a
//! private staging area ([`Staging`]: an unnamed temporary file, or memory in tests) and
//! referred to by [`Content`]; nothing from an image is ever written into the host's directory
//! tree. A node whose last entry is removed stays in the arena but is no longer reachable from
//! the root, and writers only walk what is reachable.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

/// Index of a node in its [`Tree`].
pub type NodeId = usize;

/// Ownership, permissions, time and extended attributes of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Permission bits, including setuid, setgid and sticky (`0o7777`); never the file type.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Extended attributes, full name (`user.x`, `security.capability`) → value.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Where a regular file's bytes are in the staging area.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Content {
    /// Byte offset in the staging area.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory: entry name → node, kept sorted by name bytes.
    Directory(BTreeMap<Vec<u8>, NodeId>),
    /// A regular file.
    File(Content),
    /// A symbolic link and its target, never resolved against the host.
    Symlink(Vec<u8>),
    /// A character device.
    CharDevice {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

/// One node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// What it is.
    pub kind: NodeKind,
    /// Its metadata.
    pub meta: Metadata,
}

/// The bytes of staged regular files.
#[derive(Debug)]
pub enum Staging {
    /// An unnamed temporary file (deleted when closed) and its length.
    File {
        /// The file.
        file: File,
        /// Bytes written so far.
        len: u64,
    },
    /// Memory, for small trees and tests.
    Memory(Vec<u8>),
}

impl Staging {
    /// An unnamed temporary file in the system temp directory.
    pub fn temp_file() -> io::Result<Self> {
        Ok(Staging::File {
            file: tempfile::tempfile()?,
            len: 0,
        })
    }

    /// An unnamed temporary file in `dir`.
    pub fn temp_file_in(dir: &std::path::Path) -> io::Result<Self> {
        Ok(Staging::File {
            file: tempfile::tempfile_in(dir)?,
            len: 0,
        })
    }

    /// How many bytes have been staged so far: every [`Content`] this area handed out lies
    /// below this offset.
    pub fn staged_bytes(&self) -> u64 {
        match self {
            Staging::File { len, .. } => *len,
            Staging::Memory(bytes) => bytes.len() as u64,
        }
    }

    /// Copies all of `reader` into the staging area.
    pub fn append(&mut self, reader: &mut dyn Read) -> io::Result<Content> {
        match self {
            Staging::Memory(bytes) => {
                let offset = bytes.len() as u64;
                let len = reader.read_to_end(bytes)? as u64;
                Ok(Content { offset, len })
            }
            Staging::File { file, len } => {
                let offset = *len;
                file.seek(SeekFrom::Start(offset))?;
                let copied = io::copy(reader, file)?;
                *len += copied;
                Ok(Content {
                    offset,
                    len: copied,
                })
            }
        }
    }

    /// Fills `buf` from `content`, starting `at` bytes into it.
    pub fn read_at(&self, content: Content, at: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = at
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= content.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of staged content",
                )
            })?;
        let start = content.offset + at;
        match self {
            Staging::Memory(bytes) => {
                let range = start as usize..(content.offset + end) as usize;
                buf.copy_from_slice(bytes.get(range).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "staged content out of range")
                })?);
                Ok(())
            }
            Staging::File { file, .. } => file.read_exact_at(buf, start),
        }
    }

    /// Writes all of `content` to `out`.
    pub fn copy_to(&self, content: Content, out: &mut dyn Write) -> io::Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut done = 0u64;
        while done < content.len {
            let n = (content.len - done).min(buf.len() as u64) as usize;
            self.read_at(content, done, &mut buf[..n])?;
            out.write_all(&buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

/// A root filesystem under construction.
#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
    staging: Staging,
}

impl Tree {
    /// The root directory's id.
    pub const ROOT: NodeId = 0;

    /// A tree holding only a root directory (mode 0755, owned by root), staging file contents
    /// in `staging`.
    pub fn new(staging: Staging) -> Self {
        let root = Node {
            kind: NodeKind::Directory(BTreeMap::new()),
            meta: Metadata {
                mode: 0o755,
                ..Metadata::default()
            },
        };
        Self {
            nodes: vec![root],
            staging,
        }
    }

    /// The node `id`.
    ///
    /// # Panics
    /// If `id` was not returned by this tree.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// The node `id`, or `None` if this tree has no such node (a writer walking a tree it did
    /// not build checks every id it follows).
    pub fn get(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// How many nodes the tree holds (reachable or not).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The node `id`, mutable.
    ///
    /// # Panics
    /// If `id` was not returned by this tree.
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id]
    }

    /// Adds a node that no directory names yet.
    pub fn add(&mut self, kind: NodeKind, meta: Metadata) -> NodeId {
        self.nodes.push(Node { kind, meta });
        self.nodes.len() - 1
    }

    /// Stages `reader`'s bytes and adds a regular file node holding them.
    pub fn add_file(&mut self, reader: &mut dyn Read, meta: Metadata) -> io::Result<NodeId> {
        let content = self.staging.append(reader)?;
        Ok(self.add(NodeKind::File(content), meta))
    }

    /// The entries of directory `dir`, or `None` if it is not a directory.
    pub fn entries(&self, dir: NodeId) -> Option<&BTreeMap<Vec<u8>, NodeId>> {
        match &self.nodes.get(dir)?.kind {
            NodeKind::Directory(entries) => Some(entries),
            _ => None,
        }
    }

    /// The node named `name` in directory `dir`.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.entries(dir)?.get(name).copied()
    }

    /// Names `child` as `name` in directory `dir`, replacing any previous entry of that name
    /// (which is returned). `None` and no change if `dir` is not a directory.
    pub fn link(&mut self, dir: NodeId, name: &[u8], child: NodeId) -> Option<Option<NodeId>> {
        match &mut self.nodes.get_mut(dir)?.kind {
            NodeKind::Directory(entries) => Some(entries.insert(name.to_vec(), child)),
            _ => None,
        }
    }

    /// Removes entry `name` from directory `dir`, returning the node it named.
    pub fn unlink(&mut self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &mut self.nodes.get_mut(dir)?.kind {
            NodeKind::Directory(entries) => entries.remove(name),
            _ => None,
        }
    }

    /// Removes every entry of directory `dir` (an opaque whiteout).
    pub fn clear(&mut self, dir: NodeId) {
        if let Some(Node {
            kind: NodeKind::Directory(entries),
            ..
        }) = self.nodes.get_mut(dir)
        {
            entries.clear();
        }
    }

    /// The staging area holding file contents.
    pub fn staging(&self) -> &Staging {
        &self.staging
    }

    /// How many directory entries name each node, reachable from the root (the root counts
    /// once for itself). Unreachable nodes count 0.
    pub fn link_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.nodes.len()];
        counts[Self::ROOT] = 1;
        let mut stack = vec![Self::ROOT];
        while let Some(dir) = stack.pop() {
            if let NodeKind::Directory(entries) = &self.nodes[dir].kind {
                for &child in entries.values() {
                    counts[child] = counts[child].saturating_add(1);
                    // A directory is reachable through exactly one entry; files may have many.
                    if counts[child] == 1
                        && matches!(self.nodes[child].kind, NodeKind::Directory(_))
                    {
                        stack.push(child);
                    }
                }
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_round_trips_in_memory_and_on_disk() {
        for staging in [Staging::Memory(Vec::new()), Staging::temp_file().unwrap()] {
            let mut tree = Tree::new(staging);
            let a = tree
                .add_file(&mut &b"hello"[..], Metadata::default())
                .unwrap();
            let b = tree
                .add_file(&mut &b" world"[..], Metadata::default())
                .unwrap();
            let NodeKind::File(content) = tree.node(b).kind else {
                panic!()
            };
            let mut buf = [0u8; 5];
            tree.staging().read_at(content, 1, &mut buf).unwrap();
            assert_eq!(&buf, b"world");
            assert!(tree.staging().read_at(content, 2, &mut buf).is_err());
            let NodeKind::File(content) = tree.node(a).kind else {
                panic!()
            };
            let mut out = Vec::new();
            tree.staging().copy_to(content, &mut out).unwrap();
            assert_eq!(out, b"hello");
        }
    }

    #[test]
    fn links_and_counts() {
        let mut tree = Tree::new(Staging::Memory(Vec::new()));
        let dir = tree.add(NodeKind::Directory(BTreeMap::new()), Metadata::default());
        let file = tree.add_file(&mut &b"x"[..], Metadata::default()).unwrap();
        tree.link(Tree::ROOT, b"etc", dir);
        tree.link(dir, b"a", file);
        tree.link(Tree::ROOT, b"b", file);
        assert_eq!(tree.lookup(dir, b"a"), Some(file));
        assert_eq!(
            tree.link(file, b"x", dir),
            None,
            "a file is not a directory"
        );
        assert_eq!(tree.link_counts()[file], 2);
        tree.unlink(Tree::ROOT, b"b");
        assert_eq!(tree.link_counts()[file], 1);
        tree.clear(dir);
        assert_eq!(tree.link_counts()[file], 0);
    }
}
