"""The code sandbox contains what LLM-written programs can do wrong or on purpose.

Every case runs in each containment mode this machine supports (the mode the sandbox
picks by itself is always among them), so the fallbacks are tested too. Every test is
bounded by short timeouts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from graphtune.envs import sandbox as sb
from graphtune.envs.sandbox import SandboxResult, run_python, sandbox_mode

IS_ROOT = os.geteuid() == 0


def _modes() -> list[str]:
    best = sandbox_mode()
    if best == "unavailable":
        return []
    order = ["kernel", "uid", "basic"]
    # never "basic" as root: the program would run as root, and kill(-1) would reach every process
    return [m for m in order[order.index(best):] if not (IS_ROOT and m == "basic")]


MODES = _modes()
pytestmark = pytest.mark.skipif(not MODES, reason=f"no sandbox can start here: {sb._setup_error}")


@pytest.fixture(params=MODES)
def run(request):
    """run(code, **limits) in one containment mode."""
    mode = request.param
    setup = sb._get_setup()
    if mode != setup.mode:
        for python in sb._python_candidates():  # the caller's interpreter may be closed to a fresh uid
            trial = sb._Setup(mode, python, cgroups=setup.cgroups)
            probe = sb._run(trial, "print('ok')", timeout_s=10, memory_mb=512, max_procs=8, file_mb=1,
                            max_output_bytes=100)
            if probe.ok:
                setup = trial
                break
        else:
            pytest.skip(f"mode {mode} does not work here: {probe.error or probe.stderr[-200:]}")

    def _run(code, *, timeout_s=5.0, memory_mb=512, max_procs=16, file_mb=4, max_output_bytes=100_000):
        return sb._run(setup, code, timeout_s=timeout_s, memory_mb=memory_mb, max_procs=max_procs,
                       file_mb=file_mb, max_output_bytes=max_output_bytes)

    _run.mode = mode
    return _run


def _sandbox_uids() -> dict[int, int]:
    """Live (non-zombie) processes per uid from the sandbox's range."""
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{name}").st_uid
            if sb._UID_LO <= uid < sb._UID_HI:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X"):
                        out[uid] = out.get(uid, 0) + 1
        except (OSError, IndexError):
            pass
    return out


def _live_sandbox_procs(uid: int | None = None) -> int:
    """Live processes of ``uid`` (a run's fresh uid), or of any sandbox uid. Runs print
    their uid so that sandboxes running at the same time elsewhere do not count."""
    counts = _sandbox_uids()
    return counts.get(uid, 0) if uid is not None else sum(counts.values())


def _first_uid(r: SandboxResult) -> int:
    return int(r.stdout.split()[0])


def test_public_entry_point_runs_code():
    r = run_python("print(6 * 7)", timeout_s=10)
    assert isinstance(r, SandboxResult)
    assert r.ok and r.error is None and r.stdout.strip() == "42"
    assert r.mode == sandbox_mode()


def test_output_exit_code_and_traceback(run):
    r = run("import sys\nprint('out'); print('err', file=sys.stderr)")
    assert r.ok and r.returncode == 0 and r.stdout == "out\n" and "err" in r.stderr
    r = run("x = 1\nraise ValueError('boom')")
    assert not r.ok and r.returncode == 1 and not r.timed_out and r.error is None
    assert "ValueError: boom" in r.stderr and "main.py" in r.stderr
    r = run("import sys; sys.exit(3)")
    assert r.returncode == 3 and not r.ok
    r = run("def f(:\n  pass")
    assert not r.ok and "SyntaxError" in r.stderr


