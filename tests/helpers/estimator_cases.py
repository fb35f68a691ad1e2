"""Conformance cases for every `gavel.base.Estimator` subclass: small, seeded synthetic inputs with planted signals.

Each `Case` says how to build the estimator (with non-default parameters), what to fit it on (`fit_inputs(seed)`:
seed 0 and seed 1 plant the signal in different places, so a refit must change what the estimator does), what to
call on it to use it, and its outputs on fixed inputs (what a save/load round trip must reproduce).
`discover()` imports every module under `gavel/` and lists the Estimator subclasses defined there.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import gavel
from gavel.base import Estimator
from gavel.decon.train import DeconIEP
from gavel.finetune.behaviour_neurons import BehaviourNeurons, SAEEvidence
from gavel.probes.calibration import PlattScaling
from gavel.probes.diffmeans import DiffMeansDirection
from gavel.probes.linear import LinearProbe
from gavel.probes.sae import SAELatentSelector
from gavel.probes.window import WindowedGRUClassifier
from gavel.steering.activations import norm_sites
from gavel.steering.adaras.gate import FailureGate
from gavel.steering.adaras.neurons import ReasoningNeurons
from gavel.steering.llmva.alignment import VectorAlignment
from gavel.steering.selective.plane import SteeringPlane
from helpers.models import tiny_model

FitInputs = tuple[tuple, dict]


@dataclass(frozen=True)
class Case:
    """How the conformance suite drives one estimator class."""

    cls: type[Estimator]
    params: dict[str, Any]                            # constructor arguments, all different from the defaults
    fit_inputs: Callable[[int], FitInputs]            # (args, kwargs) for fit; seeds 0 and 1 plant different signals
    use: Callable[[Any], Any]                         # the call that scores / transforms / applies it
    outputs: Callable[[Any], Any]                     # what it does on fixed inputs (tensors, or containers of them)
    set_param: tuple[str, Any]                        # a known parameter and a new value for set_params
    own_fingerprint: bool = False                     # fit records the model fingerprint itself (DeconIEP)
    notes: str = field(default="", compare=False)

    def make(self) -> Estimator:
        return self.cls(**self.params)

    def fit(self, est: Estimator, seed: int) -> Any:
        args, kwargs = self.fit_inputs(seed)
        return est.fit(*args, **kwargs)


# ---------------------------------------------------------------- discovery
def discover() -> tuple[list[type[Estimator]], list[str]]:
    """Every Estimator subclass defined in gavel (recursively, sorted by name) after importing every module under
    gavel/, and the modules that failed to import (with their errors)."""
    failed: list[str] = []
    for info in pkgutil.walk_packages(gavel.__path__, "gavel.", onerror=lambda name: failed.append(name)):
        try:
            importlib.import_module(info.name)
        except Exception as e:
            failed.append(f"{info.name}: {type(e).__name__}: {e}")
    found: set[type[Estimator]] = set()
    stack = [Estimator]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                stack.append(sub)
                if sub.__module__ == "gavel" or sub.__module__.startswith("gavel."):
                    found.add(sub)
    return sorted(found, key=lambda c: (c.__name__, c.__module__)), failed


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- labelled activations (probes)
D_PROBE, K_PROBE = 8, 2


def labelled(seed: int, n: int = 160) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative features [n, 8] and two CEs, each planted in its own column: columns 0, 1 for seed 0, 2, 3 for
    seed 1 (so a refit on the other seed scores other columns)."""
    g = _gen(100 + seed)
    X = torch.relu(torch.randn(n, D_PROBE, generator=g))
    cols = [2 * seed % D_PROBE, (2 * seed + 1) % D_PROBE]
    Y = (X[:, cols] + 0.3 * torch.randn(n, K_PROBE, generator=g)) > 0.6
    return X, Y


PROBE_X = torch.relu(torch.randn(24, D_PROBE, generator=_gen(7)))


def _probe_inputs(seed: int) -> FitInputs:
    X, Y = labelled(seed)
    return (X, Y), {}


def _platt_inputs(seed: int) -> FitInputs:
    X, Y = labelled(seed)                         # raw scores: the planted columns, one per CE
    cols = [2 * seed % D_PROBE, (2 * seed + 1) % D_PROBE]
    return (X[:, cols] * (1 + seed) - seed, Y), {}


PLATT_RAW = torch.linspace(-2, 3, 24)[:, None].repeat(1, K_PROBE)


# ---------------------------------------------------------------- windows of tokens (GRU)
D_WINDOW = 4


