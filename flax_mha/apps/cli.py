"""The `flax-mha` command line: ``flax-mha demo | train | predict | generate | bench | tune``.

``flax-mha train [--config FILE] [--workdir DIR] [--config.group.field=VALUE ...]``
loads an ml_collections ``get_config()`` file (default: `flax_mha.train.default_config`,
which ``configs/default.py`` re-exports) and applies the overrides, cast to the type of
the field they replace, the way ``ml_collections.config_flags`` does without absl. A
config whose ``task`` is ``"lm"`` (``configs/lm.py``) trains the byte-level language
model instead (`flax_mha.train.lm.train_lm`); ``flax-mha generate`` samples from it.
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib.metadata
import importlib.util
import os
import shlex
import sys
import unicodedata
from collections.abc import Callable, Sequence
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
        if text == "None" and name in _nullable_fields():
            node[field] = None
        else:
            node[field] = _cast(name, node[field], text)
    return config


def _nullable_fields() -> set[str]:
    """Dotted names of the fields that are None in the default config (they take None)."""
    from flax_mha.train.default_config import get_config

    def nulls(node: ml_collections.ConfigDict, prefix: str) -> set[str]:
        found = set()
        for name, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                found |= nulls(value, f"{prefix}{name}.")
            elif value is None:
                found.add(prefix + name)
        return found

    return nulls(get_config(), "")


def _train(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    config = apply_overrides(load_config(args.config), overrides)
    if config.get("task") == "lm":
        return _train_lm(args, config)
    if args.resume is not None:
        config.train.resume = args.resume
    if args.no_progress:
        config.train.progress_bar = False
    if args.mesh is not None:
        config.train.mesh = args.mesh
    if args.print_config:
        print(config, end="")
        return 0
    if args.workdir is None:
        args.workdir = DEFAULT_WORKDIR
    import time

    from flax_mha.train import train_and_evaluate, validate_config

    validate_config(config)  # before jax compiles anything
    tic = time.perf_counter()
    state = train_and_evaluate(config, args.workdir, force=args.force)
    _print_summary(config, args.workdir, int(state.step), time.perf_counter() - tic)
    return 0


DEFAULT_WORKDIR, LM_WORKDIR = "runs/default", "runs/lm"


def _train_lm(args: argparse.Namespace, config: ml_collections.ConfigDict) -> int:
    """``flax-mha train`` of a config with ``task == "lm"``: `flax_mha.train.lm.train_lm`."""
    from flax_mha.train import lm

    for flag, given in (("--resume/--no-resume", args.resume is not None),
                        ("--force", args.force), ("--mesh", args.mesh is not None)):  # fmt: skip
        if given:
            raise ValueError(
                f"{flag} is not an option of the LM job (it runs on one device, keeps no "
                "checkpoints and starts afresh)"
            )
    if args.print_config:
        print(config, end="")
        return 0
    workdir = LM_WORKDIR if args.workdir is None else args.workdir
    lm.validate_lm_config(config)  # before jax compiles anything
    lm.check_workdir(workdir)
    final = lm.train_lm(config, workdir)
    _print_lm_summary(config, workdir, final)
    return 0


EXAMPLE_PROMPTS = ("Return the", "Raise ValueError if")


def _print_lm_summary(
    config: ml_collections.ConfigDict, workdir: str, final: dict[str, float]
) -> None:
    """A finished LM run's result, where its outputs went, and the `generate` command."""
    from flax_mha.train.lm import _duration

    bpb, unigram = final["eval_bits_per_byte"], final["unigram_bits_per_byte"]
    ratio = bpb / unigram
    verdict = "met" if ratio <= 0.6 else "not met"
    speed = final.get("mean_tokens_per_sec")
    speed = f", {speed:.0f} tokens/s" if speed else ""
    print(
        f"finished: {final['step']} steps in {_duration(final['seconds'])}{speed}; held-out "
        f"{bpb:.3f} bits/byte, unigram {unigram:.3f} ({ratio:.2f}x; target <= 0.6x {verdict})"
    )
    print(f"outputs in {workdir}{os.sep}:")
    outputs = [
        ("metrics.jsonl", "one JSON line per log step (loss, tokens/s, held-out bits/byte)"),
        ("curves.png", "training loss and held-out bits per byte against the unigram's"),
        ("params.msgpack", "the trained parameters"),
        ("config.json", "the run's config (generate rebuilds the model from it)"),
    ]
    for name, what in outputs:
        if os.path.exists(os.path.join(workdir, name)):
            print(f"  {name:<16} {what}")
    prompts = " ".join(shlex.quote(p) for p in EXAMPLE_PROMPTS)
    print(f"try it: flax-mha generate --workdir {shlex.quote(workdir)} {prompts}")


