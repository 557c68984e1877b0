// The state directory of `--state-dir DIR` (src/durable.js wires it into the worker), in the format of
// worker/statefiles.py, which PROTOCOL.md §11.1 specifies: a directory either worker wrote, the other reads.
//
// Every change goes through src/statecommit.js (worker/statecommit.py's `Writes`): written whole and renamed
// into place, one at a time or, grouped, as one commit before a burst's replies leave. One worker per
// directory: `flock` on DIR/lock, taken through util-linux's flock(1) on this process's descriptor (a lock
// belongs to the open file, so it is held until this process exits, kill -9 included), the same lock the
// Python worker takes. Reading it back at start, as hostile input: src/stateread.js.

import * as fs from "node:fs";
import { join, resolve } from "node:path";
import { ProtocolError } from "./messages.js";
import { pyRepr } from "./json.js";
import { log } from "./log.js";
import { FORMAT, strerror, StateError, writeAtomic, framed, digest, Names, flock, mkdirs, alive, ALIGN } from "./statefile.js";
import { Writes, refusal } from "./statecommit.js";
import { StateReader } from "./stateread.js";

export const DISK_RESERVE = 64 << 20; // bytes a put or run must leave free on the directory's file system
const C = fs.constants;

export { strerror, StateError, writeAtomic };

