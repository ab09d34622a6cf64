//! Applying OCI image layers (tar streams) to a staged [`Tree`], safely.
//!
//! The contract, per the OCI image layer specification:
//!
//! - entries apply in archive order; a regular whiteout `.wh.NAME` hides `NAME` from lower layers,
//!   an opaque whiteout `.wh..wh..opq` hides every lower-layer entry of its directory; neither
//!   hides what the same layer adds;
//! - a directory entry over an existing directory updates its metadata and keeps its children;
//!   anything else replaces what was there;
//! - hardlinks name an existing non-directory by its path in the image; symlinks are stored as
//!   they are and never followed for the entry's own name.
//!
//! Device nodes and FIFOs are skipped, never created: the guest mounts devtmpfs over `/dev` and
//! the image `nodev`, so a node in the image could never be used as a device. A skipped entry
//! is checked like any other (its path, parents, duplicates, metadata, the entry limit), creates
//! the parent directories it implies as tar does, and replaces what a lower layer held at its
//! path — which then holds nothing. A hardlink to an entry its own layer skipped is that same
//! node, skipped too; to one a lower layer skipped, it names nothing (a bad hardlink). Each
//! skipped entry is counted and named ([`LayerStats::skipped`]) for the provenance.
//!
//! What is refused, each with its own [`LayerErrorKind`]: `..` components, absolute paths,
//! writes through a symlink whose target climbs out of the root, hardlinks to missing,
//! out-of-root or directory targets, duplicate entries in one layer, entry types mvm does not
//! support (sparse files, …), and oversize headers, names, link targets or entry counts. Long
//! names are read from GNU and PAX extension headers here, with size caps, rather than by the
//! tar crate, so a hostile header cannot make the builder allocate without bound. Nothing is
//! ever written to the host's directory tree: the tree is staged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;

use mvm_ir::provenance::{SkippedEntries, SkippedEntry, SkippedKind};
use tar::EntryType;

use crate::tree::{Metadata, NodeId, NodeKind, Tree};

/// Limits on what one layer may contain.
#[derive(Debug, Clone)]
pub struct LayerLimits {
    /// Entries in one layer.
    pub entries: u64,
    /// Bytes of a GNU long name or long link extension.
    pub long_name: u64,
    /// Bytes of one PAX extended header.
    pub pax_header: u64,
    /// Bytes of a full path.
    pub path: usize,
    /// Bytes of one path component.
    pub name: usize,
    /// Bytes of a symlink target.
    pub link_target: usize,
    /// Symlinks followed while resolving one path.
    pub symlink_hops: u32,
    /// Bytes of extended attributes on one node (EROFS keeps them inline, beside the inode).
    pub xattr_bytes: usize,
    /// Nodes in the whole tree, across layers (implicit directories count).
    pub tree_nodes: usize,
    /// Bytes of file content staged for the whole tree, across layers.
    pub tree_bytes: u64,
}

impl Default for LayerLimits {
    fn default() -> Self {
        Self {
            entries: 1_000_000,
            long_name: 64 * 1024,
            pax_header: 1024 * 1024,
            path: 4096,
            name: 255,
            link_target: 4095,
            symlink_hops: 40,
            xattr_bytes: 64 * 1024,
            tree_nodes: 4_000_000,
            tree_bytes: 64 << 30,
        }
    }
}

/// How a layer entry was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerErrorKind {
    /// A path with a `..` component.
    Traversal,
    /// An absolute path.
    AbsolutePath,
    /// A path that resolves through a symlink climbing out of the root.
    SymlinkEscape,
    /// A hardlink to a missing, out-of-root or directory target.
    BadHardlink,
    /// The same path twice in one layer.
    DuplicateEntry,
    /// A header, name, link target or entry count over its limit.
    LimitExceeded,
    /// An entry type mvm does not apply (sparse files, unknown types).
    UnsupportedEntry,
    /// A path that goes through something that is not a directory.
    NotADirectory,
    /// The archive could not be read as a tar stream: truncated, a bad checksum or number, or
    /// a failure of the decompressor or digest check underneath.
    Malformed,
    /// Staging file content on the host failed.
    Io,
}

