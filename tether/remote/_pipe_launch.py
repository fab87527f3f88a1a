"""The launcher of ipykernel kernels under tether: ``ipykernel_launcher`` with its IOPub pipe
on a Unix socket.

ipykernel binds a ZMQ PULL socket to a random loopback TCP port whatever the kernel's transport
(``IOPubThread._setup_pipe_in``): forked children send their output there. It leaks nothing (it
only receives, and drops messages without a 128-bit key), but it is a TCP port any local user
can connect to and flood. This file is run as a script by the kernel's Python (which may not
have tether, and imports nothing of it): it moves the pipe to ``ipc://ADDR`` beside the kernel's other sockets, then
starts the kernel exactly as ``python -m ipykernel_launcher`` does. Where ipykernel's internals
differ from what it expects, the pipe stays on TCP and the kernel starts unchanged.

It also keeps ipykernel's shutdown from waiting on zombie children (:func:`_patch_children`).

argv: ``_pipe_launch.py ADDR <ipykernel_launcher arguments...>``
"""
import os
import sys
from typing import Any


def _patch(addr: str) -> None:
    import zmq
    from ipykernel import iostream
    from zmq.eventloop.zmqstream import ZMQStream

    thread = iostream.IOPubThread
    if not all(hasattr(thread, n) for n in ("_setup_pipe_in", "_setup_pipe_out",
                                             "_handle_pipe_msg")):
        return

    def setup_pipe_in(self: Any) -> None:
        self._pipe_uuid = os.urandom(16)
        pipe_in = self.socket.context.socket(zmq.PULL)
        pipe_in.linger = 0
        pipe_in.bind(addr)
        self._pipe_port = 0
        self._pipe_in = ZMQStream(pipe_in, self.io_loop)
        self._pipe_in.on_recv(self._handle_pipe_msg)

    def setup_pipe_out(self: Any) -> Any:
        ctx = zmq.Context()
        pipe_out = ctx.socket(zmq.PUSH)
        pipe_out.linger = 3000
        pipe_out.connect(addr)
        return ctx, pipe_out

    thread._setup_pipe_in = setup_pipe_in  # type: ignore[method-assign]
    thread._setup_pipe_out = setup_pipe_out  # type: ignore[method-assign]


def _patch_children() -> None:
    """At shutdown ipykernel signals its children and sleeps (0.01 s ... 10 s) until none is
    left, but counts zombies: a child that died while the kernel was busy (tether's sweep
    ends it meanwhile) is a zombie the kernel never reaps, so the kernel waited out the whole
    grace and needed SIGKILL (5.1 s for one `sleep` child). A zombie holds nothing: skip them."""
    from ipykernel.kernelbase import Kernel

    original = getattr(Kernel, "_process_children", None)
    if original is None:
        return

    def process_children(self: Any) -> list[Any]:
        children = []
        for child in original(self):
            try:
                if child.status() != "zombie":
                    children.append(child)
            except Exception:  # gone meanwhile (psutil.NoSuchProcess): nothing to wait for
                continue
        return children

    Kernel._process_children = process_children  # type: ignore[method-assign]


def main() -> None:
    # First: sys.path[0] is this file's directory, whose modules must not shadow anything the
    # kernel imports; ipykernel_launcher drops the cwd there alike, and the kernel adds it back
    del sys.path[0]
    addr = sys.argv.pop(1)
    try:
        _patch(addr)
    except Exception as e:  # the boundary: an ipykernel this was not written for
        print(f"tether: the kernel's IOPub pipe stays on loopback TCP: {e!r}", file=sys.stderr)
    try:
        _patch_children()
    except Exception as e:  # the same boundary
        print(f"tether: ipykernel waits for zombie children at shutdown: {e!r}", file=sys.stderr)
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
