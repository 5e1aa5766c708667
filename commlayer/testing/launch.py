"""The one multi-process launcher: N local ranks as real processes, bounded in time, never left behind.

Two front ends share one supervision loop and one way to stop processes
(:mod:`commlayer.testing.supervise`):

* :class:`Ranks` / :func:`run_world`: ``fn(rank, world, *args)`` in N processes of a
  multiprocessing context (spawn by default; :func:`preloaded_context` is a forkserver that has
  imported torch once, so a rank costs a fork instead of a 5-10 s torch import, for callers that
  build no gloo DDP: torch 2.13 can deadlock there when a forked rank frees a gloo group while the
  group's thread still drops a captured Python object). Used by the tests,
  benchmarks, examples and ``commlayer probe``. Results travel back through a multiprocessing
  queue (a harness channel, never commlayer's wire).
* :func:`run_ranks`: N command lines (``python script.py`` behind an optional ``ip netns exec``
  prefix), each in its own session, output delivered line by line. Used by ``commlayer launch``
  and the demo/bench runner.

Every rank gets torchrun's variables (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK,
LOCAL_WORLD_SIZE) unless the caller's per-rank environment overrides them.
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence

from commlayer.testing.ports import free_port
from commlayer.testing.supervise import signal_quietly, sleep_tick, stop_sessions, supervise

logger = logging.getLogger(__name__)

_CTX: Any = None


def preloaded_context() -> Any:
    """A forkserver that has imported torch (its children fork, they do not import it).

    Not the default: in ranks that free a gloo ProcessGroup (e.g. DDP over gloo as a reference) while
    gloo's run loop still releases a future callback's captured thread-local Python state, torch 2.13
    deadlocks (the destructor joins the thread holding the GIL; the thread waits for the GIL). Seen
    2 in 5 runs of the DDP hook tests and once in the client suite with forked ranks, never with spawn.
    """
    global _CTX
    if _CTX is None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the server before torch loads
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo"])  # DDP() imports _dynamo: 3.5 s
    return _CTX


def torchrun_env(world: int, master_port: int | None = None, master_addr: str = "127.0.0.1") -> dict[str, str]:
    """The variables torchrun sets for every rank of a single-node job (RANK is set per rank)."""
    return {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port or free_port()), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}


def stack_file(pid: int) -> Path:
    """Where a rank writes every thread's stack on SIGUSR1 (see :meth:`Ranks.stacks`)."""
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"commlayer-ranks-{pid}.stacks"


def _child(fn: Callable[..., Any], rank: int, world: int, env: dict[str, str], parent_env: dict[str, str],
           args: Sequence[Any], q: Any, pass_events: bool, quiet: bool) -> None:
    os.environ.clear()  # the parent's environment at start(), as spawn inherits it (forkserver: the server's)
    os.environ.update({**parent_env, **env, "RANK": env.get("RANK", str(rank)), "LOCAL_RANK": env.get("LOCAL_RANK", str(rank))})
    stacks = open(stack_file(os.getpid()), "w")  # noqa: SIM115 - open for the process's life (hang reports)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    if quiet:
        logging.getLogger("commlayer").setLevel(logging.CRITICAL)  # rejections and peer deaths are expected
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renames of the *_tensor collectives
    try:
        q.put((rank, "result", fn(rank, world, q, *args) if pass_events else fn(rank, world, *args)))
    except BaseException as exc:  # report everything, including SystemExit
        q.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:  # a forkserver child leaves by os._exit: run the atexit handlers (groups' shutdown) as spawn's exit does
        atexit._run_exitfuncs()


