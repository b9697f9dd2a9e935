"""Command line: ``onnxprune IN OUT --ratio R``, ``onnxprune inspect IN``, ``onnxprune eval MODEL``.

User errors print one line and exit 2; a fidelity check below ``--min-cosine`` exits 3 (the
output is written only with ``--keep-failed``); anything else is a bug and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from onnxprune import __version__
from onnxprune.coupling import BlockKind, BlockReason
from onnxprune.depgraph import ChannelGroup
from onnxprune.errors import FidelityError, OnnxPruneError, UserError
from onnxprune.evidence.calibration import load_calibration
from onnxprune.ir import input_specs, load_model_info, parse_input_shapes, save_model
from onnxprune.passes.registry import METHODS
from onnxprune.pipeline import DEFAULT_METHOD, PruneReport, analyse, default_target, prune
from onnxprune.plan import PruningPlan

console = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the width
out = Console()


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got '{text}'") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {value}")
    return value


def _range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got '{text}'") from None
    if not low < high:
        raise argparse.ArgumentTypeError(f"needs LO < HI, got '{text}'")
    return low, high


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other user error
        raise UserError(f"{message} (see {self.prog} --help)")


def _target(args) -> str:
    """What the budget counts: ``--target`` (a share), else ``--budget`` (the uniform ratio's
    amount), else the method's default."""
    if args.target and args.budget:
        raise UserError("--budget goes with --ratio; --target already says what to keep")
    if args.target:
        return args.target
    return args.budget or default_target(args.method)


