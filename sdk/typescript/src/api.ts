/**
 * The connection to mvm's local API: HTTP/1.1 on `$MVM_HOME/api.sock`, the server started on
 * demand (`mvm serve --idle-exit 10m`) when none answers.
 */

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import http from "node:http";
import { homedir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

import { SandboxError, errorFor } from "./errors.js";

/** How long a started server has to answer, in ms. */
const START_WAIT_MS = 15_000;
/** How a connection fails when no server listens (it went idle, or was stopped): the
 * request never arrived, so it is safe to start a server and send it again. */
const NOT_LISTENING = new Set(["ECONNREFUSED", "ENOENT"]);

/** A broken connection to the server, as the SDK's error. */
function broken(socket: string, e: Error): SandboxError {
  if (e instanceof SandboxError) return e;
  return new SandboxError(`the connection to the mvm server on ${socket} broke: ${e.message}`, "API006");
}

/** `$MVM_HOME`, else `~/.mvm` — as mvm itself finds it. */
export function mvmHome(): string {
  return process.env.MVM_HOME || join(homedir(), ".mvm");
}

/** The API's socket: `$MVM_API_SOCKET`, else `$MVM_HOME/api.sock`. */
export function socketPath(): string {
  return process.env.MVM_API_SOCKET || join(mvmHome(), "api.sock");
}

/** A request's body: JSON, bytes, or chunks as they come. */
export type Body = { json: unknown } | { bytes: Uint8Array } | { stream: AsyncIterable<Uint8Array> };

/** An answer whose body has not been read yet. */
export interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: http.IncomingMessage;
}

/** One server, reached through its socket. */
export class Api {
  readonly socket: string;
  private started: Promise<void> | undefined;

  constructor(socket?: string, private readonly autostart = true) {
    this.socket = socket ?? socketPath();
  }

  /** Sends one request; resolves once the answer's head arrived. A server that is not
   * there (it went idle, or was stopped) is started again and the request sent to it — once,
   * and not for a streamed body, which is read as it is sent. */
  async send(method: string, path: string, body?: Body): Promise<Answer> {
    try {
      return await this.sendOnce(method, path, body);
    } catch (e: any) {
      if (!NOT_LISTENING.has(e?.code) || (body && "stream" in body)) throw broken(this.socket, e);
      this.started = undefined;
      return this.sendOnce(method, path, body).catch((again) => {
        throw broken(this.socket, again);
      });
    }
  }

  private sendOnce(method: string, path: string, body?: Body): Promise<Answer> {
    return this.ready().then(
      () =>
        new Promise<Answer>((resolve, reject) => {
          const headers: Record<string, string> = {};
          let payload: Uint8Array | undefined;
          if (body && "json" in body) {
            payload = Buffer.from(JSON.stringify(body.json));
            headers["content-type"] = "application/json";
          } else if (body && "bytes" in body) {
            payload = body.bytes;
          }
          if (payload) headers["content-length"] = String(payload.length);
          const request = http.request(
            { socketPath: this.socket, method, path, headers, agent: false },
            (answer) => resolve({ status: answer.statusCode ?? 0, headers: answer.headers, body: answer }),
          );
          request.on("error", reject);
          if (body && "stream" in body) {
            (async () => {
              for await (const chunk of body.stream) {
                if (!request.write(chunk)) await new Promise((r) => request.once("drain", r));
              }
              request.end();
            })().catch((e) => request.destroy(e));
          } else {
            request.end(payload);
          }
        }),
    );
  }

  /** Sends a request and returns its JSON answer (undefined when empty); an error answer
   * throws its error. */
  async json<T>(method: string, path: string, body?: Body): Promise<T> {
    const answer = await this.send(method, path, body);
    const bytes = await readAll(answer.body).catch((e) => {
      throw broken(this.socket, e);
    });
    check(answer.status, bytes);
    return (bytes.length ? JSON.parse(bytes.toString()) : undefined) as T;
  }

  /** Sends a request whose answer is NDJSON; yields each line, parsed, as it comes. */
  async *lines(method: string, path: string, body?: Body): AsyncGenerator<any> {
    const answer = await this.send(method, path, body);
    if (answer.status >= 400) {
      check(answer.status, await readAll(answer.body));
    }
    if (!String(answer.headers["content-type"] ?? "").includes("ndjson")) {
      yield JSON.parse((await readAll(answer.body)).toString());
      return;
    }
    let pending = "";
    try {
      for await (const chunk of answer.body) {
        pending += chunk.toString();
        let end: number;
        while ((end = pending.indexOf("\n")) >= 0) {
          const line = pending.slice(0, end);
          pending = pending.slice(end + 1);
          if (line) yield JSON.parse(line);
        }
      }
    } catch (e: any) {
      // The server went away mid-answer (its commands end with it).
      throw broken(this.socket, e);
    }
  }

  private ready(): Promise<void> {
    this.started ??= this.answers().then(async (up) => {
      if (up) return;
      if (!this.autostart) throw new SandboxError(`no mvm server answers on ${this.socket}`);
      await this.startServer();
    });
    return this.started;
  }

  private answers(): Promise<boolean> {
    if (!existsSync(this.socket)) return Promise.resolve(false);
    return new Promise((resolve) => {
      const probe = http.get({ socketPath: this.socket, path: "/v1/health", agent: false }, (answer) => {
        answer.resume();
        resolve(answer.statusCode === 200);
      });
      probe.on("error", () => resolve(false));
      probe.setTimeout(5000, () => probe.destroy());
    });
  }

  private async startServer(): Promise<void> {
    const program = process.env.MVM_BIN || "mvm";
    const args = ["serve", "--idle-exit", "10m"];
    if (process.env.MVM_API_SOCKET) args.push("--socket", this.socket);
    const server = spawn(program, args, { detached: true, stdio: "ignore" });
    server.on("error", () => {});
    server.unref();
    const deadline = Date.now() + START_WAIT_MS;
    while (Date.now() < deadline) {
      if (await this.answers()) return;
      await sleep(50);
    }
    throw new SandboxError(`mvm serve did not answer on ${this.socket}`);
  }
}

/** Throws the SDK's error for an error answer. */
export function check(status: number, bytes: Buffer): void {
  if (status < 400) return;
  let error: { code?: string; message?: string } = {};
  try {
    error = JSON.parse(bytes.toString()).error ?? {};
  } catch {
    // Not JSON: the status says it.
  }
  throw errorFor(error.code ?? "API006", error.message ?? `HTTP ${status}`, status);
}

/** A whole body. */
export async function readAll(body: AsyncIterable<Buffer>): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of body) chunks.push(chunk);
  return Buffer.concat(chunks);
}

let shared: Api | undefined;

/** The process's connection, made on first use. */
export function sharedApi(): Api {
  shared ??= new Api();
  return shared;
}
