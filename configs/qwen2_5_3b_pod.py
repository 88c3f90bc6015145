"""configs/qwen2_5_3b.py on a TPU v5p-32 slice (16 chips on 4 hosts).

Mesh: layers 8 x data 1 x fsdp 2. Alignment fits the 36 layers padded to 40, 5 per "layers"
group, under `shard_map`; statistics, evaluation and layer scoring split their batches over all
16 devices; the teacher's params are stored split over "fsdp" (utils/sharding.py
param_spec), as distillation's are. Batches are multiples of the 16 devices.

    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command='
        cd taylorcal_jax && python -m taylorcal_jax.main \
            --config=configs/qwen2_5_3b_pod.py:/mnt/ckpt/Qwen2.5-3B-Instruct \
            --workdir=/mnt/shared/qwen2_5_3b_pod'

jax.distributed finds the hosts from the TPU environment (launch/multihost.py says more).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
import real_teacher  # noqa: E402


def get_config(arg: str | None = None):
    c = real_teacher.real_teacher_config("checkpoints/Qwen2.5-3B-Instruct", arg)
    return common.apply_pod(c, num_devices=16)
