"""Per-token explanation: what each model and each fine-tuning delta contributed to a reply.

For every token of a reply: its log-probability under each model, each delta's term
``w_i * (log p_tuned_i - log p_reference_i)``, the combined log-probability, and the base model's
own top choice. By construction ``base + sum(deltas) - log_normalizer == combined``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .combine import log_softmax
from .errors import EFTError

if TYPE_CHECKING:
    from .backend import Backend
    from .engine import EFT


@dataclass
class TokenExplanation:
    """One reply token, term by term (natural-log probabilities)."""

    token: int
    text: str
    logprobs: dict[str, float]  # per role: base, tuned, reference, tuned2, ...
    delta_terms: list[float]  # w_i * (tuned_i - reference_i)
    log_normalizer: float  # log of the sum over the shared vocabulary of exp(base + deltas)
    combined_logprob: float
    combined_prob: float
    base_top: int  # the base model's own most likely token here
    base_top_text: str

    @property
    def base_would_differ(self) -> bool:
        return self.base_top != self.token

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "base_would_differ": self.base_would_differ}


def _rows(model: "Backend", prompt: list[int], reply: list[int]) -> list[np.ndarray]:
    """Log-probabilities of ``model`` at each reply position (teacher forcing)."""
    model.sync(prompt)
    rows = [log_softmax(model.logits())]
    rest = reply[:-1]
    # Chunks of at most n_batch tokens, each with logits for every position.
    for i in range(0, len(rest), model.n_batch):
        chunk = rest[i : i + model.n_batch]
        model.eval(chunk, n_logits=len(chunk))
        rows.extend(log_softmax(model.logits(j)) for j in range(len(chunk)))
    return rows


def explain_tokens(eft: "EFT", prompts: dict[str, list[int]], reply: Sequence[int],
                   weights: Sequence[float]) -> list[TokenExplanation]:
    """Explain ``reply`` (token ids) after the per-role ``prompts``."""
    reply = [int(t) for t in reply]
    if not reply:
        raise EFTError("nothing to explain: the reply is empty")
    if any(not 0 <= t < eft.n_shared for t in reply):
        raise EFTError("the reply has token ids outside the shared vocabulary")
    for toks in prompts.values():
        if len(toks) + len(reply) > eft.n_ctx:
            raise EFTError(f"prompt and reply ({len(toks) + len(reply)} tokens) do not fit the context of {eft.n_ctx}")
    rows: dict[Backend, list[np.ndarray]] = {}
    for role, model in eft.models.items():
        if model not in rows:
            rows[model] = _rows(model, prompts[role], reply)
    n = eft.n_shared
    tuned = eft.models["tuned"]
    out = []
    for i, token in enumerate(reply):
        lp = {role: rows[m][i] for role, m in eft.models.items()}
        terms = [w * (lp[t][:n] - lp[r][:n]) for (t, r), w in zip(eft.deltas, weights)]
        total = lp["base"][:n] + sum(terms) if terms else lp["base"][:n]
        combined = log_softmax(total)
        base_top = int(np.argmax(lp["base"][:n]))
        out.append(
            TokenExplanation(
                token=token,
                text=tuned.piece(token).decode("utf-8", errors="replace"),
                logprobs={role: float(v[token]) for role, v in lp.items()},
                delta_terms=[float(term[token]) for term in terms],
                log_normalizer=float(total[token] - combined[token]),
                combined_logprob=float(combined[token]),
                combined_prob=float(np.exp(combined[token])),
                base_top=base_top,
                base_top_text=tuned.piece(base_top).decode("utf-8", errors="replace"),
            )
        )
    return out
