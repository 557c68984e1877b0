// The worker's own data from --data FILE[:TAG,...]: .npy and .npz files of numeric arrays, read without
// ever loading Python objects (no Python object serialization); big-endian and Fortran-order arrays are stored little-endian,
// C order (as the Python plan-worker does).

import { readFileSync, statSync } from "node:fs";
import { basename, extname } from "node:path";
import AdmZip from "adm-zip";
import { Tensor, DTYPES, humanList } from "./codec.js";
import { pyRepr } from "./json.js";

const MAGIC = Buffer.from([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]); // \x93NUMPY
const EXPECTED = "expected a .npy or .npz file of numeric arrays (numpy.save / numpy.savez)";
// numpy descr (without byte order) -> wire dtype
const DESCR = { f4: "float", f8: "double", f2: "float16", i8: "int64", i4: "int32", i2: "int16", i1: "int8", u1: "uint8", u2: "uint16", u4: "uint32", u8: "uint64", b1: "bool" };
const NUMPY_NAME = { f4: "float32", f8: "float64", f2: "float16", c8: "complex64", c16: "complex128", f16: "float128", U: "str", S: "bytes", V: "void", M8: "datetime64", m8: "timedelta64" };

export class DataError extends Error {}

class NotNumpy extends Error {
  constructor(objects = false) {
    super(objects ? "objects" : "not numpy");
    this.objects = objects;
  }
}

/** [wire dtype, shape, bytes (little-endian, C order)] of one .npy image; NotNumpy when it is not one. */
function readNpy(buf, key) {
  if (buf.length < 10 || !buf.subarray(0, 6).equals(MAGIC)) throw new NotNumpy();
  const major = buf[6];
  let hlen, start;
  if (major === 1) (hlen = buf.readUInt16LE(8)), (start = 10);
  else if (major === 2 || major === 3) {
    if (buf.length < 12) throw new NotNumpy();
    (hlen = buf.readUInt32LE(8)), (start = 12);
  } else throw new NotNumpy();
  if (start + hlen > buf.length) throw new NotNumpy();
  const header = buf.toString(major === 3 ? "utf8" : "latin1", start, start + hlen);
  const descr = /'descr'\s*:\s*'([^']*)'/.exec(header);
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(header);
  const shapeText = /'shape'\s*:\s*\(([^)]*)\)/.exec(header);
  if (!descr) {
    if (/'descr'\s*:\s*\[/.test(header)) throw new DataError(`own tensor ${pyRepr(key)}: unsupported tensor dtype (a structured array); supported: ${humanList()}`);
    throw new NotNumpy();
  }
  if (!fortran || !shapeText) throw new NotNumpy();
  const d = descr[1];
  if (d.endsWith("O")) throw new NotNumpy(true);
  const order = d[0];
  const kind = /^[<>|=]/.test(d) ? d.slice(1) : d;
  const wire = DESCR[kind];
  if (wire === undefined) {
    const name = NUMPY_NAME[kind] ?? NUMPY_NAME[kind.replace(/\d+$/, "")] ?? kind;
    throw new DataError(`own tensor ${pyRepr(key)}: unsupported tensor dtype ${name}; supported: ${humanList()}`);
  }
  const shape = shapeText[1].split(",").map((s) => s.trim()).filter(Boolean).map((s) => {
    if (!/^\d+$/.test(s)) throw new NotNumpy();
    return Number(s);
  });
  const size = DTYPES[wire].size;
  const count = shape.reduce((a, b) => a * b, 1);
  const offset = start + hlen;
  if (buf.length - offset < count * size) throw new NotNumpy();
  let data = Buffer.from(buf.subarray(offset, offset + count * size)); // owned, aligned copy
  if (order === ">" && size > 1) {
    if (size === 2) data.swap16();
    else if (size === 4) data.swap32();
    else data.swap64();
  }
  if (fortran[1] === "True" && shape.length > 1) data = toCOrder(data, shape, size);
  if (wire === "bool") for (let i = 0; i < data.length; i++) data[i] = data[i] ? 1 : 0;
  return new Tensor(wire, shape, data);
}

function toCOrder(data, shape, size) {
  const n = shape.length;
  const out = Buffer.alloc(data.length);
  const fstride = [];
  let s = 1;
  for (let i = 0; i < n; i++) (fstride[i] = s), (s *= shape[i]);
  const idx = new Array(n).fill(0);
  const count = data.length / size;
  for (let c = 0; c < count; c++) {
    let f = 0;
    for (let i = 0; i < n; i++) f += idx[i] * fstride[i];
    data.copy(out, c * size, f * size, f * size + size);
    for (let i = n - 1; i >= 0; i--) {
      if (++idx[i] < shape[i]) break;
      idx[i] = 0;
    }
  }
  return out;
}

/** [[key, Tensor, tags], ...] of one --data FILE[:TAG,...]. DataError says what is wrong. */
export function loadData(spec) {
  const colon = spec.indexOf(":");
  const path = colon < 0 ? spec : spec.slice(0, colon);
  const tags = colon < 0 ? [] : spec.slice(colon + 1).split(",").filter(Boolean);
  let isFile = false;
  try {
    isFile = statSync(path).isFile();
  } catch {}
  if (!isFile) throw new DataError(`--data ${pyRepr(spec)}: no such file ${pyRepr(path)}`);
  let buf;
  try {
    buf = readFileSync(path);
  } catch (e) {
    throw new DataError(`--data ${pyRepr(path)}: cannot read it (${e.message})`);
  }
  const name = basename(path);
  const notPlain = (objects) =>
    new DataError(`--data ${pyRepr(path)}: not a plain numpy file${objects ? ": it holds Python objects, which a worker never loads" : ""}; ${EXPECTED}`);
  try {
    if (buf.subarray(0, 4).equals(Buffer.from("PK\x03\x04", "latin1"))) {
      let entries;
      try {
        entries = new AdmZip(buf).getEntries();
      } catch {
        throw new NotNumpy();
      }
      const out = [];
      for (const entry of entries) {
        if (entry.isDirectory) continue;
        const key = entry.entryName.endsWith(".npy") ? entry.entryName.slice(0, -4) : entry.entryName;
        let data;
        try {
          data = entry.getData();
        } catch {
          throw new NotNumpy();
        }
        out.push([`data:${name}:${key}`, readNpy(data, `data:${name}:${key}`), [key, ...tags]]);
      }
      return out;
    }
    const stem = basename(path, extname(path));
    return [[`data:${name}`, readNpy(buf, `data:${name}`), tags.length ? tags : [stem]]];
  } catch (e) {
    if (e instanceof NotNumpy) throw notPlain(e.objects);
    throw e;
  }
}
