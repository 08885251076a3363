"""Live GPU view in the terminal: memory used/total with a bar, utilisation, temperature, power (via NVML).

Run:
    python tools/gpu_monitor.py            # refreshes every second; Ctrl-C to quit
    python tools/gpu_monitor.py --once     # one snapshot

Reads:  the NVIDIA driver through nvidia-ml-py (NVML); on a machine without an NVIDIA GPU, it says so and shows
        the CPU and RAM instead.
Writes: nothing.
Needs:  pipeline/ (in the folder above)
Run it in a second terminal while train.py runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import cli, monitoring  # noqa: E402


def gpu_lines() -> list[str] | None:
    """One line per NVIDIA GPU, or None when NVML finds none."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver or no GPU: all mean "no NVIDIA GPU here"
        return None
    try:
        lines = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            utilisation = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            temperature = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
            try:
                power = f"{pynvml.nvmlDeviceGetPowerUsage(handle) / 1000:.0f} W"
            except pynvml.NVMLError:
                power = "n/a"
            used, total = memory.used / 2**30, memory.total / 2**30
            lines.append(f"GPU {index} {name}: memory {monitoring.text_bar(used / total)} {used:.2f}/{total:.2f} "
                         f"GiB · utilisation {utilisation:3d}% · {temperature} °C · {power}")
        return lines or None
    finally:
        pynvml.nvmlShutdown()


def cpu_lines() -> list[str]:
    import psutil

    memory = psutil.virtual_memory()
    cpu = psutil.cpu_percent(interval=0.2)
    return [f"CPU: {monitoring.text_bar(cpu / 100)} {cpu:5.1f}% of {psutil.cpu_count()} cores",
            f"RAM: {monitoring.text_bar(memory.percent / 100)} {memory.used / 2**30:.2f}/"
            f"{memory.total / 2**30:.2f} GiB"]


def snapshot() -> str:
    lines = gpu_lines()
    if lines is None:
        return "no NVIDIA GPU found (NVML unavailable): showing CPU and RAM\n" + "\n".join(cpu_lines())
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser(__doc__)
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--interval", type=cli.positive(float), default=1.0,
                        help="seconds between refreshes (default: %(default)s)")
    return parser


@cli.report_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.once:
        print(snapshot())
        return 0
    try:
        while True:
            text = snapshot()
            print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + "(Ctrl-C to quit)\n" + text, flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
