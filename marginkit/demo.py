"""``marginkit demo`` / ``python -m marginkit.demo``: margin losses on a long-tailed identity set.

Trains the same small embedding MLP with each loss on a synthetic long-tailed
identity dataset (``marginkit.demo_data``: Zipf class sizes, identities as clusters
on a sphere seen through a frozen random non-linear map), then evaluates

* open-set verification on identities never seen in training: TAR at FAR = 1e-3
  (and 1e-2) over all pairs, cosine similarity of the embeddings;
* closed-set accuracy on held-out samples of the training identities, with the
  head's own classifier (argmax over its class weights / centers), for the head
  (most frequent third of the classes) and the tail (least frequent third).

Prints a table and writes a CSV and a PNG. Everything is seeded; defaults take a
few minutes on 2 CPU cores. ``--tiny`` runs a seconds-long smoke version.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import marginkit as mk
from marginkit.demo_data import DataConfig, DemoData, make_dataset
from marginkit.nn.fair_loss import FairLoss
from marginkit.nn.ir_softmax import IRSoftmax
from marginkit.nn.range_loss import RangeLoss

__all__ = ["main", "run_demo", "TrainConfig", "METHODS", "DEFAULT_METHODS", "EXTRA_METHODS"]

DEFAULT_METHODS = ("softmax", "cosface", "arcface", "ir-softmax", "range+softmax", "fairloss")
EXTRA_METHODS = ("ldam", "adacos", "curricularface", "subcenter", "adaface")
METHODS = DEFAULT_METHODS + EXTRA_METHODS
COLUMNS = ("method", "tar@far=1e-3", "tar@far=1e-2", "tail_acc", "head_acc", "all_acc", "train_s")


@dataclass(frozen=True)
class TrainConfig:
    embedding_dim: int = 32
    hidden: int = 256
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    scale: float = 30.0
    range_lambda: float = 0.05
    fair_update_every: int = 20
    seed: int = 0


# ------------------------------------------------------------------------------------------ model
class EmbeddingNet(nn.Module):
    """input -> [Linear, BN, ReLU] × 2 -> Linear -> BN: a small face-model-shaped MLP."""

    def __init__(self, in_dim: int, hidden: int, emb_dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, emb_dim), nn.BatchNorm1d(emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class LinearSoftmax(nn.Module):
    """Plain softmax: an unnormalised linear classifier with bias and cross-entropy."""

    def __init__(self, num_classes: int, emb_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(emb_dim, num_classes)

    def forward(self, emb, labels):
        return F.cross_entropy(self.fc(emb), labels)

    def logits(self, emb):
        return self.fc(emb)


class SoftmaxPlusRange(nn.Module):
    """softmax + λ·RangeLoss on the normalised embeddings (the paper's joint supervision)."""

    def __init__(self, num_classes: int, emb_dim: int, lam: float) -> None:
        super().__init__()
        self.softmax = LinearSoftmax(num_classes, emb_dim)
        self.range_loss = RangeLoss(k=2, margin=1.0)
        self.lam = lam

    def forward(self, emb, labels):
        return self.softmax(emb, labels) + self.lam * self.range_loss(F.normalize(emb, dim=1), labels)

    def logits(self, emb):
        return self.softmax.logits(emb)


def _cosine_logits(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda emb: F.normalize(emb, dim=1) @ F.normalize(weight.detach().float(), dim=1).T


def build_head(method: str, num_classes: int, cfg: TrainConfig, class_counts: torch.Tensor, steps: int):
    """(loss module, closed-set logits function)."""
    C, E, s = num_classes, cfg.embedding_dim, cfg.scale
    if method == "softmax":
        head = LinearSoftmax(C, E)
        return head, head.logits
    if method == "range+softmax":
        head = SoftmaxPlusRange(C, E, cfg.range_lambda)
        return head, head.logits
    if method == "cosface":
        head = mk.MarginSoftmax(C, E, mk.CosFace(0.35), s)
    elif method == "arcface":
        head = mk.MarginSoftmax(C, E, mk.ArcFace(0.5), s)
    elif method == "ir-softmax":
        head = IRSoftmax(C, E, mk.CosFace(0.35), s, momentum=0.9)
        return head, lambda emb: _cosine_logits(head.centers)(emb)
    elif method == "fairloss":
        head = FairLoss(C, E, s, update_every=cfg.fair_update_every, seed=cfg.seed)
    elif method == "ldam":
        from marginkit.nn.adaptive import LDAMSoftmax

        head = LDAMSoftmax(C, E, class_counts=class_counts, max_margin=0.5, scale=s)
    elif method == "adacos":
        from marginkit.nn.adaptive import AdaCos

        head = AdaCos(C, E)
    elif method == "curricularface":
        from marginkit.nn.adaptive import CurricularFace

        head = CurricularFace(C, E, mk.ArcFace(0.5), s)
    elif method == "subcenter":
        from marginkit.nn.adaptive import SubCenterArcFace

        head = SubCenterArcFace(C, E, k=3, margin=mk.ArcFace(0.5), scale=s)
        return head, lambda emb: (_cosine_logits(head.weight)(emb)).view(emb.shape[0], C, 3).max(dim=2).values
    elif method == "adaface":
        from marginkit.nn.adaptive import AdaFace

        head = AdaFace(C, E, scale=s)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return head, lambda emb: _cosine_logits(head.weight)(emb)


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def tar_at_far(emb: torch.Tensor, labels: torch.Tensor, far: float) -> float:
    """True accept rate at the threshold where a fraction ``far`` of impostor pairs is accepted.

    All pairs i < j; score = cosine similarity. The threshold is the ⌈far·N_imp⌉-th largest
    impostor score (accept: score > threshold).
    """
    e = F.normalize(emb.double(), dim=1)
    sim = e @ e.T
    iu = torch.triu_indices(len(labels), len(labels), offset=1)
    scores = sim[iu[0], iu[1]]
    same = labels[iu[0]] == labels[iu[1]]
    impostor, genuine = scores[~same], scores[same]
    k = max(1, math.ceil(far * impostor.numel()))
    threshold = torch.topk(impostor, k).values[-1]
    return float((genuine > threshold).double().mean())


@torch.no_grad()
def evaluate(model, logits_fn, data: DemoData) -> Dict[str, float]:
    model.eval()
    open_emb = model(data.open_x)
    closed_emb = model(data.closed_x)
    pred = logits_fn(closed_emb).argmax(dim=1)
    correct = (pred == data.closed_y).double()
    head_of_class, tail_of_class = _thirds(data.class_counts)
    head_cls, tail_cls = head_of_class[data.closed_y], tail_of_class[data.closed_y]
    return {
        "tar@far=1e-3": tar_at_far(open_emb, data.open_y, 1e-3),
        "tar@far=1e-2": tar_at_far(open_emb, data.open_y, 1e-2),
        "tail_acc": float(correct[tail_cls].mean()),
        "head_acc": float(correct[head_cls].mean()),
        "all_acc": float(correct.mean()),
    }


# -------------------------------------------------------------------------------------- training
def train_one(method: str, data: DemoData, cfg: TrainConfig, progress: bool = True) -> Dict[str, float]:
    torch.manual_seed(cfg.seed)  # the same network initialisation and batch order for every method
    C = data.class_counts.numel()
    n = data.train_y.numel()
    steps_per_epoch = max(1, n // cfg.batch_size)
    steps = steps_per_epoch * cfg.epochs
    model = EmbeddingNet(data.train_x.shape[1], cfg.hidden, cfg.embedding_dim)
    head, logits_fn = build_head(method, C, cfg, data.class_counts, steps)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    bar = _progress(steps, method, progress)
    start = time.perf_counter()
    model.train()
    head.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            loss = head(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    head.eval()
    result = {"method": method, **evaluate(model, logits_fn, data), "train_s": seconds}
    if isinstance(head, FairLoss):
        head_cls, tail_cls = _thirds(data.class_counts)
        m = head.class_margins.detach().cpu()
        result["_margin_head"] = float(m[head_cls].mean())
        result["_margin_tail"] = float(m[tail_cls].mean())
        result["_margin_levels"] = [int((m == lvl).sum()) for lvl in torch.tensor(head.margin_levels, dtype=m.dtype)]
    return result


def _thirds(class_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (C,) of the head third (most samples) and tail third of the classes."""
    C = class_counts.numel()
    rank = torch.empty(C, dtype=torch.int64)
    rank[torch.argsort(class_counts, descending=True, stable=True)] = torch.arange(C)
    return rank < C // 3, rank >= C - C // 3


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: plain runs without bars
        return None
    return tqdm(total=total, desc=f"{desc:>15}", leave=False, dynamic_ncols=True, mininterval=0.5)


def run_demo(
    data_cfg: DataConfig = DataConfig(),
    train_cfg: TrainConfig = TrainConfig(),
    methods=DEFAULT_METHODS,
    progress: bool = True,
) -> tuple[List[dict], DemoData]:
    """Train and evaluate every method; returns (rows, data). Rows hold the COLUMNS."""
    data = make_dataset(data_cfg)
    rows = [train_one(m, data, train_cfg, progress) for m in methods]
    for row in rows:
        row["seed"] = data_cfg.seed
    return rows, data


# ------------------------------------------------------------------------------------------ output
METRICS = COLUMNS[1:6]


def aggregate(rows: List[dict]) -> List[dict]:
    """Per method (in first-seen order): mean and std over seeds of every metric and train_s."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        agg = {"method": method, "seeds": len(rs)}
        for key in METRICS + ("train_s",):
            v = torch.tensor([float(r[key]) for r in rs], dtype=torch.float64)
            agg[key] = float(v.mean())
            agg[key + "_std"] = float(v.std(unbiased=False)) if len(rs) > 1 else 0.0
        out.append(agg)
    return out


def format_table(summary: List[dict]) -> str:
    """Markdown table of the per-method means (± std over seeds when there are several)."""
    header = ["method", "TAR@FAR=1e-3", "TAR@FAR=1e-2", "tail acc", "head acc", "all acc", "train s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in summary:
        cells = [r["method"]]
        for key in METRICS:
            cells.append(f"{r[key]:.3f}" + (f" ± {r[key + '_std']:.3f}" if r["seeds"] > 1 else ""))
        cells.append(f"{r['train_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: List[dict], summary: List[dict], path: str) -> None:
    """One row per (method, seed), then per method a 'mean' and a 'std' row."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("method", "seed") + METRICS + ("train_s",))
        for r in rows:
            w.writerow([r["method"], r["seed"]] + [f"{r[c]:.4f}" for c in METRICS] + [f"{r['train_s']:.2f}"])
        for r in summary:
            w.writerow([r["method"], "mean"] + [f"{r[c]:.4f}" for c in METRICS] + [f"{r['train_s']:.2f}"])
            w.writerow([r["method"], "std"] + [f"{r[c + '_std']:.4f}" for c in METRICS] + [f"{r['train_s_std']:.2f}"])


def write_plot(summary: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("tar@far=1e-3", "TAR @ FAR=1e-3 (unseen identities)"), ("tail_acc", "tail-third accuracy"),
               ("head_acc", "head-third accuracy")]
    names = [r["method"] for r in summary]
    fig, ax = plt.subplots(figsize=(max(7.5, 1.15 * len(summary) + 2), 4.4))
    width = 0.8 / len(metrics)
    for j, (key, label) in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(summary))]
        vals = [r[key] for r in summary]
        errs = [r[key + "_std"] for r in summary]
        bars = ax.bar(xs, vals, width, yerr=errs if any(errs) else None, capsize=2, label=label)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.015, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(summary)))
    ax.set_xticklabels(names, rotation=20)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


DEFAULT_DATA = DataConfig()
TINY_DATA = DataConfig(num_classes=40, max_per_class=30, zipf_exponent=0.8, test_per_class=2, open_classes=20, open_per_class=4)
TINY_TRAIN = TrainConfig(embedding_dim=16, hidden=64, epochs=2, batch_size=64, fair_update_every=3)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="marginkit demo",
        description="Train a small embedding network on a synthetic long-tailed identity set with several "
        "margin losses; report open-set TAR@FAR and head/tail closed-set accuracy.",
    )
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, or 'all'. Known: {', '.join(METHODS)} (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2",
                   help="comma-separated seeds; each seed draws its own dataset and initialisation (default: %(default)s)")
    p.add_argument("--classes", type=int, default=None, help="training identities (default 300)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per method (default 30)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the model is small, one thread is as fast and immune to "
                   "contention)")
    p.add_argument("--csv", default="demo_results.csv", help="where to write the results CSV (default: %(default)s)")
    p.add_argument("--plot", default="demo_results.png", help="where to write the PNG plot (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip the plot")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke version (tiny data, 2 epochs, seed 0)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    methods = METHODS if args.methods.strip() == "all" else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        print(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        print(f"--seeds must be comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    data_cfg, train_cfg = (TINY_DATA, TINY_TRAIN) if args.tiny else (DEFAULT_DATA, TrainConfig())
    if args.tiny and args.seeds == build_parser().get_default("seeds"):
        seeds = [0]
    if args.classes is not None:
        data_cfg = replace(data_cfg, num_classes=args.classes)
    if args.epochs is not None:
        train_cfg = replace(train_cfg, epochs=args.epochs)
    previous_threads = torch.get_num_threads()
    if args.threads and args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        t0 = time.perf_counter()
        rows = []
        for seed in seeds:
            data = make_dataset(replace(data_cfg, seed=seed))
            s = data.summary()
            counts = data.class_counts.sort(descending=True).values
            third = counts.numel() // 3
            print(
                f"seed {seed}: {s['classes']} training identities, {s['train_samples']} samples (Zipf exponent "
                f"{data_cfg.zipf_exponent}, largest class {s['largest_class']}; head third n >= {int(counts[third - 1])}, "
                f"tail third n <= {int(counts[-third])}); open set: {s['open_identities']} unseen identities x "
                f"{data_cfg.open_per_class}; torch threads: {torch.get_num_threads()}",
                flush=True,
            )
            for m in methods:
                row = train_one(m, data, replace(train_cfg, seed=seed), progress=not args.no_progress)
                row["seed"] = seed
                rows.append(row)
        total = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous_threads)
    summary = aggregate(rows)
    print(format_table(summary))
    fair = [r for r in rows if "_margin_head" in r]
    if fair:
        head_m = sum(r["_margin_head"] for r in fair) / len(fair)
        tail_m = sum(r["_margin_tail"] for r in fair) / len(fair)
        levels = [sum(r["_margin_levels"][i] for r in fair) / len(fair) for i in range(len(fair[0]["_margin_levels"]))]
        print(
            f"fairloss final class margins (mean over seeds): head third {head_m:.3f}, tail third {tail_m:.3f}; "
            f"classes per level 0.15/0.25/0.35/0.45: {' / '.join(f'{v:.0f}' for v in levels)}"
        )
    print(f"total time {total:.1f} s ({len(seeds)} seed(s) x {len(methods)} methods)")
    write_csv(rows, summary, args.csv)
    print(f"wrote {args.csv}")
    if not args.no_plot:
        write_plot(summary, args.plot, f"marginkit demo: long-tailed synthetic identities, mean over seeds {args.seeds if not args.tiny else 0}")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
