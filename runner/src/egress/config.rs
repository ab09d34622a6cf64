//! The host operator's side of egress: the `[egress]` section of `$MVM_HOME/config.toml`.
//!
//! ```toml
//! [egress]
//! allow_private = ["127.0.0.1:11434", "[::1]:8080"]   # loopback/private IP:PORT a grant may name
//! resolve = { "svc.example.com" = "192.0.2.5", "api.example.com" = ["192.0.2.7", "2001:db8::7"] }
//! max_connections = 64                                # per VM
//! idle_timeout = "5m"                                 # or a number of seconds
//! ```
//!
//! Every key is optional; a missing file or section means the defaults. The operator decides
//! what the plan's author cannot: which loopback or private `IP:PORT` (a local model server)
//! a grant may name literally, and which addresses a name is pinned to instead of being looked
//! up (like curl's `--resolve`). Neither can open what is never reachable: an `allow_private`
//! entry must be a loopback or private address — metadata, link-local and the other never
//! reachable kinds are refused here, and a public address needs no listing — and a pinned
//! name is judged by the address rules like a looked-up one, so a name pinned to a private
//! address is still denied. Anything the section does not know, or a value out of its bounds,
//! is refused (RUN054): an operator's typo must not silently leave a default in place. Other
//! sections of the file belong to other parts of mvm and are not read here.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mvm_ir::home::MvmHome;
use mvm_ir::{Coded, ErrorClass};
use serde::Deserialize;

use super::address::{classify, Reach};
use super::authority::DnsName;
use crate::codes;

/// The largest request header block a guest's proxied request may have: fixed, not
/// configurable, so every host parses requests with the same bound.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The default number of a VM's concurrent egress connections.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 64;
/// The most a host may allow: each connection holds a socket and a stream on the agent
/// channel.
const MAX_MAX_CONNECTIONS: u32 = 4096;
/// The default time an egress connection may carry nothing before it is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// The longest idle timeout a host may set.
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
/// The largest `config.toml` read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// The most addresses one name may be pinned to.
const MAX_PINNED_ADDRESSES: usize = 16;

/// The operator's egress settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressConfig {
    /// Loopback and private `IP:PORT`s a grant may name literally (IPv4-mapped forms stored as
    /// IPv4).
    pub allow_private: Vec<SocketAddr>,
    /// Names the host does not look up, with the addresses they stand for.
    pub resolve: BTreeMap<DnsName, Vec<IpAddr>>,
    /// Concurrent egress connections per VM.
    pub max_connections: u32,
    /// How long a connection may carry nothing before it is closed.
    pub idle_timeout: Duration,
    /// PEM files of CA certificates trusted, beyond the system's, for the far end of a
    /// connection the host terminates to put a bound secret in (`tls_trust`).
    pub tls_trust: Vec<PathBuf>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            allow_private: Vec::new(),
            resolve: BTreeMap::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            tls_trust: Vec::new(),
        }
    }
}

/// Why the operator's egress configuration cannot be used (RUN054).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read, or is over 1 MiB.
    #[error("{}: {reason}", path.display())]
    Read {
        /// `config.toml`.
        path: PathBuf,
        /// The OS error, or the size.
        reason: String,
    },
    /// Not TOML, or `[egress]` has an unknown key or a value of the wrong type.
    #[error("{}: {message}", path.display())]
    Malformed {
        /// `config.toml`.
        path: PathBuf,
        /// The parser's message, with the line.
        message: String,
    },
    /// A value of `[egress]` is well-formed but not allowed.
    #[error("{}: [egress] {key}: {problem}", path.display())]
    Invalid {
        /// `config.toml`.
        path: PathBuf,
        /// The key (`allow_private`, `resolve`, …).
        key: &'static str,
        /// What is wrong with its value.
        problem: String,
    },
}

impl Coded for ConfigError {
    fn code(&self) -> &str {
        codes::RUN054
    }

    fn class(&self) -> ErrorClass {
        match self {
            ConfigError::Read { .. } => ErrorClass::Io,
            _ => ErrorClass::InvalidInput,
        }
    }
}

/// The file, of which only `[egress]` is read here.
#[derive(Deserialize)]
struct File {
    #[serde(default)]
    egress: Option<Section>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Section {
    #[serde(default)]
    allow_private: Vec<String>,
    #[serde(default)]
    resolve: BTreeMap<String, OneOrMore>,
    max_connections: Option<u32>,
    idle_timeout: Option<Seconds>,
    #[serde(default)]
    tls_trust: Vec<PathBuf>,
}

/// A pin's value: one address, or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMore {
    One(String),
    More(Vec<String>),
}

