"""pipeline/trainer.py against the transformers it runs on: every method it overrides still exists in the Trainer
with the parameters the override takes, and the private ones are still called where training runs. An upgrade of
transformers that renames or stops calling one fails here, instead of silently losing atomic checkpoints or the
stop on a loss that is not a number."""

import inspect

from transformers import Trainer

from pipeline.trainer import PipelineTrainer

# Private hooks of the Trainer that PipelineTrainer overrides.
PRIVATE_HOOKS = ("_maybe_log_save_evaluate", "_save_checkpoint", "_get_train_sampler", "_run_epoch")


def named_parameters(function) -> list[str]:
    """The parameters a function names, in order, without self and without *args / **kwargs."""
    return [name for name, parameter in inspect.signature(function).parameters.items()
            if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)]


def test_every_override_matches_the_trainer_it_overrides():
    overrides = [name for name, member in vars(PipelineTrainer).items()
                 if callable(member) and not name.startswith("__") and hasattr(Trainer, name)]
    assert set(PRIVATE_HOOKS) <= set(overrides), overrides
    for name in overrides:
        ours, theirs = named_parameters(getattr(PipelineTrainer, name)), named_parameters(getattr(Trainer, name))
        assert theirs[:len(ours)] == ours, f"Trainer.{name}{inspect.signature(getattr(Trainer, name))} vs ours {ours}"


def test_the_private_hooks_are_still_called_by_the_trainer():
    source = inspect.getsource(Trainer)
    for hook in PRIVATE_HOOKS:
        assert f"self.{hook}" in source, f"the Trainer no longer calls {hook}: PipelineTrainer's override is dead"
