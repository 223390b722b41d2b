"""Group level: a census of a finished participant-level output folder.

It lists every participant in ``output_dir`` with the derivatives found for it and whether its
last run succeeded, and writes ``group_summary.tsv`` there. (Group reports of map statistics are
planned on top of this table.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from qmri_bids.bids.derivatives import atomic_write_text
from qmri_bids.errors import MissingInputError, NothingSelectedError

LOGGER = logging.getLogger("qmri_bids.group")


def run_group(config) -> int:
    out = Path(config.output_dir)
    if not (out / "dataset_description.json").is_file():
        raise MissingInputError(f"{out} holds no qmri-bids derivatives: run the participant "
                                "level first")
    subjects = sorted(p.name for p in out.glob("sub-*") if p.is_dir())
    if config.participant_labels:
        subjects = [s for s in subjects if s[4:] in config.participant_labels]
    if not subjects:
        raise NothingSelectedError(f"no participant outputs found in {out}")
    rows = ["participant_id\tn_images\tn_maps\tlast_run\tlast_exit_code"]
    runs = {}
    for run_file in sorted((out / "logs").glob("run_*.json")):
        info = json.loads(run_file.read_text())
        for sub in info.get("participants", []):
            runs[f"sub-{sub}"] = info
    for sub in subjects:
        files = [p for p in (out / sub).rglob("*.nii.gz") if "/log/" not in p.as_posix()]
        n_maps = sum(1 for p in files if p.name.endswith(("map.nii.gz", "MTsat.nii.gz",
                                                           "UNIT1.nii.gz")))
        info = runs.get(sub, {})
        rows.append(f"{sub}\t{len(files) - n_maps}\t{n_maps}\t{info.get('run_id', 'n/a')}\t"
                    f"{info.get('exit_code', 'n/a')}")
    atomic_write_text(out / "group_summary.tsv", "\n".join(rows) + "\n")
    print("\n".join(rows))
    LOGGER.info("group level: wrote %s", out / "group_summary.tsv")
    return 0
