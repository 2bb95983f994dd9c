"""AMC (He et al. 2018, "AMC: AutoML for Model Compression"), with NNI v1's names and arguments, on
onnxprune's search (search.py): a DDPG agent chooses a preserve ratio per channel group.

One *episode* walks the searched groups in graph order. At step t the agent sees the group's
layer embedding — index, output channels, input channels, positions, kernel size, stride, the
group's MACs (min-max normalized over the groups), then the MACs removed so far and the MACs of
the groups still to come (fractions of the dense model's) and the previous action — and answers a
preserve ratio a_t ∈ [lbound, rbound]. The environment clips it (*resource-constrained action
clipping*): a_t may be at most the largest ratio with which the budget can still be met if every
later group is pruned down to lbound, so every episode ends inside the budget. The episode's
candidate prunes 1 − a_t of each group's channels with the base algorithm; its evaluation gives
the episode's reward ("acc_reward": the metric; "acc_flops_reward": −(1 − metric)·log(MACs)),
and every transition of the episode — with the action taken, i.e. clipped — is stored with that
reward, as AMC does.

DDPG as AMC runs it: actor and critic, target copies soft-updated by `tau`, a replay memory of
`rmsize` transitions sampled in minibatches of `bsize`, the reward centred by a moving average
(α = 0.5) of the minibatch means. The first `warmup` episodes act uniformly at random in
[lbound, rbound] and only fill the memory; later ones act with the actor plus truncated normal
noise, σ = init_delta · delta_decay^(episode − warmup), and update after every transition.

Reproducible and resumable: every random number comes from generators seeded by `seed` in this
process, and the agent learns only from rewards, which are a function of the evaluation records —
so a rerun with the same `experiment_data_dir` replays the same episodes, takes the logged
records and evaluates only what is missing. Warmup episodes do not depend on any reward: they run
as one batch through `executor`.

    pruner = AMCPruner(model, [{"op_types": ["Conv2d"]}], evaluator, val_loader, flops_ratio=0.5)
    model = pruner.compress()      # the best episode's masks; pruner.best, pruner.episodes
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .. import checks
from ..errors import OnnxPruneError
from .search import Candidate, SearchPruner, SearchSpace

REWARDS = ("acc_reward", "acc_flops_reward")
SPARSITY_KEYS = ("sparsity", "sparse_ratio", "sparsity_per_layer")


# --- pure pieces ---------------------------------------------------------------------------

def clip_preserve(action: float, cost, budget: float, size: int, lbound: float, rbound: float) -> float:
    """AMC's resource-constrained clipping of one action.

    `cost(a)` is the resource of the episode if this group keeps a fraction `a` of its `size`
    channels, the groups before it keep what they chose and every later group keeps lbound; it
    rises with `a`, in steps: a group keeps ⌈a·size⌉ channels. Returns `action` within
    [lbound, rbound], lowered to the largest k/size whose cost is within `budget` when it is
    over (lbound when even lbound is over: the caller has to refuse such a budget up front)."""
    a = min(max(float(action), lbound), rbound)
    if cost(a) <= budget:
        return a
    lo, hi = math.ceil(lbound * size - 1e-9), math.ceil(a * size - 1e-9) - 1   # the counts below a's
    best = lbound
    while lo <= hi:
        mid = (lo + hi) // 2
        if cost(mid / size) <= budget:
            best, lo = max(best, mid / size), mid + 1
        else:
            hi = mid - 1
    return best


def amc_reward(reward: str, metric: float, macs: float) -> float:
    """AMC's rewards with the metric as a fraction (NNI's took percent and scaled by 0.01):
    "acc_reward" the metric; "acc_flops_reward" −error · log(MACs), error = 1 − metric."""
    if reward == "acc_reward":
        return float(metric)
    return -(1.0 - float(metric)) * math.log(max(float(macs), 1.0))


def truncated_normal(rng: np.random.Generator, mean: float, sigma: float, lower: float, upper: float) -> float:
    """N(mean, sigma) restricted to [lower, upper], by rejection (the mean is inside the interval,
    so at least about half the draws are accepted)."""
    if sigma > 0 and lower < upper:
        for _ in range(1000):
            x = float(rng.normal(mean, sigma))
            if lower <= x <= upper:
                return x
    return float(min(max(mean, lower), upper))


class LoaderEvaluator:
    """NNI's AMC calls `evaluator(val_loader, model)`; searches call `evaluator(model)`. A class,
    not a lambda, because the evaluator travels with every task to the executor (pickled)."""

    def __init__(self, evaluator, val_loader):
        self.evaluator, self.val_loader = evaluator, val_loader

    def __call__(self, model) -> float:
        return self.evaluator(self.val_loader, model)


# --- environment -----------------------------------------------------------------------------

STATIC = ("index", "out_channels", "in_channels", "positions", "kernel_size", "stride", "macs")
DYNAMIC = ("reduced", "rest", "previous_action")


class AMCEnvironment:
    """The layer embedding of the searched groups and one episode's bookkeeping: `reset()` gives the
    first state, `step(action)` clips the action, records the group's sparsity and gives the next
    state. `sparsities` is the episode's candidate so far (group index → fraction pruned)."""

    def __init__(self, space: SearchSpace, model, lbound: float, rbound: float):
        self.space, self.lbound, self.rbound = space, lbound, rbound
        self.order = list(space.searched)
        self.budget = space.budget(model)
        self.dense_macs = space.resources.dense_macs
        self.floor = {gi: self.sparsity(lbound, gi) for gi in self.order}
        least = self.cost(self.floor)
        if least > self.budget:
            dense = space.cost({}, model)
            raise OnnxPruneError(f"AMC: flops_ratio {1 - space.sparsity:g} cannot be met: with every searched group at "
                                 f"lbound {lbound:g} the model keeps {least / dense:.3f} of its {space.resource} "
                                 "(pinned channels and unsearched layers stay); raise flops_ratio or lower lbound")
        self.group_macs = [self._group_macs(gi) for gi in self.order]
        self.static = _normalized(np.array([self._features(t, gi, model) for t, gi in enumerate(self.order)], np.float64))
        self.reset()

    @property
    def states(self) -> int:
        return len(STATIC) + len(DYNAMIC)

    def sparsity(self, preserve: float, gi: int) -> float:
        """The fraction of group gi pruned when it keeps `preserve` (within what its free channels allow)."""
        return self.space.clip(1.0 - preserve, gi)

    def cost(self, sparsities: dict[int, float]) -> float:
        return self.space.counted_cost(sparsities)

    def reset(self) -> np.ndarray:
        self.t, self.sparsities, self.actions = 0, {}, []
        return self.state()

    @property
    def done(self) -> bool:
        return self.t >= len(self.order)

    def state(self) -> np.ndarray:
        t = min(self.t, len(self.order) - 1)
        reduced = (self.dense_macs - self.space.counted(self.sparsities)["macs"]) / self.dense_macs
        rest = sum(self.group_macs[t + 1:]) / self.dense_macs
        previous = self.actions[-1] if self.actions else 1.0
        return np.concatenate([self.static[t], [reduced, rest, previous]]).astype(np.float32)

    def clip(self, action: float) -> float:
        """The action, clipped so that the episode can still meet the budget (clip_preserve)."""
        gi = self.order[self.t]
        later = {gj: self.floor[gj] for gj in self.order[self.t + 1:]}

        def cost(a: float) -> float:
            return self.cost(self.sparsities | {gi: self.sparsity(a, gi)} | later)

        return clip_preserve(action, cost, self.budget, self.space.size(gi), self.lbound, self.rbound)

    def step(self, action: float) -> tuple[float, np.ndarray]:
        """Take the (clipped) action on the current group: (the action taken, the next state)."""
        a = self.clip(action)
        self.sparsities[self.order[self.t]] = self.sparsity(a, self.order[self.t])
        self.actions.append(a)
        self.t += 1
        return a, self.state()

    def _group_macs(self, gi: int) -> int:
        layers = self.space.resources.layers
        return sum(int(np.prod(layers[n].shape)) * layers[n].positions
                   for n in self.space.groups.groups[gi].layers if n in layers)

    def _features(self, t: int, gi: int, model) -> list[float]:
        """AMC's static features of a group, read off its first layer (coupled layers share them)."""
        group = self.space.groups.groups[gi]
        name = group.layers[0]
        module = model.get_submodule(name)
        layer = self.space.resources.layers[name]
        inputs = getattr(module, "in_channels", getattr(module, "in_features", layer.shape[1]))
        stride = getattr(module, "stride", 1)                      # Linear: none
        return [t, group.size, inputs, layer.positions, int(np.prod(layer.shape[2:], dtype=np.int64)),
                stride[0] if isinstance(stride, tuple) else stride, self.group_macs[t]]


