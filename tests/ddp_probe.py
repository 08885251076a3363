"""train.py under torchrun, recording what each process did, for test_distributed.py.

Run by the test as: torchrun --nproc_per_node 2 tests/ddp_probe.py RECORD_DIR <train.py flags>
Each process writes RECORD_DIR/rank<N>.json: the task ids of the training examples its batches held (those of an
earlier, interrupted launch kept before them), and a checksum of every LoRA weight at the end of training. With
PROBE_STOP_AT=N the first process alone acts as if Ctrl-C were pressed after step N: every process must stop there.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import data, trainer  # noqa: E402

import train  # noqa: E402

record_dir, train_argv = Path(sys.argv[1]), sys.argv[2:]
seen: list[str] = []
pad_batch = data.pad_batch


def recording_pad_batch(features, *args, **kwargs):
    seen.extend(str(feature["task_id"]) for feature in features)
    return pad_batch(features, *args, **kwargs)


on_train_begin, on_train_end = trainer.GracefulStop.on_train_begin, trainer.GracefulStop.on_train_end


on_step_end = trainer.GracefulStop.on_step_end
record_file = record_dir / f"rank{os.environ['RANK']}.json"
stop_at = int(os.environ.get("PROBE_STOP_AT", 0))


def start(self, args, state, control, **kwargs):
    seen.clear()  # train.py measured the padding of an epoch before training: not training batches
    if record_file.is_file():  # a resumed launch: the batches of the launch it continues come first
        seen.extend(json.loads(record_file.read_text(encoding="utf-8"))["seen"])
    return on_train_begin(self, args, state, control, **kwargs)


def step_end(self, args, state, control, **kwargs):
    if state.global_step == stop_at and os.environ["RANK"] == "0":
        self.signal_name = "SIGINT"  # as the handler records a Ctrl-C
    return on_step_end(self, args, state, control, **kwargs)


def record(self, args, state, control, model=None, **kwargs):
    weights = {name: float(p.detach().double().sum()) for name, p in model.named_parameters() if p.requires_grad}
    record_file.write_text(json.dumps({"seen": seen[:], "weights": weights, "step": state.global_step}),
                           encoding="utf-8")
    return on_train_end(self, args, state, control, model=model, **kwargs)


data.pad_batch = recording_pad_batch
trainer.GracefulStop.on_train_begin, trainer.GracefulStop.on_train_end = start, record
trainer.GracefulStop.on_step_end = step_end
sys.exit(train.main(train_argv))
