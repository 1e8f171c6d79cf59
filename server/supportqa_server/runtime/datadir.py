"""The data folder's lock: one server process per Milvus Lite folder."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from supportqa_server.errors import DataDirInUse


def lock_data_dir(data_dir: Path):
    """Takes the data folder's lock (an flock on data_dir/.lock, released when the process
    ends, however it ends); returns the open lock file.

    Raises:
        DataDirInUse: another process holds it; the message names its pid.
    """
    f = (data_dir / ".lock").open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise DataDirInUse(
            f"data folder {data_dir} is in use by another process (pid {holder}): stop it, "
            "or give this server its own SUPPORTQA_DATA_DIR (replicas share a Milvus server "
            "through SUPPORTQA_MILVUS_URI, not a folder)"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
