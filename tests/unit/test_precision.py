from model_lib.train import choose_precision, cpu_supports_bf16


def test_cpu_without_bf16_trains_in_float32():
    assert choose_precision("auto", [], cpu_bf16=False)[0] == "float32"


def test_cpu_with_bf16_units_uses_mixed_bfloat16():
    assert choose_precision("auto", [], cpu_bf16=True)[0] == "mixed_bfloat16"


def test_gpu_choice_and_explicit_override():
    assert choose_precision("auto", [(8, 0)], cpu_bf16=True)[0] == "mixed_float16"
    assert choose_precision("auto", [(6, 1)], cpu_bf16=False)[0] == "float32"
    assert choose_precision("float32", [(9, 0)], cpu_bf16=True) == ("float32", "requested explicitly")


def test_cpu_flags_are_read_from_cpuinfo():
    assert cpu_supports_bf16("flags : fpu sse avx2 avx512f avx512_bf16 amx_tile")
    assert cpu_supports_bf16("flags : fpu amx_bf16 amx_tile")
    assert not cpu_supports_bf16("flags : fpu sse avx2 avx512f")


def test_xla_is_used_on_gpus_only_unless_forced():
    import pytest

    from model_lib.train import use_xla

    assert use_xla("auto", on_gpu=True) and not use_xla("auto", on_gpu=False)
    assert use_xla("on", on_gpu=False) and not use_xla("off", on_gpu=True)
    with pytest.raises(ValueError, match="jit_compile"):
        use_xla("maybe", on_gpu=True)


def test_batch_size_and_learning_rate_scale_together_with_replicas():
    from model_lib.config import resolve_config
    from model_lib.train import scale_for_replicas

    config = resolve_config("default")
    assert scale_for_replicas(config, 1) is config
    four = scale_for_replicas(config, 4)
    assert (four.batch_size, four.learning_rate) == (config.batch_size * 4, config.learning_rate * 4)