class Ranks:
    """``world`` processes running ``fn(rank, world, [events,] *args)``, kept by the parent.

    The parent may kill, freeze or attack them while they run and check that none is left behind.
    With ``pass_events`` the function gets the queue as third argument and may post
    ``(rank, kind, value)`` events; its return value arrives as a ``"result"`` event, an exception
    as an ``"error"`` event with the traceback.

    Args:
        fn: a module-level function (spawn and forkserver re-import it by name).
        world: number of processes.
        *args: further picklable arguments.
        env: environment for every rank, on top of :func:`torchrun_env`.
        envs: per-rank environment on top of that (e.g. an emulated world's ``env(r)``).
        context: multiprocessing start method or context (default spawn; see :func:`preloaded_context`).
        pass_events: pass the event queue to ``fn``.
        quiet: silence commlayer's log and torch's FutureWarnings in the ranks.
    """

    def __init__(self, fn: Callable[..., Any], world: int, *args: Any, env: Mapping[str, str] | None = None,
                 envs: Sequence[Mapping[str, str]] | None = None, context: Any = None, pass_events: bool = True,
                 quiet: bool = False) -> None:
        if envs is not None and len(envs) != world:
            raise ValueError(f"envs: expected one environment per rank ({world}), got {len(envs)}")
        ctx: Any = mp.get_context(context or "spawn") if context is None or isinstance(context, str) else context
        self.world = world
        self.q = ctx.Queue()
        self.env = {**torchrun_env(world), **(env or {})}
        self._parent_env: dict[str, str] = {}  # filled by start()
        self.procs = [ctx.Process(target=_child, daemon=True, args=(
            fn, r, world, {**self.env, **(envs[r] if envs else {})}, self._parent_env, args, self.q, pass_events, quiet))
            for r in range(world)]
        self.events: list[tuple[int, str, Any]] = []

    def start(self) -> Ranks:
        # Spawned children import torch before _child runs, so thread settings must be in the
        # environment they inherit (torchrun likewise sets OMP_NUM_THREADS=1 for its workers).
        saved = dict(os.environ)
        os.environ.update(self.env)
        self._parent_env.update(os.environ)
        try:
            for p in self.procs:
                p.start()
        finally:
            for k in self.env:
                if k in saved:
                    os.environ[k] = saved[k]
                else:
                    os.environ.pop(k, None)
        return self

    def __enter__(self) -> Ranks:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_event(self, timeout: float) -> tuple[int, str, Any] | None:
        """The next event any rank posted, or None after ``timeout`` s."""
        try:
            ev = self.q.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        self.events.append(ev)
        return ev

    def wait_for(self, kind: str, ranks: Sequence[int], timeout: float) -> dict[int, tuple[str, Any]]:
        """One ``kind`` event (or a result/error) from each of ``ranks``, as far as they come within ``timeout``.

        Returns early when every rank still missing has exited (after one last look at the queue).
        """
        got: dict[int, tuple[str, Any]] = {}

        def take(ev: tuple[int, str, Any]) -> None:
            r, k, v = ev
            if r in ranks and k in (kind, "result", "error") and r not in got:
                got[r] = (k, v)

        for ev in self.events:
            take(ev)

        def tick(wait_s: float) -> bool:
            ev = self.next_event(wait_s)
            if ev is None and all(self.procs[r].exitcode is not None for r in ranks if r not in got):
                ev = self.next_event(0.5)  # a last message may still be in flight
                if ev is None:
                    return False
            if ev is not None:
                take(ev)
            return True

        supervise(timeout, lambda: len(got) == len(ranks), tick, poll_s=0.5)
        return got

    def stacks(self, rank: int) -> str:
        """Every thread's stack of a live rank (for a hang report); '' if it is gone."""
        p = self.procs[rank]
        if not p.is_alive() or p.pid is None:
            return ""
        try:
            os.kill(p.pid, signal.SIGUSR1)
            time.sleep(1.0)
            return stack_file(p.pid).read_text()
        except OSError:
            return ""

    def close(self, grace: float = 10.0) -> list[int]:
        """Waits up to ``grace`` s for every process to exit, then kills the rest. Returns the killed ranks."""
        deadline = time.monotonic() + grace
        for p in self.procs:
            if p.pid is not None:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        leftovers = [r for r, p in enumerate(self.procs) if p.is_alive()]
        for r in leftovers:
            pid = self.procs[r].pid
            if pid is not None:
                signal_quietly(pid, signal.SIGCONT, group=False)  # a frozen rank must be able to die
            self.procs[r].kill()
            self.procs[r].join(timeout=5)
        self.q.close()
        self.q.join_thread()
        for p in self.procs:
            if p.pid:
                stack_file(p.pid).unlink(missing_ok=True)
        return leftovers


