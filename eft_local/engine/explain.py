"""Per-token explanation: what each model and each fine-tuning delta contributed to a reply.

For every token of a reply: its log-probability under each model, each delta's term
``w_i * (log p_tuned_i - log p_reference_i)``, the combined log-probability, and the base model's
own top choice. By construction ``base + sum(deltas) - log_normalizer == combined`` for every
token the combination (and the plausibility filter, when on) keeps; the others have combined
log-probability -inf.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..core.combine import add_delta, eft_scores, log_softmax
from ..core.errors import EFTError

if TYPE_CHECKING:
    from ..runtime.backend import Backend
    from .model_set import Mix, ModelSet


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
        """JSON-ready: numbers that are not finite (a token some model rules out) become None."""
        return _finite({**asdict(self), "base_would_differ": self.base_would_differ})


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


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


def explain_tokens(model_set: "ModelSet", prompts: dict[str, list[int]], reply: Sequence[int],
                   mix: "Mix") -> list[TokenExplanation]:
    """Explain ``reply`` (token ids) after the per-role ``prompts``.

    The combined column is the model set's own ``combine_rows`` (plausibility filter and ruled-out
    tokens included), so it is the distribution generation samples from.
    """
    reply = [int(t) for t in reply]
    if not reply:
        raise EFTError("nothing to explain: the reply is empty")
    if any(not 0 <= t < model_set.n_shared for t in reply):
        raise EFTError("the reply has token ids outside the shared vocabulary")
    for toks in prompts.values():
        if len(toks) + len(reply) > model_set.n_ctx:
            raise EFTError(f"prompt and reply ({len(toks) + len(reply)} tokens) do not fit the context of {model_set.n_ctx}")
    rows: dict[Backend, list[np.ndarray]] = {}
    for role, model in model_set.by_role.items():
        if model not in rows:
            rows[model] = _rows(model, prompts[role], reply)
    n = model_set.n_shared
    tuned = model_set.by_role["tuned"]
    out = []
    for i, token in enumerate(reply):
        at = {m: r[i] for m, r in rows.items()}
        lp = {role: at[m] for role, m in model_set.by_role.items()}
        terms = [add_delta(np.zeros(n), lp[t], lp[r], w) for (t, r), w in zip(model_set.delta_roles, mix.weights)]
        scores = eft_scores(lp["base"], [(lp[t], lp[r], w) for (t, r), w in zip(model_set.delta_roles, mix.weights)], n)
        combined = model_set.combine_rows(at, mix)
        base_top = int(np.argmax(lp["base"][:n]))
        c = float(combined[token])
        out.append(
            TokenExplanation(
                token=token,
                text=tuned.piece(token).decode("utf-8", errors="replace"),
                logprobs={role: float(v[token]) for role, v in lp.items()},
                delta_terms=[float(term[token]) for term in terms],
                # Where the token is ruled out there is no normaliser to speak of.
                log_normalizer=float(scores[token] - c) if np.isfinite(c) and np.isfinite(scores[token]) else float("nan"),
                combined_logprob=c,
                combined_prob=float(np.exp(c)),
                base_top=base_top,
                base_top_text=tuned.piece(base_top).decode("utf-8", errors="replace"),
            )
        )
    return out
