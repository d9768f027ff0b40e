"""Part (d): throughput: DP vs non-DP local training samples/s for the same model,
generation images/s, DICOM files written/s.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import throughput


def part_d(cfg: dict) -> dict:
    from fedtwin.dicom import write_dicom

    out = throughput(cfg, steps=20 if cfg.get("quick") else 100, n_generate=2000)
    fake, gen_labels = out.pop("_images")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        for i in range(500):
            write_dicom(
                Path(tmp) / f"{i:05d}.dcm", fake[i], label=int(gen_labels[i]), synthetic=True
            )
        out["dicom_files_per_s"] = 500 / (time.time() - start)
    return out
