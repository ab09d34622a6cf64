// `mvm mcp` driven by the official TypeScript MCP client (@modelcontextprotocol/sdk): connect,
// list the tools, then a sandbox created, used and removed through them. Run by tests/mcp.rs
// with MVM_BIN, MVM_HOME, MVM_TEST_IMAGE (allowed, the default) and MVM_TEST_DENIED.
import assert from 'node:assert/strict';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';

const image = process.env.MVM_TEST_IMAGE;
const transport = new StdioClientTransport({
  command: process.env.MVM_BIN,
  args: ['mcp', '--allow-image', image, '--max-sandboxes', '1'],
  env: Object.fromEntries(Object.entries(process.env).filter(([k]) => /^(MVM_|RUST_)/.test(k))),
});
const client = new Client({ name: 'mvm-tests', version: '1.0.0' });
const long = { timeout: 600_000 };
await client.connect(transport, long);
assert.equal(client.getServerVersion().name, 'mvm');

// Listed first: the client then checks each result against its tool's output schema.
const { tools } = await client.listTools(undefined, long);
assert.equal(tools.length, 11);
for (const tool of tools) {
  assert.equal(tool.inputSchema.additionalProperties, false, tool.name);
  assert.ok(tool.outputSchema, tool.name);
}

const call = async (name, args) => {
  const result = await client.callTool({ name, arguments: args }, undefined, long);
  assert.ok(!result.isError, `${name}: ${JSON.stringify(result.content)}`);
  return result.structuredContent;
};
const refused = async (name, args, code) => {
  const result = await client.callTool({ name, arguments: args }, undefined, long);
  assert.equal(result.isError, true, `${name} was not refused`);
  assert.equal(result.structuredContent, undefined);
  const text = result.content.map((block) => block.text).join('');
  assert.ok(text.startsWith(code), text);
  return text;
};

const made = await call('sandbox_create', { image, labels: { suite: 'typescript' } });
const sandbox = made.sandbox_id;
assert.equal(made.state, 'running');
// The server allows one sandbox: a second is refused.
await refused('sandbox_create', { image }, 'MCP003');
await refused('sandbox_create', { image: process.env.MVM_TEST_DENIED }, 'MCP002');

const ran = await call('sandbox_run_code', {
  sandbox_id: sandbox, language: 'shell', code: 'printf "%s" "$((6 * 7))"',
});
assert.equal(ran.exit_code, 0);
assert.equal(ran.stdout, '42');
const bytes = Buffer.from([0, 1, 2, 255]);
await call('sandbox_files_write', {
  sandbox_id: sandbox, path: '/tmp/blob', content: bytes.toString('base64'), encoding: 'base64',
});
const read = await call('sandbox_files_read', {
  sandbox_id: sandbox, path: '/tmp/blob', encoding: 'base64',
});
assert.deepEqual(Buffer.from(read.content, 'base64'), bytes);
await refused('sandbox_files_read', { sandbox_id: sandbox, path: '/tmp/blob' }, 'MCP001');
const failed = await call('sandbox_exec', { sandbox_id: sandbox, command: ['sh', '-c', 'exit 7'] });
assert.equal(failed.exit_code, 7);
const slow = await call('sandbox_exec', {
  sandbox_id: sandbox, command: ['sleep', '30'], timeout_seconds: 1,
});
assert.equal(slow.timed_out, true);
assert.equal(slow.exit_code, 124);
// Oversize: more output than the cap comes back cut, and says so.
const big = await call('sandbox_exec', {
  sandbox_id: sandbox, command: ['sh', '-c', 'i=0; while [ $i -lt 5000 ]; do echo 0123456789abcdef; i=$((i+1)); done'],
});
assert.equal(big.truncated, true);
assert.equal(big.stdout.length, 64 * 1024);
await refused('sandbox_exec', { sandbox_id: sandbox, command: ['true'], timeout_seconds: 7200 }, 'MCP001');

await call('sandbox_remove', { sandbox_id: sandbox });
assert.deepEqual((await call('sandbox_list', {})).sandboxes, []);
await client.close();
console.log('typescript mcp client: ok');
