"""plan-worker as an operator meets it: --version, --help, `keys`, and every configuration mistake answered
by one line on stderr and exit status 2, before anything is bound. Real processes, real sockets."""

from __future__ import annotations

import os
import pickle
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import planwire
from planwire.worker.process import WorkerProcess

SCRIPT = str(Path(sys.executable).parent / "plan-worker")  # the installed console script
COMMANDS = {"script": [SCRIPT], "module": [sys.executable, "-m", "planwire.worker"]}
TCP = "tcp://127.0.0.1:0"


def cli(*args: str, how: str = "module", timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMANDS[how], *args], capture_output=True, text=True, timeout=timeout)


def refused(*args: str, how: str = "module") -> str:
    """Run a start that must fail; its one stderr line (exit status 2, no traceback)."""
    done = cli(*args, how=how)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "ready on" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("how", COMMANDS)
def test_version(how):
    done = cli("--version", how=how)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"plan-worker {planwire.__version__} (protocol 1, onnxruntime {ort.__version__})\n"


def test_help_shows_defaults_an_example_and_every_option_explained():
    done = cli("--help", how="script")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # argparse wraps lines at the terminal width
    for expected in (
        "largest message accepted (MiB) (default: 1024)",
        "onnxruntime intra-op threads per plan (default: 1)",
        "where plans run: cpu, cuda",  # --device has help
        "(default: cpu)",
        "example: plan-worker --listen tcp://0.0.0.0:5555",
        "plan-worker keys DIR",
        "plan-worker status ADDR",
    ):
        assert expected in text, expected
    assert "(default: None)" not in text  # only meaningful defaults are shown


@pytest.mark.parametrize("how", COMMANDS)
@pytest.mark.parametrize(
    ("listen", "line"),
    [
        ("5555", "plan-worker: --listen '5555': expected tcp://HOST:PORT or ipc://PATH (e.g. tcp://0.0.0.0:5555)"),
        (
            "foo://x",
            "plan-worker: --listen 'foo://x': expected tcp://HOST:PORT or ipc://PATH (e.g. tcp://0.0.0.0:5555)",
        ),
        (
            "tcp://127.0.0.1",
            "plan-worker: --listen 'tcp://127.0.0.1': expected tcp://HOST:PORT (e.g. tcp://0.0.0.0:5555)",
        ),
        (
            "tcp://192.0.2.1:5555",  # TEST-NET-1: never an address of this machine
            "plan-worker: cannot listen on 'tcp://192.0.2.1:5555': Cannot assign requested address "
            "(this machine has no such address: use one of its own, or 0.0.0.0 for all)",
        ),
        (
            "ipc:///nonexistent-dir/w.ipc",
            "plan-worker: cannot listen on 'ipc:///nonexistent-dir/w.ipc': No such file or directory for ipc path "
            '"/nonexistent-dir/w.ipc". (the directory of the ipc path does not exist)',
        ),
    ],
    ids=["bare-port", "scheme", "no-port", "foreign-address", "missing-dir"],
)
def test_bad_listen_is_one_line_and_status_2(listen, line, how):
    assert refused("--listen", listen, how=how) == line


def test_port_in_use_names_the_endpoint_and_what_to_do():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        assert refused("--listen", TCP, "--listen", f"tcp://127.0.0.1:{port}") == (
            f"plan-worker: cannot listen on 'tcp://127.0.0.1:{port}': Address already in use "
            "(another process holds this port: stop it or choose another port)"
        )
    finally:
        holder.close()


def test_ipc_path_of_a_live_worker_is_refused_and_that_worker_keeps_serving(tmp_path):
    url = f"ipc://{tmp_path}/w.ipc"
    with WorkerProcess("first", listen=url) as first:
        assert refused("--listen", url) == (
            f"plan-worker: --listen '{url}': a live process (another worker?) answers there: "
            "stop it or choose another path"
        )
        with planwire.connect(first.url, timeout=10) as c:
            assert c.id == "first"


def test_stale_ipc_socket_of_a_dead_worker_is_taken_over(tmp_path):
    path = tmp_path / "w.ipc"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # the file a killed worker leaves: a socket nobody listens on
    dead.close()
    assert stat.S_ISSOCK(path.stat().st_mode)
    with WorkerProcess("heir", listen=f"ipc://{path}") as w, planwire.connect(w.url, timeout=10) as c:
        assert c.id == "heir"
        assert "taking over a stale socket" in w.log()


