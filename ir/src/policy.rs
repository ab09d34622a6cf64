//! Policy profiles: the fixed postures a plan is built under, and the grants each one gives.
//!
//! A profile is chosen at build (`--profile`, else the declaration's, else the app's threat
//! tier's default) and resolved into the signed plan as [`Grants`]: what the runner, the agent
//! and the guest's syscall filter then allow. The table is [`Profile::grants`] and
//! [`Profile::ceilings`]; `docs/policy.md` prints it and a test holds the two together.
//!
//! | | restrictive | standard | dev | permissive |
//! |---|---|---|---|---|
//! | vCPUs / memory at most | 2 / 2 GiB | 8 / 16 GiB | 16 / 32 GiB | 32 / 64 GiB |
//! | egress grants, forwarded ports | no | yes | yes | yes |
//! | client environment (`--env`, `exec --env`) | no | yes | yes | yes |
//! | files copied in from the host | no | yes | yes | yes |
//! | files anywhere (not only `/tmp`, home) | no | no | yes | yes |
//! | interactive terminal | no | no | yes | yes |
//! | unbound secrets (values in the guest) | no | yes | yes | yes |
//! | guest seccomp tier | essential | standard | network | unrestricted |
//! | needs `--ack-permissive` | no | no | no | yes |

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::workload::ThreatTier;

/// A policy profile: the defaults that grants then widen.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// No network, no host files, no client environment, small limits.
    Restrictive,
    /// The default.
    Standard,
    /// Interactive terminal, larger limits, file copy both ways anywhere.
    Dev,
    /// Broad grants and no guest syscall filter; needs an explicit acknowledgement.
    Permissive,
}

/// The syscall filter the agent installs on every workload command before `execve`, from the
/// narrowest to none. What each refuses is `mvm_agent`'s `seccomp` module's table.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SeccompTier {
    /// The kernel-surface denials, and sockets of `AF_UNIX` only.
    Essential,
    /// The kernel-surface denials; `AF_INET`/`AF_INET6` sockets only with `inet`.
    Standard,
    /// The kernel-surface denials; any socket family.
    Network,
    /// No filter (`no_new_privs` and the non-root user still hold).
    Unrestricted,
}

/// What a plan's profile lets its commands and clients do, resolved at build and signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// The guest syscall filter of the workload's commands.
    pub seccomp: SeccompTier,
    /// Whether commands may open `AF_INET`/`AF_INET6` sockets: the plan has egress or
    /// forwarded ports (always under `network` and `unrestricted`).
    pub inet: bool,
    /// Whether a client may set variables of a command's environment.
    pub client_env: bool,
    /// Whether files may be copied from the host into the guest.
    pub host_copy: bool,
    /// Whether file operations may reach beyond `/tmp` and the workload user's home.
    pub files_anywhere: bool,
    /// Whether an interactive terminal may be opened.
    pub terminal: bool,
    /// Whether a secret's value may be handed to a command (a secret bound to no host).
    pub unbound_secrets: bool,
    /// Whether clients may run any command, or only the plan's entrypoint program (with any
    /// arguments), and change no file: a plan built with `--only-entrypoint` (the builder
    /// VM's) is no shell. Every profile gives it; a plan may take it away.
    #[serde(default = "granted", skip_serializing_if = "is_granted")]
    pub any_command: bool,
}

/// The default of a grant that plans written before it existed had.
fn granted() -> bool {
    true
}

fn is_granted(grant: &bool) -> bool {
    *grant
}

/// The most a plan of a profile may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ceilings {
    /// vCPUs.
    pub cpu_cores: u32,
    /// Guest memory in MiB.
    pub memory_mb: u32,
}

impl Profile {
    /// Every profile, narrowest first.
    pub const ALL: [Profile; 4] = [
        Profile::Restrictive,
        Profile::Standard,
        Profile::Dev,
        Profile::Permissive,
    ];

