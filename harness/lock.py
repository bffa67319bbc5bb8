"""An exclusive lock on a run dir for the whole run, so two runs never write rows into one dir.

``fcntl.flock`` on the run directory itself, taken without waiting: a second run on the dir is refused at once,
naming the holder's pid (read from ``/proc/locks`` on Linux). Locking the directory rather than a lock file in
it writes nothing: a refused run leaves every file of the dir byte-identical, and there is no pid file to go
stale. The kernel drops the lock when its holder exits, however it exits (SIGKILL included). The ``filelock``
package is not used because it locks a file it creates (and truncates) in the directory, which is exactly the
write a refused run must not make.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from harness.errors import KvbenchError
from harness.io import os_error

log = logging.getLogger("kvbench")


def holder_pid(fd: int) -> int | None:
    """The pid holding a flock on the file behind ``fd``, from /proc/locks (Linux); None where unknown."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as fh:
            for line in fh:
                fields = line.split()
                if "FLOCK" in fields and ident in fields and fields[fields.index(ident) - 1].isdigit():
                    return int(fields[fields.index(ident) - 1])
    except OSError:
        pass
    return None


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as err:
            raise os_error(err, self.run_dir) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = holder_pid(fd)
            os.close(fd)
            holder = f"pid {pid}" if pid else "another process"
            raise KvbenchError(f"{self.run_dir} is in use by another kvbench run ({holder}); wait for it to finish "
                               "or pass another hydra.run.dir") from None
        except OSError as err:  # a file system without flock (some network mounts): run, but say so
            if err.errno not in (errno.ENOLCK, errno.EINVAL, errno.ENOTSUP, errno.EBADF):
                os.close(fd)
                raise os_error(err, self.run_dir) from None
            log.warning("cannot lock %s (%s): make sure no other run writes into it", self.run_dir, err.strerror)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
