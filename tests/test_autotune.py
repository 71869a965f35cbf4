"""flax_mha.autotune: the tuning cache, what the kernels take from it, the machine's defaults.

The tests run with ``FLAX_MHA_AUTOTUNE=off`` (tests/conftest.py); the ``tuning`` fixture
turns tuning on for one test, with the cache in a temporary folder, and makes the kernels
forget it afterwards. Timings are never asserted on: a tiny run only has to produce a
well-formed table, saved and taken by the kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import warnings

import jax.numpy as jnp
import pytest

from flax_mha import autotune
from flax_mha.apps.tune import run_tune
from flax_mha.kernels import backend_choice, block_mask, machine
from flax_mha.kernels import config as kernel_config
from flax_mha.kernels.backend_choice import Request, choose_implementation
from flax_mha.kernels.config import BlockSizes
from flax_mha.kernels.machine import (
    PASSES,
    REFERENCE_DEFAULTS,
    Defaults,
    Entry,
    Machine,
    TuningCacheWarning,
    TuningTable,
    cpu_info,
    derive_defaults,
    size_bytes,
)

REFERENCE_BLOCKS = dict(full=(1024, 2048), causal=(512, 1024), gqa4=(256, 2048))


def blocks(*args, **kwargs) -> tuple[int, int]:
    sizes = BlockSizes.get_default(*args, **kwargs)
    return sizes.block_q, sizes.block_k


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Tuning on, the cache in ``tmp_path``; yields the cache file. Forgotten afterwards."""
    monkeypatch.setenv("FLAX_MHA_AUTOTUNE", "on")
    monkeypatch.setenv("FLAX_MHA_CACHE_DIR", str(tmp_path))
    machine.reset()
    yield tmp_path / "tuning.json"
    machine.reset()


def cpu_request(T: int, dtype=jnp.float32) -> Request:
    return Request(platform="cpu", T=T, S=T, N=8, K=8, H=64, Hv=64, dtype=dtype)


# ------------------------------------------------------------------------ a tiny run


def test_a_tiny_run_writes_a_cache_that_loads_back_equal_and_the_kernels_take(tuning):
    cands = {"full": [(64, 64), (16, 32)], "causal": [(32, 32)]}
    table = autotune.autotune(
        batch=1, length=64, num_heads=2, head_dim=8, blocks=cands, tiles=(2**22, 64 * 64),
        threshold_lengths=(32,), threshold_batch=1, threshold_heads=2, repeats=1,
        progress=False,
    )  # fmt: skip
    assert tuning.exists()
    assert autotune.load(tuning) == table == autotune.load()
    me = machine.this_machine().key
    assert {e.device for e in table.entries} == {me}
    kinds = {(e.shape_class, e.dtype, e.pass_) for e in table.entries}
    assert kinds == {(k, "float32", p) for k in ("full", "causal", "all") for p in PASSES}
    for e in table.entries:
        if e.shape_class == "all":
            assert e.values["tile_elements"] in (2**22, 64 * 64)
            assert e.values["blockwise_min_cpu_elements"] in (32 * 32, 64 * 64)
            assert set(e.measured["threshold"]["ms"]) == {"32"}
        else:
            assert (e.values["block_q"], e.values["block_k"]) in cands[e.shape_class]
            assert set(e.measured["ms"]) == {f"{q}x{k}" for q, k in cands[e.shape_class]}
    # Saving made this process reread the cache: the kernels take the fwd+bwd winners.
    full = table.lookup(me, "full", "float32", "fwd+bwd").values
    everything = table.lookup(me, "all", "float32", "fwd+bwd").values
    assert blocks(1, 2) == (full["block_q"], full["block_k"])
    assert blocks(1, 2, is_causal=True) == (32, 32)
    assert machine.tile_elements() == everything["tile_elements"]
    assert backend_choice.blockwise_min_cpu_elements() == everything["blockwise_min_cpu_elements"]
    # A second run merges: its entries replace those of the same key, the rest stay.
    again = autotune.autotune(
        batch=1, length=64, num_heads=2, head_dim=8, passes=("fwd",), blocks={"causal": [(16, 16)]},
        tiles=(), threshold_lengths=(), repeats=1, progress=False,
    )  # fmt: skip
    assert [e.key for e in again.entries] == [(me, "causal", "float32", "fwd")]
    assert autotune.load(tuning) == table.merged(again)
    assert len(autotune.load(tuning).entries) == len(table.entries)
    print(autotune.describe(table))  # the report renders


