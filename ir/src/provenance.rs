//! Build provenance: an in-toto Statement v1 with an SLSA Provenance v1 predicate, signed as a
//! DSSE envelope of type [`PAYLOAD_TYPE`].
//!
//! Subjects are what a build produced (the root filesystem image and the launch plan payload);
//! resolved dependencies are what went in (the image's manifest and layer digests, the kernel
//! package, the guest agent). External parameters carry the workload IR digest and app; internal
//! parameters say how the builder ran (its persona and confinement) and what it left out of the
//! image ([`SkippedEntries`]: device nodes and FIFOs, counted all and named up to a cap).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The DSSE payload type of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// SLSA Provenance v1.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// What kind of build produced the subjects.
pub const BUILD_TYPE: &str = "https://mvm.dev/build/oci-rootfs/v1";

/// An artifact and its digests (`{"sha256": "<hex>"}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourceDescriptor {
    /// A name or URI for the artifact.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    /// Where it came from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub uri: Option<String>,
    /// Algorithm → hex digest.
    pub digest: BTreeMap<String, String>,
    /// What else is known of it: for the image, its config's `labels` and `exposed_ports`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub annotations: BTreeMap<String, Value>,
}

impl ResourceDescriptor {
    /// A descriptor of `name` with the `sha256:`-prefixed `digest`.
    pub fn sha256(name: Option<String>, uri: Option<String>, digest: &str) -> Self {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        Self {
            name,
            uri,
            digest: BTreeMap::from([("sha256".to_string(), hex.to_string())]),
            annotations: BTreeMap::new(),
        }
    }
}

/// An in-toto statement with an SLSA provenance predicate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    /// [`STATEMENT_TYPE`].
    #[serde(rename = "_type")]
    pub statement_type: String,
    /// What was built.
    pub subject: Vec<ResourceDescriptor>,
    /// [`PREDICATE_TYPE`].
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    /// The provenance.
    pub predicate: Provenance,
}

/// SLSA Provenance v1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// How the build was defined.
    #[serde(rename = "buildDefinition")]
    pub build_definition: BuildDefinition,
    /// How it ran.
    #[serde(rename = "runDetails")]
    pub run_details: RunDetails,
}

/// SLSA build definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildDefinition {
    /// [`BUILD_TYPE`].
    #[serde(rename = "buildType")]
    pub build_type: String,
    /// Inputs the user controls.
    #[serde(rename = "externalParameters")]
    pub external_parameters: Value,
    /// Inputs the builder chose.
    #[serde(rename = "internalParameters")]
    pub internal_parameters: Value,
    /// Everything that went in, by digest.
    #[serde(rename = "resolvedDependencies")]
    pub resolved_dependencies: Vec<ResourceDescriptor>,
}

/// SLSA run details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDetails {
    /// The builder.
    pub builder: Builder,
    /// Timing.
    pub metadata: RunMetadata,
}

/// The builder's identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Builder {
    /// A URI naming the builder and its version.
    pub id: String,
}

/// When the build ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMetadata {
    /// A unique id of this build.
    #[serde(rename = "invocationId")]
    pub invocation_id: String,
    /// RFC 3339 start.
    #[serde(rename = "startedOn")]
    pub started_on: String,
    /// RFC 3339 end.
    #[serde(rename = "finishedOn")]
    pub finished_on: String,
}

/// At most this many skipped layer entries are named; the rest are only counted.
pub const MAX_NAMED_SKIPPED: usize = 1000;
/// At most this many bytes of path, all named entries together (a path may be 4 KiB, and
/// more escaped): a hostile image cannot make the provenance large.
pub const MAX_NAMED_SKIPPED_BYTES: usize = 64 * 1024;

/// What a skipped layer entry was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SkippedKind {
    /// A character device node.
    Char,
    /// A block device node.
    Block,
    /// A named pipe.
    Fifo,
}

/// One layer entry a build left out of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkippedEntry {
    /// Its path in the image, from the root (`/dev/console`): UTF-8 as it is, every byte that
    /// is not UTF-8 written `\xNN` and a backslash written `\\`, so no two paths read alike.
    pub path: String,
    /// What it was.
    pub kind: SkippedKind,
}

impl SkippedEntry {
    /// The entry at image path `path` (raw bytes, from the root).
    pub fn new(path: &[u8], kind: SkippedKind) -> Self {
        let mut text = String::with_capacity(path.len());
        for chunk in path.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c == '\\' {
                    text.push_str("\\\\");
                } else {
                    text.push(c);
                }
            }
            for byte in chunk.invalid() {
                text.push_str(&format!("\\x{byte:02x}"));
            }
        }
        Self { path: text, kind }
    }
}

/// The layer entries a build skipped rather than put in the image: device nodes and FIFOs (the
/// guest's devtmpfs provides `/dev`). Every one is counted; the first ones, in layer and
/// archive order, are named — at most [`MAX_NAMED_SKIPPED`], with at most
/// [`MAX_NAMED_SKIPPED_BYTES`] of paths. A document over those caps does not deserialize.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedSkipped")]
pub struct SkippedEntries {
    /// How many entries were skipped.
    pub total: u64,
    /// The first of them.
    pub named: Vec<SkippedEntry>,
}

