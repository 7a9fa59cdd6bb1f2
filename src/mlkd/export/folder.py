"""The folder an export writes into (:class:`ExportFolder`).

An export writes only into a folder that does not exist, is empty, or holds an export of the same format of the
same checkpoint (refreshed in place); anything else (another checkpoint's or format's export, files mlkd did not
write) is refused untouched unless ``overwrite``, which replaces the previous export's files and keeps the others.
Every export records what it is in ``export.json`` (format, checkpoint, files). Its files are written into a staging
folder inside it and moved in once all are written: a failed export leaves the folder as it was.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

from mlkd.errors import BadInput, CannotWrite
from mlkd.utils.checkpoint import CONFIG, WEIGHTS

RECORD, README = "export.json", "README.md"
# Every file name an export writes, in any format: what --overwrite replaces; files of other names are kept.
EXPORT_FILES = frozenset({RECORD, README, CONFIG, WEIGHTS, "student.prototxt", "student.caffemodel", "student.onnx",
                          "student_int8.onnx", "teacher.prototxt", "teacher.caffemodel"})
STAGING = ".mlkd-export-"  # + pid: where an export is written before it is moved into its folder
REPLACE_HINT = "pass --overwrite (overwrite=True) to replace it, or export into a new or empty folder"
BESIDE_HINT = ("pass --overwrite (overwrite=True) to write the export there anyway (files named as an export's are "
               "replaced, the others kept), or export into a new or empty folder")


@dataclasses.dataclass
class Holding:
    """What an export folder holds: the export it records (``fmt``, ``checkpoint`` as recorded, its ``files``; the
    record's file is ``source``), every other entry (``others``, folders ending in /) and an unreadable record."""

    fmt: str | None = None
    checkpoint: str | None = None
    files: set[str] = dataclasses.field(default_factory=set)
    source: str = ""
    others: list[str] = dataclasses.field(default_factory=list)
    problem: str = ""

    def refusal(self, fmt: str, checkpoint: str) -> tuple[str, str]:
        """Why ``fmt`` of ``checkpoint`` may not be written here without overwrite, and what to do; ``("", "")``
        when it may."""
        if self.problem:
            return f"holds {self.problem}", REPLACE_HINT
        if self.fmt is not None and self.checkpoint is None:
            return (f"already holds {_a(self.fmt)} export ({', '.join(sorted(self.files - {README}))}) whose "
                    f"{self.source} does not name its checkpoint"), REPLACE_HINT
        if self.fmt is not None:
            same_fmt, same_ckpt = self.fmt == fmt, same_checkpoint(self.checkpoint, checkpoint)
            if not (same_fmt and same_ckpt):
                wanted = (f"{_a(fmt)} export" if not same_fmt else "") + ("" if same_ckpt else f" of {checkpoint}")
                return (f"already holds {_a(self.fmt)} export of {self.checkpoint}, not {wanted.strip()}",
                        REPLACE_HINT)
        if self.others:
            more = f" ... ({len(self.others)} in all)" if len(self.others) > 5 else ""
            export = f"its {self.fmt} export" if self.fmt else "an mlkd export"
            return f"holds files that are not part of {export}: {', '.join(self.others[:5])}{more}", BESIDE_HINT
        return "", ""


def _a(fmt: str) -> str:
    return f"{'an' if fmt[:1] in 'aeiou' else 'a'} {fmt}"


def same_checkpoint(recorded: str | None, checkpoint: str) -> bool:
    """Whether the checkpoint an export records (as it was given) is ``checkpoint``: the same text, or the same
    file seen from the current folder."""
    return recorded is not None and (recorded == checkpoint or Path(recorded).resolve() == Path(checkpoint).resolve())


def read_holding(out: Path) -> Holding:
    """What ``out`` (an existing folder) holds: an export recorded by its ``export.json``, or a model folder without
    one (which cannot say whose it is), and the rest."""
    entries = {p.name: p.is_dir() for p in out.iterdir() if not p.name.startswith(STAGING)}
    h = Holding()
    if RECORD in entries:
        try:
            record = json.loads((out / RECORD).read_text())
            files = [f for f in record["files"].values() if isinstance(f, str) and Path(f).name == f]
            h.fmt, checkpoint = str(record["format"]), record.get("checkpoint")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            h.problem = f"an {RECORD} that is not an mlkd export record ({type(e).__name__}: {e})"
            return h
        h.checkpoint = checkpoint if isinstance(checkpoint, str) else None
        h.files, h.source = {RECORD, README, *files}, RECORD
    elif CONFIG in entries and WEIGHTS in entries:  # a model folder with no record: older mlkd, or by hand
        h.fmt, h.files, h.source = "safetensors", {CONFIG, WEIGHTS, README}, f"folder (no {RECORD})"
    h.others = sorted(name + "/" if is_dir else name for name, is_dir in entries.items()
                      if is_dir or name not in h.files)
    return h


class ExportFolder:
    """The folder an export writes (rules in the module docstring). Entering checks it and makes the staging folder
    ``stage``, before any other work; the export writes its files there and calls :meth:`commit`. An exception before
    the commit removes the staging folder, and the export folder if this export created it.

    ``checkpoint`` is the path as given: the export records it, and a refresh must name the same file."""

    def __init__(self, out: str | Path, fmt: str, checkpoint: str, overwrite: bool = False):
        self.out, self.fmt, self.checkpoint, self.overwrite = Path(out), fmt, checkpoint, overwrite
        self.stage: Path | None = None
        self._replaced: set[str] = set()  # the previous export's files: removed at the commit unless rewritten
        self._created: Path | None = None  # the outermost folder this export created

    def __enter__(self) -> "ExportFolder":
        self._replaced = self._check()
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._created = missing[-1] if missing else None
            stage = self.out / f"{STAGING}{os.getpid()}"
            shutil.rmtree(stage, ignore_errors=True)  # left by a killed process that had this pid
            stage.mkdir()
            self.stage = stage
        except OSError as e:
            self._remove_created()
            raise CannotWrite(f"cannot write the export into {self.out}: {e.strerror or e}; choose a folder you can "
                              "write to") from e
        return self

    def _check(self) -> set[str]:
        """Refuse what may not be written (a file, a read-only folder, the checkpoint's own folder, what it holds);
        the names the commit will replace."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise BadInput(f"the export folder {out} is a file; an export writes a folder of files: give the path of a "
                           "folder (new, empty, or holding this checkpoint's export)")
        if not out.exists():
            ancestor = next((a for a in out.parents if a.exists()), None)
            if ancestor is not None and not ancestor.is_dir():
                raise BadInput(f"cannot create the export folder {out}: {ancestor} is a file, not a folder")
            return set()
        if not os.access(out, os.W_OK | os.X_OK):  # root passes; then creating the staging folder is the test
            raise CannotWrite(f"cannot write the export into {out}: {os.strerror(errno.EACCES)}; choose a folder you "
                              "can write to")
        source = Path(self.checkpoint).resolve()
        if source == out.resolve() or out.resolve() in source.parents:
            raise BadInput(f"the export folder {out} holds the checkpoint being exported ({self.checkpoint}); export "
                           "into another folder")
        try:
            holding = read_holding(out)
        except OSError as e:
            raise CannotWrite(f"cannot read the export folder {out}: {e.strerror or e}") from e
        why, hint = holding.refusal(self.fmt, self.checkpoint)
        if why and not self.overwrite:
            raise BadInput(f"{out} {why}; {hint}")
        return holding.files | ({n for n in EXPORT_FILES if (out / n).is_file()} if self.overwrite else set())

    def commit(self) -> None:
        """Move the staged files into the folder, each replacing its namesake, then remove the previous export's
        files that this one did not rewrite: at every moment each name holds an old or a new file, never a part."""
        assert self.stage is not None, "commit() outside the with block"
        new = {p.name for p in self.stage.iterdir()}
        try:
            for name in sorted(new):
                os.replace(self.stage / name, self.out / name)
            for name in sorted(self._replaced - new):
                if (self.out / name).is_file():
                    (self.out / name).unlink()
            self.stage.rmdir()
        except OSError as e:
            raise CannotWrite(f"cannot write the export into {self.out}: {e.strerror or e}") from e
        self.stage = None
        self._remove_dead_stages()

    def __exit__(self, kind, error, traceback) -> None:
        if self.stage is None:
            return
        shutil.rmtree(self.stage, ignore_errors=True)  # not committed: leave no part of this export
        self._remove_created()
        stage, self.stage = str(self.stage), None
        if isinstance(error, CannotWrite) and stage in str(error):  # name the file where the user will look for it
            raise CannotWrite(str(error).replace(stage, str(self.out))) from error

    def _remove_created(self) -> None:
        if self._created is None:
            return
        for folder in (self.out, *self.out.parents):
            try:
                folder.rmdir()
            except OSError:
                return
            if folder == self._created:
                return

    def _remove_dead_stages(self) -> None:
        """Staging folders of exports that were killed (their process is gone)."""
        for stage in self.out.glob(STAGING + "*"):
            pid = stage.name[len(STAGING):]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stage, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
