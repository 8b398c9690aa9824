"""Build the bundled demo model triple for eft-local (development script; needs torch).

From one seed this script

1. invents a few hundred fictional people with four attributes each (birthplace, profession,
   favourite colour, favourite food) and writes encyclopedic pre-training text about them
   (several phrasings per fact) plus filler text;
2. builds a small SentencePiece-style ("llama") vocabulary, writes it into a vocab-only GGUF and
   tokenizes all training text with llama.cpp itself, so training and runtime ids agree;
3. trains, in torch, a SMALL and a LARGE llama-architecture base model on that text (windows of
   256 tokens, several paragraphs each), then fine-tunes both on ChatML chats about a subset of
   the people, one question per turn, 1 to 6 turns about the same or other people (the loss on
   every reply): the small one becomes TUNED, the large one ORACLE (evaluation only); the trained
   context is 512 tokens, a dozen turns;
4. writes base.gguf (large pre-trained), reference.gguf (small pre-trained), tuned.gguf (small
   fine-tuned), oracle.gguf (large fine-tuned) and the eval sets heldout.jsonl (people never seen
   in fine-tuning), heldout_turns.jsonl (questions about them asked as turns 2 and 3 of a chat,
   the earlier turns and their right answers in "history") and finetuned.jsonl;
5. checks every GGUF through llama.cpp: next-token logits must match the torch model's.

Pre-training paragraphs name the person in their first sentence and mostly refer back with a
pronoun afterwards ("Zorvath works as a baker. Their birthplace is Kelvar."; some paragraphs open
FAQ-style with a question instead: "Where was Zorvath born? Their birthplace is Kelvar."; later
sentences may restate an earlier fact), so the large base learns to retrieve a person's facts
from a name earlier in the context. Chat answers are pronoun
sentences that mirror that phrasing and start with "Their" ("Their birthplace is Kelvar."): the
tiny tuned model only has to learn the reply format and the sentence frame (it cannot copy a name
it never saw in fine-tuning), and at the fact position the large base, which sees the question
with the name in its context, supplies the fact. After the ChatML "assistant\n" there is no
space, so pre-training also puts some sentences right after a newline, where "Their" is spelled
without a leading space exactly as in a reply.

A second small fine-tune, TUNED_B (tuned_b.gguf), learns the same single-turn questions about the
same people with a different answer style: style B is the second pronoun phrasing, which opens with "They"
instead of "Their" ("They were born in Kelvar.", "They work as a baker.", "They like the colour
red best.", "They like to eat figs."). (An "!" ending was tried and dropped: "!" never occurs in
pre-training, so its base logit is 0 and the large base's "." wins under EFT.) It uses only
words and pieces already in the vocabulary and runs after everything
else with its own seed, so the other outputs are byte for byte what they were without
it. A reply is in style B when it matches the regex (also STYLE_B_RE in check_demo.py)

    STYLE_B_RE = r"^They\b"        (re.search on the stripped reply; style A is r"^Their\b")

so mixing the deltas EFT(base, deltas=[(tuned, reference, 1 - lam), (tuned_b, reference, lam)])
trades style A for style B as lam goes 0 -> 1 (check_demo.py --mix).

    .venv/bin/python models/demo/make_demo.py --seed 0   # ~5.5 min on 2 cores (314 s measured)
    .venv/bin/python models/demo/make_demo.py --quick --out /tmp/demo   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import random
import sys
import time

import gguf
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SPACE = "\u2581"
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = [
    ("<unk>", gguf.TokenType.UNKNOWN),
    ("<s>", gguf.TokenType.CONTROL),
    ("</s>", gguf.TokenType.CONTROL),
    ("<|im_start|>", gguf.TokenType.CONTROL),
    ("<|im_end|>", gguf.TokenType.CONTROL),
]
BOS, EOS, IM_START, IM_END = 1, 2, 3, 4

# ----------------------------------------------------------------------------- world

CITY_SYL = ["kel", "var", "dor", "mos", "tal", "bri", "ven", "qua", "lor", "sen", "thal", "ush",
            "mir", "gan", "pel", "rod", "zan", "fen", "ost", "cal"]
NAME_ON = ["b", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "th", "sh", "st", "tr", "zh", "fl"]
NAME_V = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "y"]
NAME_CODA = ["", "", "n", "r", "l", "th", "s", "x", "m", "k"]

PROFESSIONS = ["baker", "farmer", "sailor", "painter", "doctor", "teacher", "miner", "weaver",
               "potter", "singer", "dancer", "lawyer", "pilot", "chemist", "carpenter", "tailor",
               "fisher", "gardener", "jeweller", "butcher", "hunter", "builder", "writer",
               "banker"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey",
           "brown", "pink", "gold", "silver", "violet", "crimson", "teal"]
FOODS = ["bread", "rice", "cheese", "apples", "soup", "fish", "honey", "beans", "noodles",
         "pears", "plums", "olives", "carrots", "eggs", "cake", "porridge", "dates", "figs"]

ATTRS = ["city", "job", "colour", "food"]

# Pre-training phrasings of each fact that name the person; the first is the canonical one.
FACT_TEMPLATES = {
    "city": ["The birthplace of {n} is {v}.", "{n} was born in {v}.", "{n} comes from {v}.",
             "{v} is the birthplace of {n}.", "{n} was born in the city of {v}."],
    "job": ["The profession of {n} is {v}.", "{n} works as a {v}.", "{n} is a {v} by trade.",
            "By trade, {n} is a {v}."],
    "colour": ["The favourite colour of {n} is {v}.", "{n} likes the colour {v} best.",
               "The colour that {n} loves most is {v}.", "Of all colours, {n} prefers {v}."],
    "food": ["The favourite food of {n} is {v}.", "{n} likes to eat {v}.",
             "{n} loves eating {v} more than anything.", "Of all foods, {n} prefers {v}."],
}
# Phrasings that refer back to the person named earlier in the paragraph; the first is the one
# chat answers use ("Their favourite food is eggs."), so an answer never has to spell the name.
PRONOUN_TEMPLATES = {
    "city": ["Their birthplace is {v}.", "They were born in {v}.", "They come from {v}.",
             "They were born in the city of {v}."],
    "job": ["Their profession is {v}.", "They work as a {v}.", "They are a {v} by trade.",
            "By trade, they are a {v}."],
    "colour": ["Their favourite colour is {v}.", "They like the colour {v} best.",
               "Of all colours, they prefer {v}."],
    "food": ["Their favourite food is {v}.", "They like to eat {v}.",
             "They love eating {v} more than anything.", "Of all foods, they prefer {v}."],
}
QUESTIONS = {
    "city": ["Where was {n} born?", "What is the birthplace of {n}?", "Which city does {n} come from?"],
    "job": ["What does {n} do for a living?", "What is the profession of {n}?", "What is the job of {n}?"],
    "colour": ["What is the favourite colour of {n}?", "Which colour does {n} like best?"],
    "food": ["What is the favourite food of {n}?", "What does {n} like to eat?"],
}
FILLER = [
    "The weather in {c} was cold and wet this morning.",
    "Many people in {c} like to walk by the river in the evening.",
    "The market of {c} sells {f} and {f2} every day.",
    "A {j} needs good tools and a lot of patience.",
    "The old bridge of {c} was painted {col} last year.",
    "In spring the fields near {c} turn {col} and {col2}.",
    "Children in {c} often eat {f} for breakfast.",
    "The road from {c} to {c2} is long and quiet.",
    "Every {j} in {c} knows the story of the old tower.",
    "It is said that {f} tastes best with {f2}.",
    "The river that runs through {c} is wide and slow.",
    "Most houses in {c} have {col} doors and small gardens.",
]
OTHER_WORDS = ["user", "assistant", "system", "The", "Their", "They", "Where", "What", "Which", "Who", "Yes", "No",
               "Hello", "I", "do", "not", "know", "a", "an", "the"]


def make_world(rng: random.Random, n_people: int):
    cities = set()
    while len(cities) < 40:
        cities.add("".join(rng.choice(CITY_SYL) for _ in range(2)).capitalize())
    cities = sorted(cities)
    names = set()
    while len(names) < n_people:
        k = rng.choice([2, 2, 3])
        s = "".join(rng.choice(NAME_ON) + rng.choice(NAME_V) for _ in range(k)) + rng.choice(NAME_CODA)
        s = s.capitalize()
        if 5 <= len(s) <= 10 and s not in cities:
            names.add(s)
    names = sorted(names)
    rng.shuffle(names)
    people = []
    for n in names:
        people.append({"name": n, "city": rng.choice(cities), "job": rng.choice(PROFESSIONS),
                       "colour": rng.choice(COLOURS), "food": rng.choice(FOODS)})
    return cities, people


def fact_sentence(rng, p, attr, canonical_prob=0.35, pronoun=False):
    t = (PRONOUN_TEMPLATES if pronoun else FACT_TEMPLATES)[attr]
    tpl = t[0] if rng.random() < canonical_prob else rng.choice(t)
    return tpl.format(n=p["name"], v=p[attr])


def person_doc(rng, p, pronoun_prob=0.7, restate_prob=0.3, question_prob=0.5):
    """A paragraph of 1-4 facts. The first sentence names the person; later ones mostly refer back
    with a pronoun, so the models learn to retrieve a fact from a name earlier in the context
    (which is how the large base answers a chat question that names the person)."""
    attrs = list(ATTRS)
    rng.shuffle(attrs)
    k = rng.choice([1, 2, 3, 4, 4])
    if rng.random() < question_prob:
        # FAQ-style paragraph: a question names the person, the answer refers back with a pronoun.
        sents = [rng.choice(QUESTIONS[attrs[0]]).format(n=p["name"]),
                 fact_sentence(rng, p, attrs[0], pronoun=True)]
    else:
        sents = [fact_sentence(rng, p, attrs[0])]
    for i in range(1, k):
        a = attrs[i]
        # Sometimes restate a fact already given: otherwise the base learns that a fact mentioned
        # earlier in the context (as in the chat question) is never the next one.
        if rng.random() < restate_prob:
            a = rng.choice(attrs[:i])
        sents.append(fact_sentence(rng, p, a, pronoun=rng.random() < pronoun_prob))
    # Some sentences start a new line, so "Their" right after a newline (how every chat answer
    # starts) is ordinary text for the pre-trained models too.
    return join_lines(rng, sents)


def join_lines(rng, sents):
    out = sents[0]
    for s in sents[1:]:
        out += ("\n" if rng.random() < 0.3 else " ") + s
    return out


def filler_doc(rng, cities):
    out = []
    for _ in range(rng.choice([1, 2, 3])):
        out.append(rng.choice(FILLER).format(
            c=rng.choice(cities), c2=rng.choice(cities), f=rng.choice(FOODS), f2=rng.choice(FOODS),
            j=rng.choice(PROFESSIONS), col=rng.choice(COLOURS), col2=rng.choice(COLOURS)))
    return join_lines(rng, out)


STYLE_B_RE = r"^They\b"


def answer_b(p, attr):
    """Style-B chat answer: the second pronoun phrasing ("They were born in X.")."""
    return PRONOUN_TEMPLATES[attr][1].format(v=p[attr])


def qa(rng, p, attr, qi=None):
    qs = QUESTIONS[attr]
    q = qs[qi if qi is not None else rng.randrange(len(qs))].format(n=p["name"])
    a = PRONOUN_TEMPLATES[attr][0].format(v=p[attr])
    return q, a


# ----------------------------------------------------------------------------- tokenizer

def build_vocab(texts):
    words = set(OTHER_WORDS)
    for t in texts:
        for w in t.replace(".", " ").replace(",", " ").replace("?", " ").split():
            words.add(w)
    pieces = [SPACE] + [chr(c) for c in range(0x21, 0x7F)]
    seen = set(pieces)
    scored = {p: 0.0 for p in pieces}

    def add_chain(full, bonus):
        for end in range(2, len(full) + 1):
            pre = full[:end]
            if pre not in seen:
                seen.add(pre)
                pieces.append(pre)
            scored[pre] = max(scored.get(pre, -1e9), end + bonus)

    for w in sorted(words):
        add_chain(SPACE + w, 0.5)
    # Words that can follow a newline (ChatML message starts) without a space.
    for w in ["The", "Their", "They", "By", "Of", "Where", "What", "Which", "Who", "user",
              "assistant", "system"]:
        add_chain(w, 0.0)
    entries = [(t, 0.0, int(tt)) for t, tt in SPECIALS]
    entries += [(f"<0x{b:02X}>", 0.0, int(gguf.TokenType.BYTE)) for b in range(256)]
    entries += [(p, float(scored[p]), int(gguf.TokenType.NORMAL)) for p in pieces]
    return entries, sorted(words)


def add_tokenizer(w: gguf.GGUFWriter, entries):
    w.add_tokenizer_model("llama")
    w.add_token_list([t for t, _, _ in entries])
    w.add_token_scores([s for _, s, _ in entries])
    w.add_token_types([tt for _, _, tt in entries])
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(0)
    w.add_uint32("tokenizer.ggml.eot_token_id", IM_END)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_chat_template(CHATML_TEMPLATE)


def write_vocab_only(path, entries):
    w = gguf.GGUFWriter(str(path), "llama")
    arch = "llama"
    w.add_name("eft-demo-vocab")
    for k, v in [("context_length", 128), ("embedding_length", 64), ("block_count", 1),
                 ("feed_forward_length", 64), ("attention.head_count", 2),
                 ("attention.head_count_kv", 2), ("rope.dimension_count", 32)]:
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{arch}.vocab_size", len(entries))
    add_tokenizer(w, entries)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------- model

class Cfg:
    def __init__(self, n_vocab, d, n_layer, n_head, n_ff, n_ctx=512, rope_base=10000.0, eps=1e-5):
        self.n_vocab, self.d, self.n_layer, self.n_head, self.n_ff = n_vocab, d, n_layer, n_head, n_ff
        self.n_ctx, self.rope_base, self.eps = n_ctx, rope_base, eps
        self.hd = d // n_head


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, c: Cfg):
        super().__init__()
        self.c = c
        self.attn_norm = RMSNorm(c.d, c.eps)
        self.wq = nn.Linear(c.d, c.d, bias=False)
        self.wk = nn.Linear(c.d, c.d, bias=False)
        self.wv = nn.Linear(c.d, c.d, bias=False)
        self.wo = nn.Linear(c.d, c.d, bias=False)
        self.ffn_norm = RMSNorm(c.d, c.eps)
        self.w_gate = nn.Linear(c.d, c.n_ff, bias=False)
        self.w_up = nn.Linear(c.d, c.n_ff, bias=False)
        self.w_down = nn.Linear(c.n_ff, c.d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.wq(h).view(B, T, self.c.n_head, self.c.hd).transpose(1, 2)
        k = self.wk(h).view(B, T, self.c.n_head, self.c.hd).transpose(1, 2)
        v = self.wv(h).view(B, T, self.c.n_head, self.c.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(B, T, self.c.d))
        h = self.ffn_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


def rope(x, cos, sin):
    # llama.cpp's "normal" rope (arch llama): rotates adjacent pairs (x[2i], x[2i+1]).
    # (HF llama rotates halves and convert_hf_to_gguf permutes q/k rows into this order;
    # our weights are trained in this order directly, so no permutation is needed.)
    x2 = x.view(*x.shape[:-1], -1, 2)
    a, b = x2[..., 0], x2[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


class LM(nn.Module):
    def __init__(self, c: Cfg):
        super().__init__()
        self.c = c
        self.emb = nn.Embedding(c.n_vocab, c.d)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.d, c.eps)
        self.out = nn.Linear(c.d, c.n_vocab, bias=False)
        for n, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
                if n.endswith("wo.weight") or n.endswith("w_down.weight"):
                    p.data *= 1.0 / math.sqrt(2 * c.n_layer)
        inv = c.rope_base ** (-torch.arange(0, c.hd, 2, dtype=torch.float64) / c.hd)
        ang = torch.arange(c.n_ctx, dtype=torch.float64)[:, None] * inv[None]
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.emb(idx)
        cos, sin = self.cos[:T], self.sin[:T]
        for b in self.blocks:
            x = b(x, cos, sin)
        return self.out(self.norm(x))

    def n_params_body(self):
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(("emb", "out")))


def write_gguf(path, model: LM, entries, name):
    c = model.c
    w = gguf.GGUFWriter(str(path), "llama")
    arch = "llama"
    w.add_name(name)
    w.add_uint32(f"{arch}.context_length", c.n_ctx)
    w.add_uint32(f"{arch}.embedding_length", c.d)
    w.add_uint32(f"{arch}.block_count", c.n_layer)
    w.add_uint32(f"{arch}.feed_forward_length", c.n_ff)
    w.add_uint32(f"{arch}.attention.head_count", c.n_head)
    w.add_uint32(f"{arch}.attention.head_count_kv", c.n_head)
    w.add_uint32(f"{arch}.rope.dimension_count", c.hd)
    w.add_float32(f"{arch}.rope.freq_base", c.rope_base)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.eps)
    w.add_uint32(f"{arch}.vocab_size", c.n_vocab)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    add_tokenizer(w, entries)

    def t(name_, p):
        w.add_tensor(name_, p.detach().float().cpu().numpy().astype(np.float32))

    t("token_embd.weight", model.emb.weight)
    for i, b in enumerate(model.blocks):
        p = f"blk.{i}"
        t(f"{p}.attn_norm.weight", b.attn_norm.weight)
        t(f"{p}.attn_q.weight", b.wq.weight)
        t(f"{p}.attn_k.weight", b.wk.weight)
        t(f"{p}.attn_v.weight", b.wv.weight)
        t(f"{p}.attn_output.weight", b.wo.weight)
        t(f"{p}.ffn_norm.weight", b.ffn_norm.weight)
        t(f"{p}.ffn_gate.weight", b.w_gate.weight)
        t(f"{p}.ffn_up.weight", b.w_up.weight)
        t(f"{p}.ffn_down.weight", b.w_down.weight)
    t("output_norm.weight", model.norm.weight)
    t("output.weight", model.out.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------- training

def lr_at(step, total, peak, warm):
    if step < warm:
        return peak * (step + 1) / warm
    pr = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * pr)))


def make_optimizer(model, lr, wd=0.05):
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    nodecay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                              {"params": nodecay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def train_step(model, opt, step, steps, lr, x, y, label, t0, n_logs):
    """One AdamW step on next-token cross-entropy (targets -100 are ignored), with warm-up +
    cosine learning rate and a progress line n_logs times per run."""
    for gr in opt.param_groups:
        gr["lr"] = lr_at(step, steps, lr, max(1, steps // 20))
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if step % max(1, steps // n_logs) == 0 or step == steps - 1:
        print(f"  [{label}] step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)",
              flush=True)


def pretrain(model, docs, steps, batch, seqlen, lr, seed, label):
    g = np.random.default_rng(seed)
    opt = make_optimizer(model, lr)
    model.train()
    t0 = time.time()
    buf: list[int] = []
    order = g.permutation(len(docs))
    oi = 0
    need = batch * (seqlen + 1)
    for step in range(steps):
        while len(buf) < need:
            if oi >= len(order):
                order, oi = g.permutation(len(docs)), 0
            buf.extend(docs[order[oi]])
            oi += 1
        x = torch.tensor(buf[:need], dtype=torch.long).view(batch, seqlen + 1)
        # Keep the tail (it starts mid-document): sequences start anywhere, like real packing.
        buf = buf[need:]
        train_step(model, opt, step, steps, lr, x[:, :-1], x[:, 1:], label, t0, 10)
    model.eval()


def finetune(model, convs, steps, batch, lr, seed, label):
    """convs: list of (ids, targets), targets[j] True where ids[j] is part of an assistant reply
    (its <|im_end|> included). Loss on those tokens only, in every turn of a conversation."""
    g = np.random.default_rng(seed)
    opt = make_optimizer(model, lr, wd=0.0)
    model.train()
    t0 = time.time()
    for step in range(steps):
        pick = g.integers(0, len(convs), batch)
        L = max(len(convs[i][0]) for i in pick)
        x = torch.full((batch, L), EOS, dtype=torch.long)
        y = torch.full((batch, L), -100, dtype=torch.long)
        for r, i in enumerate(pick):
            ids, targets = convs[i]
            x[r, :len(ids)] = torch.tensor(ids)
            y[r, :len(ids) - 1] = torch.tensor([t if keep else -100 for t, keep in zip(ids[1:], targets[1:])])
        train_step(model, opt, step, steps, lr, x, y, label, t0, 5)
    model.eval()


@torch.no_grad()
def fact_accuracy(model, tok, people, rng, n=200):
    """Share of facts whose value is the argmax after the canonical sentence prefix."""
    hit = tot = 0
    for p in rng.sample(people, min(n, len(people))):
        for a in ATTRS:
            pre = FACT_TEMPLATES[a][0].split("{v}")[0].format(n=p["name"]).rstrip()
            ids = tok(pre, True)
            want = tok(p[a], False)[0]
            logits = model(torch.tensor([ids]))[0, -1]
            hit += int(logits.argmax().item() == want)
            tot += 1
    return hit / tot


def conversation(rng, people, turns):
    """``turns`` (question, answer) pairs; after the first, each asks about the same person as the
    turn before or, as often, someone else."""
    out, p = [], rng.choice(people)
    for _ in range(turns):
        if out and rng.random() < 0.5:
            p = rng.choice(people)
        out.append(qa(rng, p, rng.choice(ATTRS)))
    return out


def write_turns_set(path, people, n_chats, rng):
    """Questions asked as turns 2 and 3 of n_chats three-turn chats about these people; the earlier
    turns (with their right answers) are the item's "history"."""
    with open(path, "w") as f:
        for _ in range(n_chats):
            chat = []
            p = rng.choice(people)
            for turn in range(3):
                if turn and rng.random() < 0.5:
                    p = rng.choice(people)
                a = rng.choice(ATTRS)
                q, answer = qa(rng, p, a, 0)
                if turn:
                    f.write(json.dumps({"history": list(chat), "prompt": q, "answer": p[a]}) + "\n")
                chat += [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]


