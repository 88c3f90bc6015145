"""launch/count_stage2_flops.py: XLA's FLOP count of a stage-2 step against the model counts."""

import count_stage2_flops  # launch/


def test_remat_adds_work_and_the_step_executes_at_least_the_model_flops():
    dims = count_stage2_flops.SMALL_SHAPE
    with_remat = count_stage2_flops.count(dims, 2, 32, 2, remat=True)
    without = count_stage2_flops.count(dims, 2, 32, 2, remat=False)
    # 6N (student forward and backward) + 2N (teacher forward) are all matmuls XLA counts;
    # rematerialisation runs the student's forward again (at most 2N more).
    assert without["executed_flops_per_token"] >= without["necessary_flops_per_token"]
    extra = with_remat["executed_flops_per_token"] - without["executed_flops_per_token"]
    assert 0 < extra <= without["executed_flops_per_token"]
    assert with_remat["n_student"] > with_remat["n_teacher"]  # GDN layers hold more params
    assert with_remat["counted_flops_per_token"] == 6 * with_remat["n_student"]


def test_no_loop_hides_iterations_from_the_count(monkeypatch):
    # XLA counts a loop's body once: with the attention split into query blocks the count would
    # drop; the counted program has one block (and one KL chunk), and the setting comes back
    from taylorcal_jax.models import layers

    dims = count_stage2_flops.SMALL_SHAPE
    whole = count_stage2_flops.count(dims, 2, 32, 2, remat=False)
    monkeypatch.setattr(layers, "ATTEND_BLOCK", 8)
    blocked = count_stage2_flops.count(dims, 2, 32, 2, remat=False)
    assert layers.ATTEND_BLOCK == 8
    assert blocked["executed_flops_per_token"] == whole["executed_flops_per_token"]