impl LayerErrorKind {
    /// The stable code of this refusal.
    pub fn code(self) -> &'static str {
        match self {
            LayerErrorKind::Traversal => "LAYER001",
            LayerErrorKind::AbsolutePath => "LAYER002",
            LayerErrorKind::SymlinkEscape => "LAYER003",
            LayerErrorKind::BadHardlink => "LAYER004",
            // LAYER005 (device nodes, now skipped) is retired, never reused.
            LayerErrorKind::DuplicateEntry => "LAYER006",
            LayerErrorKind::LimitExceeded => "LAYER007",
            LayerErrorKind::UnsupportedEntry => "LAYER008",
            LayerErrorKind::NotADirectory => "LAYER009",
            LayerErrorKind::Malformed => "LAYER010",
            LayerErrorKind::Io => "LAYER011",
        }
    }
}

/// A refused or unreadable layer.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct LayerError {
    /// What kind of refusal.
    pub kind: LayerErrorKind,
    /// The entry's path as the archive spells it (lossy UTF-8), or `<archive>`.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// The I/O error underneath, if any.
    #[source]
    pub source: Option<std::io::Error>,
}

impl mvm_ir::Coded for LayerError {
    fn code(&self) -> &str {
        self.kind.code()
    }

    /// Staging a file on the host (LAYER011) is I/O; every other refusal is of the layer.
    fn class(&self) -> mvm_ir::ErrorClass {
        match self.kind {
            LayerErrorKind::Io => mvm_ir::ErrorClass::Io,
            _ => mvm_ir::ErrorClass::InvalidInput,
        }
    }
}

impl LayerError {
    fn new(kind: LayerErrorKind, path: &[u8], message: impl Into<String>) -> Self {
        Self {
            kind,
            path: String::from_utf8_lossy(path).into_owned(),
            message: message.into(),
            source: None,
        }
    }

    /// A failure reading the layer stream itself.
    pub(crate) fn from_stream(err: std::io::Error) -> Self {
        Self::io(LayerErrorKind::Malformed, b"<archive>", err)
    }

    fn io(kind: LayerErrorKind, path: &[u8], err: std::io::Error) -> Self {
        Self {
            kind,
            path: String::from_utf8_lossy(path).into_owned(),
            message: err.to_string(),
            source: Some(err),
        }
    }
}

/// Options of layer application.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Size limits.
    pub limits: LayerLimits,
}

/// Counts of what a layer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries read (whiteouts and skipped entries included).
    pub entries: u64,
    /// Bytes of regular file content staged.
    pub bytes: u64,
    /// Whiteouts applied (regular and opaque).
    pub whiteouts: u64,
    /// Device nodes and FIFOs skipped: all counted, the first named.
    pub skipped: SkippedEntries,
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";

/// Applies layers, in order, to one tree.
pub struct LayerApplier<'t> {
    tree: &'t mut Tree,
    options: ApplyOptions,
}

