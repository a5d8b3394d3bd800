"""Files written atomically, owner-only unless meant for others: ledgers, caches, checkpoints, run folders.

A ledger or a frozen-layer cache (the encoder's states of patient notes) is patient data, and a
checkpoint is what a site's budget paid for; none of them is for other users of the machine. Every
write goes to a unique temporary file in the same folder, is fsynced, and is then renamed over the target, so a
reader (or a crash) never sees half a file, and two writers never share a temporary name. Elsewhere, a
rename only moves what was made whole beside it: a generated cohort folder, a site runner's bin/, a set of
credentials, the FAB `flwr build` wrote.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

FILE_MODE, DIR_MODE = 0o600, 0o700
# Files written for other users or services to read: a published report (small cells suppressed), nginx's config,
# a site's trust file (read by the SuperExec's user) and a release signature (sent to every site).
SHARED_FILE_MODE = 0o644


def private_dir(path: Path) -> Path:
    """Create `path` and its missing parents as owner-only folders. A folder that exists keeps its mode: it
    may be the site's own (say, the data folder a default ledger sits next to), not edfed's to change."""
    path = Path(path)
    for folder in [*reversed(path.parents), path]:
        if not folder.exists():
            folder.mkdir(mode=DIR_MODE, exist_ok=True)
            os.chmod(folder, DIR_MODE)  # mkdir's mode passes through the umask
    return path


def atomic_write(path: Path, write: Callable[[Path], None], mode: int = FILE_MODE) -> Path:
    """Call `write(tmp)` on a unique owner-only temporary file next to `path`, then rename it to `path`
    with `mode` (owner-only unless the file is meant to be shared: SHARED_FILE_MODE)."""
    path = Path(path)
    if not path.parent.exists():
        private_dir(path.parent)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)  # mkstemp creates it 0600
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with tmp.open("rb") as handle:  # on disk before it replaces the old file (a ledger's spend survives a crash)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # ... and so is the rename
        finally:
            os.close(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str, mode: int = FILE_MODE) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), mode)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """A run folder's newest global model, RUN_DIR/checkpoints/round-K.safetensors with the largest K."""
    found = [(int(p.stem.split("-")[1]), p) for p in (Path(run_dir) / "checkpoints").glob("round-*.safetensors")
             if p.stem.split("-")[1].isdigit()]
    return max(found)[1] if found else None
