"""Resuming a run: the newest readable checkpoint, and what changed in the config; or, with
nothing to resume, a warm start (:func:`resume_or_warm_start`, which ``fit()`` calls).

Resume restores the newest checkpoint; if its files are unreadable (truncated, missing a
shard, corrupt), it says so, naming the file, and falls back to the next older one; the
unreadable ones then move to ``checkpoints/unreadable/`` (see ``Checkpointer.set_aside``).
Before restoring, the config the run was started with (``ckptkit_run.yaml``) is compared
with the new one; the differences are logged, and if the checkpoint no longer fits the
model (a shape changed), the error names the config keys that changed.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any

from ckptkit import moving_in, storage
from ckptkit.checkpointer import Checkpointer
from ckptkit.config import to_dict
from ckptkit.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointUnreadableError,
    DataPipelineError,
)
from ckptkit.local_tier import warn_if_left_behind
from ckptkit.ownership import claim_checkpoint_dir
from ckptkit.policies import CheckpointInfo
from ckptkit.runinfo import RUN_FILE, read_run_record, trainer_location
from ckptkit.transfer import RestoreReport, restore_optimizer, restore_partial

log = logging.getLogger("ckptkit")

Change = tuple[str, Any, Any]
_START_OVER = (
    "To start over in this run directory, set checkpoint.resume=never (the old checkpoints are moved aside, "
    "never deleted)."
)
_ELSEWHERE = (
    "Give this launch its own run_dir, or set checkpoint.resume=never to start over here (the old "
    "checkpoints are moved aside, never deleted)."
)
_MISSING = "<absent>"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(old: Mapping, new: Mapping) -> list[Change]:
    """(dotted key, old value, new value) for every leaf that differs, sorted by key."""
    a, b = _flatten(old), _flatten(new)
    return [
        (k, a.get(k, _MISSING), b.get(k, _MISSING))
        for k in sorted(set(a) | set(b))
        if a.get(k, _MISSING) != b.get(k, _MISSING)
    ]


def format_changes(changes: list[Change], most: int | None = None) -> str:
    shown = changes if most is None else changes[:most]
    more = f"; and {len(changes) - len(shown)} more (logged above)" if len(shown) < len(changes) else ""
    return "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in shown) + more


def other_trainer(tr: Any) -> str | None:
    """Says so when the run directory was made by another trainer class or script than this
    launch's (its record names them): the cause to name first in any refusal to resume."""
    try:
        made_by = read_run_record(tr.run_dir).get("trainer") or {}
    except Exception:  # noqa: BLE001 - no record: nothing to compare
        return None
    mine = trainer_location(type(tr))

    def where(w: Mapping) -> str:
        return f"{w.get('qualname')} from {w.get('file') or w.get('module')}"

    same_file = not (made_by.get("file") and mine.get("file")) or os.path.realpath(made_by["file"]) == os.path.realpath(
        mine["file"]
    )
    if made_by.get("qualname") == mine.get("qualname") and same_file:
        return None
    return f"this run directory was made by {where(made_by)}; this launch runs {where(mine)}"


def _refusal(cause: str | None, exc: Exception, changes: list[Change] | None, fix: str) -> str:
    """A refusal to resume: the cause in the first line (the other trainer, else what does not
    fit), the detail on the lines after it, the config's changes last (the first few)."""
    lines = [f"{cause}. {fix}", str(exc)] if cause else [f"{exc}" + (f" {fix}" if fix else "")]
    if changes:
        lines.append(f"  the config changed since this run's checkpoints were written: {format_changes(changes, 6)}")
    return "\n".join(lines)


def restore_newest_readable(
    checkpointer: Checkpointer, changes: list[Change] | None = None, cause: str | None = None
) -> CheckpointInfo | None:
    """Restore the newest checkpoint that can be read; None if there is no checkpoint.

    Raises CheckpointUnreadableError when checkpoints exist but none can be read, and
    CheckpointMismatchError (naming ``changes``) when one is readable but does not fit.
    """
    candidates = checkpointer.resume_candidates()
    failures: list[str] = []
    unreadable: list[CheckpointInfo] = []
    for info in candidates:
        try:
            checkpointer.restore(info.path, assert_consumed=True)
        except CheckpointUnreadableError as exc:
            failures.append(str(exc))
            log.warning("%s; falling back to an older checkpoint", exc)
            unreadable.append(info)
            continue
        except DataPipelineError as exc:
            if changes or cause:
                raise DataPipelineError(_refusal(cause, exc, changes, _ELSEWHERE if cause else "")) from exc
            raise
        except CheckpointMismatchError as exc:
            raise CheckpointMismatchError(_refusal(cause, exc, changes, _ELSEWHERE if cause else _START_OVER)) from exc
        if failures:
            log.warning(
                "resumed from %s, the newest readable checkpoint (%d newer one(s) unreadable)", info.path, len(failures)
            )
        # The newer, unreadable ones must not count as newest, hold retention slots or stop
        # their steps from being saved again: they move aside (only now that the run goes
        # on from a readable one; with none readable, everything stays where it is).
        for bad in unreadable:
            checkpointer.set_aside(bad, "unreadable")
        return info
    if failures:
        raise CheckpointUnreadableError(
            f"none of the {len(failures)} checkpoint(s) in {checkpointer.directory} can be read: "
            + " | ".join(failures)
            + ". Set checkpoint.resume=never to start over (they are "
            "moved aside, not deleted)."
        )
    return None


