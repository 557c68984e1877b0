// Privacy accounting of released updates: the Gaussian mechanism's Rényi DP, composed per client, and
// its (epsilon, delta) bound, computed exactly as the Python worker's dp-accounting RdpAccountant does
// (GaussianDpEvent without sampling; rdp_privacy_accountant.compute_epsilon), so both workers report
// the same epsilon for the same releases. tests/test_node_trust.py checks it against dp-accounting.

import { randomBytes } from "node:crypto";

/** dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS */
export const ORDERS = [
  ...Array.from({ length: 99 }, (_, x) => 1 + (x + 1) / 10),
  ...Array.from({ length: 53 }, (_, x) => 11 + x),
  128,
  256,
  512,
  1024,
];

/** The RDP of Gaussian releases, composed; `epsilon(delta)` converts it. */
export class RdpAccountant {
  constructor() {
    this.rdp = ORDERS.map(() => 0);
  }

  /** `count` releases of the Gaussian mechanism with this noise multiplier (std / L2 sensitivity). */
  composeGaussian(noiseMultiplier, count = 1) {
    // q = 1: alpha / (2 sigma^2) at each order (infinite without noise)
    this.rdp = this.rdp.map((r, i) => r + count * (noiseMultiplier === 0 ? Infinity : ORDERS[i] / (2 * noiseMultiplier ** 2)));
  }

  /** The smallest epsilon over the orders (Proposition 12 of arXiv:2004.00010, as dp-accounting). */
  epsilon(delta) {
    let best = Infinity;
    ORDERS.forEach((a, i) => {
      const r = this.rdp[i];
      let eps;
      if (r < 0) eps = 0;
      else if (delta ** 2 + Math.expm1(-r) > 0) eps = 0;
      else if (a > 1.01) eps = r + Math.log1p(-1 / a) - Math.log(delta * a) / (a - 1);
      else eps = Infinity;
      if (eps < best) best = eps;
    });
    return Math.max(0, best);
  }
}

/** The epsilon (at `delta`) of `events` (Map noise multiplier -> count) of the Gaussian mechanism composed. */
export function epsilonOf(events, delta) {
  const acc = new RdpAccountant();
  for (const [noise, count] of [...events].sort((a, b) => a[0] - b[0])) acc.composeGaussian(noise, count);
  return acc.epsilon(delta);
}

/** Release counts `a` + `b` - `minus` (Maps noise multiplier -> count; `minus` optional), as a new Map
 * without zero counts: how a running total of every client's releases follows one client's change. */
export function plus(a, b, minus = undefined) {
  const out = new Map(a);
  for (const [n, c] of b) out.set(n, (out.get(n) ?? 0) + c);
  for (const [n, c] of minus ?? []) out.set(n, (out.get(n) ?? 0) - c);
  for (const [n, c] of out) if (c === 0) out.delete(n);
  return out;
}

/** Standard normal samples (Box-Muller over a cryptographic source: noise a client cannot predict). */
export function gaussian(n) {
  const out = new Float64Array(n);
  const chunk = 8192;
  for (let i = 0; i < n; i += chunk) {
    const m = Math.min(chunk, n - i);
    const pairs = Math.ceil(m / 2);
    const raw = randomBytes(pairs * 2 * 4);
    for (let p = 0; p < pairs; p++) {
      // u1 in (0, 1], u2 in [0, 1)
      const u1 = (raw.readUInt32LE(8 * p) + 1) / 4294967296;
      const u2 = raw.readUInt32LE(8 * p + 4) / 4294967296;
      const rad = Math.sqrt(-2 * Math.log(u1));
      const k = i + 2 * p;
      out[k] = rad * Math.cos(2 * Math.PI * u2);
      if (2 * p + 1 < m) out[k + 1] = rad * Math.sin(2 * Math.PI * u2);
    }
  }
  return out;
}
