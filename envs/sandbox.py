"""Run untrusted Python (LLM-written code under test) in a contained subprocess.

:func:`run_python` runs a program in a fresh interpreter and reports what happened as a
:class:`SandboxResult`. A program that fails, loops or misbehaves is a result
(``ok=False``); only a sandbox that *could not start* sets ``error`` -- an infrastructure
failure, which callers must never score as a wrong answer.

How the program is contained depends on what the machine allows; :func:`sandbox_mode`
says which of these is in use and :func:`sandbox_features` what it includes (probed once
per process, on first use):

``"kernel"`` (running as root where namespaces work -- the normal case here and in CI)
  A small launcher (a separate root process, so no ``preexec_fn`` runs in a possibly
  threaded parent) joins the run's cgroup, then

  * ``unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID)``: a network namespace with no
    usable interface (not even loopback, and no abstract Unix sockets of the host), a
    mount namespace, and a PID namespace whose first process (the program) is forked
    after the ``unshare``; a fresh ``/proc`` is mounted for it, so the program sees only
    its own processes -- no other process's command line or environment. When that first
    process ends, the kernel kills every process left in the namespace;
  * a *private root* (``chroot``): a tmpfs holding bind mounts of ``/usr``, ``/bin``,
    ``/lib*`` and the interpreter's prefix, the loader cache from ``/etc``, a few device
    nodes, a fresh ``/proc``, and tmpfs ``/tmp`` and ``/dev/shm``. Nothing else of the host
    is visible: not the project, not ``/work``, ``/home``, ``/root``, ``/var`` or
    ``/run`` (database sockets), nor the datasets with their reference answers. (Where the
    private root cannot be built, the host tree is shown with tmpfs over the
    world-writable folders; :func:`sandbox_features` says which.) The scratch folder lives
    in the private ``/tmp`` and vanishes with the namespace;
  * drops to a *fresh, unused uid/gid* (random, per run, no supplementary groups) with
    ``no_new_privs``, so the kernel refuses writes anywhere the program does not own,
    it cannot signal or read other users' processes, and ``RLIMIT_NPROC`` counts only this
    run's processes (as root it would not apply at all).

``"uid"`` (root, but namespaces unavailable): the fresh uid, limits and cgroup as above;
  a host scratch folder owned by that uid (removed afterwards); network and writes to
  world-writable folders are blocked only by the audit hook below, and the hook also
  forbids starting other programs (they would escape it). Other processes are visible.

``"basic"`` (not root): limits (``RLIMIT_NPROC`` = the user's current process count
  plus ``max_procs``), a host scratch folder, the audit hook with the same extra
  restrictions as ``"uid"``, and a kill of the process group. Weakest: a determined
  program (e.g. one that reaches ``ctypes`` some other way) can get out.

Memory: ``memory_mb`` bounds the *whole run* (every process together). Where a memory
cgroup can be created (cgroup v1 ``memory`` or v2 with the ``memory`` controller; root
normally), the run gets its own cgroup with that limit -- the kernel kills a process of
the run when their sum would pass it -- and each process also has ``RLIMIT_AS`` =
``memory_mb`` so a single large allocation fails with ``MemoryError``. Without a cgroup
the bound is made honest by processes: at most ``max(2, memory_mb // 128)`` processes
(capped by ``max_procs``), each with ``RLIMIT_AS`` = ``memory_mb`` / that count. After
the run every process in the cgroup is killed (or, without one, every process of the
fresh uid: ``kill(-1)`` from a helper running as that uid).

In every mode: ``RLIMIT_CPU`` (about ``timeout_s``), ``RLIMIT_FSIZE`` (``file_mb``),
``RLIMIT_NOFILE``, no core files; a wall-clock timeout after which everything is killed;
``python -I`` (no user site, no ``PYTHON*`` variables) with a minimal environment (no API
keys); output beyond ``max_output_bytes`` per stream is dropped. A Python audit hook is
installed before the program runs: it refuses non-Unix sockets and opening files for
writing (and creating, removing, renaming) outside the scratch folder, except
``/dev/null``.

The program sees its scratch folder as the current directory, ``HOME`` and ``TMPDIR``;
its standard input carries ``stdin`` (empty by default). With ``report=True`` it also
has a *report channel*: file descriptor 3, write-only, whose bytes come back as
:attr:`SandboxResult.report` and nowhere else. The program starts non-dumpable then
(``PR_SET_DUMPABLE`` 0), so processes it starts under the same uid cannot read its
memory or open its file descriptors through ``/proc`` or ``ptrace``; a program that
wants the channel private closes fd 3 in every child it starts (see
:mod:`graphtune.envs.code_harness`).
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

__all__ = ["SandboxResult", "run_python", "sandbox_mode", "sandbox_features", "REPORT_FD"]

#: Exit code of the launcher when it could not set the sandbox up.
_SETUP_EXIT = 97
_SETUP_TAG = "graphtune-sandbox-setup:"
#: Fresh uids are drawn from here: far above any real account and below 2**31.
_UID_LO, _UID_HI = 1_500_000_000, 2_000_000_000
_TMPFS_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
#: The file descriptor of the report channel inside the sandbox (``report=True``).
REPORT_FD = 3
_MAX_REPORT_BYTES = 65536
#: Without a cgroup, each process gets at least this much address space.
_MIN_PROC_MB = 128
#: What the private root shows of the host (bind mounts; a symlink is copied as one).
_ROOT_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
_ROOT_FILES = ("etc/ld.so.cache", "etc/ld.so.conf", "etc/localtime")
_DEVICES = ("null", "zero", "full", "random", "urandom")

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
    for procs in cfg["cgroup_procs"]:  # join the run's cgroup; children inherit it
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    if cfg["report_fd"] is not None and cfg["report_fd"] != %(rfd)d:
        os.dup2(cfg["report_fd"], %(rfd)d)
        os.close(cfg["report_fd"])
    libc = None
    if cfg["namespaces"]:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        def mount(src, dst, fstype, flags, data=None):
            if libc.mount(src.encode(), dst.encode(), fstype and fstype.encode(), flags, data and data.encode()) != 0:
                fail("mounting %%s on %%s: %%s" %% (src, dst, os.strerror(ctypes.get_errno())))
    if cfg["namespaces"]:
        # CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID; the new PID namespace holds our next child
        if libc.unshare(0x40000000 | 0x00020000 | 0x20000000) != 0:
            fail("unshare: " + os.strerror(ctypes.get_errno()))
        pid = os.fork()
        if pid:  # stay outside as the relay: the caller waits for us, we wait for the run
            libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG: if the caller dies, we die, and so does the run
            if os.getppid() != cfg["caller"]:
                os.kill(pid, 9)
                os._exit(137)
            os.close(0)
            if cfg["report_fd"] is not None:
                os.close(%(rfd)d)
            status = os.waitpid(pid, 0)[1]
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
        # PID 1 of the new namespace from here on
        BIND, REC, PRIVATE, NOSUID, NODEV, NOEXEC = 4096, 16384, 1 << 18, 2, 4, 8
        mount("none", "/", None, REC | PRIVATE)
        tmpfs_opts = "size=%%dm,mode=1777" %% cfg["tmpfs_mb"]
        if cfg["root"]:
            new = cfg["root"]["at"]
            mount("tmpfs", new, "tmpfs", NOSUID | NODEV, "size=4m,mode=755")
            def bind(src, rel):
                dst = os.path.join(new, rel)
                if os.path.islink(src):
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    os.symlink(os.readlink(src), dst)
                    return
                if os.path.isdir(src):
                    os.makedirs(dst, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    open(dst, "w").close()
                mount(src, dst, None, BIND | REC)
            for rel in cfg["root"]["binds"]:
                bind("/" + rel, rel)
            for d in ("dev", "dev/shm", "tmp", "proc"):
                os.makedirs(os.path.join(new, d), exist_ok=True)
            for dev in cfg["root"]["devices"]:
                bind("/dev/" + dev, "dev/" + dev)
            for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                                 ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
                os.symlink(target, os.path.join(new, "dev", name))
            mount("tmpfs", os.path.join(new, "tmp"), "tmpfs", NOSUID | NODEV, tmpfs_opts)
            mount("tmpfs", os.path.join(new, "dev/shm"), "tmpfs", NOSUID | NODEV, tmpfs_opts)
            mount("proc", os.path.join(new, "proc"), "proc", NOSUID | NODEV | NOEXEC)
            os.chroot(new)
            os.chdir("/")
        else:
            for d in cfg["tmpfs_dirs"]:
                mount("tmpfs", d, "tmpfs", NOSUID | NODEV, tmpfs_opts)
            mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC)
        os.mkdir(workdir, 0o700)
        os.chown(workdir, uid, gid)
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if uid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    if cfg["namespaces"]:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary gives root back
        libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG: SIGKILL when the relay dies (set after setuid)
    os.chdir(workdir)
    env = dict(cfg["env"], HOME=workdir, TMPDIR=workdir)
    os.execve(cfg["python"], [cfg["python"], "-I", "-c", cfg["runner"], workdir, cfg["mode"],
                              "1" if cfg["report_fd"] is not None else "0"], env)
except SystemExit:
    raise
except BaseException as e:
    fail("%%s: %%s" %% (type(e).__name__, e))
""" % {"tag": _SETUP_TAG, "code": _SETUP_EXIT, "rfd": REPORT_FD}

