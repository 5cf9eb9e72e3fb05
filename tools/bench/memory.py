"""Resident memory of this process, for the benchmarks' peak-memory columns."""


def status_mib(field):
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB (0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
