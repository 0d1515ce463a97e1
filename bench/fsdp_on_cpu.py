"""Run a training script under accelerate's FSDP2 on CPU processes (for tests and benches here).

    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        bench/fsdp_on_cpu.py train_ldm.py [key=value ...]

accelerate starts FSDP on accelerators only (on CPUs the same launch is plain data parallel, which
ldm refuses). This sets accelerate's state to FSDP right after ``Accelerator()`` is built, with the
plugin that the config file configures (accelerate launch's ``FSDP_*`` variables); from there on,
accelerate's own FSDP2 code runs (PyTorch's ``fully_shard`` on gloo, the state-dict gathers, the
distributed checkpoints), and so does ldm's. Not for training: a GPU launch needs none of this.
"""

import runpy
import sys

from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_build = Accelerator.__init__


def _fsdp_after_init(self, *args, **kwargs):
    _build(self, *args, **kwargs)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    self.state.distributed_type = DistributedType.FSDP
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables


if __name__ == "__main__":
    Accelerator.__init__ = _fsdp_after_init
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
