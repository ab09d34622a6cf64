/**
 * E2B's names and defaults over mvm: code written for the `e2b` package runs on mvm after its
 * import changes to `mvm-sdk/compat/e2b`. What differs, because mvm's security model does not
 * widen: a template name is mapped by the host to a digest-pinned image (`[e2b.templates]` in
 * `$MVM_HOME/config.toml`; `base` when none); a sandbox has no network unless granted, so
 * `allowInternetAccess: true` is refused (grant hosts with `allowHosts`); `apiKey` and
 * `domain` are accepted and unused. String commands run through `/bin/bash -l -c` where the
 * image has bash, else `sh -c`. Durations are in milliseconds, as in E2B.
 */

import type { Api } from "../api.js";
import { Commands as MvmCommands, type CommandHandle, type CommandResult, type RunOptions } from "../commands.js";
import { InvalidArgumentError } from "../errors.js";
import { Sandbox as MvmSandbox } from "../sandbox.js";

export {
  CommandExitError,
  InvalidArgumentError,
  NotFoundError,
  SandboxError,
  TimeoutError,
} from "../errors.js";
export type { CommandHandle, CommandResult, ProcessInfo } from "../commands.js";
export type { EntryInfo, WriteInfo } from "../files.js";
export type { SandboxInfo } from "../sandbox.js";

/** The template E2B's `Sandbox.create()` uses without one. */
export const DEFAULT_TEMPLATE = "base";

/** E2B's options of `Sandbox.create`. */
export interface SandboxOpts {
  timeoutMs?: number;
  metadata?: Record<string, string>;
  envs?: Record<string, string>;
  allowInternetAccess?: boolean;
  /** mvm's own: egress grants, `HOST[:PORT]`. */
  allowHosts?: string[];
  apiKey?: string;
  domain?: string;
}

/** E2B's options of `commands.run`: `timeoutMs` rather than seconds. */
export type CommandOpts = Omit<RunOptions, "timeoutS"> & { timeoutMs?: number };

/** `sandbox.commands` with E2B's shell and milliseconds. */
export class Commands extends MvmCommands {
  private bash: Promise<boolean> | undefined;

  protected override async shellFor(): Promise<string[]> {
    this.bash ??= super
      .run(["sh", "-c", "command -v bash >/dev/null 2>&1 && echo yes || true"])
      .then((probe) => probe.stdout.trim() === "yes");
    return (await this.bash) ? ["/bin/bash", "-l", "-c"] : ["sh", "-c"];
  }

  override run(cmd: string, opts: CommandOpts & { background: true }): Promise<CommandHandle>;
  override run(cmd: string, opts?: CommandOpts & { background?: false }): Promise<CommandResult>;
  override run(cmd: string, opts: CommandOpts = {}): Promise<CommandResult | CommandHandle> {
    const { timeoutMs, ...rest } = opts;
    const options: RunOptions = { ...rest, timeoutS: timeoutMs === undefined ? 60 : Math.ceil(timeoutMs / 1000) };
    return super.run(cmd, options as RunOptions & { background?: false });
  }
}

/** E2B's `Sandbox` on mvm. */
export class Sandbox extends MvmSandbox {
  protected override makeCommands(): Commands {
    return new Commands(this.api, this.sandboxId);
  }

  declare readonly commands: Commands;

  /** A ready sandbox of `template` (`base` when none). */
  static override async create<T extends MvmSandbox>(
    this: new (id: string, api: Api) => T,
    templateOrOpts?: string | SandboxOpts,
    maybeOpts: SandboxOpts = {},
  ): Promise<T> {
    const template = typeof templateOrOpts === "string" ? templateOrOpts : DEFAULT_TEMPLATE;
    const opts = typeof templateOrOpts === "object" ? templateOrOpts : maybeOpts;
    if (opts.allowInternetAccess) {
      throw new InvalidArgumentError(
        "mvm sandboxes reach no network unless granted: open internet access is not given; " +
          "grant what the code needs with allowHosts: ['api.example.com', …]",
        "API001",
      );
    }
    return MvmSandbox.create.call(this, {
      template,
      timeoutS: opts.timeoutMs === undefined ? 300 : Math.ceil(opts.timeoutMs / 1000),
      metadata: opts.metadata,
      envs: opts.envs,
      allowHosts: opts.allowHosts,
    }) as Promise<T>;
  }

  /** It is removed `timeoutMs` milliseconds from now. */
  override async setTimeout(timeoutMs: number): Promise<void> {
    await super.setTimeout(Math.ceil(timeoutMs / 1000));
  }
}
