"""The example accelerate configs under configs/accelerate/ load with accelerate's own reader."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "accelerate"


@pytest.mark.parametrize(
    ("name", "kind", "processes"),
    [
        ("multi-gpu", "MULTI_GPU", 8),
        ("multi-node", "MULTI_GPU", 16),
        ("fsdp", "FSDP", 8),
        ("deepspeed-zero2", "DEEPSPEED", 8),
    ],  # fmt: skip
)
def test_accelerate_configs_load(name, kind, processes):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_processes == processes
    assert config.mixed_precision == "bf16"
