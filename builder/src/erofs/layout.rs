//! Planning an image before a byte of it is written: the tree is validated and walked, every
//! reachable node becomes one inode, and each inode gets its form (compact or extended), its
//! data layout, its nid and its data blocks.
//!
//! The walk is breadth-first from the root and visits a directory's entries in name order, so
//! the plan depends only on names and node contents, never on node ids or insertion order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;

use super::compress::{self, Extent, FileCompressor};
use super::format::{
    encode_device, DataLayout, FileType, BLOCK_SIZE, COMPACT_INODE_SIZE, DIRENT_SIZE,
    EXTENDED_INODE_SIZE, INODE_SLOT_SIZE, MAX_NAME_LEN, NO_BLOCK, SUPERBLOCK_OFFSET,
    SUPERBLOCK_SIZE,
};
use super::xattr::{self, XattrBody};
use super::{Compression, ErofsError};
use crate::tree::{Content, Metadata, Node, NodeId, NodeKind, Tree};

/// The longest symlink target Linux accepts (`PATH_MAX` less the terminating NUL).
const MAX_SYMLINK_TARGET_LEN: usize = 4095;

/// The complete layout of an image.
pub(super) struct ImagePlan<'t> {
    /// Every inode in walk order, the root first. Packing makes nids follow a different
    /// order.
    pub inodes: Vec<PlannedInode<'t>>,
    /// The first block of the data area (the first block after the metadata).
    pub data_start_block: u64,
    /// The image length in blocks.
    pub blocks: u32,
    /// Holds the compressed files' blocks, when compression is on.
    pub compressor: Option<FileCompressor>,
}

/// One inode and where it goes.
pub(super) struct PlannedInode<'t> {
    pub meta: &'t Metadata,
    pub payload: Payload<'t>,
    pub xattrs: XattrBody,
    pub nlink: u32,
    /// Needs the 64-byte form.
    pub extended: bool,
    pub layout: DataLayout,
    pub nid: u64,
    /// First data block, or [`NO_BLOCK`].
    pub block_addr: u32,
    /// A regular file stored compressed: its extents, one block each from `block_addr`.
    pub extents: Option<Vec<Extent>>,
}

/// What an inode holds besides its metadata.
pub(super) enum Payload<'t> {
    Directory(Directory<'t>),
    File(Content),
    Symlink(&'t [u8]),
    Device {
        file_type: FileType,
        /// The device number in EROFS's encoding.
        encoded: u32,
    },
    Fifo,
}

/// A directory's entries as they are stored.
#[derive(Default)]
pub(super) struct Directory<'t> {
    /// `.`, `..` and the tree's entries, sorted by name bytes.
    pub entries: Vec<DirEntry<'t>>,
    /// The entries of each dirent block, in order.
    pub blocks: Vec<Range<usize>>,
    /// The directory's `i_size`: full blocks plus the bytes used in the last one.
    pub size: u64,
}

/// One directory entry.
pub(super) struct DirEntry<'t> {
    pub name: &'t [u8],
    /// Index of the named inode in [`ImagePlan::inodes`].
    pub inode: usize,
    pub file_type: FileType,
}

impl PlannedInode<'_> {
    pub(super) fn size(&self) -> u64 {
        match &self.payload {
            Payload::Directory(directory) => directory.size,
            Payload::File(content) => content.len,
            Payload::Symlink(target) => target.len() as u64,
            Payload::Device { .. } | Payload::Fifo => 0,
        }
    }

    pub(super) fn file_type(&self) -> FileType {
        self.payload.file_type()
    }

    /// Bytes of the 32- or 64-byte header.
    pub(super) fn header_len(&self) -> u64 {
        if self.extended {
            EXTENDED_INODE_SIZE
        } else {
            COMPACT_INODE_SIZE
        }
    }

    /// The bytes past the last whole block.
    fn tail_len(&self) -> u64 {
        self.size() % BLOCK_SIZE
    }

    /// The inode's header and inline xattrs.
    fn meta_len(&self) -> u64 {
        self.header_len() + self.xattrs.bytes.len() as u64
    }

    /// The bytes stored right after the inode and its xattrs: the data tail of a flat inline
    /// inode; the map header and indexes of a compressed one (the nid is 32-byte aligned, so
    /// their alignment depends only on the inode's own lengths).
    pub(super) fn inline_len(&self) -> u64 {
        match self.layout {
            DataLayout::FlatInline => self.tail_len(),
            DataLayout::FlatPlain => 0,
            DataLayout::CompressedFull => compress::index_area_len(self.meta_len(), self.size()),
        }
    }

    /// The bytes of a flat inode stored in data blocks (the last block may be partial, then
    /// zero-padded).
    pub(super) fn block_data_len(&self) -> u64 {
        self.size() - self.inline_len()
    }

    fn data_blocks(&self) -> u64 {
        match &self.extents {
            Some(extents) => extents.len() as u64,
            None => self.block_data_len().div_ceil(BLOCK_SIZE),
        }
    }
}