/** A state directory held by this worker: its writes here, its reading back in src/stateread.js. */
export class StateDir extends StateReader(Object) {
  /** Create (mode 0700) or open `path` and hold it; StateError naming the problem otherwise. */
  static open(path, { sync = true } = {}) {
    const p = resolve(path);
    let fd;
    try {
      mkdirs(p);
      if (!fs.statSync(p).isDirectory()) throw new StateError(`--state-dir ${pyRepr(p)} exists and is not a directory`);
      fd = fs.openSync(join(p, "lock"), C.O_RDWR | C.O_CREAT | C.O_NOFOLLOW, 0o600);
    } catch (e) {
      if (e instanceof StateError) throw e;
      if (e.code === "EEXIST" || e.code === "ENOTDIR") throw new StateError(`--state-dir ${pyRepr(p)} exists and is not a directory`);
      throw new StateError(`--state-dir ${pyRepr(p)}: cannot use it (${strerror(e)})`);
    }
    const held = flock(fd);
    const holder = () => {
      const buf = Buffer.alloc(32);
      const n = fs.readSync(fd, buf, 0, 32, 0);
      return buf.subarray(0, n).toString("latin1").trim();
    };
    if (held === null) {
      const pid = Number(holder());
      log.warning(`--state-dir ${p}: util-linux flock(1) cannot run here: the lock is the pid in ${join(p, "lock")}, checked for a live process`);
      if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && alive(pid)) {
        fs.closeSync(fd);
        refuse(p, String(pid));
      }
    } else if (!held) {
      const pid = holder() || "?";
      fs.closeSync(fd);
      refuse(p, pid);
    }
    fs.ftruncateSync(fd, 0);
    fs.writeSync(fd, `${process.pid}\n`, 0);
    for (const d of ["tensors", "plans"]) {
      try {
        fs.mkdirSync(join(p, d), { mode: 0o700 });
      } catch (e) {
        if (e.code !== "EEXIST") throw new StateError(`--state-dir ${pyRepr(p)}: cannot use it (${strerror(e)})`);
      }
    }
    if (fs.statSync(p).mode & 0o077) log.warning(`--state-dir ${p} is readable by others: it holds client data and identities (chmod 700)`);
    return new StateDir(p, fd, sync);
  }

  constructor(path, lockFd, sync) {
    super();
    this.path = path;
    this.sync = sync; // fsync each change (power-loss safe); without: safe against the worker's crash only
    this.lockFd = lockFd;
    this.tensors = join(path, "tensors");
    this.plans = join(path, "plans");
    this.names = new Names();
    this.skipped = [];
    this.writes = new Writes(path, sync); // every change goes through it: atomic, or staged for a group commit
  }

  close() {
    this.writes.close();
    if (this.lockFd >= 0) fs.closeSync(this.lockFd); // releases the flock
    this.lockFd = -1;
  }

  // -- group commit (src/statecommit.js, as worker/statecommit.py) -------------------------------------

  /** Writes are staged until commit() from now on (see Writes.group; `turn`: the server's end-of-turn step). */
  group(turn = null) {
    this.writes.group(turn);
  }

  get grouped() {
    return this.writes.grouped;
  }

  /** Whether a change waits for commit(). */
  get dirty() {
    return this.writes.dirty;
  }

  /** Every staged change made durable, or the worker exits (see Writes.commit). */
  commit() {
    this.writes.commit();
  }

  write(path, parts, what) {
    this.writes.write(path, parts, what);
  }

  // -- identities ------------------------------------------------------------------------------------

  saveTokens(byToken) {
    const tokens = Object.fromEntries([...byToken].map(([t, o]) => [t, this.names.name(o)]));
    this.write(join(this.path, "owners"), [JSON.stringify({ format: FORMAT, tokens })], "client identities");
  }

  // -- tensors ---------------------------------------------------------------------------------------

  ownerDir(owner) {
    return join(this.tensors, digest(this.names.name(owner)));
  }

  tensorPath(owner, key) {
    return join(this.ownerDir(owner), `${digest(key)}.t`);
  }

  /** Keep `owner`'s tensor (a codec Tensor whose bytes are on the host) and, for a private result, its
   * pending release `kept` ({plan, output, how, param, rows, base, released}: base and released Tensors
   * or null), whose arrays follow the tensor's bytes, each at the next multiple of 64 bytes. */
  saveTensor(owner, key, tensor, tags, isPrivate, rows, kept = null) {
    const h = { owner: this.names.name(owner), key };
    if (tensor.dtype !== "float") h.dtype = tensor.dtype;
    if (tensor.shape.length) h.shape = tensor.shape;
    if (tags.length) h.tags = [...tags];
    if (isPrivate) h.private = true;
    if (rows) h.rows = rows;
    const payload = [tensor.data];
    if (kept !== null) {
      const r = (h.release = { plan: kept.plan, output: kept.output, how: kept.how, rows: kept.rows });
      if (kept.param) r.param = kept.param;
      let at = tensor.nbytes;
      for (const name of ["base", "released"]) {
        const t = kept[name];
        if (t === null) continue;
        r[name] = { dtype: t.dtype, shape: t.shape };
        payload.push(Buffer.alloc((ALIGN - (at % ALIGN)) % ALIGN), t.data);
        at += ((ALIGN - (at % ALIGN)) % ALIGN) + t.nbytes;
      }
    }
    this.saveFile(owner, key, h, ...payload);
  }

  /** Keep the record of a failed run's output. */
  saveFailure(owner, key, why) {
    this.saveFile(owner, key, { owner: this.names.name(owner), key, failed: why }, Buffer.alloc(0));
  }

  saveFile(owner, key, header, ...payload) {
    const d = this.ownerDir(owner);
    try {
      fs.mkdirSync(d, { mode: 0o700 });
      this.writes.dirChanged(this.tensors);
    } catch (e) {
      if (e.code !== "EEXIST") throw refusal(`tensor ${pyRepr(key)}`, this.path, e);
    }
    this.write(join(d, `${digest(key)}.t`), [...framed(header), ...payload], `tensor ${pyRepr(key)}`);
  }

  removeTensors(owner, keys) {
    const d = this.ownerDir(owner);
    let removed = false;
    for (const key of keys) {
      const path = join(d, `${digest(key)}.t`);
      this.writes.unstage(path);
      try {
        fs.unlinkSync(path);
        removed = true;
      } catch (e) {
        // it would come back after a restart; the request itself went through
        if (e.code !== "ENOENT") log.error(`--state-dir: cannot remove tensor ${pyRepr(key)}'s file: ${strerror(e)}`);
      }
    }
    if (removed) this.writes.dirChanged(d);
  }

  removeOwner(owner) {
    const d = this.ownerDir(owner);
    for (const path of this.writes.stagedIn(d)) this.writes.unstage(path);
    this.writes.dirGone(d);
    if (!fs.existsSync(d)) return;
    fs.rmSync(d, { recursive: true, force: true });
    this.writes.dirChanged(this.tensors);
  }

  /** quota_exceeded when the directory's file system cannot take `nbytes` more (and a reserve). */
  checkRoom(nbytes, what) {
    if (nbytes <= 0) return;
    let free;
    try {
      const st = fs.statfsSync(this.path);
      free = st.bavail * st.bsize;
    } catch {
      return;
    }
    if (nbytes + DISK_RESERVE > free) {
      throw new ProtocolError(
        "quota_exceeded",
        `${what} needs ${Math.floor(nbytes / 2 ** 20)} MiB on disk, but the worker's --state-dir has ${Math.floor(free / 2 ** 20)} MiB free ` +
          `(less a reserve of ${DISK_RESERVE >> 20} MiB): get or delete tensors first, or give the worker more room`,
      );
    }
  }

  // -- privacy accounting ----------------------------------------------------------------------------

  /** Keep `spent` (Map owner -> Map(noise multiplier -> count)). */
  saveSpent(spent) {
    const doc = {};
    for (const [owner, counts] of spent) {
      if (counts.size) doc[this.names.name(owner)] = [...counts].sort((a, b) => a[0] - b[0]);
    }
    this.write(join(this.path, "privacy"), [JSON.stringify({ format: FORMAT, spent: doc })], "the privacy budget spent");
    if (this.grouped) this.commit(); // durable before the released value is even written (which a group may stage)
  }

  // -- plans -----------------------------------------------------------------------------------------

  /** Keep a plan's bytes, name and ports ({name, dtype, shape} each; a shape of unknown rank as []). */
  savePlan(pid, name, data, inputs, outputs) {
    const port = (p) => [p.name, p.dtype, p.shape ?? []];
    const header = { plan: pid, name, inputs: inputs.map(port), outputs: outputs.map(port) };
    this.write(join(this.plans, `${pid}.plan`), [...framed(header), data], `plan ${pyRepr(name)}`);
  }

  saveHolders(pid, holders) {
    const names = [...holders].map((o) => this.names.name(o)).sort();
    this.write(join(this.plans, `${pid}.holders`), [JSON.stringify({ format: FORMAT, holders: names })], `plan ${pid.slice(0, 12)}'s holders`);
  }

  removePlan(pid) {
    for (const suffix of [".holders", ".plan"]) {
      // holders first: a plan file alone is an unfinished registration
      this.writes.unstage(join(this.plans, pid + suffix));
      fs.rmSync(join(this.plans, pid + suffix), { force: true });
    }
    this.writes.dirChanged(this.plans);
  }
}

function refuse(p, pid) {
  throw new StateError(`--state-dir ${pyRepr(p)} is in use by another plan-worker (pid ${pid}): stop it, or give this worker a directory of its own`);
}
