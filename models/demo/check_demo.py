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
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from eft_local import EFT

HERE = pathlib.Path(__file__).resolve().parent
MAX_WORDS = 16


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
    args = ap.parse_args(argv)

    d = pathlib.Path(args.dir)
    data = pathlib.Path(args.data)
    if not data.exists():
        data = d / args.data
    items = [json.loads(l) for l in data.read_text().splitlines() if l.strip()]
    if args.limit:
        items = items[:args.limit]
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
    print(f"| config | format % | accuracy % | mean tokens |")
    print(f"|---|---|---|---|")
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