def test_minimal_environment_and_scratch_dir(run, monkeypatch):
    monkeypatch.setenv("GRAPHTUNE_TEST_SECRET", "sk-should-not-leak")
    r = run("import os, json\nprint(json.dumps({'cwd': os.getcwd(), 'env': dict(os.environ), "
            "'home': os.path.expanduser('~')}))\nopen('scratch.txt', 'w').write('fine')\n"
            "print(open('scratch.txt').read())")
    assert r.ok, r.stderr
    import json
    info = json.loads(r.stdout.splitlines()[0])
    assert "sk-should-not-leak" not in r.stdout
    assert not any("KEY" in k or "SECRET" in k or "TOKEN" in k for k in info["env"])
    assert info["home"] == info["cwd"]
    assert r.stdout.splitlines()[1] == "fine"
    # the scratch folder is gone afterwards (in kernel mode it never existed on the host)
    if run.mode != "kernel":
        assert not os.path.exists(info["cwd"])


def test_stdin_is_empty(run):
    r = run("try:\n    input()\nexcept EOFError:\n    print('eof')")
    assert r.ok and r.stdout.strip() == "eof"


def test_infinite_loop_is_killed(run):
    t0 = time.monotonic()
    r = run("while True:\n    pass", timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert r.timed_out and not r.ok and r.error is None
    assert elapsed < 5


def test_sleeping_child_that_leaves_the_group_is_killed(run):
    if run.mode == "basic":
        pytest.skip("basic mode kills the process group only; a child that calls setsid() outlives the run")
    code = ("import os, time, subprocess, sys\nprint(os.getuid(), flush=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\n"
            "print('parent done')\n")
    r = run(code, timeout_s=5)
    assert r.ok and "parent done" in r.stdout
    if run.mode in ("kernel", "uid"):
        assert _live_sandbox_procs(_first_uid(r)) == 0


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run as a fresh uid (RLIMIT_NPROC is per uid)")
def test_fork_bomb_is_contained(run):
    if run.mode == "basic":
        pytest.skip("basic mode as root: RLIMIT_NPROC does not bind root")
    bomb = ("import os\nprint(os.getuid(), flush=True)\n"
            "while True:\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            "            os.setsid()  # try to leave the process group too\n"
            "    except OSError:\n"
            "        pass\n")
    t0 = time.monotonic()
    r = run(bomb, timeout_s=1.5, max_procs=12)
    assert time.monotonic() - t0 < 10
    assert r.timed_out and not r.ok and r.error is None
    assert _live_sandbox_procs(_first_uid(r)) == 0
    # the machine is fine: we can still fork and run another sandbox
    again = run("print('alive')", timeout_s=5)
    assert again.ok and again.stdout.strip() == "alive"


def test_memory_bomb_is_contained(run):
    t0 = time.monotonic()
    r = run("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))", memory_mb=256, timeout_s=10)
    assert not r.ok and not r.timed_out and r.error is None
    assert "MemoryError" in r.stderr
    assert time.monotonic() - t0 < 8
    r = run("x = bytearray(8 * 2**30)", memory_mb=256)
    assert not r.ok and "MemoryError" in r.stderr


def test_writing_outside_the_scratch_dir_is_prevented(run, tmp_path):
    # a world-writable host folder: an unsandboxed program of any uid could write here
    open_dir = tempfile.mkdtemp(prefix="graphtune-sbtest-", dir="/tmp")
    os.chmod(open_dir, 0o777)
    root_file = tmp_path / "precious.txt"
    root_file.write_text("keep")
    target = os.path.join(open_dir, "escaped.txt")
    code = f"""
import os, subprocess
results = []
for path in ({target!r}, {str(root_file)!r}, {str(tmp_path / 'new.txt')!r}):
    try:
        with open(path, 'w') as f:
            f.write('pwned')
        results.append('wrote')
    except OSError as e:
        results.append('refused')
try:  # a child process has no audit hook: the kernel must stop it (or spawning is refused)
    subprocess.run(['sh', '-c', 'echo pwned > {target}; echo pwned > {root_file}'], timeout=5)
except (OSError, subprocess.SubprocessError) as e:
    results.append('no-spawn')
try:
    os.remove({str(root_file)!r})
    results.append('removed')
except OSError:
    results.append('refused')
print(results)
"""
    try:
        r = run(code, timeout_s=10)
        assert r.error is None
        assert not os.path.exists(target), r.stdout + r.stderr
        assert root_file.read_text() == "keep"
        assert not (tmp_path / "new.txt").exists()
        assert "wrote" not in r.stdout and "removed" not in r.stdout
    finally:
        for name in os.listdir(open_dir):
            os.remove(os.path.join(open_dir, name))
        os.rmdir(open_dir)


def test_file_size_limit(run):
    r = run("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (8 * 2**20))", file_mb=1)
    assert not r.ok


def test_network_is_blocked(run):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    connect = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    code = f"""
import subprocess, sys
try:
{chr(10).join('    ' + ln for ln in connect.splitlines())}
except OSError as e:
    print('python:', type(e).__name__)
try:  # a fresh interpreter without the audit hook: only the network namespace stops it
    out = subprocess.run([sys.executable, '-I', '-c', {connect!r}], capture_output=True, text=True, timeout=5)
    print('child:', out.stdout.strip() or out.stderr.strip().splitlines()[-1])
except (OSError, subprocess.SubprocessError) as e:
    print('child: no-spawn', type(e).__name__)
"""
    try:
        r = run(code, timeout_s=10)
        assert r.error is None
        assert "connected" not in r.stdout, r.stdout
        assert "python:" in r.stdout
        with pytest.raises(OSError):  # socket.timeout: nothing ever connected
            conn, _ = listener.accept()
            conn.close()
    finally:
        listener.close()


def test_output_is_capped(run):
    r = run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 10000)", max_output_bytes=5000)
    assert r.ok and len(r.stdout) == 5000