def test_quick_runs_are_not_saved_unless_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("FLAX_MHA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "block_candidates", lambda *a, **k: [(32, 32)])
    autotune.autotune(quick=True, length=32, tiles=(), threshold_lengths=(), passes=("fwd",),
                      repeats=1, progress=False)  # fmt: skip
    assert not (tmp_path / "tuning.json").exists()


def test_block_candidates_start_with_the_default_and_differ_at_the_length():
    assert autotune.block_candidates(REFERENCE_DEFAULTS, False, 2048) == [
        (1024, 2048), (512, 2048), (1024, 1024), (512, 1024), (2048, 2048),
    ]  # fmt: skip
    assert autotune.block_candidates(REFERENCE_DEFAULTS, True, 2048) == [
        (512, 1024), (256, 512), (512, 512), (256, 1024), (1024, 2048),
    ]  # fmt: skip
    # At L=512 every candidate from 512 x 512 up gives one 512 x 512 block: raced once.
    assert autotune.block_candidates(REFERENCE_DEFAULTS, False, 512) == [(1024, 2048)]


def test_tiles_that_group_the_pairs_alike_are_raced_once():
    tiles = (2**22, 2**21, 2**23)
    # B=2, N=8, 1024 x 2048 blocks: 2, 1 and 4 pairs per tile.
    assert autotune.distinct_tiles(tiles, 2, 2048, 8, 1024, 2048) == list(tiles)
    # At L=256 with 2 heads every tile holds both pairs: one computation.
    assert autotune.distinct_tiles(tiles, 1, 256, 2, 64, 128) == [2**22]
    assert autotune.distinct_tiles((64, 2**22), 1, 256, 2, 64, 128) == [64, 2**22]


@pytest.mark.parametrize(
    "wins, side",
    [
        ([False, False, True, True], 320),
        ([True, True, True, True], 192),
        ([True, False, True, True], 320),  # a lucky short length does not count
        ([False, False, False, True], 384),
        ([False, False, False, False], 448),  # never: one step past the last
    ],
)
def test_the_threshold_is_where_the_kernel_wins_from_there_on(wins, side):
    assert autotune.crossover([192, 256, 320, 384], wins) == side


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch=0), "batch should be an int >= 1, but got 0"),
        (dict(length=2.5), "length should be an int >= 1, but got 2.5"),
        (dict(passes=("bwd",)), "passes should be distinct names of"),
        (dict(passes=()), "passes should be distinct names of"),
        (dict(margin=1.0), r"margin should be in \[0, 1\), but got 1.0"),
        (dict(dtype=jnp.int32), "dtype should be a float dtype, but got int32"),
        (dict(blocks={"full": [(0, 64)]}), r"blocks\['full'\] should hold positive sizes"),
        (dict(budget_s=0), "budget_s should be > 0, but got 0"),
    ],
)
def test_autotune_rejects_bad_arguments_before_measuring(kwargs, match):
    with pytest.raises(ValueError, match=match):
        autotune.autotune(progress=False, **kwargs)


# ------------------------------------------------------------ a block mask's block size


def _documents_mod():
    from flax_mha import mods

    segment_ids = jnp.repeat(jnp.array([[0, 1, 2, 3], [0, 0, 1, 1]]), 16, axis=1)  # [2, 64]
    return mods.and_masks(mods.causal, mods.document(segment_ids))


def test_block_mask_candidates_start_with_the_default_and_halve_each_side():
    assert autotune.block_mask_candidates(4096, 4096, head_dim=64) == [
        (512, 512), (256, 512), (512, 256), (256, 256),
    ]  # fmt: skip
    assert autotune.block_mask_candidates(64, 64) == [(128, 128), (64, 128), (128, 64), (64, 64)]
    assert autotune.block_mask_candidates(4096, 4096, head_dim=64)[0] == (
        block_mask.default_block_size(4096, 4096, 64)
    )


