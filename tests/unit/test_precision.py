import pytest

from model_lib.precision import (
    cached_bf16_speedup,
    choose_precision,
    cpu_bf16_units,
    machine_cache_dir,
    machine_key,
    measure_bf16_speedup,
    scale_for_replicas,
    use_xla,
)


def _never_measured() -> float:
    raise AssertionError("the bf16 probe should not run here")


def test_cpu_without_bf16_trains_in_float32():
    assert choose_precision("auto", [], cpu_bf16="", bf16_speedup=_never_measured)[0] == "float32"


def test_cpu_with_amx_uses_mixed_bfloat16():
    assert choose_precision("auto", [], cpu_bf16="amx", bf16_speedup=_never_measured)[0] == "mixed_bfloat16"


def test_avx512_bf16_without_amx_goes_by_the_measured_speed():
    faster = choose_precision("auto", [], cpu_bf16="avx512_bf16", bf16_speedup=lambda: 1.4)
    slower = choose_precision("auto", [], cpu_bf16="avx512_bf16", bf16_speedup=lambda: 0.6)
    assert faster == ("mixed_bfloat16", "CPU with AVX-512 BF16, no AMX: bf16 measured 1.40x float32's speed")
    assert slower[0] == "float32" and "0.60x" in slower[1]


@pytest.mark.slow
def test_the_bf16_probe_times_both_policies_on_this_cpu():
    """Only `auto` on an AVX-512 BF16 CPU without AMX runs the probe (the test above); elsewhere it would time
    emulated bf16 for minutes (216 s on an AMD EPYC without AVX-512) to check a path no run takes."""
    if (units := cpu_bf16_units()) != "avx512_bf16":
        pytest.skip(
            f"the bf16 probe runs only on AVX-512 BF16 CPUs without AMX; this CPU has {units or 'no bf16 units'}"
        )
    speedup = measure_bf16_speedup()
    assert 0.05 < speedup < 20 and measure_bf16_speedup() == speedup  # measured once per process


def test_the_probe_runs_once_per_machine_and_every_later_run_decides_alike(tmp_path):
    speeds = iter([1.15, 0.95, 1.8])
    calls = []

    def probe() -> float:
        calls.append(1)
        return next(speeds)

    first = cached_bf16_speedup(tmp_path, probe, key="cpu A")
    again = [cached_bf16_speedup(tmp_path, probe, key="cpu A") for _ in range(3)]
    other = cached_bf16_speedup(tmp_path, probe, key="cpu B")
    assert (first, again, other, len(calls)) == (1.15, [1.15] * 3, 0.95, 2)
    (tmp_path / "precision_probe.json").write_text("{ damaged")
    assert cached_bf16_speedup(tmp_path, probe, key="cpu A") == 1.8  # measured again, not trusted


def test_a_result_of_an_earlier_probe_design_is_measured_again(tmp_path):
    (tmp_path / "precision_probe.json").write_text('{"cpu A": {"bf16_speedup": 0.797}, "cpu B": 3}')
    assert cached_bf16_speedup(tmp_path, lambda: 1.3, key="cpu A") == 1.3
    assert cached_bf16_speedup(tmp_path, lambda: 0.7, key="cpu B") == 0.7  # not an entry at all
    assert cached_bf16_speedup(tmp_path, lambda: 9.9, key="cpu A") == 1.3  # this design's result is kept


def test_the_machine_key_names_the_cpu_its_cores_and_its_flags():
    info = "model name\t: AMD EPYC\nflags\t: sse avx512_bf16\n\nmodel name\t: AMD EPYC\nflags\t: sse avx512_bf16\n"
    assert machine_key(info).startswith("AMD EPYC x2 flags:")
    assert machine_key(info) != machine_key(info.replace("avx512_bf16", "amx_bf16"))


