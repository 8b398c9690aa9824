"""Measure EFT up-scaling on the bundled demo models with the real engine (greedy).

    .venv/bin/python models/demo/check_demo.py                    # heldout.jsonl, all configs
    .venv/bin/python models/demo/check_demo.py --data finetuned.jsonl --limit 50

Configurations (base + weight * (tuned - reference)):
  small tuned   EFT(tuned, tuned, tuned)
  large base    EFT(base, base, base)
  up-scaled     EFT(base, tuned, reference), w=1
  down-scaled   EFT(reference, oracle, base), w=1
  oracle        EFT(oracle, oracle, oracle)

format following: finish_reason == "stop" (the tuned model's end token ended the reply) and the
reply has at most 16 words; factual accuracy: the reference answer appears in the reply
(case-insensitive).  The targets on heldout.jsonl: up-scaled accuracy >= 2x small tuned and
within 15 points of the oracle; up-scaled format >= 90% while the large base alone is < 30%.

    .venv/bin/python models/demo/check_demo.py --mix --limit 100  # style mix, lam 0..1

--mix mixes two fine-tuning deltas on the large base,
EFT(base, deltas=[(tuned, reference, 1 - lam), (tuned_b, reference, lam)]), and prints per lam the
share of replies in style B (tuned_b.gguf: "They were born in Kelvar.", matched by STYLE_B_RE),
in style A (tuned.gguf: "Their birthplace is Kelvar.", STYLE_A_RE), accuracy and format.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

from eft_local import EFT

HERE = pathlib.Path(__file__).resolve().parent
MAX_WORDS = 16
# Style B (tuned_b.gguf): "They were born in X." / "They work as a X." / "They like the colour
# X best." / "They like to eat X." -- the reply opens with "They" (re.search on the stripped reply;
# trailing junk after the sentence is a format failure, counted separately).
STYLE_B_RE = r"^They\b"
# Style A (tuned.gguf): "Their birthplace is X." / "Their profession is X." ... -- opens with "Their".
STYLE_A_RE = r"^Their\b"
MIX_LAMS = (0.0, 0.25, 0.5, 0.75, 1.0)


def run_mix(d, items, threads, show, lams=MIX_LAMS):
    B, R, T, TB = (d / f"{n}.gguf" for n in ("base", "reference", "tuned", "tuned_b"))
    rows = []
    for lam in lams:
        sb = sa = fmt = acc = 0
        t0 = time.time()
        with EFT(str(B), deltas=[(str(T), str(R), 1 - lam), (str(TB), str(R), lam)],
                 n_threads=threads) as e:
            for i, it in enumerate(items):
                r = e.chat([{"role": "user", "content": it["prompt"]}], temperature=0, max_tokens=32)
                txt = r.text.strip()
                b = re.search(STYLE_B_RE, txt) is not None
                a_ = re.search(STYLE_A_RE, txt) is not None
                f = r.finish_reason == "stop" and len(r.text.split()) <= MAX_WORDS
                ok = it["answer"].lower() in r.text.lower()
                sb += b
                sa += a_
                fmt += f
                acc += ok
                if i < show:
                    print(f"    lam={lam}: {it['prompt']!r} -> {r.text!r} [{r.finish_reason}] "
                          f"B={b} fmt={f} ok={ok}")
        n = len(items)
        rows.append((lam, 100 * sb / n, 100 * sa / n, 100 * acc / n, 100 * fmt / n, time.time() - t0))
        print(f"  lam={lam:.2f}: style B {rows[-1][1]:.1f}%  style A {rows[-1][2]:.1f}%  "
              f"accuracy {rows[-1][3]:.1f}%  format {rows[-1][4]:.1f}%  ({rows[-1][5]:.0f}s)", flush=True)
    print()
    print("| lam | style B % | style A % | accuracy % | format % |")
    print("|---|---|---|---|---|")
    for lam, b, a_, acc, f, _ in rows:
        print(f"| {lam:.2f} | {b:.1f} | {a_:.1f} | {acc:.1f} | {f:.1f} |")
    shares = [r[1] for r in rows]
    checks = [
        ("style B share rises monotonically with lam", all(x <= y for x, y in zip(shares, shares[1:]))),
        ("style B <= 10% at lam=0 and >= 90% at lam=1", shares[0] <= 10 and shares[-1] >= 90),
    ]
    print()
    for name, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    return 0 if all(ok for _, ok in checks) else 1


def run(cfg, items, threads, show):
    base, tuned, ref, w = cfg
    fmt = acc = ntok = 0
    t0 = time.time()
    with EFT(base=str(base), tuned=str(tuned), reference=str(ref), weight=w, n_threads=threads) as e:
        for i, it in enumerate(items):
            r = e.chat([{"role": "user", "content": it["prompt"]}], temperature=0, max_tokens=32)
            f = r.finish_reason == "stop" and len(r.text.split()) <= MAX_WORDS
            a = it["answer"].lower() in r.text.lower()
            fmt += f
            acc += a
            ntok += len(r.tokens)
            if i < show:
                print(f"    {it['prompt']!r} -> {r.text!r} [{r.finish_reason}] fmt={f} ok={a}")
    n = len(items)
    return 100 * fmt / n, 100 * acc / n, ntok / n, time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(HERE), help="folder with the GGUFs (default: this folder)")
    ap.add_argument("--data", default="heldout.jsonl", help="JSONL file, relative to --dir or a path")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N items")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--show", type=int, default=0, help="print the first N replies per config")
    ap.add_argument("--only", default="", help="comma list of config labels to run")
    ap.add_argument("--mix", action="store_true",
                    help="mix the tuned and tuned_b deltas on the base for lam = 0, .25, .5, .75, 1")
    args = ap.parse_args(argv)

    d = pathlib.Path(args.dir)
    data = pathlib.Path(args.data)
    if not data.exists():
        data = d / args.data
    items = [json.loads(l) for l in data.read_text().splitlines() if l.strip()]
    if args.limit:
        items = items[:args.limit]
    if args.mix:
        print(f"{data.name}: {len(items)} items, deltas (tuned, reference, 1-lam) + (tuned_b, reference, lam)")
        return run_mix(d, items, args.threads, args.show)
    B, R, T, O = (d / f"{n}.gguf" for n in ("base", "reference", "tuned", "oracle"))
    configs = {
        "small tuned": (T, T, T, 1.0),
        "large base": (B, B, B, 1.0),
        "up-scaled EFT": (B, T, R, 1.0),
        "down-scaled EFT": (R, O, B, 1.0),
        "oracle": (O, O, O, 1.0),
    }
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    res = {}
    print(f"{data.name}: {len(items)} items")
    for label, cfg in configs.items():
        if only and label not in only:
            continue
        res[label] = run(cfg, items, args.threads, args.show)
        print(f"  {label}: format {res[label][0]:.1f}%  accuracy {res[label][1]:.1f}%  "
              f"tokens {res[label][2]:.1f}  ({res[label][3]:.0f}s)", flush=True)

    print()
    print("| config | format % | accuracy % | mean tokens |")
    print("|---|---|---|---|")
    for label, (f, a, t, _) in res.items():
        print(f"| {label} | {f:.1f} | {a:.1f} | {t:.1f} |")
    if all(k in res for k in ("small tuned", "large base", "up-scaled EFT", "oracle")):
        up, st, lb, orc = res["up-scaled EFT"], res["small tuned"], res["large base"], res["oracle"]
        checks = [
            ("up-scaled accuracy >= 2x small tuned", up[1] >= 2 * st[1]),
            ("up-scaled accuracy within 15 points of oracle", up[1] >= orc[1] - 15),
            ("up-scaled format >= 90%", up[0] >= 90),
            ("large base format < 30%", lb[0] < 30),
        ]
        print()
        for name, ok in checks:
            print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
        return 0 if all(ok for _, ok in checks) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
