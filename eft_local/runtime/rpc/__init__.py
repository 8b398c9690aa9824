"""The base model on llama.cpp RPC servers, by concern: the build's RPC backend (``ggml``),
``host:port`` endpoints, the server this machine runs, the client-side proxy and its worker."""

from .client import DECODE_TIMEOUT_ENV, RPCBackend
from .endpoints import DEFAULT_PORT, parse_endpoints, probe, reachable
from .ggml import require_rpc, rpc_available
from .server import device_names, server_devices, start_server

__all__ = ["DECODE_TIMEOUT_ENV", "DEFAULT_PORT", "RPCBackend", "device_names", "parse_endpoints", "probe", "reachable",
           "require_rpc", "rpc_available", "server_devices", "start_server"]
