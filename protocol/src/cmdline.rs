//! The root filesystem's dm-verity parameters and the workload's guest policy, read from the
//! kernel command line.
//!
//! The builder writes them and the launch plan signs the command line, so they are as trusted
//! as the plan; they are still checked strictly here, because a typo'd or truncated value
//! would otherwise surface later as an obscure device-mapper error. Every parameter must appear
//! exactly once; other words of the command line (`console=`, `quiet`…) are the kernel's.

/// The `mvm.*` parameters.
const ROOT_HASH: &str = "mvm.root_hash";
const SALT: &str = "mvm.salt";
const DATA_BLOCKS: &str = "mvm.data_blocks";
const HASH_OFFSET: &str = "mvm.hash_offset";
const BLOCK_SIZE: &str = "mvm.block_size";
const KEYS: [&str; 5] = [ROOT_HASH, SALT, DATA_BLOCKS, HASH_OFFSET, BLOCK_SIZE];

/// Length of a SHA-256 root hash in hex.
const ROOT_HASH_HEX_LEN: usize = 64;
/// dm-verity's longest salt (256 bytes), in hex.
const MAX_SALT_HEX_LEN: usize = 512;
/// dm-verity only opens data blocks no larger than the page size (4 KiB on x86_64).
const MAX_BLOCK_SIZE: u32 = 4096;
/// dm-verity's smallest block size.
const MIN_BLOCK_SIZE: u32 = 512;

/// What is wrong with the command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    /// A parameter is absent.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// A parameter appears twice.
    #[error("{0} is given more than once")]
    Repeated(&'static str),
    /// A parameter's value is malformed.
    #[error("{key}={value:?}: {why}")]
    Malformed {
        /// The parameter.
        key: &'static str,
        /// Its value as given (truncated to keep the console line short).
        value: String,
        /// What a valid value looks like.
        why: &'static str,
    },
}

/// The verity parameters, validated. Data and hash blocks have the same size (`mvm.block_size`)
/// and the hash device begins with a verity superblock at `hash_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityCmdline {
    /// The signed root hash, lowercase hex.
    pub root_hash: String,
    /// The salt, lowercase hex, possibly empty.
    pub salt: String,
    /// Number of data blocks the tree covers.
    pub data_blocks: u64,
    /// Byte offset of the verity superblock on the hash device.
    pub hash_offset: u64,
    /// Bytes per data block and per hash block.
    pub block_size: u32,
}

impl VerityCmdline {
    /// Parses the kernel command line (the contents of `/proc/cmdline`).
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let mut values: [Option<&str>; KEYS.len()] = [None; KEYS.len()];
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            if let Some(i) = KEYS.iter().position(|k| *k == key) {
                if values[i].replace(value).is_some() {
                    return Err(CmdlineError::Repeated(KEYS[i]));
                }
            }
        }
        let get = |key: &'static str| {
            let i = KEYS.iter().position(|k| *k == key).unwrap_or_default();
            values[i].ok_or(CmdlineError::Missing(key))
        };

        let root_hash = get(ROOT_HASH)?;
        if root_hash.len() != ROOT_HASH_HEX_LEN || !is_lower_hex(root_hash) {
            return Err(malformed(ROOT_HASH, root_hash, "64 lowercase hex digits"));
        }
        let salt = get(SALT)?;
        if salt.len() > MAX_SALT_HEX_LEN || salt.len() % 2 != 0 || !is_lower_hex(salt) {
            return Err(malformed(
                SALT,
                salt,
                "an even number of lowercase hex digits, at most 512",
            ));
        }
        let block_size = get(BLOCK_SIZE)?;
        let block_size = block_size
            .parse::<u32>()
            .ok()
            .filter(|b| b.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(b))
            .ok_or_else(|| malformed(BLOCK_SIZE, block_size, "a power of two from 512 to 4096"))?;
        let data_blocks = get(DATA_BLOCKS)?;
        let data_blocks = number(data_blocks)
            .filter(|n| *n > 0)
            .ok_or_else(|| malformed(DATA_BLOCKS, data_blocks, "a positive decimal number"))?;
        let hash_offset = get(HASH_OFFSET)?;
        let hash_offset = number(hash_offset)
            .filter(|n| n % u64::from(block_size) == 0)
            .ok_or_else(|| {
                malformed(
                    HASH_OFFSET,
                    hash_offset,
                    "a decimal multiple of the block size",
                )
            })?;
        Ok(Self {
            root_hash: root_hash.to_string(),
            salt: salt.to_string(),
            data_blocks,
            hash_offset,
            block_size,
        })
    }

    /// The hash block where the tree begins: the superblock takes the first block from
    /// `hash_offset`.
    pub fn hash_start_block(&self) -> u64 {
        self.hash_offset / u64::from(self.block_size) + 1
    }

    /// Length of the data device in 512-byte sectors, as device-mapper counts.
    pub fn data_sectors(&self) -> u64 {
        self.data_blocks * u64::from(self.block_size / 512)
    }

    /// The dm-verity target parameters (format version 1, SHA-256) over the two devices. An
    /// empty salt is spelled `-`, as dm-verity expects.
    pub fn table(&self, data_device: &str, hash_device: &str) -> String {
        let salt = if self.salt.is_empty() {
            "-"
        } else {
            &self.salt
        };
        format!(
            "1 {data_device} {hash_device} {bs} {bs} {} {} sha256 {} {salt}",
            self.data_blocks,
            self.hash_start_block(),
            self.root_hash,
            bs = self.block_size,
        )
    }
}