impl Payload<'_> {
    fn file_type(&self) -> FileType {
        match self {
            Payload::Directory(_) => FileType::Directory,
            Payload::File(_) => FileType::Regular,
            Payload::Symlink(_) => FileType::Symlink,
            Payload::Device { file_type, .. } => *file_type,
            Payload::Fifo => FileType::Fifo,
        }
    }
}

/// Validates `tree` and lays out its image, compressing regular files as `compression` says
/// wherever that saves blocks.
pub(super) fn plan(tree: &Tree, compression: Compression) -> Result<ImagePlan<'_>, ErofsError> {
    let mut walk = Walk {
        tree,
        staged_bytes: tree.staging().staged_bytes(),
        inodes: Vec::new(),
        node_ids: Vec::new(),
        index_of: BTreeMap::new(),
    };
    walk.run()?;
    let Walk {
        mut inodes,
        node_ids,
        ..
    } = walk;

    // The walk refused dangling ids and multiply-linked directories, so `link_counts` sees a
    // proper tree and has a count for every id we hold.
    let link_counts = tree.link_counts();
    for (inode, &node) in inodes.iter_mut().zip(&node_ids) {
        if !matches!(inode.payload, Payload::Directory(_)) {
            inode.nlink = link_counts[node];
        }
        inode.extended = inode.meta.uid > u32::from(u16::MAX)
            || inode.meta.gid > u32::from(u16::MAX)
            || inode.nlink > u32::from(u16::MAX)
            || inode.size() > u64::from(u32::MAX);
    }
    if u32::try_from(inodes.len()).is_err() {
        return Err(ErofsError::ImageTooLarge);
    }
    let mut compressor = FileCompressor::new(compression)?;
    if let Some(compressor) = &mut compressor {
        for inode in &mut inodes {
            if let Payload::File(content) = inode.payload {
                inode.extents = compressor.compress(tree.staging(), content)?;
            }
        }
    }

    let data_start_block = place_inodes(&mut inodes);
    let mut next_block = data_start_block;
    for inode in &mut inodes {
        let blocks = inode.data_blocks();
        if blocks > 0 {
            inode.block_addr = u32::try_from(next_block).map_err(|_| ErofsError::ImageTooLarge)?;
            next_block = next_block
                .checked_add(blocks)
                .ok_or(ErofsError::ImageTooLarge)?;
        }
    }
    let blocks = u32::try_from(next_block).map_err(|_| ErofsError::ImageTooLarge)?;
    Ok(ImagePlan {
        inodes,
        data_start_block,
        blocks,
        compressor,
    })
}

/// Chooses each inode's data layout and nid. Returns the number of metadata blocks.
///
/// A compressed file's index follows its inode. A tail goes inline whenever inode, xattrs and
/// tail fit in one block. Inodes are packed into metadata blocks best-fit, in walk order: each
/// goes into the block with the least free space that still holds it (the lowest such block on
/// ties), or into a new block. That keeps the gaps between inodes small (mkfs.erofs packs about
/// as tightly) and places the root, allocated first, in block 0 or 1, so its nid fits the
/// superblock's 16 bits. Only an inode whose xattrs or index alone exceed a block spans blocks;
/// it starts a fresh one.
fn place_inodes(inodes: &mut [PlannedInode<'_>]) -> u64 {
    let mut space = MetadataSpace::new();
    for inode in inodes {
        let meta_len = inode.meta_len();
        let tail = inode.tail_len();
        inode.layout = if inode.extents.is_some() {
            DataLayout::CompressedFull
        } else if tail > 0 && meta_len + tail <= BLOCK_SIZE {
            DataLayout::FlatInline
        } else {
            DataLayout::FlatPlain
        };
        inode.nid = space.allocate(meta_len + inode.inline_len()) / INODE_SLOT_SIZE;
    }
    space.blocks
}

/// Free space in the metadata area, which starts at block 0 after the superblock. Within a
/// block, space is handed out from the front in 32-byte slots.
struct MetadataSpace {
    /// (free bytes at the end of the block, block), for blocks with room left.
    open: BTreeSet<(u64, u64)>,
    /// Blocks in use so far.
    blocks: u64,
}

impl MetadataSpace {
    fn new() -> Self {
        let used = SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE;
        Self {
            open: BTreeSet::from([(BLOCK_SIZE - used, 0)]),
            blocks: 1,
        }
    }

    /// Reserves `len` bytes and returns their offset in the image.
    fn allocate(&mut self, len: u64) -> u64 {
        let slots = len.next_multiple_of(INODE_SLOT_SIZE);
        if let Some(&(free, block)) = self.open.range((slots, 0)..).next() {
            self.open.remove(&(free, block));
            self.reopen(free - slots, block);
            return (block + 1) * BLOCK_SIZE - free;
        }
        let first = self.blocks;
        let spanned = slots.div_ceil(BLOCK_SIZE);
        self.blocks += spanned;
        self.reopen(spanned * BLOCK_SIZE - slots, first + spanned - 1);
        first * BLOCK_SIZE
    }

    fn reopen(&mut self, free: u64, block: u64) {
        if free > 0 {
            self.open.insert((free, block));
        }
    }
}

/// The breadth-first walk that admits every reachable node once.
struct Walk<'t> {
    tree: &'t Tree,
    staged_bytes: u64,
    inodes: Vec<PlannedInode<'t>>,
    /// The tree node behind each inode.
    node_ids: Vec<NodeId>,
    /// Inode index of each node admitted so far.
    index_of: BTreeMap<NodeId, usize>,
}

