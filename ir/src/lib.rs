//! mvm's documents and the rules that make them trustworthy.
//!
//! Everything the rest of mvm exchanges is defined here:
//!
//! - the **Workload IR** ([`workload`]) that users write (JSON, or `mvm.toml` mapping 1:1 onto it),
//!   strictly parsed ([`load`]) and validated with stable `IR…` codes ([`validate`]);
//! - **canonical JSON** (RFC 8785, [`canonical`]) and the sha256 digests taken over it ([`digest`]);
//! - the **launch plan** ([`plan`]) the runner trusts: every artifact pinned by sha256, policy
//!   resolved, a validity window, a nonce and a single-use flag;
//! - **DSSE envelopes** ([`dsse`]) signed with ed25519, the host's keys and trust store ([`keys`]);
//! - **build provenance** ([`provenance`]): in-toto statements with an SLSA v1 predicate;
//! - **plan admission** ([`admission`]): the fixed order of checks a plan must pass before any VM
//!   process starts, and the ledger that refuses a single-use plan admitted twice;
//! - the **audit chain** ([`audit`]): signed, hash-chained JSONL whose every edit, deletion,
//!   insertion or reordering is found by verification.
//!
//! Nothing here starts a VM or touches the network. Untrusted bytes are size-capped before they
//! are parsed, and every refusal carries a stable code ([`Error::code`]) that the CLI maps to an
//! exit status.

pub mod admission;
pub mod audit;
pub mod canonical;
pub mod digest;
pub mod dsse;
pub mod env;
mod error;
pub mod fsutil;
pub mod home;
pub mod keys;
pub mod load;
pub mod plan;
pub mod policy;
pub mod provenance;
pub mod receipt;
pub mod schema;
pub mod sealing;
pub mod secrets;
pub mod terminal;
pub mod validate;
pub mod volume;
pub mod workload;

pub use error::{is_code, Coded, Error, ErrorClass};

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], Error> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::io("getrandom", std::io::Error::other(e.to_string())))?;
    Ok(bytes)
}
