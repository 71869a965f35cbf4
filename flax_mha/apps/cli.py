"""The `flax-mha` command line: ``flax-mha demo | train | predict | bench``.

``flax-mha train [--config FILE] [--workdir DIR] [--config.group.field=VALUE ...]``
loads an ml_collections ``get_config()`` file (default: `flax_mha.train.default_config`,
which ``configs/default.py`` re-exports) and applies the overrides, cast to the type of
the field they replace, the way ``ml_collections.config_flags`` does without absl.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections


def _demo(args: argparse.Namespace) -> int:
    from flax_mha.apps.demo import run_demo

    run_demo(
        args.out,
        sentence=args.sentence,
        d_model=args.d_model,
        num_heads=args.num_heads,
        seed=args.seed,
    )
    return 0


def load_config(path: str | os.PathLike | None = None) -> ml_collections.ConfigDict:
    """Calls ``get_config()`` of a config file (default: `flax_mha.train.default_config`).

    Raises:
      ValueError: if the file does not exist or has no ``get_config``.
    """
    if path is None:
        from flax_mha.train.default_config import get_config

        return get_config()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"--config should be a Python file with get_config(), but got {path!r}")
    spec = importlib.util.spec_from_file_location(f"_flax_mha_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config should define get_config(), but {path!r} does not")
    return module.get_config()


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _cast(name: str, old: Any, text: str) -> Any:
    """``text`` as the type of the field's current value ``old``."""
    try:
        if isinstance(old, bool):
            if text.lower() not in _TRUE + _FALSE:
                raise ValueError
            return text.lower() in _TRUE
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
        if isinstance(old, str):
            return text
        return ast.literal_eval(text)  # None, tuples, lists
    except (ValueError, SyntaxError):
        kind = type(old).__name__
        raise ValueError(f"--config.{name} should be a {kind}, but got {text!r}") from None


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """Applies ``--config.a.b=value`` (or ``--config.a.b value``) arguments in place.

    Raises:
      ValueError: for an unknown field, a group given a value, a value of the wrong type,
        or an argument that is not an override.
    """
    args = list(overrides)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--config."):
            raise ValueError(f"unrecognized argument {arg!r} (overrides look like --config.a.b=v)")
        name, has_value, text = arg[len("--config.") :].partition("=")
        if not has_value:
            if not args:
                raise ValueError(f"--config.{name} should be given a value")
            text = args.pop(0)
        *groups, field = name.split(".")
        node = config
        for i, group in enumerate(groups):
            if not isinstance(node, ml_collections.ConfigDict) or group not in node:
                raise ValueError(f"unknown config group config.{'.'.join(groups[: i + 1])}")
            node = node[group]
        if not isinstance(node, ml_collections.ConfigDict) or field not in node:
            known = (
                ", ".join(sorted(node.keys()))
                if isinstance(node, ml_collections.ConfigDict)
                else ""
            )
            raise ValueError(f"unknown config field config.{name} (known: {known})")
        if isinstance(node[field], ml_collections.ConfigDict):
            raise ValueError(f"config.{name} is a group; override its fields instead")
        node[field] = _cast(name, node[field], text)
    return config


def _train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    config = apply_overrides(load_config(args.config), overrides)
    if args.resume is not None:
        config.train.resume = args.resume
    if args.no_progress:
        config.train.progress_bar = False
    if args.mesh is not None:
        config.train.mesh = args.mesh
    from flax_mha.train import train_and_evaluate, validate_config

    validate_config(config)  # before jax compiles anything
    train_and_evaluate(config, args.workdir, force=args.force)
    return 0