def require_checkpoint(directory: str) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(f"checkpoint.resume=must but {directory} holds no checkpoint to resume from")


def run_config_changes(tr: Any):
    """Differences between the config this run was started with and the current one."""
    try:
        old = read_run_record(tr.run_dir).get("config")
    except Exception as exc:  # noqa: BLE001 - a missing or bad record only loses the diff
        log.warning("cannot compare with the run's previous config (%s)", exc)
        return []
    changes = config_changes(old or {}, to_dict(tr.cfg, resolve=True))
    if changes:
        log.warning(
            "config changed since the run's last launch (%s): %s",
            os.path.join(tr.run_dir, RUN_FILE),
            format_changes(changes),
        )
    return changes


def _start_over(tr: Any) -> None:
    """``checkpoint.resume=never`` with checkpoints there: move them aside (nothing deleted),
    build afresh and claim the fresh directory. Every worker takes this path when the chief
    does (building again creates the variables with collectives, in step on all workers)."""
    c = tr.settings.checkpoint
    if tr.is_chief:
        moved = f"{c.dir.rstrip('/')}-moved-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        tr._claims.let_go_of(c.dir)  # its lock records move with it; the fresh one gets a new lock
        storage.rename(c.dir, moved)
        log.warning(
            "checkpoint.resume=never: moved the existing checkpoints aside to %s (nothing deleted); starting fresh",
            moved,
        )
    tr.checkpointer.close()
    tr._built = False
    tr.build()
    if tr.is_chief:  # the lock and owner record moved with them
        tr._claims.take_checkpoint_dir(tr.run_dir, c.dir)
        claim_checkpoint_dir(c.dir, tr.run_dir)
    else:
        tr.checkpointer._forget_existing()  # what it listed before the chief's move


def resume_or_warm_start(tr: Any) -> tuple[int | None, RestoreReport | None]:
    """Restore the run's newest readable checkpoint (``checkpoint.resume``), else warm-start
    from ``checkpoint.init_from``; returns (the step resumed from, the warm-start report)."""
    c = tr.settings.checkpoint
    plain = getattr(tr, "_plain_manager", None)
    if plain and c.resume != "never":
        return None, moving_in.adopt(tr, plain)
    if c.resume == "never" and tr.distribution.agree(bool(tr.checkpointer.checkpoints)):
        _start_over(tr)
    ckpt = tr.checkpointer
    if tr.is_chief and ckpt.local is None and c.resume != "never":
        warn_if_left_behind(c.dir, tr.run_dir, ckpt.latest.step if ckpt.latest else None)
    if tr.is_chief and ckpt.open_local_tier(discard=c.resume == "never") == "mine" and ckpt.local is not None:
        log.info(
            "local tier %s: %d checkpoint(s) of this run and host", ckpt.local.directory, len(ckpt.local.book.all())
        )
    if ckpt.checkpoints and c.resume != "never":
        changes = run_config_changes(tr)
        info = restore_newest_readable(ckpt, changes, other_trainer(tr))
        assert info is not None  # None only when there is no checkpoint at all
        log.info("resumed from %s at step %d", info.path, int(tr.global_step.numpy()))
        if c.init_from.path:
            log.info("checkpoint.init_from.path ignored: the run resumes from its own checkpoint")
        return info.step, None
    if c.resume == "must":
        raise require_checkpoint(c.dir)
    if c.init_from.path:
        f = c.init_from
        report = restore_partial(
            tr.model,
            c.init_from.path,
            include=f.include,
            exclude=f.exclude,
            rename=f.rename,
            strict=f.strict,
            which=f.which,
        )
        if f.optimizer:
            restore_optimizer(tr.optimizer, report.source)
        return None, report
    return None, None