/// A directory admitted but whose entries are not planned yet.
struct PendingDirectory<'t> {
    inode: usize,
    parent: usize,
    path: String,
    children: &'t BTreeMap<Vec<u8>, NodeId>,
}

impl<'t> Walk<'t> {
    fn run(&mut self) -> Result<(), ErofsError> {
        let tree = self.tree;
        let root = tree.get(Tree::ROOT).ok_or(ErofsError::RootNotDirectory)?;
        let NodeKind::Directory(children) = &root.kind else {
            return Err(ErofsError::RootNotDirectory);
        };
        let root_inode = self.admit(Tree::ROOT, root, "/")?;
        let mut queue = VecDeque::from([PendingDirectory {
            inode: root_inode,
            parent: root_inode,
            path: String::new(),
            children,
        }]);
        while let Some(pending) = queue.pop_front() {
            self.plan_directory(pending, &mut queue)?;
        }
        Ok(())
    }

    /// Admits the directory's children and builds its entries.
    fn plan_directory(
        &mut self,
        pending: PendingDirectory<'t>,
        queue: &mut VecDeque<PendingDirectory<'t>>,
    ) -> Result<(), ErofsError> {
        let tree = self.tree;
        let mut entries = Vec::with_capacity(pending.children.len() + 2);
        entries.push(DirEntry {
            name: b".",
            inode: pending.inode,
            file_type: FileType::Directory,
        });
        entries.push(DirEntry {
            name: b"..",
            inode: pending.parent,
            file_type: FileType::Directory,
        });
        let mut subdirectories = 0u32;
        for (name, &child) in pending.children {
            let path = || join(&pending.path, name);
            check_name(name).map_err(|reason| ErofsError::InvalidName {
                path: path(),
                reason,
            })?;
            let node = tree.get(child).ok_or_else(|| ErofsError::DanglingEntry {
                path: path(),
                node: child,
            })?;
            let inode = match (self.index_of.get(&child).copied(), &node.kind) {
                (Some(_), NodeKind::Directory(_)) => {
                    return Err(ErofsError::DirectoryLinkedTwice { path: path() })
                }
                (Some(inode), _) => inode,
                (None, kind) => {
                    let inode = self.admit(child, node, &path())?;
                    if let NodeKind::Directory(children) = kind {
                        queue.push_back(PendingDirectory {
                            inode,
                            parent: pending.inode,
                            path: path(),
                            children,
                        });
                    }
                    inode
                }
            };
            let file_type = self.inodes[inode].file_type();
            subdirectories += u32::from(file_type == FileType::Directory);
            entries.push(DirEntry {
                name,
                inode,
                file_type,
            });
        }
        entries.sort_unstable_by(|a, b| a.name.cmp(b.name));
        let (blocks, size) = split_into_blocks(&entries);
        let directory = &mut self.inodes[pending.inode];
        directory.nlink = subdirectories.saturating_add(2);
        directory.payload = Payload::Directory(Directory {
            entries,
            blocks,
            size,
        });
        Ok(())
    }

