/** Commands in a sandbox: run to completion, or in the background with a handle. */

import { StringDecoder } from "node:string_decoder";

import type { Api } from "./api.js";
import { CommandExitError, SandboxError, TimeoutError, errorFor } from "./errors.js";

/** How a command ended and what it wrote. */
export interface CommandResult {
  stdout: string;
  stderr: string;
  exitCode: number;
  error?: string;
  /** Milliseconds from its start to its end. */
  durationMs: number;
  /** The id of its signed run receipt (`sandbox.receipt(id)`). */
  receipt: string;
  /** The signal that ended it, if one did. */
  signal?: number;
  timedOut: boolean;
}

/** A command the API started. */
export interface ProcessInfo {
  pid: number;
  cmd: string[];
  running: boolean;
  exitCode?: number;
}

/** What `commands.run` takes besides the command. */
export interface RunOptions {
  background?: boolean;
  envs?: Record<string, string>;
  cwd?: string;
  user?: string;
  /** Seconds before it is killed (default 60; 0: the longest the agent allows). */
  timeoutS?: number;
  onStdout?: (text: string) => void;
  onStderr?: (text: string) => void;
  /** Keep its input open for `sendStdin`. */
  stdin?: boolean;
}

type Callbacks = Pick<RunOptions, "onStdout" | "onStderr"> & {
  /** A terminal's output as the bytes it is (`stdout` events), before it is decoded. */
  onData?: (data: Uint8Array) => void;
};

/** Reads a command's events to the end: its result, or the error for how it ended. */
export async function follow(events: AsyncIterable<any>, callbacks: Callbacks): Promise<CommandResult> {
  const decoders = { stdout: new StringDecoder("utf8"), stderr: new StringDecoder("utf8") };
  const text = { stdout: [] as string[], stderr: [] as string[] };
  const add = (kind: "stdout" | "stderr", piece: string) => {
    if (!piece) return;
    text[kind].push(piece);
    (kind === "stdout" ? callbacks.onStdout : callbacks.onStderr)?.(piece);
  };
  for await (const event of events) {
    if (event.type === "stdout" || event.type === "stderr") {
      const kind = event.type as "stdout" | "stderr";
      const bytes = Buffer.from(event.data, "base64");
      if (kind === "stdout") callbacks.onData?.(new Uint8Array(bytes));
      add(kind, decoders[kind].write(bytes));
    } else if (event.type === "ended") {
      add("stdout", decoders.stdout.end());
      add("stderr", decoders.stderr.end());
      const result: CommandResult = {
        stdout: text.stdout.join(""),
        stderr: text.stderr.join(""),
        exitCode: event.exit_code,
        error: event.timed_out ? "timed out" : undefined,
        durationMs: event.duration_ms ?? 0,
        receipt: event.receipt ?? "",
        signal: event.signal ?? undefined,
        timedOut: Boolean(event.timed_out),
      };
      if (result.timedOut) {
        throw new TimeoutError("the command ran past its timeout and was killed", "TIMEOUT");
      }
      if (result.exitCode !== 0) throw new CommandExitError(result);
      return result;
    } else if (event.type === "error") {
      throw errorFor(event.code ?? "API006", event.message ?? "");
    }
  }
  throw new SandboxError("the command's event stream ended before the command");
}

/** A command given as an argv, checked. */
export function argvOf(cmd: string[]): string[] {
  if (cmd.length === 0) throw new TypeError("cmd is a string or a non-empty array of strings");
  return [...cmd];
}

/** A command running in the background. */
export class CommandHandle {
  constructor(
    protected readonly api: Api,
    protected readonly sandboxId: string,
    readonly pid: number,
  ) {}

  protected path(tail = ""): string {
    return `/v1/sandboxes/${this.sandboxId}/commands/${this.pid}${tail}`;
  }

  /** Waits for its end (its output so far first); throws `CommandExitError` on a non-zero
   * exit. */
  wait(callbacks: Callbacks = {}): Promise<CommandResult> {
    return follow(this.api.lines("GET", this.path("/events")), callbacks);
  }

  /** Kills it (SIGKILL); false if it had ended already. */
  kill(): Promise<boolean> {
    return this.sendSignal(9);
  }

  /** Sends `signal`; false if it had ended already. */
  async sendSignal(signal: number): Promise<boolean> {
    try {
      await this.api.json("POST", this.path("/signal"), { json: { signal } });
      return true;
    } catch (e) {
      if (e instanceof SandboxError && e.status === 404) return false;
      throw e;
    }
  }

  /** Writes to its standard input (started with `stdin: true`). */
  async sendStdin(data: string | Uint8Array): Promise<void> {
    const bytes = typeof data === "string" ? Buffer.from(data) : data;
    await this.api.json("POST", this.path("/stdin"), { bytes });
  }

  /** Closes its standard input: it reads end of file. */
  async closeStdin(): Promise<void> {
    await this.api.json("DELETE", this.path("/stdin"));
  }
}

/** `sandbox.commands`. */
export class Commands {
  /** How a string command is run. */
  protected shell = ["sh", "-c"];

  constructor(
    protected readonly api: Api,
    protected readonly sandboxId: string,
  ) {}

  /** Runs `cmd` (a string through `sh -c`, or an argv). In the foreground: its result, output
   * passed to the callbacks as it comes; `CommandExitError` on a non-zero exit,
   * `TimeoutError` past its timeout. In the background: a `CommandHandle` at once. */
  run(cmd: string | string[], options: RunOptions & { background: true }): Promise<CommandHandle>;
  run(cmd: string | string[], options?: RunOptions & { background?: false }): Promise<CommandResult>;
  async run(cmd: string | string[], options: RunOptions = {}): Promise<CommandResult | CommandHandle> {
    const spec: Record<string, unknown> = {
      // Only a string is run through the shell (and only then is it looked up).
      argv: typeof cmd === "string" ? [...(await this.shellFor()), cmd] : argvOf(cmd),
      background: Boolean(options.background),
      stdin: Boolean(options.stdin),
      timeout_s: options.timeoutS ?? 60,
    };
    if (options.envs) spec.envs = options.envs;
    if (options.cwd !== undefined) spec.cwd = options.cwd;
    if (options.user !== undefined) spec.user = options.user;
    const path = `/v1/sandboxes/${this.sandboxId}/commands`;
    if (options.background) {
      const started = await this.api.json<{ id: number }>("POST", path, { json: spec });
      return new CommandHandle(this.api, this.sandboxId, started.id);
    }
    return follow(this.api.lines("POST", path, { json: spec }), options);
  }

  /** The shell a string command runs through. */
  protected async shellFor(): Promise<string[]> {
    return this.shell;
  }

  /** The commands started through the API, running and recently ended. */
  async list(): Promise<ProcessInfo[]> {
    const listed = await this.api.json<{ commands: any[] }>("GET", `/v1/sandboxes/${this.sandboxId}/commands`);
    return listed.commands.map((c) => ({
      pid: c.id,
      cmd: c.argv,
      running: c.running,
      exitCode: c.end?.exit_code,
    }));
  }

  /** A handle on the command `pid`. */
  connect(pid: number): CommandHandle {
    return new CommandHandle(this.api, this.sandboxId, pid);
  }

  /** Kills the command `pid`; false if it had ended. */
  kill(pid: number): Promise<boolean> {
    return this.connect(pid).kill();
  }

  /** Writes to the standard input of the command `pid`. */
  sendStdin(pid: number, data: string | Uint8Array): Promise<void> {
    return this.connect(pid).sendStdin(data);
  }
}
