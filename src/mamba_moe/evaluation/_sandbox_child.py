"""The sandboxed process of ``sandbox.py``: sets its own limits, drops privileges, then runs the program.

Run as ``python -I -S _sandbox_child.py CONFIG_JSON`` with the nonce on stdin; it is a script, not a
module of the package, so nothing of the harness is imported into the sandbox. Order matters: read what
it needs (program, nonce) first, then isolate the network, set the resource limits, drop root (when it
has it), install the audit hook, and only then execute untrusted code. Success is reported by writing
the nonce to the result pipe after the program's checks returned, never by exit status or output alone.
"""

import json
import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


PR_SET_KEEPCAPS = 8
CAP_DAC_READ_SEARCH = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def isolate_network(libc, as_root):
    """A fresh network namespace (no interfaces but a down loopback): connect and bind fail in the kernel."""
    flags = CLONE_NEWNET if as_root else CLONE_NEWUSER | CLONE_NEWNET
    try:
        return libc.unshare(flags) == 0
    except AttributeError:   # no unshare (not Linux): the audit hook alone refuses sockets
        return False


def drop_root(libc, uid):
    """Become ``uid`` keeping only CAP_DAC_READ_SEARCH, so the interpreter can still read its standard library
    where it lies under a private directory (/root/.pyenv): reading anything stays possible, writing only
    where the uid may, and no capability that lifts RLIMIT_NPROC or allows signalling others remains."""
    import ctypes

    if libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    keep = 1 << CAP_DAC_READ_SEARCH
    data = (Data * 2)(Data(keep, keep, 0), Data(0, 0, 0))
    if libc.capset(ctypes.byref(Header(LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)


def forget_ctypes():
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]   # a later "import ctypes" is then a fresh import, which the audit hook refuses


def set_limits(cfg, as_root):
    def cap(kind, value):
        soft, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, value))

    cap(resource.RLIMIT_AS, cfg["memory_bytes"])
    cap(resource.RLIMIT_CPU, cfg["cpu_s"])
    cap(resource.RLIMIT_FSIZE, cfg["file_bytes"])
    cap(resource.RLIMIT_NOFILE, 64)
    cap(resource.RLIMIT_CORE, 0)
    # Processes (and threads) of the real uid. As root, the sandbox gets a uid of its own, so this is exactly
    # its own count; otherwise it counts all of the user's processes, so 0 (no new process at all) is the
    # only bound that holds.
    cap(resource.RLIMIT_NPROC, cfg["max_processes"] if as_root else 0)


def install_guard(workdir):
    """Refuse, at the Python level, what a benchmark solution never needs: processes, sockets, ctypes,
    signals to others, and any write or removal outside the working directory."""
    root = os.path.realpath(workdir)
    refused = {"socket.__new__", "socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg",
               "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
               "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
               "os.chroot", "os.setuid", "resource.setrlimit", "resource.prlimit", "webbrowser.open", "pty.spawn",
               "sys.addaudithook", "os.startfile", "mmap.__new__"}
    modules = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing", "pty"}
    path_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
                   "os.utime": 1, "os.chflags": 1, "os.lchflags": 1, "os.rename": 2, "os.link": 2,
                   "os.symlink": 2, "shutil.rmtree": 1, "shutil.move": 2, "shutil.copyfile": 2,
                   "shutil.copytree": 2, "os.mkfifo": 1, "os.mknod": 1}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path):
        if isinstance(path, int):
            return True
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == root or real.startswith(root + os.sep)

    def hook(event, args):
        if event in refused:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args and (args[0] in modules or str(args[0]).split(".")[0] in modules):
            raise PermissionError(f"sandbox: import {args[0]} is not allowed")
        if event == "open" and args:
            mode, flags = (args[1], args[2]) if len(args) >= 3 else (None, 0)
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & write_flags)
            if writing and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory is not allowed")
        count = path_events.get(event)
        if count:
            for path in args[:count]:
                if path is not None and not inside(path):
                    raise PermissionError(f"sandbox: {event} on {path!r} outside the working directory")

    sys.addaudithook(hook)


def main():
    cfg = json.loads(sys.argv[1])
    nonce = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    with open(cfg["program"], encoding="utf-8") as fh:
        program = fh.read()
    result_fd = cfg["result_fd"]
    as_root = os.geteuid() == 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    network_isolated = isolate_network(libc, as_root)
    if cfg["require_network_isolation"] and not network_isolated:
        os.write(result_fd, b"error: no network namespace")
        os._exit(3)
    try:
        set_limits(cfg, as_root)
        if as_root:
            drop_root(libc, cfg["uid"])
    except (OSError, ValueError) as err:   # e.g. a container whose uid map lacks the sandbox uid
        os.write(result_fd, f"error: cannot set up the sandbox: {err}".encode())
        os._exit(4)
    del libc
    forget_ctypes()
    install_guard(os.getcwd())
    try:
        code = compile(program, "<sample>", "exec")
        exec(code, {"__name__": "__sandbox__", "__builtins__": __builtins__})
    except BaseException as err:  # SystemExit and KeyboardInterrupt included: the program did not finish its checks
        name = type(err).__name__
        sys.stderr.write(f"{name}: {err}\n"[:2000])
        sys.stderr.flush()
        os.write(result_fd, f"failed: {name}: {err}"[:500].encode("utf-8", "replace"))
        os._exit(1)
    os.write(result_fd, f"{nonce} passed".encode())
    os._exit(0)


main()