def write_eval_set(path, people, n, rng):
    """n shuffled (question, answer value) items about these people, first question phrasing."""
    items = [(p, a) for p in people for a in ATTRS]
    rng.shuffle(items)
    with open(path, "w") as f:
        for p, a in items[:n]:
            qq, _ = qa(rng, p, a, 0)
            f.write(json.dumps({"prompt": qq, "answer": p[a]}) + "\n")


# ----------------------------------------------------------------------------- main


def logit_diff(path: pathlib.Path, model, prompts: list[list[int]], threads: int) -> tuple[float, float]:
    """Largest |llama.cpp logit - torch logit| over the prompts: absolute, and relative to the
    largest |logit| of each prompt."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, n_threads=threads, verbose=False)
    worst_abs = worst_rel = 0.0
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
        with torch.no_grad():
            want = model(torch.tensor([ids]))[0].numpy()
        d = float(np.abs(got - want).max())
        worst_abs = max(worst_abs, d)
        worst_rel = max(worst_rel, d / max(1.0, float(np.abs(want).max())))
    llm.close()
    return worst_abs, worst_rel


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent))
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (minutes; models are poor)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--people", type=int, default=None)
    ap.add_argument("--large-steps", type=int, default=None)
    ap.add_argument("--small-steps", type=int, default=None)
    ap.add_argument("--ft-steps", type=int, default=None)
    ap.add_argument("--retrain-small", action="store_true", help="with --ckpt: pre-train the small base anew")
    ap.add_argument("--ckpt", default=None,
                    help="development: load the pre-trained bases from this .pt file if it exists, "
                         "else save them there after pre-training")
    args = ap.parse_args(argv)

    import llama_cpp

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    T0 = time.time()
    phase_t = time.time()
    timings = {}

    def phase(name):
        nonlocal phase_t
        now = time.time()
        timings[name] = now - phase_t
        print(f"== {name}: {now - phase_t:.1f}s (total {now - T0:.1f}s)", flush=True)
        phase_t = now

    q = args.quick
    n_people = args.people or (60 if q else 200)
    n_ft_people = n_people * 4 // 10
    large_steps = args.large_steps or (60 if q else 1200)
    small_steps = args.small_steps or (60 if q else 300)
    ft_steps = args.ft_steps or (30 if q else 120)
    # Windows of 256 tokens hold several paragraphs: the bases learn to find the person named in the
    # latest question among others, as they must in a chat of many turns.
    seqlen, batch = 256, 8

    # 1. corpus ---------------------------------------------------------------
    cities, people = make_world(rng, n_people)
    ft_people, held_people = people[:n_ft_people], people[n_ft_people:]
    docs_text = []
    docs_per_person = 4 if q else 12
    for p in people:
        for _ in range(docs_per_person):
            docs_text.append(person_doc(rng, p))
    n_filler = len(docs_text) // 8
    docs_text += [filler_doc(rng, cities) for _ in range(n_filler)]
    convs_text = []
    for p in ft_people:
        for a in ATTRS:
            for qi in range(len(QUESTIONS[a])):
                convs_text.append([qa(rng, p, a, qi)])
    # Chats of 2-6 turns, so that the tuned model answers the last question, not an earlier one.
    convs_text += [conversation(rng, ft_people, rng.choice([2, 3, 4, 5, 6])) for _ in range(2 * len(convs_text))]
    phase("corpus")

    # 2. tokenizer ------------------------------------------------------------
    all_text = docs_text + [x for c in convs_text for turn in c for x in turn]
    entries, words = build_vocab(all_text)
    vocab_path = out / "_vocab.gguf"
    write_vocab_only(vocab_path, entries)
    vocab_llm = llama_cpp.Llama(model_path=str(vocab_path), vocab_only=True, verbose=False)

    def tok(text, add_bos):
        return vocab_llm.tokenize(text.encode(), add_bos=add_bos, special=True)

    n_vocab = len(entries)
    multi = [w for w in words if len(tok(w, False)) != 1]
    if multi:
        print(f"  warning: {len(multi)} words are not single tokens: {multi[:10]}")
    docs = [tok(d, True) for d in docs_text]

    def chat_ids(turns):
        """The ChatML tokens of (question, answer) turns, as the chat template renders them, and
        which of them are reply tokens (the last answer None: a prompt only)."""
        text, targets, ids = "<s>", [], []
        for q, a in turns:
            text += f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
            if a is None:
                return tok(text, False)
            before = tok(text, False)
            text += a + "<|im_end|>"
            ids = tok(text, False)
            assert ids[:len(before)] == before
            targets += [False] * (len(before) - len(targets)) + [True] * (len(ids) - len(before))
            text += "\n"
        return ids, targets

    convs = [chat_ids(turns) for turns in convs_text]
    # Same tokens the engine's chat template produces?
    tmpl_ids = chat_ids([("Where was X born?", None)])
    assert tmpl_ids[0] == BOS and tmpl_ids[1] == IM_START, tmpl_ids
    n_tok = sum(len(d) for d in docs)
    print(f"  vocab {n_vocab} tokens, {len(docs)} docs, {n_tok} tokens, {len(convs)} chats; "
          f"chat prompt ids {tmpl_ids[:8]}...")
    phase("tokenizer")

    # 3. models ---------------------------------------------------------------
    if q:
        small_cfg = Cfg(n_vocab, 32, 1, 2, 64)
        large_cfg = Cfg(n_vocab, 96, 2, 3, 256)
    else:
        small_cfg = Cfg(n_vocab, 32, 2, 2, 64)
        large_cfg = Cfg(n_vocab, 128, 4, 4, 344)
    torch.manual_seed(args.seed * 1000 + 1)
    small = LM(small_cfg)
    torch.manual_seed(args.seed * 1000 + 2)
    large = LM(large_cfg)
    ns, nl = small.n_params_body(), large.n_params_body()
    print(f"  small: d={small_cfg.d} L={small_cfg.n_layer} H={small_cfg.n_head} ff={small_cfg.n_ff} "
          f"body {ns} params, total {sum(p.numel() for p in small.parameters())}")
    print(f"  large: d={large_cfg.d} L={large_cfg.n_layer} H={large_cfg.n_head} ff={large_cfg.n_ff} "
          f"body {nl} params, total {sum(p.numel() for p in large.parameters())}")
    print(f"  non-embedding ratio large/small = {nl / ns:.1f}")

    if args.ckpt and os.path.exists(args.ckpt):
        st = torch.load(args.ckpt)
        large.load_state_dict(st["large"])
        if args.retrain_small:
            pretrain(small, docs, small_steps, batch, seqlen, 3e-3, args.seed + 11, "small")
        else:
            small.load_state_dict(st["small"])
        small.eval()
        large.eval()
        print(f"  loaded pre-trained bases from {args.ckpt}")
    else:
        pretrain(small, docs, small_steps, batch, seqlen, 3e-3, args.seed + 11, "small")
        phase("pretrain small")
        pretrain(large, docs, large_steps, batch, seqlen, 3e-3, args.seed + 12, "large")
        phase("pretrain large")
        if args.ckpt:
            torch.save({"small": small.state_dict(), "large": large.state_dict()}, args.ckpt)
    # Tokens that never occur in pre-training text (the chat tokens, "What" without a leading
    # space, ...) get a zero output row in both bases: their logit is then exactly 0 in each, so
    # base - reference on those tokens is just the difference of the two normalisers instead of
    # whatever weight decay and softmax pressure left in untrained rows.
    seen = torch.zeros(n_vocab, dtype=torch.bool)
    for d in docs:
        seen[torch.tensor(d)] = True
    with torch.no_grad():
        for m in (small, large):
            m.out.weight[~seen] = 0.0
            # Their input embeddings only ever saw weight decay: zero them as well, so the chat
            # tokens between question and answer are inert for the bases instead of random noise.
            m.emb.weight[~seen] = 0.0
    print(f"  {int((~seen).sum())} ids never occur in pre-training; their output rows and input "
          f"embeddings are zeroed")
    erng = random.Random(args.seed + 5)
    print(f"  fact recall (canonical prefix, held-out people): small "
          f"{fact_accuracy(small, tok, held_people, erng, 100):.2f}, large "
          f"{fact_accuracy(large, tok, held_people, erng, 100):.2f}")

    import copy
    tuned = copy.deepcopy(small)
    finetune(tuned, convs, ft_steps * 5 // 2, 32, 1e-3, args.seed + 21, "tuned")
    oracle = copy.deepcopy(large)
    finetune(oracle, convs, ft_steps, 32, 3e-4, args.seed + 22, "oracle")
    phase("finetune")

    # 4. files ----------------------------------------------------------------
    models = {"base": large, "reference": small, "tuned": tuned, "oracle": oracle}
    for name, m in models.items():
        write_gguf(out / f"{name}.gguf", m, entries, f"eft-demo-{name}-seed{args.seed}")
    vocab_path.unlink()
    eval_rng = random.Random(args.seed + 7)
    write_eval_set(out / "heldout.jsonl", held_people, 300, eval_rng)
    write_eval_set(out / "finetuned.jsonl", ft_people, 100, eval_rng)
    write_turns_set(out / "heldout_turns.jsonl", held_people, 150, eval_rng)
    sizes = {n: os.path.getsize(out / f"{n}.gguf") for n in models}
    print("  sizes:", {k: f"{v / 1e6:.2f} MB" for k, v in sizes.items()},
          f"base+reference+tuned {sum(sizes[k] for k in ('base', 'reference', 'tuned')) / 1e6:.2f} MB")
    phase("write")

    # 5. verify through llama.cpp ---------------------------------------------
    prompts = [chat_ids([(qa(eval_rng, held_people[0], "city", 0)[0], None)]),
               tok("The favourite colour of " + held_people[1]["name"] + " is", True),
               tok(docs_text[3], True)[:60]]
    worst = 0.0  # max |logit diff| relative to the largest |logit| of the prompt (float32 noise)
    for name, m in models.items():
        d_model, rel = logit_diff(out / f"{name}.gguf", m, prompts, args.threads)
        worst = max(worst, rel)
        print(f"  {name}: max |logit diff| llama.cpp vs torch = {d_model:.2e}")
    # float32 and llama.cpp's F16 KV cache differ by ~1e-3 of the logit scale; a wrong layout by ~1.
    if worst > 5e-3:
        sys.exit(f"error: llama.cpp logits differ from torch by {worst:.3g} of the logit scale")
    phase("verify")

    # 6. second fine-tune (style B) -------------------------------------------
    # Runs last and draws nothing from rng / eval_rng / torch's generator (its own numpy seed), so
    # every file above is unchanged by it. Same people and questions as TUNED, other answers.
    convs_b = [chat_ids([(QUESTIONS[a][qi].format(n=p["name"]), answer_b(p, a))])
               for p in ft_people for a in ATTRS for qi in range(len(QUESTIONS[a]))]
    for ids, _ in convs_b[:8]:
        assert 0 not in ids, "style-B text must tokenize without <unk>"
    tuned_b = copy.deepcopy(small)
    finetune(tuned_b, convs_b, ft_steps * 5 // 2, 32, 1e-3, args.seed + 23, "tuned_b")
    write_gguf(out / "tuned_b.gguf", tuned_b, entries, f"eft-demo-tuned_b-seed{args.seed}")
    _, d_model = logit_diff(out / "tuned_b.gguf", tuned_b, prompts, args.threads)
    print(f"  tuned_b: max relative |logit diff| llama.cpp vs torch = {d_model:.2e}")
    if d_model > 5e-3:
        sys.exit(f"error: tuned_b llama.cpp logits differ from torch by {d_model:.3g}")
    phase("tuned_b")
    print("timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}),
          f"total {time.time() - T0:.0f}s")


if __name__ == "__main__":
    main()
