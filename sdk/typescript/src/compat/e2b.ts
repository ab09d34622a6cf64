/**
 * E2B's names and defaults over mvm: code written for the `e2b` package runs on mvm after its
 * import changes to `mvm-sdk/compat/e2b`. What differs, because mvm's security model does not
 * widen: a template name is mapped by the host to a digest-pinned image (`[e2b.templates]` in
 * `$MVM_HOME/config.toml`; `base` when none); a sandbox has no network unless granted, so
 * `allowInternetAccess: true` is refused (grant hosts with `allowHosts`); `apiKey` and
 * `domain` are accepted and unused. String commands run through `/bin/bash -l -c` where the
 * image has bash, else `sh -c`. Where the image gives the workload user E2B's home
 * (`/home/user`), commands start there with `HOME` set to it and relative file paths are
 * resolved in it, as in E2B; elsewhere files stay under `/tmp`. Commands run as the workload
 * user (never root: `user: "root"` is refused). Durations are in milliseconds, as in E2B.
 */

import type { Api } from "../api.js";
import { Commands as MvmCommands, type CommandHandle, type CommandResult, type RunOptions } from "../commands.js";
import { InvalidArgumentError, SandboxError } from "../errors.js";
import { Files as MvmFiles } from "../files.js";
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
/** The home of E2B's user. */
export const E2B_HOME = "/home/user";
/** The agent's code for a path outside the roots it serves. */
const PATH_REFUSED = "AGENT107";

/** What E2B code takes for granted in a sandbox, looked up once: bash, and E2B's home when
 * the image gives it to the workload user (the agent serves files there only then). */
class Workspace {
  private found: Promise<{ bash: boolean; home?: string }> | undefined;

  constructor(
    private readonly commands: MvmCommands,
    private readonly files: MvmFiles,
  ) {}

  get(): Promise<{ bash: boolean; home?: string }> {
    this.found ??= Promise.all([
      this.commands
        .run(["sh", "-c", "command -v bash >/dev/null 2>&1 && echo yes || true"])
        .then((probe) => probe.stdout.trim() === "yes"),
      this.files.getInfo(E2B_HOME).then(
        (info) => (info.type === "directory" ? E2B_HOME : undefined),
        (e) => {
          if (e instanceof SandboxError && e.code === PATH_REFUSED) return undefined;
          throw e;
        },
      ),
    ]).then(([bash, home]) => ({ bash, home }));
    return this.found;
  }
}

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

/** `sandbox.commands` with E2B's shell, home and milliseconds. */
export class Commands extends MvmCommands {
  constructor(
    api: Api,
    sandboxId: string,
    private readonly workspace: Workspace,
  ) {
    super(api, sandboxId);
  }

  protected override async shellFor(): Promise<string[]> {
    return (await this.workspace.get()).bash ? ["/bin/bash", "-l", "-c"] : ["sh", "-c"];
  }

  override run(cmd: string, opts: CommandOpts & { background: true }): Promise<CommandHandle>;
  override run(cmd: string, opts?: CommandOpts & { background?: false }): Promise<CommandResult>;
  override async run(cmd: string, opts: CommandOpts = {}): Promise<CommandResult | CommandHandle> {
    const { timeoutMs, ...rest } = opts;
    const options: RunOptions = { ...rest, timeoutS: timeoutMs === undefined ? 60 : Math.ceil(timeoutMs / 1000) };
    const { home } = await this.workspace.get();
    if (home !== undefined) {
      options.cwd ??= home;
      options.envs = { HOME: home, ...options.envs };
    }
    return super.run(cmd, options as RunOptions & { background?: false });
  }
}

/** `sandbox.files` with relative paths in E2B's home, as E2B resolves them. */
export class Files extends MvmFiles {
  constructor(
    api: Api,
    sandboxId: string,
    private readonly workspace: Workspace,
  ) {
    super(api, sandboxId);
  }

  protected override async where(path: string): Promise<string> {
    if (path.startsWith("/")) return path;
    const { home } = await this.workspace.get();
    if (home === undefined) {
      throw new InvalidArgumentError(
        `${path}: a relative path needs E2B's home (${E2B_HOME}), which this image does not give ` +
          "the workload user; use a path under /tmp",
        "API001",
      );
    }
    return `${home}/${path}`;
  }
}

/** E2B's `Sandbox` on mvm. */
export class Sandbox extends MvmSandbox {
  protected override makeParts(): { commands: Commands; files: Files } {
    const workspace = new Workspace(new MvmCommands(this.api, this.sandboxId), new MvmFiles(this.api, this.sandboxId));
    return {
      commands: new Commands(this.api, this.sandboxId, workspace),
      files: new Files(this.api, this.sandboxId, workspace),
    };
  }

  declare readonly commands: Commands;
  declare readonly files: Files;

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
