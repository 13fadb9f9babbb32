"""Run untrusted Python (LLM-written code under test) in a contained subprocess.

:func:`run_python` runs a program in a fresh interpreter and reports what happened as a
:class:`SandboxResult`. A program that fails, loops or misbehaves is a result
(``ok=False``); only a sandbox that *could not start* sets ``error`` -- an infrastructure
failure, which callers must never score as a wrong answer.

How the program is contained depends on what the machine allows; :func:`sandbox_mode`
says which of these is in use (probed once per process, on first use):

``"kernel"`` (running as root where namespaces work -- the normal case here and in CI)
  A small launcher (a separate root process, so no ``preexec_fn`` runs in a possibly
  threaded parent) sets the limits below, then

  * ``unshare(CLONE_NEWNET | CLONE_NEWNS)``: a new network namespace with no usable
    interface (not even loopback), so no socket can reach anything, local or remote;
  * makes every mount private and mounts small fresh ``tmpfs`` file systems over the
    world-writable folders (``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``); the
    scratch folder lives in that ``/tmp`` and vanishes with the namespace;
  * drops to a *fresh, unused uid/gid* (random, per run, no supplementary groups), so the
    kernel refuses writes anywhere the program does not own, it cannot signal or read
    other users' processes, and ``RLIMIT_NPROC`` counts only this run's processes
    (as root it would not apply at all);
  * after the run every process of that uid is SIGKILLed (``kill(-1)`` from a helper
    running as that uid), which catches children that left the process group.

``"uid"`` (root, but namespaces unavailable): the fresh uid, limits and kill as above;
  a host scratch folder owned by that uid (removed afterwards); network and writes to
  world-writable folders are blocked only by the audit hook below, and the hook also
  forbids starting other programs (they would escape it).

``"basic"`` (not root): limits (``RLIMIT_NPROC`` = the user's current process count
  plus ``max_procs``), a host scratch folder, the audit hook with the same extra
  restrictions as ``"uid"``, and a kill of the process group. Weakest: a determined
  program (e.g. one that reaches ``ctypes`` some other way) can get out.

In every mode: ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_CPU`` (about ``timeout_s``),
``RLIMIT_FSIZE`` (``file_mb``), ``RLIMIT_NOFILE``, no core files; a wall-clock timeout
after which everything is killed; ``python -I`` (no user site, no ``PYTHON*`` variables)
with a minimal environment (no API keys); stdin is empty; output beyond
``max_output_bytes`` per stream is dropped. A Python audit hook is installed before the
program runs: it refuses non-Unix sockets and opening files for writing (and creating,
removing, renaming) outside the scratch folder, except ``/dev/null``.

The program sees its scratch folder as the current directory, ``HOME`` and ``TMPDIR``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

__all__ = ["SandboxResult", "run_python", "sandbox_mode"]

#: Exit code of the launcher when it could not set the sandbox up.
_SETUP_EXIT = 97
_SETUP_TAG = "graphtune-sandbox-setup:"
#: Fresh uids are drawn from here: far above any real account and below 2**31.
_UID_LO, _UID_HI = 1_500_000_000, 2_000_000_000
_TMPFS_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

# Runs as root (or the caller) with ``python -I -S``: sets the sandbox up, then execs the
# runner. Kept free of imports beyond the standard library's core.
_LAUNCHER = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
def fail(msg):
    os.write(2, (%(tag)r + " " + msg + "\n").encode())
    os._exit(%(code)d)
try:
    uid, gid = cfg["uid"], cfg["uid"]
    workdir = cfg["workdir"]
    if cfg["namespaces"]:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        if libc.unshare(0x40000000 | 0x00020000) != 0:  # CLONE_NEWNET | CLONE_NEWNS
            fail("unshare: " + os.strerror(ctypes.get_errno()))
        if libc.mount(b"none", b"/", None, 16384 | (1 << 18), None) != 0:  # MS_REC | MS_PRIVATE
            fail("making mounts private: " + os.strerror(ctypes.get_errno()))
        opts = ("size=%%dm,mode=1777" %% cfg["tmpfs_mb"]).encode()
        for d in cfg["tmpfs_dirs"]:
            if libc.mount(b"tmpfs", d.encode(), b"tmpfs", 2 | 4, opts) != 0:  # MS_NOSUID | MS_NODEV
                fail("mounting tmpfs on %%s: %%s" %% (d, os.strerror(ctypes.get_errno())))
        os.mkdir(workdir, 0o700)
        os.chown(workdir, uid, gid)
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if uid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    os.chdir(workdir)
    env = dict(cfg["env"], HOME=workdir, TMPDIR=workdir)
    os.execve(cfg["python"], [cfg["python"], "-I", "-c", cfg["runner"], workdir, cfg["mode"]], env)
except SystemExit:
    raise
except BaseException as e:
    fail("%%s: %%s" %% (type(e).__name__, e))
""" % {"tag": _SETUP_TAG, "code": _SETUP_EXIT}