# Runs inside the sandbox (``python -I -c``): reads the program from stdin (a length
# line, then the source; the rest of stdin is the program's), installs the audit hook,
# runs the program as ``__main__`` from ``main.py`` (so tracebacks show lines).
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
def _read_program():
    head = b""
    while not head.endswith(b"\n"):
        c = os.read(0, 1)
        if not c:
            raise SystemExit("sandbox runner: no program on stdin")
        head += c
    n, parts = int(head), []
    while n:
        chunk = os.read(0, min(n, 1 << 20))
        if not chunk:
            raise SystemExit("sandbox runner: program cut short")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)
def _main():
    root, mode, report = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    src = _read_program()
    if report:  # the report holder: no same-uid process may read its memory or fds
        import ctypes
        if ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
            raise SystemExit("sandbox runner: cannot make the program non-dumpable")
        del ctypes
        # leave no loaded ctypes behind: where the audit hook refuses ctypes (uid, basic),
        # importing it again must go through the hook
        for name in [m for m in sys.modules if m == "ctypes" or m.startswith("ctypes.")]:
            del sys.modules[name]
    path = os.path.join(root, "main.py")
    with open(path, "wb") as f:
        f.write(src)
    code = compile(src, path, "exec")
    sys.argv = [path]
    sys.path.insert(0, root)
    _install(root, mode != "kernel")
    return code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
