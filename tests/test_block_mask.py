"""flax_mha.create_block_mask / BlockMask against brute force from the dense mask.

The brute force here evaluates the mask at every (b, h, q_idx, kv_idx) entry, cuts the
[B, N, T, S] array into blocks (the last ones short when a block size does not divide
T or S) and classifies each block in NumPy: no entry attended -> empty, every valid
entry -> full, else partial; the lists are the class's block indices in increasing
order. A block rule may call an empty block partial, or a full one partial (always
correct, only slower), never the other way round: every case checks that; the cases
whose rules are exact for their layout check equality.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import flax_mha
from flax_mha import mods
from flax_mha.kernels.block_mask import EMPTY, FULL, PARTIAL, BlockMask, default_block_size

B, N, T = 2, 3, 50


def dense_mask(mask_mod, B, N, T, S) -> np.ndarray:
    """bool [B, N, T, S]: ``mask_mod`` of int32 scalars at every entry."""
    return np.broadcast_to(np.asarray(_dense_mask(mask_mod, B, N, T, S)).astype(bool), (B, N, T, S))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _dense_mask(mask_mod, B, N, T, S):
    f = mask_mod
    for axis in reversed(range(4)):
        f = jax.vmap(f, in_axes=tuple(0 if a == axis else None for a in range(4)))
    return f(*(jnp.arange(n, dtype=jnp.int32) for n in (B, N, T, S)))


#: create_block_mask compiled once per case: eager, its many small ops compile one by one
#: for every new shape, which costs more (eager is checked against it below).
create_block_mask_jit = jax.jit(
    flax_mha.create_block_mask, static_argnums=(0, 1, 2, 3, 4), static_argnames="block_size"
)


def brute_classes(mask: np.ndarray, bq: int, bk: int) -> np.ndarray:
    """int [B, N, nq, nk] block classes of a bool [B, N, T, S] mask, one block at a time."""
    Bm, Nm, T, S = mask.shape
    nq, nk = -(-T // bq), -(-S // bk)
    out = np.zeros((Bm, Nm, nq, nk), np.int64)
    for i in range(nq):
        for j in range(nk):
            blk = mask[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            full, some = blk.all(axis=(2, 3)), blk.any(axis=(2, 3))
            out[:, :, i, j] = np.where(full, FULL, np.where(some, PARTIAL, EMPTY))
    return out


def check_lists(num, indices, classes, kind):
    """``num`` / ``indices`` list the blocks of ``kind`` in ``classes`` [..., n], in order."""
    num, indices = np.asarray(num), np.asarray(indices)
    n = classes.shape[-1]
    for pos in np.ndindex(classes.shape[:-1]):
        want = np.flatnonzero(classes[pos] == kind)
        assert num[pos] == len(want), (kind, pos)
        np.testing.assert_array_equal(indices[pos][: len(want)], want, err_msg=f"{kind} {pos}")
        # Past the count: the other blocks, so that the list is a permutation.
        np.testing.assert_array_equal(np.sort(indices[pos]), np.arange(n), err_msg=f"{pos}")


def check_block_mask(bm: BlockMask, want: np.ndarray, *, exact: bool):
    """``bm``'s classes (sound; equal when ``exact``) and all its lists follow its classes."""
    got = np.asarray(bm.classes)
    assert got.shape == want.shape and bm.classes.dtype == jnp.int8
    assert not np.any((got == EMPTY) & (want != EMPTY)), "a block with attended entries is empty"
    assert not np.any((got == FULL) & (want != FULL)), "a block with masked entries is full"
    if exact:
        np.testing.assert_array_equal(got, want)
    for kind, num, idx in ((PARTIAL, bm.kv_num_blocks, bm.kv_indices),
                           (FULL, bm.full_kv_num_blocks, bm.full_kv_indices)):  # fmt: skip
        check_lists(num, idx, got, kind)
    trans = np.swapaxes(got, -1, -2)
    for kind, num, idx in ((PARTIAL, bm.q_num_blocks, bm.q_indices),
                           (FULL, bm.full_q_num_blocks, bm.full_q_indices)):  # fmt: skip
        check_lists(num, idx, trans, kind)


