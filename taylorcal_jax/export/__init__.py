"""Students in formats that serving stacks and evaluation harnesses load.

    hf_torch     a transformers model directory with its own modelling code (hf_modeling/):
                 `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`; every
                 GDN student exports, and reads back exactly
    fla_format   flash-linear-attention's `GatedDeltaNetForCausalLM` format, for the students
                 whose teacher fits it (see fla_format.py)
    common       UnsupportedExportError, the checks (GDN student, known fields), the
                 tokenizer copy

Command line (module __main__):

    python -m taylorcal_jax.export --student=DIR --out=DIR [--format=hf|fla] [--dtype=bfloat16]
"""
