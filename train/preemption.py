"""Preemption: Slurm sends SIGTERM (or SIGUSR1 with `#SBATCH --signal=USR1@<seconds>`) before
killing a job, possibly reaching some ranks before others. The handler only sets a local flag; once
per step the trainer calls `should_stop()`, which takes the MAX of the flag over all ranks, so every
rank sees the same answer at the same step, finishes it, saves, and exits with PREEMPTED_EXIT_CODE.

Slurm script contract: exit status PREEMPTED_EXIT_CODE means "stopped cleanly for preemption, a
checkpoint was written, requeue me". The batch script `gridtrain submit` renders
(slurm/gridtrain.sbatch.template) hands srun's status to `gridtrain slurm-job end`
(gridtrain.slurm.job), which runs `scontrol requeue` for it, up to a cap.

Lazy import: the agreement needs torch.distributed (about 1.5 s to import), which the launcher
and the Slurm steps that read PREEMPTED_EXIT_CODE from here never need."""
import signal

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". Distinct from 0
# (finished), 1 (crash), 2 (user error) and 128+N (killed by signal N).
PREEMPTED_EXIT_CODE = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# A stop signal that reached this process while it was still starting (see catch_early).
_early_signal: int | None = None


def catch_early(signals=STOP_SIGNALS) -> None:
    """Record stop signals from now on instead of dying of them. A rank started by srun spends
    ~10 s importing and joining its group before the trainer's StopRequest exists; Slurm's
    preemption signal may come then, and by default SIGTERM/SIGUSR1 kill the process (exit
    128+N: no checkpoint, no requeue). The StopRequest installed later takes the signal over, so
    the rank trains one step, saves and exits PREEMPTED_EXIT_CODE like any stopped rank."""
    def record(signum, frame) -> None:
        global _early_signal
        if _early_signal is None:
            _early_signal = signum

    for signum in signals:
        signal.signal(signum, record)


class StopRequest:
    """Collects stop signals on this rank; `should_stop()` agrees across ranks. Collective: when a
    process group is initialised, every rank must call `should_stop()` at the same step."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None  # first signal number seen on this rank
        self._previous = {}

    def install(self) -> "StopRequest":
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        if self.received is None and _early_signal in self.signals:
            self.received = _early_signal  # arrived while the rank was starting (catch_early)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        # Only set a flag: a handler runs between bytecodes, possibly inside a collective, so it
        # must not communicate or raise.
        if self.received is None:
            self.received = signum

    @property
    def local(self) -> bool:
        return self.received is not None

    def cause(self) -> str:
        """What asked this rank to stop, for the log: the signal it received, or another rank's."""
        return signal.Signals(self.received).name if self.local else "another rank's signal"

    def should_stop(self) -> bool:
        """True on every rank iff any rank has received a stop signal. One tiny all-reduce."""
        from gridtrain.parallel.collectives import any_rank  # torch: see the module docstring

        return any_rank(self.local)

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
