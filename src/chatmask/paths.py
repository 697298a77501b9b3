"""Where chatmask keeps things, and the one way it writes a folder or a small file: beside, then swapped in.

`atomic_dir(final, write)` runs `write(tmp)` on a new folder beside `final` and swaps it in when
complete: a kill leaves the previous complete `final` or the new one, never a half-written one (a hidden
`.NAME.tmp-*` / `.NAME.old-*` folder at most, which readers ignore; the swap is one exchange on Linux).
A full disk while writing is one `DiskFull` line. `atomic_write_text(path, text)` (and `atomic_write_bytes`)
does the same for one file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ChatmaskError


def cache_dir() -> Path:
    """Where converted checkpoints and prepared datasets live ($CHATMASK_CACHE, else ~/.cache/chatmask)."""
    return Path(os.environ.get("CHATMASK_CACHE") or Path.home() / ".cache" / "chatmask")


def umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new temporary folder in `parent`, to be renamed into place when complete. It gets the permissions
    the user's umask gives any new folder (mkdtemp alone makes it 0700: no other user or job could read it)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system or filesystem
    cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_in(tmp: Path, final: Path) -> None:
    """Put the complete folder `tmp` at `final`. An existing `final` is exchanged with `tmp` in one step where
    the system can (Linux), so `final` is always the old folder or the new one, then the old one is deleted;
    elsewhere it is first renamed aside (missing only between two renames, the old one beside it then)."""
    if not final.exists():
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now at tmp's name
        return
    old = temp_dir(final.parent, f".{final.name}.old-")
    os.replace(final, old / "x")
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(old / "x", final)  # the new one could not go in: the old one goes back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def put_once(tmp: Path, final: Path) -> bool:
    """For content-addressed folders (same name, same content): `tmp` becomes `final` unless another process
    put its twin there first, which is kept (False; `tmp` is left for the caller to remove)."""
    if final.exists():
        return False
    try:
        os.replace(tmp, final)
    except OSError:
        if final.exists():  # the twin went in between: as good
            return False
        raise
    return True


class DiskFull(ChatmaskError):
    """The disk filled while chatmask wrote a folder; what was there before is kept."""


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).exists() else 0


@contextlib.contextmanager
def room_for(final: Path, tmp: Path, like: Path | None = None):
    """Around writing `tmp` (to become `final`): a full disk becomes one DiskFull line naming `final`, what was
    written, the space free and, where `like` (a previous version) exists, about what it needs. Some writers
    (torch.save) say a full disk only as a failed write: any error with the disk then full counts as one."""
    try:
        yield
    except ChatmaskError:
        raise
    except Exception as e:
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        free = shutil.disk_usage(Path(final).parent).free
        if not (full or free < 1 << 16):
            raise
        need = _size(like) if like is not None else 0
        raise DiskFull(f"no space left on the device for {final}: {_mb(_size(tmp))} written before the disk filled, "
                       f"{_mb(free)} free" + (f"; it needs about {_mb(need)} (the last one's size)" if need else "")
                       + "; nothing there before was changed. Free some space, or write elsewhere (another --out "
                       "or $CHATMASK_CACHE)") from None


def _as_umask_allows(folder: Path) -> None:
    """Files the user's umask lets others read, as any file they write: safetensors writes its files 0600, so a
    model folder served by another user (a service account) could not be read."""
    mask = umask()
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, (p.stat().st_mode & 0o111 | 0o666) & ~mask)


def atomic_dir(final: Path, write, *, replace: bool = True, like: Path | None = None) -> Path:
    """Run `write(tmp)` on a new folder beside `final`, then swap it in (see `swap_in`); a full disk is one
    DiskFull line (`room_for`; `like`: a previous version, for the space it needs).

    `replace=False` is for content-addressed folders (`put_once`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)  # what a writer killed mid-save left beside it
    tmp = temp_dir(final.parent, f".{final.name}.tmp-{os.getpid()}-")  # the pid tells a live writer's from a dead one's
    try:
        with room_for(final, tmp, like if like is not None else (final if final.exists() else None)):
            write(tmp)
        _as_umask_allows(tmp)
        if replace:
            swap_in(tmp, final)
        else:
            put_once(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file (a result, a config) beside and rename it in: readers see the old file or
    the new one, never a cut one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_write_text` for bytes (a plot)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_stale(out: Path) -> None:
    """Temporary folders or files beside `out` named `.NAME.tmp-PID[-*]` whose process is gone (killed runs) are
    deleted; a live run's are kept."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name[len(out.name) + 6:].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True
