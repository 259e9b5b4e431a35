"""service/memory.py on the real allocator, in a process of its own (the settings are
process-wide): frame-sized blocks come from the heap, and what a finished movie freed
goes back to the OS even when a live block sits above it."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

PROBE = textwrap.dedent("""
    import json, numpy as np
    from service import memory

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    if memory._glibc() is None:
        print(json.dumps(None)); raise SystemExit
    memory.tune_malloc()
    base = rss_mib()
    frames = [np.ones(24 << 20, np.uint8) for _ in range(8)]   # K3-sized, under 32 MiB
    pinned = np.ones(1 << 20, np.uint8)                         # allocated above them
    held = rss_mib()
    del frames
    after_free = rss_mib()
    memory.give_back_free_memory()
    print(json.dumps({"base": base, "held": held, "after_free": after_free,
                      "after_trim": rss_mib(), "pinned": int(pinned[0])}))
""")


def test_a_finished_movies_buffers_go_back_to_the_os():
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True).stdout
    figures = json.loads(out)
    if figures is None:
        pytest.skip("not glibc")
    assert figures["held"] - figures["base"] > 180  # 8 x 24 MiB touched
    # under the mmap threshold they came from the heap: freed, they stay below the
    # block allocated after them ...
    assert figures["after_free"] - figures["base"] > 150
    # ... until the pass's end hands them back
    assert figures["after_trim"] - figures["base"] < 20