/// Extension-header values that apply to the next entry.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    pax: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl<'t> LayerApplier<'t> {
    /// An applier writing into `tree`.
    pub fn new(tree: &'t mut Tree, options: ApplyOptions) -> Self {
        Self { tree, options }
    }

    /// Applies one uncompressed layer tar stream on top of what the tree holds. On error the
    /// tree may hold part of the layer: a failed build discards its tree.
    pub fn apply(&mut self, layer: impl Read) -> Result<LayerStats, LayerError> {
        let limits = self.options.limits.clone();
        let mut archive = tar::Archive::new(layer);
        let entries = archive
            .entries()
            .map_err(|e| LayerError::io(LayerErrorKind::Malformed, b"<archive>", e))?
            .raw(true);
        let mut stats = LayerStats::default();
        let mut added: HashSet<(NodeId, Vec<u8>)> = HashSet::new();
        let mut skipped: HashMap<(NodeId, Vec<u8>), SkippedKind> = HashMap::new();
        let mut pending = Pending::default();
        let mut headers = 0u64;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| LayerError::io(LayerErrorKind::Malformed, b"<archive>", e))?;
            headers += 1;
            if headers > limits.entries.saturating_mul(3) {
                return Err(LayerError::new(
                    LayerErrorKind::LimitExceeded,
                    b"<archive>",
                    format!("more than {} entries", limits.entries),
                ));
            }
            let header_path = entry.path_bytes().into_owned();
            let size = entry.size();
            match entry.header().entry_type() {
                EntryType::GNULongName | EntryType::GNULongLink => {
                    if size > limits.long_name {
                        return Err(LayerError::new(
                            LayerErrorKind::LimitExceeded,
                            &header_path,
                            format!("a {size}-byte long-name header, over {}", limits.long_name),
                        ));
                    }
                    let mut value = read_capped(&mut entry, size, &header_path)?;
                    // GNU long names are NUL-terminated.
                    while value.last() == Some(&0) {
                        value.pop();
                    }
                    if entry.header().entry_type() == EntryType::GNULongName {
                        pending.path = Some(value);
                    } else {
                        pending.link = Some(value);
                    }
                    continue;
                }
                EntryType::XHeader => {
                    if size > limits.pax_header {
                        return Err(LayerError::new(
                            LayerErrorKind::LimitExceeded,
                            &header_path,
                            format!("a {size}-byte PAX header, over {}", limits.pax_header),
                        ));
                    }
                    let bytes = read_capped(&mut entry, size, &header_path)?;
                    for (key, value) in parse_pax(&bytes, &header_path)? {
                        match key.as_slice() {
                            b"path" => pending.path = Some(value),
                            b"linkpath" => pending.link = Some(value),
                            _ => {
                                pending.pax.insert(key, value);
                            }
                        }
                    }
                    continue;
                }
                EntryType::XGlobalHeader => continue,
                _ => {}
            }
            let current = std::mem::take(&mut pending);
            let path = current.path.clone().unwrap_or(header_path);
            stats.entries += 1;
            if stats.entries > limits.entries {
                return Err(LayerError::new(
                    LayerErrorKind::LimitExceeded,
                    &path,
                    format!("more than {} entries", limits.entries),
                ));
            }
            let staged = self.apply_entry(
                &mut entry,
                &path,
                current,
                &mut added,
                &mut skipped,
                &mut stats,
            )?;
            stats.bytes += staged;
            if self.tree.node_count() > limits.tree_nodes {
                return Err(LayerError::new(
                    LayerErrorKind::LimitExceeded,
                    &path,
                    format!("the image has more than {} nodes", limits.tree_nodes),
                ));
            }
        }
        Ok(stats)
    }

    /// Applies one entry; returns the bytes of file content it staged. `added` holds what this
    /// layer put in the tree, `skipped` what it skipped (and left empty).
    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw_path: &[u8],
        extensions: Pending,
        added: &mut HashSet<(NodeId, Vec<u8>)>,
        skipped: &mut HashMap<(NodeId, Vec<u8>), SkippedKind>,
        stats: &mut LayerStats,
    ) -> Result<u64, LayerError> {
        let limits = self.options.limits.clone();
        // Readers disagree on which size wins when a PAX record and the header differ, so an
        // archive could hide entries from other tools: refuse, whatever the entry type.
        if extensions
            .pax
            .get(&b"size"[..])
            .is_some_and(|s| s != entry.size().to_string().as_bytes())
        {
            return Err(LayerError::new(
                LayerErrorKind::UnsupportedEntry,
                raw_path,
                "PAX size differs from the header size",
            ));
        }
        if extensions.pax.keys().any(|k| k.starts_with(b"GNU.sparse.")) {
            return Err(LayerError::new(
                LayerErrorKind::UnsupportedEntry,
                raw_path,
                "sparse files are not supported",
            ));
        }
        let components = split_path(raw_path, &limits)?;
        let Some((name, parents)) = components.split_last() else {
            // The root itself (`./`): only its metadata can change.
            let meta = metadata(entry.header(), &extensions.pax, raw_path, &limits)?;
            if entry.header().entry_type() == EntryType::Directory {
                self.tree.node_mut(Tree::ROOT).meta = meta;
                return Ok(0);
            }
            return Err(LayerError::new(
                LayerErrorKind::NotADirectory,
                raw_path,
                "the root can only be a directory",
            ));
        };
        let mut created = Vec::new();
        let parent = self.resolve_dir(parents, raw_path, Some(&mut created))?;
        // Directories this entry implied belong to this layer: its whiteouts do not hide them.
        added.extend(created);

        if name.as_slice() == OPAQUE_WHITEOUT {
            let lower: Vec<Vec<u8>> = self
                .tree
                .entries(parent)
                .map(|e| {
                    e.keys()
                        .filter(|k| !added.contains(&(parent, k.to_vec())))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            for child in lower {
                self.tree.unlink(parent, &child);
            }
            stats.whiteouts += 1;
            return Ok(0);
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(LayerError::new(
                    LayerErrorKind::Traversal,
                    raw_path,
                    "whiteout of an invalid name",
                ));
            }
            if !added.contains(&(parent, hidden.to_vec())) {
                self.tree.unlink(parent, hidden);
            }
            stats.whiteouts += 1;
            return Ok(0);
        }

        let header = entry.header().clone();
        let entry_type = header.entry_type();
        if !added.insert((parent, name.clone())) {
            let both_dirs = entry_type == EntryType::Directory
                && matches!(
                    self.tree
                        .lookup(parent, name)
                        .map(|id| &self.tree.node(id).kind),
                    Some(NodeKind::Directory(_))
                );
            if !both_dirs {
                return Err(LayerError::new(
                    LayerErrorKind::DuplicateEntry,
                    raw_path,
                    "the layer names this path twice",
                ));
            }
        }
        let meta = metadata(&header, &extensions.pax, raw_path, &limits)?;
        let link_target = || -> Result<Vec<u8>, LayerError> {
            let target = extensions
                .link
                .clone()
                .or_else(|| entry_link_name(&header))
                .ok_or_else(|| {
                    LayerError::new(LayerErrorKind::Malformed, raw_path, "link without a target")
                })?;
            if target.is_empty() || target.contains(&0) {
                return Err(LayerError::new(
                    LayerErrorKind::Malformed,
                    raw_path,
                    "link target is empty or contains NUL",
                ));
            }
            if target.len() > limits.link_target {
                return Err(LayerError::new(
                    LayerErrorKind::LimitExceeded,
                    raw_path,
                    format!("link target over {} bytes", limits.link_target),
                ));
            }
            Ok(target)
        };

        let skip = match entry_type {
            EntryType::Char => Some(SkippedKind::Char),
            EntryType::Block => Some(SkippedKind::Block),
            EntryType::Fifo => Some(SkippedKind::Fifo),
            _ => None,
        };
        let mut staged = 0;
        let new_node = match (entry_type, skip) {
            (_, Some(kind)) => {
                self.skip(parent, name, &components, kind, skipped, stats);
                return Ok(0);
            }
            (EntryType::Directory, _) => {
                if let Some(existing) = self.tree.lookup(parent, name) {
                    if let NodeKind::Directory(_) = self.tree.node(existing).kind {
                        self.tree.node_mut(existing).meta = meta;
                        return Ok(0);
                    }
                }
                self.tree.add(NodeKind::Directory(BTreeMap::new()), meta)
            }
            (EntryType::Regular | EntryType::Continuous, _) => {
                if self
                    .tree
                    .staging()
                    .staged_bytes()
                    .saturating_add(entry.size())
                    > limits.tree_bytes
                {
                    return Err(LayerError::new(
                        LayerErrorKind::LimitExceeded,
                        raw_path,
                        format!("the image's files exceed {} bytes", limits.tree_bytes),
                    ));
                }
                staged = entry.size();
                self.tree
                    .add_file(&mut ArchiveRead(entry), meta)
                    .map_err(|e| malformed_or_io(raw_path, e))?
            }
            (EntryType::Symlink, _) => self.tree.add(NodeKind::Symlink(link_target()?), meta),
            (EntryType::Link, _) => {
                let target = link_target()?;
                let existing = match self.resolve_existing(&target, raw_path)? {
                    LinkTarget::Node(id) => id,
                    LinkTarget::Missing(key) => match skipped.get(&key) {
                        // The same node as an entry this layer skipped: skipped too.
                        Some(&kind) => {
                            self.skip(parent, name, &components, kind, skipped, stats);
                            return Ok(0);
                        }
                        None => {
                            return Err(LayerError::new(
                                LayerErrorKind::BadHardlink,
                                raw_path,
                                "the hardlink target does not exist",
                            ))
                        }
                    },
                };
                if matches!(self.tree.node(existing).kind, NodeKind::Directory(_)) {
                    return Err(LayerError::new(
                        LayerErrorKind::BadHardlink,
                        raw_path,
                        "a hardlink to a directory",
                    ));
                }
                existing
            }
            (other, None) => {
                return Err(LayerError::new(
                    LayerErrorKind::UnsupportedEntry,
                    raw_path,
                    format!("entry type {:?} is not supported", other.as_byte() as char),
                ))
            }
        };
        self.tree.link(parent, name, new_node);
        Ok(staged)
    }

    /// Skips a device node or FIFO at `name` in `parent`: whatever a lower layer held there is
    /// removed, as the entry would have replaced it, and nothing takes its place.
    fn skip(
        &mut self,
        parent: NodeId,
        name: &[u8],
        components: &[Vec<u8>],
        kind: SkippedKind,
        skipped: &mut HashMap<(NodeId, Vec<u8>), SkippedKind>,
        stats: &mut LayerStats,
    ) {
        self.tree.unlink(parent, name);
        skipped.insert((parent, name.to_vec()), kind);
        let mut path = Vec::new();
        for component in components {
            path.push(b'/');
            path.extend_from_slice(component);
        }
        stats.skipped.record(SkippedEntry::new(&path, kind));
    }

    /// Resolves the directory that `components` name, following symlinks inside the root.
    /// With `created`, missing directories are created (mode 0755, root-owned), as tar does,
    /// and recorded there.
    fn resolve_dir(
        &mut self,
        components: &[Vec<u8>],
        raw_path: &[u8],
        created: Option<&mut Vec<(NodeId, Vec<u8>)>>,
    ) -> Result<NodeId, LayerError> {
        let mut hops = 0;
        self.walk(
            Tree::ROOT,
            &mut Vec::new(),
            components,
            raw_path,
            created,
            &mut hops,
        )
    }

    fn walk(
        &mut self,
        start: NodeId,
        stack: &mut Vec<NodeId>,
        components: &[Vec<u8>],
        raw_path: &[u8],
        mut created: Option<&mut Vec<(NodeId, Vec<u8>)>>,
        hops: &mut u32,
    ) -> Result<NodeId, LayerError> {
        let mut current = start;
        for component in components {
            if component.as_slice() == b".." {
                current = stack.pop().ok_or_else(|| {
                    LayerError::new(
                        LayerErrorKind::SymlinkEscape,
                        raw_path,
                        "a symlink on the path climbs out of the root",
                    )
                })?;
                continue;
            }
            let next = match self.tree.lookup(current, component) {
                Some(id) => id,
                None => match created.as_deref_mut() {
                    Some(created) => {
                        let dir = self.tree.add(
                            NodeKind::Directory(BTreeMap::new()),
                            Metadata {
                                mode: 0o755,
                                ..Metadata::default()
                            },
                        );
                        self.tree.link(current, component, dir);
                        created.push((current, component.clone()));
                        dir
                    }
                    None => {
                        return Err(LayerError::new(
                            LayerErrorKind::NotADirectory,
                            raw_path,
                            "a directory on the path does not exist (a dangling symlink?)",
                        ))
                    }
                },
            };
            match &self.tree.node(next).kind {
                NodeKind::Directory(_) => {
                    stack.push(current);
                    current = next;
                }
                NodeKind::Symlink(target) => {
                    *hops += 1;
                    if *hops > self.options.limits.symlink_hops {
                        return Err(LayerError::new(
                            LayerErrorKind::LimitExceeded,
                            raw_path,
                            "too many symlinks on the path",
                        ));
                    }
                    let target = target.clone();
                    let (base, mut base_stack) = if target.starts_with(b"/") {
                        (Tree::ROOT, Vec::new())
                    } else {
                        (current, stack.clone())
                    };
                    let parts: Vec<Vec<u8>> = target
                        .split(|&b| b == b'/')
                        .filter(|c| !c.is_empty() && *c != b".")
                        .map(<[u8]>::to_vec)
                        .collect();
                    current = self.walk(base, &mut base_stack, &parts, raw_path, None, hops)?;
                    *stack = base_stack;
                }
                _ => {
                    return Err(LayerError::new(
                        LayerErrorKind::NotADirectory,
                        raw_path,
                        "a component of the path is not a directory",
                    ))
                }
            }
        }
        Ok(current)
    }

    /// The node an image path names (for hardlinks): parents resolved inside the root, the last
    /// component not followed; or, when the parents exist but the name does not, where it would
    /// be.
    fn resolve_existing(
        &mut self,
        target: &[u8],
        raw_path: &[u8],
    ) -> Result<LinkTarget, LayerError> {
        let components = split_path(target, &self.options.limits).map_err(|e| LayerError {
            kind: LayerErrorKind::BadHardlink,
            message: format!("hardlink target: {}", e.message),
            ..e
        })?;
        let Some((name, parents)) = components.split_last() else {
            return Err(LayerError::new(
                LayerErrorKind::BadHardlink,
                raw_path,
                "a hardlink to the root",
            ));
        };
        let parent = self
            .resolve_dir(parents, raw_path, None)
            .map_err(|e| LayerError {
                kind: LayerErrorKind::BadHardlink,
                ..e
            })?;
        Ok(match self.tree.lookup(parent, name) {
            Some(id) => LinkTarget::Node(id),
            None => LinkTarget::Missing((parent, name.clone())),
        })
    }
}

