"""Training of `flax_mha.models.Transformer` on the built-in tasks (optax, orbax).

The layout follows Flax's ``examples/wmt``, one job per module:

* `flax_mha.train.config`: `validate_config` and `model_config`;
* `flax_mha.train.default_config`: the default ``get_config()`` (what ``configs/default.py``
  re-exports and `flax-mha train` uses without ``--config``);
* `flax_mha.train.state`: `TrainState`, `create_train_state`, the optimizer and schedules;
* `flax_mha.train.steps`: `cross_entropy_loss`, `train_step` (pure, jitted once),
  `make_train_step` (the same on a mesh), `eval_step`, `evaluate`;
* `flax_mha.train.checkpoints`: save, restore, `verify_state`, fall back past damaged
  checkpoints, `start_state`, `restore_params`;
* `flax_mha.train.workdir`: the run's lock, ``config.json`` and what a resume may change,
  ``metrics.jsonl``;
* `flax_mha.train.loop`: `train_and_evaluate(config, workdir)`;
* `flax_mha.train.lm`: the second main job, a byte-level `TransformerLM` trained on the
  standard library's docstrings packed with segment ids (`train_lm`, `generate_text`;
  ``flax-mha train --config configs/lm.py`` and ``flax-mha generate``).

Plots of a run are in `flax_mha.viz`.

Exact resume: the batch of step ``s`` is a pure function of ``(seed, s)``
(`flax_mha.data.train_batch`) and the dropout key of step ``s`` is
``fold_in(key(seed), s)``, so a checkpoint of ``(params, opt_state, step)`` is the whole
state of a run: a run killed and resumed from its latest checkpoint ends with the same
parameters as one that was never interrupted.

Files in ``workdir``: ``config.json``, ``checkpoints/<step>/``, ``metrics.jsonl`` (one
JSON object per log line), ``curves.png`` and ``attention/*.png``.

Multi-device (``config.train.mesh = "data=2,model=4"``, or ``flax-mha train --mesh ...``):
the parameters and optimizer state are laid out by their logical axis names
(`flax_mha.sharding.DEFAULT_RULES`: heads and the feed-forward dimension over ``model``),
the batch is split over ``data``, and `make_train_step` jits the update with those in
and out shardings. Checkpoints hold the same tree either way; a restore places each array
with the sharding of the state it restores into, so a run may resume on another mesh.
"""

from flax_mha.train import checkpoints as checkpoints
from flax_mha.train.checkpoints import restore_params as restore_params
from flax_mha.train.checkpoints import verify_state as verify_state
from flax_mha.train.config import OPTIMIZERS as OPTIMIZERS
from flax_mha.train.config import SCHEDULES as SCHEDULES
from flax_mha.train.config import model_config as model_config
from flax_mha.train.config import validate_config as validate_config
from flax_mha.train.loop import train_and_evaluate as train_and_evaluate
from flax_mha.train.state import TrainState as TrainState
from flax_mha.train.state import create_train_state as create_train_state
from flax_mha.train.state import make_optimizer as make_optimizer
from flax_mha.train.state import make_schedule as make_schedule
from flax_mha.train.state import make_train_mesh as make_train_mesh
from flax_mha.train.state import paper_schedule as paper_schedule
from flax_mha.train.steps import cross_entropy_loss as cross_entropy_loss
from flax_mha.train.steps import eval_step as eval_step
from flax_mha.train.steps import evaluate as evaluate
from flax_mha.train.steps import make_train_step as make_train_step
from flax_mha.train.steps import train_step as train_step
from flax_mha.train.workdir import LOCK_FILE as LOCK_FILE
from flax_mha.train.workdir import RESUMABLE_FIELDS as RESUMABLE_FIELDS
from flax_mha.train.workdir import TrainingError as TrainingError
from flax_mha.train.workdir import TrainingInterrupted as TrainingInterrupted
from flax_mha.train.workdir import config_diff as config_diff
from flax_mha.train.workdir import load_workdir_config as load_workdir_config
from flax_mha.train.workdir import lock_workdir as lock_workdir
from flax_mha.train.workdir import read_metrics as read_metrics