# Runs inside the sandbox (``python -I -c``): reads the program from stdin, installs the
# audit hook, runs the program as ``__main__`` from ``main.py`` (so tracebacks show lines).
_RUNNER = r"""
import os, sys
def _install(root, strict):
    import os
    W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    ok_files = frozenset({"/dev/null"})
    path_events = {"os.mkdir": 0, "os.rmdir": 0, "os.remove": 0, "os.rename": 1, "os.replace": 1,
                   "os.symlink": 1, "os.link": 1, "os.chmod": 0, "os.chown": 0, "os.truncate": 0,
                   "os.utime": 0, "shutil.rmtree": 0, "os.mkfifo": 0, "os.mknod": 0}
    spawn = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                       "pty.spawn", "ctypes.dlopen", "os.forkpty"})
    def inside(p):
        if isinstance(p, int) or p is None:
            return True
        p = realpath(fsdecode(p))
        return p == root or p.startswith(root + sep) or p in ok_files
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if ((mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & W) and not inside(path):
                raise PermissionError("sandbox: writing outside the scratch directory is not allowed: %r" % (path,))
        elif event in path_events:
            paths = [args[0]] + ([args[1]] if path_events[event] else [])
            if not all(inside(p) for p in paths):
                raise PermissionError("sandbox: %s outside the scratch directory is not allowed" % event)
        elif event == "socket.__new__":
            if args[1] != 1:  # AF_UNIX only
                raise PermissionError("sandbox: network access is not allowed")
        elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo"):
            raise PermissionError("sandbox: network access is not allowed")
        elif strict and event in spawn:
            raise PermissionError("sandbox: %s is not allowed here" % event)
    sys.addaudithook(hook)
def _main():
    root, mode = sys.argv[1], sys.argv[2]
    src = sys.stdin.buffer.read()
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    path = os.path.join(root, "main.py")
    with open(path, "wb") as f:
        f.write(src)
    code = compile(src, path, "exec")
    sys.argv = [path]
    sys.path.insert(0, root)
    _install(root, mode != "kernel")
    return code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
_code, _globals = _main()
del _main, _install
exec(_code, _globals)
"""


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run did.

    ``ok``: exited with status 0 in time. ``error``: the sandbox itself failed (could not
    start); then ``ok`` is False and the other fields say nothing about the program.
    """

    ok: bool
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    error: str | None = None
    seconds: float = 0.0
    mode: str = ""


@dataclass(frozen=True)
class _Setup:
    mode: str  # "kernel" | "uid" | "basic"
    python: str  # interpreter the sandboxed program runs on


_setup: _Setup | None = None
_setup_error: str | None = None
_setup_lock = threading.Lock()


def sandbox_mode() -> str:
    """The containment in use here: ``"kernel"``, ``"uid"`` or ``"basic"`` (see module
    docstring), or ``"unavailable"`` when no sandbox can start."""
    s = _get_setup()
    return s.mode if s else "unavailable"


def _python_candidates() -> list[str]:
    # The sandbox uid may not be able to run the caller's interpreter (a pyenv build under
    # /root, mode 0700): fall back to a system one. The program needs the stdlib only.
    cands = [sys.executable, getattr(sys, "_base_executable", "") or "", os.path.realpath(sys.executable),
             "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or ""]
    out: list[str] = []
    for c in cands:
        if c and os.path.isfile(c) and c not in out:
            out.append(c)
    return out


def _get_setup() -> _Setup | None:
    global _setup, _setup_error
    with _setup_lock:
        if _setup is not None or _setup_error is not None:
            return _setup
        modes = ["kernel", "uid"] if os.geteuid() == 0 else ["basic"]
        errors = []
        for mode in modes:
            for py in _python_candidates():
                trial = _Setup(mode, py)
                r = _run(trial, "import sys; print('sandbox-ok')", timeout_s=20, memory_mb=512, max_procs=8,
                         file_mb=1, max_output_bytes=10_000)
                if r.ok and r.stdout.strip() == "sandbox-ok":
                    _setup = trial
                    return _setup
                errors.append(f"{mode} with {py}: {r.error or (r.stderr.strip().splitlines() or ['?'])[-1]}")
        _setup_error = "; ".join(errors)
        return None


def run_python(code: str, *, timeout_s: float = 10, memory_mb: int = 512, max_procs: int = 32,
               file_mb: int = 16, max_output_bytes: int = 1_000_000) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a fresh sandboxed interpreter.

    ``timeout_s``: wall-clock limit, after which every process of the run is killed
    (``timed_out=True``). ``memory_mb``: address-space limit per process. ``max_procs``:
    processes (and threads) the run may have at once. ``file_mb``: largest file it may
    write. Thread-safe; each call has its own scratch folder, uid and namespaces.
    """
    setup = _get_setup()
    if setup is None:
        return SandboxResult(False, None, "", "", False, error=f"sandbox cannot start: {_setup_error}")
    return _run(setup, code, timeout_s=timeout_s, memory_mb=memory_mb, max_procs=max_procs, file_mb=file_mb,
                max_output_bytes=max_output_bytes)


