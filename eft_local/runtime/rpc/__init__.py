"""The base model on llama.cpp RPC servers, by concern: whether the build has the RPC backend
(``build``), ``host:port`` endpoints, the server this machine runs, the client-side proxy and
the worker process it drives."""

from ..ggml import device_names
from .build import require_rpc, rpc_available
from .client import DECODE_TIMEOUT_ENV, RPCBackend
from .endpoints import DEFAULT_PORT, parse_endpoints, probe, reachable
from .server import server_devices, start_server

__all__ = ["DECODE_TIMEOUT_ENV", "DEFAULT_PORT", "RPCBackend", "device_names", "parse_endpoints", "probe", "reachable",
           "require_rpc", "rpc_available", "server_devices", "start_server"]
