// What the Node worker holds, for whom, and what ran (as worker/stats.py and worker/metrics.py): counted by
// the supervisor (src/supervisor.js) as replies are sent; holdings are read from the service when asked.
// Shown as Prometheus metrics (`--metrics HOST:PORT`: the Python worker's names, labels and buckets, in
// the text exposition format, served by node:http) and as `plan-worker status` (src/admin.js).

import http from "node:http";
import { label as ownerLabel } from "./owners.js";

// Run time buckets (seconds): a tiny plan takes tens of microseconds, a training step seconds.
const RUN_BUCKETS = [1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

const label = (v) => String(v).replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
const num = (v) => (Number.isInteger(v) ? `${v}.0` : String(v));

const OK_KEYS = Object.create(null); // request type -> its `requests` key with no error code
const WORKER = "(worker's own data)"; // owner of the tensors the worker was started with
const DURATIONS_KEPT = 10_000; // p50/p99 are over the most recent runs
// Connections come and go: a connection's row is folded (dropped; its owner's row still counts what it
// holds) once not seen for FOLD_AFTER_MS, or beyond MAX_CONNECTION_ROWS (the least recently seen first),
// as the Python worker's worker/stats.py does: status stays bounded however many connections come.
export const FOLD_AFTER_MS = 600_000;
export const MAX_CONNECTION_ROWS = 1024;

export class Metrics {
  constructor(service, { foldAfterMs = FOLD_AFTER_MS, maxRows = MAX_CONNECTION_ROWS } = {}) {
    this.service = service;
    this.foldAfterMs = foldAfterMs;
    this.maxRows = maxRows;
    this.folded = 0; // connection rows folded since the start
    this.started = Date.now();
    this.byClient = new Map(); // client -> {requests, refused, name, last}, the least recently seen first
    this.lastClient = null; // the connection seen last (the last of byClient when it is still there)
    this.byPlan = new Map(); // plan id -> {runs, failed, clients: Set}
    this.byType = new Map(); // request type -> count
    this.durations = [];
    this.runCount = 0;
    this.runsFailed = 0;
    this.requests = new Map(); // "type\0code" -> count
    this.runs = new Map(); // "plan\0plan_id" -> {runs, failed}
    this.buckets = RUN_BUCKETS.map(() => 0);
    this.count = 0;
    this.sum = 0;
    this.privateReleases = 0;
  }

  /** One answered request: `msg` (null when it could not be read), its reply's error code ("" if none). */
  observe(msg, code, client, seconds, reply = null) {
    const type = msg === null ? "invalid" : msg.type;
    const key = code === "" ? (OK_KEYS[type] ??= `${type}\0`) : `${type}\0${code}`; // a type's key for success made once
    this.requests.set(key, (this.requests.get(key) ?? 0) + 1);
    this.byType.set(type, (this.byType.get(type) ?? 0) + 1);
    let c = this.byClient.get(client);
    if (c === undefined || client !== this.lastClient) {
      // the most recently seen last (a connection seen last already is: the usual case, nothing moves)
      if (c === undefined) c = { requests: 0, refused: 0, name: "", last: 0 };
      this.byClient.delete(client);
      this.byClient.set(client, c);
      this.lastClient = client;
    }
    c.requests += 1;
    c.refused += code !== "";
    c.last = Date.now();
    this.fold(c.last);
    if (msg === null) return;
    if (type === "hello" && code === "") c.name = String(msg.client ?? "");
    if (type === "register_plan" && code === "" && reply !== null) {
      const pid = JSON.parse(reply[1]).plan;
      let p = this.byPlan.get(pid);
      if (p === undefined) this.byPlan.set(pid, (p = { runs: 0, failed: 0, clients: new Set(), plan: undefined, row: undefined }));
      p.clients.add(client);
    }
    if (type === "run") {
      const p = this.byPlan.get(msg.plan);
      if (p !== undefined) (p.runs += 1), (p.failed += code !== "");
      this.runCount += 1;
      this.runsFailed += code !== "";
      this.durations.push(seconds);
      if (this.durations.length > 2 * DURATIONS_KEPT) this.durations = this.durations.slice(-DURATIONS_KEPT);
      const plan = this.service.plans.get(msg.plan);
      let r = p !== undefined && p.plan === plan ? p.row : undefined; // the plan's row, found once per plan
      if (r === undefined) {
        const k = `${plan ? plan.name : "(unknown plan)"}\0${String(msg.plan).slice(0, 12)}`;
        r = this.runs.get(k);
        if (r === undefined) this.runs.set(k, (r = { runs: 0, failed: 0 }));
        if (p !== undefined) (p.plan = plan), (p.row = r);
      }
      r.runs += 1;
      r.failed += code !== "";
      this.count += 1;
      this.sum += seconds;
      for (let i = 0; i < RUN_BUCKETS.length; i++) if (seconds <= RUN_BUCKETS[i]) this.buckets[i]++;
    } else if (type === "get" && code === "") {
      for (const k of msg.keys) if (this.service.store.own.has(k)) this.privateReleases += 1; // the worker's own data
    }
  }

  /** Fold the rows of connections not seen for foldAfterMs, and the least recently seen beyond maxRows. */
  fold(now) {
    for (const [conn, c] of this.byClient) {
      if (now - c.last <= this.foldAfterMs && this.byClient.size <= this.maxRows) return;
      this.byClient.delete(conn);
      this.folded += 1;
      for (const p of this.byPlan.values()) p.clients.delete(conn);
    }
  }

  /** Everything `plan-worker status` shows (src/admin.js adds the worker's fixed facts). */
  snapshot() {
    const { store, plans } = this.service;
    const per = new Map();
    const row = (owner) => {
      let r = per.get(owner);
      if (r === undefined) per.set(owner, (r = { tensors: 0, tensor_bytes: 0, plans: 0, plan_bytes: 0 }));
      return r;
    };
    const held = new Map(); // owner -> what it holds
    const owned = (owner) => {
      let r = held.get(owner);
      if (r === undefined) held.set(owner, (r = { tensors: 0, tensor_bytes: 0, plans: 0, plan_bytes: 0 }));
      return r;
    };
    for (const [owner, e] of store.entries()) {
      const r = owner === null ? row(WORKER) : owned(owner);
      r.tensors += 1;
      r.tensor_bytes += e.tensor.nbytes;
    }
    const planRows = [];
    for (const [pid, plan] of plans) {
      const p = this.byPlan.get(pid) ?? { runs: 0, failed: 0, clients: new Set() };
      for (const owner of this.service.holders.holders.get(pid) ?? []) {
        const r = owned(owner);
        r.plans += 1;
        r.plan_bytes += plan.bytes ?? 0;
      }
      planRows.push({ plan: pid, name: plan.name, bytes: plan.bytes ?? 0, runs: p.runs, failed: p.failed });
    }
    const now = Date.now();
    const owners = this.service.owners;
    const conns = new Map(); // owner -> its connections
    for (const conn of this.byClient.keys()) {
      const owner = owners.liveOwner(conn);
      if (owner === null) continue; // freed (--idle-ttl)
      if (!conns.has(owner)) conns.set(owner, []);
      conns.get(owner).push(conn);
    }
    // a connection's row shows what its owner holds (a client reconnecting acts for the same owner)
    for (const [owner, cs] of conns) for (const c of cs) Object.assign(row(c), held.get(owner) ?? {});
    const clients = [...this.byClient.keys()].sort().map((client) => {
      const c = this.byClient.get(client);
      return { client, name: c.name, requests: c.requests, refused: c.refused, idle_s: (now - c.last) / 1e3, ...row(client) };
    });
    const spent = this.service.releaser.spent();
    const ownerRows = owners.idle().sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([owner, idle]) => {
      const [releases, epsilon] = spent.get(owner) ?? [0, null];
      const cs = conns.get(owner) ?? [];
      return {
        owner: ownerLabel(owner),
        name: cs.length ? this.byClient.get(cs[0]).name : "",
        connections: cs,
        idle_s: idle,
        last_seen: now / 1e3 - idle,
        ...(held.get(owner) ?? { tensors: 0, tensor_bytes: 0, plans: 0, plan_bytes: 0 }),
        releases,
        epsilon,
        delta: epsilon === null ? null : (this.service.releaser.policy?.delta ?? 1e-5),
      };
    });
    const sorted = this.durations.slice(-DURATIONS_KEPT).sort((a, b) => a - b);
    const pct = (q) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))] : 0);
    return {
      uptime_s: (now - this.started) / 1e3,
      clients,
      clients_folded: this.folded,
      owners: ownerRows,
      own_data: row(WORKER),
      plans: planRows,
      requests: Object.fromEntries(this.byType),
      runs: this.runCount,
      runs_failed: this.runsFailed,
      run_p50_ms: pct(0.5) * 1e3,
      run_p99_ms: pct(0.99) * 1e3,
      private_releases: this.privateReleases,
      device_copies: { ...(this.service.lane?.counts ?? {}) }, // the direct lane's counts, under the Python worker's key
    };
  }

  text() {
    const out = [];
    const family = (name, type, help, samples) => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, ...samples);
    };
    const reqs = [...this.requests].map(([k, n]) => {
      const [type, code] = k.split("\0");
      return `planwire_requests_total{type="${label(type)}",code="${label(code)}"} ${num(n)}`;
    });
    family("planwire_requests_total", "counter", "Requests answered, by type and error code ('' = success)", reqs);
    const runs = (field) =>
      [...this.runs].map(([k, r]) => {
        const [plan, id] = k.split("\0");
        return `{plan="${label(plan)}",plan_id="${label(id)}"} ${num(r[field])}`;
      });
    family("planwire_runs_total", "counter", "Plan runs, by plan", runs("runs").map((s) => "planwire_runs_total" + s));
    family("planwire_runs_failed_total", "counter", "Plan runs refused or failed, by plan", runs("failed").map((s) => "planwire_runs_failed_total" + s));
    const hist = RUN_BUCKETS.map((b, i) => `planwire_run_duration_seconds_bucket{le="${b}"} ${num(this.buckets[i])}`); // cumulative
    hist.push(`planwire_run_duration_seconds_bucket{le="+Inf"} ${num(this.count)}`);
    hist.push(`planwire_run_duration_seconds_count ${num(this.count)}`, `planwire_run_duration_seconds_sum ${this.sum}`);
    family("planwire_run_duration_seconds", "histogram", "Time to answer a run request", hist);
    family("planwire_private_releases_total", "counter", "Tensors of the worker's own data sent to a client (get)", [
      `planwire_private_releases_total ${num(this.privateReleases)}`,
    ]);
    const { store, plans } = this.service;
    let bytes = 0;
    for (const [, e] of store.entries()) bytes += e.tensor.nbytes;
    let planBytes = 0;
    for (const p of plans.values()) planBytes += p.bytes ?? 0;
    const gauge = (name, help, value) => family(name, "gauge", help, [`${name} ${num(value)}`]);
    gauge("planwire_tensors", "Tensors stored (the worker's own included)", store.size);
    gauge("planwire_tensor_bytes", "Bytes of tensors stored", bytes);
    gauge("planwire_plans", "Plans registered", plans.size);
    gauge("planwire_plan_bytes", "Bytes of registered plans", planBytes);
    gauge("planwire_clients", "Clients seen since start", this.byClient.size + this.folded); // folded rows were clients seen too
    return out.join("\n") + "\n";
  }

  /** Serve /metrics on host:port; resolves with the bound port (0: any free). */
  serve(host, port) {
    const server = http.createServer((req, res) => {
      if (req.method !== "GET" || !/^\/metrics(\?|$)/.test(req.url ?? "")) {
        res.writeHead(404, { "Content-Type": "text/plain; charset=utf-8" }).end("only /metrics here\n");
        return;
      }
      res.writeHead(200, { "Content-Type": "text/plain; version=0.0.4; charset=utf-8" }).end(this.text());
    });
    this.server = server;
    return new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, host, () => resolve(server.address().port));
    });
  }

  close() {
    this.server?.close();
  }
}
