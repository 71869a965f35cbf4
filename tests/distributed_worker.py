"""One process of a 2-process CPU run (`jax.distributed`), started by tests/test_sharding.py.

``python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON WORKDIR``

Each process owns 2 CPU devices; together they form a data=2 x model=2 mesh whose
``data`` axis spans the processes. Every process trains `STEPS` sharded steps of the tiny
config on the same global batches, saves an orbax checkpoint to the shared ``WORKDIR``
(each process writes its own shards), restores it onto the mesh, and writes its
per-step losses and the restore check to ``OUT_JSON``.
"""

from __future__ import annotations

import json
import pathlib
import sys

STEPS = 4
BATCH = 16
LOCAL_DEVICES = 2


def worker_config():
    """The tiny config with dropout on (the test's one-process reference uses it too)."""
    from flax_mha.apps.cli import load_config

    config = load_config(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    config.model.dropout_rate = 0.1
    return config


def batches():
    from flax_mha import data

    return [data.train_batch(0, s, "reverse", BATCH, 1, 6) for s in range(STEPS)]


def main(process_id: int, num_processes: int, port: int, out: str, workdir: str) -> None:
    import jax

    # Before the backend starts: this process's share of the simulated devices.
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    import numpy as np
    import orbax.checkpoint as ocp

    from flax_mha import sharding, train

    assert jax.process_count() == num_processes, jax.process_count()
    assert jax.local_device_count() == LOCAL_DEVICES and jax.device_count() == 4
    mesh = sharding.make_mesh("data=2,model=2")
    config = worker_config()
    state = train.create_train_state(config, jax.random.key(0), mesh)
    step = train.make_train_step(state, mesh)
    drop = sharding.replicate(jax.random.key(1), mesh)
    losses = []
    for batch in batches():
        state, metrics = step(state, sharding.shard_batch(batch, mesh), drop)
        # The metrics are replicated on every device, so each process can read them.
        losses.append(float(metrics["loss_sum"]) / float(metrics["tokens"]))

    manager = train.checkpoints.checkpoint_manager(workdir, config)
    manager.save(STEPS, args=ocp.args.StandardSave(train.checkpoints.checkpoint_tree(state)))
    manager.wait_until_finished()
    fresh = train.create_train_state(config, jax.random.key(7), mesh)
    restored = train.checkpoints.restore(manager, fresh, STEPS)
    manager.close()
    same = True
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        same &= a.sharding == b.sharding
        for sa, sb in zip(a.addressable_shards, b.addressable_shards, strict=True):
            same &= sa.index == sb.index and np.array_equal(np.asarray(sa.data), sb.data)
    q = restored.params["encoder_blocks_0"]["self_attention"]["query"]["kernel"]
    result = {
        "process_id": process_id,
        "losses": losses,
        "restored_equal": bool(same),
        "restored_step": int(restored.step),
        "query_kernel_spec": str(q.sharding.spec),
        "query_kernel_local_shards": [list(s.data.shape) for s in q.addressable_shards],
    }
    with open(out, "w") as f:
        json.dump(result, f)
    print(json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    pid, n, port, out_path, workdir_path = sys.argv[1:6]
    main(int(pid), int(n), int(port), out_path, workdir_path)