/// The guest policy's parameter: `mvm.policy=TIER[,GRANT]…`.
const POLICY: &str = "mvm.policy";

/// The syscall filter the agent installs on the workload's commands, narrowest first (the
/// plan's `grants.seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SeccompTier {
    /// Kernel-surface denials, `AF_UNIX` sockets only.
    Essential,
    /// Kernel-surface denials; `AF_INET`/`AF_INET6` only with `inet`.
    Standard,
    /// Kernel-surface denials; every socket family.
    Network,
    /// No filter.
    Unrestricted,
}

/// What the plan's profile grants inside the guest, as the builder signed it into the
/// command line: the agent enforces it and cannot be told otherwise over its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPolicy {
    /// The commands' syscall filter.
    pub seccomp: SeccompTier,
    /// `AF_INET`/`AF_INET6` sockets under the `standard` tier.
    pub inet: bool,
    /// Files may be written in from the host.
    pub host_copy: bool,
    /// File operations may reach beyond `/tmp` and the home.
    pub files_anywhere: bool,
    /// An interactive terminal may be opened.
    pub terminal: bool,
}

impl GuestPolicy {
    /// Parses `mvm.policy=` of the kernel command line: required, exactly once, a known tier
    /// then known grants, each at most once.
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let mut found = None;
        for word in cmdline.split_ascii_whitespace() {
            if let Some(value) = word.strip_prefix("mvm.policy=") {
                if found.replace(value).is_some() {
                    return Err(CmdlineError::Repeated(POLICY));
                }
            }
        }
        let value = found.ok_or(CmdlineError::Missing(POLICY))?;
        let bad = || {
            malformed(
                POLICY,
                value,
                "essential, standard, network or unrestricted, then ,inet ,host_copy ,files_anywhere ,terminal",
            )
        };
        let mut parts = value.split(',');
        let seccomp = match parts.next() {
            Some("essential") => SeccompTier::Essential,
            Some("standard") => SeccompTier::Standard,
            Some("network") => SeccompTier::Network,
            Some("unrestricted") => SeccompTier::Unrestricted,
            _ => return Err(bad()),
        };
        let mut policy = GuestPolicy {
            seccomp,
            inet: false,
            host_copy: false,
            files_anywhere: false,
            terminal: false,
        };
        for grant in parts {
            let flag = match grant {
                "inet" => &mut policy.inet,
                "host_copy" => &mut policy.host_copy,
                "files_anywhere" => &mut policy.files_anywhere,
                "terminal" => &mut policy.terminal,
                _ => return Err(bad()),
            };
            if std::mem::replace(flag, true) {
                return Err(bad());
            }
        }
        Ok(policy)
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A decimal number without sign or leading `+` (which `u64::from_str` would accept).
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn malformed(key: &'static str, value: &str, why: &'static str) -> CmdlineError {
    CmdlineError::Malformed {
        key,
        value: value.chars().take(80).collect(),
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "5b2d1f6e0c7a9b8d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d";

    fn line(extra: &str) -> String {
        format!(
            "console=ttyS0 reboot=k panic=-1 quiet mvm.root_hash={HASH} mvm.salt=00ff \
             mvm.data_blocks=300 mvm.hash_offset=0 mvm.block_size=4096 {extra}"
        )
    }

    #[test]
    fn parses_what_the_builder_writes() {
        let v = VerityCmdline::parse(&line("")).unwrap();
        assert_eq!(v.root_hash, HASH);
        assert_eq!(v.salt, "00ff");
        assert_eq!((v.data_blocks, v.hash_offset, v.block_size), (300, 0, 4096));
        assert_eq!(v.hash_start_block(), 1, "the superblock takes block 0");
        assert_eq!(v.data_sectors(), 2400);
        assert_eq!(
            v.table("/dev/vda", "/dev/vdb"),
            format!("1 /dev/vda /dev/vdb 4096 4096 300 1 sha256 {HASH} 00ff")
        );
    }

    #[test]
    fn the_superblock_follows_the_hash_offset() {
        let v =
            VerityCmdline::parse(&line("").replace("hash_offset=0", "hash_offset=8192")).unwrap();
        assert_eq!(v.hash_start_block(), 3);
    }

    #[test]
    fn an_empty_salt_is_a_dash_in_the_table() {
        let v = VerityCmdline::parse(&line("").replace("salt=00ff", "salt=")).unwrap();
        assert!(v.table("a", "b").ends_with(&format!("{HASH} -")));
    }

    #[test]
    fn the_guest_policy_is_a_tier_and_its_grants() {
        let p = GuestPolicy::parse(&line("mvm.policy=standard,inet,host_copy")).unwrap();
        assert_eq!(p.seccomp, SeccompTier::Standard);
        assert!(p.inet && p.host_copy && !p.files_anywhere && !p.terminal);
        let p = GuestPolicy::parse("mvm.policy=essential").unwrap();
        assert!(!p.inet && !p.host_copy);
        assert_eq!(
            GuestPolicy::parse(&line("")),
            Err(CmdlineError::Missing(POLICY))
        );
        assert_eq!(
            GuestPolicy::parse("mvm.policy=network mvm.policy=essential"),
            Err(CmdlineError::Repeated(POLICY))
        );
        for value in [
            "",
            "lenient",
            "standard,",
            "standard,inet,inet",
            "standard,root",
            ",inet",
            "Standard",
        ] {
            let parsed = GuestPolicy::parse(&format!("mvm.policy={value}"));
            assert!(
                matches!(parsed, Err(CmdlineError::Malformed { key: POLICY, .. })),
                "{value}: {parsed:?}"
            );
        }
    }

    #[test]
    fn refuses_missing_repeated_and_malformed_values() {
        assert_eq!(
            VerityCmdline::parse("console=ttyS0"),
            Err(CmdlineError::Missing(ROOT_HASH))
        );
        assert_eq!(
            VerityCmdline::parse(&line("mvm.salt=00")),
            Err(CmdlineError::Repeated(SALT))
        );
        for (from, to, key) in [
            (HASH, &HASH[1..], ROOT_HASH),
            (HASH, &HASH.to_uppercase()[..], ROOT_HASH),
            ("salt=00ff", "salt=0ff", SALT),
            ("salt=00ff", "salt=zz", SALT),
            ("data_blocks=300", "data_blocks=0", DATA_BLOCKS),
            ("data_blocks=300", "data_blocks=+3", DATA_BLOCKS),
            (
                "data_blocks=300",
                "data_blocks=99999999999999999999",
                DATA_BLOCKS,
            ),
            ("hash_offset=0", "hash_offset=512", HASH_OFFSET),
            ("hash_offset=0", "hash_offset=-1", HASH_OFFSET),
            ("block_size=4096", "block_size=8192", BLOCK_SIZE),
            ("block_size=4096", "block_size=1000", BLOCK_SIZE),
        ] {
            match VerityCmdline::parse(&line("").replace(from, to)) {
                Err(CmdlineError::Malformed { key: k, .. }) => assert_eq!(k, key, "{to}"),
                other => panic!("{to}: {other:?}"),
            }
        }
    }
}
