"""When a failed run is started again from its newest checkpoint: the one policy behind `gridtrain
train --max-restarts N` (ranks restarted in place) and `gridtrain submit --max-restarts N` (the job
requeued), so both count and refuse alike. No torch.

A failure is restarted when the cap allows it and the failed attempt made progress: it published a
checkpoint newer than the one it started from. An attempt that dies before its first new checkpoint
would be restarted from the same step and most likely die the same way (a bad node, a bad sample, a
bug), so it ends the run with one line instead of a restart loop. Bad input (exit 2) is never
restarted: it fails again the same way."""
from dataclasses import dataclass
from pathlib import Path

from gridtrain.train.checkpoint.store import list_checkpoints

USER_ERROR_EXIT_CODE = 2


def newest_step(ckpt_dir: Path) -> int:
    """The step of the newest published checkpoint in `ckpt_dir`, 0 when there is none."""
    published = list_checkpoints(ckpt_dir)
    return published[-1][0] if published else 0


@dataclass(frozen=True)
class Attempt:
    """One try of the run: the restarts used before it and the newest checkpoint when it began."""
    restarts: int
    started_at: int


def refusal(attempt: Attempt, exit_code: int, reached: int, max_restarts: int, flag: str,
            again: str = "run the same command") -> str | None:
    """Why the failed `attempt` (exit status `exit_code`, newest checkpoint now at step `reached`) is
    not restarted, or None to restart it from step `reached`. `flag` names the cap in the message,
    `again` what the user does to go on."""
    if exit_code == USER_ERROR_EXIT_CODE:
        return f"not restarted: a rank reported bad input (exit 2), which fails again the same way; fix it and {again}"
    if max_restarts == 0:
        return f"not restarted ({flag} 0); {again} to resume from step {reached}"
    if attempt.restarts >= max_restarts:
        return (f"not restarted: {attempt.restarts} restart(s) used, the cap ({flag} {max_restarts}); "
                f"{again} to resume from step {reached}")
    if attempt.restarts > 0 and reached <= attempt.started_at:
        return (f"not restarted: the failure came again before any new checkpoint (still step {reached}, as when "
                f"restart {attempt.restarts} began), so another restart would repeat it; fix the cause, then "
                f"{again} to resume")
    return None
