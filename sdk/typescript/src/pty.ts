/**
 * Terminals in a sandbox (`sandbox.pty`): a command on a pseudo-terminal in the guest — a
 * shell by default — whose output comes as raw bytes, whose input is keys, and whose size
 * can change while it runs. Only where the sandbox's plan grants a terminal (the `dev`
 * profile, or `terminal` in the IR); elsewhere the handle's `wait()` rejects with `AGENT120`.
 */

import type { Api } from "./api.js";
import { CommandHandle, argvOf, follow, type CommandResult } from "./commands.js";

/** A terminal's size: 1-4096 columns and rows. */
export interface PtySize {
  cols: number;
  rows: number;
}

/** What `pty.create` takes. */
export interface PtyOptions extends Partial<PtySize> {
  /** What the terminal printed, as raw bytes (a UTF-8 character may be split across calls);
   * given here, the output is followed from the start. */
  onData?: (data: Uint8Array) => void;
  /** What to run: a login shell when absent; a string through `sh -c`, or an argv. */
  cmd?: string | string[];
  envs?: Record<string, string>;
  cwd?: string;
  user?: string;
  /** Seconds before it is killed (default 0: the longest the agent allows). */
  timeoutS?: number;
}

/** The best shell the image has, as a login shell (as `mvm shell` runs it). */
export const SHELL = ["/bin/sh", "-c", "command -v bash >/dev/null 2>&1 && exec bash -l; exec sh -l"];

/** A command running on a terminal: `sendStdin` types, `resize` resizes, `wait` follows its
 * output to its end. */
export class PtyHandle extends CommandHandle {
  private following?: Promise<CommandResult>;

  constructor(api: Api, sandboxId: string, pid: number, onData?: (data: Uint8Array) => void) {
    super(api, sandboxId, pid);
    if (onData) {
      this.following = follow(this.api.lines("GET", this.path("/events")), { onData });
      // Its rejection is the caller's, through `wait()`; not an unhandled one meanwhile.
      this.following.catch(() => undefined);
    }
  }

  /** Waits for its end: its result, `CommandExitError` on a non-zero exit, the refusal (its
   * code) when it could not start. Output goes to the `onData` given to `create`, or to
   * this `onData` (from its start). */
  override wait(callbacks: { onData?: (data: Uint8Array) => void } = {}): Promise<CommandResult> {
    this.following ??= follow(this.api.lines("GET", this.path("/events")), callbacks);
    return this.following;
  }

  /** Resizes its terminal (the command gets `SIGWINCH`). */
  async resize(size: PtySize): Promise<void> {
    await this.api.json("POST", this.path("/resize"), { json: { cols: size.cols, rows: size.rows } });
  }
}

/** `sandbox.pty`. */
export class Pty {
  constructor(
    private readonly api: Api,
    private readonly sandboxId: string,
  ) {}

  /** Starts a command (a login shell by default) on a terminal of `cols` x `rows` (80 x 24 by
   * default), `TERM=xterm-256color` unless `envs` sets it, and returns its handle at once. */
  async create(options: PtyOptions = {}): Promise<PtyHandle> {
    const { cmd } = options;
    const argv = cmd === undefined ? SHELL : typeof cmd === "string" ? ["sh", "-c", cmd] : argvOf(cmd);
    const spec: Record<string, unknown> = {
      argv,
      background: true,
      pty: { cols: options.cols ?? 80, rows: options.rows ?? 24 },
      timeout_s: options.timeoutS ?? 0,
    };
    if (options.envs) spec.envs = options.envs;
    if (options.cwd !== undefined) spec.cwd = options.cwd;
    if (options.user !== undefined) spec.user = options.user;
    const path = `/v1/sandboxes/${this.sandboxId}/commands`;
    const started = await this.api.json<{ id: number }>("POST", path, { json: spec });
    return new PtyHandle(this.api, this.sandboxId, started.id, options.onData);
  }

  /** A handle on the terminal command `pid`. */
  connect(pid: number): PtyHandle {
    return new PtyHandle(this.api, this.sandboxId, pid);
  }

  /** Types `data` on the terminal of `pid`. */
  sendInput(pid: number, data: string | Uint8Array): Promise<void> {
    return this.connect(pid).sendStdin(data);
  }

  /** Resizes the terminal of `pid`. */
  resize(pid: number, size: PtySize): Promise<void> {
    return this.connect(pid).resize(size);
  }

  /** Kills `pid`; false if it had ended. */
  kill(pid: number): Promise<boolean> {
    return this.connect(pid).kill();
  }
}