def _prune_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune", description="Data-free structured pruning of ONNX models. "
                "Other commands: 'onnxprune inspect IN', 'onnxprune eval MODEL --data D.npz'.")
    p.add_argument("input", help="the model to prune (.onnx, external data beside it)")
    p.add_argument("output", help="where to write the pruned model")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--ratio", type=_ratio,
                      help="share of each group's channels to remove, in (0, 1) (default 0.4); methods that allocate "
                           "(paoding, srdfp) remove at least the MACs this uniform plan removes")
    size.add_argument("--target", metavar="KIND=SHARE",
                      help="instead of --ratio: what to keep, macs=S or params=S (S in (0, 1), a share of the "
                           "model's), e.g. --target macs=0.5")
    p.add_argument("--method", choices=sorted(METHODS), default=DEFAULT_METHOD,
                   help="how channels are chosen: " + "; ".join(f"{k}: {m.description}" for k, m in METHODS.items()))
    p.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...",
                   help="concrete shape for an input with dynamic dimensions (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="protect groups touching nodes whose names match (repeatable)")
    p.add_argument("--round-to", type=_positive, default=1, metavar="N", help="keep channel counts multiples of N")
    p.add_argument("--input-range", type=_range, metavar="LO,HI",
                   help="the range input values live in (synthetic probes stay inside it)")
    p.add_argument("--calibration", metavar="FILE.npz",
                   help="opt-in: unlabelled inputs (one array per model input, named after it, samples on the "
                        "first axis) that replace the synthetic inputs everywhere; the last quarter (at most 64) "
                        "is held out for the fidelity check, planning uses the rest")
    p.add_argument("--step", type=_ratio, metavar="S",
                   help="progressive methods: share of each group removed per step "
                        "(default 0.025; 0.05 for models above 1 GMAC)")
    p.add_argument("--prune-hidden", action="store_true",
                   help="transformers: also prune the residual stream's width (LayerNorm makes it approximate)")
    p.add_argument("--prune-head-dim", action="store_true",
                   help="transformers: prune dimensions inside each attention head instead of whole heads")
    p.add_argument("--budget", choices=["channels", "macs", "params"],
                   help="with --ratio, what the allocating methods (paoding, srdfp) match of the uniform plan: "
                        "its MACs (their default), its parameters, or its channel count; measured impact "
                        "decides where the cuts go")
    p.add_argument("--alpha", type=float, default=0.5, help="srdfp: weight of the output deviation's spread")
    p.add_argument("--beta", type=float, default=0.5, help="srdfp: weight of the output deviation's entropy")
    p.add_argument("--intervals", action="store_true",
                   help="srdfp: robustness from sound interval propagation of each candidate's deviation "
                        "(paoding-dl's measure) instead of the probes' empirical intervals")
    p.add_argument("--reconstruction", choices=["least-squares", "pair"],
                   help="how removed channels are compensated: from every kept channel by least squares fitted "
                        "on synthetic inputs (default for paoding/srdfp, except under LayerNorm), or merged into "
                        "one look-alike each, as the papers do (magnitude/random: mean and variance only; their "
                        "default)")
    p.add_argument("--no-compensation", action="store_true",
                   help="do not compensate removed channels (bias, variance, merges): the raw baseline")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    p.add_argument("--check", type=int, default=8, metavar="N",
                   help="synthetic probes for the fidelity check (default 8, 0 to skip the report)")
    p.add_argument("--min-cosine", type=float, metavar="X",
                   help="fail with exit code 3 if the mean output cosine on probes falls below X")
    p.add_argument("--keep-failed", action="store_true", help="write the output even if --min-cosine fails")
    p.add_argument("--report", metavar="R.json", help="write the report (and the plan) as JSON")
    p.add_argument("--save-plan", metavar="P.json", help="write the pruning plan as JSON")
    p.add_argument("--plan", metavar="P.json", help="apply a saved plan instead of planning")
    p.add_argument("--latency", action="store_true", help="also time both models in onnxruntime")
    p.add_argument("--force", action="store_true", help="allow the output to overwrite the input")
    p.add_argument("--dry-run", action="store_true", help="plan and check, write nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    p.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    return p


@contextmanager
def _progress():
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        tasks = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)
        yield update


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def summary_table(report: PruneReport, latency: tuple[float, float, float] | None = None) -> Table:
    b, a = report.before, report.after
    aim = f"target {report.target}, ratio {report.ratio:.3g}" if "=" in report.target else \
        f"ratio {report.ratio:g}" + (f", budget {report.target}" if report.target != "channels" else "")
    table = Table(title=f"onnxprune: {report.method}, {aim}", title_justify="left")
    for col, just in (("", "left"), ("before", "right"), ("after", "right"), ("kept", "right")):
        table.add_column(col, justify=just)

    def row(name, x, y, fmt=_human):
        table.add_row(name, fmt(x), fmt(y), f"{y / x:.1%}" if x else "-")
    row("parameters", b.params, a.params)
    row("MACs", b.macs, a.macs)
    row("size (bytes)", b.bytes, a.bytes)
    row("nodes", b.nodes, a.nodes, str)
    for op in sorted(set(b.ops) | set(a.ops)):
        if b.ops.get(op, 0) != a.ops.get(op, 0):
            row(f"  {op}", b.ops.get(op, 0), a.ops.get(op, 0), str)
    if latency:
        table.add_row("latency (ms)", f"{latency[0]:.3f}", f"{latency[1]:.3f}", f"{latency[2]:.1%}")
    table.add_section()
    table.add_row("groups pruned", f"{report.groups_pruned}/{report.groups_total}",
                  f"{report.channels_removed} ch", f"of {report.channels_prunable} prunable")
    if report.fidelity:
        f = report.fidelity
        top1 = f"{f.top1:.1%}" if f.top1 is not None else "-"
        table.add_row(f"fidelity ({f.probes} held-out)", f"cos {f.cosine:.4f}", f"relL2 {f.rel_l2:.4f}", f"top1 {top1}")
    table.add_row("time", "", f"{sum(report.seconds.values()):.2f} s", "")
    return table


def _blocked_table(report: PruneReport) -> Table | None:
    if not report.blocked:
        return None
    table = Table(title="groups left alone", title_justify="left")
    table.add_column("groups", justify="right")
    table.add_column("why")
    for reason, count in sorted(report.blocked.items(), key=lambda kv: -kv[1])[:12]:
        table.add_row(str(count), reason)
    if len(report.blocked) > 12:
        table.add_row("…", f"{len(report.blocked) - 12} more reasons (onnxprune inspect lists all)")
    return table