_code, _globals = _main()
del _main, _install, _read_program
exec(_code, _globals)
"""


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run did.

    ``ok``: exited with status 0 in time. ``error``: the sandbox itself failed (could not
    start); then ``ok`` is False and the other fields say nothing about the program.
    ``report``: what the program wrote to its report channel (``report=True`` only).
    ``memory_peak_mb``: the run's peak memory, all processes together (None without a
    memory cgroup).
    """

    ok: bool
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    error: str | None = None
    seconds: float = 0.0
    mode: str = ""
    report: str = ""
    memory_peak_mb: float | None = None


@dataclass(frozen=True)
class _Setup:
    mode: str  # "kernel" | "uid" | "basic"
    python: str  # interpreter the sandboxed program runs on
    private_root: bool = False  # kernel mode: chroot into a minimal tree
    cgroups: bool = False  # a memory cgroup per run


_setup: _Setup | None = None
_setup_error: str | None = None
_setup_lock = threading.Lock()


def sandbox_mode() -> str:
    """The containment in use here: ``"kernel"``, ``"uid"`` or ``"basic"`` (see module
    docstring), or ``"unavailable"`` when no sandbox can start."""
    s = _get_setup()
    return s.mode if s else "unavailable"


def sandbox_features() -> dict[str, bool]:
    """What the containment in use includes: ``pid_namespace`` (other processes hidden),
    ``private_root`` (only the system folders visible), ``network_namespace``,
    ``fresh_uid``, ``memory_cgroup`` (``memory_mb`` bounds all processes together)."""
    s = _get_setup()
    if s is None:
        return {}
    kernel = s.mode == "kernel"
    return {"pid_namespace": kernel, "network_namespace": kernel, "private_root": kernel and s.private_root,
            "fresh_uid": s.mode in ("kernel", "uid"), "memory_cgroup": s.cgroups}


def _python_candidates() -> list[str]:
    # The program needs the standard library only. A system interpreter first: a pyenv or
    # conda build's site-packages (.pth files) can double the start-up time of every run,
    # and outside the private root the fresh uid may not be able to enter its prefix
    # (/root, mode 0700). Then the caller's own.
    cands = ["/usr/bin/python3", "/usr/local/bin/python3", sys.executable,
             getattr(sys, "_base_executable", "") or "", os.path.realpath(sys.executable),
             shutil.which("python3") or ""]
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
        cg = _cgroup_kind() is not None
        if os.geteuid() == 0:
            trials = [("kernel", True), ("kernel", False), ("uid", False)]
        else:
            trials = [("basic", False)]
        errors = []
        for mode, private_root in trials:
            for py in _python_candidates():
                for use_cg in ([True, False] if cg else [False]):
                    trial = _Setup(mode, py, private_root, use_cg)
                    r = _run(trial, "import sys; print('sandbox-ok')", timeout_s=20, memory_mb=512, max_procs=8,
                             file_mb=1, max_output_bytes=10_000)
                    if r.ok and r.stdout.strip() == "sandbox-ok":
                        _setup = trial
                        return _setup
                    errors.append(f"{mode}{'+root' if private_root else ''}{'+cgroup' if use_cg else ''} with "
                                  f"{py}: {r.error or (r.stderr.strip().splitlines() or ['?'])[-1]}")
        _setup_error = "; ".join(errors)
        return None