def test_sandbox_that_cannot_start_is_an_error_not_a_failure(run):
    broken = sb._Setup(run.mode, "/nonexistent/python3")
    r = sb._run(broken, "print(1)", timeout_s=5, memory_mb=256, max_procs=8, file_mb=1, max_output_bytes=100)
    assert r.error and r.error.startswith("sandbox cannot start") and not r.ok


def test_unavailable_sandbox_reports_error(monkeypatch):
    monkeypatch.setattr(sb, "_get_setup", lambda: None)
    monkeypatch.setattr(sb, "_setup_error", "kernel with /x: denied")
    r = run_python("print(1)")
    assert not r.ok and r.error == "sandbox cannot start: kernel with /x: denied"


def test_concurrent_runs_are_independent():
    results: list[SandboxResult] = []

    def one(i):
        results.append(run_python(f"import os\nopen('f', 'w').write('{i}')\nprint(open('f').read(), os.getuid())",
                                  timeout_s=10))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4 and all(r.ok for r in results), [r.stderr for r in results]
    assert sorted(r.stdout.split()[0] for r in results) == ["0", "1", "2", "3"]
    if sandbox_mode() in ("kernel", "uid"):
        assert len({r.stdout.split()[1] for r in results}) == 4  # a fresh uid each


# ----------------------------------------------------------------------------- issue 10: escapes

FEATURES = sb.sandbox_features() if MODES else {}
needs_pidns = pytest.mark.skipif(not FEATURES.get("pid_namespace"),
                                 reason="needs root with namespaces (the sandbox's kernel mode)")
needs_root_fs = pytest.mark.skipif(not FEATURES.get("private_root"),
                                   reason="needs root with namespaces (the sandbox's private root)")
needs_cgroup = pytest.mark.skipif(not FEATURES.get("memory_cgroup"),
                                  reason="needs a memory cgroup the sandbox can create (root, cgroup v1 memory or v2)")


def test_stdin_and_report_channel_reach_the_program():
    code = "import os, sys\nos.write(3, b'got ' + sys.stdin.buffer.read())\nprint('done')"
    r = run_python(code, stdin=b"DATA", report=True, timeout_s=10)
    assert r.ok and r.report == "got DATA" and r.stdout.strip() == "done"
    assert run_python("import os\nos.write(3, b'x')", timeout_s=10).returncode != 0  # no fd 3 unless asked


