"""Package a trained class-conditional DDPM run as a pretrained model:
`python -m experiments.export_pretrained --workdir W --name mnist --command "..."`.

Writes `ddpm_jax/weights/<file>.npz` (EMA parameters, compressed, no pickle)
and `<file>.json` (the command, config, steps, wall time, final loss, and the
quality measured by `experiments.evaluate` in `W/eval/`), and prints the
sha256 to pin in `ddpm_jax.pretrained.REGISTRY`.
"""

from __future__ import annotations

from experiments import runtime

runtime.restart_main(__name__)  # huge pages: restart before the imports below (runtime.py)

import argparse
import dataclasses
import glob
import json
import os
import sys

import jax

import ddpm_jax as dj
from experiments import cli, ddpm_setup


def quality(eval_dir: str) -> dict:
  """The evaluation records in eval_dir (guidance sweeps and sampler sweeps)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(eval_dir, "*.json"))):
    rec = cli.read_json(path)
    keep = {k: rec[k] for k in ("checkpoint_step", "num_samples", "reference_readable") if k in rec}
    for key in ("rows", "sweep", "results", "baselines"):
      if key in rec:
        keep[key] = rec[key]
    out[os.path.basename(path)] = keep
  return out


def main(argv=None) -> None:
  p = cli._Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--name", default="mnist", choices=sorted(dj.pretrained.REGISTRY))
  p.add_argument("--command", required=True, help="the training command, for the record")
  p.add_argument("--best_guidance_scale", type=float, required=True)
  p.add_argument("--notes", default="")
  p.add_argument(
    "--eval_dir",
    default=None,
    help="evaluation JSONs to record (default: W/eval; e.g. the --out of `evaluate --pretrained`)",
  )
  a = p.parse_args(argv)
  config, model, schedule, params, step = ddpm_setup.load_trained(a.workdir)
  if not config.conditional:
    raise cli.UsageError("the pretrained model must be class-conditional (--conditional true)")
  history = cli.MetricsLog.read(
    os.path.join(a.workdir, "metrics.jsonl"), required=("loss", "time", "images_per_sec")
  )
  file_name = dj.pretrained.REGISTRY[a.name][0]
  path = os.path.join(dj.pretrained.WEIGHTS_DIR, file_name)
  os.makedirs(dj.pretrained.WEIGHTS_DIR, exist_ok=True)
  digest = dj.param_files.save_params(jax.device_get(params), path, compressed=True)
  first, last = history[0], history[-1]
  # The first window's time is not in the log: extrapolate it from its rate.
  first_window = first["step"] * config.batch_size / first["images_per_sec"]
  record = {
    "name": a.name,
    "sha256": digest,
    "file": file_name,
    "bytes": os.path.getsize(path),
    "command": a.command,
    "config": dataclasses.asdict(config),
    "num_classes": model.num_classes,
    "image_shape": [28, 28, 1],
    "steps": int(step),
    "training_wall_seconds": round(last["time"] - first["time"] + first_window, 1),
    "final_loss": last["loss"],
    "best_guidance_scale": a.best_guidance_scale,
    "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
    "notes": a.notes,
    "quality": quality(a.eval_dir or os.path.join(a.workdir, "eval")),
  }
  with open(os.path.splitext(path)[0] + ".json", "w") as f:
    json.dump(record, f, indent=1)
    f.write("\n")
  print(
    f"wrote {path} ({record['bytes']:,} bytes) and its .json; pin sha256 {digest}", file=sys.stderr
  )


if __name__ == "__main__":
  cli.exit_main(main)
