"""KL(p || q) of two models' next-token distributions from their logits, with its gradient in
the student's logits, per row (api.py)."""