rng = np.random.default_rng(0)
SEG = np.stack([np.repeat([0, 1, 2, 3], [9, 17, 20, 4]), np.repeat([0, 1], [31, 19])]).astype(np.int32)  # fmt: skip
SEG_KV = np.stack([np.repeat([0, 1, 3], [5, 20, 12]), np.repeat([1, 2], [30, 7])]).astype(np.int32)  # fmt: skip
POS = np.concatenate([np.arange(12), np.arange(30), np.arange(8)])[None].repeat(B, 0).astype(np.int32)  # fmt: skip
INTERLEAVED = rng.integers(0, 3, size=(B, T)).astype(np.int32)
HEAD_BIAS = jnp.array([0, 1, 2], jnp.int32)


def _plain(b, h, q_idx, kv_idx):
    return (q_idx + kv_idx + HEAD_BIAS[h] + b) % 3 != 0


# (name, mask_mod, S, exact): exact = the rule (or the dense evaluation) gives exactly the
# brute-force classes for this layout.
CASES = [
    ("causal", mods.causal, T, True),
    ("causal-cross", mods.causal, 37, True),
    ("window", mods.sliding_window(5, 3), T, True),
    ("chunked", mods.chunked(12), T, True),
    ("causal-chunked", mods.and_masks(mods.causal, mods.chunked(12)), T, True),
    ("prefix-lm", mods.prefix_lm(jnp.array([7, 33], jnp.int32)), T, True),
    ("padding", mods.padding(jnp.array([50, 20]), jnp.array([30, 9])), 37, True),
    ("document", mods.document(jnp.asarray(SEG)), T, True),
    ("document-cross", mods.document(jnp.asarray(SEG), jnp.asarray(SEG_KV)), 37, False),
    ("document-interleaved", mods.document(jnp.asarray(INTERLEAVED)), T, False),
    ("document-positions", mods.document_from_positions(jnp.asarray(POS)), T, True),
    ("causal-document-padding", mods.and_masks(mods.causal, mods.document(jnp.asarray(SEG)), mods.padding(kv_lengths=jnp.array([44, 50]))), T, False),
    ("window-or-prefix", mods.or_masks(mods.sliding_window(4), mods.prefix_lm(3)), T, False),
    ("plain", _plain, 37, True),
    ("causal-and-plain", mods.and_masks(mods.causal, _plain), T, True),
    ("offset-causal", mods.offset_mask(mods.causal, jnp.array([0, 17]), jnp.array([5, 0])), 37, True),
    ("offset-window-padding", mods.offset_mask(mods.and_masks(mods.sliding_window(5, 2), mods.padding(kv_lengths=jnp.array([40, 60]))), jnp.array([3, 30])), T, False),
    ("offset-plain", mods.offset_mask(_plain, 2, jnp.array([1, 4])), 37, True),
]  # fmt: skip
# Block sizes that do not divide T or S (short last blocks), and one larger than T.
# Each case with one of them (compiling the same sizes again and again buys little).
GRID = [(*case, [(16, 16), (7, 13)][i % 2]) for i, case in enumerate(CASES)]
GRID += [(*case, (64, 64)) for case in CASES if case[0] in ("causal-cross", "plain")]
GRID += [(*case, (16, 8)) for case in CASES if case[0] in ("document-cross",)]


@pytest.mark.parametrize(
    "name, mask_mod, S, exact, block_size", GRID, ids=[f"{c[0]}-{c[4][0]}x{c[4][1]}" for c in GRID]
)
def test_block_mask_matches_brute_force(name, mask_mod, S, exact, block_size):
    bm = create_block_mask_jit(mask_mod, B, N, T, S, block_size=block_size)
    want = brute_classes(dense_mask(mask_mod, B, N, T, S), *block_size)
    check_block_mask(bm, want, exact=exact)
    assert bm.shape == (B, N, T, S) and bm.block_size == block_size and bm.seq_lengths == (T, S)
    # Out of jit, the mask mod is its jaxpr over the arrays it reads: the same mask.
    np.testing.assert_array_equal(
        dense_mask(bm.mask_mod, B, N, T, S), dense_mask(mask_mod, B, N, T, S)
    )


