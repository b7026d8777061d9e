"""`python -m tests.world_base_run OUT NPZ STEPS EVERY [CONFIG_JSON]`: a world base-model run
on a small npz (images, captions), checkpointing every EVERY steps; the process the resume
test kills."""

from __future__ import annotations

import json
import sys

import numpy as np

from genattr.world.base import BaseConfig
from genattr.world.training import BaseTrainer

if __name__ == "__main__":
    out, npz, steps, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cfg = BaseConfig.from_dict(json.loads(sys.argv[5])) if len(sys.argv) > 5 else None
    with np.load(npz) as z:
        images, captions = z["images"], [str(c) for c in z["captions"]]
    trainer = BaseTrainer(out, images, captions, cfg)
    trainer.train(steps, checkpoint_seconds=1e9, checkpoint_every=every, grid=False)