def _count_user_procs(uid: int) -> int:
    """Live (non-zombie) processes of ``uid``."""
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
                with open(f"/proc/{name}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in (b"Z", b"X"):  # zombies are dead already, waiting for init
                n += 1
    return n


def _count_user_tasks(uid: int) -> int:
    """Tasks (threads) of ``uid``, as RLIMIT_NPROC counts them."""
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{name}/task"))
            except OSError:
                pass
    return n


def _reap_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (which only sandbox runs use)."""
    script = (f"import os\nos.setgroups([]); os.setgid({uid}); os.setuid({uid})\n"
              "try:\n    os.kill(-1, 9)\nexcept ProcessLookupError:\n    pass\n")
    for _ in range(10):
        if _count_user_procs(uid) == 0:
            return
        try:
            subprocess.run([sys.executable, "-I", "-S", "-c", script], timeout=10, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.02)


def _reader(stream, limit: int, sink: list) -> None:
    kept = 0
    try:
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not chunk:
                break
            if kept < limit:
                sink.append(chunk[: limit - kept])
                kept += len(sink[-1])
    except (OSError, ValueError):
        pass


def _writer(stream, data: bytes) -> None:
    try:
        stream.write(data)
    except (OSError, ValueError):
        pass  # the program exited (or failed to start) without reading it all
    finally:
        try:
            stream.close()
        except OSError:
            pass


def _run(setup: _Setup, code: str, *, timeout_s: float, memory_mb: int, max_procs: int, file_mb: int,
         max_output_bytes: int) -> SandboxResult:
    t0 = time.monotonic()
    uid = random.SystemRandom().randrange(_UID_LO, _UID_HI) if setup.mode in ("kernel", "uid") else None
    host_dir = None
    if setup.mode == "kernel":
        workdir = "/tmp/sandbox"
        tmpfs = []
        for d in _TMPFS_DIRS:
            if os.path.isdir(d) and not os.path.islink(d):
                tmpfs.append(d)
    else:
        tmpfs = []
        try:
            host_dir = tempfile.mkdtemp(prefix="graphtune-sandbox-")
            os.chmod(host_dir, 0o700)
            if uid is not None:
                os.chown(host_dir, uid, uid)
        except OSError as e:
            return SandboxResult(False, None, "", "", False, error=f"sandbox cannot create its scratch folder: {e}")
        workdir = os.path.realpath(host_dir)
    # RLIMIT_NPROC counts all of a uid's tasks (threads too): a fresh uid starts at zero,
    # the caller's own uid (basic mode) already has some.
    nproc = max_procs if uid is not None else _count_user_tasks(os.geteuid()) + max_procs
    cpu_s = int(timeout_s) + 2
    rlimits = {"RLIMIT_AS": int(memory_mb) * 2**20, "RLIMIT_CPU": cpu_s, "RLIMIT_FSIZE": int(file_mb) * 2**20,
               "RLIMIT_NOFILE": 256, "RLIMIT_CORE": 0, "RLIMIT_NPROC": nproc}
    cfg = {"uid": uid, "workdir": workdir, "namespaces": setup.mode == "kernel", "tmpfs_dirs": tmpfs,
           "tmpfs_mb": max(int(file_mb) * 4, 16), "rlimits": rlimits, "python": setup.python,
           "runner": _RUNNER, "mode": setup.mode,
           "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                   "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}}
    argv = [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, close_fds=True, cwd="/",
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    except OSError as e:
        if host_dir:
            shutil.rmtree(host_dir, ignore_errors=True)
        return SandboxResult(False, None, "", "", False, error=f"sandbox cannot start: {e}", mode=setup.mode)
    out: list[bytes] = []
    err: list[bytes] = []
    threads = [threading.Thread(target=_reader, args=(proc.stdout, max_output_bytes, out), daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, max_output_bytes, err), daemon=True),
               threading.Thread(target=_writer, args=(proc.stdin, code.encode("utf-8", "surrogatepass")),
                                daemon=True)]
    for t in threads:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_all(proc, uid)
    returncode = proc.wait()
    for t in threads:
        t.join(timeout=5)
    for s in (proc.stdout, proc.stderr):
        try:
            s.close()
        except OSError:
            pass
    if host_dir:
        shutil.rmtree(host_dir, ignore_errors=True)
    stdout = b"".join(out).decode("utf-8", "replace")
    stderr = b"".join(err).decode("utf-8", "replace")
    seconds = time.monotonic() - t0
    if returncode == _SETUP_EXIT and _SETUP_TAG in stderr:
        line = next(ln for ln in stderr.splitlines() if _SETUP_TAG in ln)
        return SandboxResult(False, None, "", "", False, error="sandbox cannot start: " +
                             line.split(_SETUP_TAG, 1)[1].strip(), seconds=seconds, mode=setup.mode)
    return SandboxResult(ok=returncode == 0 and not timed_out, returncode=returncode, stdout=stdout, stderr=stderr,
                         timed_out=timed_out, seconds=seconds, mode=setup.mode)


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:
        _reap_uid(uid)