def test_gpu_choice_and_explicit_override():
    assert choose_precision("auto", [(8, 0)], cpu_bf16="amx")[0] == "mixed_bfloat16"
    assert choose_precision("auto", [(9, 0), (8, 6)], cpu_bf16="")[0] == "mixed_bfloat16"
    # float16 overflowed on greyscale digits, so auto never picks it: pre-Ampere GPUs train in float32.
    assert choose_precision("auto", [(7, 5)], cpu_bf16="")[0] == "float32"
    assert choose_precision("auto", [(6, 1)], cpu_bf16="")[0] == "float32"
    assert choose_precision("float32", [(9, 0)], cpu_bf16="amx") == ("float32", "requested explicitly")


def test_cpu_flags_are_read_from_cpuinfo():
    assert cpu_bf16_units("flags : fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16") == "amx"
    assert cpu_bf16_units("flags : fpu sse avx2 avx512f avx512_bf16") == "avx512_bf16"
    assert cpu_bf16_units("flags : fpu sse avx2 avx512f") == ""


def test_xla_is_used_on_gpus_only_unless_forced():
    assert use_xla("auto", on_gpu=True) and not use_xla("auto", on_gpu=False)
    assert use_xla("on", on_gpu=False) and not use_xla("off", on_gpu=True)
    with pytest.raises(ValueError, match="jit_compile"):
        use_xla("maybe", on_gpu=True)


def test_batch_size_and_learning_rate_scale_together_with_replicas():
    from model_lib.config import resolve_config

    config = resolve_config("default")
    assert scale_for_replicas(config, 1) is config
    four = scale_for_replicas(config, 4)
    assert (four.batch_size, four.learning_rate) == (config.batch_size * 4, config.learning_rate * 4)


def test_the_machine_cache_is_its_variable_else_the_local_caches_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ARTIFACTS_DIR", str(tmp_path / "artifacts"))
    monkeypatch.delenv("CIFAR_PIPELINE_CACHE", raising=False)
    monkeypatch.setenv("CIFAR_PIPELINE_MACHINE_CACHE", str(tmp_path / "machine"))
    assert machine_cache_dir() == tmp_path / "machine"  # whatever the ARTIFACTS_DIR: one probe per machine
    monkeypatch.delenv("CIFAR_PIPELINE_MACHINE_CACHE")
    assert machine_cache_dir() == tmp_path / "artifacts" / "cache"


# A JAX process that finds a program in the machine's cache without its access-time file (a run killed between
# JAX's two writes) and compiles something new, as a training run's set-up leaves JAX configured.
ORPHANED_CACHE = """
import os, sys, warnings
import jax, jax.numpy as jnp
from model_lib import precision

if sys.argv[1] == "repair":
    precision._keep_jax_compilations()
else:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", precision.JAX_CACHE_MAX_BYTES)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(lambda x: jnp.tanh(x) * 3.0 + 1.0)(jnp.ones(7)).block_until_ready()
print(sum("Error writing persistent compilation cache" in str(w.message) for w in caught))
"""


@pytest.mark.parametrize("repair", [True, False], ids=["repaired", "as-jax-leaves-it"])
def test_a_cached_program_without_its_access_time_no_longer_stops_the_cache_growing(tmp_path, repair):
    import subprocess
    import sys

    from model_lib.precision import JAX_ATIME_SUFFIX, JAX_PROGRAM_SUFFIX
    from tests.conftest import REPO

    folder = tmp_path / "jax"
    folder.mkdir()
    (folder / f"jit_killed-0123{JAX_PROGRAM_SUFFIX}").write_bytes(b"a program whose run was killed")
    env = {**__import__("os").environ, "JAX_COMPILATION_CACHE_DIR": str(folder), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COMPILATION_CACHE_MAX_SIZE", None)
    command = [sys.executable, "-c", ORPHANED_CACHE, "repair" if repair else "as-is"]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    failed_writes = int(done.stdout.strip().splitlines()[-1])
    written = [p for p in folder.glob(f"*{JAX_PROGRAM_SUFFIX}") if not p.name.startswith("jit_killed")]
    if repair:
        assert failed_writes == 0 and written  # the new program is kept
        assert (folder / f"jit_killed-0123{JAX_ATIME_SUFFIX}").exists()
    else:  # JAX 0.10.2 alone (jax-ml/jax#39880): when a JAX upgrade fails this, the repair can go
        assert failed_writes > 0 and not written
