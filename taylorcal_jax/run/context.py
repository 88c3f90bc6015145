"""The run context: what every stage of one run shares, each part made once.

    config    the validated config          workdir   where outputs go
    mesh      the one device mesh (axes "layers", "data", "fsdp"; config section `mesh`)
    teacher   (ModelConfig, params) of the teacher, loaded on first use; with mesh.fsdp > 1
              its params are placed sharded over "fsdp" (utils/sharding.py param_spec), so a
              teacher larger than one device's memory is never whole on one device at rest
    corpus    the tokenised text (tokenizer included), built or read from the cache once
              (by process 0 first, when there are several), then checked against the token
              windows the run's stages will cut (`samples`)
    metrics   the metrics.jsonl writer

The teacher and the corpus load lazily, because the `pretrain` stage writes the teacher
that later stages read; a run whose stages are all skipped loads neither. Problems with the
teacher's files become one-line `UserError`s here, at the edge.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from taylorcal_jax.errors import UserError
from taylorcal_jax.run import inputs
from taylorcal_jax.utils import hosts, sharding
from taylorcal_jax.utils.metrics import MetricsWriter

MESH_AXES = ("layers", "data", sharding.FSDP)


def mesh_axes(mesh_config) -> dict[str, int]:
    """{axis: configured size} of the run's mesh, in mesh order (fsdp innermost, so its
    devices are neighbours: it gathers weights every step)."""
    return {name: int(mesh_config[name]) for name in MESH_AXES}


def build_mesh(mesh_config):
    """The run's mesh: axes ("layers", "data", "fsdp") with the configured sizes (-1: the rest)."""
    return sharding.make_mesh(mesh_axes(mesh_config))


class RunContext:
    def __init__(self, config, workdir: str, samples=()):
        """samples: the token windows the run's stages will cut (run/plan.py `Sample`),
        checked when the corpus is built."""
        self.config = config
        self.workdir = workdir
        self.samples = tuple(samples)

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    @functools.cached_property
    def metrics(self) -> MetricsWriter:
        return MetricsWriter(self.workdir)

    @functools.cached_property
    def mesh(self):
        return build_mesh(self.config.mesh)

    @property
    def teacher_dir(self) -> str:
        return inputs.teacher_dir(self.config, self.workdir)

    @functools.cached_property
    def teacher(self):
        """(ModelConfig, params) of the teacher; its vocabulary covers the tokenizer's."""
        from taylorcal_jax.models import hf_io  # noqa: PLC0415

        path = self.teacher_dir
        field = "teacher.path" if self.config.teacher.path else "the 'pretrain' stage's output"
        try:
            mcfg, params = hf_io.load_pretrained(path)
        except (
            hf_io.CheckpointError,
            hf_io.CorruptCheckpointError,
            hf_io.UnsupportedModelError,
        ) as e:
            raise UserError(
                f"cannot load the teacher at {path} ({field}): {e}",
                "point teacher.path at a complete Hugging Face checkpoint directory"
                if self.config.teacher.path
                else "rerun the teacher with --rerun=pretrain",
            ) from e
        if self.corpus.vocab_size > mcfg.vocab_size:
            raise UserError(
                f"the tokenizer has {self.corpus.vocab_size} tokens but the teacher at {path} "
                f"only {mcfg.vocab_size}",
                "use the teacher's own tokenizer (leave tokenizer.path empty)",
            )
        if sharding.axis_size(self.mesh, sharding.FSDP) > 1:
            params = sharding.place_params(params, self.mesh)
        return mcfg, params

    @functools.cached_property
    def corpus(self):
        from taylorcal_jax.data import corpus as corpus_lib  # noqa: PLC0415

        build = functools.partial(
            corpus_lib.build_corpus,
            self.config.data,
            self.config.tokenizer,
            self.path("data"),
            tokenizer_path=inputs.tokenizer_path(self.config, self.workdir),
        )
        # Process 0 builds the cache in the workdir; the others read it.
        corpus = hosts.main_first(build, f"corpus {self.workdir}")
        inputs.check_samples(corpus, self.samples)
        return corpus

    def sequences(self, section) -> np.ndarray:
        """[N, T] token ids of a section with split, num_sequences, seq_len and seed."""
        return self.corpus.sample(
            section.split, int(section.num_sequences), int(section.seq_len), int(section.seed)
        )