def run_python(code: str, *, timeout_s: float = 10, memory_mb: int = 512, max_procs: int = 32,
               file_mb: int = 16, max_output_bytes: int = 1_000_000, stdin: bytes = b"",
               report: bool = False) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a fresh sandboxed interpreter.

    ``timeout_s``: wall-clock limit, after which every process of the run is killed
    (``timed_out=True``). ``memory_mb``: memory of the whole run, all its processes
    together (see the module docstring for machines without a memory cgroup).
    ``max_procs``: processes (and threads) the run may have at once. ``file_mb``: largest
    file it may write. ``stdin``: the program's standard input. ``report``: give the
    program the report channel (fd 3; read back as ``SandboxResult.report``).
    Thread-safe; each call has its own scratch folder, uid, cgroup and namespaces.
    """
    setup = _get_setup()
    if setup is None:
        return SandboxResult(False, None, "", "", False, error=f"sandbox cannot start: {_setup_error}")
    return _run(setup, code, timeout_s=timeout_s, memory_mb=memory_mb, max_procs=max_procs, file_mb=file_mb,
                max_output_bytes=max_output_bytes, stdin=stdin, report=report)


# --------------------------------------------------------------------------- cgroups

_cg_lock = threading.Lock()
_cg_kind: tuple[str, str] | None | bool = False  # False: not probed yet


def _mountinfo() -> list[tuple[str, str, str, str]]:
    """(mount root, mount point, fs type, super options) of each mount."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                a, b = left.split(), right.split()
                if len(a) >= 5 and len(b) >= 3:
                    out.append((a[3], a[4], b[0], b[2]))
    except OSError:
        pass
    return out


