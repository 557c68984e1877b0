// Differential check of messages.js's runFast against the general parse: mutated run headers (inserted,
// deleted, replaced and copied pieces), and every one runFast reads must give exactly the message that
// validateRequest(parseHeader(header)) gives (keys, order, defaults, numbers). Usage: node runfast-diff.js [N]
// Prints "ok: N headers, V valid, F read by runFast", or the first mismatch and exits 1.
import { runFast, validateRequest } from "../src/messages.js";
import { parseHeader } from "../src/json.js";

const N = Number(process.argv[2] ?? 100000);
let seed = 12345;
const rnd = (n) => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) % n;
const SEEDS = [
  `{"type":"run","id":7,"plan":"${"a".repeat(64)}","args":[{"ref":"x1"}],"outputs":["y1"],"fetch":[0]}`,
  '{"type":"run","id":0,"plan":"p","args":[],"outputs":[]}',
  '{"type":"run","id":123456789012345,"plan":"","args":[{"ref":"a"},{"ref":"b"}],"outputs":["c","d"],"fetch":[0,1],"inline_max":4096}',
  '{"type":"run","id":9,"plan":"q","args":[{"ref":"a"}],"outputs":["o","o"],"inline_max":10}',
  `{"type":"run","id":9,"plan":"q","args":[{"ref":"${"k".repeat(256)}"}],"outputs":["${"o".repeat(256)}"]}`,
];
const PIECES = ['"', "\\", ",", "]", "[", "{", "}", ":", "0", "1", "9", "-", ".", "e", " ", "a", "\u00e9", "\u0000",
  "\u007f", "\u2028", "ref", "fetch", "inline_max", '"ref":', '"tensor":', "00", "1234567890123456", ',"fetch":[]'];
// a JFloat or a BigInt written apart from an integer
const show = (v) => JSON.stringify(v, (_, x) => (typeof x === "bigint" ? `big ${x}` : x?.constructor?.name === "JFloat" ? `float ${x.value}` : x));

let valid = 0;
let fast = 0;
for (let n = 0; n < N; n++) {
  let s = SEEDS[rnd(SEEDS.length)];
  for (let m = n % 7 === 0 ? 0 : 1 + rnd(3); m > 0; m--) {
    const i = rnd(s.length + 1);
    const piece = PIECES[rnd(PIECES.length)];
    const j = rnd(s.length);
    s = [
      () => s.slice(0, i) + piece + s.slice(i),
      () => s.slice(0, i) + s.slice(i + 1 + rnd(3)),
      () => s.slice(0, i) + piece + s.slice(i + 1),
      () => s.slice(0, i) + s.slice(j, j + rnd(12)) + s.slice(i),
    ][rnd(4)]();
  }
  const header = Buffer.from(s, "utf8");
  let want;
  try {
    want = show(validateRequest(parseHeader(header)));
    valid++;
  } catch (e) {
    want = `refused: ${e.message}`;
  }
  const got = runFast(header);
  if (got === undefined) continue;
  fast++;
  if (show(got) !== want) {
    console.log(`mismatch on ${JSON.stringify(s)}: runFast ${show(got)}, general ${want}`);
    process.exit(1);
  }
}
console.log(`ok: ${N} headers, ${valid} valid, ${fast} read by runFast`);
