"""The model side of `gavel serve`: one conversation at a time, guarded (a `Guard`) or not, whole or streamed.

Every call runs on the `ModelWorker`'s single thread, so one generation holds the model at a time and each
gets its own monitor session (rule state never mixes between requests); the tokenizer is used there too.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from gavel.errors import GavelError
from gavel.serve.schema import FinishReason


class RequestError(GavelError):
    """A request the server refuses (HTTP 400): too long a prompt, too many tokens asked for."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Job:
    """One chat completion to run: a validated conversation and how to decode it."""

    conversation: list[dict[str, str]]
    max_tokens: int | None          # None: as many as the cap and the context allow
    temperature: float              # 0: greedy
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Started:
    """A stream has its prompt encoded and checked; deltas follow."""

    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Delta:
    """New reply text (possibly empty) once the rules have seen its token, and the rules that first held there."""

    text: str
    token_index: int
    fired: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished reply: what the user gets (`text`: the rule's reply when blocked), how it ended, token counts,
    and (guarded) the verdict and events as JSON-ready dicts."""

    text: str
    generated: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    verdict: str | None = None      # None when unguarded
    blocked: bool = False
    failed: bool = False
    events: tuple[dict, ...] = ()


class Engine:
    """A loaded model and, when guarded, its `Guard`. `max_tokens` caps a reply; `max_prompt_tokens` a prompt
    (default: the model's context length)."""

    def __init__(self, handle, guard=None, *, name: str | None = None, max_tokens: int = 256,
                 max_prompt_tokens: int | None = None) -> None:
        self.handle, self.guard = handle, guard
        self.name = name or handle.name
        self.max_tokens = max_tokens
        self.context = getattr(handle.hf_model.config, "max_position_embeddings", None)
        self.max_prompt_tokens = max_prompt_tokens if max_prompt_tokens is not None else self.context
        self.eos_ids = set(handle.end_token_ids)

    @property
    def guarded(self) -> bool:
        return self.guard is not None

    # ---- limits
    def check_max_tokens(self, requested: int | None) -> None:
        """Refuse a reply longer than the cap, before the request waits for the model."""
        if requested is not None and requested > self.max_tokens:
            raise RequestError(f"max_tokens is {requested}, but this server generates at most {self.max_tokens} "
                               "tokens per reply (gavel serve --max-tokens)", param="max_tokens")

    def _prepare(self, job: Job):
        """Encode the prompt and settle the reply's length; RequestError past a limit."""
        from gavel.models.generation import prompt_batch

        self.check_max_tokens(job.max_tokens)
        batch = prompt_batch(self.handle, [job.conversation])
        n = batch.input_ids.shape[1]
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            raise RequestError(f"the prompt has {n} tokens, but this server reads at most {self.max_prompt_tokens}",
                               param="messages")
        room = None if self.context is None else self.context - n
        wanted = self.max_tokens if job.max_tokens is None else job.max_tokens
        if room is not None and wanted > room:
            if job.max_tokens is not None or room < 1:
                raise RequestError(f"this model's context is {self.context} tokens: the prompt has {n} and "
                                   f"{wanted} more were asked for", param="max_tokens")
            wanted = room
        return batch, n, wanted

    def _sampling(self, job: Job) -> dict:
        if job.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": job.temperature, "top_k": 0, "top_p": 1.0}

    # ---- whole replies
    def batch_key(self, job: Job) -> tuple:
        """Jobs with equal keys decode alike (token budget and sampling) and may share one generate(); a seeded
        job is alone, so its sample repeats. RequestError past a limit."""
        _, _, max_new = self._prepare(job)
        return (max_new, job.temperature) if job.seed is None else ("seeded", id(job))

    def complete(self, job: Job) -> Completion:
        return self.complete_batch([job])[0]

    def complete_batch(self, jobs: Sequence[Job]) -> list[Completion]:
        """Whole replies to jobs of one `batch_key`, from one batched generate() (left-padded; guarded, each row
        keeps its own rule state)."""
        import torch

        from gavel.models.generation import prompt_batch, until_end

        _, _, max_new = self._prepare(jobs[0])
        handle, job = self.handle, jobs[0]
        batch = prompt_batch(handle, [j.conversation for j in jobs])
        kwargs = {"max_new_tokens": max_new, "pad_token_id": handle.tokenizer.pad_token_id, **self._sampling(job)}
        if handle.backend == "lens":   # the bridge loses the KV cache (see Monitor.generate)
            kwargs["use_cache"] = False
        devices = [handle.device] if handle.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=job.seed is not None):
            if job.seed is not None:
                torch.manual_seed(job.seed)
            if self.guard is None:
                out = handle.hf_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                               **kwargs)
                results = [None] * len(jobs)
            else:
                with self.guard.watch([j.conversation for j in jobs]) as watch:
                    out = handle.hf_model.generate(**watch.inputs, stopping_criteria=watch.stopping_criteria,
                                                   **kwargs)
                results = watch.results(out)
        width = batch.input_ids.shape[1]
        done = []
        for row, (encoded, result) in enumerate(zip(batch.encoded, results)):
            n = len(encoded.input_ids)
            if result is not None and result.blocked:   # the tokens the rules read, up to the blocking one
                ids = result.record.token_ids[result.record.prompt_length:].tolist()   # (generate() samples one
            else:                                                                       # more it never shows)
                ids = until_end(out[row, width:], handle).tolist()   # a row that ended early is padded after it
            ended = bool(ids) and ids[-1] in self.eos_ids
            count = len(ids) - ended
            if result is None:
                text = handle.tokenizer.decode(ids, skip_special_tokens=True).strip()
                done.append(Completion(text, text, "stop" if ended or count < max_new else "length", n, count))
            else:
                finish: FinishReason = ("content_filter" if result.blocked
                                        else "stop" if ended or count < max_new else "length")
                done.append(self._guarded(result, finish, n, count))
        return done

    # ---- streamed replies
    def stream(self, job: Job, emit: Callable[[object], None], cancelled: threading.Event) -> None:
        """Generate, handing `emit` a `Started`, then `Delta`s (guarded: each once the rules have seen its token),
        then the `Completion`. Stops early, emitting nothing more, once `cancelled` is set."""
        batch, n, max_new = self._prepare(job)
        emit(Started(n))
        text = _TextDiff(self.handle.tokenizer)
        if self.guard is None:
            self._stream_raw(job, batch, max_new, text, emit, cancelled)
            return
        import torch

        generator = None
        if job.seed is not None and job.temperature > 0:
            generator = torch.Generator(device=self.handle.device).manual_seed(job.seed)
        steps = self.guard.stream(job.conversation, max_new_tokens=max_new, temperature=job.temperature,
                                  generator=generator)
        count = 0
        try:
            for step in steps:
                if cancelled.is_set():
                    return
                if step.result is not None:
                    result = step.result
                    finish: FinishReason = ("content_filter" if result.blocked
                                            else "length" if count >= max_new else "stop")
                    emit(self._guarded(result, finish, n, count))
                    return
                count += 1
                if not step.blocked:   # the blocking token is withheld
                    emit(Delta(text.add(step.token_id), step.index, step.fired))
        finally:
            steps.close()   # leaves the monitor's hooks detached even when cancelled mid-way

    def _stream_raw(self, job: Job, batch, max_new: int, text: _TextDiff, emit, cancelled) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        eos, n = self.eos_ids, batch.input_ids.shape[1]
        count = [0, False]   # tokens, ended on an end-of-turn token

        class Emitter(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:   # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                token = int(value.reshape(-1)[0])
                if token in eos:
                    count[1] = True
                    return
                emit(Delta(text.add(token), n + count[0]))
                count[0] += 1

            def end(self):
                pass

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        kwargs = {"max_new_tokens": max_new, "pad_token_id": self.handle.tokenizer.pad_token_id,
                  **self._sampling(job)}
        devices = [self.handle.device] if self.handle.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=job.seed is not None):
            if job.seed is not None:
                torch.manual_seed(job.seed)
            self.handle.hf_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                          streamer=Emitter(), stopping_criteria=StoppingCriteriaList([Cancelled()]),
                                          **kwargs)
        if cancelled.is_set():
            return
        finish: FinishReason = "stop" if count[1] or count[0] < max_new else "length"
        emit(Completion(text.text, text.text, finish, n, count[0]))

    # ---- internals
    def _guarded(self, result, finish: FinishReason, prompt_tokens: int, completion_tokens: int) -> Completion:
        # an event's `sequence` is its row in the server's own batch, nothing the client sent: left out
        events = tuple({k: v for k, v in e.to_dict().items() if k != "sequence"} for e in result.events)
        return Completion(result.text, result.generated, finish, prompt_tokens, completion_tokens,
                          verdict=result.verdict, blocked=result.blocked, failed=result.failed, events=events)


