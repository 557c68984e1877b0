// The plan-worker command line (as worker/options.py): its options, how each value is parsed, and the checks of
// a configuration that need nothing bound yet. A mistake is one line (ConfigError, or a UsageError as
// argparse's) and exit status 2 (src/cli.js).

import { pyRepr } from "./json.js";
import { DEFAULT_MAX_MB as DIRECT_MAX_MB } from "./direct.js";


export const PROG = "plan-worker";

export class ConfigError extends Error {}
export class UsageError extends Error {}

const OPTIONS = {
  "--listen": { dest: "listen", append: true, metavar: "URL", help: "endpoint to bind, tcp://HOST:PORT or ipc://PATH (repeatable)" },
  "--id": { dest: "id", dflt: "worker", help: "worker id reported to clients" },
  "--device": { dest: "device", dflt: "cpu", choices: ["cpu", "cuda", "auto"], help: "where plans run: cpu, cuda (refused: onnxruntime-node here has no CUDA provider), auto (cpu here)" },
  "--data": { dest: "data", append: true, metavar: "FILE[:TAG,...]", help: "a .npy/.npz file of this worker's own tensors (repeatable)" },
  "--public": { dest: "public", flag: true, help: "let clients copy the worker's own data" },
  "--idle-ttl": { dest: "idleTtl", duration: true, dflt: "1d", metavar: "DURATION", help: "free the tensors and plans of a client not seen for this long (e.g. 3600, 90s, 15m, 12h, 1d)" },
  "--policy": { dest: "policy", metavar: "FILE", help: "the data owner's release rules (TOML): approved plans and which private-derived outputs may leave (none without it); SIGHUP reloads it" },
  "--plans-dir": { dest: "plansDir", metavar: "DIR", help: "where a worker with private data keeps every plan it receives, by fingerprint, for 'plan-worker review' ('none': not kept; default: $XDG_STATE_HOME/planwire/plans)" },
  "--audit": { dest: "audit", metavar: "FILE", help: "append one JSON line per release or refusal of private-derived data" },
  "--insecure": { dest: "insecure", flag: true, help: "allow a non-loopback --listen without CURVE (anyone who reaches it can connect and read traffic)" },
  "--threads": { dest: "threads", int: true, dflt: 1, help: "onnxruntime intra-op threads per plan" },
  "--max-message-mb": { dest: "maxMessageMb", int: true, dflt: 1024, help: "largest message accepted (MiB)" },
  "--max-plan-mb": { dest: "maxPlanMb", int: true, dflt: 512, help: "largest plan accepted (MiB)" },
  "--max-store-mb": { dest: "maxStoreMb", int: true, dflt: 4096, help: "clients' tensors on this worker, all together (MiB)" },
  "--max-client-store-mb": { dest: "maxClientStoreMb", int: true, help: "one client's tensors (MiB; default: all)" },
  "--max-plans": { dest: "maxPlans", int: true, dflt: 1000, help: "plans registered at once" },
  "--max-client-queue": { dest: "maxClientQueue", int: true, dflt: 10000, help: "queued requests and unread replies per client (messages); past it its replies are dropped" },
  "--max-connections": { dest: "maxConnections", int: true, help: "accepted for compatibility; not enforced by the Node worker (see README)" },
  "--run-timeout": { dest: "runTimeout", dflt: "60", metavar: "SECONDS", help: "stop a run or a plan's registration after this long (plan_timeout)" },
  "--max-run-memory-mb": { dest: "maxRunMemoryMb", dflt: "2048", metavar: "MB", help: "memory a run or a registration may add to the sandboxed runner (out_of_memory); 0: none" },
  "--direct-max-mb": { dest: "directMaxMb", dflt: String(DIRECT_MAX_MB), metavar: "MB", help: "run a run in the worker itself, without the sandboxed runner's hop, when its plan has only float ops that cannot trap or allocate by data (Add, MatMul, Softmax, ...; see worker/node/src/direct.js), its peak memory is at most this and its FLOPs at most 2e6; 0: every run in the runner" },
  "--no-sandbox": { dest: "noSandbox", flag: true, help: "run plans inside the worker process (for trusted plans only: a crashing plan takes the worker and its data down, and --run-timeout/--max-run-memory-mb do not apply)" },
  "--state-dir": { dest: "stateDir", metavar: "DIR", help: "keep tensors, plans, client identities and the session in DIR (written before each reply), so a worker restarted on DIR after a crash or kill -9 has them all back under the same session" },
  "--state-sync": { dest: "stateSync", dflt: "fsync", choices: ["fsync", "none"], help: "with --state-dir: fsync each change before the reply (survives a power loss), or none (faster; survives the worker's crash or kill -9, not the machine's)" },
  "--curve-secret": { dest: "curveSecret", metavar: "FILE", help: "zmq.auth secret key file: encrypt with CURVE" },
  "--curve-clients": { dest: "curveClients", metavar: "DIR", help: "directory of allowed client public keys (*.key)" },
  "--curve-any-client": { dest: "curveAnyClient", flag: true, help: "with --curve-secret: encrypt but admit any client key (no authentication)" },
  "--admin": { dest: "admin", metavar: "URL", help: "admin socket for plan-worker status: ipc://PATH or tcp://127.0.0.1:PORT, or none (default: an ipc socket only this user can reach)" },
  "--metrics": { dest: "metrics", metavar: "HOST:PORT", help: "serve Prometheus metrics on http://HOST:PORT/metrics (e.g. 127.0.0.1:9105)" },
  "--log-level": { dest: "logLevel", dflt: "info", choices: ["debug", "info", "warning", "error"], help: "log detail (to stderr)" },
};

