"""Equations of a jaxpr, sub-jaxprs included: what tests count (kernel launches, products)."""

from __future__ import annotations

import jax
import jax.extend  # jax.extend.core below; not imported by `import jax` in every version


def equations(jaxpr, primitive: str) -> list:
    """The equations of `primitive` in `jaxpr`, each sub-jaxpr walked at every use (printed
    jaxprs share repeated sub-jaxprs, so counting in the text undercounts)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += equations(sub.jaxpr, primitive)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += equations(sub, primitive)
    return found