class _TextDiff:
    """Incremental decoding: the reply decoded so far (special tokens dropped, stripped as whole replies are),
    handing out only what is new; text that decodes to an incomplete character waits for the next token."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.text = tokenizer, ""
        self.ids: list[int] = []

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        now = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        if now.endswith("\ufffd") or not now.startswith(self.text):
            return ""
        new, self.text = now[len(self.text):], now
        return new


class ModelWorker:
    """The queue in front of the model: one thread runs every model call in arrival order; `queued` counts
    the calls waiting or running."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gavel-model")
        self._lock = threading.Lock()
        self.queued = 0

    async def run(self, fn: Callable, *args):
        """Run `fn(*args)` on the model thread once the calls before it are done; the event loop stays free."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def submit(self, fn: Callable, *args):
        with self._lock:
            self.queued += 1
        future = self._pool.submit(fn, *args)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future) -> None:
        with self._lock:
            self.queued -= 1

    def shutdown(self) -> None:
        """Finish the calls already queued, then stop the thread."""
        self._pool.shutdown(wait=True)


class WholeReplies:
    """Whole-reply requests waiting for the model, served in batches: each call on the model thread takes the oldest
    waiting request and every other one that decodes alike (`Engine.batch_key`), up to `max_batch`, and generates
    them together. A request whose client has left (its `cancelled` is set) is dropped with the result None."""

    def __init__(self, engine: Engine, worker: ModelWorker, max_batch: int = 8) -> None:
        self.engine, self.worker, self.max_batch = engine, worker, max_batch
        self._waiting: list[tuple[Job, threading.Event, Future]] = []
        self._keys: dict[int, tuple] = {}   # id(future) -> its job's batch key, worked out once
        self._lock = threading.Lock()

    def submit(self, job: Job, cancelled: threading.Event) -> Future:
        future: Future = Future()
        with self._lock:
            self._waiting.append((job, cancelled, future))
        self.worker.submit(self._serve)   # one call per request; a call that finds its request served returns
        return future

    def _take(self, item: tuple[Job, threading.Event, Future]) -> None:
        self._waiting.remove(item)
        self._keys.pop(id(item[2]), None)

    def _serve(self) -> None:
        chosen: list[tuple[Job, threading.Event, Future]] = []
        key: tuple | None = None
        with self._lock:
            for item in list(self._waiting):
                job, cancelled, future = item
                if cancelled.is_set():
                    self._take(item)
                    future.set_result(None)
                    continue
                try:
                    if id(future) not in self._keys:
                        self._keys[id(future)] = self.engine.batch_key(job)
                except GavelError as e:   # a limit, or a conversation the chat template cannot take
                    self._take(item)
                    future.set_exception(e)
                    continue
                if len(chosen) < self.max_batch and key in (None, self._keys[id(future)]):
                    key = self._keys[id(future)]
                    self._take(item)
                    chosen.append(item)
        if not chosen:
            return
        try:
            done = self.engine.complete_batch([job for job, _, _ in chosen])
        except BaseException as e:
            for _, _, future in chosen:
                future.set_exception(e)
            return
        for (_, _, future), completion in zip(chosen, done):
            future.set_result(completion)
