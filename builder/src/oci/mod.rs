//! Importing OCI images, pinned by digest, into a staged [`Tree`].
//!
//! Sources are named like skopeo's transports: a registry `HOST[:PORT]/REPO` over the OCI
//! distribution API, `oci:DIR` (an OCI image layout directory) and `oci-archive:FILE` (a tarred
//! layout). The image is always named by its manifest digest; an image index is resolved to its
//! `linux/amd64` manifest.
//!
//! Trust flows from that digest: every manifest, config and layer blob is checked against the
//! digest that names it (and the size its descriptor gives) before it is used, blobs are kept in a
//! content-addressed [`BlobCache`] (so a second build fetches nothing), and each layer's
//! uncompressed stream is checked against the config's `diff_id` while it is applied. A
//! mismatch anywhere fails the build; a failed build's tree is discarded.
//!
//! An import is two steps that can run in different processes: [`pull_image`] fetches and
//! verifies every blob, parsing nothing but the index and manifest (the `mvm build` process
//! does it, with the network), and [`apply_image`] reads them back, verified again, and parses
//! the config and layers (the confined worker does it, without the network; see
//! [`crate::worker`]).

mod cache;
mod layout;
mod manifest;
mod reference;
mod registry;
mod verify;

#[cfg(test)]
pub(crate) mod tests;

use std::io::{self, Read};

use mvm_ir::{Coded, ErrorClass};

pub use cache::BlobCache;
pub use manifest::{ImageConfig, RuntimeConfig};
pub use reference::{ImageRef, Transport};
#[cfg(feature = "registry")]
pub use registry::resolve_tag;
pub use registry::{token_variable, RegistryOptions};

use crate::layer::{ApplyOptions, LayerApplier, LayerError, LayerStats};
use crate::tree::Tree;
use manifest::{Descriptor, MediaKind};
use verify::DigestingReader;

/// Padding accepted after a layer's end-of-archive marker.
const MAX_TRAILING_BYTES: u64 = 1024 * 1024;

/// Largest manifest, index or config accepted.
const MAX_DOCUMENT_BYTES: u64 = 4 * 1024 * 1024;

