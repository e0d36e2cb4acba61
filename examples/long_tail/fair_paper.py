"""The Fair Loss paper's offline phase, scaled down to the demo: sample networks, tuples, frozen tables.

1. Pre-train the demo network for ``fair_pretrain_epochs`` with CosFace at the initial
   margin (0.35) on every count group: the checkpoint.
2. ``marginkit.nn.fair_loss_paper.collect_transitions``: from the checkpoint and each
   uniform base assignment of levels (all groups at 0.15, at 0.25, ...), fine-tune a keep
   copy and one copy per group and action with that group's margin moved, each for
   ``fair_finetune_epochs`` with the same batch order (so a copy differs from the keep
   copy only by its margins), and measure each copy on a full eval-mode pass.
3. Fit one frozen table per reward (group-local compactness, class-balanced validation
   accuracy). ``heads.build_head`` hands them to ``FairLoss(policy=...)``.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from marginkit.nn.fair_loss_paper import FairLossTable, GroupMeasure, collect_transitions, fixed_count_bins, tertile_edges
from marginkit.nn.fair_loss_stats import nearest_other_sqdist

from .data import DemoData
from .heads import ClassMarginCosFace, EmbeddingNet, TrainConfig
from .train import train_epochs

__all__ = ["offline_phase", "measure_groups"]

LEVELS = (0.15, 0.25, 0.35, 0.45)
INITIAL_LEVEL = 2  # 0.35, FairLoss's default initial margin


@torch.no_grad()
def measure_groups(model, head, data: DemoData, class_group: torch.Tensor, num_groups: int) -> tuple[GroupMeasure, torch.Tensor]:
    """(GroupMeasure on a full eval pass over the training set and the validation split,
    per-class intra-class spread (C,))."""
    model.eval()
    C = data.class_counts.numel()
    x = F.normalize(model(data.train_x).double(), dim=1)
    w = F.normalize(head.weight.detach().double(), dim=1)
    sq = ((x - w[data.train_y]) ** 2).sum(dim=1)
    n = torch.bincount(data.train_y, minlength=C).to(torch.float64)
    class_sq = torch.zeros(C, dtype=torch.float64).index_add_(0, data.train_y, sq)
    intra = class_sq / n
    score = nearest_other_sqdist(head.weight, torch.arange(C)) - intra
    group_n = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, class_group, n)
    spread = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, class_group, class_sq) / group_n
    classes_per_group = torch.bincount(class_group, minlength=num_groups).to(torch.float64)
    compact = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, class_group, score) / classes_per_group
    pred = (F.normalize(model(data.val_x), dim=1) @ w.float().T).argmax(dim=1)
    hits = torch.zeros(C, dtype=torch.float64).index_add_(0, data.val_y, (pred == data.val_y).double())
    balanced = float((hits / torch.bincount(data.val_y, minlength=C).clamp_min(1)).mean())
    return GroupMeasure(spread, compact, balanced), intra


def offline_phase(data: DemoData, cfg: TrainConfig) -> dict:
    """Run the offline phase; returns count_bins (C,), spread_thresholds, tables {"local", "global"},
    the tuples, the number of fine-tunes and the seconds spent."""
    start = time.perf_counter()
    C = data.class_counts.numel()
    count_bins = fixed_count_bins(data.class_counts)
    present = torch.unique(count_bins)  # a balanced set has one count bin: one group
    class_group = torch.searchsorted(present, count_bins)
    G = present.numel()
    torch.manual_seed(cfg.seed + 1000)  # the offline phase has its own initialisation
    model = EmbeddingNet(data.train_x.shape[1], cfg.hidden, cfg.embedding_dim)
    head = ClassMarginCosFace(C, cfg.embedding_dim, torch.full((C,), LEVELS[INITIAL_LEVEL]), cfg.scale)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=cfg.lr / 2, weight_decay=cfg.weight_decay)
    train_epochs(model, head, data, cfg, cfg.fair_pretrain_epochs, opt, None, torch.Generator().manual_seed(cfg.seed + 1001))
    checkpoint = copy.deepcopy((model.state_dict(), head.state_dict(), opt.state_dict()))
    at_checkpoint, intra = measure_groups(model, head, data, class_group, G)
    thresholds = tertile_edges(intra)
    finetunes = []

    def finetune(levels: torch.Tensor) -> GroupMeasure:
        finetunes.append(levels.tolist())
        model.load_state_dict(checkpoint[0])
        head.load_state_dict(checkpoint[1])
        opt.load_state_dict(checkpoint[2])
        head.class_margins.copy_(torch.tensor(LEVELS, dtype=torch.float32)[levels[class_group]])
        train_epochs(model, head, data, cfg, cfg.fair_finetune_epochs, opt, None, torch.Generator().manual_seed(cfg.seed + 1002))
        return measure_groups(model, head, data, class_group, G)[0]

    bases = [torch.full((G,), level, dtype=torch.int64) for level in range(len(LEVELS))]
    tuples = collect_transitions(at_checkpoint, finetune, present, thresholds, bases, len(LEVELS))
    tables = {reward: FairLossTable.fit(tuples, reward, len(LEVELS)) for reward in ("local", "global")}
    return {"count_bins": count_bins, "spread_thresholds": thresholds, "tables": tables, "tuples": tuples,
            "finetunes": len(finetunes), "seconds": time.perf_counter() - start}
