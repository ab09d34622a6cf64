// The TypeScript SDK against a real mvm: `tests/sdk.rs` in the mvm repository sets MVM_HOME
// (a kernel fetched), MVM_BIN, MVM_RUNNER, MVM_AGENT and MVM_TEST_IMAGE (a busybox image) and
// runs `node --test`. The server is started by the SDK itself and stopped at the end.

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import net from "node:net";
import { after, before, describe, test } from "node:test";

import {
  CommandExitError,
  InvalidArgumentError,
  NotFoundError,
  Sandbox,
  SandboxError,
  TimeoutError,
} from "../dist/index.js";
import { sharedApi } from "../dist/api.js";

const image = process.env.MVM_TEST_IMAGE;
if (!image) throw new Error("MVM_TEST_IMAGE is not set: run through `cargo test --test sdk`");

/** Resolves once nothing listens on the Unix socket `path` any more. */
async function listenerClosed(path) {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    const refused = await new Promise((resolve) => {
      const probe = net.connect({ path });
      probe.on("connect", () => {
        probe.destroy();
        resolve(false);
      });
      probe.on("error", (e) => resolve(e.code === "ECONNREFUSED" || e.code === "ENOENT"));
    });
    if (refused) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`something still listens on ${path}`);
}

describe("a sandbox", () => {
  let sandbox;

  before(async () => {
    sandbox = await Sandbox.create({
      image,
      envs: { GREETING: "hello" },
      metadata: { suite: "typescript" },
      timeoutS: 600,
      secrets: ["sdk-token"],
    });
  });

  after(async () => {
    await sandbox?.kill();
    const { pid } = await sharedApi().json("GET", "/v1/health");
    process.kill(pid, "SIGTERM");
  });

  test("runs commands to completion with its env and theirs", async () => {
    const result = await sandbox.commands.run("echo $GREETING $WHO; echo oops >&2", {
      envs: { WHO: "there" },
    });
    assert.equal(result.stdout, "hello there\n");
    assert.equal(result.stderr, "oops\n");
    assert.equal(result.exitCode, 0);
    assert.ok(result.receipt);
    assert.equal((await sandbox.commands.run(["echo", "a b"])).stdout, "a b\n");
    assert.equal((await sandbox.commands.run("pwd", { cwd: "/tmp" })).stdout, "/tmp\n");
  });

  test("scrubs the sandbox's secret from what comes back", async () => {
    // `sdk-token` is unbound: the command holds its value, the SDK never sees it.
    const result = await sandbox.commands.run("echo $SDK_TOKEN; echo $SDK_TOKEN >&2; echo ${#SDK_TOKEN}");
    assert.equal(result.stdout, `[REDACTED:sdk-token]\n${process.env.MVM_TEST_SECRET.length}\n`);
    assert.equal(result.stderr, "[REDACTED:sdk-token]\n");
  });

  test("refuses a profile the API does not start and a malformed secret", async () => {
    for (const bad of [{ profile: "permissive" }, { secrets: ["Not A Secret"] }]) {
      await assert.rejects(Sandbox.create({ image, ...bad }), (e) => {
        assert.ok(e instanceof InvalidArgumentError, String(e));
        assert.equal(e.code, "API001");
        return true;
      });
    }
  });

  test("passes output to callbacks while the command runs", async () => {
    const seen = [];
    const started = Date.now();
    await sandbox.commands.run("echo first; sleep 2; echo second", {
      onStdout: (text) => seen.push([text, Date.now() - started]),
    });
    assert.deepEqual(seen.map(([text]) => text), ["first\n", "second\n"]);
    assert.ok(seen[1][1] - seen[0][1] > 1000);
  });

  test("throws with the result, the timeout and the agent's codes", async () => {
    await assert.rejects(sandbox.commands.run("echo partial; exit 3"), (e) => {
      assert.ok(e instanceof CommandExitError);
      assert.equal(e.exitCode, 3);
      assert.equal(e.stdout, "partial\n");
      return true;
    });
    await assert.rejects(sandbox.commands.run("sleep 30", { timeoutS: 1 }), TimeoutError);
    await assert.rejects(sandbox.commands.run(["/no/such/program"]), (e) => {
      assert.ok(e instanceof InvalidArgumentError);
      assert.equal(e.code, "AGENT101");
      return true;
    });
  });

  test("runs commands in the background with input, lists and kills them", async () => {
    const reader = await sandbox.commands.run("read a; echo got $a; cat", {
      background: true,
      stdin: true,
    });
    await reader.sendStdin("one\n");
    await sandbox.commands.sendStdin(reader.pid, "rest");
    await reader.closeStdin();
    assert.equal((await reader.wait()).stdout, "got one\nrest");
    const sleeper = await sandbox.commands.run("echo up; sleep 60", { background: true });
    const listed = await sandbox.commands.list();
    assert.ok(listed.find((p) => p.pid === sleeper.pid)?.running);
    assert.equal(listed.find((p) => p.pid === reader.pid)?.exitCode, 0);
    assert.ok(await sandbox.commands.kill(sleeper.pid));
    await assert.rejects(sleeper.wait(), (e) => e instanceof CommandExitError && e.exitCode === 137);
    assert.equal(await sleeper.kill(), false);
  });

  test("moves files both ways, 64 MiB streamed unchanged", async () => {
    const info = await sandbox.files.write("/tmp/hello.txt", "héllo\n");
    assert.equal(info.size, 7);
    assert.equal(await sandbox.files.read("/tmp/hello.txt"), "héllo\n");
    const block = Buffer.alloc(1 << 20);
    for (let i = 0; i < block.length; i++) block[i] = (i * 2654435761) >>> 24;
    async function* chunks() {
      for (let i = 0; i < 64; i++) yield Buffer.concat([block.subarray(i), block.subarray(0, i)]);
    }
    const expected = createHash("sha256");
    for await (const chunk of chunks()) expected.update(chunk);
    const digest = expected.digest("hex");
    const written = await sandbox.files.write("/tmp/big.bin", chunks());
    assert.equal(written.size, 64 << 20);
    assert.equal(written.sha256, `sha256:${digest}`);
    const read = createHash("sha256");
    let total = 0;
    for await (const chunk of await sandbox.files.read("/tmp/big.bin", { format: "stream" })) {
      read.update(chunk);
      total += chunk.length;
    }
    assert.equal(total, 64 << 20);
    assert.equal(read.digest("hex"), digest);
    await sandbox.files.remove("/tmp/big.bin");
  });

  test("makes, lists, renames and removes files with the agent's rules", async () => {
    assert.equal(await sandbox.files.makeDir("/tmp/tree"), true);
    assert.equal(await sandbox.files.makeDir("/tmp/tree"), false);
    await sandbox.files.write("/tmp/tree/a.txt", "a");
    const listed = await sandbox.files.list("/tmp/tree");
    assert.deepEqual(listed.map((e) => [e.path, e.type]), [["/tmp/tree/a.txt", "file"]]);
    const moved = await sandbox.files.rename("/tmp/tree/a.txt", "/tmp/tree/b.txt");
    assert.equal(moved.path, "/tmp/tree/b.txt");
    assert.equal(await sandbox.files.exists("/tmp/tree/a.txt"), false);
    await sandbox.files.remove("/tmp/tree", { recursive: true });
    assert.equal(await sandbox.files.exists("/tmp/tree"), false);
    await assert.rejects(sandbox.files.read("/etc/passwd"), (e) => e.code === "AGENT107");
  });

  test("is restored from its plan's boot snapshot unless a cold boot is asked for", async () => {
    assert.match((await sandbox.getInfo()).bootSnapshot ?? "", /^[0-9a-f]{64}$/);
    const booted = await Sandbox.create({ image, timeoutS: 120, coldBoot: true });
    try {
      assert.equal((await booted.getInfo()).bootSnapshot, undefined);
      assert.equal((await booted.commands.run("echo booted")).stdout, "booted\n");
    } finally {
      await booted.kill();
    }
  });

  test("is listed by label, paused, resumed and connected to", async () => {
    const mine = await Sandbox.list({ metadata: { suite: "typescript" } });
    assert.deepEqual(mine.map((s) => s.sandboxId), [sandbox.sandboxId]);
    await sandbox.pause();
    assert.equal(await sandbox.isRunning(), false);
    const again = await Sandbox.connect(sandbox.sandboxId);
    assert.equal(await again.isRunning(), true);
    assert.equal((await again.commands.run("echo back")).stdout, "back\n");
    await assert.rejects(Sandbox.connect("no-such-sandbox"), (e) => {
      assert.ok(e instanceof NotFoundError);
      assert.equal(e.code, "RUN036");
      return true;
    });
  });

  test("a server that dies mid-command ends the command, and the next call starts another", async () => {
    let started;
    const seen = new Promise((resolve) => (started = resolve));
    const running = sandbox.commands.run("echo up; sleep 31", { onStdout: started });
    await seen;
    const { pid } = await sharedApi().json("GET", "/v1/health");
    process.kill(pid, "SIGKILL");
    await assert.rejects(running, (e) => e instanceof SandboxError && e.code === "API006");
    // A killed process closes its files a moment after the kill; until then its listening
    // socket still queues connections (and resets them). Wait until it refuses.
    await listenerClosed(sharedApi().socket);
    // The sandbox outlives its server; the SDK starts a new one for the next call.
    assert.equal((await sandbox.commands.run("echo again")).stdout, "again\n");
    const { pid: next } = await sharedApi().json("GET", "/v1/health");
    assert.notEqual(next, pid);
    // The command's client went with the server, so the runner killed it.
    const deadline = Date.now() + 20_000;
    let ps;
    do {
      ps = (await sandbox.commands.run("ps")).stdout;
    } while (ps.includes("sleep 31") && Date.now() < deadline && (await new Promise((r) => setTimeout(r, 250, true))));
    assert.ok(!ps.includes("sleep 31"), ps);
  });

  test("gives a terminal where the plan grants one, and none where it does not", async () => {
    const refused = await sandbox.pty.create();
    await assert.rejects(refused.wait(), (e) => e instanceof SandboxError && e.code === "AGENT120");

    const dev = await Sandbox.create({ image, profile: "dev", timeoutS: 120 });
    try {
      const chunks = [];
      const printed = () => Buffer.concat(chunks).toString();
      const terminal = await dev.pty.create({ cols: 80, rows: 24, onData: (data) => chunks.push(data) });
      // Types `keys`, then waits for `wanted` to appear after what was there.
      const typeUntil = async (keys, wanted) => {
        const from = printed().length;
        await terminal.sendStdin(keys);
        const deadline = Date.now() + 30_000;
        while (!printed().slice(from).includes(wanted)) {
          assert.ok(Date.now() < deadline, `${JSON.stringify(wanted)} never came: ${printed()}`);
          await new Promise((r) => setTimeout(r, 50));
        }
      };
      await typeUntil("tty; echo term=$TERM.\r", "term=xterm-256color.");
      assert.match(printed(), /\/dev\/pts\/\d+/);
      await typeUntil("stty size\r", "24 80");
      await dev.pty.resize(terminal.pid, { cols: 100, rows: 30 });
      await typeUntil("stty size\r", "30 100");
      // Ctrl-C ends the foreground job, not the shell.
      await terminal.sendStdin("sleep 30\r");
      await new Promise((r) => setTimeout(r, 1000));
      await typeUntil("\x03", "\n");
      await typeUntil("echo after-$?\r", "after-130");
      await terminal.sendStdin("exit 3\r");
      await assert.rejects(terminal.wait(), (e) => e instanceof CommandExitError && e.exitCode === 3);
      assert.ok(chunks.every((c) => c instanceof Uint8Array));
    } finally {
      await dev.kill();
    }
  });

  test("two more sandboxes are driven at once and removed when their time is up", async () => {
    const made = await Promise.all(
      [0, 1].map(() => Sandbox.create({ image, timeoutS: 120, metadata: { suite: "ts-pair" } })),
    );
    const outs = await Promise.all(made.map((s, n) => s.commands.run(`echo ${n}`)));
    assert.deepEqual(outs.map((r) => r.stdout), ["0\n", "1\n"]);
    await Promise.all(made.map((s) => s.setTimeout(1)));
    const deadline = Date.now() + 60_000;
    while ((await Sandbox.list({ metadata: { suite: "ts-pair" } })).length && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 500));
    }
    assert.deepEqual(await Sandbox.list({ metadata: { suite: "ts-pair" } }), []);
  });
});