EXAMPLE_DIGITS = "3 1 4 1 5 9 2 6 5 3"


def _print_summary(
    config: ml_collections.ConfigDict, workdir: str, step: int, seconds: float
) -> None:
    """Where a finished run's outputs went, and the `predict` command to try it."""
    from flax_mha.train import read_metrics

    evals = [r for r in read_metrics(workdir) if "eval_exact_match" in r]
    result = f"; held-out exact match {evals[-1]['eval_exact_match']:.1%}" if evals else ""
    minutes, secs = divmod(round(seconds), 60)
    took = f"{minutes} min {secs} s" if minutes else f"{secs} s"
    n = config.train.num_steps
    of = f"of {n}" if step <= n else f"(nothing trained: num_steps is {n})"
    print(f"finished: step {step} {of} in {took}{result}")
    print(f"outputs in {workdir}{os.sep}:")
    outputs = [
        (os.path.join("checkpoints", str(step)), "parameters, optimizer state and config"),
        ("config.json", "the run's config"),
        ("metrics.jsonl", "one JSON line per log step"),
        ("events.out.tfevents.*", f"TensorBoard: tensorboard --logdir {shlex.quote(workdir)}"),
        ("curves.png", "loss, accuracy, learning rate and gradient norm"),
        ("attention", "every layer's attention heads on a held-out example"),
    ]
    for name, what in outputs:
        path = os.path.join(workdir, name)
        if glob.glob(os.path.join(glob.escape(workdir), name)):
            shown = name + os.sep if os.path.isdir(path) else name
            print(f"  {shown:<26} {what}")
    digits = " ".join(EXAMPLE_DIGITS.split()[: min(5, config.data.max_len)])
    print(f"try it: flax-mha predict --workdir {shlex.quote(workdir)} {digits}")