/// What a hardlink's target names.
enum LinkTarget {
    /// A node of the tree.
    Node(NodeId),
    /// Nothing: the directory and name where it would be.
    Missing((NodeId, Vec<u8>)),
}

/// Splits an archive path into components, refusing `..`, absolute paths, NUL and oversize
/// names. `.` components and a leading `./` are dropped.
fn split_path(path: &[u8], limits: &LayerLimits) -> Result<Vec<Vec<u8>>, LayerError> {
    if path.len() > limits.path {
        return Err(LayerError::new(
            LayerErrorKind::LimitExceeded,
            path,
            format!("path over {} bytes", limits.path),
        ));
    }
    if path.contains(&0) {
        return Err(LayerError::new(
            LayerErrorKind::Malformed,
            path,
            "path contains NUL",
        ));
    }
    if path.starts_with(b"/") {
        return Err(LayerError::new(
            LayerErrorKind::AbsolutePath,
            path,
            "absolute paths are refused",
        ));
    }
    let mut components = Vec::new();
    for component in path.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                return Err(LayerError::new(
                    LayerErrorKind::Traversal,
                    path,
                    "'..' components are refused",
                ))
            }
            name if name.len() > limits.name => {
                return Err(LayerError::new(
                    LayerErrorKind::LimitExceeded,
                    path,
                    format!("a name over {} bytes", limits.name),
                ))
            }
            name => components.push(name.to_vec()),
        }
    }
    Ok(components)
}