@needs_pidns
def test_other_processes_command_lines_are_hidden():
    secret = "postgresql://app:s3cr3t-" + os.urandom(4).hex() + "@db/prod"
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", secret])
    try:
        code = ("import os\nseen = []\nfor p in os.listdir('/proc'):\n    if p.isdigit():\n"
                "        try:\n            seen.append(open(f'/proc/{p}/cmdline', 'rb').read().decode(errors='replace'))\n"
                "        except OSError:\n            pass\nprint(len(seen))\nprint('\\n'.join(seen))")
        r = sb.run_python(code, timeout_s=10)
        assert r.ok, r.stderr
        assert secret not in r.stdout and "s3cr3t" not in r.stdout
        assert int(r.stdout.splitlines()[0]) <= 2  # the program itself (and ls-like helpers), nothing else
    finally:
        host.kill()
        host.wait()


@needs_root_fs
def test_project_and_datasets_are_not_visible():
    here = os.path.abspath(sb.__file__)
    shared = os.path.join(os.path.dirname(os.path.dirname(here)), "..", "shared", "data")
    targets = [here, os.path.dirname(here), os.path.abspath(shared), "/home", "/work", "/var", "/run"]
    code = ("import os, json\nout = {}\nfor t in %r:\n    try:\n"
            "        out[t] = sorted(os.listdir(t))[:3] if os.path.isdir(t) else open(t).read(20)\n"
            "    except OSError as e:\n        out[t] = None\nprint(json.dumps(out))" % targets)
    r = sb.run_python(code, timeout_s=10)
    assert r.ok, r.stderr
    import json
    seen = json.loads(r.stdout)
    assert all(v is None for v in seen.values()), seen


@needs_root_fs
def test_host_unix_sockets_are_unreachable():
    import shutil
    sock_dir = tempfile.mkdtemp(prefix="graphtune-sbtest-", dir="/run" if os.path.isdir("/run") else None)
    os.chmod(sock_dir, 0o755)
    path = os.path.join(sock_dir, ".s.PGSQL.5432")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen(5)
    listener.settimeout(0.3)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(b"\0graphtune-sbtest-" + os.urandom(4).hex().encode())
    abstract.listen(5)
    abstract.settimeout(0.3)
    probe = ("import socket\nfor addr in (%r, %r):\n    s = socket.socket(socket.AF_UNIX)\n    try:\n"
             "        s.connect(addr)\n        print('connected', addr)\n    except OSError as e:\n"
             "        print('refused', type(e).__name__)\n" % (path, abstract.getsockname()))
    # from the program (its audit hook refuses connect) and from a fresh interpreter
    # without the hook: only the private root and the network namespace stop that one
    code = probe + ("import subprocess, sys\nprint(subprocess.run([sys.executable, '-I', '-c', %r], "
                    "capture_output=True, text=True, timeout=5).stdout)" % probe)
    try:
        r = sb.run_python(code, timeout_s=10)
        assert r.error is None and "connected" not in r.stdout, r.stdout
        for s in (listener, abstract):
            with pytest.raises(OSError):
                s.accept()
    finally:
        listener.close()
        abstract.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_memory_is_bounded_for_the_whole_run_not_per_process():
    # 4 children each holding 200 MB at once: 800 MB, over a 512 MB bound for the run
    code = """
import os, time
kids = []
for i in range(4):
    try:
        pid = os.fork()
    except OSError:
        print('no-fork', flush=True)
        continue
    if pid == 0:
        try:
            block = bytearray(b'x') * (200 * 2**20)
            print('held', flush=True)
            time.sleep(1.5)
        except MemoryError:
            print('memory-error', flush=True)
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
"""
    r = run_python(code, memory_mb=512, timeout_s=15)
    assert r.error is None
    if FEATURES.get("memory_cgroup"):
        # the kernel's own account of the run: the OOM killer may end a child after it
        # printed "held", so a count of "held" lines says nothing about the sum at one time
        assert r.memory_peak_mb is not None and r.memory_peak_mb <= 512 + 1, r.memory_peak_mb
        assert r.stdout.split().count("held") < 4, r.stdout
    else:
        assert r.stdout.split().count("held") * 200 <= 512, r.stdout
    # without a cgroup the process count and per-process bound keep the sum honest
    setup = sb._get_setup()
    r = sb._run(sb._Setup(setup.mode, setup.python, setup.private_root, cgroups=False), code, timeout_s=15,
                memory_mb=512, max_procs=16, file_mb=1, max_output_bytes=10_000)
    assert r.error is None and r.memory_peak_mb is None
    assert r.stdout.split().count("held") * 200 <= 512, r.stdout


