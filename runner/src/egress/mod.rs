//! Egress policy: whether a guest's connection may leave the host, decided before any packet
//! does. The guest has no network device; every connection it makes arrives at the runner as a
//! request for a host and a port over the agent channel, and this module judges it.
//!
//! What comes in: the plan's grants ([`grant`]: exact names, `*.` wildcards, IP literals, each
//! with a port), the operator's `[egress]` section of `$MVM_HOME/config.toml` ([`config`]:
//! which loopback or private `IP:PORT` a literal grant may reach, names pinned to addresses,
//! limits), and the host the guest asks for ([`authority`]). What goes out: a [`judge::Decision`]
//! — the exact socket addresses to dial, or a refusal with a stable reason code — and the
//! fields of its audit entry. What is refused: anything no grant names; any name with an
//! address that is not public ([`address`]: metadata, link-local, loopback, private, CGNAT,
//! reserved and the rest, IPv6 forms that carry an IPv4 address judged as that address);
//! loopback and private addresses unless written literally and listed by the operator; and,
//! for TLS, a ClientHello whose server name is not the authority's ([`sni`]).
//!
//! Everything here is pure but the system resolver and [`relay`], which carries the connections
//! the agent opens: it dials only what a [`relay::Dialer`] returns.

pub mod address;
pub mod authority;
pub mod config;
pub mod dial;
pub mod grant;
pub mod judge;
pub mod log;
pub mod relay;
pub mod sni;