def test_tune_block_mask_times_every_candidate_on_the_mask_and_returns_one():
    sizes = [(32, 32), (16, 32), (32, 16)]
    choice = autotune.tune_block_mask(
        _documents_mod(), 2, None, 64, 64, num_heads=4, num_kv_heads=2, head_dim=16,
        candidates=sizes, pass_="fwd", repeats=1, progress=False,
    )  # fmt: skip
    assert set(choice.ms) == set(sizes) and all(t > 0 for t in choice.ms.values())
    assert choice.block_size in sizes
    if choice.block_size != sizes[0]:  # a challenger wins only by the margin
        assert choice.ms[choice.block_size] < 0.95 * choice.ms[sizes[0]]


@pytest.mark.parametrize(
    "ms, want",
    [
        ({"512x512": 100.0, "256x512": 90.0, "512x256": 94.0}, (256, 512)),
        ({"512x512": 100.0, "256x512": 97.0, "512x256": 120.0}, (512, 512)),  # within 5%
        ({"512x512": 80.0, "256x512": 90.0, "512x256": 94.0}, (512, 512)),
    ],
)
def test_tune_block_mask_keeps_the_default_unless_a_challenger_is_faster_by_the_margin(
    monkeypatch, ms, want
):
    monkeypatch.setattr(autotune._Runner, "run", lambda self, race: dict(ms))
    sizes = [(512, 512), (256, 512), (512, 256)]  # the incumbent first
    choice = autotune.tune_block_mask(
        _documents_mod(), 2, None, 64, 64, num_heads=4, head_dim=16, candidates=sizes,
        progress=False,
    )  # fmt: skip
    assert choice.block_size == want
    assert choice.ms == {tuple(map(int, k.split("x"))): v for k, v in ms.items()}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_heads=0), "num_heads should be an int >= 1, but got 0"),
        (dict(num_kv_heads=3), r"num_kv_heads should divide num_heads \(4\), but got 3"),
        (dict(N=2), r"N should be None or num_heads \(4\), but got 2"),
        (dict(pass_="bwd"), "pass_ should be one of"),
        (dict(margin=-0.1), r"margin should be in \[0, 1\), but got -0.1"),
        (dict(candidates=[]), "candidates should be positive"),
        (dict(candidates=[(0, 32)]), "candidates should be positive"),
        (dict(repeats=0), "repeats should be an int >= 1, but got 0"),
        (dict(dtype=jnp.int32), "dtype should be a float dtype, but got int32"),
    ],
)
def test_tune_block_mask_rejects_bad_arguments_before_measuring(kwargs, match):
    args = dict(B=2, N=None, T=64, S=64, num_heads=4, head_dim=16, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        autotune.tune_block_mask(_documents_mod(), **args)


# ------------------------------------------------------------ the table and its file


def test_a_table_saves_and_loads_equal_and_merges_by_key(tmp_path):
    a = Entry("cpu: X [avx2] x2", "full", "float32", "fwd", {"block_q": 256, "block_k": 512},
              {"ms": {"256x512": 1.5}})  # fmt: skip
    b = Entry("cpu: X [avx2] x2", "all", "bfloat16", "fwd+bwd", {"tile_elements": 2**21})
    table = TuningTable((a, b))
    path = autotune.save(table, tmp_path / "sub" / "t.json")
    assert autotune.load(path) == table
    assert json.loads(path.read_text())["entries"][0]["pass"] == "fwd"
    assert autotune.load(tmp_path / "missing.json") == TuningTable()
    newer = dataclasses.replace(a, values={"block_q": 128, "block_k": 512})
    assert table.merged(TuningTable((newer,))) == TuningTable((b, newer))
    assert table.lookup(*a.key) == a and table.lookup("cpu: Y", "full", "float32", "fwd") is None
    with pytest.raises(ValueError, match="distinct keys"):
        TuningTable((a, a))


def test_the_cache_lives_in_the_user_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("FLAX_MHA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert machine.cache_path() == tmp_path / "xdg" / "flax_mha" / "tuning.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert machine.cache_path() == tmp_path / "home" / ".cache" / "flax_mha" / "tuning.json"
    monkeypatch.setenv("FLAX_MHA_CACHE_DIR", str(tmp_path / "mine"))
    assert machine.cache_path() == tmp_path / "mine" / "tuning.json"


# ------------------------------------------------------- what the kernels take from it


def test_a_matching_entry_changes_the_defaults_and_others_do_not(tuning, monkeypatch):
    me = machine.this_machine().key
    entries = (
        Entry(me, "full", "float32", "fwd+bwd", {"block_q": 256, "block_k": 512}),
        Entry(me, "full", "float32", "fwd", {"block_q": 128, "block_k": 256}),
        Entry(me, "causal", "bfloat16", "fwd+bwd", {"block_q": 64, "block_k": 128}),
        Entry("cpu: another CPU [avx2] x64", "causal", "float32", "fwd+bwd",
              {"block_q": 32, "block_k": 64}),
        Entry(me, "all", "float32", "fwd+bwd",
              {"tile_elements": 2**20, "blockwise_min_cpu_elements": 64 * 64}),
    )  # fmt: skip
    autotune.save(TuningTable(entries), tuning)
    machine.reset()
    derived = derive_defaults(machine.this_machine())
    assert machine.defaults() == derived
    assert blocks(4, 8) == (256, 512)
    assert blocks(4, 8, num_kv_heads=2) == (256, 512)  # 4 x 256 x 512 fits a pair's tile
    assert blocks(4, 8, is_causal=True, dtype=jnp.bfloat16) == (64, 128)
    # Not for this dtype, kind or device: the derived defaults.
    assert blocks(4, 8, dtype=jnp.bfloat16) == derived.full_blocks
    assert blocks(4, 8, is_causal=True) == derived.causal_blocks
    assert machine.tile_elements() == 2**20 == kernel_config.__getattr__("TILE_ELEMENTS")
    # The dispatch: T = S = 100 (under every derived threshold) now takes the kernel,
    # except for bfloat16, which has no threshold in the cache.
    assert choose_implementation(cpu_request(100)) == "blockwise"
    assert choose_implementation(cpu_request(60)) == "reference"
    assert choose_implementation(cpu_request(100, jnp.bfloat16)) == "reference"
    assert backend_choice.blockwise_min_cpu_elements(jnp.bfloat16) == (
        derived.blockwise_min_cpu_elements
    )
    # FLAX_MHA_AUTOTUNE=fwd prefers the forward-only winners.
    monkeypatch.setenv("FLAX_MHA_AUTOTUNE", "fwd")
    machine.reset()
    assert blocks(4, 8) == (128, 256)


def test_tuned_blocks_off_cpu_are_used_as_they_are(tuning, monkeypatch):
    me = machine.this_machine().key
    autotune.save(TuningTable((Entry(me, "full", "float32", "fwd+bwd",
                                     {"block_q": 128, "block_k": 128}),)), tuning)  # fmt: skip
    machine.reset()
    monkeypatch.setattr(kernel_config, "chunk_pairs", lambda: False)
    assert blocks(16, 16) == (128, 128)
    side, twice = blocks(16, 16, is_causal=True)  # none cached: all pairs share a tile
    assert twice == 2 * side and side <= 256


def _fail(*args, **kwargs):
    raise AssertionError("read although tuning is off")


def test_with_tuning_off_nothing_is_read(tuning, monkeypatch):
    me = machine.this_machine().key
    autotune.save(TuningTable((Entry(me, "full", "float32", "fwd+bwd",
                                     {"block_q": 256, "block_k": 512}),)), tuning)  # fmt: skip
    monkeypatch.setenv("FLAX_MHA_AUTOTUNE", "off")
    monkeypatch.setattr(machine, "load", _fail)
    monkeypatch.setattr(machine, "cpu_info", _fail)
    machine.reset()
    assert blocks(4, 8) == REFERENCE_BLOCKS["full"]
    assert blocks(4, 8, is_causal=True) == REFERENCE_BLOCKS["causal"]
    assert blocks(4, 8, num_kv_heads=2) == REFERENCE_BLOCKS["gqa4"]
    assert machine.defaults() == REFERENCE_DEFAULTS
    assert machine.tile_elements() == 2**21
    assert backend_choice.blockwise_min_cpu_elements() == 320 * 320
    assert choose_implementation(cpu_request(300)) == "reference"
    assert choose_implementation(cpu_request(320)) == "blockwise"


def test_tuning_set_to_machine_reads_the_machine_but_not_the_cache(tuning, monkeypatch):
    autotune.save(TuningTable((Entry(machine.this_machine().key, "full", "float32", "fwd+bwd",
                                     {"block_q": 256, "block_k": 512}),)), tuning)  # fmt: skip
    monkeypatch.setenv("FLAX_MHA_AUTOTUNE", "machine")
    monkeypatch.setattr(machine, "load", _fail)
    machine.reset()
    assert blocks(4, 8) == derive_defaults(machine.this_machine()).full_blocks


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"format": 99, "entries": []}',
        '{"format": 1, "entries": [{"device": 3}]}',
        '{"format": 1, "entries": [{"device": "d", "shape_class": "full", "dtype": "float32",'
        ' "pass": "fwd", "values": {"block_q": 0, "block_k": 64}}]}',
        '{"format": 1, "entries": [{"device": "d", "shape_class": "all", "dtype": "float32",'
        ' "pass": "fwd", "values": {"block_q": 16}}]}',
        b"\xff\xfe",
    ],
)
def test_a_corrupt_cache_is_ignored_with_a_warning(tuning, text):
    tuning.parent.mkdir(parents=True, exist_ok=True)
    (tuning.write_bytes if isinstance(text, bytes) else tuning.write_text)(text)
    machine.reset()
    with pytest.warns(TuningCacheWarning, match="ignores its tuning cache"):
        sizes = blocks(4, 8)
    assert sizes == derive_defaults(machine.this_machine()).full_blocks
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not at every trace
        assert blocks(4, 8, is_causal=True) == derive_defaults(machine.this_machine()).causal_blocks
    with pytest.raises(ValueError, match="tuning.json is not a tuning table"):
        autotune.load(tuning)


