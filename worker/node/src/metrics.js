// Prometheus metrics of the Node worker (`--metrics HOST:PORT`), the same names, labels and buckets as the
// Python worker's (worker/metrics.py), in the text exposition format, served by node:http. Counted by the
// supervisor (src/supervisor.js) as replies are sent; holdings are read from the service when scraped.

import http from "node:http";

// Run time buckets (seconds): a tiny plan takes tens of microseconds, a training step seconds.
const RUN_BUCKETS = [1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

const label = (v) => String(v).replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
const num = (v) => (Number.isInteger(v) ? `${v}.0` : String(v));

export class Metrics {
  constructor(service) {
    this.service = service;
    this.requests = new Map(); // "type\0code" -> count
    this.runs = new Map(); // "plan\0plan_id" -> {runs, failed}
    this.buckets = RUN_BUCKETS.map(() => 0);
    this.count = 0;
    this.sum = 0;
    this.privateReleases = 0;
    this.clients = new Set();
  }

  /** One answered request: `msg` (null when it could not be read), its reply's error code ("" if none). */
  observe(msg, code, client, seconds) {
    const type = msg === null ? "invalid" : msg.type;
    const key = `${type}\0${code}`;
    this.requests.set(key, (this.requests.get(key) ?? 0) + 1);
    this.clients.add(client);
    if (msg === null) return;
    if (type === "run") {
      const plan = this.service.plans.get(msg.plan);
      const k = `${plan ? plan.name : "(unknown plan)"}\0${String(msg.plan).slice(0, 12)}`;
      const r = this.runs.get(k) ?? { runs: 0, failed: 0 };
      r.runs += 1;
      r.failed += code !== "";
      this.runs.set(k, r);
      this.count += 1;
      this.sum += seconds;
      RUN_BUCKETS.forEach((b, i) => seconds <= b && this.buckets[i]++);
    } else if (type === "get" && code === "") {
      for (const k of msg.keys) if (this.service.store.tensors.get(k)?.private) this.privateReleases += 1;
    }
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
    for (const e of store.tensors.values()) bytes += e.tensor.nbytes;
    let planBytes = 0;
    for (const p of plans.values()) planBytes += p.bytes ?? 0;
    const gauge = (name, help, value) => family(name, "gauge", help, [`${name} ${num(value)}`]);
    gauge("planwire_tensors", "Tensors stored (the worker's own included)", store.tensors.size);
    gauge("planwire_tensor_bytes", "Bytes of tensors stored", bytes);
    gauge("planwire_plans", "Plans registered", plans.size);
    gauge("planwire_plan_bytes", "Bytes of registered plans", planBytes);
    gauge("planwire_clients", "Clients seen since start", this.clients.size);
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
