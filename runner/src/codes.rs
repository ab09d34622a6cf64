//! Every `RUN…` code, one constant each, with what it means (`docs/errors.md` has the exit
//! status of each, and `tests/error_codes.rs` checks that the two agree). The runner's errors
//! return these ([`mvm_ir::Coded`]); `mvm run` and the VM commands raise a few of them
//! themselves (RUN025, RUN029, RUN031, RUN032, RUN036, RUN038, RUN065). RUN005–RUN009,
//! RUN014–RUN019, RUN024 and RUN028 are not assigned.

/// A file the plan pins is missing or not a regular file.
pub const RUN001: &str = "RUN001";
/// A kernel or initramfs differs from its pinned digest.
pub const RUN002: &str = "RUN002";
/// The root filesystem or verity tree is not the size the plan's verity parameters need.
pub const RUN003: &str = "RUN003";
/// The plan's kernel command line does not carry exactly its verity parameters, or names
/// another `init=`/`rdinit=`.
pub const RUN004: &str = "RUN004";

/// The kvm backend was asked for in a build without mvm's own VMM.
pub const RUN010: &str = "RUN010";
/// No usable `qemu-system-x86_64` (not found, not executable, or no version).
pub const RUN011: &str = "RUN011";
/// `qemu-system-x86_64` is older than 7.2.
pub const RUN012: &str = "RUN012";
/// The kvm backend was asked for on a host without hardware virtualization.
pub const RUN013: &str = "RUN013";

/// Integrity: dm-verity in the guest refused a block of the root.
pub const RUN020: &str = "RUN020";
/// The guest reported a failed boot, or its kernel panicked.
pub const RUN021: &str = "RUN021";
/// The guest did not answer the hello within `--boot-timeout`.
pub const RUN022: &str = "RUN022";
/// The VM process (QEMU or mvm's own VMM) could not be started, or exited unexpectedly.
pub const RUN023: &str = "RUN023";
/// The agent channel broke, timed out, or carried something outside the protocol.
pub const RUN025: &str = "RUN025";
/// The VM's state could not be prepared on the host.
pub const RUN026: &str = "RUN026";
/// An audit entry could not be written, or the state directory or host key is unusable.
pub const RUN027: &str = "RUN027";
/// No command: none after `--`, and the plan has no entrypoint.
pub const RUN029: &str = "RUN029";
/// A secret the launch needs cannot be resolved: not in this host's store, or the store
/// cannot be opened.
pub const RUN030: &str = "RUN030";
/// `mvm run`: `mvm-runner` was not found (raised by the CLI).
pub const RUN031: &str = "RUN031";
/// `mvm run`: building the image into a bundle failed (raised by the CLI).
pub const RUN032: &str = "RUN032";
/// Interrupted: a signal stopped the run, and the VM was torn down.
pub const RUN033: &str = "RUN033";

/// A VM of that name exists already.
pub const RUN034: &str = "RUN034";
/// Not a valid VM name.
pub const RUN035: &str = "RUN035";
/// No VM of that name, it is not running, or it did not stop in time.
pub const RUN036: &str = "RUN036";
/// `mvm rm` of a VM that is still running, without `--force`.
pub const RUN037: &str = "RUN037";
/// `mvm cp` or `mvm fs` was given paths it cannot use.
pub const RUN038: &str = "RUN038";
/// The VM is paused, or pausing or resuming it failed.
pub const RUN039: &str = "RUN039";
/// Saving the VM cold was refused or failed; the VM runs on.
pub const RUN040: &str = "RUN040";
/// A cold VM's saved state does not verify; it stays cold.
pub const RUN041: &str = "RUN041";
/// A cold VM could not be woken; it stays cold.
pub const RUN042: &str = "RUN042";

/// `--jail` without `--backend kvm`.
pub const RUN043: &str = "RUN043";
/// `--jail` by a runner that is not root.
pub const RUN044: &str = "RUN044";
/// `--jail-uid 0` or `--jail-gid 0`: the jailed VMM would stay root.
pub const RUN045: &str = "RUN045";
/// The jailed VMM could not be started or jailed.
pub const RUN046: &str = "RUN046";
/// `--huge-pages` without `--backend kvm`.
pub const RUN047: &str = "RUN047";

/// The agent sent a frame it never sends (a request) on an exchange, which it ended.
pub const RUN048: &str = "RUN048";
/// The agent held an exchange up past its deadline: it gave no room for data, or no answer.
pub const RUN049: &str = "RUN049";
/// Every client slot of the control socket is taken: only stop and kill are served.
pub const RUN050: &str = "RUN050";

/// The runner's own seccomp filter could not be installed once its VM ran: the VM was stopped.
pub const RUN051: &str = "RUN051";
/// An outbound connection the guest asked for was refused: the plan grants no such egress.
pub const RUN052: &str = "RUN052";
/// The agent asked for an outbound connection with an open frame that is not a valid request.
pub const RUN053: &str = "RUN053";

/// The `[egress]` section of `$MVM_HOME/config.toml` could not be read, or has an unknown key
/// or a value out of its bounds.
pub const RUN054: &str = "RUN054";
/// A plan's egress grant is not a name, `*.` suffix or IP literal the runner can judge.
pub const RUN055: &str = "RUN055";
/// A granted connection was refused by its destination (nothing listens there).
pub const RUN056: &str = "RUN056";
/// A granted destination could not be reached: no route, or no answer within 10 s.
pub const RUN057: &str = "RUN057";
/// A forwarded port could not be listened on: the host port is taken, or its address is not
/// loopback and the operator does not list it.
pub const RUN058: &str = "RUN058";
/// The plan is over a ceiling of this host's `[policy]` in `$MVM_HOME/config.toml` (or that
/// section is malformed); the VM does not start.
pub const RUN059: &str = "RUN059";
/// A launch's environment (`--env`, `--allow-env`) is refused: the plan's profile or the
/// host's policy lets no client set it, or a variable is on the denylist.
pub const RUN060: &str = "RUN060";
/// An unbound secret (its value would enter the guest) under a profile that does not grant
/// `unbound_secrets`, or a value that cannot be a variable's.
pub const RUN061: &str = "RUN061";
/// A launch's disk (`--disk`) cannot be attached: the file cannot be opened, is not a regular
/// file, or another VM's runner holds it.
pub const RUN062: &str = "RUN062";
/// A boot snapshot could not be made (saving the booted guest failed); the launch fails, and
/// no snapshot is left.
pub const RUN063: &str = "RUN063";
/// A boot snapshot is refused: its signature, schema, shape or memory does not match what
/// this host made for this launch. It is never used; it is removed and made anew.
pub const RUN064: &str = "RUN064";
/// The plan's services are not ready: one failed, the probe says unhealthy, or the wait for
/// them ran out (`mvm up`, `mvm wait --healthy`); the VM runs on.
pub const RUN065: &str = "RUN065";
/// The `[boot_snapshots]` section of `$MVM_HOME/config.toml` is malformed: an unknown key, or
/// a `max_disk_mib` out of its bounds. A launch that would make a boot snapshot does not start.
pub const RUN066: &str = "RUN066";