def test_ipc_path_that_is_a_file_is_refused_and_kept(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    assert refused("--listen", f"ipc://{path}") == (
        f"plan-worker: --listen 'ipc://{path}': {path} exists and is not a socket: choose another path"
    )
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("flag", ["--max-message-mb", "--max-plan-mb", "--threads"])
@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_limits_must_be_positive(flag, value):
    shown = repr(value) if value == "lots" else value
    assert refused("--listen", TCP, flag, value) == (
        f"plan-worker: error: argument {flag}: must be a positive whole number, got {shown} (see plan-worker --help)"
    )


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """worker.key(_secret) and clients/alice.key, made with `plan-worker keys`."""
    d = tmp_path_factory.mktemp("keys")
    assert cli("keys", str(d), how="script").returncode == 0
    assert cli("keys", str(d / "clients"), "--name", "alice").returncode == 0
    (d / "clients" / "alice.key_secret").rename(d / "alice.key_secret")
    return d


def test_keys_command_makes_a_pair_and_never_overwrites(tmp_path):
    done = cli("keys", str(tmp_path / "k"), "--name", "bob", how="script")
    assert done.returncode == 0, done.stderr
    public, secret = tmp_path / "k" / "bob.key", tmp_path / "k" / "bob.key_secret"
    assert done.stdout.splitlines()[0] == f"public key {public}"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" in secret.read_text() and "secret-key" not in public.read_text()
    before = secret.read_bytes()
    again = cli("keys", str(tmp_path / "k"), "--name", "bob")
    assert again.returncode == 2
    assert again.stderr == f"plan-worker keys: {public} exists: keys are never overwritten (remove it or pick --name)\n"
    assert secret.read_bytes() == before


def test_half_a_curve_configuration_is_refused(keys):
    secret, clients = str(keys / "worker.key_secret"), str(keys / "clients")
    assert refused("--listen", TCP, "--curve-clients", clients) == (
        "plan-worker: --curve-clients needs --curve-secret (the worker's secret key): without it nothing is "
        "encrypted or authenticated"
    )
    assert refused("--listen", TCP, "--curve-secret", secret) == (
        "plan-worker: --curve-secret needs --curve-clients DIR (the client keys to admit), or --curve-any-client "
        "to encrypt without authenticating clients"
    )
    assert refused("--listen", TCP, "--curve-secret", secret, "--curve-clients", clients, "--curve-any-client") == (
        "plan-worker: --curve-clients and --curve-any-client contradict each other: choose one"
    )


def test_curve_any_client_must_be_explicit_and_then_encrypts(keys):
    extra = ["--curve-secret", str(keys / "worker.key_secret"), "--curve-any-client"]
    with WorkerProcess("open", extra=extra) as w:
        assert "curve any client" in w.log()


def test_bad_key_files_are_one_line(keys, tmp_path):
    clients = str(keys / "clients")
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text("not a key\n")
    missing = tmp_path / "missing.key_secret"
    public = keys / "worker.key"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refused("--listen", TCP, "--curve-secret", str(missing), "--curve-clients", clients) == (
        f"plan-worker: secret key file '{missing}': no such file (make keys with: plan-worker keys DIR)"
    )
    assert refused("--listen", TCP, "--curve-secret", str(tmp_path), "--curve-clients", clients) == (
        f"plan-worker: secret key file '{tmp_path}': is a directory, not a key file (NAME.key_secret from "
        "plan-worker keys)"
    )
    assert refused("--listen", TCP, "--curve-secret", str(garbage), "--curve-clients", clients) == (
        f"plan-worker: secret key file '{garbage}': not a zmq.auth certificate (No public key found in "
        f"{garbage}); make keys with: plan-worker keys DIR"
    )
    assert refused("--listen", TCP, "--curve-secret", str(public), "--curve-clients", clients) == (
        f"plan-worker: secret key file '{public}': holds no secret key (a .key file is public: use the .key_secret)"
    )
    assert refused(
        "--listen", TCP, "--curve-secret", str(keys / "worker.key_secret"), "--curve-clients", str(empty)
    ) == (
        f"plan-worker: --curve-clients '{empty}': holds no public keys (*.key): no client could connect; "
        "copy each client's .key file there"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key_file_is_one_line(keys, tmp_path):
    secret = tmp_path / "locked.key_secret"
    secret.write_bytes((keys / "worker.key_secret").read_bytes())
    secret.chmod(0)
    line = refused("--listen", TCP, "--curve-secret", str(secret), "--curve-clients", str(keys / "clients"))
    assert line == f"plan-worker: secret key file '{secret}': cannot read it (Permission denied)"


def test_data_that_is_not_numpy_says_what_is_expected(tmp_path):
    notes = tmp_path / "notes.log"
    notes.write_text("12:00 started\n")
    pickled = tmp_path / "evil.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    raw_pickle = tmp_path / "model.pkl"
    raw_pickle.write_bytes(pickle.dumps({"w": [1, 2]}))
    expected = "expected a .npy or .npz file of numeric arrays (numpy.save / numpy.savez)"
    for path, why in (
        (notes, ""),
        (raw_pickle, ""),
        (pickled, ": it holds Python objects, which a worker never loads"),
    ):
        done = cli("--listen", TCP, "--data", str(path))
        assert done.returncode == 2 and "allow_pickle" not in done.stderr, done.stderr
        assert done.stderr == f"plan-worker: --data '{path}': not a plain numpy file{why}; {expected}\n"


def test_metrics_and_admin_addresses_are_checked():
    assert refused("--listen", TCP, "--metrics", "9105") == (
        "plan-worker: --metrics '9105': expected HOST:PORT (e.g. 127.0.0.1:9105)"
    )
    assert refused("--listen", TCP, "--admin", "tcp://0.0.0.0:7000") == (
        "plan-worker: --admin 'tcp://0.0.0.0:7000': must be ipc://PATH or tcp://127.0.0.1:PORT "
        "(the operator's, not the network's)"
    )
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        assert refused("--listen", TCP, "--metrics", f"127.0.0.1:{port}") == (
            f"plan-worker: --metrics '127.0.0.1:{port}': cannot serve there (Address already in use)"
        )
    finally:
        holder.close()
