"""llama-server's command line from the plan's settings: the tensor split, and no device when no GPU is usable."""

from __future__ import annotations

from pathlib import Path

from airgap.serve.engine import EngineModel, engine_argv

BINARY = Path("/opt/airgap/current/engine/llama-server")
BASE = EngineModel(id="m", path="/m.gguf", n_ctx=8192, parallel=4, n_threads=7, n_threads_batch=7, n_gpu_layers=33)


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_settings_survive_the_trip_through_the_server_config() -> None:
    model = EngineModel(**{**BASE.to_dict(), "tensor_split": (0.333, 0.667), "cpu_only": False})
    assert EngineModel.from_dict(model.to_dict()) == model
    assert model.to_dict()["tensor_split"] == [0.333, 0.667]
    cpu = EngineModel(**{**BASE.to_dict(), "n_gpu_layers": 0, "tensor_split": (), "cpu_only": True})
    assert EngineModel.from_dict(cpu.to_dict()) == cpu
    # a configuration written before these fields existed still reads, as no split and the GPU allowed
    older = {k: v for k, v in BASE.to_dict().items() if k not in ("tensor_split", "cpu_only")}
    assert EngineModel.from_dict(older) == BASE


def test_offloaded_layers_over_several_gpus_get_llama_servers_layer_split() -> None:
    argv = engine_argv(BINARY, EngineModel(**{**BASE.to_dict(), "tensor_split": (0.333, 0.667)}), 4321)
    assert flag(argv, "--tensor-split") == "0.333,0.667"
    assert flag(argv, "--split-mode") == "layer"
    assert flag(argv, "--n-gpu-layers") == "33" and "--device" not in argv


def test_one_gpu_or_no_offloaded_layers_get_no_split() -> None:
    assert "--tensor-split" not in engine_argv(BINARY, BASE, 4321)
    assert "--split-mode" not in engine_argv(BINARY, BASE, 4321)
    none_offloaded = EngineModel(**{**BASE.to_dict(), "n_gpu_layers": 0, "tensor_split": (0.5, 0.5)})
    assert "--tensor-split" not in engine_argv(BINARY, none_offloaded, 4321)


def test_an_engine_kept_off_the_gpu_is_given_no_device() -> None:
    cpu = EngineModel(**{**BASE.to_dict(), "n_gpu_layers": 0, "cpu_only": True, "tensor_split": (0.5, 0.5)})
    argv = engine_argv(BINARY, cpu, 4321)
    assert flag(argv, "--device") == "none" and flag(argv, "--n-gpu-layers") == "0"
    assert "--tensor-split" not in argv
    assert "--device" not in engine_argv(BINARY, BASE, 4321)