    /// Validates a node met for the first time and gives it the next inode index.
    fn admit(&mut self, id: NodeId, node: &'t Node, path: &str) -> Result<usize, ErofsError> {
        let meta = &node.meta;
        if meta.mode & !0o7777 != 0 {
            return Err(ErofsError::InvalidMode {
                path: path.to_owned(),
                mode: meta.mode,
            });
        }
        let xattrs =
            xattr::encode(&meta.xattrs).map_err(|(name, reason)| ErofsError::InvalidXattr {
                path: path.to_owned(),
                name: String::from_utf8_lossy(&name).into_owned(),
                reason,
            })?;
        let payload = match &node.kind {
            // Entries are planned when the walk reaches the directory.
            NodeKind::Directory(_) => Payload::Directory(Directory::default()),
            NodeKind::File(content) => {
                if content
                    .offset
                    .checked_add(content.len)
                    .is_none_or(|end| end > self.staged_bytes)
                {
                    return Err(ErofsError::ContentOutOfRange {
                        path: path.to_owned(),
                        offset: content.offset,
                        len: content.len,
                    });
                }
                Payload::File(*content)
            }
            NodeKind::Symlink(target) => {
                check_symlink_target(target).map_err(|reason| ErofsError::InvalidSymlink {
                    path: path.to_owned(),
                    reason,
                })?;
                Payload::Symlink(target)
            }
            NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                let encoded = encode_device(*major, *minor).ok_or_else(|| {
                    ErofsError::DeviceNumberTooLarge {
                        path: path.to_owned(),
                        major: *major,
                        minor: *minor,
                    }
                })?;
                let file_type = if matches!(node.kind, NodeKind::CharDevice { .. }) {
                    FileType::CharDevice
                } else {
                    FileType::BlockDevice
                };
                Payload::Device { file_type, encoded }
            }
            NodeKind::Fifo => Payload::Fifo,
        };
        self.inodes.push(PlannedInode {
            meta,
            payload,
            xattrs,
            nlink: 1,
            extended: false,
            layout: DataLayout::FlatPlain,
            nid: 0,
            block_addr: NO_BLOCK,
            extents: None,
        });
        self.node_ids.push(id);
        let index = self.inodes.len() - 1;
        self.index_of.insert(id, index);
        Ok(index)
    }
}

/// Groups sorted entries into dirent blocks: a block takes entries while their 12-byte
/// headers and names fit in 4 KiB. Returns the groups and the directory's size.
fn split_into_blocks(entries: &[DirEntry<'_>]) -> (Vec<Range<usize>>, u64) {
    let mut blocks = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (index, entry) in entries.iter().enumerate() {
        let len = DIRENT_SIZE + entry.name.len() as u64;
        if used + len > BLOCK_SIZE {
            blocks.push(start..index);
            start = index;
            used = 0;
        }
        used += len;
    }
    blocks.push(start..entries.len());
    let size = (blocks.len() as u64 - 1) * BLOCK_SIZE + used;
    (blocks, size)
}

fn check_name(name: &[u8]) -> Result<(), &'static str> {
    match name {
        [] => Err("empty"),
        b"." | b".." => Err("`.` and `..` are implicit"),
        _ if name.len() > MAX_NAME_LEN => Err("longer than 255 bytes"),
        _ if name.contains(&b'/') => Err("contains '/'"),
        _ if name.contains(&0) => Err("contains NUL"),
        _ => Ok(()),
    }
}

fn check_symlink_target(target: &[u8]) -> Result<(), &'static str> {
    if target.is_empty() {
        Err("empty")
    } else if target.len() > MAX_SYMLINK_TARGET_LEN {
        Err("longer than 4095 bytes")
    } else if target.contains(&0) {
        Err("contains NUL")
    } else {
        Ok(())
    }
}

