"""ctypes bindings to the ggml libraries that ship inside llama-cpp-python.

Covers what Covey needs and llama-cpp-python does not expose: the device list with memory,
registering RPC servers as devices, and running an RPC server (on a private Unix socket,
which Covey's patch to ggml-rpc adds). The libraries are opened by their SONAME files
(`libggml.so.0`), the same copies libllama maps; opening `libggml.so` would map a second
library with its own device registry and every layer would silently stay on the local CPU.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

RPC_PROTOCOL_VERSION = "7.0.0"  # RPC_PROTO_*_VERSION in the vendored ggml-rpc.h

_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}
_DEVICE_TYPE_CPU = 0


class GgmlUnavailable(RuntimeError):
    """llama_cpp is missing or was built without what Covey needs."""


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    type: str
    free_bytes: int
    total_bytes: int


def llama_cpp_lib_dir() -> Path:
    """The folder holding llama_cpp's shared libraries, found without importing llama_cpp."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise GgmlUnavailable(
            "llama-cpp-python is not installed in this environment; run ./test.sh or "
            "./start.sh once to set Covey up (it builds llama.cpp with RPC)."
        )
    return Path(spec.origin).parent / "lib"


def check_rpc_support() -> Path:
    """Return the RPC library's path, or explain clearly why this llama_cpp cannot do RPC."""
    lib = llama_cpp_lib_dir() / "libggml-rpc.so.0"
    if not lib.exists():
        raise GgmlUnavailable(
            f"the installed llama-cpp-python has no RPC backend ({lib} is missing). "
            'Rebuild it with CMAKE_ARGS="-DGGML_RPC=on -DGGML_NATIVE=off": remove .venv and '
            "run ./test.sh or ./start.sh again."
        )
    return lib


def check_unix_socket_support() -> None:
    """Raise GgmlUnavailable unless the RPC server can listen on "unix:PATH": Covey's patch
    (patches/ggml-rpc-unix-socket.patch), applied by the setup that built llama_cpp."""
    lib = _rpc()
    supported = getattr(lib, "covey_rpc_unix_socket_supported", None)
    if supported is None or not supported():
        raise GgmlUnavailable(
            "the installed llama-cpp-python was built without Covey's private RPC socket "
            "(patches/ggml-rpc-unix-socket.patch), so worker mode cannot keep its RPC server "
            "to itself. Run ./start.sh (or scripts/setup.sh) again: it rebuilds llama.cpp "
            "with the patch."
        )


@functools.cache
def _ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(llama_cpp_lib_dir() / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_description.restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_register.restype = None
    return lib


@functools.cache
def _rpc() -> ctypes.CDLL:
    _ggml()  # the RPC library resolves its ggml symbols against the copy opened above
    lib = ctypes.CDLL(str(check_rpc_support()), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    lib.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    lib.ggml_backend_rpc_start_server.restype = None
    if hasattr(lib, "covey_rpc_unix_socket_supported"):
        lib.covey_rpc_unix_socket_supported.argtypes = []
        lib.covey_rpc_unix_socket_supported.restype = ctypes.c_int
    return lib


def _memory(dev: int) -> tuple[int, int]:
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    _ggml().ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def devices() -> list[Device]:
    """Every device ggml knows in this process (the CPU, plus any RPC servers added)."""
    lib = _ggml()
    found = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = _memory(dev)
        found.append(
            Device(
                name=lib.ggml_backend_dev_name(dev).decode(),
                description=lib.ggml_backend_dev_description(dev).decode(),
                type=_DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
                free_bytes=free,
                total_bytes=total,
            )
        )
    return found


def rpc_add_server(endpoint: str) -> None:
    """Make an RPC server a ggml device in this process, as llama.cpp's `--rpc` does.

    Call before loading a model. ggml aborts the whole process when the endpoint does not
    answer, which is why only the engine process calls this.
    """
    reg = _rpc().ggml_backend_rpc_add_server(endpoint.encode())
    if not reg:
        raise GgmlUnavailable(f"the RPC server at {endpoint} reports no devices")
    _ggml().ggml_backend_register(reg)


def rpc_start_server(endpoint: str, cache_dir: str | None, n_threads: int) -> None:
    """Serve this machine's CPU over ggml RPC at `endpoint`. Blocks until the process ends."""
    cpu = _ggml().ggml_backend_dev_by_type(_DEVICE_TYPE_CPU)
    if not cpu:
        raise GgmlUnavailable("ggml found no CPU device")
    devs = (ctypes.c_void_p * 1)(cpu)
    _rpc().ggml_backend_rpc_start_server(
        endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, 1, devs
    )
