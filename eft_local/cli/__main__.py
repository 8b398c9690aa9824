"""``python -m eft_local.cli``: the ``eft-local`` command without its script (an RPC server machine, say)."""

from . import main

main(prog_name="eft-local")
