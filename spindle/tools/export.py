"""``spindle export``: one consolidated state dict from a checkpoint, by logical name.

    spindle export DIR --out model.safetensors [--component NAME]

``DIR`` is a checkpoint directory (its latest complete checkpoint is read) or one ``step-N``
folder.  The output holds every parameter of the checkpoint (set-aside ones too) under its
logical name (``<component>.pre|layers.<i>|post.<parameter>``, ``loss.<task>.<parameter>``; the
names ``--save`` writes), so it loads into the user's own modules with ``load_state_dict``;
``--component NAME`` keeps one component's and drops the ``NAME.`` prefix.  The format follows
the suffix: ``.safetensors``, else ``torch.save``.  Written atomically; no process group.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import torch

from spindle.io import write_atomic
from spindle.runtime.checkpoint_files import MANIFEST, MODEL, find_latest, read_tensors, verify

log = logging.getLogger(__name__)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="DIR",
                   help="a --checkpoint-dir (its latest complete checkpoint) or a step-N folder")
    p.add_argument("--out", "-o", required=True, metavar="FILE",
                   help="output file: .safetensors, or anything else for torch.save")
    p.add_argument("--component", default=None, metavar="NAME",
                   help="only this component's parameters, without the 'NAME.' prefix")


def consolidated(folder: Path, component: str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's parameters by logical name (one component's, prefix removed)."""
    params = read_tensors(folder, MODEL)
    if component is None:
        return params
    prefix = component + "."
    picked = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
    if not picked:
        groups = sorted({k.split(".")[0] for k in params})
        raise ValueError(f"--component {component}: not in {folder} (it has {', '.join(groups)})")
    return picked


def run_export_command(args: argparse.Namespace) -> int:
    root = Path(args.checkpoint)
    if (root / MANIFEST).is_file():
        folder = root
        verify(folder)
    else:
        folder, _, skipped = find_latest(root)
        for reason in skipped:
            log.warning("skipping %s", reason)
    params = consolidated(folder, args.component)
    out = Path(args.out)
    if out.suffix == ".safetensors":
        from safetensors.torch import save

        blob = save({k: v.contiguous() for k, v in params.items()})
    else:
        buf = io.BytesIO()
        torch.save(params, buf)
        blob = buf.getvalue()
    write_atomic(out, blob)
    print(f"{len(params)} parameters from {folder} written to {out}")
    return 0
