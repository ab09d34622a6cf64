//! mvm's Nix formats, written from the Nix manual and Dolstra's thesis and checked against the
//! real `nix` (the tests in `tests/` run Debian's Nix 2.8 on every case).
//!
//! What comes in: hashes, store paths, `.drv` files (ATerm) from any store, file trees.
//! What goes out: the same store paths, derivation bytes and archives Nix computes.
//!
//! - [`nixbase32`]: Nix's base-32 (its own alphabet and bit order), strict on decode.
//! - [`hash`]: sha256, the 160-bit XOR-fold of store paths, declared fixed-output hashes.
//! - [`store_path`]: parsing and checking store paths; [`store_path::compute`] makes them
//!   for text objects, fixed outputs and sources, and derivation outputs.
//! - [`derivation`]: the [`Derivation`] type; ATerm writing byte-exact to Nix and strict
//!   parsing of untrusted bytes; the modulo hash, output paths and `.drv` path.
//! - [`nar`]: the deterministic NAR of a file tree and its sha256.
//!
//! What it refuses: malformed or oversized ATerm, derivations Nix would not have written
//! (out-of-order entries, escapes Nix never writes), invalid store paths and names, Nix's
//! experimental content-addressed derivations (not supported yet), files a NAR cannot hold.
//! Every refusal is a [`NixError`] with a stable code (`NIX001`…); nothing panics on input.
//! Only the store directory `/nix/store` is supported.

pub mod derivation;
mod error;
pub mod hash;
pub mod nar;
pub mod nixbase32;
pub mod store_path;

pub use derivation::Derivation;
pub use error::NixError;
pub use store_path::StorePath;
