// Where plan-worker listens (as worker/endpoints.py): each --listen endpoint checked before anything is bound
// (a live process on an ipc path is refused, a stale socket taken over; a network endpoint needs CURVE or
// --insecure).

import { existsSync, statSync } from "node:fs";
import net from "node:net";
import { pyRepr } from "./json.js";
import { log } from "./log.js";
import { ConfigError } from "./options.js";


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
export function checkNetwork(args) {
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

export async function checkListen(url) {
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