/// A duration as a number of seconds or as text (`"90s"`, `"5m"`, `"1h 30m"`), as durations
/// are written on mvm's command line.
#[derive(Deserialize)]
#[serde(untagged)]
enum Seconds {
    Number(u64),
    Text(String),
}

impl EgressConfig {
    /// The settings in `$MVM_HOME/config.toml`; the defaults when it does not exist.
    pub fn load(home: &MvmHome) -> Result<Self, ConfigError> {
        let path = home.root().join("config.toml");
        let bytes = match mvm_ir::fsutil::read_capped(&path, MAX_CONFIG_BYTES, "config.toml") {
            Ok(bytes) => bytes,
            Err(mvm_ir::Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(Self::default())
            }
            Err(mvm_ir::Error::Io { source, .. }) => {
                let reason = source.to_string();
                return Err(ConfigError::Read { path, reason });
            }
            Err(error) => {
                let reason = error.to_string();
                return Err(ConfigError::Read { path, reason });
            }
        };
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::Malformed {
            path: path.clone(),
            message: "not UTF-8".into(),
        })?;
        Self::parse(&text, &path)
    }

    /// The settings in `text`, the contents of `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start].matches('\n').count() + 1);
            ConfigError::Malformed {
                path: path.to_path_buf(),
                message: match line {
                    Some(line) => format!("line {line}: {}", e.message()),
                    None => e.message().to_string(),
                },
            }
        })?;
        let Some(section) = file.egress else {
            return Ok(Self::default());
        };
        let invalid = |key, problem: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            problem,
        };
        let mut config = Self::default();
        for entry in &section.allow_private {
            let addr = allowed_private(entry).map_err(|p| invalid("allow_private", p))?;
            if !config.allow_private.contains(&addr) {
                config.allow_private.push(addr);
            }
        }
        for (name, value) in section.resolve {
            let (key, addresses) = pin(&name, value).map_err(|p| invalid("resolve", p))?;
            if config.resolve.insert(key, addresses).is_some() {
                return Err(invalid("resolve", format!("{name:?} is pinned twice")));
            }
        }
        if let Some(max) = section.max_connections {
            if !(1..=MAX_MAX_CONNECTIONS).contains(&max) {
                let problem = format!("{max} is not between 1 and {MAX_MAX_CONNECTIONS}");
                return Err(invalid("max_connections", problem));
            }
            config.max_connections = max;
        }
        if let Some(timeout) = section.idle_timeout {
            config.idle_timeout = idle_timeout(timeout).map_err(|p| invalid("idle_timeout", p))?;
        }
        for file in section.tls_trust {
            if !file.is_absolute() {
                let problem = format!("{} is not an absolute path", file.display());
                return Err(invalid("tls_trust", problem));
            }
            config.tls_trust.push(file);
        }
        Ok(config)
    }

    /// Whether the operator lets a grant that names `addr` literally reach it.
    pub fn allows_private(&self, addr: SocketAddr) -> bool {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        self.allow_private.contains(&addr)
    }
}

/// An `allow_private` entry: `IP:PORT` (`[IPv6]:PORT`), a loopback or private address, a port.
fn allowed_private(entry: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = entry
        .parse()
        .map_err(|_| format!("{entry:?} is not IP:PORT (IPv6 as [::1]:8080)"))?;
    if addr.port() == 0 {
        return Err(format!("{entry:?} has port 0"));
    }
    let class = classify(addr.ip());
    match class.reach() {
        Reach::OperatorListed => Ok(SocketAddr::new(addr.ip().to_canonical(), addr.port())),
        Reach::Granted => Err(format!(
            "{entry:?} is a public address, which a grant reaches without being listed"
        )),
        Reach::Never => Err(format!(
            "{entry:?} is never reachable ({class:?}), whatever the configuration"
        )),
    }
}

/// A `resolve` entry: a name and the addresses it stands for (1 to 16, no repeats).
fn pin(name: &str, value: OneOrMore) -> Result<(DnsName, Vec<IpAddr>), String> {
    let key = DnsName::parse(name).map_err(|e| format!("{name:?}: {e}"))?;
    let texts = match value {
        OneOrMore::One(text) => vec![text],
        OneOrMore::More(texts) => texts,
    };
    if texts.is_empty() || texts.len() > MAX_PINNED_ADDRESSES {
        return Err(format!(
            "{name:?} needs 1 to {MAX_PINNED_ADDRESSES} addresses"
        ));
    }
    let mut addresses = Vec::with_capacity(texts.len());
    for text in texts {
        let ip: IpAddr = text
            .parse()
            .map_err(|_| format!("{name:?}: {text:?} is not an IP address"))?;
        if addresses.contains(&ip) {
            return Err(format!("{name:?}: {ip} is listed twice"));
        }
        addresses.push(ip);
    }
    Ok((key, addresses))
}

