/**
 * Files in a sandbox, with the agent's rules: the workload user's rights, under /tmp or the
 * user's home (when the image gives it one), symlinks never followed, bytes checked by
 * SHA-256 end to end.
 */

import { createHash } from "node:crypto";

import { check, readAll, type Api } from "./api.js";
import { NotFoundError, SandboxError } from "./errors.js";

/** A path in the sandbox. */
export interface EntryInfo {
  name: string;
  path: string;
  /** `file`, `directory`, `symlink` or `other`. */
  type: string;
  size: number;
  mode: number;
  uid: number;
  /** RFC 3339. */
  modifiedTime: string;
}

/** A file written. */
export interface WriteInfo {
  name: string;
  path: string;
  size: number;
  sha256: string;
}

/** What can be written: text, bytes, or chunks as they come. */
export type Data = string | Uint8Array | AsyncIterable<Uint8Array>;

function entry(e: any): EntryInfo {
  return {
    name: e.name,
    path: e.path,
    type: e.kind,
    size: e.size,
    mode: e.mode,
    uid: e.uid,
    modifiedTime: e.modified,
  };
}

function query(params: Record<string, string | number | boolean>): string {
  return new URLSearchParams(Object.entries(params).map(([k, v]) => [k, String(v)])).toString();
}

/** `sandbox.files`. */
export class Files {
  private readonly base: string;

  constructor(
    protected readonly api: Api,
    protected readonly sandboxId: string,
  ) {
    this.base = `/v1/sandboxes/${sandboxId}/files`;
  }

  /** The path the server is asked for (the E2B layer resolves relative ones in the home). */
  protected async where(path: string): Promise<string> {
    return path;
  }

  /** A file's contents: text (UTF-8), bytes, or a stream of chunks. */
  read(path: string, options?: { format?: "text" }): Promise<string>;
  read(path: string, options: { format: "bytes" }): Promise<Uint8Array>;
  read(path: string, options: { format: "stream" }): Promise<AsyncIterable<Uint8Array>>;
  async read(
    path: string,
    options: { format?: "text" | "bytes" | "stream" } = {},
  ): Promise<string | Uint8Array | AsyncIterable<Uint8Array>> {
    const answer = await this.api.send("GET", `${this.base}?${query({ path: await this.where(path) })}`);
    if (answer.status >= 400) check(answer.status, await readAll(answer.body));
    if (options.format === "stream") return answer.body;
    const bytes = await readAll(answer.body);
    return options.format === "bytes" ? new Uint8Array(bytes) : bytes.toString("utf8");
  }

  /** Writes `data` to `path`, replacing it whole; or each of a list of `{path, data}`. */
  write(path: string, data: Data, options?: { mode?: number }): Promise<WriteInfo>;
  write(files: { path: string; data: Data }[]): Promise<WriteInfo[]>;
  async write(
    target: string | { path: string; data: Data }[],
    data?: Data,
    options: { mode?: number } = {},
  ): Promise<WriteInfo | WriteInfo[]> {
    if (Array.isArray(target)) {
      const written: WriteInfo[] = [];
      for (const file of target) written.push(await this.write(file.path, file.data));
      return written;
    }
    if (data === undefined) throw new TypeError("write(path, data) needs data");
    const params: Record<string, string> = {
      path: await this.where(target),
      mode: (options.mode ?? 0o644).toString(8),
    };
    let body;
    if (typeof data === "string" || data instanceof Uint8Array) {
      const bytes = typeof data === "string" ? Buffer.from(data) : data;
      params.sha256 = "sha256:" + createHash("sha256").update(bytes).digest("hex");
      body = { bytes };
    } else {
      body = { stream: data };
    }
    const written = await this.api.json<any>("PUT", `${this.base}?${query(params)}`, body);
    return {
      name: target.replace(/\/+$/, "").split("/").pop() ?? target,
      path: written.path,
      size: written.size,
      sha256: written.sha256,
    };
  }

  /** A directory's entries, to `depth` levels. */
  async list(path: string, options: { depth?: number } = {}): Promise<EntryInfo[]> {
    const listed = await this.api.json<{ entries: any[] }>(
      "GET",
      `${this.base}/list?${query({ path: await this.where(path), depth: options.depth ?? 1 })}`,
    );
    return listed.entries.map(entry);
  }

  /** One path (a symlink itself). */
  async getInfo(path: string): Promise<EntryInfo> {
    return entry(await this.api.json("GET", `${this.base}/stat?${query({ path: await this.where(path) })}`));
  }

  /** Whether `path` exists (a dangling symlink does). */
  async exists(path: string): Promise<boolean> {
    try {
      await this.getInfo(path);
      return true;
    } catch (e) {
      if (e instanceof NotFoundError || (e instanceof SandboxError && e.code === "AGENT112")) return false;
      throw e;
    }
  }

  /** Removes a file, a symlink or an empty directory (`recursive`: a whole tree). */
  async remove(path: string, options: { recursive?: boolean } = {}): Promise<void> {
    const params = { path: await this.where(path), recursive: Boolean(options.recursive) };
    await this.api.json("DELETE", `${this.base}?${query(params)}`);
  }

  /** Renames `oldPath` to `newPath` (a file there is replaced). */
  async rename(oldPath: string, newPath: string): Promise<EntryInfo> {
    const [from, to] = [await this.where(oldPath), await this.where(newPath)];
    await this.api.json("POST", `${this.base}/rename`, { json: { from, to } });
    return this.getInfo(newPath);
  }

  /** Creates a directory; false if it exists already. */
  async makeDir(path: string, options: { mode?: number } = {}): Promise<boolean> {
    try {
      const json = { path: await this.where(path), mode: options.mode ?? 0o755 };
      await this.api.json("POST", `${this.base}/mkdir`, { json });
      return true;
    } catch (e) {
      if (e instanceof SandboxError && e.code === "AGENT112" && (await this.exists(path))) return false;
      throw e;
    }
  }
}
