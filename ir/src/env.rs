//! Environment hygiene: one denylist for the guest and the host. A variable that changes how
//! the loader, a shell or an interpreter behaves — or that opens a password manager's or a
//! key agent's session — is never accepted for a guest command (the IR, the plan and the
//! runner refuse it), and never inherited by a process the host side starts (QEMU, Nix, the
//! build worker, the runner, `dpkg-deb`…): each is made by [`command`], which leaves such
//! variables out of what it inherits. `tests/env_hygiene.rs` walks every place the code starts
//! a process.

use std::ffi::OsStr;
use std::process::Command;

/// Denied by exact name.
const DENIED: &[&str] = &[
    // The C library's resolver and character sets.
    "GCONV_PATH",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "RES_OPTIONS",
    // Shells.
    "BASH_ENV",
    "ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "PROMPT_COMMAND",
    "IFS",
    // Interpreters: code or module paths loaded before the program's own.
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONINSPECT",
    "PYTHONHOME",
    "PYTHONBREAKPOINT",
    "PERL5OPT",
    "PERL5LIB",
    "PERLLIB",
    "PERL5DB",
    "RUBYOPT",
    "RUBYLIB",
    "NODE_OPTIONS",
    "NODE_PATH",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    // Password managers' and key agents' sessions.
    "BW_SESSION",
    "SSH_AUTH_SOCK",
    "GPG_AGENT_INFO",
    "GNOME_KEYRING_CONTROL",
];

/// Denied by prefix: the loader's family (`LD_PRELOAD`, `LD_LIBRARY_PATH`, `LD_AUDIT`…),
/// bash's exported functions, password managers' sessions (1Password, pass).
const DENIED_PREFIXES: &[&str] = &["LD_", "BASH_FUNC_", "OP_SESSION_", "PASSWORD_STORE_"];

/// Whether `name` is on the denylist.
pub fn is_denied(name: &str) -> bool {
    DENIED.contains(&name)
        || DENIED_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

/// A command for `program` that inherits this process's environment without the denied
/// variables (a name that is not UTF-8 is left out too). Every process the host side starts
/// is made here.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_none_or(is_denied) {
            command.env_remove(name);
        }
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_denylist_holds_names_and_families() {
        for denied in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "LD_AUDIT",
            "BASH_FUNC_ls%%",
            "BASH_ENV",
            "IFS",
            "PYTHONPATH",
            "NODE_OPTIONS",
            "JAVA_TOOL_OPTIONS",
            "OP_SESSION_my",
            "BW_SESSION",
            "SSH_AUTH_SOCK",
        ] {
            assert!(is_denied(denied), "{denied}");
        }
        for allowed in [
            "PATH",
            "HOME",
            "LANG",
            "TERM",
            "OLD_PWD",
            "MY_LD_FLAG",
            "PYTHON",
        ] {
            assert!(!is_denied(allowed), "{allowed}");
        }
    }

    #[test]
    fn a_host_command_inherits_nothing_denied() {
        // Set on this test process: names no other test's child would notice (not the loader's).
        std::env::set_var("OP_SESSION_mvmtest", "session-token");
        std::env::set_var("BASH_FUNC_mvmtest%%", "() { :; }");
        std::env::set_var("MVM_ENV_TEST_KEPT", "kept");
        let out = command("/usr/bin/env").output().unwrap();
        let seen = String::from_utf8(out.stdout).unwrap();
        assert!(!seen.contains("OP_SESSION_mvmtest"), "{seen}");
        assert!(!seen.contains("BASH_FUNC_mvmtest"), "{seen}");
        assert!(seen.contains("MVM_ENV_TEST_KEPT=kept"), "{seen}");
        // What the caller sets explicitly still goes through.
        let out = command("/usr/bin/env").env("EXTRA", "1").output().unwrap();
        assert!(String::from_utf8(out.stdout).unwrap().contains("EXTRA=1"));
    }
}