/// The entry's metadata: mode, owner and time from the header, overridden by PAX records, and
/// extended attributes from `SCHILY.xattr.*` records.
fn metadata(
    header: &tar::Header,
    pax: &BTreeMap<Vec<u8>, Vec<u8>>,
    path: &[u8],
    limits: &LayerLimits,
) -> Result<Metadata, LayerError> {
    let bad = |what: &str| {
        LayerError::new(
            LayerErrorKind::Malformed,
            path,
            format!("unreadable {what}"),
        )
    };
    let pax_number = |key: &[u8]| -> Result<Option<u64>, LayerError> {
        pax.get(key)
            .map(|v| {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| bad("PAX number"))
            })
            .transpose()
    };
    let uid = match pax_number(b"uid")? {
        Some(uid) => uid,
        None => header.uid().map_err(|_| bad("uid"))?,
    };
    let gid = match pax_number(b"gid")? {
        Some(gid) => gid,
        None => header.gid().map_err(|_| bad("gid"))?,
    };
    let mtime = match pax.get(&b"mtime"[..]) {
        // PAX times may carry a fraction: keep whole seconds.
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.split('.').next()?.parse::<i64>().ok())
            .ok_or_else(|| bad("PAX mtime"))?,
        None => header.mtime().map_err(|_| bad("mtime"))? as i64,
    };
    let xattrs: BTreeMap<Vec<u8>, Vec<u8>> = pax
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(b"SCHILY.xattr.")?.to_vec(), v.clone())))
        .collect();
    let xattr_bytes: usize = xattrs.iter().map(|(k, v)| k.len() + v.len()).sum();
    if xattr_bytes > limits.xattr_bytes {
        return Err(LayerError::new(
            LayerErrorKind::LimitExceeded,
            path,
            format!(
                "{xattr_bytes} bytes of extended attributes, over {}",
                limits.xattr_bytes
            ),
        ));
    }
    Ok(Metadata {
        mode: header.mode().map_err(|_| bad("mode"))? & 0o7777,
        uid: u32::try_from(uid).map_err(|_| bad("uid"))?,
        gid: u32::try_from(gid).map_err(|_| bad("gid"))?,
        mtime,
        xattrs,
    })
}

