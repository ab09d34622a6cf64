//! Build provenance: an in-toto Statement v1 with an SLSA Provenance v1 predicate, signed as a
//! DSSE envelope of type [`PAYLOAD_TYPE`].
//!
//! Subjects are what a build produced (the root filesystem image and the launch plan payload);
//! resolved dependencies are what went in (the image's manifest and layer digests, the kernel
//! package, the guest agent). External parameters carry the workload IR digest and app; internal
//! parameters say how the builder ran (its persona and confinement).

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceDescriptor {
    /// A name or URI for the artifact.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    /// Where it came from.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub uri: Option<String>,
    /// Algorithm → hex digest.
    pub digest: BTreeMap<String, String>,
}

impl ResourceDescriptor {
    /// A descriptor of `name` with the `sha256:`-prefixed `digest`.
    pub fn sha256(name: Option<String>, uri: Option<String>, digest: &str) -> Self {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        Self {
            name,
            uri,
            digest: BTreeMap::from([("sha256".to_string(), hex.to_string())]),
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
