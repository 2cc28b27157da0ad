// Hostile arguments against every public function, constructor and method and against the raw
// binding (test/fixtures/hostile_child.ts), in a child process so that a native crash shows up as
// a failed test naming the call, not as a dead test runner. Every call must return or throw a
// LoraError; calls that throw anything else are listed. Functions whose owners still have to add
// argument checks are reported as todo (visible, not failing) until they do; any other function
// that throws a non-LoraError fails the test.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

// Fixed by default so that CI is deterministic; set LORA_NATIVE_HOSTILE_SEED to explore other sequences.
const SEED = Number(process.env.LORA_NATIVE_HOSTILE_SEED ?? 1);

// Public names whose owners still have to add argument checks: reported as todo, not failures.
// Empty: every public function holds to the rule. Add a name (with the file to fix) only for a gap
// that is found and cannot be fixed at once.
const KNOWN_GAPS: Record<string, string> = {};
// Not API surface: error classes (constructing one with a Symbol message is JavaScript's business),
// checkpoint internals (setState) and protected hooks.
const NOT_API = /^(new Lora(Type|Range)?Error|[A-Za-z]+#(setState|getState))$/;

t.test('hostile arguments: no crash, and every error is a LoraError', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-hostile-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const log = path.join(dir, 'calls.log');
  const child = path.join(__dirname, 'fixtures', 'hostile_child.ts');
  const tsLoader = process.execArgv.filter((a) => a.includes('@tapjs/typescript'));
  const r = spawnSync(process.execPath, [...tsLoader, child], {
    cwd: dir, encoding: 'utf8', timeout: 120_000, maxBuffer: 64 << 20,
    env: { ...process.env, LORA_NATIVE_HOSTILE_LOG: log, LORA_NATIVE_HOSTILE_SEED: String(SEED), LORA_NATIVE_HOSTILE_BUDGET_MS: '7000', NODE_OPTIONS: '' },
  });
  const lastCall = fs.existsSync(log) ? fs.readFileSync(log, 'utf8').trimEnd().split('\n').pop() : '(no log)';
  if (r.status !== 0 || r.signal) {
    t.fail(`child died (status ${r.status}, signal ${r.signal}) during: ${lastCall} (LORA_NATIVE_HOSTILE_SEED=${SEED} replays it)\n${r.stderr.slice(-3000)}`);
    return t.end();
  }
  t.pass(`child exited cleanly (LORA_NATIVE_HOSTILE_SEED=${SEED})`);
  const out = JSON.parse(r.stdout.trim().split('\n').pop()!) as {
    calls: number; ok: number; loraErrors: number; unclear: string[]; missed: string[]; targets: number; leaks: string[]; leaked: number; ms: number;
  };
  t.comment(`${out.calls} calls over ${out.targets} targets in ${out.ms} ms: ${out.ok} returned, ${out.loraErrors} threw LoraError, ${out.unclear.length} distinct other throws`);
  t.ok(out.calls >= 5000, `${out.calls} hostile calls (at least 5000)`);
  t.same(out.missed, [], 'every exported function and class was called');
  // Each synchronous call is checked on its own (a tensor an error path forgot names its call), then
  // the count at the end, after every promise settled.
  t.same(out.leaks, [], 'no call leaves a live tensor behind');
  t.equal(out.leaked, 0, 'no live tensors left behind');
  const byTarget = new Map<string, string[]>();
  for (const u of out.unclear) {
    const name = u.replace(/^\d+x /, '').replace(/\(.*$/s, '');
    if (NOT_API.test(name)) continue;
    if (!byTarget.has(name)) byTarget.set(name, []);
    byTarget.get(name)!.push(u);
  }
  const unexpected: string[] = [];
  for (const [name, list] of byTarget) {
    const gap = KNOWN_GAPS[name];
    if (gap) t.fail(`${name} throws non-LoraErrors for wrong types (${list.length} kinds), e.g. ${list[0]!.slice(0, 240)}`, { todo: gap });
    else unexpected.push(...list.slice(0, 3));
  }
  t.same(unexpected.slice(0, 20), [], 'no other public function throws anything but a LoraError');
  t.end();
});
