// Command line of the Node plan-worker (mirrors worker/cli.py).

import { existsSync, statSync, readFileSync, openSync, closeSync } from "node:fs";
import net from "node:net";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import * as ort from "onnxruntime-node";
import { Service, Limits, PROVIDERS } from "./service.js";
import { PROTOCOL_VERSION } from "./messages.js";
import { loadData, DataError } from "./npy.js";
import { loadSecret, clientKeys, startAuthenticator } from "./auth.js";
import { Server } from "./server.js";
import { Sandbox } from "./sandbox.js";
import { Metrics } from "./metrics.js";
import { AdminServer, defaultAdminPath, checkAdminEndpoint } from "./admin.js";
import { log, setLevel } from "./log.js";
import { pyRepr } from "./json.js";
import { load as loadPolicy, PolicyError } from "./policy.js";
import { defaultPlansDir } from "./review.js";
import { restoreState, StateError } from "./durable.js";
import { DEFAULT_MAX_MB as DIRECT_MAX_MB } from "./direct.js";

const here = dirname(fileURLToPath(import.meta.url));
const PKG = JSON.parse(readFileSync(join(here, "..", "package.json"), "utf8"));
const ORT_VERSION = ort.env.versions.node ?? "?";
const PROG = "plan-worker";

class ConfigError extends Error {}
class UsageError extends Error {}

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