def _predict(args: argparse.Namespace) -> int:
    import jax.numpy as jnp
    import numpy as np

    from flax_mha import data
    from flax_mha.generation import generate
    from flax_mha.train import restore_params

    sequences = list(args.input or [])
    if args.digits:
        sequences.append(" ".join(args.digits))
    if not sequences:
        raise ValueError("predict should be given digits, e.g. `flax-mha predict 3 1 4`")
    config, model, params, step = restore_params(args.workdir)
    width = config.model.max_len - 1  # the targets need one more position for EOS
    encoded = [data.encode_digits(s) for s in sequences]
    longest = max(len(e) for e in encoded)
    if longest > width:
        raise ValueError(f"inputs should have at most {width} digits, but got {longest}")
    inputs = np.stack([data.encode_digits(s, longest) for s in sequences])
    out = np.asarray(generate(model, params, jnp.asarray(inputs), longest + 1))
    if longest > config.data.max_len:
        print(f"note: trained on at most {config.data.max_len} digits", file=sys.stderr)
    for src, tokens in zip(inputs, out, strict=True):
        print(f"{data.decode_tokens(src)} -> {data.decode_tokens(tokens)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from flax_mha.apps.bench import run_bench

    if args.quick:
        sizes = dict(batch=1, length=256, module_length=64, model_dim=64, repeats=2)
        run_bench(args.out, **sizes, memory_lengths=(512, 2048), decode_lengths=(256, 1024))
        return 0
    run_bench(
        args.out,
        batch=args.batch,
        length=args.length,
        heads=args.heads,
        head_dim=args.head_dim,
        module_length=args.module_length,
        model_dim=args.model_dim,
        memory_lengths=tuple(args.memory_lengths),
        decode_lengths=tuple(args.decode_lengths),
        long_length=args.long,
        repeats=args.repeats,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `flax-mha`, one subcommand per job."""
    from flax_mha.apps.demo import DEFAULT_SENTENCE

    parser = argparse.ArgumentParser(
        prog="flax-mha", description="Multi-head attention for JAX and Flax."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="walk through the attention steps on a short sentence")
    demo.add_argument("--out", default="out/demo", help="folder for the PNG heatmap")
    demo.add_argument("--sentence", default=DEFAULT_SENTENCE)
    demo.add_argument("--d-model", type=int, default=8)
    demo.add_argument("--num-heads", type=int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    _add_train_parser(sub)
    predict = sub.add_parser("predict", help="decode digit sequences with a trained run")
    predict.add_argument("digits", nargs="*", help="one input sequence, e.g. 3 1 4 1 5")
    predict.add_argument("--input", action="append", help='a sequence, e.g. "3 1 4" (repeatable)')
    predict.add_argument("--workdir", default="runs/default")
    predict.set_defaults(func=_predict)
    _add_bench_parser(sub)
    return parser


def _add_train_parser(sub: Any) -> None:
    train = sub.add_parser(
        "train",
        help="train a Transformer on the built-in task (resumes from the workdir)",
        description="Overrides: --config.group.field=VALUE, e.g. --config.model.num_heads=2.",
    )
    train.add_argument(
        "--config",
        default=None,
        help="config file with get_config() (default: flax_mha/train/default_config.py, "
        "the same as configs/default.py)",
    )
    train.add_argument("--workdir", default="runs/default")
    train.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="continue from the latest checkpoint (default: config.train.resume)",
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="resume even if the config differs from the run's config.json in fields that "
        "change the run (model, optimizer, data, seed, batch size)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--mesh",
        default=None,
        help="device mesh, e.g. data=2,model=4: heads and feed-forward split over `model`, "
        "the batch over `data` (default: config.train.mesh; on CPU simulate devices with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8)",
    )
    train.set_defaults(func=_train)


def _add_bench_parser(sub: Any) -> None:
    bench = sub.add_parser(
        "bench", help="time and size our kernels and module against jax.nn, Flax and torch"
    )
    bench.add_argument("--out", default="out/bench", help="folder for results.md/json and PNGs")
    bench.add_argument("--batch", type=int, default=4)
    bench.add_argument("--length", type=int, default=2048)
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--head-dim", type=int, default=64)
    bench.add_argument("--module-length", type=int, default=512)
    bench.add_argument("--model-dim", type=int, default=512)
    bench.add_argument(
        "--memory-lengths",
        type=int,
        nargs="+",
        default=[1024, 4096, 16384, 65536],
        help="sequence lengths whose compiled fwd+bwd temporaries are reported (not run)",
    )
    bench.add_argument(
        "--decode-lengths",
        type=int,
        nargs="+",
        default=[512, 2048, 8192, 16384],
        help="cache lengths of the decode-step benchmark (1/8 filled)",
    )
    bench.add_argument("--long", type=int, default=None, help="also run fwd+bwd once at this L")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    bench.set_defaults(func=_bench)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flax-mha` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return args.func(args, extra)
        return args.func(args)
    except ValueError as e:  # bad input: arguments, config, workdir
        parser.exit(2, f"flax-mha {args.command}: error: {e}\n")
    except Exception as e:
        from flax_mha.train import TrainingError  # imports jax: only once something failed

        if not isinstance(e, TrainingError):
            raise
        parser.exit(1, f"flax-mha {args.command}: error: {e}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
