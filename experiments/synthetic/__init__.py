"""Synthetic long-range tasks: recall (MQAR, selective copying, induction heads) and state
tracking (parity, addition mod m, S_5), with independent label checkers and state-size accounting.

`docs/synthetic.md` describes the tasks, their knobs and what each is expected to separate.
"""
from experiments.synthetic.data import TASKS, SyntheticDataset, Task, build_loaders, length_sweep, sample
from experiments.synthetic.recall import InductionConfig, MQARConfig, SelectiveCopyConfig
from experiments.synthetic.state_size import state_bytes, state_entries
from experiments.synthetic.state_tracking import ModAddConfig, ParityConfig, S5Config

__all__ = ["TASKS", "Task", "SyntheticDataset", "build_loaders", "length_sweep", "sample", "MQARConfig",
           "SelectiveCopyConfig", "InductionConfig", "ParityConfig", "ModAddConfig", "S5Config",
           "state_bytes", "state_entries"]