def run_prune(argv: list[str]) -> int:
    args = _prune_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    src, dst = Path(args.input), Path(args.output)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve() and not args.force:
        raise UserError(f"output {dst} is the input; pass --force to overwrite it")
    if not args.dry_run and not (dst.parent if str(dst.parent) else Path(".")).is_dir():
        raise UserError(f"output folder {dst.parent} does not exist")
    model, external = load_model_info(src)
    calibration = load_calibration(args.calibration, input_specs(model)) if args.calibration else None
    plan = PruningPlan.load(args.plan) if args.plan else None
    with _progress() as progress:
        try:
            pruned, report = prune(model, args.ratio, method=args.method,
                                   input_shapes=parse_input_shapes(args.input_shape), exclude=args.exclude,
                                   round_to=args.round_to, seed=args.seed, check=args.check,
                                   min_cosine=args.min_cosine, plan=plan, progress=progress,
                                   compensate=not args.no_compensation, input_range=args.input_range,
                                   step=args.step,
                                   method_options={"alpha": args.alpha, "beta": args.beta, "intervals": args.intervals}
                                   if args.method == "srdfp" else None, target=_target(args),
                                   reconstruction=args.reconstruction, calibration=calibration,
                                   options={"prune_hidden": args.prune_hidden, "prune_head_dim": args.prune_head_dim})
            failure = None
        except FidelityError as exc:
            pruned, report, failure = exc.model, exc.report, exc
    latency = None
    if args.latency:
        from onnxprune.fidelity import latency_ratio
        latency = latency_ratio(model, pruned, report.input_shapes)
    out.print(summary_table(report, latency))
    if report.fidelity and report.calibration:
        out.print(f"fidelity measured on {report.fidelity.probes} {report.fidelity.inputs} (unlabelled: "
                  "`onnxprune eval` measures accuracy)", style="dim")
    elif report.fidelity:
        out.print(f"fidelity measured on {report.fidelity.probes} {report.fidelity.inputs} (not real data: "
                  "`onnxprune eval` measures that)", style="dim")
    for warning in report.warnings:
        out.print(f"warning: {warning}", style="yellow")
    blocked = _blocked_table(report)
    if blocked is not None:
        out.print(blocked)
    if args.report:
        data = report.to_dict()
        if latency:
            data["latency_ms"] = {"before": latency[0], "after": latency[1], "ratio": latency[2]}
        Path(args.report).write_text(json.dumps(data, indent=1))
    if args.save_plan:
        report.plan.save(args.save_plan)
    if failure is not None and not args.keep_failed:
        console.print(f"[red]onnxprune: {failure}; nothing written (use --keep-failed to write it)[/]")
        return failure.exit_code
    if args.dry_run:
        console.print("dry run: nothing written")
    else:
        written = save_model(pruned, dst, external_data=external or None)
        console.print(f"wrote {', '.join(str(p) for p in written)}")
    return failure.exit_code if failure is not None else 0


def run_inspect(argv: list[str]) -> int:
    p = _Parser(prog="onnxprune inspect", description="List every channel group: size, members, "
                "prunable or the reason it is not.")
    p.add_argument("input")
    p.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...")
    p.add_argument("--prune-hidden", action="store_true", help="transformers: include the residual stream")
    p.add_argument("--prune-head-dim", action="store_true", help="transformers: dimensions inside heads")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    model, _ = load_model_info(args.input)
    analysis = analyse(model, parse_input_shapes(args.input_shape),
                       {"prune_hidden": args.prune_hidden, "prune_head_dim": args.prune_head_dim})
    groups = analysis.dep.groups
    rows = [{"id": g.id, "name": g.name, "size": g.size, "spaces": len(g.spaces),
             "producers": [n.name for n in g.producers], "members": len(g.nodes),
             "prunable": g.prunable, "why": g.blocked, "reasons": [r.to_dict() for r in g.reasons]}
            for g in groups]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table(title=f"{args.input}: {len(rows)} channel groups, "
                        f"{sum(r['prunable'] for r in rows)} prunable", title_justify="left")
    for col in ("id", "producers", "channels", "nodes", "status"):
        table.add_column(col, justify="right" if col in ("id", "channels", "nodes") else "left")
    for r in rows:
        status = "[green]prunable[/]" if r["prunable"] else f"[yellow]blocked[/]: {r['why'][0]}"
        table.add_row(str(r["id"]), r["name"], str(r["size"]), str(r["members"]), status)
    out.print(table)
    kinds = _kinds_table(groups)
    if kinds is not None:
        out.print(kinds)
    return 0


def _kinds_table(groups: list[ChannelGroup]) -> Table | None:
    """Blocked groups by kind of refusal, most frequent first, each with its first example.
    A group blocked for reasons of several kinds counts under each of them."""
    examples: dict[BlockKind, BlockReason] = {}
    counts: dict[BlockKind, int] = {}
    for g in groups:
        for reason in g.reasons:
            if reason.kind not in examples:
                examples[reason.kind] = reason
        for kind in {r.kind for r in g.reasons}:
            counts[kind] = counts.get(kind, 0) + 1
    if not counts:
        return None
    table = Table(title="blocked groups by kind (a group counts under each kind it meets)", title_justify="left")
    for col in ("kind", "groups", "example", "node"):
        table.add_column(col, justify="right" if col == "groups" else "left")
    order = list(BlockKind)
    for kind in sorted(counts, key=lambda k: (-counts[k], order.index(k))):
        example = examples[kind]
        table.add_row(kind.value, str(counts[kind]), example.message, example.node or "-")
    return table


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"epsilons are fractions of the input range in (0, 1), got '{text}'")
    return values


