"""schemas/ is the language-neutral contract: it must equal what the code generates, be valid JSON Schema,
accept every message real clients and workers send, and refuse exactly the headers the worker refuses."""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from planwire.transport import ForbiddenError, RemoteError, RemoteWorker, UnknownTensorError, dtypes
from planwire.transport import messages as m
from planwire.transport.arrays import set_tags
from planwire.transport.framing import SIGNATURE
from planwire.transport.schemagen import differences, schemas
from planwire.worker import Service, VirtualWorker
from planwire.worker.process import WorkerProcess
from tests import handmade

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
REQUEST_TYPES = [m.type_name(c) for c in m.REQUESTS]
REPLY_TYPES = [m.type_name(c) for c in m.REPLIES]
SHAPE_CODES = {"bad_header", "unknown_type", "invalid_message"}  # "the header does not match its schema"
REGENERATE = "run `python -m planwire.transport.schemagen schemas` and commit the result"


def load(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


VALIDATORS = {n: jsonschema.Draft202012Validator(load(f"{n}.json")) for n in REQUEST_TYPES + REPLY_TYPES}


def schema_errors(header: Any, kinds: list[str]) -> list[str]:
    """Why a decoded header is not a valid message of one of ``kinds`` (empty when it is)."""
    if not isinstance(header, dict):
        return [f"not an object: {type(header).__name__}"]
    kind = header.get("type")
    if not isinstance(kind, str) or kind not in kinds:
        return [f"no schema for type {kind!r}"]
    return [e.message for e in VALIDATORS[kind].iter_errors(header)]


# -- (a) and (b): the files ------------------------------------------------------------------------------


def test_checked_in_schemas_are_what_the_code_generates():
    generated = schemas()
    on_disk = {p.name for p in SCHEMAS.glob("*.json")}
    assert on_disk == set(generated), f"schemas/ has {sorted(on_disk ^ set(generated))} out of sync: {REGENERATE}"
    for name, schema in generated.items():
        diff = differences(load(name), schema)
        assert not diff, f"schemas/{name} differs from the code at:\n  " + "\n  ".join(diff) + f"\n{REGENERATE}"


def test_drift_check_ignores_docstring_layout_and_names_what_differs():
    run = schemas()["run.json"]
    rewrapped = copy.deepcopy(run)
    rewrapped["description"] = "\n    ".join(run["description"].split())
    assert differences(run, rewrapped) == []
    changed = copy.deepcopy(run)
    changed["properties"]["inline_max"]["minimum"] = 7
    changed["properties"].pop("fetch")
    changed["description"] += " More."
    diff = differences(run, changed)
    assert diff[1:] == [
        "properties.fetch: only in the checked-in file",
        "properties.inline_max.minimum: checked in 0, generated 7",
    ]
    assert diff[0].startswith("description: checked in ") and diff[0].endswith(' More."')


@pytest.mark.parametrize("name", sorted(p.name for p in SCHEMAS.glob("*.json")))
def test_every_schema_is_valid_draft_2020_12(name):
    schema = load(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith(f"/v{m.PROTOCOL_VERSION}/{name}")
    assert schema["properties"]["type"] == {"enum": [name.removesuffix(".json")]}
    assert schema["additionalProperties"] is False


def test_one_schema_per_message_and_the_dtype_enum_is_the_codec_table():
    assert sorted(p.stem for p in SCHEMAS.glob("*.json")) == sorted(REQUEST_TYPES + REPLY_TYPES)
    enum = load("put.json")["$defs"]["PutTensor"]["properties"]["dtype"]["enum"]
    assert sorted(enum) == sorted(dtypes.WIRE_TO_NUMPY)


def test_protocol_document_names_every_message_and_error_code():
    doc = (SCHEMAS / "PROTOCOL.md").read_text()
    for kind in REQUEST_TYPES + REPLY_TYPES:
        assert f"### `{kind}`" in doc or f"`{kind}`" in doc, kind
    for code in load("error.json")["properties"]["code"]["enum"]:
        assert f"| `{code}` |" in doc, f"error code {code} missing from the table in PROTOCOL.md"
    for wire in dtypes.WIRE_TO_NUMPY:
        assert f"| `{wire}` |" in doc, f"dtype {wire} missing from the table in PROTOCOL.md"


# -- (c): real traffic --------------------------------------------------------------------------------------


def record(w: Any) -> Any:
    """Keep a copy of every message ``w``'s connection sends and receives (its hello again, recorded)."""
    w.sent, w.received = [], []
    conn = w.connection
    send, recv = conn._send, conn._recv

    def sending(frames: list) -> None:
        w.sent.append([bytes(f) for f in frames])
        send(frames)

    def receiving(timeout: float | None) -> list | None:
        frames = recv(timeout)
        if frames is not None:
            w.received.append([bytes(f) for f in frames])
        return frames

    conn._send, conn._recv = sending, receiving
    w.hello()
    return w


OWN = np.array([[1.0, -2.0], [3.0, 4.0]], np.float32)


class Tagged(np.ndarray):
    """A numpy array that can carry tags (plain ndarrays take no attributes)."""


@pytest.fixture(params=["virtual", "tcp"])
def recorder(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "virtual":
        w = record(VirtualWorker(None, id="schemas", data=(set_tags(OWN.copy().view(Tagged), ["own"]),)))
        yield w
        return
    np.save(tmp_path / "own.npy", OWN)
    with WorkerProcess("schemas", data=[f"{tmp_path / 'own.npy'}:own"]) as proc:
        w = record(RemoteWorker(proc.url, timeout=10))
        yield w
        w.close()


def realistic_session(w: Any) -> None:
    """Every request type, through the real client API where it has one, and the usual errors."""
    w.ping()
    x = w.put(np.arange(6, dtype=np.float32).reshape(3, 2), tags=["x", "schemas"])
    flags = w.put(np.array([True, False]))
    scalar = w.put(np.float64(3.5))
    empty = w.put(np.zeros((0, 2), np.float32))  # a zero-length frame
    assert [p.key for p in w.search("schemas")] == [x.key]
    assert {scalar.key, empty.key} <= {p.key for p in w.search()}
    assert [i.shape for i in w.describe(x, flags)] == [[3, 2], [2]]
    assert w.fetch(flags, keep=True).tolist() == [True, False]  # get, keep
    assert w.fetch(flags).tolist() == [True, False]  # get, move
    sum_diff = handmade.sum_and_diff().variants[0]
    w.ensure_plan(sum_diff, "sum_and_diff")
    again, _ = w.request(lambda rid: m.RegisterPlan(id=rid, name="again"), [sum_diff.data])  # twice: a no-op
    assert again.plan == sum_diff.id
    has, _ = w.request(lambda rid: m.HasPlan(id=rid, plan=sum_diff.id))
    missing, _ = w.request(lambda rid: m.HasPlan(id=rid, plan="0" * 64))
    assert isinstance(has, m.PlanInfo) and isinstance(missing, m.Missing)
    s, d = w.run(sum_diff, [x, np.ones((3, 2), np.float32)])  # a ref and an inline tensor, fire and forget
    s2, d2 = w.run(sum_diff, [x, x], fetch=[1, 0])  # with fetch: a tensors reply
    assert d2.value.tolist() == [[0, 0]] * 3 and s2.value.tolist() == (2 * np.arange(6).reshape(3, 2)).tolist()
    assert s.get().tolist() == (np.arange(6).reshape(3, 2) + 1).tolist()
    w.delete(d)
    w.delete(d)  # idempotent
    # error replies
    with pytest.raises(UnknownTensorError):
        w.fetch_arrays(["never-stored"])
    reshape = handmade.reshape_to_3().variants[0]
    w.ensure_plan(reshape, "reshape_to_3")
    (bad,) = w.run(reshape, [np.ones(4, np.float32)])  # fails on the worker: an error reply, dropped
    with pytest.raises(RemoteError, match="reshape_to_3") as failed:
        bad.get()
    assert failed.value.code == "run_failed"
    w.delete_plan(reshape.id)
    gone, _ = w.request(lambda rid: m.HasPlan(id=rid, plan=reshape.id))
    assert isinstance(gone, m.Missing)
    with pytest.raises(RemoteError, match="no run #1 ") as none:  # long answered: nothing to cancel
        w.request(lambda rid: m.Cancel(id=rid, run=1))
    assert none.value.code == "bad_argument"
    (own,) = w.search("own")
    with pytest.raises(ForbiddenError):
        own.get()
    w.flush()


def frames_ok(header: dict[str, Any], raw: list[bytes]) -> None:
    """Tensor descriptions point to frames of exactly dtype x shape bytes."""
    descs: list[dict] = []
    for t in header.get("tensors", []):
        if "frame" in t:
            descs.append(t)
    for a in header.get("args", []):
        if "tensor" in a:
            descs.append(a["tensor"])
    for t in descs:
        size = int(np.prod(t["shape"], dtype=np.int64)) * dtypes.to_numpy(t["dtype"]).itemsize
        assert len(raw[t["frame"]]) == size, (t, len(raw[t["frame"]]))


def test_real_traffic_validates_against_the_schemas(recorder):
    realistic_session(recorder)
    seen: Counter[str] = Counter()
    for direction, messages, kinds in (
        ("request", recorder.sent, REQUEST_TYPES),
        ("reply", recorder.received, REPLY_TYPES),
    ):
        for frames in messages:
            assert frames[0] == SIGNATURE
            header = json.loads(frames[1])
            errors = schema_errors(header, kinds)
            assert not errors, f"{direction} {header} does not match schemas/{header.get('type')}.json: {errors}"
            frames_ok(header, frames[2:])
            seen[header["type"]] += 1
    assert set(seen) == set(REQUEST_TYPES + REPLY_TYPES), (
        f"not exercised: {set(REQUEST_TYPES + REPLY_TYPES) - set(seen)}"
    )
    codes = {json.loads(f[1])["code"] for f in recorder.received if json.loads(f[1])["type"] == "error"}
    assert codes >= {"unknown_tensor", "run_failed", "forbidden"}


# -- negative checks: the schema refuses what the worker refuses ------------------------------------------


def ask(service: Service, header: bytes, frames: list[bytes] = ()) -> dict[str, Any]:
    reply = service.handle([SIGNATURE, header, *frames])
    decoded = json.loads(bytes(reply[1]))
    assert not schema_errors(decoded, REPLY_TYPES), decoded  # error replies are valid messages too
    return decoded


@pytest.fixture(scope="module")
def service() -> Service:
    s = Service("schemas", data=[("own", OWN, ["own"])], public=True)  # results of runs on it may be fetched
    s.handle(
        [
            SIGNATURE,
            json.dumps({"type": "register_plan", "id": 1}).encode(),
            handmade.sum_and_diff().variants[0].data,
        ]
    )
    return s


PLAN = handmade.sum_and_diff().variants[0].id
T = {"dtype": "float", "shape": [1, 2], "frame": 0}
FRAME = np.ones((1, 2), np.float32).tobytes()

INVALID: list[tuple[str, Any, str]] = [
    ("not JSON", b'{"type": "ping", "id": 1', "bad_header"),
    ("not UTF-8", b"\xff\xfe", "bad_header"),
    ("an array", [1, 2], "invalid_message"),
    ("a string", "ping", "invalid_message"),
    ("no type", {"id": 1}, "unknown_type"),
    ("unknown type", {"type": "launch", "id": 1}, "unknown_type"),
    ("type not a string", {"type": 3, "id": 1}, "unknown_type"),
    ("no id", {"type": "ping"}, "invalid_message"),
    ("negative id", {"type": "ping", "id": -1}, "invalid_message"),
    ("id too big", {"type": "ping", "id": 2**63}, "invalid_message"),
    ("id a bool", {"type": "ping", "id": True}, "invalid_message"),
    ("id a string", {"type": "ping", "id": "1"}, "invalid_message"),
    ("unknown field", {"type": "ping", "id": 1, "x": 0}, "invalid_message"),
    ("null", {"type": "get", "id": 1, "keys": None}, "invalid_message"),
    ("empty key", {"type": "get", "id": 1, "keys": [""]}, "invalid_message"),
    ("key too long", {"type": "delete", "id": 1, "keys": ["k" * 257]}, "invalid_message"),
    ("empty tag", {"type": "search", "id": 1, "tags": [""]}, "invalid_message"),
    ("keep not bool", {"type": "get", "id": 1, "keys": [], "keep": 1}, "invalid_message"),
    ("version a string", {"type": "hello", "id": 1, "version": "1"}, "invalid_message"),
    (
        "unknown dtype",
        {"type": "put", "id": 1, "tensors": [{"key": "k", **T, "dtype": "complex64"}]},
        "invalid_message",
    ),
    (
        "negative dim",
        {"type": "put", "id": 1, "tensors": [{"key": "k", **T, "shape": [-1, 2]}]},
        "invalid_message",
    ),
    (
        "dim too big",
        {"type": "put", "id": 1, "tensors": [{"key": "k", **T, "shape": [2**62 + 1]}]},
        "invalid_message",
    ),
    (
        "negative frame",
        {"type": "put", "id": 1, "tensors": [{"key": "k", **T, "frame": -1}]},
        "invalid_message",
    ),
    ("tensor without key", {"type": "put", "id": 1, "tensors": [T]}, "invalid_message"),
    (
        "tag not a string",
        {"type": "put", "id": 1, "tensors": [{"key": "k", **T, "tags": [1]}]},
        "invalid_message",
    ),
    (
        "arg with both",
        {
            "type": "run",
            "id": 1,
            "plan": PLAN,
            "args": [{"ref": "own", "tensor": T}, {"ref": "own"}],
            "outputs": ["a", "b"],
        },
        "invalid_message",
    ),
    (
        "arg with neither",
        {"type": "run", "id": 1, "plan": PLAN, "args": [{}, {"ref": "own"}], "outputs": ["a", "b"]},
        "invalid_message",
    ),
    (
        "arg ref null",
        {"type": "run", "id": 1, "plan": PLAN, "args": [{"ref": None}, {"tensor": T}], "outputs": ["a", "b"]},
        "invalid_message",
    ),
    (
        "arg with an extra field",
        {
            "type": "run",
            "id": 1,
            "plan": PLAN,
            "args": [{"ref": "own", "x": 1}, {"tensor": T}],
            "outputs": ["a", "b"],
        },
        "invalid_message",
    ),
    (
        "repeated outputs",
        {"type": "run", "id": 1, "plan": PLAN, "args": [{"tensor": T}, {"tensor": T}], "outputs": ["a", "a"]},
        "invalid_message",
    ),
    (
        "negative fetch",
        {
            "type": "run",
            "id": 1,
            "plan": PLAN,
            "args": [{"tensor": T}, {"tensor": T}],
            "outputs": ["a", "b"],
            "fetch": [-1],
        },
        "invalid_message",
    ),
    ("plan not a string", {"type": "has_plan", "id": 1, "plan": 5}, "invalid_message"),
    ("a reply sent as a request", {"type": "ok", "re": 1, "session": "s"}, "unknown_type"),
]

VALID: list[tuple[str, dict[str, Any]]] = [
    ("hello", {"type": "hello", "id": 0}),
    ("id at the top of its range", {"type": "ping", "id": 2**63 - 1}),
    ("put", {"type": "put", "id": 1, "tensors": [{"key": "k" * 256, **T, "tags": ["t"]}]}),
    ("get nothing", {"type": "get", "id": 1, "keys": [], "keep": True}),
    ("search all", {"type": "search", "id": 1, "tags": []}),
    ("has_plan any string", {"type": "has_plan", "id": 1, "plan": ""}),
    (
        "run",
        {
            "type": "run",
            "id": 1,
            "plan": PLAN,
            "args": [{"ref": "own"}, {"tensor": T}],
            "outputs": ["a", "b"],
            "fetch": [1, 1],
        },
    ),
    (
        "run, type last",
        {"id": 1, "plan": PLAN, "args": [{"tensor": T}, {"tensor": T}], "outputs": ["a", "b"], "type": "run"},
    ),
]


def encode(header: Any) -> bytes:
    return header if isinstance(header, bytes) else json.dumps(header).encode()


@pytest.mark.parametrize("name,header,code", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_headers_fail_the_schema_and_the_worker_alike(service, name, header, code):
    decoded = json.loads(header) if isinstance(header, bytes) and code != "bad_header" else header
    if code != "bad_header":
        assert schema_errors(decoded, REQUEST_TYPES), f"{name}: the schema accepts {header}"
    reply = ask(service, encode(header), [FRAME])
    assert reply["type"] == "error" and reply["code"] == code, f"{name}: {reply}"


@pytest.mark.parametrize("name,header", VALID, ids=[c[0] for c in VALID])
def test_valid_headers_pass_the_schema_and_the_worker(service, name, header):
    assert not schema_errors(header, REQUEST_TYPES), name
    reply = ask(service, encode(header), [FRAME])
    assert reply["type"] != "error", reply


def _paths(node: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


def _mutations(header: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Headers one edit away from a valid one: every field removed, retyped, nulled, pushed out of range."""
    odd_values = [
        None,
        True,
        -1,
        2**63,
        1.5,
        "",
        "x" * 300,
        "float",
        [],
        ["x"],
        {},
        {"ref": "own"},
        0,
        "0" * 64,
    ]
    for path in _paths(header):
        if not path:
            continue
        parent = header
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict):
            removed = copy.deepcopy(header)
            target = removed
            for step in path[:-1]:
                target = target[step]
            del target[path[-1]]
            yield f"remove {path}", removed
        for value in odd_values:
            changed = copy.deepcopy(header)
            target = changed
            for step in path[:-1]:
                target = target[step]
            target[path[-1]] = value
            yield f"set {path} = {value!r:.20}", changed
    for where in list(_paths(header)):
        extra = copy.deepcopy(header)
        target = extra
        for step in where:
            target = target[step]
        if isinstance(target, dict):
            target["unexpected"] = 1
            yield f"add a field at {where}", extra


SEEDS = [header for _, header in VALID] + [
    {"type": "register_plan", "id": 3, "frame": 0, "name": "n"},
    {"type": "describe", "id": 4, "keys": ["own"]},
    {"type": "delete", "id": 5, "keys": ["nothing"]},
    {"type": "hello", "id": 6, "version": 1, "client": "c"},
]


@pytest.mark.parametrize("seed", SEEDS, ids=[s["type"] + str(i) for i, s in enumerate(SEEDS)])
def test_schema_and_worker_agree_on_every_one_edit_mutation(seed):
    """For headers one edit away from valid ones: the schema refuses a header exactly when the worker
    refuses it as malformed (bad_header, unknown_type, invalid_message); other refusals are about meaning."""
    service = Service("mutations", data=[("own", OWN, ["own"])])
    plan = handmade.sum_and_diff().variants[0].data
    disagreements = []
    count = 0
    for what, header in _mutations(seed):
        frames = [plan] if header.get("type") == "register_plan" else [FRAME, FRAME]
        schema_ok = not schema_errors(header, REQUEST_TYPES)
        reply = ask(service, encode(header), frames)
        worker_ok = not (reply["type"] == "error" and reply["code"] in SHAPE_CODES)
        if schema_ok != worker_ok:
            disagreements.append(f"{what}: schema {'accepts' if schema_ok else 'refuses'}, worker {reply}")
        count += 1
    assert count > 20
    assert not disagreements, "\n".join(disagreements)
