"""Process control for `duodiff train`: stopping cleanly on SIGTERM / Ctrl-C, and the torchrun relaunch.

A training step is never cut in half: the signal handler only records the request, the loop
finishes its step, writes checkpoint.pt and raises TrainingStopped, whose exit code the CLI
returns. `duodiff train --nproc-per-node N` replaces itself with torchrun (relaunch_under_torchrun).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from duodiff.core.errors import DuodiffError


class TrainingStopped(DuodiffError):
    """SIGTERM / Ctrl-C: the state is checkpointed; rerunning the same command resumes.

    The CLI exits with `exit_code`, 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as
    shells and Slurm report a process stopped by that signal."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StopRequest:
    """SIGTERM (Slurm time limit, preemption) or Ctrl-C: finish the step, checkpoint, then stop.

    A second Ctrl-C stops at once (KeyboardInterrupt).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.requested, self.name, self.signum, self._previous = False, None, None, {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.name, self.signum = True, signal.Signals(signum).name, signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def ignore_stop_signals(worker_id):
    """DataLoader workers get Slurm's SIGTERM too; they must live until the step is finished."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def relaunch_under_torchrun(nproc_per_node: int, argv: list[str]) -> None:
    """Replace this process with `torchrun --standalone --nproc_per_node N python -m duodiff.cli ARGV`.

    Used by `duodiff train --nproc-per-node N`, so a pipeline rule (or a user) asks for N training
    processes with one flag. exec rather than a child process: Slurm's SIGTERM then reaches
    torchrun itself, which forwards it to every rank, and each rank checkpoints before exiting.
    --standalone runs its own rendezvous on a free port, so several such jobs can share a node.
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
        "-m", "duodiff.cli", *argv,
    ]  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
