"""The module and decode rows of `flax-mha bench`, for whichever flax_mha is importable.

Run it for two versions of the code, interleaved, to compare them in one sitting:
``PYTHONPATH=/tmp/old python benchmarks/module_decode_rows.py old`` (an older commit
extracted with ``git archive <rev> | tar -x -C /tmp/old``), then ``... new`` for this
checkout. Prints one JSON line per row (median of 7 runs, ms).
"""

import json
import sys

try:
    from flax_mha.apps import bench
except ImportError:  # commits before the apps/ package
    from flax_mha import bench  # type: ignore[no-redef]
tag = sys.argv[1]
rows = bench._module_rows(4, 512, 512, 8, 7, False, lambda: None)
rows += bench._decode_rows((512, 2048, 8192, 16384), 0.125, 512, 8, 7, lambda: None)
for r in rows:
    keys = dict(impl=r["impl"], kind=r["kind"], pass_=r.get("pass_"), L=r["L"])
    print(json.dumps(dict(tag=tag, **keys, ms=round(r["ms"], 3))))