def windowed(seed: int, n_seq: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shuffled token rows of n_seq sequences (6-10 tokens, 4 features); CE j fires on a token whose planted feature
    exceeds 1 (features 0, 1 for seed 0; 2, 3 for seed 1)."""
    g = _gen(200 + seed)
    lengths = torch.randint(6, 11, (n_seq,), generator=g)
    sequence = torch.repeat_interleave(torch.arange(n_seq), lengths)
    position = torch.cat([torch.arange(int(n)) for n in lengths])
    X = torch.randn(len(sequence), D_WINDOW, generator=g)
    cols = [2 * seed % D_WINDOW, (2 * seed + 1) % D_WINDOW]
    Y = X[:, cols] > 1.0
    perm = torch.randperm(len(sequence), generator=g)
    return X[perm], Y[perm], sequence[perm], position[perm]


WINDOW_PROBE = windowed(9)


def _window_outputs(est: WindowedGRUClassifier) -> torch.Tensor:
    X, _, sequence, position = WINDOW_PROBE
    return est.token_scores(X, sequence, position)


def _window_inputs(seed: int) -> FitInputs:
    X, Y, sequence, position = windowed(seed)
    return (X, Y, sequence, position), {"ce_names": ["first", "second"]}


# ---------------------------------------------------------------- steering plane
D_PLANE, LAYERS_PLANE = 8, 4


def plane_classes(seed: int, n: int = 12) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Norm-site activations of 4 blocks: both classes project onto u with opposite signs at block 1 (seed 0) or
    block 2 (seed 1), on one side elsewhere; u, v and the blocks move with the seed."""
    g = _gen(300 + seed)
    eye = torch.eye(D_PLANE)
    u, v = eye[2 * seed], eye[2 * seed + 1]
    passing = {1 + seed}
    positive, negative = {}, {}
    for site in norm_sites(LAYERS_PLANE):
        layer, first = int(site.split(".")[1]), "ln1" in site
        opposite = layer in passing
        base = torch.randn(D_PLANE, generator=g) * 0.2
        base[2 * seed] = 0.0 if opposite else 3.0
        share = 0.3 * (layer + (0.5 if first else 0.0)) / LAYERS_PLANE
        positive[site] = base + (u + share * v) + torch.randn(n, D_PLANE, generator=g) * 0.05
        negative[site] = (base - (u + share * v) * (1.0 if opposite else 0.5)
                          + torch.randn(n, D_PLANE, generator=g) * 0.05)
    return positive, negative


def _plane_outputs(plane: SteeringPlane) -> dict[str, torch.Tensor]:
    return {"plane": plane.plane_, "candidates": plane.candidates_, "passes": plane.passes_,
            "selected_layers": torch.tensor(plane.selected_layers),
            "sites_in_1-2": torch.tensor([norm_sites(LAYERS_PLANE).index(s) for s in plane.sites_in("1-2")])}


# ---------------------------------------------------------------- vector alignment
N_ALIGN, D_ALIGN = 48, 6
FINAL_ALIGN = "blocks.3.hook_resid_post"
SUBLAYERS_ALIGN = ["blocks.0.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.2.hook_attn_out"]


def aligned(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Final stream: answered along e0, benign along e1; one sublayer carries those directions, one tilted ones and
    one noise; which sublayer carries which moves with the seed."""
    g = _gen(400 + seed)
    answered = torch.rand(N_ALIGN, generator=g) < 0.5
    benign = torch.rand(N_ALIGN, generator=g) < 0.6
    e = torch.eye(D_ALIGN)
    sa, sb = torch.where(answered, 1.0, -1.0)[:, None], torch.where(benign, 1.0, -1.0)[:, None]

    def site(dir_a, dir_b, margin=3.0):
        return margin * (sa * dir_a + sb * dir_b) + torch.randn(N_ALIGN, D_ALIGN, generator=g)

    kinds = [site(e[0], e[1]), site((e[0] + e[2]) / 2 ** 0.5, (e[1] + e[3]) / 2 ** 0.5),
             torch.randn(N_ALIGN, D_ALIGN, generator=g) * 2]
    order = [0, 1, 2] if seed == 0 else [2, 0, 1]
    features = {name: kinds[i] for name, i in zip(SUBLAYERS_ALIGN, order)}
    features[FINAL_ALIGN] = site(e[0], e[1])
    return features, benign, answered


ALIGN_O = torch.randn(5, D_ALIGN, generator=_gen(8))
ALIGN_W = torch.randn(D_ALIGN, 10, generator=_gen(9))


def _align_inputs(seed: int) -> FitInputs:
    features, benign, answered = aligned(seed)
    return (features, benign, answered), {"final": FINAL_ALIGN}


def _align_outputs(va: VectorAlignment) -> dict[str, torch.Tensor]:
    out = {f"project {name}": va.project(name, ALIGN_O) for name in va.selected_}
    out.update({f"delta {name}": va.delta(name, ALIGN_W) for name in va.selected_})
    return out


# ---------------------------------------------------------------- reasoning neurons
SITES_NEURONS = [f"blocks.{i}.mlp.hook_post" for i in range(3)]
M_NEURONS = 8


def trace_pairs(seed: int, pairs: int = 12) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-site trace means {site: [pairs, 8]}: one sign-flipping neuron per site, at a seed-dependent index."""
    g = _gen(500 + seed)
    correct, incorrect = {}, {}
    for layer, site in enumerate(SITES_NEURONS):
        c = 0.1 * torch.randn(pairs, M_NEURONS, generator=g)
        i = 0.1 * torch.randn(pairs, M_NEURONS, generator=g)
        neuron = (layer + 3 * seed) % M_NEURONS
        c[:, neuron] += 1.0 + layer
        i[:, neuron] -= 1.0
        correct[site], incorrect[site] = c, i
    return correct, incorrect


NEURONS_H = torch.randn(3, M_NEURONS, generator=_gen(10))


def _neuron_outputs(est: ReasoningNeurons) -> dict[str, torch.Tensor]:
    return {site: est.steer(NEURONS_H, site, 0.5) for site in SITES_NEURONS}


# ---------------------------------------------------------------- failure gate
F_GATE = 12


def gate_prompts(seed: int, n: int = 24) -> tuple[list[torch.Tensor], torch.Tensor]:
    """n prompts [2-5 tokens, 12 features]; a failing prompt has one token whose feature 3 (seed 0) or 7 (seed 1)
    is +4."""
    g = _gen(600 + seed)
    fails = (torch.arange(n) % 2 == 1)[torch.randperm(n, generator=g)]
    signal = (3 + 4 * seed) % F_GATE
    prompts = []
    for fail in fails.tolist():
        t = int(torch.randint(2, 6, (), generator=g))
        p = torch.randn(t, F_GATE, generator=g)
        if fail:
            p[int(torch.randint(0, t, (), generator=g)), signal] = 4.0
        prompts.append(p)
    return prompts, fails


GATE_PROBE = gate_prompts(11)[0][:8]


# ---------------------------------------------------------------- behaviour neurons
SITES_BEHAVIOUR = [f"blocks.{i}.mlp.hook_post" for i in range(3)]
N_BEHAVIOUR, WIDTH_BEHAVIOUR, D_SAE_INPUT, D_SAE = 16, 10, 6, 8


def behaviour(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], SAEEvidence]:
    """Activations {site: [16, 10]} of positive and negative prompts with one planted neuron per site (index moves
    with the seed), and SAE evidence whose latent 1 (seed 0) or 5 (seed 1) separates the sides."""
    g = _gen(700 + seed)
    pos = {s: torch.randn(N_BEHAVIOUR, WIDTH_BEHAVIOUR, generator=g) for s in SITES_BEHAVIOUR}
    neg = {s: torch.randn(N_BEHAVIOUR, WIDTH_BEHAVIOUR, generator=g) for s in SITES_BEHAVIOUR}
    for layer, site in enumerate(SITES_BEHAVIOUR):
        pos[site][:, (2 * layer + 5 * seed) % WIDTH_BEHAVIOUR] += 2.0
    latents_pos = torch.randn(N_BEHAVIOUR, D_SAE, generator=g)
    latents_neg = torch.randn(N_BEHAVIOUR, D_SAE, generator=g)
    latents_pos[:, 1 + 4 * seed] += 2.0
    sae = SAEEvidence(positive=latents_pos, negative=latents_neg,
                      encoder=torch.randn(D_SAE_INPUT, D_SAE, generator=g),
                      down={s: torch.randn(D_SAE_INPUT, WIDTH_BEHAVIOUR, generator=g) for s in SITES_BEHAVIOUR},
                      upstream={SITES_BEHAVIOUR[0]: True, SITES_BEHAVIOUR[1]: True, SITES_BEHAVIOUR[2]: False})
    return pos, neg, sae


def _behaviour_inputs(seed: int) -> FitInputs:
    pos, neg, sae = behaviour(seed)
    return (pos, neg), {"sae": sae}


def _behaviour_outputs(est: BehaviourNeurons) -> dict[str, Any]:
    return {"neurons": est.neurons(), "scores": est.scores_}


# ---------------------------------------------------------------- DeconIEP: two tiny Llama models, one vocabulary
DECON_PROMPTS = {0: ["w5 w6 w7 w8", "w9 w10", "w11 w12 w13"],
                 1: ["w40 w41", "w50 w51 w52 w53 w54", "w60 w61 w62"]}


@functools.cache
def decon_models():
    """(f_con, reference): built once, never changed (DeconIEP.fit leaves both bit-identical). Large weights give
    confident logits, so greedy replies have no near-ties."""
    return tuple(tiny_model("llama", layers=1, d_model=16, heads=2, kv_heads=1, seed=seed, std=0.3, name=name,
                            pad_token_id=1, bos_token_id=0, eos_token_id=1) for seed, name in ((0, "con"), (1, "ref")))


def _decon_inputs(seed: int) -> FitInputs:
    con, ref = decon_models()
    return (con, ref, DECON_PROMPTS[seed]), {"data": f"synthetic-{seed}"}


DECON_EMBEDS = torch.randn(2, 5, 16, generator=_gen(12))
DECON_MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


def _decon_outputs(est: DeconIEP) -> dict[str, torch.Tensor]:
    return {"delta": est.delta(DECON_EMBEDS, DECON_MASK), "delta zeta=0.5": est.delta(DECON_EMBEDS, zeta=0.5)}


# ---------------------------------------------------------------- the cases
CASES: dict[type[Estimator], Case] = {case.cls: case for case in [
    Case(LinearProbe, dict(C=0.5, class_weight=None, max_iter=30),
         _probe_inputs, lambda e: e.decision_function(PROBE_X), lambda e: e.decision_function(PROBE_X), ("C", 2.0),
         notes="features [160, 8], two CEs planted in columns 0-1 (seed 0) / 2-3 (seed 1); logits on fixed rows"),
    Case(DiffMeansDirection, dict(normalize=False),
         _probe_inputs, lambda e: e.decision_function(PROBE_X), lambda e: e.decision_function(PROBE_X),
         ("normalize", True), notes="as LinearProbe"),
    Case(PlattScaling, dict(max_iter=50, l2=1e-3),
         _platt_inputs, lambda e: e.transform(PLATT_RAW), lambda e: e.transform(PLATT_RAW), ("l2", 1e-2),
         notes="raw scores [160, 2] (the planted columns, rescaled per seed); probabilities on a fixed grid"),
    Case(SAELatentSelector, dict(top_k=2, method="mean_diff", max_latents=4),
         _probe_inputs, lambda e: e.decision_function(PROBE_X), lambda e: e.decision_function(PROBE_X),
         ("top_k", 3), notes="non-negative 'latents' [160, 8] with planted columns; combined CE scores"),
    Case(WindowedGRUClassifier, dict(window=3, hidden=8, epochs=3, lr=1e-2, batch_size=16, seed=1),
         _window_inputs, _window_outputs, _window_outputs, ("hidden", 4),
         notes="12 shuffled sequences of 6-10 tokens x 4 features, 2 CEs fired by a planted feature > 1"),
    Case(SteeringPlane, dict(layers="all"),
         lambda seed: (plane_classes(seed), {}), lambda e: e.selected_layers, _plane_outputs, ("layers", "auto"),
         notes="norm-site activations of 4 blocks x 12 prompts per class, one planted discriminative block"),
    Case(VectorAlignment, dict(l_select=2, C=0.5, validation_fraction=0.25, random_state=3),
         _align_inputs, lambda e: e.project(SUBLAYERS_ALIGN[0], ALIGN_O), _align_outputs, ("l_select", 3),
         notes="48 prompts x 3 sublayers + final stream (d=6), planted answered/benign directions"),
    Case(ReasoningNeurons, dict(k=4, polarity=False),
         lambda seed: (trace_pairs(seed), {}), lambda e: e.steer(NEURONS_H, SITES_NEURONS[0], 0.5), _neuron_outputs,
         ("k", 2), notes="trace means of 12 pairs x 3 sites x 8 neurons, one planted sign-flipping neuron per site"),
    Case(FailureGate, dict(k_features=4, hidden=8, epochs=20, lr=1e-2, weight_decay=1e-3, random_state=2),
         lambda seed: (gate_prompts(seed), {}), lambda e: e.predict_proba(GATE_PROBE),
         lambda e: e.predict_proba(GATE_PROBE), ("epochs", 5),
         notes="24 prompts of 2-5 tokens x 12 features, failing ones carry a planted +4 feature"),
    Case(BehaviourNeurons, dict(fraction=0.1, C=0.5, sae_latents=3, sae_weight=0.25),
         _behaviour_inputs, lambda e: e.neurons(), _behaviour_outputs, ("fraction", 0.2),
         notes="16+16 prompts x 3 sites x 10 neurons with planted neurons, plus SAE evidence (8 latents)"),
    Case(DeconIEP, dict(zeta=0.3, width=8, n_layers=1, n_heads=2, dropout=0.0, max_positions=32, lr=1e-2, steps=2,
                        batch_size=2, lambda_kl=0.5, lambda_ce=2.0, temperature=0.0, max_new_tokens=3, seed=7),
         _decon_inputs, lambda e: e.delta(DECON_EMBEDS), _decon_outputs, ("zeta", 0.1), own_fingerprint=True,
         notes="two tiny 1-layer Llama models (d=16, one vocabulary), 3 prompts, 2 steps of batch 2, greedy replies"),
]}
