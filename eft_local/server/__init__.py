"""``eft-local serve``'s HTTP API (needs the ``server`` extra: FastAPI and uvicorn)."""
