"""The online margin agent of ``FairLoss``: a small DQN over (count bin, spread bin, level) states.

This is marginkit's online variant, not the paper's procedure (the paper trains its
agent offline and freezes it: see ``marginkit.nn.fair_loss_paper``). It is a plain
object, not an ``nn.Module``: its networks and optimiser must never reach the user's
optimiser through ``FairLoss.parameters()``; ``FairLoss`` carries its state in
``get_extra_state``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIONS", "QNetwork", "OnlineMarginDQN", "encode_states"]

ACTIONS = ("lower", "keep", "raise")  # action a moves the margin level by a − 1
NUM_COUNT_BINS = 3  # the paper's three sample-count bins
NUM_SPREAD_BINS = 3  # the paper's three intra-class-variance bins


def encode_states(count_bin: torch.Tensor, spread_bin: torch.Tensor, level: torch.Tensor, num_levels: int) -> torch.Tensor:
    """s = (count_bin·3 + spread_bin)·L + level, all (N,) int64 -> (N,) int64 in [0, 9·L)."""
    return (count_bin * NUM_SPREAD_BINS + spread_bin) * num_levels + level


class QNetwork(nn.Module):
    """Q(s, ·) for the 3 actions; s encoded as one-hots (count bin, spread bin, margin level)."""

    def __init__(self, num_count_bins: int, num_spread_bins: int, num_levels: int, hidden: int) -> None:
        super().__init__()
        self.sizes = (num_count_bins, num_spread_bins, num_levels)
        self.net = nn.Sequential(
            nn.Linear(sum(self.sizes), hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, len(ACTIONS))
        )

    def features(self, states: torch.Tensor) -> torch.Tensor:
        """states (N,) int64 -> (N, count + spread + level bins) float32 one-hots."""
        nc, ns, nl = self.sizes
        level = states % nl
        spread = (states // nl) % ns
        count = states // (nl * ns)
        return torch.cat([F.one_hot(count, nc), F.one_hot(spread, ns), F.one_hot(level, nl)], dim=1).to(torch.float32)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(states))

    @torch.no_grad()
    def init_(self, generator: torch.Generator) -> None:
        """torch's default Linear init (U(±1/√fan_in)), drawn from ``generator``."""
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)


