"""The `onnxprune` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__, checks
from .errors import OnnxPruneError
from .options import PruneOptions, SimplifyOptions, flag
from .pruning import criteria
from .sensitivity import SPARSITIES, check_sparsities

EXIT_CODES = ("exit codes: 0 ok; 1 the parity check failed (nothing written); 2 bad input or an impossible "
              "request (one line says which; nothing written); 3 internal error (a bug: please report it); "
              "130 interrupted")
EPILOG = EXIT_CODES


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors that point to --help (subcommand parsers inherit it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _progress(msg: str) -> None:
    try:
        print(f"[onnxprune] {msg}", file=sys.stderr, flush=True)
    except BrokenPipeError:  # progress is a courtesy: a closed stderr must not stop the work
        pass


def _output_args(p: argparse.ArgumentParser, suffix: str) -> None:
    p.add_argument("output_path", nargs="?", metavar="output", help=f"output .onnx (as onnxsim / onnxslim take it; "
                   f"same as -o; default: <input>.{suffix}.onnx)")
    p.add_argument("-o", "--output", help="output path (written atomically, never the input)")


PARITY = {"inputs", "atol", "rtol", "seed"}  # the SimplifyOptions that check and rearrange take too


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="onnxprune",
        description="Turn a pruned ONNX model into a smaller, faster one that computes the same function.",
        epilog=EPILOG,
    )
    ap.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="zero 50%% of a zoo model's filters, export, simplify, check and time it (no files needed)",
                       description="Build a model from the zoo, zero a fraction of its filters at random (weights only), "
                       "export it to ONNX, simplify, check parity against PyTorch and the input, and time all three on "
                       "onnxruntime. Needs PyTorch (pip install 'onnxprune[demo]').", epilog=EPILOG)
    d.add_argument("--model", default="mobilenet_v2", help="zoo model (default %(default)s; see --list)")
    d.add_argument("--list", action="store_true", help="list the zoo models and exit")
    d.add_argument("--sparsity", type=flag(checks.sparsity, "--sparsity"), default=0.5,
                   help="fraction of filters zeroed per layer, in [0, 1) (default %(default)s)")
    d.add_argument("--seed", type=flag(checks.seed, "--seed"), default=0)
    d.add_argument("--threads", type=flag(checks.positive_int, "--threads"), default=1,
                   help="onnxruntime threads for timing (default %(default)s)")
    d.add_argument("--scale", type=flag(checks.positive_number, "--scale"), default=4,
                   help="width and input size relative to the zoo's test size (default %(default)s)")
    d.add_argument("--out", metavar="DIR", help="keep the exported and simplified models in DIR")

    s = sub.add_parser("simplify", help="fold BN, propagate constants, remove dead channels, check parity",
                       description="Simplify a pruned ONNX model. The result is written only if it computes the same "
                       "function as the input on onnxruntime (unless --no-check).", epilog=EPILOG)
    s.add_argument("model", help="input .onnx (never modified)")
    _output_args(s, "simplified")
    SimplifyOptions.add_arguments(s)
    s.add_argument("-v", "--verbose", action="store_true", help="channels removed per layer, pin reasons")
    s.add_argument("--json", action="store_true", help="print the report as JSON on stdout")

    c = sub.add_parser("check", help="compare two models on onnxruntime; exit 0 if equal within tolerance, 1 if not",
                       description="Run both models on the same inputs (onnxruntime, optimizations off) and compare "
                       "outputs: an element fails only if |a-b| > atol and |a-b| > rtol*|reference|.", epilog=EPILOG)
    c.add_argument("reference", help="the reference model (e.g. the pruned input)")
    c.add_argument("candidate", help="the model to check (e.g. the simplified one)")
    c.add_argument("--json", action="store_true")
    SimplifyOptions.add_arguments(c, only=PARITY)

    p = sub.add_parser("prune", help="make the zeros: dependency-aware filters, level, 1xN blocks, NNI-style configs",
                       description="Prune an ONNX model: zero filters (a coupled channel is zeroed in every layer producing it), "
                       "single weights (--criterion level) or 1xN blocks. The first layer and the classifier are left alone "
                       "unless --prune-first / --prune-last.", epilog=EPILOG)
    p.add_argument("model", help="input .onnx (never modified)")
    _output_args(p, "pruned")
    PruneOptions.add_arguments(p)
    p.add_argument("--calib", metavar="NPZ", help="calibration inputs for apoz / mean_activation, like --inputs "
                   "(default: seeded random, with a warning)")
    p.add_argument("--masks", metavar="NPZ|PTH", help="apply these keep-masks instead of computing them: an .npz keyed by "
                   "initializer name or PyTorch parameter name (matched where unambiguous), or NNI's mask .pth "
                   "(export_model(mask_path=...); needs PyTorch)")
    p.add_argument("--save-masks", metavar="NPZ", help="write the masks applied, keyed by initializer name")
    p.add_argument("--json", action="store_true")
    p.add_argument("--simplify", action="store_true", help="simplify the pruned model (parity-checked) before writing it")
    SimplifyOptions.add_arguments(p.add_argument_group("with --simplify (as `onnxprune simplify` takes them; --seed "
                                                       "also seeds the parity inputs)"), skip={"seed"})

    e = sub.add_parser("sensitivity", help="prune each channel group alone at 0.1..0.9 and measure top-1 on --calib inputs",
                       description="Sensitivity analysis: for every prunable channel group (channels coupled by residual "
                       "adds, depthwise convs or concats, as `prune` groups them) and every sparsity, prune that group "
                       "alone (the same criterion and channels as `prune --sparsity`) and measure, on onnxruntime over "
                       "the --calib inputs, the top-1 accuracy of the first output against --labels, or without labels "
                       "its top-1 agreement with the dense model. Prints a groups x sparsities table; --csv and --plot "
                       "write it. The first layer and the classifier are left alone unless --prune-first / --prune-last.",
                       epilog=EPILOG)
    e.add_argument("model", help="input .onnx (never modified)")
    e.add_argument("--calib", metavar="NPZ", required=True, help="calibration inputs, like prune's --calib: an .npz keyed "
                   "by input name (an extra leading axis = several batches) or an .npy for a single-input model")
    e.add_argument("--labels", metavar="NPY", help="integer class labels, one per calibration item: every batch's items "
                   "in order (shape [items] or [batches, batch size]); default: agreement with the dense model")
    e.add_argument("--criterion", default="l1", choices=list(criteria.FOR_GRANULARITY["filter"]),
                   help="channel importance, as prune's (default %(default)s)")
    e.add_argument("--sparsities", type=flag(check_sparsities, "--sparsities"), default=SPARSITIES, metavar="LIST",
                   help="comma-separated sparsities in [0, 1) (default 0.1,0.2,...,0.9)")
    e.add_argument("--macs", action="store_true", help="also record each candidate's MACs once its dead channels are "
                   "removed (simplify --align 1 per candidate: several times slower)")
    e.add_argument("--csv", metavar="PATH", help="write one line per group and sparsity")
    e.add_argument("--plot", metavar="PNG", help="write a PNG, one curve per group (needs matplotlib)")
    PruneOptions.add_arguments(e, only={"group_reduce", "prune_first", "prune_last"})
    e.add_argument("--seed", type=flag(checks.seed, "--seed"), default=0, help="seed of the random criterion "
                   "(default %(default)s)")
    e.add_argument("--json", action="store_true", help="print the analysis as JSON on stdout")

    r = sub.add_parser("rearrange", help="permute channels so 1xN blocks group similar filters; exact parity with the input",
                       description="Permute every layer's output channels (and every slot coupled to them) by descending "
                       "L1 norm: neighbouring filters are similar, so any 1xN block groups similar filters. The model "
                       "computes exactly the same function (checked on onnxruntime).", epilog=EPILOG)
    r.add_argument("model", help="input .onnx (never modified)")
    _output_args(r, "rearranged")
    SimplifyOptions.add_arguments(r, only=PARITY | {"check"})

    i = sub.add_parser("inspect", help="inputs, outputs, ops, parameters, MACs, channel classes and what is pinned and why",
                       epilog=EPILOG)
    i.add_argument("model")
    i.add_argument("--pin", action="append", default=[], metavar="TENSOR", help="as simplify's --pin: see what it would keep")
    i.add_argument("-v", "--verbose", action="store_true", help="list every layer")
    i.add_argument("--json", action="store_true")
    return ap


def default_output(path: str, suffix: str = "simplified") -> Path:
    p = Path(path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(f"{stem}.{suffix}.onnx")


def output_path(args, suffix: str) -> Path:
    """`in.onnx out.onnx` as onnxsim / onnxslim take it, or -o; both must agree."""
    if args.output and args.output_path and Path(args.output) != Path(args.output_path):
        raise OnnxPruneError(f"two outputs given: {args.output_path} and -o {args.output}; give one")
    chosen = args.output or args.output_path
    return Path(chosen) if chosen else default_output(args.model, suffix)


def _json(data) -> str:
    import json

    return json.dumps(data, indent=2, default=str)


# A command returns (exit code, what to print on stdout): the code means what happened, whatever
# becomes of stdout afterwards (a closed pipe, `| head`).

def cmd_simplify(args):
    from .api import simplify_file

    report = simplify_file(args.model, output_path(args, "simplified"), SimplifyOptions.from_args(args), progress=_progress)
    return 0, report.to_json() if args.json else report.table(verbose=args.verbose)


def cmd_prune(args):
    from .api import prune_file

    report, simplified = prune_file(
        args.model, output_path(args, "pruned"), PruneOptions.from_args(args), calib=args.calib, masks=args.masks,
        save_masks=args.save_masks, simplify_after=SimplifyOptions.from_args(args) if args.simplify else None,
        progress=_progress,
    )
    if args.json:
        return 0, _json({"prune": report.as_dict(), "simplify": simplified.as_dict() if simplified else None})
    return 0, report.table() + ("\n\n" + simplified.table() if simplified is not None else "")


def cmd_sensitivity(args):
    from .api import sensitivity_file

    result = sensitivity_file(args.model, args.calib, labels=args.labels, csv=args.csv, plot=args.plot,
                              sparsities=args.sparsities, criterion=args.criterion, macs=args.macs,
                              group_reduce=args.group_reduce, prune_first=args.prune_first,
                              prune_last=args.prune_last, seed=args.seed, progress=_progress)
    return 0, _json(result.as_dict()) if args.json else result.table()


def cmd_rearrange(args):
    from .api import rearrange_file

    out = output_path(args, "rearranged")
    moved, parity = rearrange_file(args.model, out, check=args.check, inputs=args.inputs,
                                   atol=args.atol, rtol=args.rtol, seed=args.seed)
    lines = [f"rearranged {moved} layer group(s); wrote {out}"]
    if parity is not None:
        lines.append(f"parity with the input: {'PASS' if parity.passed else 'FAIL'}")
        lines.extend("  " + line for line in parity.lines())
    return 0, "\n".join(lines)


def cmd_check(args):
    from .api import check

    rep = check(args.reference, args.candidate, inputs=args.inputs, atol=args.atol, rtol=args.rtol, seed=args.seed)
    code = 0 if rep.passed else 1
    if args.json:
        return code, _json(rep.as_dict())
    lines = [f"parity (onnxruntime, atol {rep.atol:g}, rtol {rep.rtol:g}, {rep.batches} batches): {'PASS' if rep.passed else 'FAIL'}"]
    return code, "\n".join(lines + ["  " + line for line in rep.lines()])


def cmd_inspect(args):
    from .api import inspect

    info = inspect(args.model, pins=args.pin)
    return 0, _json(info.as_dict()) if args.json else info.text(verbose=args.verbose)


def cmd_demo(args):
    from .demo import list_models, run_demo

    if args.list:
        return 0, "\n".join(list_models())
    return 0, run_demo(args.model, sparsity=args.sparsity, seed=args.seed, threads=args.threads, out_dir=args.out,
                       progress=_progress, scale=args.scale)


COMMANDS = {"demo": cmd_demo, "simplify": cmd_simplify, "prune": cmd_prune, "sensitivity": cmd_sensitivity,
            "rearrange": cmd_rearrange, "check": cmd_check, "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help, --version, or a one-line usage error (exit 2)
        return int(e.code or 0)
    try:
        code, text = COMMANDS[args.command](args)
    except OnnxPruneError as e:
        report = getattr(e, "report", None)
        if report is not None and report.parity is not None:
            _progress("\n".join("  " + line for line in report.parity.lines()))
        return _fail(args.command, str(e), e.exit_code)
    except OSError as e:  # the file system said no (a full disk, a permission): not our bug
        where = f" {e.filename}" if e.filename else ""
        return _fail(args.command, f"cannot read or write{where}: {e.strerror or e}", 2)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", 130)
    except Exception as e:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("ONNXPRUNE_DEBUG"):
            raise
        line = str(e).splitlines()[0][:300] if str(e) else ""
        return _fail(args.command, f"internal error: {type(e).__name__}: {line} "
                     "(set ONNXPRUNE_DEBUG=1 for the traceback, and please report it)", 3)
    emit(text)
    return code


def emit(text: str) -> None:
    """Print the result; a reader that went away (`| head`) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # stdout is gone: point it at /dev/null so Python's own flush at exit stays quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _fail(command: str, message: str, code: int) -> int:
    try:
        print(f"onnxprune {command}: error: {message}", file=sys.stderr, flush=True)
    except BrokenPipeError:
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