def _own_cgroup(controller: str | None) -> str | None:
    """This process's cgroup path for ``controller`` (v1) or the unified one (None)."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                if (controller is None and ctrls == "") or (controller and controller in ctrls.split(",")):
                    return path
    except (OSError, ValueError):
        pass
    return None


def _cgroup_kind() -> tuple[str, str] | None:
    """("v1" | "v2", the folder under which run cgroups are made), or None. Probed once:
    a child cgroup is created, given a memory limit and removed."""
    global _cg_kind
    with _cg_lock:
        if _cg_kind is not False:
            return _cg_kind  # type: ignore[return-value]
        _cg_kind = None
        if os.geteuid() != 0 and not os.environ.get("GRAPHTUNE_SANDBOX_CGROUP"):
            return None
        mounts = _mountinfo()
        candidates = []
        own = _own_cgroup("memory")
        for root, point, fstype, opts in mounts:
            if fstype == "cgroup" and "memory" in opts.split(",") and own is not None:
                rel = own[len(root):] if own.startswith(root) and root != "/" else own
                candidates.append(("v1", os.path.join(point, rel.lstrip("/"))))
        own2 = _own_cgroup(None)
        for root, point, fstype, _ in mounts:
            if fstype == "cgroup2" and own2 is not None:
                rel = own2[len(root):] if own2.startswith(root) and root != "/" else own2
                candidates.append(("v2", os.path.join(point, rel.lstrip("/"))))
        for kind, base in candidates:
            probe = os.path.join(base, f"graphtune-sandbox-probe-{os.getpid()}")
            try:
                if kind == "v2":
                    with open(os.path.join(base, "cgroup.subtree_control")) as f:
                        if "memory" not in f.read().split():
                            continue  # enabling it here would break the no-internal-process rule
                os.mkdir(probe)
                try:
                    limit = "memory.limit_in_bytes" if kind == "v1" else "memory.max"
                    with open(os.path.join(probe, limit), "w") as f:
                        f.write(str(64 * 2**20))
                finally:
                    os.rmdir(probe)
            except OSError:
                continue
            _cg_kind = (kind, base)
            break
        return _cg_kind


class _Cgroup:
    """One run's memory cgroup."""

    def __init__(self, kind: str, base: str, memory_mb: int):
        self.kind = kind
        self.path = os.path.join(base, f"graphtune-sandbox-{os.getpid()}-{random.getrandbits(48):012x}")
        os.mkdir(self.path)
        try:
            limit = str(int(memory_mb) * 2**20)
            if kind == "v1":
                self._write("memory.limit_in_bytes", limit)
                self._write("memory.memsw.limit_in_bytes", limit, optional=True)  # no swapping out of the bound
            else:
                self._write("memory.max", limit)
                self._write("memory.swap.max", "0", optional=True)
        except OSError:
            self.remove()
            raise

    def _write(self, name: str, value: str, optional: bool = False) -> None:
        try:
            with open(os.path.join(self.path, name), "w") as f:
                f.write(value)
        except OSError:
            if not optional:
                raise

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def pids(self) -> list[int]:
        try:
            with open(self.procs_file) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def peak_mb(self) -> float | None:
        name = "memory.max_usage_in_bytes" if self.kind == "v1" else "memory.peak"
        try:
            with open(os.path.join(self.path, name)) as f:
                return int(f.read().strip()) / 2**20
        except (OSError, ValueError):
            return None

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup, until none is left and every one killed
        has finished dying (an exiting process leaves ``cgroup.procs`` before it is gone)."""
        deadline = time.monotonic() + 5
        killed: set[int] = set()
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.002)
        while killed and time.monotonic() < deadline:
            killed = {pid for pid in killed if _alive(pid)}
            if killed:
                time.sleep(0.002)

    def remove(self) -> None:
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:  # EBUSY: a killed process not yet gone
                time.sleep(0.01)


# --------------------------------------------------------------------------- processes


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not finished dying (zombies count as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


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


def _private_root_binds(python: str) -> list[str]:
    """Host paths (relative to /) the private root shows: system folders and files, and
    the interpreter's prefix when it lives elsewhere (e.g. /opt/python)."""
    binds = [d for d in _ROOT_DIRS if os.path.lexists("/" + d)]
    binds += [f for f in _ROOT_FILES if os.path.isfile("/" + f)]
    parts = os.path.realpath(python).strip("/").split("/")
    if parts[0] not in _ROOT_DIRS:
        prefix = "/".join(parts[:-2])  # <prefix>/bin/python3.X: the stdlib is in <prefix>/lib
        if prefix and os.path.isdir("/" + prefix):
            binds.append(prefix)
    return binds


