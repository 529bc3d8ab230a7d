"""Which rank stopped responding. A rank that is alive but stuck (SIGSTOP, a hung kernel or file
system call, a deadlocked thread) keeps its connections open, so its peers see no error: their
next collective just waits until the process-group timeout (`parallel.timeout_minutes`) and then
fails on a rank that is not the culprit. Every rank therefore beats in the rendezvous store (the
TCPStore at MASTER_ADDR:MASTER_PORT that the process group was built from) on a thread, which
keeps beating while the rank waits in a healthy collective but stops with a stopped process.
After a collective timed out, `silent_ranks` watches the beats for a few intervals: the ranks
whose counter did not move are the ones that stopped responding."""
import os
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

PREFIX = "gridtrain/heartbeat/"
INTERVAL_S = 1.0
# A store read that takes longer than this means the store's host is not answering either.
STORE_TIMEOUT_S = 10.0


def _client():
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=STORE_TIMEOUT_S), wait_for_workers=False)


class Heartbeat:
    """This rank's beat: `<PREFIX>beat/<rank>` counts up every INTERVAL_S on a daemon thread;
    `<PREFIX>who/<rank>` says where the rank runs ("host pid")."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "Heartbeat":
        store = _client()
        store.set(f"{PREFIX}who/{self.rank}", f"{socket.gethostname()} {os.getpid()}")
        self._thread = threading.Thread(target=self._beat, args=(store,), name="gridtrain-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self, store) -> None:
        key = f"{PREFIX}beat/{self.rank}"
        while not self._stop.is_set():
            try:
                store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store is gone at shutdown; the beat just stops
                return
            self._stop.wait(INTERVAL_S)

    def stop(self) -> None:
        self._stop.set()

    def silent_ranks(self, intervals: int = 4) -> list[str]:
        """Descriptions ("rank 3 on host h (pid p)") of the ranks whose beat did not move within
        `intervals` beats; ["the rendezvous store at ADDR:PORT"] if the store does not answer."""
        where = f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        try:
            store = _client()
            before = self._beats(store)
            time.sleep(intervals * INTERVAL_S)
            after = self._beats(store)
            silent = [rank for rank in range(self.world) if after[rank] == before[rank] and rank != self.rank]
            return [f"rank {rank} on host {self._who(store, rank)}" for rank in silent]
        except Exception:  # noqa: BLE001 - torch raises DistStoreError / RuntimeError for a store timeout
            return [f"{where} (served by the launcher of node 0, or by rank 0 under srun/mpirun)"]

    def _beats(self, store) -> list[int]:
        return [store.add(f"{PREFIX}beat/{rank}", 0) for rank in range(self.world)]

    @staticmethod
    def _who(store, rank: int) -> str:
        host, pid = store.get(f"{PREFIX}who/{rank}").decode().split()
        return f"{host} (pid {pid})"


class CollectiveTimeout(RuntimeError):
    """A collective gave up waiting; the message names the ranks that stopped responding."""


def explain_timeout(heartbeat: Heartbeat, timeout_minutes: float) -> CollectiveTimeout:
    silent = heartbeat.silent_ranks()
    who = ", ".join(silent) + " stopped responding" if silent else "no rank is silent now (slow, not stopped)"
    return CollectiveTimeout(
        f"rank {heartbeat.rank} waited parallel.timeout_minutes={timeout_minutes:g} in a collective and gave up: "
        f"{who}; the last published checkpoint is intact: restart once the node is healthy (the run resumes "
        "from it), or raise parallel.timeout_minutes if the ranks are only slow")


def is_collective_timeout(exc: BaseException) -> bool:
    """Whether `exc` is a collective that gave up waiting (gloo: "Timed out waiting ...ms for recv
    operation"; torch: DistBackendError / "timeout"), not a peer that died (connection reset)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("timed out" in text or "timeout" in text)