@pytest.mark.parametrize(
    "mask_mod, Bm, Nm",
    [
        (mods.document(jnp.asarray(SEG)), None, None),
        (mods.document(jnp.asarray(SEG)), B, None),
        (_plain, None, N),
        (_plain, None, None),
    ],
    ids=[
        "document-rule-B-N-None",
        "document-rule-N-None",
        "plain-dense-B-None",
        "plain-dense-B-N-None",
    ],
)
def test_none_batch_or_heads_broadcast_and_the_mod_sees_index_0(mask_mod, Bm, Nm):
    bm = create_block_mask_jit(mask_mod, Bm, Nm, T, T, block_size=(16, 8))
    full = brute_classes(dense_mask(mask_mod, B, N, T, T), 16, 8)
    want = full[: 1 if Bm is None else B, : 1 if Nm is None else N]
    check_block_mask(bm, want, exact=True)
    assert bm.shape == (Bm or 1, Nm or 1, T, T)


def test_create_block_mask_is_jittable_over_the_arrays_a_mod_closes_over():
    def make(seg, kv_len):
        mask_mod = mods.and_masks(mods.causal, mods.document(seg), mods.padding(kv_lengths=kv_len))
        return flax_mha.create_block_mask(mask_mod, B, None, T, T, block_size=16)

    seg, kv_len = jnp.asarray(SEG), jnp.array([44, 50])
    got = jax.jit(make)(seg, kv_len)
    want = make(seg, kv_len)
    for name in ("classes", "kv_num_blocks", "kv_indices", "full_kv_num_blocks",
                 "full_kv_indices", "q_num_blocks", "q_indices", "full_q_num_blocks",
                 "full_q_indices"):  # fmt: skip
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert got.block_size == (16, 16) and got.seq_lengths == (T, T)


def test_a_dense_mask_mod_under_jit_matches_eager():
    def plain(b, h, q_idx, kv_idx, shift):
        return (q_idx * 7 + kv_idx + shift) % 5 < 2

    def make(shift):
        mask_mod = lambda b, h, i, j: plain(b, h, i, j, shift)  # noqa: E731
        return flax_mha.create_block_mask(mask_mod, None, None, T, 30, block_size=(8, 6))

    got = np.asarray(jax.jit(make)(jnp.int32(3)).classes)
    want = brute_classes(dense_mask(lambda b, h, i, j: plain(b, h, i, j, 3), 1, 1, T, 30), 8, 6)
    np.testing.assert_array_equal(got, want)


def test_block_mask_is_a_pytree_that_passes_through_jit():
    bm = flax_mha.create_block_mask(mods.causal, None, None, T, T, block_size=16)
    leaves, treedef = jax.tree_util.tree_flatten(bm)
    assert len(leaves) == 9 and all(isinstance(x, jax.Array) for x in leaves)
    back = jax.jit(lambda m: m)(bm)
    assert isinstance(back, BlockMask) and back.block_size == (16, 16)
    assert back.mask_mod is mods.causal
    np.testing.assert_array_equal(back.classes, bm.classes)


def test_to_dense_and_sparsity_describe_the_blocks():
    bm = flax_mha.create_block_mask(mods.causal, None, None, 64, 64, block_size=16)
    visited = np.tril(np.ones((4, 4), bool))
    np.testing.assert_array_equal(np.asarray(bm.to_dense())[0, 0], visited)
    assert bm.sparsity() == pytest.approx(6 / 16)
    assert "block_size=(16, 16)" in repr(bm) and "causal" in repr(bm)