def test_a_bad_switch_is_an_error_naming_it(tuning, monkeypatch):
    monkeypatch.setenv("FLAX_MHA_AUTOTUNE", "sometimes")
    machine.reset()
    with pytest.raises(ValueError, match=r"FLAX_MHA_AUTOTUNE should be one of .*'sometimes'"):
        blocks(4, 8)


# ----------------------------------------------------- defaults derived from the machine

EPYC = """Architecture:                            x86_64
Model name:                              AMD EPYC
Flags:                                   fpu sse sse2 fma avx avx2 avx512f avx512_bf16 avx512_vnni
L2 cache:                                2 MiB (2 instances)
L3 cache:                                32 MiB (1 instance)
"""
XEON = """Model name:              Intel(R) Xeon(R) Platinum 8480+
Flags:                   fpu sse sse2 avx fma avx2 avx512f amx_tile
L2 cache:                8 MiB (4 instances)
L3 cache:                105 MiB (1 instance)
"""
LAPTOP = """Model name:            Intel(R) Core(TM) i5-7300U CPU @ 2.60GHz
Flags:                 fpu sse sse2 avx fma avx2
L2 cache:              512 KiB (2 instances)
L3 cache:              3 MiB (1 instance)
"""
DESKTOP = """Model name:            AMD Ryzen 7 5800X 8-Core Processor
Flags:                 fpu sse sse2 avx fma avx2
L2 cache:              4 MiB (8 instances)
L3 cache:              16 MiB (1 instance)
"""
TWO_SOCKETS = """Model name:            AMD EPYC 7763 64-Core Processor
Flags:                 fpu sse sse2 avx fma avx2
L2 cache:              64 MiB (128 instances)
L3 cache:              512 MiB (16 instances)
"""
ARM = """Architecture:          aarch64
Model name:            Neoverse-V1
Flags:                 fp asimd evtstrm aes sve
"""