/// `dir/name` for messages, the name shown lossily.
fn join(dir: &str, name: &[u8]) -> String {
    format!("{dir}/{}", String::from_utf8_lossy(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Staging;

    fn tree_with_files(sizes: &[(&[u8], usize)]) -> Tree {
        let mut tree = Tree::new(Staging::Memory(Vec::new()));
        for &(name, size) in sizes {
            let id = tree
                .add_file(&mut &vec![7u8; size][..], Metadata::default())
                .unwrap();
            tree.link(Tree::ROOT, name, id);
        }
        tree
    }

    #[test]
    fn tails_go_inline_and_inodes_pack_best_fit() {
        let tree = tree_with_files(&[
            (b"a", 3000),
            (b"b", 1000),
            (b"c", 4096),
            (b"d", 4097),
            (b"e", 0),
        ]);
        let plan = plan(&tree, Compression::None).unwrap();
        let placed: Vec<(DataLayout, u64, u32)> = plan
            .inodes
            .iter()
            .map(|inode| (inode.layout, inode.nid, inode.block_addr))
            .collect();
        use DataLayout::{FlatInline as Inline, FlatPlain as Plain};
        assert_eq!(
            placed,
            [
                // The root's 92 bytes of dirents follow it right after the superblock.
                (Inline, 1152 / 32, NO_BLOCK),
                // 32 + 3000 bytes do not fit in block 0's 2816 left: a new block.
                (Inline, 4096 / 32, NO_BLOCK),
                // 32 + 1000 bytes fit exactly in the 1056 left in block 1.
                (Inline, (4096 + 3040) / 32, NO_BLOCK),
                // Whole blocks only: the inode alone goes back into block 0.
                (Plain, (1152 + 128) / 32, 2),
                (Inline, (1152 + 128 + 32) / 32, 3),
                (Plain, (1152 + 128 + 32 + 64) / 32, NO_BLOCK),
            ]
        );
        assert_eq!((plan.data_start_block, plan.blocks), (2, 4));
    }

    #[test]
    fn xattrs_larger_than_a_block_span_fresh_blocks() {
        let mut tree = tree_with_files(&[(b"x", 10)]);
        let file = tree.lookup(Tree::ROOT, b"x").unwrap();
        for i in 0..3u8 {
            let name = format!("user.big{i}").into_bytes();
            tree.node_mut(file).meta.xattrs.insert(name, vec![i; 3000]);
        }
        let plan = plan(&tree, Compression::None).unwrap();
        let inode = &plan.inodes[1];
        assert_eq!(
            inode.layout,
            DataLayout::FlatPlain,
            "the tail cannot sit beside it"
        );
        assert_eq!(inode.nid * INODE_SLOT_SIZE, 4096);
        // 32 + 12 + 3 * 3012 bytes span three blocks; the tail has the block after them.
        assert_eq!((plan.data_start_block, inode.block_addr), (4, 4));
    }

    #[test]
    fn extended_inodes_only_when_compact_fields_overflow() {
        let staged = 5u64 << 30;
        let file = tempfile::tempfile().unwrap();
        file.set_len(staged).unwrap(); // sparse: nothing is written
        let mut tree = Tree::new(Staging::File { file, len: staged });
        let huge = Content {
            offset: 0,
            len: staged,
        };
        let ids = [
            tree.add(NodeKind::File(huge), Metadata::default()),
            tree.add(
                NodeKind::Fifo,
                Metadata {
                    uid: 65536,
                    ..Metadata::default()
                },
            ),
            tree.add(
                NodeKind::Fifo,
                Metadata {
                    uid: 65535,
                    gid: 65535,
                    ..Metadata::default()
                },
            ),
        ];
        for (name, id) in [&b"huge"[..], b"uid", b"edge"].into_iter().zip(ids) {
            tree.link(Tree::ROOT, name, id);
        }
        let plan = plan(&tree, Compression::None).unwrap();
        let extended: Vec<bool> = plan.inodes.iter().map(|inode| inode.extended).collect();
        // Walk order: the root, then edge, huge, uid.
        assert_eq!(extended, [false, false, true, true]);
        assert_eq!(plan.inodes[2].block_data_len(), staged);
    }

    fn entries(names: &[Vec<u8>]) -> Vec<DirEntry<'_>> {
        names
            .iter()
            .map(|name| DirEntry {
                name,
                inode: 0,
                file_type: FileType::Regular,
            })
            .collect()
    }

    #[test]
    fn dirents_fill_a_block_exactly_then_spill() {
        // 16 entries of 12 + 244 bytes fill 4096 exactly; the 17th starts a block.
        let names: Vec<Vec<u8>> = (0..17).map(|i| vec![b'a' + i as u8; 244]).collect();
        let (blocks, size) = split_into_blocks(&entries(&names[..16]));
        assert_eq!((blocks.len(), blocks[0].clone(), size), (1, 0..16, 4096));
        let (blocks, size) = split_into_blocks(&entries(&names));
        assert_eq!((blocks, size), (vec![0..16, 16..17], 4096 + 256));
    }

    #[test]
    fn names_linux_cannot_hold_are_refused() {
        for name in [&b""[..], b".", b"..", b"a/b", b"a\0"] {
            assert!(check_name(name).is_err());
        }
        assert!(check_name(&[b'x'; 255]).is_ok());
        assert!(check_name(&[b'x'; 256]).is_err());
        assert!(check_name(b"...").is_ok());
    }
}
