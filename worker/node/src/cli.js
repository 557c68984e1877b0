// The Node plan-worker's command (mirrors worker/cli.py and worker/serve.py): the Service its options describe
// (src/options.js; endpoints checked by src/endpoints.js) served with its admin socket, metrics, state directory
// and policy; a configuration error is one line and exit status 2; the ready line; signals.

import { readFileSync, openSync, closeSync } from "node:fs";
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
import { PROG, ConfigError, UsageError, usage, parseArgs, checkCurve } from "./options.js";
import { checkListen, checkNetwork } from "./endpoints.js";

const here = dirname(fileURLToPath(import.meta.url));
const PKG = JSON.parse(readFileSync(join(here, "..", "package.json"), "utf8"));
const ORT_VERSION = ort.env.versions.node ?? "?";

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