impl SkippedEntries {
    /// Counts `entry`, and names it if every earlier one was named and it fits the caps.
    pub fn record(&mut self, entry: SkippedEntry) {
        let all_named = self.named.len() as u64 == self.total;
        self.total += 1;
        if all_named
            && self.named.len() < MAX_NAMED_SKIPPED
            && self.path_bytes() + entry.path.len() <= MAX_NAMED_SKIPPED_BYTES
        {
            self.named.push(entry);
        }
    }

    /// Adds the entries `later` counted, as if recorded one by one after these.
    pub fn append(&mut self, later: &SkippedEntries) {
        let before = self.total;
        for entry in &later.named {
            self.record(entry.clone());
        }
        self.total = before + later.total;
    }

    fn path_bytes(&self) -> usize {
        self.named.iter().map(|e| e.path.len()).sum()
    }
}

/// [`SkippedEntries`] as read, before the caps are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UncheckedSkipped {
    total: u64,
    named: Vec<SkippedEntry>,
}

impl TryFrom<UncheckedSkipped> for SkippedEntries {
    type Error = String;

    fn try_from(value: UncheckedSkipped) -> Result<Self, String> {
        let checked = SkippedEntries {
            total: value.total,
            named: value.named,
        };
        if checked.named.len() > MAX_NAMED_SKIPPED
            || checked.path_bytes() > MAX_NAMED_SKIPPED_BYTES
            || (checked.named.len() as u64) > checked.total
        {
            return Err(format!(
                "{} named skipped entries ({} bytes of paths) of {}: over the caps",
                checked.named.len(),
                checked.path_bytes(),
                checked.total
            ));
        }
        Ok(checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(path: &str) -> SkippedEntry {
        SkippedEntry::new(path.as_bytes(), SkippedKind::Fifo)
    }

    #[test]
    fn paths_are_escaped_losslessly() {
        let entry = SkippedEntry::new(b"/dev/a\\b\xff\xfe\xc3\xa9", SkippedKind::Char);
        assert_eq!(entry.path, "/dev/a\\\\b\\xff\\xfeé");
        // A name that spells an escape reads apart from the byte it spells.
        assert_ne!(
            SkippedEntry::new(b"\\xff", SkippedKind::Char).path,
            SkippedEntry::new(b"\xff", SkippedKind::Char).path
        );
        assert_eq!(
            serde_json::to_value(&entry).unwrap(),
            serde_json::json!({"path": "/dev/a\\\\b\\xff\\xfeé", "kind": "char"})
        );
    }

    #[test]
    fn every_skipped_entry_is_counted_and_the_first_are_named_up_to_the_caps() {
        let mut skipped = SkippedEntries::default();
        for n in 0..1500 {
            skipped.record(fifo(&format!("/run/p{n}")));
        }
        assert_eq!(skipped.total, 1500);
        assert_eq!(skipped.named.len(), MAX_NAMED_SKIPPED);
        assert_eq!(skipped.named[999].path, "/run/p999");

        // Long paths: the byte cap names fewer, and once one is left out none after it is
        // named, so the named ones are always the first.
        let long = format!("/{}", "x".repeat(4000));
        let mut skipped = SkippedEntries::default();
        for _ in 0..20 {
            skipped.record(fifo(&long));
        }
        skipped.record(fifo("/short"));
        assert_eq!(skipped.total, 21);
        assert_eq!(skipped.named.len(), MAX_NAMED_SKIPPED_BYTES / long.len());
        assert!(skipped.named.iter().all(|e| e.path == long));

        // Across layers: appended as if recorded in order.
        let mut image = SkippedEntries::default();
        image.record(fifo("/a"));
        image.append(&skipped);
        assert_eq!(image.total, 22);
        assert_eq!(image.named.len(), 1 + skipped.named.len());
        let mut after_full = image.clone();
        let mut one = SkippedEntries::default();
        one.record(fifo("/b"));
        after_full.append(&one);
        assert_eq!(after_full.total, 23);
        assert_eq!(after_full.named, image.named, "nothing named after a gap");
    }

    #[test]
    fn a_document_over_the_caps_does_not_deserialize() {
        let mut skipped = SkippedEntries::default();
        skipped.record(fifo("/dev/initctl"));
        let json = serde_json::to_value(&skipped).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"total": 1, "named": [{"path": "/dev/initctl", "kind": "fifo"}]})
        );
        assert_eq!(
            serde_json::from_value::<SkippedEntries>(json).unwrap(),
            skipped
        );
        let many: Vec<_> = (0..1001)
            .map(|n| serde_json::json!({"path": format!("/p{n}"), "kind": "fifo"}))
            .collect();
        for bad in [
            serde_json::json!({"total": 1001, "named": many}),
            serde_json::json!({"total": 0, "named": [{"path": "/p", "kind": "fifo"}]}),
            serde_json::json!({"total": 1, "named": [{"path": "x".repeat(70_000), "kind": "char"}]}),
            serde_json::json!({"total": 1, "named": [{"path": "/p", "kind": "socket"}]}),
        ] {
            assert!(serde_json::from_value::<SkippedEntries>(bad).is_err());
        }
    }
}
