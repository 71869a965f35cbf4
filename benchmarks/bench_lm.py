"""Training-step benchmarks of the language model (issue 15), fp32 on this machine.

(a) Packing against padding: useful (non-padding) tokens per second of the LM's
    training step (`flax_mha.train.lm`: forward, backward, AdamW) on rows packed with
    whole documents (`corpus.pack`, segment ids) against rows that each hold one
    document padded to the row length (`corpus.pad_each`), same model, same row length,
    batches drawn uniformly from the standard library's docstrings (this corpus's length
    distribution). Packed and padded steps alternate, so a change of the machine's load
    hits both alike.

(b) Our attention against Flax's in a full training step: `TransformerLM` as the library
    trains it (causal mask mod, one block mask per batch, the blockwise kernel) against the
    same model with `flax.linen.MultiHeadDotProductAttention` and a dense causal mask
    (`nn.make_causal_mask`), on the same parameters (the check at the start compares the
    two models' logits). B * L is constant. Flax's module has neither grouped-query
    attention nor RoPE, so this model has one key/value head per head and sinusoidal
    positions. A third row, the same model without attention (the sublayer's norm and
    residual remain), bounds what any attention can gain: flax / none is the largest
    speed-up over Flax's step that a free attention would give. Each case runs in a
    process of its own (``--in-process``: one process), so
    its peak RSS is its own; a case whose compiled temporaries exceed ``--max-temp-gib``
    (or 80% of the available memory) is compiled only and its need reported. The last
    column is the memory a step faults in (minor page faults times the page size, median
    over the timed steps): XLA:CPU allocates a step's buffers afresh, and the pages of
    large ones are mapped anew on first touch, a cost (~1.3 us per 4 KiB page) inside the
    step's time.

Usage:

  python benchmarks/bench_lm.py                       # both (many minutes: an idle machine)
  python benchmarks/bench_lm.py --only packing --row-lengths 512 2048
  python benchmarks/bench_lm.py --only flax --lengths 1024 4096 16384 --runs 3
  python benchmarks/bench_lm.py --only flax --lengths 1024 4096 --runs 6 --paired
  python benchmarks/bench_lm.py --quick               # tiny shapes: a smoke test (seconds)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_mha import corpus
from flax_mha.apps.timing import SETTLE_S, interleaved_ms, paired_ratio
from flax_mha.layers import LayerNorm
from flax_mha.models import FeedForward, Sublayer, TransformerConfig, TransformerLM
from flax_mha.models import sinusoidal_positions as _sinusoidal
from flax_mha.train import lm

GIB = 2**30


# ------------------------------------------------------------------------ shared pieces
def _say(*parts: Any) -> None:
    print(*parts, flush=True)


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def _train_step(loss_fn):
    """A jitted AdamW step of ``loss_fn(params, batch) -> (summed loss, count)``."""
    tx = optax.adamw(1e-3, weight_decay=0.01)

    def step(params, opt_state, batch):
        def mean_loss(p):
            total, count = loss_fn(p, batch)
            return total / jnp.maximum(count, 1.0)

        loss, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, jax.jit(step)


@functools.cache
def _documents(quick: bool) -> list[str]:
    """The training documents (the first 60 modules' with ``quick``)."""
    return corpus.stdlib_documents(max_documents=60 if quick else None)["train"]


def _timed(fn, *args) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, out


def _minor_faults() -> int:
    """Minor page faults of this process so far (pages touched for the first time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ------------------------------------------------------------------ (a) packing vs padding
def bench_packing(args: argparse.Namespace) -> list[dict[str, Any]]:
    config = lm.default_lm_config()
    if args.quick:
        config.model.update(d_model=32, d_ff=64, num_heads=4, num_kv_heads=2,
                            num_decoder_layers=1)  # fmt: skip
    docs = _documents(args.quick)
    sizes = np.array([len(d.encode("utf-8")) + 1 for d in docs])
    q = np.percentile(sizes, [10, 50, 90]).round().astype(int)
    _say(
        f"\n## (a) packing vs padding: {len(docs)} training documents, bytes per document "
        f"p10 {q[0]}, median {q[1]}, p90 {q[2]}, max {sizes.max()} ({sizes.sum():,} in all)"
    )
    m = config.model
    _say(
        f"model: the LM's (configs/lm.py: {m.num_decoder_layers} blocks, d_model {m.d_model}, "
        f"{m.num_heads} heads / {m.num_kv_heads} kv heads, RoPE); AdamW step; "
        f"{args.step_tokens} slots per step; {args.runs} timed steps per layout after one "
        "untimed (compiling) step"
    )
    model = lm.model_of(config)
    params0 = jax.jit(lambda k: model.init(k, jnp.ones((1, 8), jnp.int32))["params"])(
        jax.random.key(0)
    )
    tx, step = _train_step(lambda p, rows: lm.lm_loss(model, p, rows))
    rows_out = []
    header = ("| row length | batch | layout | rows | slots filled | step (median) | "
              "useful tokens/s | packed / padded |")  # fmt: skip
    _say("\n" + header + "\n" + "|---" * 8 + "|")
    for L in args.row_lengths:
        B = max(1, args.step_tokens // L)
        layouts = {"packed": corpus.pack(docs, L), "padded": corpus.pad_each(docs, L)}
        rng = np.random.default_rng(0)
        picks = {
            name: [rng.integers(0, len(p.tokens), B) for _ in range(args.runs + 1)]
            for name, p in layouts.items()
        }
        params, opt_state = params0, tx.init(params0)
        seconds = {name: [] for name in layouts}
        useful = {name: 0 for name in layouts}
        for r in range(args.runs + 1):  # alternate the layouts; run 0 compiles
            for name, packed in layouts.items():
                idx = picks[name][r]
                batch = {k: jnp.asarray(getattr(packed, k)[idx]) for k in packed._fields}
                dt, (params, opt_state, _) = _timed(step, params, opt_state, batch)
                if r:
                    seconds[name].append(dt)
                    useful[name] += int(np.count_nonzero(packed.tokens[idx]))
        rates = {name: useful[name] / sum(seconds[name]) for name in layouts}
        for name, packed in layouts.items():
            row = dict(section="packing", row_length=L, batch=B, layout=name,
                       rows=len(packed.tokens), filled=packed.useful_fraction,
                       step_s=statistics.median(seconds[name]),
                       useful_tokens_per_s=rates[name])  # fmt: skip
            ratio = f"{rates['packed'] / rates['padded']:.2f}x" if name == "packed" else ""
            if name == "packed":
                row["ratio"] = rates["packed"] / rates["padded"]
            _say(
                f"| {L} | {B} | {name} | {row['rows']} | {row['filled']:.1%} | "
                f"{row['step_s'] * 1e3:.0f} ms | {rates[name]:,.0f} | {ratio} |"
            )
            rows_out.append(row)
    _say(
        "(the ratio is bounded by about the ratio of the slots filled: padding a document to "
        "the row length costs nearly what a full row costs)"
    )
    return rows_out


# -------------------------------------------------------------- (b) ours vs Flax attention
class _FlaxBlock(nn.Module):
    """`DecoderBlock` of `flax_mha.models` with Flax's attention (same parameter names);
    ``attend=False``: no attention at all (the sublayer's norm and residual remain)."""

    config: TransformerConfig
    attend: bool = True

    @nn.compact
    def __call__(self, y: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        sub = dict(pre_ln=c.pre_ln, dropout_rate=0.0, dtype=c.dtype)
        attn = nn.MultiHeadDotProductAttention(
            num_heads=c.num_heads, dtype=c.dtype, deterministic=True, name="self_attention"
        )
        mix = (lambda h: attn(h, mask=mask)) if self.attend else (lambda h: h)
        y = Sublayer(**sub, name="self_attention_sublayer")(y, mix, True)
        ff = FeedForward(c.d_ff, 0.0, c.dtype, name="feed_forward")
        return Sublayer(**sub, name="feed_forward_sublayer")(y, lambda h: ff(h, True), True)


class FlaxAttentionLM(nn.Module):
    """`TransformerLM` (pre-LN, sinusoidal positions, no shared embeddings, no GQA/RoPE)
    with `flax.linen.MultiHeadDotProductAttention` and a dense causal mask [B, 1, L, L].
    Its parameters are `TransformerLM`'s (the same tree)."""

    config: TransformerConfig
    attend: bool = True

    def setup(self) -> None:
        c = self.config
        self.embed = nn.Embed(c.vocab_size, c.d_model)
        self.blocks = [_FlaxBlock(c, self.attend) for _ in range(c.num_decoder_layers)]
        self.final_norm = LayerNorm(dtype=c.dtype)
        self.logits_dense = nn.Dense(c.vocab_size, dtype=c.dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        T = tokens.shape[1]
        y = self.embed(tokens) * jnp.sqrt(jnp.asarray(c.d_model, c.dtype))
        y = y + jnp.asarray(_sinusoidal(c.max_len, c.d_model)[:T], c.dtype)
        mask = nn.make_causal_mask(tokens)
        for block in self.blocks:
            y = block(y, mask)
        return self.logits_dense(self.final_norm(y))


def _flax_config(args: argparse.Namespace) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=corpus.VOCAB_SIZE, d_model=args.d_model, num_heads=args.heads,
        num_decoder_layers=args.layers, d_ff=args.d_ff, dropout_rate=0.0, pre_ln=True,
        positional_encoding="sinusoidal", max_len=max(args.lengths),
    )  # fmt: skip


def _models(args: argparse.Namespace) -> dict[str, nn.Module]:
    c = _flax_config(args)
    # "none": the same model with no attention (its parameters unused): no attention can
    # make a step faster than this, so flax / none bounds the speed-up any attention gives.
    return {"ours": TransformerLM(c), "flax": FlaxAttentionLM(c), "none": FlaxAttentionLM(c, False)}


#: (b)'s rows: implementation -> its name in the table.
_IMPLS = {"flax": "flax (dense mask)", "ours": "ours (mask mods)", "none": "no attention (bound)"}


@functools.cache
def _params(config: TransformerConfig) -> Any:
    """`TransformerLM`'s initial parameters (both models use them)."""
    model = TransformerLM(config)
    return jax.jit(lambda k: model.init(k, jnp.ones((1, 8), jnp.int32))["params"])(
        jax.random.key(0)
    )


def _text_rows(B: int, L: int, quick: bool) -> jax.Array:
    """[B, L] bytes of the training documents, one after another (no padding)."""
    docs = _documents(quick)
    stream = np.concatenate([corpus.encode_text(d) for d in docs])
    stream = np.tile(stream, -(-B * L // len(stream)))
    return jnp.asarray(stream[: B * L].reshape(B, L))


def check_same_model(args: argparse.Namespace) -> float:
    """Largest |logit difference| of the two models on the same params (L=64, B=2)."""
    models = _models(args)
    params = _params(_flax_config(args))
    shapes = jax.eval_shape(models["flax"].init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    if jax.tree.structure(shapes["params"]) != jax.tree.structure(params):
        raise AssertionError("the Flax twin's parameter tree differs from TransformerLM's")
    tokens = _text_rows(2, 64, quick=True)
    out = {k: jax.jit(m.apply)({"params": params}, tokens) for k, m in models.items()}
    return float(jnp.max(jnp.abs(out["ours"] - out["flax"])))


def _prepare_case(args: argparse.Namespace, impl: str, L: int) -> tuple[dict[str, Any], Any]:
    """Compiles one (implementation, length) case: its row (compiled temporaries, or why it
    is not run) and its training step as a call (None when it is not run)."""
    B = max(1, args.tokens // L)
    model = _models(args)[impl]
    params = _params(_flax_config(args))
    tokens = _text_rows(B, L, args.quick)

    def loss_fn(p, tokens):
        logits = model.apply({"params": p}, tokens)[:, :-1]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return jnp.sum(loss), jnp.asarray(loss.size, jnp.float32)

    tx, step = _train_step(loss_fn)
    opt_state = tx.init(params)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, tokens).compile()
    compile_s = time.perf_counter() - t0
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    row: dict[str, Any] = dict(section="flax", impl=impl, L=L, B=B, temp_bytes=temp,
                               compile_s=compile_s)  # fmt: skip
    limit, why = args.max_temp_gib * GIB, f"over --max-temp-gib {args.max_temp_gib:g}"
    available = _available_bytes()
    if available is not None and 0.8 * available < limit:
        limit, why = 0.8 * available, f"over 80% of the available {_fmt_bytes(available)}"
    if temp > limit:
        row["skipped"] = f"compiled only: {_fmt_bytes(temp)} of temporaries, {why}"
        return row, None
    return row, lambda: compiled(params, opt_state, tokens)


def run_case(args: argparse.Namespace, impl: str, L: int) -> dict[str, Any]:
    """One (implementation, length) case: compiled temporaries, then timed steps if they fit."""
    rss_start = _peak_rss_bytes()  # jax, the corpus, the params: before this case's step
    row, run = _prepare_case(args, impl, L)
    if run is not None:
        run()  # first run (warm-up)
        times, faults = [], []
        for _ in range(args.runs):
            before = _minor_faults()
            dt, (_, _, loss) = _timed(run)
            times.append(dt)
            faults.append(_minor_faults() - before)
        _check_loss(impl, L, loss)
        row["step_s"] = statistics.median(times)
        row["faulted_bytes_per_step"] = int(statistics.median(faults)) * resource.getpagesize()
        row["tokens_per_s"] = row["B"] * L / row["step_s"]
    row["peak_rss_bytes"], row["rss_start_bytes"] = _peak_rss_bytes(), rss_start
    return row


def _check_loss(impl: str, L: int, loss: jax.Array) -> None:
    if not np.isfinite(float(loss)):
        raise AssertionError(f"{impl} L={L}: the loss is not finite ({float(loss)})")


def _say_same_model_and_header(args: argparse.Namespace, columns: list[str]) -> None:
    """Prints (b)'s check that both models share the parameters, then a table header."""
    _say(f"same model: max |logits ours - flax| = {check_same_model(args):.2e} (same params)")
    _say("\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")


def bench_flax_paired(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(b) in one process, the three models' steps timed in rounds (`interleaved_ms`, with
    the settle pause): "vs flax" is then the median of the per-round ratios, so a drift of
    the host's speed falls on both sides of it. No per-case peak RSS (one process)."""
    _say(
        f"\n## (b) paired: the three models' training steps timed in rounds in this process "
        f"(TransformerLM, {args.layers} blocks, d_model {args.d_model}, {args.heads} heads, "
        f"d_ff {args.d_ff}; B x L = {args.tokens}; {args.runs} rounds after one untimed)"
    )
    _say_same_model_and_header(args, ["L", "B", "attention", "step (median)", "tokens/s",
                                      "vs flax (paired)", "per-round range",
                                      "compiled temporaries"])  # fmt: skip
    last: dict[str, Any] = {}  # each step's latest output (its loss is checked)

    def keeping(impl, run):
        def call():
            last[impl] = run()
            return last[impl]

        return call

    rows = []
    for L in args.lengths:
        prepared = {impl: _prepare_case(args, impl, L) for impl in _IMPLS}
        calls = {impl: keeping(impl, run) for impl, (_, run) in prepared.items() if run}
        times = interleaved_ms(calls, args.runs, pause_s=SETTLE_S) if calls else {}
        for impl, (row, run) in prepared.items():
            name, row = _IMPLS[impl], dict(row, paired=True)
            if run is None:
                _say(f"| {L} | {row['B']} | {name} | {row['skipped']} | - | - | - | "
                     f"{_fmt_bytes(row['temp_bytes'])} |")  # fmt: skip
                rows.append(row)
                continue
            _check_loss(impl, L, last[impl][2])
            row.update(times_ms=times[impl], step_s=statistics.median(times[impl]) / 1e3)
            row["tokens_per_s"] = row["B"] * L / row["step_s"]
            vs, spread = "-", "-"
            if "flax" in times:
                per_round = np.divide(times["flax"], times[impl])
                row["vs_flax"] = paired_ratio(times["flax"], times[impl])
                vs = f"{row['vs_flax']:.2f}x"
                spread = f"{per_round.min():.2f}-{per_round.max():.2f}x"
            _say(f"| {L} | {row['B']} | {name} | {row['step_s']:.2f} s | "
                 f"{row['tokens_per_s']:,.0f} | {vs} | {spread} | "
                 f"{_fmt_bytes(row['temp_bytes'])} |")  # fmt: skip
            rows.append(row)
    return rows


def _case_in_subprocess(args: argparse.Namespace, impl: str, L: int) -> dict[str, Any]:
    argv = [sys.executable, os.path.abspath(__file__), "--case", impl, str(L),
            "--d-model", str(args.d_model), "--heads", str(args.heads), "--layers",
            str(args.layers), "--d-ff", str(args.d_ff), "--tokens", str(args.tokens),
            "--runs", str(args.runs), "--max-temp-gib", str(args.max_temp_gib),
            "--lengths", *map(str, args.lengths)]  # fmt: skip
    if args.quick:
        argv.append("--quick")
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(section="flax", impl=impl, L=L, B=max(1, args.tokens // L),
                    error=f"exit {proc.returncode}: {' / '.join(tail)}")  # fmt: skip
    return json.loads(lines[-1])


def bench_flax(args: argparse.Namespace) -> list[dict[str, Any]]:
    _say(
        f"\n## (b) training step, ours vs flax.linen.MultiHeadDotProductAttention + dense "
        f"causal mask: TransformerLM, {args.layers} blocks, d_model {args.d_model}, "
        f"{args.heads} heads (head dim {args.d_model // args.heads}), d_ff {args.d_ff}, "
        f"sinusoidal positions, AdamW; B x L = {args.tokens}; median of {args.runs} steps "
        f"after one untimed; {'one process' if args.in_process else 'one process per case'}"
    )
    _say_same_model_and_header(args, ["L", "B", "attention", "step", "tokens/s", "vs flax",
                                      "compiled temporaries", "peak RSS of the case",
                                      "memory faulted in per step"])  # fmt: skip
    rows = []
    for L in args.lengths:
        by_impl = {}
        for impl in _IMPLS:
            if args.in_process:
                row = run_case(args, impl, L)
            else:
                row = _case_in_subprocess(args, impl, L)
            by_impl[impl] = row
            rows.append(row)
        for impl, row in by_impl.items():
            name = _IMPLS[impl]
            if "error" in row:
                _say(f"| {L} | {row['B']} | {name} | failed: {row['error']} | | | | | |")
                continue
            flax_rate = by_impl["flax"].get("tokens_per_s")
            if "tokens_per_s" in row:
                step, rate = f"{row['step_s']:.2f} s", f"{row['tokens_per_s']:,.0f}"
                vs = f"{row['tokens_per_s'] / flax_rate:.2f}x" if flax_rate else "-"
            else:
                step, rate, vs = row["skipped"], "-", "-"
            if impl == "flax":
                vs = "1x" if flax_rate else "-"
            rss = f"{_fmt_bytes(row['peak_rss_bytes'])} ({_fmt_bytes(row['rss_start_bytes'])} "
            rss += "before the step)" if not args.in_process else "in this process so far)"
            faulted = row.get("faulted_bytes_per_step")
            faulted = "-" if faulted is None else _fmt_bytes(faulted)
            _say(f"| {L} | {row['B']} | {name} | {step} | {rate} | {vs} | "
                 f"{_fmt_bytes(row['temp_bytes'])} | {rss} | {faulted} |")  # fmt: skip
    return rows


# ---------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("all", "packing", "flax"), default="all")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    p.add_argument("--runs", type=int, default=None, help="timed steps per case (default 5, 3)")
    p.add_argument("--row-lengths", type=int, nargs="+", default=None,
                   help="(a): row lengths (default 512, the LM's, and 2048)")  # fmt: skip
    p.add_argument("--step-tokens", type=int, default=None,
                   help="(a): batch x row length (default 8192, the LM's 16 x 512)")  # fmt: skip
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="(b): sequence lengths (default 1024 4096 16384)")  # fmt: skip
    p.add_argument("--tokens", type=int, default=None, help="(b): B x L (default 16384)")
    p.add_argument("--d-model", type=int, default=None, help="(b): default 256")
    p.add_argument("--heads", type=int, default=None, help="(b): default 4")
    p.add_argument("--layers", type=int, default=None, help="(b): default 2")
    p.add_argument("--d-ff", type=int, default=None, help="(b): default 1024")
    p.add_argument("--max-temp-gib", type=float, default=16.0,
                   help="(b): compile only a case needing more temporaries")  # fmt: skip
    p.add_argument("--in-process", action="store_true",
                   help="(b): all cases in this process (peak RSS: the process's)")  # fmt: skip
    p.add_argument("--paired", action="store_true",
                   help="(b): time the three models' steps in rounds in one process "
                        "(ratios paired by round; no per-case peak RSS)")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--case", nargs=2, metavar=("IMPL", "L"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = dict(runs=2, row_lengths=[128], step_tokens=512, lengths=[128], tokens=256,
                 d_model=32, heads=4, layers=1, d_ff=64)  # fmt: skip
    full = dict(runs=None, row_lengths=[512, 2048], step_tokens=8192,
                lengths=[1024, 4096, 16384], tokens=16384, d_model=256, heads=4, layers=2,
                d_ff=1024)  # fmt: skip
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.runs is None:
        args.runs = 3
    if args.quick and args.case is None:
        args.in_process = True  # seconds, not one jax start-up per case
    for name in ("runs", "step_tokens", "tokens", "d_model", "heads", "layers", "d_ff"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} should be >= 1, but got {getattr(args, name)}")
    if args.d_model % args.heads:
        p.error(f"--heads ({args.heads}) should divide --d-model ({args.d_model})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.case is not None:  # one case of (b), in a process of its own
        print(json.dumps(run_case(args, args.case[0], int(args.case[1]))), flush=True)
        return
    _say(f"# bench_lm: jax {jax.__version__}, {jax.devices()[0].platform}; {_load()}")
    rows = []
    if args.only in ("all", "packing"):
        rows += bench_packing(args)
    if args.only in ("all", "flax"):
        rows += bench_flax_paired(args) if args.paired else bench_flax(args)
    _say(f"\nend: {_load()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