def _predict(args: argparse.Namespace) -> int:
    import jax
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
    # One compilation of the whole decoding (eagerly, each op would compile on its own).
    decode = jax.jit(generate, static_argnums=(0, 3))
    out = np.asarray(decode(model, params, jnp.asarray(inputs), longest + 1))
    if longest > config.data.max_len:
        print(f"note: trained on at most {config.data.max_len} digits", file=sys.stderr)
    for src, tokens in zip(inputs, out, strict=True):
        print(f"{data.decode_tokens(src)} -> {data.decode_tokens(tokens)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from flax_mha.train import lm

    if args.top_k is not None and args.temperature == 0:
        raise ValueError(
            f"--top-k {args.top_k} needs --temperature > 0 (the default, 0, is greedy decoding)"
        )
    texts = lm.generate_text(
        args.workdir,
        list(args.prompts),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    for i, (prompt, text) in enumerate(zip(args.prompts, texts, strict=True)):
        if i:
            print()
        print(f"--- {prompt!r}")
        print(_printable(text))
    return 0


def _printable(text: str) -> str:
    """``text`` with control characters other than newline and tab escaped (a sampled
    byte could otherwise move the cursor or clear the terminal)."""
    return "".join(
        c if c in "\n\t" or unicodedata.category(c) != "Cc" else repr(c)[1:-1] for c in text
    )


def _bench(args: argparse.Namespace) -> int:
    from flax_mha.apps.bench import DEFAULT_SECTIONS, SECTIONS, run_bench

    common = dict(use_torch=not args.no_torch)
    if args.quick:
        sizes = dict(batch=1, length=256, module_length=64, model_dim=64, repeats=2)
        flex = dict(flex_lengths=(384,), flex_causal_length=384, flex_score_length=384,
                    flex_block_mask_length=1024)  # fmt: skip
        run_bench(
            args.out, **sizes, **flex, **common, memory_lengths=(512, 2048),
            decode_lengths=(256, 1024), sections=tuple(args.sections or DEFAULT_SECTIONS),
        )  # fmt: skip
        return 0
    run_bench(
        args.out,
        **common,
        sections=tuple(args.sections or SECTIONS),
        flex_lengths=tuple(args.flex_lengths),
        flex_causal_length=args.flex_causal_length,
        flex_score_length=args.flex_score_length,
        flex_block_mask_length=args.block_mask_length,
        max_dense_gib=args.max_dense_gib,
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


def _tune(args: argparse.Namespace) -> int:
    from flax_mha.apps.tune import run_tune

    return run_tune(args)


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (and point to ``--help``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default; keeps the lines of a text that has several (the
    epilog's config fields) and wraps the others."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help  # no "(default: None)" noise, and no default said twice
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _int_type(low: int, should: str, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"should be {should}, but got {text!r}")
        return value

    parse.__name__ = should  # what argparse names in its own messages
    return parse


_positive_int = _int_type(1, "a positive int")
_seed = _int_type(0, "an int in [0, 2**63)", 2**63 - 1)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"should be a number >= 0, but got {text!r}")
    return value


_non_negative_float.__name__ = "a number >= 0"


def _version() -> str:
    """``flax-mha X (jax Y, flax Z, Python W)``, read from the installed metadata."""

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    python = ".".join(map(str, sys.version_info[:3]))
    return (
        f"flax-mha {version('flax-mha')} (jax {version('jax')}, flax {version('flax')}, "
        f"Python {python})"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `flax-mha`, one subcommand per job."""
    from flax_mha.apps.demo import DEFAULT_SENTENCE

    parser = _Parser(
        prog="flax-mha",
        description="Multi-head attention for JAX and Flax.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="walk through the attention steps on a short sentence",
        description="Prints each step of multi-head attention on a sentence, checks it "
        "against flax_mha.MultiHeadAttention and writes a heatmap of the weights.",
        formatter_class=_HelpFormatter,
    )
    demo.add_argument("--out", default="out/demo", help="folder for the PNG heatmap")
    demo.add_argument("--sentence", default=DEFAULT_SENTENCE, help="the words to attend over")
    demo.add_argument("--d-model", type=_positive_int, default=8, help="embedding size D")
    demo.add_argument(
        "--num-heads", type=_positive_int, default=2, help="attention heads N (divides D)"
    )
    demo.add_argument("--seed", type=_seed, default=0, help="seed of the random weights")
    demo.set_defaults(func=_demo)
    _add_train_parser(sub)
    predict = sub.add_parser(
        "predict",
        help="decode digit sequences with a trained run",
        description="Loads the latest intact checkpoint's parameters (not the optimizer "
        "state) and decodes each input greedily.",
        formatter_class=_HelpFormatter,
    )
    predict.add_argument("digits", nargs="*", help="one input sequence, e.g. 3 1 4 1 5")
    predict.add_argument("--input", action="append", help='a sequence, e.g. "3 1 4" (repeatable)')
    predict.add_argument(
        "--workdir",
        default="runs/default",
        help="a training run's folder, or one checkpoint folder (WORKDIR/checkpoints/STEP)",
    )
    predict.set_defaults(func=_predict)
    _add_generate_parser(sub)
    _add_bench_parser(sub)
    _add_tune_parser(sub)
    return parser


def _as_typed(value: Any) -> str:
    """A field's value as one types it after ``--config.a.b=`` (see `_cast`)."""
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else repr(value)


def _config_fields_epilog() -> str:
    """The default config's fields and values, as the --help of `flax-mha train` lists them
    (and those of the language model's, ``configs/lm.py``)."""
    from flax_mha.train.default_config import get_config
    from flax_mha.train.lm import default_lm_config

    def lines(node: Any, prefix: str) -> list[str]:
        out = []
        for name, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                out += lines(value, f"{prefix}{name}.")
            else:
                out.append(f"  --config.{prefix}{name}={_as_typed(value)}")
        return out

    return "\n".join(
        [
            "config fields (the default config's values; override any with "
            "--config.GROUP.FIELD=VALUE,",
            "see them resolved with --print-config):",
            *lines(get_config(), ""),
            "",
            "config fields of the language model (--config configs/lm.py):",
            *lines(default_lm_config(), ""),
        ]
    )


def _add_train_parser(sub: Any) -> None:
    train = sub.add_parser(
        "train",
        help="train a Transformer on the built-in task (resumes from the workdir), or the "
        "language model with --config configs/lm.py",
        description="Trains the encoder-decoder Transformer on a built-in task, resuming "
        "from the latest checkpoint in the workdir. Overrides: --config.group.field=VALUE, "
        "e.g. --config.model.num_heads=2. Ctrl-C saves a checkpoint and stops; the same "
        "command resumes. With --config configs/lm.py (a config whose task is 'lm') it "
        "trains the byte-level language model on the standard library's docstrings "
        "instead (no checkpoints: a run starts afresh; then try flax-mha generate).",
        epilog=_config_fields_epilog(),
        formatter_class=_HelpFormatter,
    )
    train.add_argument(
        "--config",
        default=None,
        help="config file with get_config() (default: flax_mha/train/default_config.py, "
        "the same as configs/default.py)",
    )
    train.add_argument(
        "--workdir",
        default=None,
        help=f"folder for checkpoints, metrics and plots ({LM_WORKDIR} for the language "
        f"model) (default: {DEFAULT_WORKDIR})",
    )
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
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the config with the overrides and flags applied, and exit",
    )
    train.set_defaults(func=_train)


def _add_generate_parser(sub: Any) -> None:
    from flax_mha import corpus

    generate = sub.add_parser(
        "generate",
        help="continue text prompts with a trained language model (configs/lm.py)",
        description="Loads the language model a `flax-mha train --config configs/lm.py` run "
        "left in the workdir and continues each prompt, byte by byte, until the end of the "
        "document or --max-new-tokens: greedy by default, sampled with --temperature "
        "(and --top-k). Prompts of different lengths run as one batch (a ragged prefill).",
        epilog='example: flax-mha generate --workdir runs/lm "Return the" "Raise ValueError if"',
        formatter_class=_HelpFormatter,
    )
    generate.add_argument("prompts", nargs="+", metavar="PROMPT", help="text to continue")
    generate.add_argument("--workdir", default=LM_WORKDIR, help="the LM run's folder")
    generate.add_argument(
        "--max-new-tokens", type=_positive_int, default=200, help="bytes generated per prompt"
    )
    generate.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=0.0,
        help="0: greedy decoding; > 0: sample from softmax(logits / T)",
    )
    generate.add_argument(
        "--top-k",
        type=_int_type(1, f"an int in [1, {corpus.VOCAB_SIZE}]", corpus.VOCAB_SIZE),
        default=None,
        help="sample among the k most likely bytes only (with --temperature > 0)",
    )
    generate.add_argument("--seed", type=_seed, default=0, help="seed of the sampling")
    generate.set_defaults(func=_generate)


def _add_bench_parser(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="time and size our kernels and module against jax.nn, Flax and torch",
        description="Times the attention kernels and the module against their peers "
        "(torch's only if torch is installed) and writes tables, JSON and plots.",
        formatter_class=_HelpFormatter,
    )
    bench.add_argument("--out", default="out/bench", help="folder for results.md/json and PNGs")
    bench.add_argument("--batch", type=_positive_int, default=4, help="batch size B")
    bench.add_argument("--length", type=_positive_int, default=2048, help="sequence length L")
    bench.add_argument("--heads", type=_positive_int, default=8, help="heads N")
    bench.add_argument("--head-dim", type=_positive_int, default=64, help="head dim H")
    bench.add_argument(
        "--module-length", type=_positive_int, default=512, help="L of the module benchmark"
    )
    bench.add_argument(
        "--model-dim", type=_positive_int, default=512, help="D of the module benchmark"
    )
    bench.add_argument(
        "--memory-lengths",
        type=_positive_int,
        nargs="+",
        default=[1024, 4096, 16384, 65536],
        help="sequence lengths whose compiled fwd+bwd temporaries are reported (not run)",
    )
    bench.add_argument(
        "--decode-lengths",
        type=_positive_int,
        nargs="+",
        default=[512, 2048, 8192, 16384],
        help="cache lengths of the decode-step benchmark (1/8 filled)",
    )
    bench.add_argument(
        "--long", type=_positive_int, default=None, help="also run fwd+bwd once at this L"
    )
    bench.add_argument("--repeats", type=_positive_int, default=5, help="timed runs per case")
    bench.add_argument(
        "--sections",
        nargs="+",
        choices=("kernel", "module", "memory", "decode", "flex"),
        default=None,
        help="sections to run (default: all; with --quick: all but flex)",
    )
    bench.add_argument("--no-torch", action="store_true", help="leave out torch's rows")
    bench.add_argument(
        "--flex-lengths",
        type=_positive_int,
        nargs="+",
        default=[4096, 16384],
        help="L of the document-causal flex rows",
    )
    bench.add_argument(
        "--flex-causal-length", type=_positive_int, default=4096, help="L of the causal-mod row"
    )
    bench.add_argument(
        "--flex-score-length", type=_positive_int, default=2048, help="L of the score-mod rows"
    )
    bench.add_argument(
        "--block-mask-length",
        type=_positive_int,
        default=32768,
        help="L of the create_block_mask row",
    )
    bench.add_argument(
        "--max-dense-gib",
        type=float,
        default=6.0,
        help="dense-mask paths needing more compiled temporaries are compiled, not run",
    )
    bench.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    bench.set_defaults(func=_bench)


def _add_tune_parser(sub: Any) -> None:
    tune = sub.add_parser(
        "tune",
        help="measure the kernel's block sizes, tile size and CPU threshold on this device",
        description="Races candidate block sizes (full and causal attention, forward and "
        "forward+backward), tile sizes and the CPU reference/blockwise threshold on this "
        "device, and caches the winners, which the kernels then use (FLAX_MHA_AUTOTUNE=off "
        "turns that off; see flax_mha.autotune).",
        formatter_class=_HelpFormatter,
    )
    tune.add_argument(
        "--quick", action="store_true", help="tiny sizes (a smoke test; saved only with --out)"
    )
    tune.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="the cache file to write (default: tuning.json in $FLAX_MHA_CACHE_DIR, else in "
        "$XDG_CACHE_HOME/flax_mha or ~/.cache/flax_mha)",
    )
    tune.set_defaults(func=_tune)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flax-mha` console script.

    Exit codes: 0 done, 1 a run that could not go on (`flax_mha.train.TrainingError`),
    2 bad input (arguments, config, workdir), 130 interrupted (Ctrl-C).
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    prog = f"flax-mha {args.command}"
    try:
        if args.command == "train":
            return args.func(args, extra)
        return args.func(args)
    except ValueError as e:  # bad input: arguments, config, workdir
        parser.exit(2, f"{prog}: error: {e}\n")
    except KeyboardInterrupt as e:  # Ctrl-C; a training run has saved a checkpoint first
        step = getattr(e, "step", None)  # flax_mha.train.TrainingInterrupted
        if step is None:
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
            if argv is None:  # the console script: a Ctrl-C in the middle of importing
                # jax can leave native modules whose teardown crashes; leave at once.
                sys.stdout.flush()
                os._exit(130)
            sys.exit(130)
        parser.exit(
            130,
            f"{prog}: interrupted after step {step}; its checkpoint is saved in "
            f"{shlex.quote(e.workdir)}: run the same command again to resume from it\n",
        )
    except Exception as e:
        from flax_mha.train import TrainingError  # imports jax: only once something failed

        if not isinstance(e, TrainingError):
            raise
        parser.exit(1, f"{prog}: error: {e}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
