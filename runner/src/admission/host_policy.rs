//! The host operator's ceilings on every plan this host runs: the `[policy]` section of
//! `$MVM_HOME/config.toml`.
//!
//! ```toml
//! [policy]
//! max_profile = "standard"   # plans of a wider profile (dev, permissive) are refused here
//! max_cpu_cores = 4
//! max_memory_mb = 8192
//! allow_egress = false       # no plan that grants egress or forwards ports runs here
//! allow_client_env = false   # no client sets a command's environment here
//! ```
//!
//! A plan is signed where it was built, maybe on another machine; the host that runs it caps
//! it. A plan over a ceiling is refused before any VM starts (RUN059), never silently cut
//! down: a workload that runs with less than its plan says would fail in ways nobody can
//! trace. Every key is optional; an unknown key or a malformed value is refused too (RUN059),
//! so that an operator's typo cannot leave a ceiling off.

use mvm_ir::home::MvmHome;
use mvm_ir::plan::LaunchPlan;
use mvm_ir::policy::Profile;
use serde::Deserialize;

/// The operator's ceilings; `None` or `true` where the section says nothing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPolicy {
    /// The widest profile a plan may have.
    #[serde(default, deserialize_with = "profile_name")]
    pub max_profile: Option<Profile>,
    /// The most vCPUs a plan may ask for.
    pub max_cpu_cores: Option<u32>,
    /// The most guest memory a plan may ask for, in MiB.
    pub max_memory_mb: Option<u32>,
    /// Whether a plan may grant egress or forward ports.
    #[serde(default = "yes")]
    pub allow_egress: bool,
    /// Whether a client may set a command's environment.
    #[serde(default = "yes")]
    pub allow_client_env: bool,
}

fn yes() -> bool {
    true
}

impl Default for HostPolicy {
    /// No ceilings: what the plan's own profile allows.
    fn default() -> Self {
        HostPolicy {
            max_profile: None,
            max_cpu_cores: None,
            max_memory_mb: None,
            allow_egress: true,
            allow_client_env: true,
        }
    }
}

fn profile_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Profile>, D::Error> {
    let name = String::deserialize(d)?;
    Profile::from_name(&name).map(Some).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "{name:?} is not a profile: restrictive, standard, dev or permissive"
        ))
    })
}

/// Why the host's policy could not be read, or refuses a plan: RUN059.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPolicyError {
    /// `config.toml` cannot be read or its `[policy]` section is malformed.
    #[error("config.toml [policy]: {0}")]
    Config(String),
    /// The plan is over a ceiling.
    #[error("this host's policy (config.toml [policy] {rule}) refuses the plan: {why}")]
    Refused {
        /// The key that decided.
        rule: &'static str,
        /// What the plan asks for beyond it.
        why: String,
    },
}

impl HostPolicy {
    /// The `[policy]` section of `home`'s `config.toml`; no ceilings when there is none.
    pub fn load(home: &MvmHome) -> Result<Self, HostPolicyError> {
        let text = home
            .config_text()
            .map_err(|e| HostPolicyError::Config(e.to_string()))?;
        Self::parse(text.as_deref().unwrap_or(""))
    }

    /// The `[policy]` section of `text`, a `config.toml`.
    pub fn parse(text: &str) -> Result<Self, HostPolicyError> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            policy: Option<HostPolicy>,
        }
        let file: File =
            toml::from_str(text).map_err(|e| HostPolicyError::Config(e.message().to_string()))?;
        Ok(file.policy.unwrap_or_default())
    }

    /// Refuses a plan over a ceiling, naming the key that decided.
    pub fn check(&self, plan: &LaunchPlan) -> Result<(), HostPolicyError> {
        let refuse = |rule, why: String| Err(HostPolicyError::Refused { rule, why });
        let profile = plan.policy.profile;
        if let Some(most) = self.max_profile.filter(|most| profile > *most) {
            return refuse(
                "max_profile",
                format!("its profile is {profile}, this host runs {most} at most"),
            );
        }
        let cpus = plan.resources.cpu_cores;
        if let Some(most) = self.max_cpu_cores.filter(|most| cpus > *most) {
            return refuse(
                "max_cpu_cores",
                format!("it asks for {cpus} vCPUs, this host gives {most} at most"),
            );
        }
        let memory = plan.resources.memory_mb;
        if let Some(most) = self.max_memory_mb.filter(|most| memory > *most) {
            return refuse(
                "max_memory_mb",
                format!("it asks for {memory} MiB, this host gives {most} MiB at most"),
            );
        }
        if !self.allow_egress && plan.is_networked() {
            return refuse(
                "allow_egress",
                "it grants egress or forwards ports, which this host allows no plan".into(),
            );
        }
        Ok(())
    }

    /// Whether a client may set a command's environment under `plan` on this host, and if
    /// not, the rule that says no.
    pub fn client_env(&self, plan: &LaunchPlan) -> Result<(), String> {
        if !plan.policy.grants.client_env {
            return Err(format!(
                "the plan's {} profile lets no client set a command's environment",
                plan.policy.profile
            ));
        }
        if !self.allow_client_env {
            return Err(
                "this host's policy (config.toml [policy] allow_client_env) lets no client set a command's environment"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_section_sets_no_ceiling() {
        let none = HostPolicy::default();
        assert!(none.allow_egress && none.allow_client_env && none.max_profile.is_none());
        assert_eq!(HostPolicy::parse("").unwrap(), none);
        let other = "[egress]\nmax_connections = 3\n";
        assert_eq!(HostPolicy::parse(other).unwrap(), none);
    }

    #[test]
    fn typos_and_unknown_profiles_are_refused() {
        for text in [
            "[policy]\nmax_profle = \"dev\"\n",
            "[policy]\nmax_profile = \"lenient\"\n",
            "[policy]\nmax_cpu_cores = -1\n",
            "[policy]\nallow_egress = \"no\"\n",
        ] {
            assert!(
                matches!(HostPolicy::parse(text), Err(HostPolicyError::Config(_))),
                "{text}"
            );
        }
    }
}