function usage() {
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
function duration(flag, text) {
  const found = /^(\d+(?:\.\d+)?)([smhd]?)$/.exec(text.trim());
  if (!found || !(Number(found[1]) > 0)) {
    throw new UsageError(`argument ${flag}: must be a positive duration such as 3600, 90s, 15m, 12h or 1d, got ${pyRepr(text)}`);
  }
  return Number(found[1]) * { "": 1, s: 1, m: 60, h: 3600, d: 86400 }[found[2]];
}

const LOOPBACK_HOSTS = ["localhost", "::1", "[::1]"];

/** Whether a --listen URL is reachable only from this machine (ipc, or tcp on a loopback address). */
export function isLoopback(url) {
  if (!url.startsWith("tcp://")) return true;
  const rest = url.slice(6);
  const host = rest.slice(0, Math.max(0, rest.lastIndexOf(":")));
  return LOOPBACK_HOSTS.includes(host) || host.startsWith("127.");
}

/** Secure by default: a worker reachable from the network needs CURVE, or --insecure said out loud.
 * Returns the endpoints left open to the network without CURVE (to warn about once bound). */
function checkNetwork(args) {
  const exposed = args.listen.filter((u) => !isLoopback(u));
  if (exposed.length && !args.curveSecret && !args.insecure) {
    throw new ConfigError(
      `--listen ${pyRepr(exposed[0])} is reachable from the network, and without CURVE anyone who reaches it ` +
        "can connect and read the traffic: make keys with 'plan-worker keys keys' (the worker's) and " +
        "'plan-worker keys keys/clients --name alice' (one per client; give each its .key_secret), then add " +
        "--curve-secret keys/worker.key_secret --curve-clients keys/clients; or pass --insecure on a network " +
        "you trust",
    );
  }
  return args.curveSecret ? [] : exposed;
}

/** SIGHUP: read the policy again; a broken file keeps the one in force, and the log says why. */
function reloadPolicy(service, path) {
  let policy;
  try {
    policy = loadPolicy(path);
  } catch (e) {
    if (!(e instanceof PolicyError)) throw e;
    log.error(`policy not reloaded, the previous one stays in force: ${e.message}`);
    return;
  }
  service.releaser.policy = policy;
  log.info(`policy ${path} reloaded: ${policy.rules.size} approved plans`);
}

function checkCurve(args) {
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

async function checkListen(url) {
  if (url.startsWith("tcp://")) {
    const rest = url.slice(6);
    const at = rest.lastIndexOf(":");
    const host = at < 0 ? "" : rest.slice(0, at);
    const port = at < 0 ? "" : rest.slice(at + 1);
    if (!(host && at >= 0 && (port === "*" || (/^\d+$/.test(port) && Number(port) < 65536)))) {
      throw new ConfigError(`--listen ${pyRepr(url)}: expected tcp://HOST:PORT (e.g. tcp://0.0.0.0:5555)`);
    }
    return;
  }
  if (!url.startsWith("ipc://") || url.length === 6) {
    throw new ConfigError(`--listen ${pyRepr(url)}: expected tcp://HOST:PORT or ipc://PATH (e.g. tcp://0.0.0.0:5555)`);
  }
  const path = url.slice(6);
  if (!existsSync(path)) return;
  if (!statSync(path).isSocket()) throw new ConfigError(`--listen ${pyRepr(url)}: ${path} exists and is not a socket: choose another path`);
  const live = await new Promise((resolve) => {
    const probe = net.connect(path);
    probe.setTimeout(1000);
    probe.on("connect", () => (probe.destroy(), resolve(true)));
    probe.on("error", (e) => resolve(e.code === "ECONNREFUSED" || e.code === "ENOENT" ? false : e));
    probe.on("timeout", () => (probe.destroy(), resolve(true)));
  });
  if (live === false) {
    log.info(`--listen ${url}: taking over a stale socket (nothing answers there)`);
    return;
  }
  if (live !== true) throw new ConfigError(`--listen ${pyRepr(url)}: cannot probe ${path} (${live.message})`);
  throw new ConfigError(`--listen ${pyRepr(url)}: a live process (another worker?) answers there: stop it or choose another path`);
}

export async function main(argv) {
  let args;
  try {
    args = parseArgs(argv);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    process.stderr.write(`${PROG}: error: ${e.message} (see ${PROG} --help)\n`);
    return 2;
  }
  if (args.help) {
    process.stdout.write(usage());
    return 0;
  }
  if (args.version) {
    process.stdout.write(`${PROG} ${PKG.version} (Node.js worker, protocol ${PROTOCOL_VERSION}, onnxruntime-node ${ORT_VERSION})\n`);
    return 0;
  }
  setLevel(args.logLevel);
  try {
    return await serve(args);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    process.stderr.write(`${PROG}: ${e.message}\n`);
    return 2;
  }
}

async function serve(args) {
  checkCurve(args);
  for (const url of args.listen) await checkListen(url);
  const exposed = checkNetwork(args);
  let adminUrl = "none";
  if (args.admin !== "none") {
    try {
      adminUrl = args.admin ?? `ipc://${defaultAdminPath(args.id)}`;
      checkAdminEndpoint(adminUrl);
    } catch (e) {
      throw new ConfigError(e.message);
    }
  }
  const runTimeout = Number(args.runTimeout);
  const runMemoryMb = Number(args.maxRunMemoryMb);
  if (!(runTimeout > 0) || !Number.isFinite(runTimeout)) throw new ConfigError(`--run-timeout ${pyRepr(args.runTimeout)}: must be a positive number of seconds`);
  if (!(Number.isInteger(runMemoryMb) && runMemoryMb >= 0)) {
    throw new ConfigError(`--max-run-memory-mb ${pyRepr(args.maxRunMemoryMb)}: must be 0 (no bound) or a positive whole number`);
  }
  const directMb = /^\s*(\d+(\.\d*)?|\.\d+)\s*$/.test(args.directMaxMb) ? Number(args.directMaxMb) : NaN;
  if (!(directMb >= 0 && directMb <= 1024)) {
    throw new ConfigError(`--direct-max-mb ${pyRepr(args.directMaxMb)}: must be between 0 (every run in the runner) and 1024`);
  }
  let metricsAddr = null;
  if (args.metrics !== null) {
    const at = args.metrics.lastIndexOf(":");
    const port = args.metrics.slice(at + 1);
    if (at < 0 || !/^\d+$/.test(port) || Number(port) > 65535) {
      throw new ConfigError(`--metrics ${pyRepr(args.metrics)}: expected HOST:PORT (e.g. 127.0.0.1:9105)`);
    }
    metricsAddr = [args.metrics.slice(0, at).replace(/^\[|\]$/g, "") || "0.0.0.0", Number(port)];
  }
  if (args.device === "cuda") {
    throw new ConfigError(
      `--device cuda: onnxruntime-node here has no CUDA provider (available: ${PROVIDERS.join(", ")}); use --device cpu, or the Python plan-worker with onnxruntime-gpu`,
    );
  }
  const limits = new Limits({ maxMessageBytes: args.maxMessageMb * 2 ** 20, maxPlanBytes: args.maxPlanMb * 2 ** 20 });
  let curveSecret = null;
  let allowed = null;
  let data;
  let policy = null;
  try {
    if (args.curveSecret) {
      curveSecret = loadSecret(args.curveSecret);
      if (args.curveClients) allowed = clientKeys(args.curveClients);
    }
    data = args.data.flatMap((spec) => loadData(spec));
    if (args.policy !== null) policy = loadPolicy(args.policy);
    if (args.audit !== null) {
      try {
        closeSync(openSync(args.audit, "a"));
      } catch (e) {
        throw new Error(`--audit ${pyRepr(args.audit)}: cannot append to it (${e.code === "EACCES" ? "Permission denied" : e.message})`);
      }
    }
  } catch (e) {
    // a key file or --data file at fault (DataError, or auth.js's Error): one line, exit status 2
    throw new ConfigError(e instanceof DataError || e instanceof Error ? e.message : String(e));
  }
  const sandbox = args.noSandbox ? null : new Sandbox({ workerId: args.id, threads: args.threads, memoryMb: runMemoryMb, timeout: runTimeout });
  const service = new Service(args.id, {
    runtime: sandbox,
    data,
    isPublic: args.public,
    threads: args.threads,
    limits,
    maxPlans: args.maxPlans,
    maxStoreBytes: args.maxStoreMb * 2 ** 20,
    maxClientStoreBytes: args.maxClientStoreMb === null ? null : args.maxClientStoreMb * 2 ** 20,
    idleTtl: args.idleTtl,
    policy,
    audit: args.audit,
    plansDir: args.plansDir === "none" ? null : (args.plansDir ?? defaultPlansDir()),
    directMaxBytes: sandbox === null ? 0 : Math.floor(Math.min(directMb, runMemoryMb || directMb) * 2 ** 20), // never past a run's bound; without a sandbox every run is in this process already
  });
  const cleanup = [() => service.releaser.close()];
  if (args.stateDir !== null) {
    try {
      const state = restoreState(service, args.stateDir, args.stateSync === "fsync"); // before anything is bound
      cleanup.push(() => state.close());
    } catch (e) {
      if (!(e instanceof StateError)) throw e;
      throw new ConfigError(e.message);
    }
  }
  if (sandbox !== null) {
    sandbox.start(); // warm: the first registration does not wait for onnxruntime to load
    cleanup.push(() => sandbox.close());
  }
  if (curveSecret !== null) {
    const zap = await startAuthenticator(allowed);
    cleanup.push(() => zap.close());
  }
  if (args.maxConnections !== null) log.warning("--max-connections is not enforced by the Node worker (zeromq.js cannot close a peer)");
  let server;
  try {
    server = await Server.start(service, args.listen, {
      maxMessageBytes: limits.maxMessageBytes,
      curveSecret,
      maxQueue: args.maxClientQueue,
    });
  } catch (e) {
    for (const c of cleanup) c();
    throw new ConfigError(e.message);
  }
  const metrics = new Metrics(service);
  const curveMode = curveSecret === null ? "off" : args.curveAnyClient ? "any client" : "listed clients";
  if (adminUrl !== "none") {
    const info = {
      worker: args.id,
      version: PKG.version,
      protocol: PROTOCOL_VERSION,
      session: service.session,
      pid: process.pid,
      providers: service.providers,
      endpoints: server.endpoints,
      curve: curveMode,
    };
    let admin;
    try {
      admin = await AdminServer.start(adminUrl, metrics, info);
    } catch (e) {
      server.stop();
      for (const c of cleanup) c();
      throw new ConfigError(`--admin: ${e.message}`);
    }
    cleanup.push(() => admin.close());
    log.info(`admin on ${admin.url} (plan-worker status ${admin.url})`);
  }
  if (metricsAddr !== null) {
    let port;
    try {
      port = await metrics.serve(...metricsAddr);
    } catch (e) {
      server.stop();
      for (const c of cleanup) c();
      throw new ConfigError(`--metrics ${pyRepr(args.metrics)}: cannot serve there (${e.message})`);
    }
    cleanup.push(() => metrics.close());
    log.info(`metrics on http://${metricsAddr[0]}:${port}/metrics`);
  }
  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    log.info(`signal ${signal === "SIGINT" ? 2 : 15}: shutting down`);
    server.stop();
  };
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGTERM", () => stop("SIGTERM"));
  if (exposed.length) log.warning(`--insecure: ${exposed.join(", ")} reachable from the network without CURVE`);
  if (args.policy !== null) {
    process.on("SIGHUP", () => reloadPolicy(service, args.policy));
    log.info(`policy ${args.policy}: ${policy.rules.size} approved plans (SIGHUP reloads it)`);
  }
  if (sandbox === null) log.warning("--no-sandbox: plans run inside this process; a crashing plan takes it down");
  else {
    const lane = directMb ? `; small runs of float-only plans in this process (--direct-max-mb ${directMb})` : "";
    log.info(`plans run in a sandboxed runner process: --run-timeout ${runTimeout} s, --max-run-memory-mb ${runMemoryMb}${lane}`);
  }
  log.info(
    `plan-worker ${args.id} ready on ${server.endpoints.join(", ")} (protocol ${PROTOCOL_VERSION}, providers ${service.providers.join(",")}, ` +
      `onnxruntime ${ORT_VERSION}, pid ${process.pid}, ${service.store.size} own tensors, curve ${curveMode}, sandbox ${sandbox === null ? "off" : "on"}, node ${process.versions.node})`,
  );
  try {
    await server.serveForever(sandbox, metrics);
  } finally {
    for (const c of cleanup) c();
    log.info(`plan-worker ${args.id} stopped`);
  }
  return 0;
}