def test_from_classes_builds_the_lists_of_given_classes():
    classes = rng.integers(0, 3, size=(2, 1, 5, 4))
    bm = BlockMask.from_classes(classes, block_size=(8, 8), seq_lengths=(40, 32))
    check_block_mask(bm, classes, exact=True)
    assert bm.mask_mod is None


def test_default_block_size_on_cpu_grows_with_length_from_128_to_512():
    for L, want in [(50, 128), (1024, 128), (2048, 256), (4096, 512), (32768, 512)]:
        assert default_block_size(L, L) == (want, want), L
    assert default_block_size(64, 4096) == (128, 512)


def test_default_block_size_with_heads_of_64_or_more_is_512_from_length_1024():
    assert default_block_size(1024, 2048, head_dim=64) == (512, 512)
    assert default_block_size(512, 1024, head_dim=128) == (128, 512)
    assert default_block_size(1024, 1024, head_dim=32) == (128, 128)  # narrower: as before
    assert default_block_size(1024, 1024) == (128, 128)  # unknown: as before
    assert flax_mha.create_block_mask(mods.causal, None, None, 50, 2048).block_size == (128, 256)


def test_create_block_mask_takes_the_head_size_for_its_default_blocks():
    def size(**kw):
        return flax_mha.create_block_mask(mods.causal, None, None, 1024, 1024, **kw).block_size

    assert size() == (128, 128)
    assert size(head_dim=64) == (512, 512)
    assert size(head_dim=32) == (128, 128)
    assert size(head_dim=64, block_size=64) == (64, 64)  # a block size given wins
    for bad in (0, -64, 64.0, True):
        with pytest.raises(ValueError, match=rf"head_dim should be a positive int .*{bad!r}"):
            size(head_dim=bad)


def _largest_intermediate(fn) -> int:
    jaxpr = jax.make_jaxpr(fn)()
    sizes = [0]

    def walk(jx):
        for eqn in jx.eqns:
            sizes.extend(
                int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")
            )
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return max(sizes)


def test_building_a_block_mask_never_makes_a_T_by_S_array():
    L = 8192
    seg = jnp.zeros((1, L), jnp.int32)
    ruled = mods.and_masks(mods.causal, mods.document(seg))
    plain = lambda b, h, i, j: (i // 100) == (j // 100)  # noqa: E731
    for mask_mod in (ruled, plain):
        size = _largest_intermediate(
            lambda m=mask_mod: flax_mha.create_block_mask(m, 1, 2, L, L, block_size=128)
        )
        assert size < L * L // 8, (mask_mod, size)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (("causal", B, N, T, T), {}, TypeError, r"mask_mod should be a function, but got str"),
        ((mods.causal, 0, N, T, T), {}, ValueError, r"B should be a positive int or None, but got 0"),
        ((mods.causal, B, -1, T, T), {}, ValueError, r"N should be a positive int or None, but got -1"),
        ((mods.causal, B, N, 0, T), {}, ValueError, r"T should be a positive int, but got 0"),
        ((mods.causal, B, N, T, 2.5), {}, ValueError, r"S should be a positive int, but got 2.5"),
        ((mods.causal, B, N, T, T), dict(block_size=0), ValueError, r"block_size should be a positive int or a \(block_q, block_k\) pair of positive ints, but got 0"),
        ((mods.causal, B, N, T, T), dict(block_size=(16, -8)), ValueError, r"block_size .* but got \(16, -8\)"),
        ((mods.causal, B, N, T, T), dict(block_size=(16,)), ValueError, r"block_size .* but got \(16,\)"),
        ((mods.causal, B, N, T, T), dict(block_size="16"), ValueError, r"block_size .* but got '16'"),
        ((mods.causal, B, N, T, T), dict(block_size=2.5), ValueError, r"block_size .* but got 2.5"),
        ((mods.causal, True, N, T, T), {}, ValueError, r"B should be a positive int or None, but got True"),
        ((mods.document(jnp.zeros((1, T - 3), jnp.int32)), B, N, T, T), {}, ValueError,
         rf"segment_ids should have length {T} \(the queries\), but got {T - 3}"),
    ],
    ids=["mod", "B", "N", "T", "S", "block", "block_k", "pair", "str", "float", "bool B", "segment ids"],
)  # fmt: skip
def test_bad_arguments_are_errors_naming_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        flax_mha.create_block_mask(*args, **kwargs)


