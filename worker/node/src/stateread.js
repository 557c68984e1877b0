// Reading a state directory back at start (as worker/stateread.py; src/statedir.js holds it and writes it; its
// format is src/statefile.js), as hostile input: every file is validated (its framing, its header, sizes,
// where it lies, a plan's hash and the plan checks of src/modelcheck.js), and one that fails is skipped with a
// log line naming it: never loaded, never fatal. A write a crash interrupted (a temporary file, a plan without
// its holders) was never acknowledged: it is removed. A mixin of src/statedir.js's StateDir (its path, names
// and writes).

import * as fs from "node:fs";
import { createHash } from "node:crypto";
import { join, basename, extname } from "node:path";
import { checkModel } from "./modelcheck.js";
import { pyRepr } from "./json.js";
import { log } from "./log.js";
import { FORMAT, SESSION_RE, OWNER_RE, writeAtomic, readFramed, digest } from "./statefile.js";
import { isObject, isString, tensorHeader, tensorPayload, planHeader, formatDoc, privacySpent } from "./statefile.js";

/** The reading half of a StateDir. */
export const StateReader = (Base) =>
  class extends Base {
    /** A file that failed a check: left alone, logged, counted (the restore's summary says how many). */
    skip(path, why) {
      this.skipped.push(path);
      log.error(`--state-dir: skipped ${path}: ${why}`);
    }

    /** The kept session, or `fresh` (then written) when there is none: [session, new]. */
    loadSession(fresh) {
      const path = join(this.path, "session");
      if (fs.existsSync(path)) {
        try {
          const session = formatDoc(path, "session");
          if (typeof session !== "string" || !SESSION_RE.test(session)) throw new Error(`format 1, session ${pyRepr(String(session).slice(0, 40))}`);
          return [session, false];
        } catch (e) {
          this.skip(path, `${e.message}; a new session starts (clients will register their plans again)`);
        }
      }
      writeAtomic(path, [JSON.stringify({ format: FORMAT, session: fresh })], this.sync);
      return [fresh, true];
    }

    /** The identities issued at hello: Map token -> owner. */
    loadTokens() {
      const path = join(this.path, "owners");
      if (!fs.existsSync(path)) return new Map();
      try {
        const tokens = formatDoc(path, "tokens");
        const ok = ([t, n]) => isString(t, 1, 256) && typeof n === "string" && OWNER_RE.test(n);
        if (!isObject(tokens) || !Object.entries(tokens).every(ok)) throw new Error("invalid `tokens`");
        return new Map(Object.entries(tokens).map(([t, n]) => [t, this.names.owner(n)]));
      } catch (e) {
        this.skip(path, `${e.message}; clients get new identities at their next hello`);
        return new Map();
      }
    }

    /** Every valid tensor file: {owner, key, header, tensor (null for a failed run's record)}. */
    *loadTensors() {
      for (const name of fs.readdirSync(this.tensors).sort()) {
        const d = join(this.tensors, name);
        if (!fs.lstatSync(d).isDirectory()) {
          this.skip(d, "not a directory of tensors");
          continue;
        }
        for (const file of fs.readdirSync(d).sort()) {
          const path = join(d, file);
          if (file.startsWith(".tmp-")) {
            this.unfinished(path); // a write that a crash interrupted: never acknowledged
            continue;
          }
          let item;
          try {
            item = this.loadTensor(name, file, path);
          } catch (e) {
            this.skip(path, e.message);
            continue;
          }
          yield item;
        }
      }
    }

    loadTensor(dirName, file, path) {
      if (!fs.lstatSync(path).isFile()) throw new Error("not a regular file");
      const [doc, payload] = readFramed(path);
      const h = tensorHeader(doc);
      if (dirName !== digest(h.owner) || file !== `${digest(h.key)}.t`) {
        throw new Error(`misplaced: its header names key ${pyRepr(h.key)} of another owner or file`);
      }
      const owner = this.names.owner(h.owner);
      if (h.failed !== null) {
        if (payload.length || h.release !== null) throw new Error("a failed run's record with a payload");
        return { owner, key: h.key, header: h, tensor: null, kept: null };
      }
      const [tensor, kept] = tensorPayload(h, payload);
      return { owner, key: h.key, header: h, tensor, kept };
    }

    /** The noised releases each owner was given: Map owner -> Map(noise multiplier -> count) (`privacy`);
     * Error (logged) when the file is damaged: never read as a clean slate. */
    loadSpent() {
      const path = join(this.path, "privacy");
      if (!fs.existsSync(path)) return new Map();
      let spent;
      try {
        spent = privacySpent(formatDoc(path, "spent"));
      } catch (e) {
        this.skip(path, `${e.message}; noised releases are refused until it is repaired (or removed, which resets every client's spent privacy budget)`);
        throw new Error(`the record of the privacy budget spent (${path}) is damaged: ${e.message}`);
      }
      return new Map([...spent].map(([name, counts]) => [this.names.owner(name), counts]));
    }

    /** Remove a write's temporary file; anything else under that name (a directory) is skipped, not fatal. */
    unfinished(path) {
      if (fs.lstatSync(path).isDirectory()) this.skip(path, "a directory where only a write's temporary file belongs");
      else fs.rmSync(path, { force: true });
    }

    /** Every valid plan: {pid, name, data, inputs, outputs, unknownRank, holders}. */
    *loadPlans(maxPlanBytes) {
      for (const file of fs.readdirSync(this.plans).sort()) {
        const path = join(this.plans, file);
        if (file.startsWith(".tmp-")) {
          this.unfinished(path);
          continue;
        }
        const stem = file.slice(0, file.length - extname(file).length);
        if (extname(file) === ".holders") {
          if (!fs.existsSync(join(this.plans, `${stem}.plan`))) this.skip(path, "no plan file beside it");
          continue;
        }
        if (extname(file) !== ".plan") {
          this.skip(path, "not a plan file");
          continue;
        }
        const holders = join(this.plans, `${stem}.holders`);
        if (!fs.existsSync(holders)) {
          log.info(`--state-dir: removing ${path} (its registration did not finish)`); // never acknowledged
          fs.rmSync(path, { force: true });
          continue;
        }
        let item;
        try {
          item = this.loadPlan(path, stem, holders, maxPlanBytes);
        } catch (e) {
          this.skip(path, e.message);
          continue;
        }
        yield item;
      }
    }

    loadPlan(path, stem, holdersPath, maxPlanBytes) {
      if (!fs.lstatSync(path).isFile()) throw new Error("not a regular file");
      const [doc, data] = readFramed(path);
      if (data.length > maxPlanBytes) throw new Error(`a plan of ${data.length} bytes, over --max-plan-mb`);
      const h = planHeader(doc);
      const pid = createHash("sha256").update(data).digest("hex");
      if (pid !== h.plan || stem !== pid) throw new Error("its bytes do not match its plan id (corrupt, or not this plan's file)");
      const summary = checkModel(data, { maxBytes: maxPlanBytes });
      const holders = formatDoc(holdersPath, "holders");
      if (!Array.isArray(holders) || !holders.every((n) => typeof n === "string" && OWNER_RE.test(n))) throw new Error(`${basename(holdersPath)}: invalid \`holders\``);
      const port = ([name, dtype, shape]) => ({ name, dtype, shape });
      return {
        pid,
        name: h.name,
        data,
        inputs: h.inputs.map(port),
        outputs: h.outputs.map(port),
        unknownRank: summary.unknownRank,
        holders: holders.map((n) => this.names.owner(n)),
      };
    }
  };
