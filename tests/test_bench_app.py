"""`flax-mha bench` (flax_mha.apps.bench): the CPU header, GEMM fractions, the flex rows.

One run at tiny shapes (torch off: its first ``torch.compile`` alone takes 10-60 s)
serves the smoke tests; timings are never asserted on, only what the report says
about them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest

from flax_mha.apps import bench_flex
from flax_mha.apps.bench import run_bench
from flax_mha.apps.timing import (
    add_rates,
    cpu_info,
    cpu_model,
    interleaved_ms,
    paired_ratio,
    round_order,
    row_ratio,
)

SECTIONS = ("kernel", "module", "decode", "flex")  # memory left out: selection is shown

TINY = dict(
    batch=1, length=64, heads=2, head_dim=16, module_length=32, model_dim=32,
    decode_lengths=(64,), repeats=2, use_torch=False, flex_lengths=(256,),
    flex_causal_length=256, flex_score_length=256, flex_block_mask_length=512,
)  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    printed = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("flax_mha.apps.timing.SETTLE_S", 0.0)  # no pauses at these tiny sizes
        rows = run_bench(str(out), sections=SECTIONS, say=printed.append, **TINY)
    saved = json.loads((out / "results.json").read_text())
    return dict(rows=rows, text=printed[0], md=(out / "results.md").read_text(), json=saved)


def _reference_cpu() -> tuple[str, set[str]]:
    """The CPU model and flags as lscpu or /proc/cpuinfo state them (read here, not by
    the code under test)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                             env=dict(os.environ, LC_ALL="C")).stdout  # fmt: skip
        model = re.search(r"^Model name:\s*(.+)$", out, re.M)
        flags = re.search(r"^Flags:\s*(.+)$", out, re.M)
        if model and flags:
            return model.group(1).strip(), set(flags.group(1).split())
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("neither lscpu nor /proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    if not model:
        pytest.skip("the CPU model is not stated here")
    return model.group(1).strip(), set(flags.group(1).split()) if flags else set()


# ----------------------------------------------------------------------------- the CPU

INTEL = """Architecture:            x86_64
Model name:              Intel(R) Xeon(R) Platinum 8480+
CPU(s):                  4
Flags:                   fpu sse sse2 avx fma avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_fp16
L2 cache:                8 MiB (4 instances)
L3 cache:                105 MiB (1 instance)
"""  # noqa: E501
ARM = """Architecture:          aarch64
Model name:            Neoverse-V1
Flags:                 fp asimd evtstrm aes sve
"""


def test_cpu_info_reads_model_extensions_and_caches_from_lscpu():
    info = cpu_info(INTEL)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    ext = ["avx512f", "avx512_bf16", "avx512_fp16", "avx2", "fma", "amx_tile", "amx_bf16",
           "amx_int8"]  # fmt: skip
    assert info["vector_extensions"] == ext
    assert (info["l2"], info["l3"]) == ("8 MiB (4 instances)", "105 MiB (1 instance)")
    assert cpu_model(info) == f"Intel(R) Xeon(R) Platinum 8480+ ({', '.join(ext)})"
    arm = cpu_info(ARM)
    assert (arm["model"], arm["vector_extensions"], arm["l3"]) == (
        "Neoverse-V1",
        ["asimd", "sve"],
        None,
    )
    assert cpu_model(dict(arm, vector_extensions=[])).endswith("(vector extensions unknown)")


def test_header_names_this_cpu_and_its_vector_extensions(report):
    model, flags = _reference_cpu()
    first = report["md"].splitlines()[0]
    assert first.startswith(f"CPU: {model} (")
    for flag in ("avx512f", "avx2", "amx_tile", "asimd", "sve"):
        assert (flag in first) == (flag in flags), flag
    assert first == report["text"].splitlines()[0]
    assert report["json"]["cpu"]["model"] == model


# ------------------------------------------------------------------------ GEMM fractions


def test_every_timed_row_has_its_fraction_of_the_gemm(report):
    gemm = report["json"]["gemm_gflops"]
    rows = report["json"]["rows"]
    assert {r["kind"] for r in rows} == {"kernel", "module", "decode", *bench_flex.FLEX_KINDS}
    timed = [r for r in rows if "ms" in r]
    assert len(timed) >= 20
    for r in timed:
        if r["kind"] == "flex_block_mask":  # index work: no FLOP rate, and says so
            assert "flops" not in r and "gemm_fraction" not in r
            continue
        gflops = r["flops"] / (r["ms"] * 1e-3) / 1e9
        assert r["gflops"] == pytest.approx(gflops, rel=1e-9), r
        if r["kind"] in ("kernel", "module"):
            # timed in rounds with the GEMM: the fraction is that of the same rounds
            assert r["gemm_flops"] == 2.0 * 2048**3
            assert r["ms"] == float(np.median(r["times"]))
            per_round = [r["flops"] / t for t in r["times"]]
            gemm_per_round = [r["gemm_flops"] / t for t in r["gemm_times"]]
            fraction = np.median(np.divide(per_round, gemm_per_round))
            assert r["gemm_fraction"] == pytest.approx(fraction, rel=1e-9), r
        else:
            assert r["gemm_fraction"] == pytest.approx(gflops / gemm, rel=1e-9), r
    # ... and every table row that reports a time prints it (as "n/a" only if not run).
    headers = [
        line for line in report["md"].splitlines() if line.startswith("| ") and " ms |" in line
    ]
    assert len(headers) == 7  # kernel, module, decode; document, causal, score, block mask
    for table in re.split(r"\n\n", report["md"]):
        lines = [line for line in table.splitlines() if line.startswith("| ")]
        if not lines or " ms |" not in lines[0] or "create_block_mask" in lines[0]:
            continue
        assert "| GFLOP/s | % of GEMM |" in lines[0]
        col = lines[0].split(" | ").index("% of GEMM")
        for line in lines[1:]:
            assert re.fullmatch(r"\d+(\.\d+)?%|n/a", line.split(" | ")[col]), line


def test_peers_are_timed_in_the_same_rounds_and_compared_by_round(report):
    rows = [r for r in report["json"]["rows"] if r["kind"] in ("kernel", "module", "decode")]
    groups: dict = {}
    for r in rows:
        key = (r["kind"], r.get("causal"), r.get("pass_"), r.get("L"))
        groups.setdefault(key, []).append(r)
    for (kind, *_), group in groups.items():
        assert len(group) == 2  # ours and the jax/flax peer (torch off)
        assert len(group[0]["times"]) == len(group[1]["times"]) == TINY["repeats"]
        if kind == "decode":  # no GEMM between decode steps (it would evict their caches)
            assert "gemm_times" not in group[0] and "gemm_times" not in group[1]
        else:
            assert group[0]["gemm_times"] == group[1]["gemm_times"]  # one GEMM per round
    # the tables print the paired ratio, not the ratio of medians
    kern = {(r["impl"], r["causal"], r["pass_"]): r for r in rows if r["kind"] == "kernel"}
    ours = kern[("flax_mha blockwise", True, "fwd+bwd")]
    peer = kern[("jax.nn.dot_product_attention", True, "fwd+bwd")]
    want = np.median(np.divide(ours["times"], peer["times"]))
    line = next(
        x for x in report["md"].splitlines()
        if x.startswith("| jax.nn.dot_product_attention |") and "| True | fwd+bwd |" in x
    )  # fmt: skip
    assert line.rstrip(" |").split(" | ")[-1] == f"{want:.2f}"


def test_interleaved_ms_rotates_the_order_of_each_round(monkeypatch):
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    clock = iter(range(1000))
    monkeypatch.setattr("flax_mha.apps.timing.time.perf_counter", lambda: next(clock) / 1e3)
    times = interleaved_ms(calls, 3)
    # a warm-up call each, then rounds a b c, b c a, c a b
    assert "".join(order) == "abc" + "abc" + "bca" + "cab"
    assert sorted(times) == list("abc")
    for name in "abc":  # one clock tick per call
        assert times[name] == pytest.approx([1.0, 1.0, 1.0], rel=1e-9)
    with pytest.raises(ValueError, match=r"repeats should be an int >= 1, but got 0"):
        interleaved_ms(calls, 0)
    # pause_s: a sleep before each timed call (not before the warm-up calls)
    events = []
    monkeypatch.setattr("flax_mha.apps.timing.time.sleep", lambda s: events.append(s))
    calls = {name: (lambda name=name: events.append(name)) for name in "ab"}
    interleaved_ms(calls, 2, pause_s=0.25)
    assert events == ["a", "b", 0.25, "a", 0.25, "b", 0.25, "b", 0.25, "a"]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_round_order_puts_every_call_after_every_other_equally_often(n):
    rounds = [round_order(n, r) for r in range(n if n % 2 == 0 else 2 * n)]
    assert all(sorted(order) == list(range(n)) for order in rounds)
    after = {}  # (previous, next) -> count, within rounds
    for order in rounds:
        for a, b in zip(order[:-1], order[1:], strict=True):
            after[(a, b)] = after.get((a, b), 0) + 1
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    assert sorted(after) == sorted(pairs)
    assert len(set(after.values())) <= 1  # all equally often
    for p in range(n):  # every call in every position equally often
        in_p = [order[p] for order in rounds]
        assert all(in_p.count(i) == len(rounds) // n for i in range(n))


def test_time_together_times_forwards_first_and_skips_a_failing_call(monkeypatch):
    monkeypatch.setattr("flax_mha.apps.timing.SETTLE_S", 0.0)
    log = []

    def call(name, fail=False):
        def run():
            log.append(name)
            if fail:
                raise NotImplementedError(f"{name}: no backward here\nsecond line")

        return run

    rows = [  # a forward+backward row first: the forwards are still timed first
        dict(impl="ours", pass_="fwd+bwd", _call=call("ours bwd")),
        dict(impl="ours", pass_="fwd", _call=call("ours fwd")),
        dict(impl="torch", pass_="fwd", _call=call("torch fwd")),
        dict(impl="torch", pass_="fwd+bwd", _call=call("torch bwd", fail=True), _may_fail=True),
        dict(impl="dense", pass_="fwd+bwd", skipped="too big"),
    ]
    bench_flex._time_together(rows, 2)
    # warm-ups and two rounds of the forwards, then the probe, then the backward alone
    assert log.index("torch bwd") > max(i for i, x in enumerate(log) if x.endswith("fwd"))
    assert log.count("torch bwd") == 1
    ours_bwd, ours_fwd, torch_fwd, torch_bwd, dense = rows
    for r in (ours_bwd, ours_fwd, torch_fwd):
        assert "_call" not in r and len(r["times"]) == 2 and r["ms"] == np.median(r["times"])
    assert torch_bwd["skipped"] == "NotImplementedError: torch bwd: no backward here"
    assert "_call" not in torch_bwd and "_may_fail" not in torch_bwd and "ms" not in torch_bwd
    assert dense == dict(impl="dense", pass_="fwd+bwd", skipped="too big")
    json.dumps(rows)  # nothing left that results.json could not hold


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # a load burst in round 2 slows both; the ratio of medians would say 1.5, the rounds 2
    ours, peer = [10.0, 40.0, 12.0], [5.0, 20.0, 8.0]
    assert paired_ratio(ours, peer) == 2.0
    assert np.median(ours) / np.median(peer) == 1.5
    assert row_ratio(dict(ms=12.0, times=ours), dict(ms=8.0, times=peer)) == 2.0
    assert row_ratio(dict(ms=12.0), dict(ms=8.0, times=peer)) == 1.5  # unpaired: of ms
    with pytest.raises(ValueError, match=r"2 and 3 times"):
        paired_ratio([1.0, 2.0], peer)
    # add_rates: the GEMM of the same rounds, or the global rate without one
    paired = dict(flops=4e9, ms=20.0, times=[20.0, 40.0, 20.0], gemm_times=[10.0, 10.0, 20.0],
                  gemm_flops=2e9)  # fmt: skip
    alone = dict(flops=4e9, ms=20.0)
    add_rates([paired, alone], gemm=100.0)
    assert paired["gemm_fraction"] == pytest.approx(1.0)  # rounds: 1.0, 0.5, 2.0
    assert alone["gemm_fraction"] == pytest.approx(2.0)  # 200 GFLOP/s over 100


def test_module_and_decode_flops_count_projections_and_attention():
    from flax_mha.apps.bench import decode_flops, module_flops

    B, L, D = 2, 16, 8
    proj = 4 * 2 * B * L * D * D  # q, k, v, out: [B·L, D] @ [D, D]
    attn = 2 * 2 * B * L * L * D  # q·k and p·v over N·H = D
    assert module_flops(B, L, D, backward=False) == proj + attn
    assert module_flops(B, L, D, backward=True) == 3 * proj + 3.5 * attn
    assert decode_flops(10, D) == 4 * 2 * D * D + 2 * 2 * 10 * D


# ------------------------------------------------------------------------- the flex rows


def _table_cells(md: str, impl: str, L: int, pass_: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:3] == [impl, str(L), pass_]:
            return cells
    raise AssertionError(f"no row {impl}, {L}, {pass_}")


def test_flex_rows_print_the_ratio_each_target_names(report):
    md = report["md"]
    rows = [r for r in report["json"]["rows"] if r["kind"].startswith("flex_")]
    times = {(r["impl"], r["L"], r["pass_"]): r["times"] for r in rows if "times" in r}
    for r in rows:  # every attention row that ran was timed in rounds
        if "ms" in r and r["kind"] != "flex_block_mask":
            assert len(r["times"]) == TINY["repeats"] and r["ms"] == np.median(r["times"]), r

    def paired(a, b):  # implementations of a case run in the same rounds
        return float(np.median(np.divide(times[a], times[b])))

    # document-causal: ours / this against torch.compile (absent: torch off), dense, jax.nn
    for impl, target in ((bench_flex.OURS_DENSE, "≤ 0.2"), (bench_flex.JAX_NN_DENSE, "≤ 0.1")):
        for pass_ in ("fwd", "fwd+bwd"):
            cells = _table_cells(md, impl, 256, pass_)
            ratio = paired((bench_flex.OURS, 256, pass_), (impl, 256, pass_))
            assert cells[6:8] == [f"{ratio:.2f}", target]
            assert cells[8] == ("yes" if round(ratio, 12) <= float(target[2:]) else "no")
    assert not any(r["impl"] == bench_flex.TORCH_FLEX for r in rows)
    assert "ours / this" in md
    # causal mod: speed / is_causal >= 0.95
    for pass_ in ("fwd", "fwd+bwd"):
        cells = _table_cells(md, bench_flex.FLEX_CAUSAL, 256, pass_)
        speed = paired((bench_flex.IS_CAUSAL, 256, pass_), (bench_flex.FLEX_CAUSAL, 256, pass_))
        assert cells[6:8] == [f"{speed:.2f}", "≥ 0.95"]
    # sinks and learned bias: this / plain <= 1.3, forward+backward
    for impl in (bench_flex.SINKS, bench_flex.T5_BIAS):
        cells = _table_cells(md, impl, 256, "fwd+bwd")
        ratio = paired((impl, 256, "fwd+bwd"), (bench_flex.PLAIN, 256, "fwd+bwd"))
        assert cells[6:8] == [f"{ratio:.2f}", "≤ 1.3"]
    # create_block_mask at each document length and at the extra one
    masks = {r["L"]: r for r in rows if r["kind"] == "flex_block_mask"}
    assert sorted(masks) == [256, 512] and all(r["ms"] > 0 for r in masks.values())


def test_document_mask_counts_the_pairs_it_allows():
    for L, n in ((256, 8), (37, 5), (9, 1)):
        seg = bench_flex.documents(L, n, seed=L)
        assert seg.shape == (1, L) and len(np.unique(seg)) == n
        assert np.all(np.diff(seg[0]) >= 0)  # packed: contiguous documents
        dense = np.tril(np.ones((L, L), bool)) & (seg[0][:, None] == seg[0][None, :])
        assert bench_flex.document_pairs(seg) == int(dense.sum())


def test_flex_row_documents_its_mask(report):
    doc = [r for r in report["json"]["rows"] if r["kind"] == "flex_document"]
    seg = bench_flex.documents(256)
    dense = np.tril(np.ones((256, 256), bool)) & (seg[0][:, None] == seg[0][None, :])
    for r in doc:
        assert r["density"] == pytest.approx(dense.mean(), rel=1e-12)
        assert r["documents"] == 8
    ours = [r for r in doc if r["impl"] == bench_flex.OURS]
    fwd = 4 * 1 * 2 * 16 * dense.sum()  # 4·B·N·H per allowed pair
    assert [r["flops"] for r in ours] == pytest.approx([fwd, 3.5 * fwd], rel=1e-12)


def test_sections_select_what_runs(report, tmp_path):
    assert report["json"]["sections"] == list(SECTIONS)
    assert not any(r["kind"] == "memory" for r in report["rows"])
    with pytest.raises(ValueError, match=r"sections should be .*but got \('kernels',\)"):
        run_bench(str(tmp_path), sections=("kernels",))
    with pytest.raises(TypeError, match="sections should be a sequence of names"):
        run_bench(str(tmp_path), sections="flex")


@pytest.mark.slow
# torch.compile's own modules use torch.jit.script_method, deprecated in torch 2.13.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_flex_rows_time_the_forward_and_say_why_no_backward():
    pytest.importorskip("torch")
    import jax

    L = 128
    seg = bench_flex.documents(L)
    qkv = [jax.random.normal(jax.random.key(i), (1, L, 1, 16)) for i in range(3)]
    base = dict(kind="flex_document", L=L)
    rows = bench_flex._time_together(bench_flex._torch_flex_rows(seg, qkv, base, 1.0), 2)
    fwd, bwd = rows
    assert fwd["pass_"] == "fwd" and fwd.get("ms", 0) > 0, str(fwd)
    assert bwd["pass_"] == "fwd+bwd" and (bwd.get("ms", 0) > 0 or bwd["skipped"]), bwd
