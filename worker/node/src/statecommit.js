// Writes to a state directory (src/statedir.js), one at a time or as a group commit: worker/statecommit.py's
// `Writes`, in the same terms.
//
// Every change is written whole under a temporary name (`.tmp-NAME` beside it), fsynced, renamed over the
// old file, and its directory fsynced (`--state-sync none`: no fsyncs): a crash leaves the old file or the
// new one, never half of one. Grouped (group(), under the server: src/server.js), the temporary files of a
// burst of requests are written, then fsynced together (concurrently), renamed, and each changed directory
// fsynced once, before any of the burst's replies is sent.
//
// When the commit runs: a grouped Writes calls its `turn` hook when the first change of a burst is staged.
// src/server.js gives its own end-of-turn step as that hook (one setImmediate per turn of the event loop,
// which commits, then sends the turn's replies: the order is that step's code, not the order of two hooks).
// Without a hook (a directory used with no server, as in tests) the Writes commits at the end of the turn
// itself.

import * as fs from "node:fs";
import { dirname } from "node:path";
import { constants as OS } from "node:os";
import { Worker } from "node:worker_threads";
import { ProtocolError } from "./messages.js";
import { log } from "./log.js";
import { EXIT_NOT_DURABLE, strerror, STRERROR, fsyncDir, writeAtomic, writeTemp } from "./statefile.js";

const C = fs.constants;
const ERRNO = OS.errno;

export class Writes {
  /** The writes to the state directory at `root`: atomic each, or staged until commit(). */
  constructor(root, sync = true) {
    this.root = root;
    this.sync = sync; // fsync each change (power-loss safe); without: safe against the worker's crash only
    this.grouped = false; // group commit (see group()): writes are staged until commit()
    this.staged = new Map(); // path -> {tmp, fd}: its written, not yet synced temporary file
    this.dirs = new Set(); // directories changed since the last commit
    this.turn = null; // called when a burst's first change is staged: the loop's end-of-turn step commits
    this.scheduled = false; // this Writes' own end-of-turn commit is scheduled (no `turn` hook)
  }

  /** `parts` as the whole of `path`; a ProtocolError naming `what` when it cannot be written. */
  write(path, parts, what) {
    try {
      if (this.grouped) {
        this.unstage(path);
        this.staged.set(path, writeTemp(path, parts));
        this.changed();
      } else writeAtomic(path, parts, this.sync);
    } catch (e) {
      throw refusal(what, this.root, e);
    }
  }

  /** An entry of directory `path` was created or removed: fsync it (now, or with the group). */
  dirChanged(path) {
    if (this.grouped) {
      this.dirs.add(path);
      this.changed();
    } else if (this.sync) fsyncDir(path);
  }

  /** Directory `path` was removed whole: nothing left in it to fsync (its parent's change is recorded with
   * dirChanged). */
  dirGone(path) {
    this.dirs.delete(path);
  }

  /** The paths in directory `d` whose writes wait for the commit. */
  stagedIn(d) {
    return [...this.staged.keys()].filter((p) => dirname(p) === d);
  }

  /** Group commit, for a loop that holds its replies while `dirty` and calls commit() before it sends them
   * (src/server.js): from now on a write leaves its temporary file unsynced and unrenamed, a removal its
   * directory unsynced, until the next commit. `turn`: called when a change is staged on a clean Writes,
   * so that the loop's end-of-turn step (which commits) runs even when no reply waits for the change;
   * without it, this Writes commits at the end of the turn itself. Without fsyncs (`--state-sync none`)
   * there is nothing to group: writes go on as before. */
  group(turn = null) {
    this.grouped = this.sync;
    this.turn = turn;
  }

  /** Whether a change waits for commit(). */
  get dirty() {
    return this.staged.size > 0 || this.dirs.size > 0;
  }

  /** Make every staged change durable, in one round: fsync every staged file (concurrently, so that the file
   * system's journal commits them together), rename each over its name, fsync each changed directory once.
   * When that fails (EIO: the kernel may have dropped the pages it could not write) the worker exits at once
   * with 75, as the Python worker (and PostgreSQL) does: no reply may acknowledge what is not kept, and a
   * restart reads back what was acknowledged before. */
  commit() {
    try {
      this.commitNow();
    } catch (e) {
      log.error(`--state-dir ${this.root}: cannot make changes durable (${e.message}): the worker stops now`);
      process.exit(EXIT_NOT_DURABLE);
    }
  }

  commitNow() {
    const staged = this.staged;
    const dirs = this.dirs;
    this.staged = new Map();
    this.dirs = new Set();
    try {
      fsyncAll([...staged.values()].map((s) => s.fd));
    } finally {
      for (const { fd } of staged.values()) fs.closeSync(fd);
    }
    for (const [path, { tmp }] of staged) {
      fs.renameSync(tmp, path);
      dirs.add(dirname(path));
    }
    if (dirs.size <= 1) {
      for (const d of dirs) fsyncDir(d);
      return;
    }
    const fds = [];
    try {
      for (const d of dirs) fds.push(fs.openSync(d, C.O_RDONLY | C.O_DIRECTORY));
      fsyncAll(fds);
    } finally {
      for (const fd of fds) fs.closeSync(fd);
    }
  }