/// Why an image could not be imported. Its [`Coded::code`] is stable.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The image reference is malformed or not pinned.
    #[error("image reference {reference:?}: {reason}")]
    BadReference {
        /// The reference as given.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// A blob's bytes do not hash to the digest that names it, or differ in size from its
    /// descriptor.
    #[error("{what} {digest}: {reason}")]
    DigestMismatch {
        /// Which blob (manifest, config, layer, uncompressed layer).
        what: &'static str,
        /// The expected digest.
        digest: String,
        /// What was found instead.
        reason: String,
    },
    /// A manifest, index or config that does not parse or breaks the image spec.
    #[error("{what}: {reason}")]
    BadDocument {
        /// Which document.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The image has no `linux/amd64` manifest.
    #[error("image index has no linux/amd64 manifest (found: {0})")]
    NoMatchingPlatform(String),
    /// A layer media type mvm does not import.
    #[error("layer {digest} has unsupported media type {media_type}")]
    UnsupportedMediaType {
        /// The layer.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// A blob is missing from the source.
    #[error("{0} is not in the image source")]
    BlobNotFound(String),
    /// The registry refused or failed.
    #[error("registry {registry}: {reason}")]
    Registry {
        /// host[:port]
        registry: String,
        /// The failure.
        reason: String,
    },
    /// A layer blob that does not decompress (its digest matched: the publisher made it so).
    #[error("layer {digest} does not decompress: {reason}")]
    Decompress {
        /// The layer.
        digest: String,
        /// The decompressor's error.
        reason: String,
    },
    /// A layer was refused while it was applied.
    #[error("layer {digest}: {source}")]
    Layer {
        /// The layer.
        digest: String,
        /// The refusal.
        #[source]
        source: LayerError,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Coded for OciError {
    fn code(&self) -> &str {
        match self {
            OciError::BadReference { .. } => "OCI001",
            OciError::DigestMismatch { .. } => "OCI002",
            OciError::BadDocument { .. } => "OCI003",
            OciError::NoMatchingPlatform(_) => "OCI004",
            OciError::UnsupportedMediaType { .. } => "OCI005",
            OciError::BlobNotFound(_) => "OCI006",
            OciError::Registry { .. } => "OCI007",
            OciError::Layer { source, .. } => source.code(),
            OciError::Io { .. } => "OCI008",
            OciError::Decompress { .. } => "OCI009",
        }
    }

    /// A blob that does not match its digest (OCI002) is an integrity failure; the registry
    /// and local files (OCI007, OCI008) are I/O; a layer has its own class.
    fn class(&self) -> ErrorClass {
        match self {
            OciError::DigestMismatch { .. } => ErrorClass::Integrity,
            OciError::Registry { .. } | OciError::Io { .. } => ErrorClass::Io,
            OciError::Layer { source, .. } => source.class(),
            OciError::BadReference { .. }
            | OciError::BadDocument { .. }
            | OciError::NoMatchingPlatform(_)
            | OciError::UnsupportedMediaType { .. }
            | OciError::BlobNotFound(_)
            | OciError::Decompress { .. } => ErrorClass::InvalidInput,
        }
    }
}

impl OciError {
    fn io(path: impl std::fmt::Display, source: io::Error) -> Self {
        OciError::Io {
            path: path.to_string(),
            source,
        }
    }
}

/// Where blobs come from.
pub trait BlobSource {
    /// Copies the manifest or index `digest` to `out` (unverified: the caller verifies).
    fn fetch_manifest(&mut self, digest: &str, out: &mut dyn io::Write) -> Result<(), OciError>;
    /// Copies blob `digest` to `out` (unverified: the caller verifies).
    fn fetch_blob(
        &mut self,
        digest: &str,
        size: u64,
        out: &mut dyn io::Write,
    ) -> Result<(), OciError>;
}

/// One layer of an imported image, as provenance records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedLayer {
    /// Digest of the (compressed) blob.
    pub digest: String,
    /// Digest of the uncompressed tar stream.
    pub diff_id: String,
    /// The blob's media type.
    pub media_type: String,
    /// Blob size in bytes.
    pub size: u64,
    /// What applying it did.
    pub stats: LayerStats,
}

/// An image imported into a tree.
#[derive(Debug, Clone)]
pub struct ImportedImage {
    /// The digest the image was named by (an index or a manifest).
    pub digest: String,
    /// The `linux/amd64` manifest's digest (the same as `digest` unless it named an index).
    pub manifest_digest: String,
    /// The image config.
    pub config: ImageConfig,
    /// Its layers, bottom first.
    pub layers: Vec<ImportedLayer>,
}

/// The blobs an image is made of, each in the cache and verified against its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The digest the image was named by (an index or a manifest).
    pub digest: String,
    /// The `linux/amd64` manifest's digest (the same as `digest` unless it named an index).
    pub manifest_digest: String,
    /// Every blob an import reads: the named document, the manifest, the config and the layers.
    pub blobs: Vec<String>,
}

/// Fetches the image `image` into `cache` and verifies every blob of it, without applying
/// anything: the only bytes parsed are the index and manifest, after they matched their
/// digests. Blobs already cached are hashed again, so what is returned was verified now.
pub fn pull_image(
    image: &ImageRef,
    registry: &RegistryOptions,
    cache: &BlobCache,
) -> Result<PulledImage, OciError> {
    let mut source = open_source(image, registry)?;
    let source = source.as_mut();
    let (manifest_digest, manifest) = resolve_manifest(&image.digest, |digest| {
        cache.fetch_manifest(digest, MAX_DOCUMENT_BYTES, source)
    })?;
    // The config is fetched within the document limit, and parsed only where it is applied.
    cache.fetch_blob(&manifest.config, MAX_DOCUMENT_BYTES, source)?;
    for layer in &manifest.layers {
        layer.layer_kind()?;
        cache.fetch_verified(layer, source)?;
    }
    let mut blobs = vec![image.digest.clone()];
    blobs.extend((manifest_digest != image.digest).then(|| manifest_digest.clone()));
    blobs.push(manifest.config.digest.clone());
    blobs.extend(manifest.layers.iter().map(|l| l.digest.clone()));
    Ok(PulledImage {
        digest: image.digest.clone(),
        manifest_digest,
        blobs,
    })
}

/// The blobs of the image named by `digest`, as [`pull_image`] lists them, read from `cache`
/// alone: the index and manifest are verified against their digests and parsed, nothing is
/// fetched, and the config and layers are named, not read. For the image cache's records.
pub fn cached_image(digest: &str, cache: &BlobCache) -> Result<PulledImage, OciError> {
    let (manifest_digest, manifest) = resolve_manifest(digest, |digest| {
        cache.read_verified(digest, MAX_DOCUMENT_BYTES)
    })?;
    let mut blobs = vec![digest.to_string()];
    blobs.extend((manifest_digest != digest).then(|| manifest_digest.clone()));
    blobs.push(manifest.config.digest.clone());
    blobs.extend(manifest.layers.iter().map(|l| l.digest.clone()));
    Ok(PulledImage {
        digest: digest.to_string(),
        manifest_digest,
        blobs,
    })
}

/// Applies the image named by `digest` to `tree` from blobs already in `cache`, fetching
/// nothing: each blob is hashed again as it is read, and one that is missing is
/// [`OciError::BlobNotFound`].
pub fn apply_image(
    digest: &str,
    cache: &BlobCache,
    tree: &mut Tree,
    apply: &ApplyOptions,
) -> Result<ImportedImage, OciError> {
    let (manifest_digest, manifest) = resolve_manifest(digest, |digest| {
        cache.read_verified(digest, MAX_DOCUMENT_BYTES)
    })?;
    let config_bytes = cache.read_blob(&manifest.config, MAX_DOCUMENT_BYTES)?;
    let config = ImageConfig::parse(&config_bytes)?;
    if config.diff_ids.len() != manifest.layers.len() {
        return Err(OciError::BadDocument {
            what: "image config",
            reason: format!(
                "{} diff_ids for {} layers",
                config.diff_ids.len(),
                manifest.layers.len()
            ),
        });
    }
    for layer in &manifest.layers {
        layer.layer_kind()?;
    }
    let mut layers = Vec::new();
    for (layer, diff_id) in manifest.layers.iter().zip(&config.diff_ids) {
        let stats = apply_layer(cache, layer, diff_id, tree, apply)?;
        layers.push(ImportedLayer {
            digest: layer.digest.clone(),
            diff_id: diff_id.clone(),
            media_type: layer.media_type.clone(),
            size: layer.size,
            stats,
        });
    }
    Ok(ImportedImage {
        digest: digest.to_string(),
        manifest_digest,
        config,
        layers,
    })
}

/// Fetches (through the cache) and applies the image `image` to `tree`: [`pull_image`], then
/// [`apply_image`].
pub fn import_image(
    image: &ImageRef,
    registry: &RegistryOptions,
    cache: &BlobCache,
    tree: &mut Tree,
    apply: &ApplyOptions,
) -> Result<ImportedImage, OciError> {
    pull_image(image, registry, cache)?;
    apply_image(&image.digest, cache, tree, apply)
}

/// The `linux/amd64` manifest of the image named by `digest`, and its digest; `document` gives
/// the verified bytes of a manifest or index.
fn resolve_manifest(
    digest: &str,
    mut document: impl FnMut(&str) -> Result<Vec<u8>, OciError>,
) -> Result<(String, manifest::Manifest), OciError> {
    match manifest::parse_top(&document(digest)?, digest)? {
        manifest::Top::Manifest(manifest) => Ok((digest.to_string(), manifest)),
        manifest::Top::Index(index) => {
            let chosen = index.linux_amd64()?;
            match manifest::parse_top(&document(&chosen.digest)?, &chosen.digest)? {
                manifest::Top::Manifest(manifest) => Ok((chosen.digest.clone(), manifest)),
                manifest::Top::Index(_) => Err(OciError::BadDocument {
                    what: "image index",
                    reason: "an index inside an index is not supported".into(),
                }),
            }
        }
    }
}

#[cfg_attr(not(feature = "registry"), allow(unused_variables))]
fn open_source(
    image: &ImageRef,
    registry: &RegistryOptions,
) -> Result<Box<dyn BlobSource>, OciError> {
    Ok(match &image.transport {
        #[cfg(feature = "registry")]
        Transport::Registry {
            registry: host,
            repository,
        } => Box::new(registry::RegistrySource::connect(
            host, repository, registry,
        )?),
        #[cfg(not(feature = "registry"))]
        Transport::Registry { registry: host, .. } => {
            return Err(OciError::Registry {
                registry: host.clone(),
                reason: "this build has no registry client (mvm-builder's `registry` feature)"
                    .into(),
            })
        }
        Transport::Layout(dir) => Box::new(layout::LayoutSource::open(dir)?),
        Transport::Archive(file) => Box::new(layout::LayoutSource::unpack_archive(file)?),
    })
}

/// Decompresses a cached, verified layer blob and applies it, checking its `diff_id`.
fn apply_layer(
    cache: &BlobCache,
    layer: &Descriptor,
    diff_id: &str,
    tree: &mut Tree,
    apply: &ApplyOptions,
) -> Result<LayerStats, OciError> {
    let blob = cache.open_verified(&layer.digest, layer.size)?;
    let decompressed: Box<dyn Read> = match layer.layer_kind()? {
        MediaKind::Tar => Box::new(blob),
        MediaKind::TarGzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        MediaKind::TarZstd => Box::new(
            zstd::stream::read::Decoder::new(blob).map_err(|e| OciError::io(&layer.digest, e))?,
        ),
    };
    let mut uncompressed = DigestingReader::new(decompressed);
    let applied = LayerApplier::new(tree, apply.clone())
        .apply(&mut uncompressed)
        // The tar stream may end before the blob does (end-of-archive padding): hash the rest,
        // but not without bound.
        .and_then(|stats| {
            let trailing = io::copy(
                &mut (&mut uncompressed).take(MAX_TRAILING_BYTES + 1),
                &mut io::sink(),
            )
            .map_err(LayerError::from_stream)?;
            if trailing > MAX_TRAILING_BYTES {
                return Err(LayerError::from_stream(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "more than 1 MiB of data after the end of the archive",
                )));
            }
            Ok(stats)
        });
    let stats = match applied {
        Ok(stats) => stats,
        Err(source) => {
            return Err(match uncompressed.failure() {
                Some(reason) => OciError::Decompress {
                    digest: layer.digest.clone(),
                    reason: reason.to_string(),
                },
                None => OciError::Layer {
                    digest: layer.digest.clone(),
                    source,
                },
            })
        }
    };
    let found = uncompressed.finish();
    if found != diff_id {
        return Err(OciError::DigestMismatch {
            what: "uncompressed layer (diff_id)",
            digest: diff_id.to_string(),
            reason: format!("layer {} decompresses to {found}", layer.digest),
        });
    }
    Ok(stats)
}