def _normalized(features: np.ndarray) -> np.ndarray:
    """Each column scaled to [0, 1] over the groups (a constant column is 0), as AMC does."""
    low, span = features.min(0), np.ptp(features, 0)
    return np.where(span > 0, (features - low) / np.where(span > 0, span, 1.0), 0.0)


# --- agent -----------------------------------------------------------------------------------

class _Critic(nn.Module):
    """Q(s, a): AMC's critic, the state and the action through their own first layers, summed."""

    def __init__(self, states: int, hidden1: int, hidden2: int):
        super().__init__()
        self.fc11, self.fc12 = nn.Linear(states, hidden1), nn.Linear(1, hidden1)
        self.fc2, self.fc3 = nn.Linear(hidden1, hidden2), nn.Linear(hidden2, 1)

    def forward(self, state, action):
        hidden = torch.relu(self.fc11(state) + self.fc12(action))
        return self.fc3(torch.relu(self.fc2(hidden)))


@dataclass
class DDPGAgent:
    """AMC's DDPG: `act(state, episode)` and `observe(...)`, `update()` one minibatch step."""
    states: int
    lbound: float
    rbound: float
    hidden1: int = 300
    hidden2: int = 300
    lr_c: float = 1e-3
    lr_a: float = 1e-4
    warmup: int = 100
    discount: float = 1.0
    bsize: int = 64
    rmsize: int = 100
    tau: float = 0.01
    init_delta: float = 0.5
    delta_decay: float = 0.99
    seed: int = 0
    moving_alpha: float = 0.5
    baseline: float | None = None
    memory: deque = field(init=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        with torch.random.fork_rng(devices=[]):   # the weights from `seed`; the user's global RNG untouched
            torch.manual_seed(self.seed)
            self.actor = nn.Sequential(nn.Linear(self.states, self.hidden1), nn.ReLU(), nn.Linear(self.hidden1, self.hidden2),
                                       nn.ReLU(), nn.Linear(self.hidden2, 1), nn.Sigmoid())
            self.critic = _Critic(self.states, self.hidden1, self.hidden2)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=self.lr_a)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=self.lr_c)
        self.memory = deque(maxlen=self.rmsize)

    def policy(self, actor, state):
        """The actor's sigmoid, scaled into [lbound, rbound]."""
        return self.lbound + (self.rbound - self.lbound) * actor(state)

    def sigma(self, episode: int) -> float:
        return self.init_delta * self.delta_decay ** (episode - self.warmup)

    def act(self, state: np.ndarray, episode: int) -> float:
        if episode < self.warmup:
            return float(self.rng.uniform(self.lbound, self.rbound))
        with torch.no_grad():
            mean = float(self.policy(self.actor, torch.as_tensor(state[None])))
        return truncated_normal(self.rng, mean, self.sigma(episode), self.lbound, self.rbound)

    def observe(self, state, action: float, reward: float, next_state, done: bool) -> None:
        self.memory.append((state, [action], [reward], next_state, [0.0 if done else 1.0]))

    def update(self) -> None:
        picked = self.rng.integers(0, len(self.memory), self.bsize)
        state, action, reward, next_state, live = (
            torch.as_tensor(np.array([self.memory[i][k] for i in picked], np.float32)) for k in range(5))
        mean = float(reward.mean())
        self.baseline = mean if self.baseline is None else self.baseline + self.moving_alpha * (mean - self.baseline)
        reward = reward - self.baseline
        with torch.no_grad():
            target = reward + self.discount * live * self.critic_target(next_state, self.policy(self.actor_target, next_state))
        self.critic_optim.zero_grad()
        nn.functional.mse_loss(self.critic(state, action), target).backward()
        self.critic_optim.step()
        self.actor_optim.zero_grad()
        (-self.critic(state, self.policy(self.actor, state))).mean().backward()
        self.actor_optim.step()
        for target_net, net in ((self.actor_target, self.actor), (self.critic_target, self.critic)):
            with torch.no_grad():
                for t, p in zip(target_net.parameters(), net.parameters()):
                    t.mul_(1.0 - self.tau).add_(p, alpha=self.tau)


