/** Sandboxes: mvm microVMs made and driven from TypeScript. */

import { resolve } from "node:path";

import { sharedApi, type Api } from "./api.js";
import { Commands } from "./commands.js";
import { NotFoundError } from "./errors.js";
import { Files } from "./files.js";
import { Pty } from "./pty.js";

/** How long a sandbox lives unless told otherwise, in seconds. */
export const DEFAULT_TIMEOUT_S = 300;

/** A sandbox as the server describes it. */
export interface SandboxInfo {
  sandboxId: string;
  state: string;
  vm: string;
  planDigest: string;
  startedAt: string;
  metadata: Record<string, string>;
  expiresAt?: string;
  reason?: string;
  /** The boot snapshot its guest was restored from; absent when it booted. */
  bootSnapshot?: string;
}

/** What `Sandbox.create` takes. */
export interface SandboxOptions {
  /** `REFERENCE@sha256:…`, built into a signed bundle on first use. */
  image?: string;
  /** A signed plan file, instead of an image. */
  plan?: string;
  /** A template the host maps to a pinned image (`[e2b.templates]`), instead of an image. */
  template?: string;
  /** Seconds it lives while running (default 300; 0: no limit). */
  timeoutS?: number;
  envs?: Record<string, string>;
  metadata?: Record<string, string>;
  cpus?: number;
  memoryMb?: number;
  /** Egress grants, `HOST[:PORT]`; none by default. */
  allowHosts?: string[];
  /** Secrets of the host's store, `NAME[:ENV]` (as `mvm up --secret`): a bound one is a
   * placeholder in the sandbox, an unbound one its value, scrubbed from output. */
  secrets?: string[];
  /** The image's policy profile: `restrictive`, `standard` (the default) or `dev`. */
  profile?: string;
  /** Boot its kernel instead of restoring its plan's boot snapshot (made by the plan's first
   * launch on this host), and make none. */
  coldBoot?: boolean;
  /** Encrypted volumes of the host's store to attach, `NAME:/PATH[:ro]` (as `mvm up
   * --volume`): one sandbox at a time; a sandbox with volumes boots its kernel. */
  volumes?: string[];
  sandboxId?: string;
  api?: Api;
}

function info(raw: any): SandboxInfo {
  return {
    sandboxId: raw.id,
    state: raw.state,
    vm: raw.vm,
    planDigest: raw.plan_digest,
    startedAt: raw.started_at,
    metadata: raw.metadata ?? {},
    expiresAt: raw.expires_at ?? undefined,
    reason: raw.reason ?? undefined,
    bootSnapshot: raw.boot_snapshot ?? undefined,
  };
}

/** A sandbox: a named mvm microVM with a verified root, no network unless granted, and a
 * signed receipt for every command. */
export class Sandbox {
  readonly commands: Commands;
  readonly files: Files;
  /** Terminals: commands on a pseudo-terminal (where the plan grants one). */
  readonly pty: Pty;

  protected constructor(
    readonly sandboxId: string,
    protected readonly api: Api,
  ) {
    ({ commands: this.commands, files: this.files } = this.makeParts());
    this.pty = new Pty(this.api, this.sandboxId);
  }

  /** Its `commands` and `files` (the E2B layer's run strings through bash and resolve paths
   * in the user's home). */
  protected makeParts(): { commands: Commands; files: Files } {
    return { commands: new Commands(this.api, this.sandboxId), files: new Files(this.api, this.sandboxId) };
  }

  /** Creates a sandbox from an image or a signed plan, and resolves once it is ready. */
  static async create<T extends Sandbox>(
    this: new (id: string, api: Api) => T,
    options: SandboxOptions = {},
  ): Promise<T> {
    const api = options.api ?? sharedApi();
    const spec: Record<string, unknown> = { timeout_s: options.timeoutS ?? DEFAULT_TIMEOUT_S };
    if (options.image !== undefined) spec.image = options.image;
    if (options.plan !== undefined) spec.plan = resolve(options.plan);
    if (options.template !== undefined) spec.template = options.template;
    if (options.envs) spec.envs = options.envs;
    if (options.metadata) spec.metadata = options.metadata;
    if (options.cpus) spec.cpus = options.cpus;
    if (options.memoryMb) spec.memory_mib = options.memoryMb;
    if (options.allowHosts?.length) spec.allow_hosts = options.allowHosts;
    if (options.sandboxId) spec.id = options.sandboxId;
    if (options.secrets?.length) spec.secrets = options.secrets;
    if (options.profile) spec.profile = options.profile;
    if (options.coldBoot) spec.cold_boot = true;
    if (options.volumes?.length) spec.volumes = options.volumes;
    const created = await api.json<{ id: string }>("POST", "/v1/sandboxes", { json: spec });
    return new this(created.id, api);
  }

  /** The sandbox `sandboxId`; a paused or cold one is resumed. */
  static async connect<T extends Sandbox>(
    this: new (id: string, api: Api) => T,
    sandboxId: string,
    options: { api?: Api } = {},
  ): Promise<T> {
    const api = options.api ?? sharedApi();
    const found = info(await api.json("GET", `/v1/sandboxes/${sandboxId}`));
    if (found.state === "paused" || found.state === "cold") {
      await api.json("POST", `/v1/sandboxes/${sandboxId}/resume`);
    }
    return new this(sandboxId, api);
  }

  /** Sandboxes (every named VM), with all of `metadata`'s labels and in `state` when given. */
  static async list(
    options: { metadata?: Record<string, string>; state?: string; api?: Api } = {},
  ): Promise<SandboxInfo[]> {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(options.metadata ?? {})) params.append("label", `${key}=${value}`);
    if (options.state) params.append("state", options.state);
    const listed = await (options.api ?? sharedApi()).json<{ sandboxes: any[] }>(
      "GET",
      `/v1/sandboxes?${params}`,
    );
    return listed.sandboxes.map(info);
  }

  /** What the server knows of it now. */
  async getInfo(): Promise<SandboxInfo> {
    return info(await this.api.json("GET", `/v1/sandboxes/${this.sandboxId}`));
  }

  /** Whether it runs (not paused, cold or ended). */
  async isRunning(): Promise<boolean> {
    try {
      return (await this.getInfo()).state === "running";
    } catch (e) {
      if (e instanceof NotFoundError) return false;
      throw e;
    }
  }

  /** Stops and removes it; false if it was gone already. */
  async kill(): Promise<boolean> {
    try {
      await this.api.json("DELETE", `/v1/sandboxes/${this.sandboxId}`);
      return true;
    } catch (e) {
      if (e instanceof NotFoundError) return false;
      throw e;
    }
  }

  /** Pauses it (`cold`: saved to disk, holding no memory, its clock stopped). */
  async pause(options: { cold?: boolean } = {}): Promise<string> {
    await this.api.json("POST", `/v1/sandboxes/${this.sandboxId}/pause`, {
      json: { cold: Boolean(options.cold) },
    });
    return this.sandboxId;
  }

  /** Lets it run again (from paused or cold). */
  async resume(): Promise<void> {
    await this.api.json("POST", `/v1/sandboxes/${this.sandboxId}/resume`);
  }

  /** It is removed `timeoutS` seconds from now (0: never). */
  async setTimeout(timeoutS: number): Promise<void> {
    await this.api.json("POST", `/v1/sandboxes/${this.sandboxId}/timeout`, {
      json: { timeout_s: Math.floor(timeoutS) },
    });
  }

  /** A command's signed run receipt (a DSSE envelope). */
  receipt(receiptId: string): Promise<any> {
    return this.api.json("GET", `/v1/receipts/${receiptId}`);
  }
}
