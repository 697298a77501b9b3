"""Where chatmask keeps things, and the one way it writes a folder or a small file: beside, then swapped in.

`atomic_dir(final, write)` runs `write(tmp)` on a new folder beside `final` and swaps it in when
complete: a kill leaves the previous complete `final` or the new one, never a half-written one (a hidden
`.NAME.tmp-*` / `.NAME.old-*` folder at most, which readers ignore); only a kill in the instant between
swap_in's two renames leaves the previous one in `.NAME.old-*/x` instead (no reader looks there yet: #27).
`atomic_write_text(path, text)` (and `atomic_write_bytes`) does the same for one file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where converted checkpoints and prepared datasets live ($CHATMASK_CACHE, else ~/.cache/chatmask)."""
    return Path(os.environ.get("CHATMASK_CACHE") or Path.home() / ".cache" / "chatmask")


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new temporary folder in `parent`, to be renamed into place when complete. It gets the permissions
    the user's umask gives any new folder (mkdtemp alone makes it 0700: no other user or job could read it)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    umask = os.umask(0o22)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def swap_in(tmp: Path, final: Path) -> None:
    """Put the complete folder `tmp` at `final`. An existing `final` is first renamed aside (one rename,
    so `final` is missing only between two renames, and the old one still sits beside it then), then
    deleted once the new one is in place."""
    if not final.exists():
        os.replace(tmp, final)
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


def atomic_dir(final: Path, write, *, replace: bool = True) -> Path:
    """Run `write(tmp)` on a new folder beside `final`, then swap it in (see `swap_in`).

    `replace=False` is for content-addressed folders (same name, same content): when another process
    put `final` there first, its folder is kept and this one discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(final.parent, f".{final.name}.tmp-")
    try:
        write(tmp)
        if not replace and final.exists():
            return final
        try:
            swap_in(tmp, final)
        except OSError:
            if replace or not final.exists():  # not merely another process finishing first
                raise
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
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