# --- the pruner ------------------------------------------------------------------------------

def amc_config(config_list, flops_ratio: float) -> list:
    """The search's config: AMC's budget is `flops_ratio`, the fraction of MACs to keep, i.e. an
    overall sparsity of 1 − flops_ratio; entries without a sparsity (NNI v1 writes
    `[{"op_types": ["Conv2d"]}]`) get it, an entry with another sparsity is an error."""
    if not isinstance(config_list, (list, tuple)):
        return config_list       # resolve() says what a config list is
    sparsity = 1.0 - flops_ratio
    out = []
    for i, entry in enumerate(config_list):
        if isinstance(entry, dict) and not entry.get("exclude"):
            given = next((entry[k] for k in SPARSITY_KEYS if k in entry), None)
            if given is None:
                entry = {**entry, "sparsity": sparsity}
            elif not isinstance(given, (int, float)) or abs(given - sparsity) > 1e-9:
                raise OnnxPruneError(f"AMCPruner: config_list entry {i + 1} ({entry!r}) gives sparsity {given!r}, but the "
                                     f"budget is flops_ratio={flops_ratio:g} (sparsity {sparsity:g}); leave the sparsity out")
        out.append(entry)
    return out


class AMCPruner(SearchPruner):
    """NNI v1's AMCPruner(model, config_list, evaluator, val_loader, flops_ratio, lbound, rbound,
    reward, hidden1, hidden2, lr_c, lr_a, warmup, discount, bsize, rmsize, tau, init_delta,
    delta_decay, train_episode, seed) — see the module docstring — plus `dummy_input` (the groups
    and MACs are traced from it; by default the first batch of `val_loader`), `resource` ("macs" or
    "params": what flops_ratio keeps), `executor`, `base_algo`, `finetuner`, `experiment_data_dir`.

    `evaluator(val_loader, model)` when `val_loader` is given, else `evaluator(model)`; a float,
    higher is better. After `compress()`: the model carries the best episode's masks, `best` is
    its record (with `reward`), `episodes` lists (actions, reward, MACs) per episode and
    `proposals` the agent's actions before clipping."""

    name = "amc"
    counted_only = True    # the clipping counts the resource of every action

    def __init__(self, model, config_list, evaluator, val_loader=None, dummy_input=None, flops_ratio=0.5, lbound=0.2,
                 rbound=1.0, reward="acc_reward", hidden1=300, hidden2=300, lr_c=1e-3, lr_a=1e-4, warmup=100, discount=1.0,
                 bsize=64, rmsize=100, tau=0.01, init_delta=0.5, delta_decay=0.99, train_episode=800, seed=0,
                 experiment_data_dir=None, executor=None, base_algo="l1", finetuner=None, progress=True, *,
                 resource="macs", threads=None):
        if reward not in REWARDS:
            raise OnnxPruneError(f"AMCPruner: reward must be one of {', '.join(REWARDS)}, got {reward!r}")
        flops_ratio = float(flops_ratio)
        if not 0 < flops_ratio <= 1:
            raise OnnxPruneError(f"AMCPruner: flops_ratio (the fraction of MACs to keep) must be in (0, 1], got {flops_ratio}")
        if not 0 < lbound <= rbound <= 1:
            raise OnnxPruneError(f"AMCPruner: need 0 < lbound <= rbound <= 1 (preserve ratios), got {lbound}, {rbound}")
        if not callable(evaluator):
            raise OnnxPruneError("AMCPruner: evaluator must be callable: evaluator(val_loader, model) or evaluator(model)")
        if val_loader is not None:
            if dummy_input is None:
                first = next(iter(val_loader))
                dummy_input = first[0] if isinstance(first, (list, tuple)) else first
            evaluator = LoaderEvaluator(evaluator, val_loader)
        self.reward, self.lbound, self.rbound = reward, float(lbound), float(rbound)
        self.warmup = checks.non_negative_int(warmup, "warmup")
        self.train_episode = checks.positive_int(train_episode, "train_episode")
        agent = {"hidden1": checks.positive_int(hidden1, "hidden1"), "hidden2": checks.positive_int(hidden2, "hidden2"),
                 "lr_c": float(lr_c), "lr_a": float(lr_a), "warmup": self.warmup, "discount": float(discount),
                 "bsize": checks.positive_int(bsize, "bsize"), "rmsize": checks.positive_int(rmsize, "rmsize"),
                 "tau": float(tau), "init_delta": float(init_delta), "delta_decay": float(delta_decay)}
        super().__init__(model, amc_config(config_list, flops_ratio), evaluator, dummy_input, base_algo=base_algo,
                         resource=resource, finetuner=finetuner, experiment_data_dir=experiment_data_dir,
                         executor=executor, seed=seed, threads=threads, max_sparsity=1.0 - self.lbound, progress=progress,
                         args={"flops_ratio": flops_ratio, "lbound": self.lbound, "rbound": self.rbound, "reward": reward,
                               "train_episode": self.train_episode} | agent)
        self.env = AMCEnvironment(self.space, model, self.lbound, self.rbound)
        self.agent = DDPGAgent(self.env.states, self.lbound, self.rbound, seed=self.seed, **agent)
        self.episodes: list[tuple[list[float], float, int]] = []
        self.proposals: list[list[float]] = []

    def play(self, episode: int) -> tuple[dict[int, float], list[tuple]]:
        """One pass over the groups: (the candidate's sparsities, the transitions (s, a, s', done))."""
        env, transitions, proposed = self.env, [], []
        state = env.reset()
        while not env.done:
            action = self.agent.act(state, episode)
            taken, following = env.step(action)
            proposed.append(action)
            transitions.append((state, taken, following, env.done))
            state = following
        self.proposals.append(proposed)
        return dict(env.sparsities), transitions

    def search(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.train_episode, desc="AMC episodes", disable=not self.evaluation.progress)
        best, best_sparsities, episode = None, None, 0
        try:
            while episode < self.train_episode:
                # warmup episodes act at random, independent of any reward: one batch for the executor
                block = range(episode, min(self.warmup, self.train_episode)) if episode < self.warmup else [episode]
                plays = [self.play(e) for e in block]
                records = self.evaluation.run(self.bound_model, [Candidate(f"episode {e}", p[0]) for e, p in zip(block, plays)],
                                              desc="warmup" if len(block) > 1 else f"episode {episode}")
                for e, (sparsities, transitions), record in zip(block, plays, records):
                    reward = amc_reward(self.reward, record["metric"], record[self.space.resource])
                    for state, action, following, done in transitions:
                        self.agent.observe(state, action, reward, following, done)
                        if e >= self.warmup:
                            self.agent.update()
                    self.episodes.append(([a for _, a, _, _ in transitions], reward, record["macs"]))
                    if best is None or reward > best["reward"]:
                        best = {k: v for k, v in record.items() if k != "state"} | {"reward": reward}
                        best_sparsities = sparsities
                    bar.update(1)
                    bar.set_postfix(best_reward=f"{best['reward']:.4g}")
                episode += len(block)
        finally:
            bar.close()
        self.evaluation.best = best
        self.apply(best_sparsities)


__all__ = ["AMCPruner", "AMCEnvironment", "DDPGAgent", "LoaderEvaluator", "clip_preserve", "amc_reward", "truncated_normal",
           "amc_config"]
