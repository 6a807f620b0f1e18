"""The one thread that owns the engine: queued generation jobs, run one at a time in arrival order.

No request ever sees another one's KV cache. Between tokens the worker checks whether the client
is still there: a cancelled job frees the engine after at most one more token step, and a queued
job whose client left is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from qwen_ondevice.core.errors import UserError
from qwen_ondevice.runtime.generate import GenerationChunk, stream_generate
from qwen_ondevice.runtime.open_model import Runtime
from qwen_ondevice.runtime.sampling import SamplingParams

logger = logging.getLogger(__name__)

#: The marker a job's chunk queue ends with.
END = object()


class QueueFull(Exception):
    """The worker's queue holds its maximum of waiting jobs."""


class ClientGone(Exception):
    """The client disconnected before its reply was complete."""


@dataclass
class Job:
    """One queued generation and the asyncio queue its chunks arrive on.

    The worker puts :class:`GenerationChunk` records, then an exception (if generation failed),
    then an end marker. :meth:`cancel` asks the worker to stop after the current token step.
    """

    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    speculative: bool = False  # decode with the worker's drafter
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0  # tokens the worker produced for this job
    reused: int = 0  # prompt tokens whose KV was kept from the previous request
    checked: float = 0.0  # time.monotonic() of the last check that the client is connected

    done: bool = False  # the worker has finished with this job (a later cancel() is a no-op)

    def cancel(self) -> None:
        """Ask the worker to stop this job after the current token step (or to skip it)."""
        if not self.done:
            self.cancelled.set()

    def _deliver(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()

    async def next(self) -> GenerationChunk | None:
        """The next chunk, ``None`` at the end; re-raises the worker's exception."""
        item = await self.chunks.get()
        if item is END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item


class GenerationWorker:
    """The thread that owns ``runtime.engine`` and runs queued jobs in arrival order.

    Attributes (read by ``/health`` and the tests): ``busy`` (a job is running), ``completed``
    and ``cancelled`` (job counts), ``last_job`` (the most recent job it finished or abandoned).
    """

    def __init__(self, runtime: Runtime, max_queued: int | None = None, new_drafter=None, draft_tokens: int = 4):
        self.runtime = runtime
        self.new_drafter = new_drafter  # () -> a drafter for one job (runtime.speculative), or None
        self.draft_tokens = draft_tokens
        self.max_queued = max_queued
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.busy = False
        self.completed = 0
        self.cancelled = 0
        self.last_job: Job | None = None
        self.mean_job_seconds: float | None = None  # moving average over the finished jobs

    @property
    def queued(self) -> int:
        """Jobs waiting for the engine (not counting the running one)."""
        return self._jobs.qsize()

    def start(self) -> None:
        """Start the thread (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="qwen-ondevice-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel queued and running jobs, end the thread and wait for it (seconds)."""
        pending = []
        while True:
            try:
                pending.append(self._jobs.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if job is not None:
                job.cancel()
                job._deliver(END)
        if self.last_job is not None:
            self.last_job.cancel()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: the mean job time so far (at least 1)."""
        return max(1, math.ceil(self.mean_job_seconds or 1.0))

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, max_tokens: int, stop: list[str],
               speculative: bool = False) -> Job:
        """Queue a generation; must be called from the event loop that will read the job.

        Raises:
            QueueFull: ``max_queued`` jobs are already waiting.
        """
        if self.max_queued is not None and self.queued >= self.max_queued:
            raise QueueFull(self.queued)
        self.start()
        job = Job(list(prompt_ids), sampling, max_tokens, stop, asyncio.get_running_loop(), speculative=speculative)
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        rt = self.runtime
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.cancelled += 1
                job.done = True
                job._deliver(END)
                continue
            self.busy = True
            self.last_job = job
            started = time.monotonic()
            drafter = self.new_drafter(job.sampling) if job.speculative and self.new_drafter else None
            gen = stream_generate(rt.engine, rt.tokenizer, job.prompt_ids, job.sampling, job.max_tokens, job.stop,
                                  drafter, self.draft_tokens)
            try:
                for chunk in gen:
                    job.reused = rt.engine.reused
                    if chunk.token is not None:
                        job.generated += 1
                    job._deliver(chunk)
                    if job.cancelled.is_set():
                        break
                gen.close()
            except Exception as e:  # report to the request; the engine's state stays consistent
                if not isinstance(e, UserError):
                    logger.exception("generation failed")
                rt.engine.reset()
                job._deliver(e)
            finally:
                job.done = True
                if job.cancelled.is_set():
                    self.cancelled += 1
                else:
                    self.completed += 1
                    took = time.monotonic() - started
                    self.mean_job_seconds = took if self.mean_job_seconds is None else 0.8 * self.mean_job_seconds + 0.2 * took
                self.busy = False
                job._deliver(END)
