"""llama.cpp through its C API: GGUF headers, the vocabulary check, models, contexts and slots, RPC."""
