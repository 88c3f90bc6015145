"""The modelling code written into exported model directories (see export/hf_torch.py).

Its two modules are ordinary source files that the exporter copies verbatim; they import only
torch and transformers (and flash-linear-attention when installed), never taylorcal_jax.
"""
