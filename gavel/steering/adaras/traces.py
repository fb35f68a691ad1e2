"""AdaRAS data on a model: sampled reasoning traces per problem, split by correctness, and the mean MLP neuron
activations over each trace's reply tokens, paired correct/incorrect within a problem."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gavel.errors import DataError
from gavel.io.conversations import Conversation, Problem
from gavel.models.chat import decode_text
from gavel.models.generation import generate_ids, prompt_batch
from gavel.models.handle import ModelHandle
from gavel.models.hooks import HookFn

Checker = Callable[[str, str], bool]
"""Whether a reply (text) answers a problem whose expected answer is the second argument."""


def mlp_sites(n_layers: int) -> list[str]:
    """Every block's MLP intermediate activations (the down projection's input): AdaRAS's neurons."""
    return [f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)]


@torch.no_grad()
def sample_traces(handle: ModelHandle, problem: Problem, samples: int, checker: Checker, *, temperature: float = 0.8,
                  max_new_tokens: int = 96, generator: torch.Generator | None = None
                  ) -> list[tuple[torch.Tensor, bool]]:
    """`samples` sampled replies to one problem: (reply token ids up to the end of sequence, correct)."""
    batch = prompt_batch(handle, [problem.conversation] * samples)
    if generator is not None:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    out = generate_ids(handle, batch, do_sample=True, temperature=temperature, top_k=0,
                       max_new_tokens=max_new_tokens)
    eos = set(handle.end_token_ids)
    traces = []
    for row in out[:, batch.input_ids.shape[1]:].cpu():
        ids = row.tolist()
        end = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        reply = row[:end]
        text = decode_text(handle.tokenizer, reply, skip_special_tokens=True).strip()
        traces.append((reply, checker(text, problem.expected)))
    return traces


def _capture(into: dict[str, torch.Tensor], site: str, start: int = 0) -> HookFn:
    """A hook keeping the first row's activation at `site` from token `start` on in `into` (the activation is left
    unchanged)."""
    def hook(act: torch.Tensor) -> None:
        into[site] = act[0, start:]
    return hook


@torch.no_grad()
def reply_means(handle: ModelHandle, conversation: Conversation, replies: Sequence[torch.Tensor],
                sites: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per site, [len(replies), m] means of the activations over each reply's own tokens (prompt + reply run as
    one sequence, the reply read causally as the model wrote it)."""
    prompt = prompt_batch(handle, [conversation]).input_ids[0].cpu()
    means: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    for j, reply in enumerate(replies):
        if len(reply) == 0:
            raise DataError(f"reply {j} is empty: no tokens to average")
        captured: dict[str, torch.Tensor] = {}
        ids = torch.cat([prompt, reply])[None].to(handle.device)
        with handle.hooks([(s, _capture(captured, s, len(prompt))) for s in sites]):
            handle.forward(ids, torch.ones_like(ids))
        for s in sites:
            means[s].append(captured[s].double().mean(0).cpu())
    return {s: torch.stack(v) for s, v in means.items()}


def contrastive_means(handle: ModelHandle, problems: Sequence[Problem], checker: Checker, sites: Sequence[str], *,
                      samples: int = 6, temperature: float = 0.8, max_new_tokens: int = 96, seed: int = 0,
                      progress: Callable[[int], None] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, int]]:
    """(correct, incorrect, counts): per site [P, m] mean activations of the paired traces (within each problem the
    i-th correct trace pairs with the i-th incorrect one), and how many problems, traces and pairs there were."""
    g = torch.Generator().manual_seed(seed)
    correct: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    incorrect: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    counts = {"problems": len(problems), "traces": 0, "correct": 0, "pairs": 0}
    for problem in problems:
        traces = sample_traces(handle, problem, samples, checker, temperature=temperature,
                               max_new_tokens=max_new_tokens, generator=g)
        good = [r for r, ok in traces if ok and len(r)]
        bad = [r for r, ok in traces if not ok and len(r)]
        counts["traces"] += len(traces)
        counts["correct"] += sum(ok for _, ok in traces)
        n = min(len(good), len(bad))
        if n:
            for side, replies in ((correct, good[:n]), (incorrect, bad[:n])):
                for s, m in reply_means(handle, problem.conversation, replies, sites).items():
                    side[s].append(m)
            counts["pairs"] += n
        if progress:
            progress(1)
    if not counts["pairs"]:
        raise DataError(f"no problem had both a correct and an incorrect trace ({counts['traces']} traces, "
                        f"{counts['correct']} correct)", hint="sample more traces per problem, or raise temperature")
    return ({s: torch.cat(v) for s, v in correct.items()}, {s: torch.cat(v) for s, v in incorrect.items()}, counts)


@torch.no_grad()
def prompt_features(handle: ModelHandle, conversations: Sequence[Conversation], sites: Sequence[str]
                    ) -> list[torch.Tensor]:
    """Per conversation, float32 [T, F]: the neurons of `sites` (concatenated) at every prompt token (generation
    prompt included), what AdaRAS's gate reads to predict a failure before generating."""
    out = []
    for conversation in conversations:
        batch = prompt_batch(handle, [conversation])
        captured: dict[str, torch.Tensor] = {}
        with handle.hooks([(s, _capture(captured, s)) for s in sites]):
            handle.forward(batch.input_ids, batch.attention_mask)
        out.append(torch.cat([captured[s].float().cpu() for s in sites], dim=-1))
    return out
