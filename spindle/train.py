"""``python -m spindle.train``: the torchrun entry of the runtime (see :mod:`spindle.tools.train`).

    torchrun --nproc-per-node N -m spindle.train WORKLOAD --plan plan.json [options]

It runs :mod:`spindle.tools.train` as the main module, so that module installs its SIGTERM
handler before the heavy imports, exactly as when it is run directly.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("spindle.tools.train", run_name="__main__", alter_sys=True)
