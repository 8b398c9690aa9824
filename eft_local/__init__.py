"""eft-local: emulated fine-tuning and LM up-scaling with llama.cpp, on your own machine.

    from eft_local import EFT
    with EFT(base="large.gguf", tuned="small-instruct.gguf", reference="small.gguf") as eft:
        print(eft.generate("Where is Paris?", temperature=0).text)
"""

from .core.combine import eft_logprobs, log_softmax
from .engine.eft import EFT, Chunk, Completion
from .core.errors import EFTError, UnavailableError
from .core.params import SamplingParams
from .core.sampling import Sampler
from .runtime.vocab import check_vocabularies, read_vocab

__all__ = [
    "EFT",
    "Chunk",
    "Completion",
    "EFTError",
    "UnavailableError",
    "SamplingParams",
    "Sampler",
    "check_vocabularies",
    "eft_logprobs",
    "log_softmax",
    "read_vocab",
]
__version__ = "0.1.0"