class OnlineMarginDQN:
    """DQN with a target network, experience replay and ε-greedy actions, on the CPU.

    Q-network: MLP with 2 hidden layers of ``hidden`` units on one-hot states; the target
    network is copied from it every ``target_sync`` learning rounds. ``learn()`` runs
    ``train_steps`` Adam steps on minibatches of ``replay_batch`` transitions (Huber loss
    to r + γ·max_a' Q_target(s', a')) once the replay holds ``min_replay``. ``choose``
    is ε-greedy with ε = max(epsilon_end, epsilon_start·epsilon_decay^moves). All
    randomness (init, replay sampling, exploration) comes from one generator seeded
    with ``seed``.
    """

    STATE_VERSION = 1

    def __init__(self, *, num_levels: int, hidden: int, lr: float, gamma: float, replay_capacity: int,
                 replay_batch: int, min_replay: int, train_steps: int, target_sync: int,
                 epsilon_start: float, epsilon_end: float, epsilon_decay: float, seed: int) -> None:
        self.num_levels, self.hidden, self.lr, self.gamma = num_levels, hidden, lr, gamma
        self.replay_capacity, self.replay_batch, self.min_replay = replay_capacity, replay_batch, min_replay
        self.train_steps, self.target_sync = train_steps, target_sync
        self.epsilon_start, self.epsilon_end, self.epsilon_decay = epsilon_start, epsilon_end, epsilon_decay
        self.generator = torch.Generator().manual_seed(seed)
        sizes = (NUM_COUNT_BINS, NUM_SPREAD_BINS, num_levels)
        self.q_net = QNetwork(*sizes, hidden)
        self.q_net.init_(self.generator)
        self.target_net = QNetwork(*sizes, hidden)
        self.target_net.load_state_dict(self.q_net.state_dict())
        self.target_net.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.q_net.parameters(), lr=lr)
        self.replay = {
            "state": torch.zeros(replay_capacity, dtype=torch.int64),
            "action": torch.zeros(replay_capacity, dtype=torch.int64),
            "reward": torch.zeros(replay_capacity, dtype=torch.float32),
            "next_state": torch.zeros(replay_capacity, dtype=torch.int64),
        }
        self.replay_size = 0
        self.replay_pos = 0
        self.learn_rounds = 0

    def epsilon(self, moves: int) -> float:
        return max(self.epsilon_end, self.epsilon_start * self.epsilon_decay ** moves)

    def push(self, states, actions, rewards, next_states) -> None:
        """Append transitions (N,) to the ring buffer (the newest ``replay_capacity`` kept)."""
        cap = self.replay_capacity
        for name, values in (("state", states), ("action", actions), ("reward", rewards), ("next_state", next_states)):
            values = values.cpu()
            idx = (self.replay_pos + torch.arange(values.numel())) % cap
            self.replay[name][idx[-cap:]] = values[-cap:].to(self.replay[name].dtype)
        n = states.numel()
        self.replay_pos = (self.replay_pos + n) % cap
        self.replay_size = min(cap, self.replay_size + n)

    def learn(self) -> None:
        if self.replay_size < self.min_replay:
            return
        with torch.enable_grad():
            for _ in range(self.train_steps):
                ix = torch.randint(self.replay_size, (self.replay_batch,), generator=self.generator)
                s, a = self.replay["state"][ix], self.replay["action"][ix]
                r, s2 = self.replay["reward"][ix], self.replay["next_state"][ix]
                with torch.no_grad():
                    target = r + self.gamma * self.target_net(s2).max(dim=1).values
                q = self.q_net(s).gather(1, a[:, None]).squeeze(1)
                loss = F.smooth_l1_loss(q, target)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        self.learn_rounds += 1
        if self.learn_rounds % self.target_sync == 0:
            self.target_net.load_state_dict(self.q_net.state_dict())

    @torch.no_grad()
    def choose(self, states: torch.Tensor, moves: int) -> torch.Tensor:
        """ε-greedy actions (N,) int64 in {0, 1, 2} for CPU states (N,)."""
        n = states.numel()
        explore = torch.rand(n, generator=self.generator) < self.epsilon(moves)
        random_actions = torch.randint(len(ACTIONS), (n,), generator=self.generator)
        greedy = self.q_net(states).argmax(dim=1)
        return torch.where(explore, random_actions, greedy)

    def state_dict(self) -> dict:
        return {
            "version": self.STATE_VERSION,
            "q_net": copy.deepcopy(self.q_net.state_dict()),
            "target_net": copy.deepcopy(self.target_net.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "replay": {k: v.clone() for k, v in self.replay.items()},
            "replay_size": self.replay_size,
            "replay_pos": self.replay_pos,
            "learn_rounds": self.learn_rounds,
            "generator": self.generator.get_state(),
        }

    def check_state(self, state) -> None:
        """ValueError, before anything loads, when ``state`` is not an agent this one can take."""
        if not isinstance(state, dict) or state.get("version") != self.STATE_VERSION:
            raise ValueError("FairLoss: unrecognised agent state in the state_dict")
        capacity = state["replay"]["state"].numel()
        if capacity != self.replay_capacity:
            raise ValueError(
                f"FairLoss: the checkpoint's replay capacity is {capacity}, this module's is "
                f"{self.replay_capacity}; build the module with the same replay_capacity"
            )
        mine = {k: tuple(v.shape) for k, v in self.q_net.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in state["q_net"].items()}
        if mine != theirs:
            raise ValueError(
                f"FairLoss: the checkpoint's agent network has parameter shapes {theirs}, this module's {mine}; "
                "build the module with the checkpoint's hidden and margin_levels"
            )

    def load_state_dict(self, state: dict) -> None:
        self.check_state(state)
        self.q_net.load_state_dict(state["q_net"])
        self.target_net.load_state_dict(state["target_net"])
        self.optimizer = torch.optim.Adam(self.q_net.parameters(), lr=self.lr)
        self.optimizer.load_state_dict(state["optimizer"])
        self.replay = {k: v.clone().cpu() for k, v in state["replay"].items()}
        self.replay_size = int(state["replay_size"])
        self.replay_pos = int(state["replay_pos"])
        self.learn_rounds = int(state["learn_rounds"])
        self.generator.set_state(state["generator"].cpu())
