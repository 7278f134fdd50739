"""Private: the wrapper that ``launch`` puts around torchrun's agent and around each of its workers.

``python -m labutils._agent <torchrun arguments>`` is ``python -m torch.distributed.run`` that
(1) asks the kernel for SIGTERM when the Python that started it dies (``prctl(PR_SET_PDEATHSIG)``;
torchrun then stops its workers) and exits at once if that Python is already gone, and (2) makes
every TCPStore server whose address is a loopback one listen on that address only (torch's own
store listens on every interface: ``::``). ``python -m labutils._agent --worker -m mod args`` (or
``--worker path.py args``) is how torchrun starts each rank: (2) again, for the store that rank 0
hosts, then the target runs as ``__main__``. Nothing here imports torch before the target does.

Used by labutils.launch (lab2 §Four ranks, lab3 §Two nodes on one host).
"""

from __future__ import annotations

import os
import sys

SUPERVISOR = "SMML_LAUNCH_SUPERVISOR"  # pid of the Python that runs launch.run: the agent's parent


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.")


def patch_tcpstore(dist) -> None:
    """Replace ``dist.TCPStore`` (and the names other torch.distributed modules bound to it)."""
    import socket
    from datetime import timedelta

    base = dist.TCPStore
    if getattr(base, "_smml_loopback", False):
        return

    class LoopbackTCPStore(base):
        """A TCPStore whose server, for a loopback host, listens on that address only."""

        _smml_loopback = True

        def __init__(self, host_name, port, world_size=None, is_master=False, timeout=timedelta(seconds=300),
                     wait_for_workers=True, multi_tenant=False, master_listen_fd=None, use_libuv=True):
            if is_master and master_listen_fd is None and _is_loopback(host_name):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1" if host_name == "localhost" else host_name, port))
                    sock.listen(1024)
                except OSError as e:  # the store's own error type: torchrun then retries as a client
                    sock.close()
                    raise dist.DistNetworkError(f"TCPStore could not listen on {host_name}:{port}: {e}") from e
                port, master_listen_fd = sock.getsockname()[1], sock.detach()  # the store owns the fd
            super().__init__(host_name, port, world_size, is_master, timeout, wait_for_workers, multi_tenant,
                             master_listen_fd, use_libuv)

    LoopbackTCPStore.__name__ = LoopbackTCPStore.__qualname__ = "TCPStore"
    for name, mod in list(sys.modules.items()):
        if name.startswith("torch.distributed") and getattr(mod, "TCPStore", None) is base:
            mod.TCPStore = LoopbackTCPStore


class _PatchOnImport:
    """A meta-path finder: once ``torch.distributed`` has been imported (by the target), patch it."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "torch.distributed":
            return None
        import importlib.util

        sys.meta_path.remove(cls)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                patch_tcpstore(module)

            spec.loader.exec_module = exec_and_patch
        return spec


def _parent_death_signal() -> None:
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: launch's watchdog still ends the job
        pass
    parent = os.environ.pop(SUPERVISOR, "")
    if parent.isdigit() and os.getppid() != int(parent):
        sys.exit("labutils._agent: the Python that started this job is gone")


def _worker(argv: list[str]) -> None:
    import runpy

    sys.meta_path.insert(0, _PatchOnImport)
    if argv[:1] == ["-m"]:
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        return _worker(argv[1:])
    _parent_death_signal()
    import torch.distributed as dist
    import torch.distributed.launcher.api as launcher

    patch_tcpstore(dist)
    named = launcher._get_entrypoint_name

    def target_name(entrypoint, args):  # torchrun's failure summary names the target, not this wrapper
        rest = [a for a in args[args.index("--worker") + 1:] if a != "-m"] if "--worker" in args else []
        return str(rest[0]) if rest else named(entrypoint, args)

    launcher._get_entrypoint_name = target_name
    from torch.distributed.run import main as torchrun

    sys.argv = ["torchrun", *argv]
    torchrun()


def _exit_now(code) -> None:
    """End the process with ``code`` (a ``sys.exit`` argument) without the interpreter's finalisation: a rank
    or agent that has imported torch and transformers spends 0.5-2.5 s of CPU tearing down its modules on the
    way out (measured on the 2-core box: ``import torch`` then exit 2.6 s, then ``os._exit`` 1.7 s), after its
    work and its output are done. Python's buffers are flushed first; files the target wrote are closed by it
    (results are written atomically), and the kernel closes its sockets. An exception other than SystemExit
    never comes here: it ends the process the usual way, traceback and all."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or missing: nothing left to lose
            pass
    os._exit(code)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except SystemExit as done:
        _exit_now(done.code)
    _exit_now(0)
