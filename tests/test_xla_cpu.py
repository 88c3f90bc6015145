"""utils/xla_cpu.py: the XLA_FLAGS workaround is added once, only on jaxlib 0.10.*."""

from taylorcal_jax.utils.xla_cpu import YNN_FLAG, disable_ynn_fusion


def test_added_on_jaxlib_0_10_and_kept_with_other_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert disable_ynn_fusion(env, "0.10.2")
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {YNN_FLAG}"
    assert not disable_ynn_fusion(env, "0.10.2")  # idempotent
    assert env["XLA_FLAGS"].count("ynn") == 1
    empty = {}
    assert disable_ynn_fusion(empty, "0.10.0") and empty["XLA_FLAGS"] == YNN_FLAG


def test_left_alone_on_other_versions_and_user_settings():
    for version in ("0.11.2", "0.9.1", "1.0.10"):
        env = {"XLA_FLAGS": "--foo=1"}
        assert not disable_ynn_fusion(env, version)
        assert env["XLA_FLAGS"] == "--foo=1"
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert not disable_ynn_fusion(env, "0.10.2")
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
