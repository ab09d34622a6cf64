// E2B-style programs, unchanged but for their import (`from "e2b"` became
// `from "../dist/compat/e2b.js"`, i.e. `mvm-sdk/compat/e2b`): the quickstart patterns on mvm,
// and what mvm refuses to widen. Run by `tests/sdk.rs` like sandbox.test.mjs.

import assert from "node:assert/strict";
import { unlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { CommandExitError, InvalidArgumentError, Sandbox } from "../dist/compat/e2b.js";
import { sharedApi } from "../dist/api.js";

const config = join(process.env.MVM_HOME, "config.toml");

before(() => {
  writeFileSync(config, `[e2b.templates]\nbase = "${process.env.MVM_TEST_IMAGE}"\n`);
});

after(async () => {
  unlinkSync(config);
  const { pid } = await sharedApi().json("GET", "/v1/health");
  process.kill(pid, "SIGTERM");
});

async function e2bQuickstart() {
  // --- as written for E2B ---
  const sandbox = await Sandbox.create({ timeoutMs: 120_000 });
  try {
    await sandbox.files.write("/tmp/script.sh", 'echo "$GREETING from $(pwd)"');
    const result = await sandbox.commands.run("sh /tmp/script.sh", { envs: { GREETING: "hi" }, cwd: "/tmp" });
    await sandbox.files.write("/tmp/out.txt", result.stdout);
    const saved = await sandbox.files.read("/tmp/out.txt");
    const server = await sandbox.commands.run("while true; do sleep 1; done", { background: true });
    const killed = await server.kill();
    let failed;
    try {
      await sandbox.commands.run("exit 7");
    } catch (e) {
      if (e instanceof CommandExitError) failed = e.exitCode;
      else throw e;
    }
    // E2B's home: commands start in it, relative paths are in it.
    await sandbox.files.makeDir("notes");
    await sandbox.files.write("notes/today.txt", "written relative");
    await sandbox.files.write("/home/user/hello.txt", "hello, ");
    const home = await sandbox.commands.run("pwd; echo $HOME; cat hello.txt notes/today.txt");
    const listed = (await sandbox.files.list("/home/user")).map((e) => e.name);
    // Never root, though E2B allows it.
    const asRoot = await sandbox.commands.run("pwd", { user: "root" }).then(
      () => "ran as root",
      (e) => e.code,
    );
    return { saved, killed, failed, home: home.stdout, listed, asRoot, running: await sandbox.isRunning() };
  } finally {
    await sandbox.kill();
  }
  // ---
}

test("the quickstart runs on mvm", async () => {
  assert.deepEqual(await e2bQuickstart(), {
    saved: "hi from /tmp\n",
    killed: true,
    failed: 7,
    home: "/home/user\n/home/user\nhello, written relative",
    listed: ["hello.txt", "notes"],
    asRoot: "AGENT114",
    running: true,
  });
});

test("open internet is refused and templates must be mapped", async () => {
  await assert.rejects(Sandbox.create({ allowInternetAccess: true }), (e) => {
    assert.ok(e instanceof InvalidArgumentError);
    assert.match(e.message, /allowHosts/);
    return true;
  });
  await assert.rejects(Sandbox.create("nowhere"), (e) => e.code === "API008");
});
