"""Files that are either the old version or the new one, never half written: LoRAs and training checkpoints.

A write goes to a temporary name next to the target, is flushed to disk, gets the user's usual permissions and is
renamed over the target in one step. Temporary files a killed process left behind are removed on the next write
of the same name.
"""

import logging
import os
import re
import socket
from pathlib import Path

log = logging.getLogger("unipic2")


class WriteError(ValueError):
    """A file could not be written; the message names it and the fix, and any previous file is unchanged."""


class NameTaken(WriteError):
    """atomic_write(replace=False) found the name taken (also by a file created while it was writing)."""


def atomic_write(path: Path, write, what: str, *, replace: bool = True) -> None:
    """write(tmp) next to `path`, then publish it as `path` in one atomic step (parent folders created).

    The data is fsynced before the rename and the folder after it, so a crash or power cut leaves the old file
    or the new one, never a torn one. The file gets the user's usual permissions (0o666 & ~umask; safetensors
    writes 0600). Temp files that killed writers left for `path` are removed first. Any failure raises a
    WriteError naming `what`, `path` and the fix, and leaves a previous file unchanged. replace=False never
    replaces a file, not even one another writer created meanwhile: it raises NameTaken instead.
    """
    path = Path(path)
    tmp = path.with_name(f"{_temp_prefix(path)}{os.getpid()}")
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temp_files(path)
            write(tmp)
            os.chmod(tmp, _new_file_mode())
            _fsync(tmp, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes only writable handles
            _publish(tmp, path, what, replace)
        except NameTaken:
            raise
        except Exception as e:  # not only OSError: a full disk in torch.save is a RuntimeError
            raise WriteError(f"could not write {what} to {path} ({type(e).__name__}: {e}); free disk space or "
                            "choose a writable folder -- any previous file there is unchanged") from e
        _fsync_folder(path.parent)
    finally:  # also on KeyboardInterrupt
        _remove_quietly(tmp)


def _temp_prefix(path: Path) -> str:
    """'.<name>.tmp-<host>-': a pid means something only on its own machine, so two machines (or containers)
    sharing a models folder never take each other's live temp files for stale ones."""
    return f".{path.name}.tmp-{socket.gethostname()}-"


def _remove_stale_temp_files(path: Path) -> None:
    """Remove this machine's temp files of `path` whose writer process is gone (killed mid-write). Best effort: a
    folder that cannot be listed does not stop the write."""
    prefix = _temp_prefix(path)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        pid = entry.name[len(prefix):]
        if entry.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove_quietly(entry)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would end the process there; psutil (a ComfyUI requirement) only asks
        try:
            import psutil
        except ImportError:
            return True  # cannot tell: keep the file
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _new_file_mode() -> int:
    """0o666 & ~umask, the mode open() gives a new file. Linux shows the umask in /proc/self/status, race-free;
    elsewhere it is set and restored at once (other threads creating a file in between would get 0o022)."""
    try:
        umask = int(re.search(r"^Umask:\s*([0-7]+)$", Path("/proc/self/status").read_text(), re.M)[1], 8)
    except (OSError, TypeError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable; skipped where folders cannot be opened or synced (Windows, some file systems)."""
    try:
        _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        log.debug("UniPic2: folder %s not fsynced (%s)", folder, e)


def _publish(tmp: Path, path: Path, what: str, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)
        return
    try:
        _link_without_replacing(tmp, path)
    except FileExistsError as e:
        raise NameTaken(f"{what} was not written: {path} already exists; choose another name -- the "
                             "existing file is unchanged") from e


def _link_without_replacing(tmp: Path, path: Path) -> None:
    """Give tmp the name `path` unless that exists (FileExistsError): a hard link does it atomically. File systems
    without hard links (FAT, some network shares) claim the name with O_EXCL and rename over the claim."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise
    except OSError:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(path)  # our empty claim
        raise


def _remove_quietly(path: Path) -> None:
    """Cleanup that never hides the error on its way to the user (or fails a finished write) behind its own."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        log.warning("UniPic2: could not remove %s (%s); delete it by hand", path, e)