    /// The profile's name as plans and flags spell it.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Restrictive => "restrictive",
            Profile::Standard => "standard",
            Profile::Dev => "dev",
            Profile::Permissive => "permissive",
        }
    }

    /// The profile named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether a plan of this profile may grant egress or forward ports.
    pub fn allows_network(self) -> bool {
        self != Profile::Restrictive
    }

    /// Whether building a plan of this profile needs `--ack-permissive`.
    pub fn needs_acknowledgement(self) -> bool {
        self == Profile::Permissive
    }

    /// The grants of a plan of this profile; `networked` says whether the plan grants egress
    /// or forwards ports (which opens `AF_INET` sockets under the `standard` tier).
    pub fn grants(self, networked: bool) -> Grants {
        let open = self != Profile::Restrictive;
        let dev = matches!(self, Profile::Dev | Profile::Permissive);
        let seccomp = match self {
            Profile::Restrictive => SeccompTier::Essential,
            Profile::Standard => SeccompTier::Standard,
            Profile::Dev => SeccompTier::Network,
            Profile::Permissive => SeccompTier::Unrestricted,
        };
        Grants {
            seccomp,
            inet: seccomp >= SeccompTier::Network
                || (seccomp == SeccompTier::Standard && networked),
            client_env: open,
            host_copy: open,
            files_anywhere: dev,
            terminal: dev,
            unbound_secrets: open,
            any_command: true,
        }
    }

    /// The most a plan of this profile may ask for.
    pub fn ceilings(self) -> Ceilings {
        let (cpu_cores, memory_mb) = match self {
            Profile::Restrictive => (2, 2048),
            Profile::Standard => (8, 16384),
            Profile::Dev => (16, 32768),
            Profile::Permissive => (32, 65536),
        };
        Ceilings {
            cpu_cores,
            memory_mb,
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl SeccompTier {
    /// The tier's name as plans and the kernel command line spell it.
    pub fn name(self) -> &'static str {
        match self {
            SeccompTier::Essential => "essential",
            SeccompTier::Standard => "standard",
            SeccompTier::Network => "network",
            SeccompTier::Unrestricted => "unrestricted",
        }
    }
}

impl ThreatTier {
    /// The profile an app of this tier is built under unless a profile is named: code from
    /// an unknown author gets the default, the owner's own tooling the dev profile.
    pub fn default_profile(self) -> Profile {
        match self {
            ThreatTier::Untrusted | ThreatTier::Standard => Profile::Standard,
            ThreatTier::Trusted => Profile::Dev,
        }
    }
}

impl Grants {
    /// The `mvm.policy=` word of the kernel command line that tells the agent these grants:
    /// the tier, then each granted guest-side permission, comma-separated
    /// (`mvm_protocol::cmdline::GuestPolicy` reads it).
    pub fn cmdline_word(&self) -> String {
        let mut word = format!("mvm.policy={}", self.seccomp.name());
        for (granted, name) in [
            (self.inet, "inet"),
            (self.host_copy, "host_copy"),
            (self.files_anywhere, "files_anywhere"),
            (self.terminal, "terminal"),
        ] {
            if granted {
                word.push(',');
                word.push_str(name);
            }
        }
        word
    }

    /// Why these grants are wider than `profile` gives a plan that is `networked` or not, if
    /// they are: a plan may be narrower than its profile, never wider.
    pub fn wider_than(&self, profile: Profile, networked: bool) -> Option<&'static str> {
        let most = profile.grants(networked);
        let wider = |ours: bool, theirs: bool| ours && !theirs;
        if self.seccomp > most.seccomp {
            Some("seccomp")
        } else if wider(self.inet, most.inet) {
            Some("inet")
        } else if wider(self.client_env, most.client_env) {
            Some("client_env")
        } else if wider(self.host_copy, most.host_copy) {
            Some("host_copy")
        } else if wider(self.files_anywhere, most.files_anywhere) {
            Some("files_anywhere")
        } else if wider(self.terminal, most.terminal) {
            Some("terminal")
        } else if wider(self.unbound_secrets, most.unbound_secrets) {
            Some("unbound_secrets")
        } else if wider(self.any_command, most.any_command) {
            Some("any_command")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_widen_in_order() {
        for pair in Profile::ALL.windows(2) {
            let (narrow, wide) = (pair[0], pair[1]);
            for networked in [false, true] {
                let grants = narrow.grants(networked);
                assert_eq!(
                    grants.wider_than(wide, networked),
                    None,
                    "{narrow} ⊄ {wide}"
                );
            }
            assert!(narrow.ceilings().cpu_cores <= wide.ceilings().cpu_cores);
            assert!(narrow.ceilings().memory_mb <= wide.ceilings().memory_mb);
        }
    }

    #[test]
    fn only_a_networked_standard_plan_opens_inet_sockets_below_network() {
        assert!(!Profile::Restrictive.grants(true).inet);
        assert!(!Profile::Standard.grants(false).inet);
        assert!(Profile::Standard.grants(true).inet);
        assert!(Profile::Dev.grants(false).inet);
    }

    #[test]
    fn the_command_line_word_names_the_tier_and_the_guest_side_grants() {
        assert_eq!(
            Profile::Restrictive.grants(false).cmdline_word(),
            "mvm.policy=essential"
        );
        assert_eq!(
            Profile::Standard.grants(true).cmdline_word(),
            "mvm.policy=standard,inet,host_copy"
        );
        assert_eq!(
            Profile::Dev.grants(false).cmdline_word(),
            "mvm.policy=network,inet,host_copy,files_anywhere,terminal"
        );
    }

    #[test]
    fn a_widened_grant_is_named() {
        let mut grants = Profile::Standard.grants(false);
        grants.terminal = true;
        assert_eq!(
            grants.wider_than(Profile::Standard, false),
            Some("terminal")
        );
        let mut grants = Profile::Standard.grants(false);
        grants.inet = true;
        assert_eq!(grants.wider_than(Profile::Standard, false), Some("inet"));
        assert_eq!(grants.wider_than(Profile::Standard, true), None);
    }

    #[test]
    fn names_round_trip() {
        for profile in Profile::ALL {
            assert_eq!(Profile::from_name(profile.name()), Some(profile));
            let json = serde_json::to_string(&profile).unwrap();
            assert_eq!(json, format!("\"{profile}\""));
        }
        assert_eq!(Profile::from_name("Standard"), None);
    }
}
