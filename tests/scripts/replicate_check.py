"""One of two processes (two CPU devices each) replicating a 60-leaf tree.

`python replicate_check.py PORT PROCESS_ID DIFFER OUT` writes to the file OUT
one JSON object: how many all-gathers `ddpm_jax.parallel.replicate` ran,
whether every device got the values, and the error when process 1 passed
other values (DIFFER=1). (Not stdout: Gloo prints its connections there.)
"""

import json
import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "2"
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from ddpm_jax import parallel  # noqa: E402

port, pid, differ, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

gathers = [0]
inner = multihost_utils.process_allgather


def counting(*args, **kwargs):
  gathers[0] += 1
  return inner(*args, **kwargs)


multihost_utils.process_allgather = counting

tree = {f"w{i}": np.full((3, i + 1), i, np.float32) for i in range(59)}
tree["step"] = np.int32(7 + (pid if differ else 0))
mesh = parallel.make_mesh()
result = {"process": pid}
try:
  out = parallel.replicate(tree, mesh)
  result["gathers"] = gathers[0]
  result["ok"] = all(
    len(x.sharding.device_set) == 4
    and all(np.array_equal(s.data, tree[k]) for s in x.addressable_shards)
    for k, x in out.items()
  )
except ValueError as e:
  result["error"] = str(e)
with open(out_path, "w") as f:
  json.dump(result, f)
