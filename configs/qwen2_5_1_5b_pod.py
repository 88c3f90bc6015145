"""configs/qwen2_5_1_5b.py on a TPU v5p-16 slice (8 chips on 2 hosts) or one 8-GPU host.

Mesh: layers 4 x data 1 x fsdp 2. Alignment fits 7 of the 28 layers per "layers" group under
`shard_map` (a data axis of 1 keeps the Pallas kernel out of the SPMD partitioner); statistics,
evaluation and layer scoring split their batches over all 8 devices; the teacher's params are
stored split over "fsdp" (utils/sharding.py param_spec), as distillation's are. Batches are
multiples of the 8 devices.

    # every worker of the slice (docs: launch/multihost.py):
    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command='
        cd taylorcal_jax && python -m taylorcal_jax.main \
            --config=configs/qwen2_5_1_5b_pod.py:/mnt/ckpt/Qwen2.5-1.5B \
            --workdir=/mnt/shared/qwen2_5_1_5b_pod'
    # one host with 8 GPUs, one process per GPU:
    python launch/multihost.py --processes=8 -- python -m taylorcal_jax.main \
        --config=configs/qwen2_5_1_5b_pod.py:/ckpt/Qwen2.5-1.5B --workdir=/tmp/qwen2_5_1_5b_pod
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
import real_teacher  # noqa: E402


def get_config(arg: str | None = None):
    c = real_teacher.real_teacher_config("checkpoints/Qwen2.5-1.5B", arg)
    return common.apply_pod(c, num_devices=8)