export function usage() {
  const lines = [
    `usage: ${PROG} --listen URL [--listen URL ...] [--id ID] [--data FILE[:TAG,...]] ... (Node.js worker)`,
    "",
    "Serve planwire plans over ZeroMQ (Node.js worker: onnxruntime-node, CPU).",
    "",
    "options:",
    "  -h, --help            show this help message and exit",
    "  --version             show program's version number and exit",
  ];
  for (const [flag, o] of Object.entries(OPTIONS)) {
    const arg = o.flag ? "" : ` ${o.metavar ?? (o.choices ? `{${o.choices.join(",")}}` : o.dest.toUpperCase())}`;
    const dflt = o.dflt !== undefined ? ` (default: ${o.dflt})` : "";
    lines.push(`  ${(flag + arg).padEnd(22)}${o.help}${dflt}`);
  }
  return lines.join("\n") + "\n";
}

export function parseArgs(argv) {
  const args = {};
  for (const o of Object.values(OPTIONS)) args[o.dest] = o.append ? [] : o.flag ? false : (o.dflt ?? null);
  const unknown = [];
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    let value;
    if (a === "-h" || a === "--help") return { help: true };
    if (a === "--version") return { version: true };
    if (a.startsWith("--") && a.includes("=")) [a, value] = [a.slice(0, a.indexOf("=")), a.slice(a.indexOf("=") + 1)];
    const o = OPTIONS[a];
    if (o === undefined) {
      unknown.push(argv[i]);
      continue;
    }
    if (o.flag) {
      if (value !== undefined) throw new UsageError(`argument ${a}: ignored explicit argument ${pyRepr(value)}`);
      args[o.dest] = true;
      continue;
    }
    if (value === undefined) {
      if (i + 1 >= argv.length || (argv[i + 1].startsWith("--") && argv[i + 1].length > 2)) {
        throw new UsageError(`argument ${a}: expected one argument`);
      }
      value = argv[++i];
    }
    if (o.choices && !o.choices.includes(value)) {
      throw new UsageError(`argument ${a}: invalid choice: ${pyRepr(value)} (choose from ${o.choices.map(pyRepr).join(", ")})`);
    }
    if (o.duration) value = duration(a, value);
    if (o.int) {
      if (!/^[+-]?\d+$/.test(value.trim())) throw new UsageError(`argument ${a}: must be a positive whole number, got ${pyRepr(value)}`);
      const n = Number(value);
      if (n <= 0) throw new UsageError(`argument ${a}: must be a positive whole number, got ${n}`);
      value = n;
    }
    if (o.append) args[o.dest].push(value);
    else args[o.dest] = value;
  }
  if (typeof args.idleTtl === "string") args.idleTtl = duration("--idle-ttl", args.idleTtl);
  if (!args.listen.length) throw new UsageError("the following arguments are required: --listen");
  if (unknown.length) throw new UsageError(`unrecognized arguments: ${unknown.join(" ")}`);
  return args;
}

/** Seconds of `90`, `90s`, `15m`, `12h` or `1d`. */
export function duration(flag, text) {
  const found = /^(\d+(?:\.\d+)?)([smhd]?)$/.exec(text.trim());
  if (!found || !(Number(found[1]) > 0)) {
    throw new UsageError(`argument ${flag}: must be a positive duration such as 3600, 90s, 15m, 12h or 1d, got ${pyRepr(text)}`);
  }
  return Number(found[1]) * { "": 1, s: 1, m: 60, h: 3600, d: 86400 }[found[2]];
}

export function checkCurve(args) {
  if (args.curveClients && !args.curveSecret) {
    throw new ConfigError("--curve-clients needs --curve-secret (the worker's secret key): without it nothing is encrypted or authenticated");
  }
  if (args.curveAnyClient && !args.curveSecret) throw new ConfigError("--curve-any-client needs --curve-secret (the worker's secret key)");
  if (args.curveSecret && args.curveClients && args.curveAnyClient) {
    throw new ConfigError("--curve-clients and --curve-any-client contradict each other: choose one");
  }
  if (args.curveSecret && !(args.curveClients || args.curveAnyClient)) {
    throw new ConfigError(
      "--curve-secret needs --curve-clients DIR (the client keys to admit), or --curve-any-client to encrypt without authenticating clients",
    );
  }
}