  /** A change was staged: the end of this turn of the event loop commits it (the loop's step, or our own). */
  changed() {
    if (this.turn !== null) return this.turn();
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      if (this.dirty) this.commit();
    });
  }

  /** Forget a staged write of `path` (it is being replaced or removed). */
  unstage(path) {
    const staged = this.staged.get(path);
    if (staged === undefined) return;
    this.staged.delete(path);
    fs.closeSync(staged.fd);
    try {
      fs.unlinkSync(staged.tmp);
    } catch {}
  }

  close() {
    if (!this.dirty) return;
    // what no reply acknowledged yet: kept if it can be, as a crash could have kept it
    try {
      this.commitNow();
    } catch (e) {
      log.error(`--state-dir: changes not acknowledged yet could not be written: ${strerror(e)}`);
    }
  }
}

/** The error of a request whose effect could not be made durable (nothing of it was kept in memory). */
export function refusal(what, path, e) {
  if (e instanceof ProtocolError) return e;
  if (e.code === "ENOSPC" || e.code === "EDQUOT") {
    return new ProtocolError("quota_exceeded", `${what} not kept: the worker's --state-dir ${path} is full (${strerror(e)})`);
  }
  log.error(`--state-dir ${path}: cannot write ${what}: ${strerror(e)}`);
  return new ProtocolError("internal", `${what} not kept: the worker cannot write its --state-dir (${strerror(e)})`);
}

// -- fsyncs made together (the group commit) ------------------------------------------------------------------

const FSYNC_THREADS = 4; // beside this one: the file system's journal commits concurrent fsyncs together
const SLOTS = 4096; // descriptors handed to the threads at once
const [GEN, COUNT, NEXT, DONE, ERROR, ACTIVE] = [0, 1, 2, 3, 4, 5];
const FDS = 8; // where the descriptors start in the shared array
// Each thread waits for a new generation, then fsyncs the descriptors it claims (`next`) until none is
// left, counting each one `done` (an error as its errno, the first one kept). Descriptors belong to the
// process: a thread fsyncs this thread's open files by number. A thread is `active` from its wake-up to its
// last claim: a round is set up only when none is, so no claim made in one round is read against the next.
const FSYNC_THREAD = `
const { workerData } = require("node:worker_threads");
const fs = require("node:fs");
const c = new Int32Array(workerData);
let gen = 0;
for (;;) {
  Atomics.wait(c, ${GEN}, gen);
  Atomics.add(c, ${ACTIVE}, 1);
  gen = Atomics.load(c, ${GEN});
  for (;;) {
    const i = Atomics.add(c, ${NEXT}, 1);
    if (i >= Atomics.load(c, ${COUNT})) {
      Atomics.sub(c, ${ACTIVE}, 1);
      Atomics.notify(c, ${ACTIVE});
      break;
    }
    try {
      fs.fsyncSync(c[${FDS} + i]);
    } catch (e) {
      Atomics.compareExchange(c, ${ERROR}, 0, -e.errno || 5);
    }
    Atomics.add(c, ${DONE}, 1);
    Atomics.notify(c, ${DONE});
  }
}`;
let pool = null; // the shared array, once its threads are started

/** fsync every descriptor of `fds`, concurrently (this thread and FSYNC_THREADS more, started at the
 * first call with more than one), returning when all are done: the first failure thrown as an Error with
 * its code, once all are done. Blocks this thread, as fs.fsyncSync does, but many files cost about one
 * journal commit instead of one each. */
export function fsyncAll(fds) {
  if (fds.length <= 1) {
    for (const fd of fds) fs.fsyncSync(fd);
    return;
  }
  if (pool === null) {
    const shared = new SharedArrayBuffer(4 * (FDS + SLOTS));
    for (let i = 0; i < FSYNC_THREADS; i++) new Worker(FSYNC_THREAD, { eval: true, workerData: shared }).unref();
    pool = new Int32Array(shared);
  }
  const c = pool;
  for (let at = 0; at < fds.length; at += SLOTS) {
    const part = fds.slice(at, at + SLOTS);
    c.set(part, FDS);
    // No thread of the last round may still be between a claim on NEXT and its reading of COUNT (it would
    // read this round's count for the last round's claim): wait until none is active. A thread waking up
    // meanwhile claims while NEXT is parked past any count (it finds nothing), or once NEXT is 0 a real slot.
    for (let a; (a = Atomics.load(c, ACTIVE)) > 0; ) Atomics.wait(c, ACTIVE, a);
    Atomics.store(c, NEXT, 1 << 30);
    for (const [i, v] of [[COUNT, part.length], [DONE, 0], [ERROR, 0], [NEXT, 0]]) Atomics.store(c, i, v);
    Atomics.add(c, GEN, 1);
    Atomics.notify(c, GEN);
    for (let i; (i = Atomics.add(c, NEXT, 1)) < part.length; Atomics.add(c, DONE, 1)) {
      try {
        fs.fsyncSync(part[i]);
      } catch (e) {
        Atomics.compareExchange(c, ERROR, 0, -e.errno || 5);
      }
    }
    for (let d; (d = Atomics.load(c, DONE)) < part.length; ) Atomics.wait(c, DONE, d);
    const errno = Atomics.load(c, ERROR);
    if (errno) {
      const code = Object.keys(ERRNO).find((k) => ERRNO[k] === errno) ?? "EIO";
      throw Object.assign(new Error(`${code}: ${STRERROR[code] ?? "fsync failed"}, fsync`), { code, errno: -errno, syscall: "fsync" });
    }
  }
}