@needs_cgroup
def test_cgroup_reports_peak_and_is_removed():
    r = run_python("block = bytearray(b'x') * (100 * 2**20)\nprint('ok')", memory_mb=512, timeout_s=10)
    assert r.ok and 100 <= r.memory_peak_mb <= 512
    kind, base = sb._cgroup_kind()
    assert not [d for d in os.listdir(base) if d.startswith(f"graphtune-sandbox-{os.getpid()}-")]


def test_signals_to_the_parent_and_everyone_do_not_hurt_the_caller(run):
    if run.mode == "basic":
        pytest.skip("basic mode runs the program as the caller's uid: kill(-1) would reach the caller's processes")
    assert run.mode in ("kernel", "uid") and sb._UID_LO <= int(run("import os; print(os.getuid())").stdout) < sb._UID_HI
    code = ("import os, signal\n"
            "for target in (os.getppid(), 1, -1, 0):\n"
            "    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):\n"
            "        try:\n            os.kill(target, sig)\n        except OSError as e:\n            pass\n"
            "print('survived')")
    r = run(code, timeout_s=5)
    assert r.error is None
    again = run("print('alive')", timeout_s=5)
    assert again.ok and again.stdout.strip() == "alive"


def test_no_process_outlives_the_run(run):
    if run.mode == "basic":
        pytest.skip("basic mode kills the process group only")
    code = ("import os, time\nprint(os.getuid(), flush=True)\n"
            "for _ in range(3):\n"
            "    if os.fork() == 0:\n"
            "        os.setsid()\n"
            "        if os.fork() == 0:\n"
            "            time.sleep(60)\n"
            "        os._exit(0)\n"
            "time.sleep(0.2)\nprint('parent done')\n")
    r = run(code, timeout_s=5)
    assert r.ok and "parent done" in r.stdout
    assert _live_sandbox_procs(_first_uid(r)) == 0


def _descendant_uids(root: int) -> set[int]:
    """Sandbox uids among the processes below ``root``."""
    parent, uid = {}, {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    parent[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
                uid[int(name)] = os.stat(f"/proc/{name}").st_uid
            except (OSError, IndexError, ValueError):
                pass
    found = set()
    for pid in parent:
        p, seen = pid, 0
        while p in parent and p != root and seen < 64:
            p, seen = parent[p], seen + 1
        if p == root and sb._UID_LO <= uid.get(pid, 0) < sb._UID_HI:
            found.add(uid[pid])
    return found


@needs_pidns
def test_killing_the_caller_kills_the_run():
    script = ("from graphtune.envs.sandbox import run_python\n"
              "run_python('import os, time\\nif os.fork() == 0:\\n    os.setsid()\\ntime.sleep(60)', timeout_s=60)\n")
    caller = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 15
        mine: set[int] = set()
        while time.monotonic() < deadline:
            mine = {u for u in _descendant_uids(caller.pid) if _live_sandbox_procs(u) >= 2}
            if mine:
                break
            time.sleep(0.05)
        assert mine, "the run did not start"
    finally:
        caller.kill()
        caller.wait()
    deadline = time.monotonic() + 5
    while any(_live_sandbox_procs(u) for u in mine) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_live_sandbox_procs(u) for u in mine)