def derived(text: str, cores: int = 2) -> Defaults:
    return derive_defaults(Machine.from_cpu_info(cpu_info(text), cores=cores))


def test_the_machines_measured_derive_todays_defaults():
    epyc = Machine.from_cpu_info(cpu_info(EPYC), cores=2)
    assert (epyc.l2_bytes, epyc.l3_bytes) == (2**20, 32 * 2**20)
    assert epyc.key == "cpu: AMD EPYC [avx512f, avx512_bf16, avx512_vnni, avx2, fma] x2"
    assert derive_defaults(epyc) == REFERENCE_DEFAULTS
    # A pair's tile is a quarter of a 32 MiB L3 in float32, and a tile holds one pair.
    assert REFERENCE_DEFAULTS.tile_elements == REFERENCE_DEFAULTS.pair_tile_elements == 2**21
    # A larger L3 gives no tile larger than was measured; 32 MiB per socket is 32 MiB.
    assert derived(XEON, cores=4) == REFERENCE_DEFAULTS
    assert derived(TWO_SOCKETS, cores=128) == dataclasses.replace(REFERENCE_DEFAULTS, min_block_q=8)


def test_smaller_caches_derive_smaller_tiles_blocks_and_thresholds():
    assert derived(DESKTOP, cores=8) == Defaults(
        tile_elements=2**20, pair_tile_elements=2**20, full_blocks=(512, 1024),
        causal_blocks=(256, 512), min_block_q=8, blockwise_min_cpu_elements=224 * 224,
    )  # fmt: skip
    assert derived(LAPTOP) == Defaults(
        tile_elements=2**19, pair_tile_elements=2**19, full_blocks=(512, 1024),
        causal_blocks=(256, 512), min_block_q=8, blockwise_min_cpu_elements=160 * 160,
    )  # fmt: skip
    # An unknown L3 (many Arm CPUs do not state it): the reference's sizes, Neon's lanes.
    assert derived(ARM) == dataclasses.replace(REFERENCE_DEFAULTS, min_block_q=4)
    # Off CPU the reference's (the tile is spread over all pairs there).
    assert derive_defaults(Machine("gpu", "NVIDIA H100")) == REFERENCE_DEFAULTS


