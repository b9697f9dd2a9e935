"""Byte fingerprints of pruned models: every model in models/ x method variant x ratio.

A refactor that claims "behaviour unchanged" must leave every fingerprint as it was: the same
bytes give the same accuracy, MACs and parameters in every cell of ``make bench``, without
evaluating anything. Run it before and after, and diff the two files:

    python bench/fingerprint.py --out before.json   # on the old commit
    python bench/fingerprint.py --out after.json    # on the new one
    python bench/fingerprint.py --compare before.json after.json

Variants are the bench's: NAME, NAME-raw (no compensation), NAME-ls / NAME-pair
(reconstruction), NAME-macs (MAC budget).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
VARIANTS = ["magnitude", "random", "paoding", "srdfp", "magnitude-raw", "magnitude-ls", "paoding-pair",
            "paoding-macs", "srdfp-macs"]


def fingerprints(models: list[str], ratios: list[float], variants: list[str], exporter: str) -> dict[str, str]:
    from onnxprune import prune  # imported here so that --compare needs no onnxprune
    from onnxprune.ir import load_model

    manifest = json.loads((MODELS / "manifest.json").read_text())
    out = {}
    for entry in manifest:
        if entry["exporter"] != exporter or (models and entry["name"] not in models):
            continue
        model = load_model(MODELS / entry["file"])
        for variant in variants:
            name, _, kind = variant.partition("-")
            reconstruction = {"ls": "least-squares", "pair": "pair"}.get(kind)
            for ratio in ratios:
                key = f"{entry['name']}/{variant}/{ratio:g}"
                t0 = time.perf_counter()
                try:
                    pruned, _ = prune(model, ratio, method=name, compensate=kind != "raw",
                                      target="macs" if kind == "macs" else "channels",
                                      reconstruction=reconstruction, input_range=(0.0, 1.0), check=1)
                    out[key] = hashlib.sha256(pruned.SerializeToString()).hexdigest()
                except Exception as exc:  # a failure is a fingerprint too: it must stay a failure
                    out[key] = f"error: {type(exc).__name__}: {exc}"
                print(f"{key:32s} {out[key][:16]} {time.perf_counter() - t0:6.1f}s", file=sys.stderr, flush=True)
    return out


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    changed = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    missing = sorted(a.keys() ^ b.keys())
    for k in changed:
        print(f"changed  {k}")
    for k in missing:
        print(f"only in one file  {k}")
    print(f"{len(a.keys() & b.keys()) - len(changed)} identical, {len(changed)} changed, {len(missing)} unmatched")
    return 1 if changed or missing else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[])
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.2, 0.4, 0.6])
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fingerprints.json"))
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    prints = fingerprints(args.models, args.ratios, args.variants, args.exporter)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prints, indent=1, sort_keys=True))
    print(f"wrote {len(prints)} fingerprints to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
