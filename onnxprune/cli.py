"""The `onnxprune` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import OnnxPruneError
from .parity import DEFAULT_ATOL, DEFAULT_RTOL

EPILOG = "exit codes: 0 ok, 1 parity check failed, 2 bad input or impossible request"


def _progress(msg: str) -> None:
    print(f"[onnxprune] {msg}", file=sys.stderr, flush=True)


def _parity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", metavar="NPZ", help="inputs for the parity check, keyed by input name "
                   "(an extra leading axis = several batches); default: seeded random inputs")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="absolute tolerance (default %(default)g)")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="relative tolerance (default %(default)g); "
                   "an element fails only if it exceeds both")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="onnxprune",
        description="Turn a pruned ONNX model into a smaller, faster one that computes the same function.",
        epilog=EPILOG,
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="zero 50%% of a zoo model's filters, export, simplify, check and time it (no files needed)",
                       description="Build a model from models/, zero a fraction of its filters at random (weights only), "
                       "export it to ONNX, simplify, check parity against PyTorch and the input, and time all three on onnxruntime.",
                       epilog=EPILOG)
    d.add_argument("--model", default="mobilenet_v2", help="zoo model (default %(default)s; see --list)")
    d.add_argument("--list", action="store_true", help="list the zoo models and exit")
    d.add_argument("--sparsity", type=float, default=0.5, help="fraction of filters zeroed per layer (default %(default)s)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=1, help="onnxruntime threads for timing (default %(default)s)")
    d.add_argument("--scale", type=float, default=4, help="width and input size relative to the zoo's test size (default %(default)s)")
    d.add_argument("--out", metavar="DIR", help="keep the exported and simplified models in DIR")

    s = sub.add_parser("simplify", help="fold BN, propagate constants, remove dead channels, check parity",
                       description="Simplify a pruned ONNX model. The result is written only if it computes the same "
                       "function as the input on onnxruntime (unless --no-check).", epilog=EPILOG)
    s.add_argument("model", help="input .onnx (never modified)")
    s.add_argument("-o", "--output", help="output path (default: <input>.simplified.onnx)")
    s.add_argument("--no-fold-bn", action="store_true", help="skip folding BatchNormalization into Conv/Gemm")
    s.add_argument("--no-propagate", action="store_true", help="skip folding constant channels into the layers that read them")
    s.add_argument("--no-remove", action="store_true", help="skip removing dead channels")
    s.add_argument("--pin", action="append", default=[], metavar="TENSOR", help="never touch the channels of this tensor (repeatable)")
    s.add_argument("--align", type=int, default=8, metavar="N", help="keep layer widths multiples of N where they were, "
                   "sparing a few dead channels: onnxruntime's fast conv kernels want it (default %(default)s; 1 removes all)")
    s.add_argument("--no-check", action="store_true", help="write the result without the parity check")
    s.add_argument("-v", "--verbose", action="store_true", help="channels removed per layer, pin reasons")
    s.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    _parity_args(s)

    c = sub.add_parser("check", help="compare two models on onnxruntime; exit 0 if equal within tolerance, 1 if not",
                       description="Run both models on the same inputs (onnxruntime, optimizations off) and compare "
                       "outputs: an element fails only if |a-b| > atol and |a-b| > rtol*|reference|.", epilog=EPILOG)
    c.add_argument("reference", help="the reference model (e.g. the pruned input)")
    c.add_argument("candidate", help="the model to check (e.g. the simplified one)")
    c.add_argument("--json", action="store_true")
    _parity_args(c)

    p = sub.add_parser("prune", help="make the zeros: dependency-aware filters, level, 1xN blocks, NNI-style configs",
                       description="Prune an ONNX model: zero filters (a coupled channel is zeroed in every layer producing it), "
                       "single weights (--criterion level) or 1xN blocks. The first layer and the classifier are left alone "
                       "unless --prune-first / --prune-last.", epilog=EPILOG)
    p.add_argument("model", help="input .onnx (never modified)")
    p.add_argument("-o", "--output", help="output path (default: <input>.pruned.onnx)")
    p.add_argument("--criterion", default="l1", choices=["l1", "l2", "fpgm", "random", "apoz", "mean_activation", "level"],
                   help="importance: filter norms, FPGM (geometric median), random, activation-based (apoz, "
                   "mean_activation: need --calib), or level (unstructured magnitude) (default %(default)s)")
    p.add_argument("--sparsity", type=float, help="fraction to prune in every selected layer, in [0, 1)")
    p.add_argument("--granularity", choices=["filter", "weight", "1xN"], help="default: filter (weight for level)")
    p.add_argument("--n", type=int, default=4, help="block height N of 1xN blocks (default %(default)s)")
    p.add_argument("--rearrange", action="store_true", help="permute channels first so that 1xN blocks group similar filters")
    p.add_argument("--config", metavar="YAML", help="NNI-style config list: sparsity, op_types, op_names, exclude")
    p.add_argument("--group-reduce", default="sum", choices=["sum", "mean", "max"], help="how coupled layers' scores combine")
    p.add_argument("--prune-first", action="store_true", help="also prune the first layer")
    p.add_argument("--prune-last", action="store_true", help="also prune the classifier")
    p.add_argument("--calib", metavar="NPZ", help="calibration inputs for apoz / mean_activation (default: seeded random, with a warning)")
    p.add_argument("--masks", metavar="NPZ", help="apply these keep-masks (keyed by initializer name) instead of computing them")
    p.add_argument("--save-masks", metavar="NPZ", help="write the masks applied, keyed by initializer name")
    p.add_argument("--simplify", action="store_true", help="simplify the pruned model (parity-checked) before writing it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")

    r = sub.add_parser("rearrange", help="permute channels so 1xN blocks group similar filters; exact parity with the input",
                       epilog=EPILOG)
    r.add_argument("model")
    r.add_argument("-o", "--output", help="output path (default: <input>.rearranged.onnx)")
    r.add_argument("--n", type=int, default=4, help="block height N (default %(default)s)")
    r.add_argument("--no-check", action="store_true", help="skip the parity check")
    _parity_args(r)

    i = sub.add_parser("inspect", help="ops, parameters, MACs, channel classes and what is pinned and why",
                       epilog=EPILOG)
    i.add_argument("model")
    i.add_argument("--pin", action="append", default=[], metavar="TENSOR")
    i.add_argument("-v", "--verbose", action="store_true", help="list every layer")
    i.add_argument("--json", action="store_true")
    return ap


def default_output(path: str, suffix: str = "simplified") -> Path:
    p = Path(path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(f"{stem}.{suffix}.onnx")


def cmd_simplify(args) -> int:
    from .api import simplify_file

    report = simplify_file(
        args.model, args.output or default_output(args.model), fold_bn=not args.no_fold_bn,
        propagate=not args.no_propagate, remove=not args.no_remove, pins=args.pin, align=args.align, check=not args.no_check,
        inputs=args.inputs, atol=args.atol, rtol=args.rtol, seed=args.seed, progress=_progress,
    )
    print(report.to_json() if args.json else report.table(verbose=args.verbose))
    return 0


def cmd_prune(args) -> int:
    from .api import prune_file

    report, simplified = prune_file(
        args.model, args.output or default_output(args.model, "pruned"), criterion=args.criterion, sparsity=args.sparsity,
        granularity=args.granularity, n=args.n, rearrange=args.rearrange, config=args.config,
        group_reduce=args.group_reduce, prune_first=args.prune_first, prune_last=args.prune_last, calib=args.calib,
        masks=args.masks, save_masks=args.save_masks, simplify_after=args.simplify, seed=args.seed, progress=_progress,
    )
    if args.json:
        import json
        print(json.dumps({"prune": report.as_dict(), "simplify": simplified.as_dict() if simplified else None}, indent=2, default=str))
    else:
        print(report.table())
        if simplified is not None:
            print()
            print(simplified.table())
    return 0


def cmd_rearrange(args) -> int:
    from .api import rearrange_file

    out = args.output or default_output(args.model, "rearranged")
    moved, parity = rearrange_file(args.model, out, n=args.n, check=not args.no_check, inputs=args.inputs,
                                   atol=args.atol, rtol=args.rtol, seed=args.seed)
    print(f"rearranged {moved} layer group(s); wrote {out}")
    if parity is not None:
        print(f"parity with the input: {'PASS' if parity.passed else 'FAIL'}")
        print("\n".join("  " + line for line in parity.lines()))
    return 0


def cmd_check(args) -> int:
    from .api import check

    rep = check(args.reference, args.candidate, inputs=args.inputs, atol=args.atol, rtol=args.rtol, seed=args.seed)
    if args.json:
        import json
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        print(f"parity (onnxruntime, atol {rep.atol:g}, rtol {rep.rtol:g}, {rep.batches} batches): {'PASS' if rep.passed else 'FAIL'}")
        print("\n".join("  " + line for line in rep.lines()))
    return 0 if rep.passed else 1


def cmd_inspect(args) -> int:
    from .api import inspect

    info = inspect(args.model, pins=args.pin)
    if args.json:
        import json
        print(json.dumps(info.as_dict(), indent=2))
    else:
        print(info.text(verbose=args.verbose))
    return 0


def cmd_demo(args) -> int:
    from .demo import list_models, run_demo

    if args.list:
        print("\n".join(list_models()))
        return 0
    print(run_demo(args.model, sparsity=args.sparsity, seed=args.seed, threads=args.threads, out_dir=args.out, progress=_progress, scale=args.scale))
    return 0


COMMANDS = {"demo": cmd_demo, "simplify": cmd_simplify, "prune": cmd_prune, "rearrange": cmd_rearrange,
            "check": cmd_check, "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except OnnxPruneError as e:
        report = getattr(e, "report", None)
        if report is not None and report.parity is not None:
            print("\n".join("  " + line for line in report.parity.lines()), file=sys.stderr)
        print(f"onnxprune {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onnxprune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("ONNXPRUNE_DEBUG"):
            raise
        line = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"onnxprune {args.command}: internal error: {type(e).__name__}: {line} "
              "(set ONNXPRUNE_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