fn entry_link_name(header: &tar::Header) -> Option<Vec<u8>> {
    header.link_name_bytes().map(|b| b.into_owned())
}

/// Reads exactly `size` bytes of an extension entry (already checked against its cap).
fn read_capped(entry: &mut impl Read, size: u64, path: &[u8]) -> Result<Vec<u8>, LayerError> {
    let mut value = Vec::with_capacity(size as usize);
    entry
        .take(size)
        .read_to_end(&mut value)
        .map_err(|e| LayerError::io(LayerErrorKind::Malformed, path, e))?;
    if value.len() as u64 != size {
        return Err(LayerError::new(
            LayerErrorKind::Malformed,
            path,
            "truncated extension header",
        ));
    }
    Ok(value)
}

/// One PAX record: key and value.
type PaxRecord = (Vec<u8>, Vec<u8>);

/// Parses PAX extended header records: `"<len> <key>=<value>\n"` each, `len` counting the
/// whole record.
fn parse_pax(bytes: &[u8], path: &[u8]) -> Result<Vec<PaxRecord>, LayerError> {
    let bad = || LayerError::new(LayerErrorKind::Malformed, path, "malformed PAX record");
    let mut records = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad());
        }
        let record = &rest[space + 1..len - 1];
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        records.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(records)
}

/// Marks every error reading the archive as invalid data, so that a failure while staging a
/// file's content can be told apart: archive side (malformed, or a decompression or digest
/// failure below) versus the host's staging file.
struct ArchiveRead<R>(R);

impl<R: Read> Read for ArchiveRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0
            .read(buf)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

fn malformed_or_io(path: &[u8], err: std::io::Error) -> LayerError {
    let kind = match err.kind() {
        std::io::ErrorKind::InvalidData => LayerErrorKind::Malformed,
        _ => LayerErrorKind::Io,
    };
    LayerError::io(kind, path, err)
}

#[cfg(test)]
mod tests;