@pytest.mark.parametrize(
    "text, size",
    [
        ("32 MiB (1 instance)", 32 * 2**20),
        ("2 MiB (2 instances)", 2**20),
        ("1.5 MiB", 3 * 2**19),
        ("512K", 512 * 2**10),
        ("32768 KB", 32 * 2**20),
        ("48 KiB (1 instance)", 48 * 2**10),
        ("", None),
        (None, None),
        ("unknown", None),
    ],
)
def test_cache_sizes_are_read_per_instance(text, size):
    assert size_bytes(text) == size


# ------------------------------------------------------------------ the command, layering


def test_the_tune_command_reports_the_winners_and_where_they_went(monkeypatch, tmp_path):
    monkeypatch.setenv("FLAX_MHA_CACHE_DIR", str(tmp_path))
    me = machine.this_machine().key
    table = TuningTable((Entry(me, "full", "float32", "fwd+bwd", {"block_q": 512, "block_k": 1024},
                               {"ms": {"512x1024": 90.0, "1024x2048": 100.0}}),))  # fmt: skip
    calls = []
    monkeypatch.setattr(autotune, "autotune", lambda **kw: calls.append(kw) or table)
    said = []
    assert run_tune(argparse.Namespace(quick=False, out=None), say=said.append) == 0
    assert calls == [dict(quick=False, path=None, progress=True)]
    text = "\n".join(said)
    assert me in text and f"Saved to {tmp_path / 'tuning.json'}" in text
    assert "| full | float32 | fwd+bwd | block_q x block_k | 512x1024 |" in text
    assert "| 90.0 |" in text
    said.clear()
    run_tune(argparse.Namespace(quick=True, out=None), say=said.append)
    assert "Not saved" in said[-1]
    said.clear()
    run_tune(argparse.Namespace(quick=True, out=str(tmp_path / "x.json")), say=said.append)
    assert f"Saved to {tmp_path / 'x.json'}" in said[-1] and "FLAX_MHA_CACHE_DIR" in said[-1]


def test_flax_mha_tune_passes_its_options_to_run_tune(monkeypatch):
    from flax_mha.apps import cli, tune

    seen = []
    monkeypatch.setattr(tune, "run_tune", lambda options: seen.append(options) or 0)
    assert cli.main(["tune", "--quick", "--out", "t.json"]) == 0
    assert (seen[0].quick, seen[0].out) == (True, "t.json")
    assert cli.main(["tune"]) == 0
    assert (seen[1].quick, seen[1].out) == (False, None)


def test_the_kernels_and_autotune_do_not_import_the_apps():
    code = (
        "import sys, flax_mha, flax_mha.autotune, flax_mha.kernels.machine\n"
        "print(sorted(m for m in sys.modules if m.startswith('flax_mha.apps')))"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout  # fmt: skip
    assert out.strip() == "[]"