def test_numpy_int_block_sizes_are_accepted():
    bm = flax_mha.create_block_mask(mods.causal, B, N, T, T, block_size=np.int64(16))
    assert bm.block_size == (16, 16) and all(isinstance(x, int) for x in bm.block_size)


@pytest.mark.parametrize("grid", [(2, 2), (8, 8), (4,)])
def test_classes_for_another_block_grid_are_an_error(grid):
    # A 64-long mask of 16-blocks has 4 x 4 blocks: another grid would be read wrongly.
    with pytest.raises(ValueError, match=r"classes should have shape \[Bb, Nb, 4, 4\]"):
        flax_mha.BlockMask.from_classes(
            np.full((1, 1, *grid), 2), block_size=(16, 16), seq_lengths=(64, 64)
        )


# --- a block mask through jit ----------------------------------------------------------


def _documents(seed, L=64):
    return jnp.sort(jax.random.randint(jax.random.key(seed), (2, L), 0, 4), axis=1)


def _doc_causal_mask(seg):
    mod = mods.and_masks(mods.causal, mods.document(seg))
    return flax_mha.create_block_mask(mod, 2, None, seg.shape[1], seg.shape[1], block_size=16)


def _qkv(L=64):
    return tuple(jax.random.normal(jax.random.key(i), (2, L, 2, 8)) for i in range(3))


def test_a_new_block_mask_per_batch_does_not_retrace_a_jitted_step():
    # The models' pattern: one block mask per batch (new segment ids, the same mods and
    # shapes) passed into a jitted step. The arrays its mask mod reads are leaves, so
    # the step traces once; and it uses each batch's ids, not the first batch's.
    q, k, v = _qkv()
    traces = []

    @jax.jit
    def step(q, k, v, block_mask):
        traces.append(1)
        return flax_mha.flex_attention(q, k, v, block_mask=block_mask, implementation="blockwise")

    for seed in range(3):
        seg = _documents(seed)
        mod = mods.and_masks(mods.causal, mods.document(seg))
        got = step(q, k, v, _doc_causal_mask(seg))
        want = flax_mha.flex_attention(q, k, v, mask_mod=mod, implementation="reference")
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert len(traces) == 1


def test_a_jitted_step_does_not_keep_the_first_block_masks_arrays_alive():
    # jax.jit keeps the first call's pytree structure in its cache, and the block mask's
    # structure holds its traced mask mod: that must not hold the mod and the arrays it
    # closes over (a batch's segment ids, a large table) once the caller drops them.
    import gc
    import weakref

    q, k, v = _qkv()
    step = jax.jit(lambda bm: flax_mha.flex_attention(q, k, v, block_mask=bm))

    def one_batch(seed):
        seg = _documents(seed)
        table = jnp.zeros((256, 256))  # read by the mod: one of the block mask's leaves
        mod = mods.and_masks(mods.causal, lambda b, h, i, j: seg[b, i] + table[0, 0] == seg[b, j])
        bm = flax_mha.create_block_mask(mod, 2, None, 64, 64, block_size=16)
        jax.block_until_ready(step(bm))
        return weakref.ref(table), weakref.ref(mod)

    refs = [one_batch(seed) for seed in range(2)]
    gc.collect()
    assert all(ref() is None for pair in refs for ref in pair), refs