def _run(setup: _Setup, code: str, *, timeout_s: float, memory_mb: int, max_procs: int, file_mb: int,
         max_output_bytes: int, stdin: bytes = b"", report: bool = False) -> SandboxResult:
    t0 = time.monotonic()
    if setup.mode == "basic" and os.geteuid() == 0:
        # the program would run as root: kill(-1) alone would take the machine down
        return SandboxResult(False, None, "", "", False, error="sandbox cannot start: basic mode refuses to run as root",
                             mode=setup.mode)
    uid = random.SystemRandom().randrange(_UID_LO, _UID_HI) if setup.mode in ("kernel", "uid") else None
    host_dir = None
    root = None
    if setup.mode == "kernel":
        workdir = "/tmp/sandbox"
        tmpfs = [d for d in _TMPFS_DIRS if os.path.isdir(d) and not os.path.islink(d)]
        if setup.private_root:
            # the new root is built on a tmpfs mounted over /tmp, inside the run's own
            # mount namespace: the host's /tmp is untouched
            root = {"at": "/tmp", "binds": _private_root_binds(setup.python), "devices": list(_DEVICES)}
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
    cgroup = None
    kind = _cgroup_kind() if setup.cgroups else None
    if kind is not None:
        try:
            cgroup = _Cgroup(kind[0], kind[1], memory_mb)
        except OSError as e:
            if host_dir:
                shutil.rmtree(host_dir, ignore_errors=True)
            return SandboxResult(False, None, "", "", False, error=f"sandbox cannot create its cgroup: {e}",
                                 mode=setup.mode)
    if cgroup is not None:
        # the cgroup bounds the sum; RLIMIT_AS makes one oversized allocation a MemoryError
        nproc_allowed, as_mb = max_procs, memory_mb
    else:
        # no cgroup: cap the process count so that count x per-process bound <= memory_mb
        nproc_allowed = max(2, min(max_procs, memory_mb // _MIN_PROC_MB))
        as_mb = memory_mb // nproc_allowed
    # RLIMIT_NPROC counts all of a uid's tasks (threads too): a fresh uid starts at zero,
    # the caller's own uid (basic mode) already has some.
    nproc = nproc_allowed if uid is not None else _count_user_tasks(os.geteuid()) + nproc_allowed
    cpu_s = int(timeout_s) + 2
    rlimits = {"RLIMIT_AS": int(as_mb) * 2**20, "RLIMIT_CPU": cpu_s, "RLIMIT_FSIZE": int(file_mb) * 2**20,
               "RLIMIT_NOFILE": 256, "RLIMIT_CORE": 0, "RLIMIT_NPROC": nproc}
    report_r = report_w = None
    if report:
        report_r, report_w = os.pipe()
    cfg = {"uid": uid, "workdir": workdir, "namespaces": setup.mode == "kernel", "tmpfs_dirs": tmpfs, "root": root,
           "tmpfs_mb": max(int(file_mb) * 4, 16), "rlimits": rlimits, "python": setup.python,
           "runner": _RUNNER, "mode": setup.mode, "report_fd": report_w, "caller": os.getpid(),
           "cgroup_procs": [cgroup.procs_file] if cgroup else [],
           "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                   "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}}
    argv = [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)]

    def cleanup() -> None:
        for fd in (report_r, report_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if cgroup is not None:
            cgroup.kill_all()
            cgroup.remove()
        if host_dir:
            shutil.rmtree(host_dir, ignore_errors=True)

    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, close_fds=True, cwd="/",
                                pass_fds=(report_w,) if report_w is not None else (),
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    except OSError as e:
        cleanup()
        return SandboxResult(False, None, "", "", False, error=f"sandbox cannot start: {e}", mode=setup.mode)
    if report_w is not None:
        os.close(report_w)  # only the program holds the write end now: EOF when it is gone
        report_w = None
    src = code.encode("utf-8", "surrogatepass")
    out: list[bytes] = []
    err: list[bytes] = []
    rep: list[bytes] = []
    threads = [threading.Thread(target=_reader, args=(proc.stdout, max_output_bytes, out), daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, max_output_bytes, err), daemon=True),
               threading.Thread(target=_writer, args=(proc.stdin, b"%d\n" % len(src) + src + stdin), daemon=True)]
    rep_file = None
    if report_r is not None:
        rep_file = os.fdopen(report_r, "rb", buffering=0)
        report_r = None
        threads.append(threading.Thread(target=_reader, args=(rep_file, _MAX_REPORT_BYTES, rep), daemon=True))
    for t in threads:
        t.start()
    timed_out = False
    try:
        timed_out = not _wait_exit(proc, timeout_s)
    finally:
        _kill_all(proc, uid, cgroup)
    returncode = proc.wait()
    peak = cgroup.peak_mb() if cgroup is not None else None
    for t in threads:
        t.join(timeout=5)
    for s in (proc.stdout, proc.stderr, rep_file):
        try:
            if s is not None:
                s.close()
        except OSError:
            pass
    cleanup()
    stdout = b"".join(out).decode("utf-8", "replace")
    stderr = b"".join(err).decode("utf-8", "replace")
    seconds = time.monotonic() - t0
    if returncode == _SETUP_EXIT and _SETUP_TAG in stderr:
        line = next(ln for ln in stderr.splitlines() if _SETUP_TAG in ln)
        return SandboxResult(False, None, "", "", False, error="sandbox cannot start: " +
                             line.split(_SETUP_TAG, 1)[1].strip(), seconds=seconds, mode=setup.mode)
    return SandboxResult(ok=returncode == 0 and not timed_out, returncode=returncode, stdout=stdout, stderr=stderr,
                         timed_out=timed_out, seconds=seconds, mode=setup.mode,
                         report=b"".join(rep).decode("utf-8", "replace"), memory_peak_mb=peak)


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Whether ``proc`` ended within ``timeout_s``. Waits on a pidfd where there is one:
    ``Popen.wait(timeout)`` polls with sleeps growing to 50 ms, which added up to 50 ms
    to every run."""
    import select

    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return proc.poll() is not None
            if poller.poll(left * 1000):
                return True
    finally:
        os.close(fd)


def _kill_all(proc: subprocess.Popen, uid: int | None, cgroup: _Cgroup | None) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if cgroup is not None:
        cgroup.kill_all()  # every process of the run, wherever it went
    elif uid is not None:
        _reap_uid(uid)
