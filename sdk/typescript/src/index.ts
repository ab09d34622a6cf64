/**
 * mvm: sandboxes — microVMs with verified roots, no network unless granted, and a signed
 * receipt for every command — driven from Node over mvm's local API.
 */

export { Api } from "./api.js";
export { CommandHandle, Commands, type CommandResult, type ProcessInfo, type RunOptions } from "./commands.js";
export {
  CommandExitError,
  InvalidArgumentError,
  NotFoundError,
  SandboxError,
  TimeoutError,
} from "./errors.js";
export { Files, type EntryInfo, type WriteInfo } from "./files.js";
export { Pty, PtyHandle, type PtyOptions, type PtySize } from "./pty.js";
export { DEFAULT_TIMEOUT_S, Sandbox, type SandboxInfo, type SandboxOptions } from "./sandbox.js";
