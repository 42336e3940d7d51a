"""Run under torchrun by test_distributed.py: trains one CAM run and writes a hash of this rank's
final parameters (network and method extras), so the test can check that the processes agree.
BatchNorm running statistics are left out: DDP broadcasts rank 0's at every forward, and each
rank's last forward then updates its own copy; rank 0's are the ones saved."""

import hashlib
import json
import os
import sys

import torch

from promptseg.train.cam_train import CamTrainer
from promptseg.train.config import CamTrainConfig, default_guidance
from promptseg.train.methods import TRAINERS

data, out, method, clip, init = sys.argv[1:6]
guidance = None if method == "baseline" else default_guidance(method, clip_pretrained=clip, init_from=init,
                                                              cbs_threshold=None)
cfg = CamTrainConfig(data=data, out=out, method=method, epochs=2, batch_size=16, cam_scales=(1.0,), threads=1,
                     val_split=None, guidance=guidance)
trainer = CamTrainer(cfg) if method == "baseline" else TRAINERS[method](cfg)
trainer.train(show_progress=False)
digest = hashlib.sha256()
state = {**dict(trainer.net.named_parameters()), **{f"extra.{k}.{n}": t for k, sd in trainer.extra_state().items()
                                         for n, t in sd.items()}}
for name in sorted(state):
    digest.update(name.encode() + state[name].detach().cpu().contiguous().numpy().tobytes())
rank = os.environ["RANK"]
with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
    json.dump({"sha256": digest.hexdigest(), "threads": torch.get_num_threads()}, fh)