def run_world(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
              env: Mapping[str, str] | None = None, envs: Sequence[Mapping[str, str]] | None = None,
              allow_failures: bool = False) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` processes (:class:`Ranks`); returns the per-rank results.

    Args:
        fn: module-level function.
        world_size: number of processes.
        *args: extra picklable arguments.
        timeout: seconds for the whole run; on expiry every child is killed and TimeoutError raised.
        env: extra environment variables for every child; ``envs``: per child.
        allow_failures: return failures as strings prefixed "ERROR: " instead of raising.

    Raises:
        AssertionError: some rank failed (every failing rank's traceback in the message).
        TimeoutError: the run did not finish within ``timeout``.
    """
    w = Ranks(fn, world_size, *args, env=env, envs=envs, pass_events=False).start()
    try:
        got = w.wait_for("result", list(range(world_size)), timeout)
        results = {r: v for r, (k, v) in got.items() if k == "result"}
        errors = {r: v for r, (k, v) in got.items() if k == "error"}
        for r, p in enumerate(w.procs):
            if r not in got and p.exitcode is not None:
                errors[r] = f"process exited with code {p.exitcode} without reporting"
        if len(results) + len(errors) < world_size:
            raise TimeoutError(f"run_world({getattr(fn, '__name__', fn)}, {world_size}) timed out after {timeout}s; "
                               f"finished ranks: {sorted(results)}, failed: {sorted(errors)}")
    finally:
        w.close(grace=10.0)
    if errors and not allow_failures:
        msg = "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
        raise AssertionError(f"{len(errors)} rank(s) failed:\n{msg}")
    return [results[r] if r in results else f"ERROR: {errors[r]}" for r in range(world_size)]


@dataclass(frozen=True)
class RanksOutcome:
    """How a :func:`run_ranks` run ended.

    Attributes:
        codes: per-rank exit codes; None for a rank still running when the others were stopped.
        timed_out: the run hit ``timeout_s``.
        first_failure: (rank, exit code) of the first rank seen exiting non-zero, if any.
    """

    codes: list[int | None]
    timed_out: bool
    first_failure: tuple[int, int] | None


def run_ranks(commands: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], on_line: Callable[[int, str], None],
              *, timeout_s: float | None = None, grace_s: float = 5.0) -> RanksOutcome:
    """Runs one command per rank, each in its own session; every output line goes to ``on_line(rank, line)``.

    ``on_line`` calls are serialized. After the first rank exits non-zero the others get ``grace_s``
    to finish; then (or at ``timeout_s``, or on KeyboardInterrupt) every rank still running gets
    SIGTERM and, 5 s later, SIGKILL, by its process group id.

    Args:
        commands: argv per rank.
        envs: the complete environment per rank.
        on_line: receives each line without its newline.
        timeout_s: bound on the whole run (None: none).
        grace_s: how long the others may still finish after a failure.
    """
    lock = threading.Lock()
    procs: list[subprocess.Popen[str]] = []
    readers: list[threading.Thread] = []

    def forward(rank: int, stream: IO[str]) -> None:
        for line in stream:
            with lock:
                on_line(rank, line.rstrip("\n"))
        stream.close()

    first: dict[str, Any] = {}  # the first failure: rank, code, when

    def done() -> bool:
        codes = [p.poll() for p in procs]
        if not first:
            failed = [(r, c) for r, c in enumerate(codes) if c]
            if failed:
                first.update(rank=failed[0][0], code=failed[0][1], at=time.monotonic())
                logger.error("rank %d exited with %d; stopping the others in %.1f s", first["rank"], first["code"], grace_s)
        return all(c is not None for c in codes) or bool(first and time.monotonic() - first["at"] > grace_s)

    try:
        for r, cmd in enumerate(commands):
            p = subprocess.Popen(list(cmd), env=dict(envs[r]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
            procs.append(p)
            assert p.stdout is not None
            t = threading.Thread(target=forward, args=(r, p.stdout), daemon=True, name=f"rank-{r}-output")
            t.start()
            readers.append(t)
        finished = supervise(timeout_s, done, sleep_tick)
        if not finished:
            logger.error("ranks timed out after %.1f s; terminating all", timeout_s or 0.0)
        codes = [p.poll() for p in procs]
    finally:
        stop_sessions(procs)
        for t in readers:
            t.join(timeout=5.0)
    return RanksOutcome(codes, not finished, (first["rank"], first["code"]) if first else None)