/// `idle_timeout`: whole seconds or humantime text, 1 s to 24 h.
fn idle_timeout(value: Seconds) -> Result<Duration, String> {
    let timeout = match value {
        Seconds::Number(seconds) => Duration::from_secs(seconds),
        Seconds::Text(text) => humantime::parse_duration(&text)
            .map_err(|e| format!("{text:?} is not a duration ({e})"))?,
    };
    if timeout < Duration::from_secs(1) || timeout > MAX_IDLE_TIMEOUT {
        return Err(format!(
            "{} is not between 1s and 24h",
            humantime::format_duration(timeout)
        ));
    }
    Ok(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EgressConfig, ConfigError> {
        EgressConfig::parse(text, Path::new("/home/op/.mvm/config.toml"))
    }

    fn problem(text: &str) -> String {
        let error = parse(text).unwrap_err();
        assert_eq!(error.code(), "RUN054");
        assert_eq!(error.class(), ErrorClass::InvalidInput);
        error.to_string()
    }

    #[test]
    fn no_section_or_an_empty_one_means_the_defaults() {
        let defaults = EgressConfig {
            allow_private: vec![],
            resolve: BTreeMap::new(),
            max_connections: 64,
            idle_timeout: Duration::from_secs(300),
            tls_trust: vec![],
        };
        assert_eq!(EgressConfig::default(), defaults);
        assert_eq!(parse("").unwrap(), defaults);
        assert_eq!(parse("[egress]\n").unwrap(), defaults);
        // Other sections are other parts' business.
        let other = "[registries]\ninsecure = [\"127.0.0.1:5000\"]\n[other]\nx = 1\n";
        assert_eq!(parse(other).unwrap(), defaults);
        assert_eq!(MAX_HEADER_BYTES, 16384);
    }

    #[test]
    fn a_full_section_is_read() {
        let config = parse(
            r#"
[registries]
insecure = ["127.0.0.1:5000"]

[egress]
allow_private = ["127.0.0.1:11434", "[::1]:8080", "10.0.0.5:5432", "[::ffff:192.168.1.2]:80", "127.0.0.1:11434"]
resolve = { "SVC.example.com." = "192.0.2.5", "api.example.com" = ["192.0.2.7", "2001:db8::7"] }
max_connections = 8
idle_timeout = "90s"
"#,
        )
        .unwrap();
        let addrs: Vec<String> = config
            .allow_private
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            addrs,
            [
                "127.0.0.1:11434",
                "[::1]:8080",
                "10.0.0.5:5432",
                "192.168.1.2:80"
            ]
        );
        let pins: Vec<String> = config
            .resolve
            .iter()
            .map(|(name, ips)| format!("{name}={ips:?}"))
            .collect();
        assert_eq!(
            pins,
            [
                "api.example.com=[192.0.2.7, 2001:db8::7]",
                "svc.example.com=[192.0.2.5]"
            ]
        );
        assert_eq!(config.max_connections, 8);
        assert_eq!(config.idle_timeout, Duration::from_secs(90));
        assert!(config.allows_private("127.0.0.1:11434".parse().unwrap()));
        assert!(config.allows_private("[::ffff:127.0.0.1]:11434".parse().unwrap()));
        assert!(config.allows_private("192.168.1.2:80".parse().unwrap()));
        assert!(!config.allows_private("127.0.0.1:11435".parse().unwrap()));
        assert!(!config.allows_private("127.0.0.2:11434".parse().unwrap()));
        assert!(!config.allows_private("[::1]:11434".parse().unwrap()));
    }

    #[test]
    fn the_idle_timeout_is_seconds_or_text() {
        for (value, seconds) in [
            ("300", 300),
            ("1", 1),
            ("\"5m\"", 300),
            ("\"1h 30m\"", 5400),
            ("\"24h\"", 86400),
        ] {
            let config = parse(&format!("[egress]\nidle_timeout = {value}\n")).unwrap();
            assert_eq!(config.idle_timeout, Duration::from_secs(seconds), "{value}");
        }
        for value in [
            "0",
            "\"0s\"",
            "\"500ms\"",
            "86401",
            "\"2days\"",
            "\"soon\"",
            "-5",
        ] {
            let text = format!("[egress]\nidle_timeout = {value}\n");
            assert_eq!(parse(&text).unwrap_err().code(), "RUN054", "{value}");
        }
    }

    #[test]
    fn every_bad_value_is_refused_with_what_is_wrong() {
        for (text, says) in [
            ("[egress]\nallow_private = [\"127.0.0.1\"]", "is not IP:PORT"),
            ("[egress]\nallow_private = [\"::1:8080\"]", "is not IP:PORT"),
            ("[egress]\nallow_private = [\"localhost:8080\"]", "is not IP:PORT"),
            ("[egress]\nallow_private = [\"127.0.0.1:0\"]", "port 0"),
            (
                "[egress]\nallow_private = [\"169.254.169.254:80\"]",
                "never reachable (Metadata)",
            ),
            (
                "[egress]\nallow_private = [\"[::ffff:169.254.169.254]:80\"]",
                "never reachable (Metadata)",
            ),
            (
                "[egress]\nallow_private = [\"100.64.0.1:80\"]",
                "never reachable (Cgnat)",
            ),
            (
                "[egress]\nallow_private = [\"[fe80::1]:80\"]",
                "never reachable (LinkLocal)",
            ),
            (
                "[egress]\nallow_private = [\"0.0.0.0:80\"]",
                "never reachable (Unspecified)",
            ),
            ("[egress]\nallow_private = [\"8.8.8.8:53\"]", "a public address"),
            (
                "[egress]\nresolve = { \"*.example.com\" = \"192.0.2.1\" }",
                "invalid label",
            ),
            (
                "[egress]\nresolve = { \"api.example.com\" = \"api2.example.com\" }",
                "is not an IP address",
            ),
            ("[egress]\nresolve = { \"api.example.com\" = [] }", "1 to 16"),
            (
                "[egress]\nresolve = { \"api.example.com\" = [\"192.0.2.1\", \"192.0.2.1\"] }",
                "listed twice",
            ),
            (
                "[egress]\nresolve = { \"API.example.com\" = \"192.0.2.1\", \"api.example.com\" = \"192.0.2.2\" }",
                "pinned twice",
            ),
            ("[egress]\nmax_connections = 0", "not between 1 and 4096"),
            ("[egress]\nmax_connections = 4097", "not between 1 and 4096"),
        ] {
            let message = problem(text);
            assert!(message.contains(says), "{text}: {message}");
            assert!(message.starts_with("/home/op/.mvm/config.toml: [egress] "), "{message}");
        }
        let many: Vec<String> = (1..=17).map(|i| format!("\"192.0.2.{i}\"")).collect();
        let text = format!(
            "[egress]\nresolve = {{ \"a.example.com\" = [{}] }}",
            many.join(",")
        );
        assert!(problem(&text).contains("1 to 16"));
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_the_line() {
        for (text, says) in [
            (
                "[egress]\nallow_privat = []\n",
                "line 2: unknown field `allow_privat`",
            ),
            (
                "[egress]\nmax_header_bytes = 65536\n",
                "line 2: unknown field `max_header_bytes`",
            ),
            ("[egress]\n\nmax_connections = \"64\"\n", "line 3:"),
            ("[egress]\nallow_private = \"127.0.0.1:80\"\n", "line 2:"),
            ("[egress]\nresolve = { \"a.example.com\" = 1 }\n", "line 2:"),
            ("egress = 5\n", "line 1:"),
            ("[egress\n", "line 1:"),
            (
                "[egress]\nmax_connections = 1\nmax_connections = 2\n",
                "line 3:",
            ),
        ] {
            let error = parse(text).unwrap_err();
            assert!(matches!(error, ConfigError::Malformed { .. }), "{text}");
            assert_eq!(error.code(), "RUN054");
            assert!(error.to_string().contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn the_file_is_read_from_the_home_and_its_absence_means_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let home = MvmHome::at(dir.path());
        assert_eq!(EgressConfig::load(&home).unwrap(), EgressConfig::default());
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[egress]\nmax_connections = 3\n").unwrap();
        assert_eq!(EgressConfig::load(&home).unwrap().max_connections, 3);
        std::fs::write(&path, b"[egress]\nmax_connections = 3 # \xff\n").unwrap();
        assert!(EgressConfig::load(&home)
            .unwrap_err()
            .to_string()
            .contains("not UTF-8"));
        std::fs::write(&path, vec![b'#'; 1024 * 1024 + 1]).unwrap();
        let error = EgressConfig::load(&home).unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }), "{error}");
        assert_eq!(error.class(), ErrorClass::Io);
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(matches!(
            EgressConfig::load(&home).unwrap_err(),
            ConfigError::Read { .. }
        ));
    }
}
