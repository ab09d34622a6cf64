/** Errors raised by the SDK. Each carries mvm's stable code (`docs/errors.md`). */

import type { CommandResult } from "./commands.js";

/** Anything mvm refused or failed to do; `code` is its stable code. */
export class SandboxError extends Error {
  readonly code: string;
  readonly status?: number;

  constructor(message: string, code = "API006", status?: number) {
    super(`${code}: ${message}`);
    this.name = new.target.name;
    this.code = code;
    this.status = status;
  }
}

/** The request was not one mvm takes (a bad argument, a refused path or user). */
export class InvalidArgumentError extends SandboxError {}

/** No such sandbox, command, file or receipt. */
export class NotFoundError extends SandboxError {}

/** A command ran past its timeout and was killed. */
export class TimeoutError extends SandboxError {}

/** A command exited with a status other than 0; its result is in `result`. */
export class CommandExitError extends SandboxError {
  readonly result: CommandResult;
  readonly stdout: string;
  readonly stderr: string;
  readonly exitCode: number;

  constructor(result: CommandResult) {
    super(`the command exited with status ${result.exitCode}`, "EXIT");
    this.result = result;
    this.stdout = result.stdout;
    this.stderr = result.stderr;
    this.exitCode = result.exitCode;
  }
}

/** The error class that fits `code` and the HTTP `status`. */
export function errorFor(code: string, message: string, status?: number): SandboxError {
  if (status === 404 || (code === "AGENT112" && message.includes("No such file"))) {
    return new NotFoundError(message, code, status);
  }
  if (status === 400 || status === 413 || status === 422 || code.startsWith("AGENT1")) {
    return new InvalidArgumentError(message, code, status);
  }
  return new SandboxError(message, code, status);
}
