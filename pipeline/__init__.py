"""What the stages share. Each stage at the top level is a script a user runs; everything they have in common
lives here, one module per subject, so that a stage copied elsewhere needs only itself and this folder.

    cli.py          one-line errors and exit codes, flag types, Hub error messages
    folders.py      the default folders and the files in them, atomic writes, download bookkeeping
    prompts.py      the prompt templates (one Template record each), prompt tokenising, where an answer ends
    models.py       device and dtype, loading a model and its tokenizer, model-folder checks, LoRA targets
    data.py         the data shapes, prepared data, fingerprints, batching
    memory.py       the memory estimate, --auto-batch-size, the CPU allocator setting
    loss.py         the chunked loss that keeps the logits small (imports torch)
    trainer.py      the one Trainer subclass: atomic checkpoints, monitoring, graceful stop (imports torch)
    run_folder.py   what a run folder holds, its lock, which checkpoint can be resumed from
    monitoring.py   metrics history, loss warnings, curves (read by the dashboard too)
    inference.py    an adapter's settings, loading base + adapter, batched generation
    scoring.py      pass@k, summaries, every model against a reference, which solved which, tables and charts
    stats.py        is a difference real: paired bootstrap interval, exact McNemar, Clopper-Pearson (SciPy)
    protocols.py    EvalPlus's and lm-evaluation-harness's prompts and stops, for published figures
    benchmarks.py   HumanEval and MBPP's test split, offline
    sandbox.py      hardened execution of candidate programs (sandbox_runner.py: the part copied beside each)
    merging.py      the adapter merged into the weights it was trained against (export.py)
    gguf_export.py  llama.cpp's converter run on an export, the GGUF checked, the Ollama Modelfile
    platforms.py    what differs between Linux, macOS and Windows: processes, stop signals, console encodings,
                    what the sandbox can enforce

Nothing heavy (torch, transformers) is imported when a module is imported, except by loss.py and trainer.py,
which the stages import only once they train: `python stage.py --help` stays instant.
"""