def run_eval(argv: list[str]) -> int:
    from onnxprune.evaluate import compare, evaluate, load_npz

    p = _Parser(prog="onnxprune eval", description="Top-1 accuracy and adversarial robustness (FGSM, PGD) "
                "on labelled data; with --compare, an original and a pruned model side by side.")
    p.add_argument("model")
    p.add_argument("--data", required=True, metavar="D.npz", help="arrays x (inputs) and y (integer labels)")
    p.add_argument("--compare", metavar="PRUNED", help="a pruned model to evaluate beside MODEL")
    p.add_argument("--epsilons", type=_floats, default=[0.01, 0.05, 0.1], metavar="E1,E2,...",
                   help="FGSM strengths as fractions of the input range (default 0.01,0.05,0.1)")
    p.add_argument("--pgd-steps", type=int, default=10, metavar="N", help="PGD iterations (0 skips PGD)")
    p.add_argument("--pgd-epsilon", type=float, metavar="E", help="PGD strength (default: the middle epsilon)")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.add_argument("--report", metavar="R.json", help="write the results as JSON")
    args = p.parse_args(argv)
    x, y = load_npz(args.data, load_model_info(args.model)[0])
    options = dict(epsilons=args.epsilons, pgd_steps=args.pgd_steps, pgd_epsilon=args.pgd_epsilon,
                   batch_size=args.batch_size)
    with _progress() as progress:
        def tick(done: int, total: int, label: str) -> None:
            progress("evaluating", done, total)
        if args.compare:
            result = compare(load_model_info(args.model)[0], load_model_info(args.compare)[0], x, y,
                             progress=tick, **options)
            reports = {"original": result.original, "pruned": result.pruned}
        else:
            result = evaluate(load_model_info(args.model)[0], x, y, progress=tick, **options)
            reports = {"model": result}
    table = Table(title=f"eval: {len(y)} samples of {Path(args.data).name}", title_justify="left")
    table.add_column("")
    for name in reports:
        table.add_column(name, justify="right")
    first = next(iter(reports.values()))
    table.add_row("accuracy", *[f"{r.accuracy:.4f}" for r in reports.values()])
    for eps in first.fgsm:
        table.add_row(f"FGSM ε={eps:g}", *[f"{r.fgsm[eps]:.4f}" for r in reports.values()])
    for eps in first.pgd:
        table.add_row(f"PGD-{first.pgd_steps} ε={eps:g}", *[f"{r.pgd[eps]:.4f}" for r in reports.values()])
    if args.compare:
        table.add_section()
        table.add_row("top-1 agreement", "", f"{result.agreement:.4f}")
        table.add_row("output cosine", "", f"{result.cosine:.4f}")
    table.add_row("gradient", *[r.gradient for r in reports.values()])
    out.print(table)
    if args.report:
        Path(args.report).write_text(json.dumps(result.to_dict(), indent=1))
    return 0


COMMANDS = {"inspect": run_inspect, "eval": run_eval}
#: Options whose value may start with a minus sign that argparse would take for an option
#: (``--input-range -0.95,2.15``).
SIGNED_VALUES = ("--input-range",)


def attach_signed_values(argv: list[str]) -> list[str]:
    """``--opt -1,2`` becomes ``--opt=-1,2`` for the options in SIGNED_VALUES."""
    out, k = [], 0
    while k < len(argv):
        if argv[k] in SIGNED_VALUES and k + 1 < len(argv) and argv[k + 1].startswith("-") and argv[k + 1][1:2] in "0123456789.":
            out.append(f"{argv[k]}={argv[k + 1]}")
            k += 2
            continue
        out.append(argv[k])
        k += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = attach_signed_values(list(sys.argv[1:] if argv is None else argv))
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else run_prune(argv)
    except OnnxPruneError as exc:
        kind = "error" if isinstance(exc, UserError) else "internal error (a bug, please report it)"
        console.print(f"[red]onnxprune: {kind}:[/] {exc}", highlight=False)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("[red]onnxprune: interrupted; nothing written[/]")
        return 130
    except Exception as exc:  # a bug: say so, keep the traceback for those who ask
        if os.environ.get("ONNXPRUNE_DEBUG"):
            raise
        console.print(f"[red]onnxprune: internal error (a bug, please report it; ONNXPRUNE_DEBUG=1 shows "
                      f"the traceback):[/] {type(exc).__name__}: {exc}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