def test_a_block_mask_rebuilt_from_its_own_leaves_gives_back_its_mask_mod():
    # Unflattened with the same arrays (jax.tree.map of the identity), a block mask keeps
    # the very mod it was made from (its block rule included); with new arrays, a mod
    # that reads them.
    seg = _documents(3)
    mod = mods.and_masks(mods.causal, mods.document(seg))
    bm = flax_mha.create_block_mask(mod, 2, None, 64, 64, block_size=16)
    assert jax.tree.map(lambda x: x, bm).mask_mod is mod
    other = _documents(4)
    moved = jax.tree.map(lambda x: other if x is seg else x, bm)
    assert moved.mask_mod is not mod
    idx = jnp.arange(64, dtype=jnp.int32)

    def dense(fn):  # [2, 64, 64] over (b, q_idx, kv_idx)
        one = lambda b, i, j: fn(b, jnp.int32(0), i, j)  # noqa: E731
        over_j = jax.vmap(one, in_axes=(None, None, 0))
        over_i = jax.vmap(over_j, in_axes=(None, 0, None))
        return jax.vmap(over_i, in_axes=(0, None, None))(jnp.arange(2, dtype=jnp.int32), idx, idx)

    want = dense(mods.and_masks(mods.causal, mods.document(other)))
    assert not np.array_equal(want, dense(mod))  # the new ids change the mask
    np.testing.assert_array_equal(dense(moved.mask_mod), want)


def test_a_block_mask_made_inside_jit_can_be_used_outside():
    q, k, v = _qkv()
    seg = _documents(7)
    bm = jax.jit(_doc_causal_mask)(seg)
    got = flax_mha.flex_attention(q, k, v, block_mask=bm, implementation="blockwise")
    mod = mods.and_masks(mods.causal, mods.document(seg))
    want = flax_mha.flex_attention(q, k, v, mask_mod=mod, implementation="reference")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(bm.classes, _doc_causal_mask(seg).classes)


def test_block_masks_of_different_mods_do_not_share_a_trace():
    q, k, v = _qkv()
    step = jax.jit(lambda bm: flax_mha.flex_attention(q, k, v, block_mask=bm))
    causal = flax_mha.create_block_mask(mods.causal, None, None, 64, 64, block_size=16)
    window = flax_mha.create_block_mask(mods.sliding_window(3), None, None, 64, 64, block_size=16)
    for bm, mod in ((causal, mods.causal), (window, mods.sliding_window(3))):
        want = flax_mha.flex_attention(q, k, v, mask_mod=mod, implementation="reference")
        np.testing.assert_allclose(step(bm), want, atol=1e-5, rtol=1e-5)


def test_through_jit_the_mask_mod_keeps_its_spec_and_extents():
    # The backends that read a spec (cuDNN's flags, splash's masks) and the extents check
    # see the same mask mod inside a jitted step as outside, with this call's arrays.
    from flax_mha.kernels.flex import cudnn_flags

    lengths = jnp.array([20, 32])
    bm = flax_mha.create_block_mask(
        mods.and_masks(mods.causal, mods.padding(kv_lengths=lengths)), 2, None, 32, 32,
        block_size=16,
    )  # fmt: skip
    seen = {}

    @jax.jit
    def step(bm):
        mod = bm.mask_mod
        seen["spec"] = mod.spec
        seen["flags"] = cudnn_flags(mod, None, None, 2)
        seen["extents"] = mod.extents
        return bm.classes

    step(bm)
    assert seen["spec"][0] == "and" and seen["spec"][1] == ("causal",), seen["spec"]
    assert isinstance(seen["flags"], dict) and seen["flags"]["is_causal"], seen["flags"]
    assert seen["extents"] == (("kv_lengths", "B", 2),)
    shared = flax_mha.create_block_mask(mods.padding(kv_lengths=lengths), None, None, 32, 32,
                                        block_size=16)  # fmt: skip
    q = jnp.zeros((4, 32, 2, 8))  # 4 sequences, 2 lengths
    with pytest.raises(ValueError, match=r"kv_lengths should have 4 rows \(the batch size\) or 1"):
        jax.jit(lambda q, bm: flax_mha.flex_attention(q, q, q, block_mask=bm))(q, shared)
