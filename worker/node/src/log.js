// Log lines as the Python plan-worker writes them: "2026-12-01 23:59:01,123 INFO planwire.worker: ...".

const LEVELS = { debug: 10, info: 20, warning: 30, error: 40 };
let threshold = LEVELS.info;

export function setLevel(name) {
  threshold = LEVELS[name] ?? LEVELS.info;
}

export function enabled(name) {
  return LEVELS[name] >= threshold;
}

function stamp() {
  const d = new Date();
  const p = (n, w = 2) => String(n).padStart(w, "0");
  return (
    `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ` +
    `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())},${p(d.getMilliseconds(), 3)}`
  );
}

function write(level, name, text) {
  if (LEVELS[level] < threshold) return;
  process.stderr.write(`${stamp()} ${level.toUpperCase()} ${name}: ${text}\n`);
}

export const log = {
  debug: (t) => write("debug", "planwire.worker", t),
  info: (t) => write("info", "planwire.worker", t),
  warning: (t) => write("warning", "planwire.worker", t),
  error: (t) => write("error", "planwire.worker", t),
  auth: (t) => write("warning", "planwire.auth", t),
};

/** Untrusted text safe for one log line: control characters escaped, length capped. */
export function clean(text, limit = 2000) {
  text = String(text).replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, (c) =>
    c === "\n" ? "\\n" : c === "\r" ? "\\r" : c === "\t" ? "\\t" : "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"),
  );
  return text.length <= limit ? text : text.slice(0, limit) + "...";
}
