"""Training: teacher backbones, then split models (bottleneck + entropy model) by the Entropic Student recipe.

Stage 0 (``train_backbone``): the plain classifier, trained once per family.
Stage 1 (``train_split``, distillation): the tail is frozen and copied from the teacher; the bottleneck encoder,
entropy model and decoder learn to reproduce the teacher's split-point features under a rate penalty:
``loss = MSE(decoder(y~), teacher.head(x)) + beta * bpp``.
Stage 2 (``train_split``, fine-tune): the whole split model learns ``CE + KD(teacher) + beta * bpp``.

Every run is resumable: state is saved after each epoch beside the output as ``<out>.resume.pt`` and picked up
when the same command is run again; the final checkpoint is written atomically.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .backbones import Backbone, build_backbone, get_spec
from .checkpoint import atomic_torch_save, load_backbone_checkpoint, save_checkpoint
from .data import ImageSet, augment, load_image_folder, to_tensor


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in the checkpoint manifest)."""

    arch: str
    data: str
    out: str
    epochs: int = 12
    batch_size: int = 256
    lr: float = 0.2
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0
    threads: int | None = None
    limit: int | None = None
    val_data: str | None = None
    # split-model only
    prior: str | None = None
    beta: float | None = None
    teacher: str | None = None
    distill_epochs: int = 0
    adam_lr: float = 2e-3  # peak Adam rate of the bottleneck (encoder, decoder, hyper networks) end to end
    extra: dict = field(default_factory=dict)


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _epoch_batches(data: ImageSet, batch_size: int, gen: torch.Generator):
    order = torch.randperm(len(data), generator=gen).numpy()
    for i in range(0, len(order) - batch_size + 1, batch_size):  # drop last: BN-friendly, equal-sized steps
        idx = np.sort(order[i:i + batch_size])
        x = augment(to_tensor(data.images[idx]), gen)
        yield x.contiguous(memory_format=torch.channels_last), torch.from_numpy(data.labels[idx])


def _one_cycle(opt: torch.optim.Optimizer, max_lr: float | list[float], total: int
               ) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=max(total, 10), pct_start=0.25,
                                               anneal_strategy="linear")


def make_optimizers(cfg: TrainConfig, sgd_params: list, adam_params: list, epochs: int, steps_per_epoch: int,
                    adam_lr: float = 2e-3, density_params: list | None = None, density_lr: float = 1e-2
                    ) -> tuple[list, list]:
    """SGD-Nesterov (backbone convs + BN) and Adam (bottleneck and GDN; SGD with weight decay handles them badly),
    each on a one-cycle schedule. The density models get their own, larger Adam rate: from compressai's initial
    scale they must move far in log space, and at the bottleneck's rate they barely move in a 10-epoch budget
    (measured: 32.5 -> 31.6 bits/pixel over the first 100 steps)."""
    opts, scheds = [], []
    total = epochs * steps_per_epoch
    if sgd_params:
        sgd = torch.optim.SGD(sgd_params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
        opts.append(sgd)
        scheds.append(_one_cycle(sgd, cfg.lr, total))
    groups = [{"params": adam_params, "lr": adam_lr}] if adam_params else []
    if density_params:
        groups.append({"params": density_params, "lr": density_lr})
    if groups:
        adam = torch.optim.Adam(groups)
        opts.append(adam)
        scheds.append(_one_cycle(adam, [g["lr"] for g in groups], total))
    return opts, scheds


def run_epochs(cfg: TrainConfig, data: ImageSet, step: Callable[[torch.Tensor, torch.Tensor],
               tuple[torch.Tensor, dict[str, float]]], modules: list[torch.nn.Module], epochs: int, stage: str,
               train_mode: Callable[[], None], optimizers: list, schedulers: list) -> None:
    """Generic resumable loop shared by every training stage: state is saved after each epoch."""
    resume_path = Path(cfg.out).with_suffix(f".{stage}.resume.pt")
    steps_per_epoch = len(data) // cfg.batch_size
    start = 0
    gen = torch.Generator().manual_seed(cfg.seed)
    identity = {k: v for k, v in asdict(cfg).items() if k not in ("threads", "val_data", "extra")}
    if resume_path.exists():
        state = torch.load(resume_path, weights_only=False)
        if state.get("config", identity) != identity:
            changed = sorted(k for k in identity if state["config"].get(k) != identity[k])
            raise ValueError(f"{resume_path} was written by a run with other settings ({', '.join(changed)}); "
                             "rerun with the same flags or delete it to start over")
        for m, sd in zip(modules, state["modules"], strict=False):
            m.load_state_dict(sd)
        for o, sd in zip(optimizers, state["opts"], strict=False):
            o.load_state_dict(sd)
        for sc, sd in zip(schedulers, state["scheds"], strict=False):
            sc.load_state_dict(sd)
        gen.set_state(state["gen"])
        start = state["epoch"]
        print(f"resuming {stage} from epoch {start}/{epochs} ({resume_path})")
    for epoch in range(start, epochs):
        train_mode()
        bar = tqdm(_epoch_batches(data, cfg.batch_size, gen), total=steps_per_epoch,
                   desc=f"{stage} {epoch + 1}/{epochs}", dynamic_ncols=True, mininterval=5.0)
        t0, seen = time.time(), 0
        sums: dict[str, float] = {}
        for x, y in bar:
            loss, logs = step(x, y)
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in optimizers:
                o.step()
            for sc in schedulers:
                sc.step()
            seen += len(y)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v * len(y)
            speed = {"img/s": f"{seen / (time.time() - t0):.0f}"}
            bar.set_postfix({k: f"{v / seen:.3f}" for k, v in sums.items()} | speed)
        means = ", ".join(f"{k}={v / max(seen, 1):.4f}" for k, v in sums.items())
        print(f"{stage} epoch {epoch + 1}/{epochs}: {means}", flush=True)
        atomic_torch_save({"modules": [m.state_dict() for m in modules], "opts": [o.state_dict() for o in optimizers],
                           "scheds": [sc.state_dict() for sc in schedulers], "gen": gen.get_state(),
                           "epoch": epoch + 1, "config": identity}, resume_path)


def _steps(cfg: TrainConfig, data: ImageSet) -> int:
    steps = len(data) // cfg.batch_size
    if steps == 0:
        raise ValueError(f"dataset of {len(data)} images is smaller than one batch of {cfg.batch_size}")
    return steps


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: ImageSet, batch_size: int = 500) -> float:
    """Top-1 accuracy of a classifier (eval mode) on in-memory images."""
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        x = to_tensor(data.images[i:i + batch_size]).contiguous(memory_format=torch.channels_last)
        correct += (model(x).argmax(1).numpy() == data.labels[i:i + batch_size]).sum()
    return float(correct) / len(data)


def train_backbone(cfg: TrainConfig) -> dict:
    """Train a family's plain classifier (the teacher) and save it with its manifest."""
    _set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    spec = get_spec(cfg.arch)
    data = load_image_folder(cfg.data, spec.input_size, cfg.limit)
    model = build_backbone(cfg.arch, len(data.classes)).to(memory_format=torch.channels_last)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        return loss, {"loss": loss.item()}

    opts, scheds = make_optimizers(cfg, list(model.parameters()), [], cfg.epochs, _steps(cfg, data))
    run_epochs(cfg, data, step, [model], cfg.epochs, "backbone", model.train, opts, scheds)
    _cleanup_resume(cfg, ["backbone"])
    manifest = {"kind": "backbone", "arch": cfg.arch, "classes": data.classes, "dataset": str(cfg.data),
                "epochs": cfg.epochs, "train_config": asdict(cfg)}
    if cfg.val_data:
        manifest["accuracy"] = accuracy(model, load_image_folder(cfg.val_data, spec.input_size))
        manifest["val_data"] = str(cfg.val_data)
    save_checkpoint(cfg.out, model.state_dict(), manifest)
    return manifest


def _cleanup_resume(cfg: TrainConfig, stages: list[str]) -> None:
    for stage in stages:
        Path(cfg.out).with_suffix(f".{stage}.resume.pt").unlink(missing_ok=True)


def train_split(cfg: TrainConfig) -> dict:
    """Train a split model (bottleneck + entropy model + tail) with ``CE + beta * bpp``.

    With ``cfg.extra['init']`` (a split checkpoint, e.g. the FP model of the same family) the encoder, decoder and
    tail start from it; ``distill_epochs`` then first fits only the entropy model to the frozen encoder's latents
    (rate-only loss: the classifier is untouched, so this is cheap), before ``epochs`` of end-to-end fine-tuning.
    With ``cfg.teacher`` (a backbone checkpoint) the tail starts from the teacher and a KD term is added.
    """
    from .evaluate import finalize_split_model
    from .split import SplitModel, bits_per_pixel

    if cfg.prior not in ("fp", "mshp") or cfg.beta is None or cfg.beta < 0:
        raise ValueError("train_split needs prior in {fp, mshp} and beta >= 0")
    _set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    spec = get_spec(cfg.arch)
    data = load_image_folder(cfg.data, spec.input_size, cfg.limit)
    model = SplitModel(cfg.arch, cfg.prior, len(data.classes)).to(memory_format=torch.channels_last)
    pixels = spec.input_size ** 2
    init = cfg.extra.get("init")
    if init:
        from .checkpoint import read_checkpoint

        ck = read_checkpoint(init)
        own = model.state_dict()
        same_prior = ck["manifest"].get("prior") == cfg.prior  # then the entropy model carries over too
        shared = {k: v for k, v in ck["state_dict"].items()
                  if (same_prior or not k.startswith("entropy.")) and k in own and own[k].shape == v.shape}
        model.load_state_dict(shared, strict=False)
        print(f"initialised {len(shared)} tensors from {ck['path']}")
    teacher: Backbone | None = None
    if cfg.teacher:
        teacher, _ = load_backbone_checkpoint(cfg.teacher)
        teacher = teacher.to(memory_format=torch.channels_last).eval()
        if not init:
            model.tail.load_state_dict(teacher.tail.state_dict())
    steps = _steps(cfg, data)
    density = model.entropy.density_parameters()

    if cfg.distill_epochs > 0:
        for p in model.encoder.parameters():
            p.requires_grad_(False)

        def fit_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            with torch.no_grad():
                latent = model.encode_latent(x)
            bpp = bits_per_pixel(model.entropy(latent).likelihoods, pixels)
            return bpp, {"bpp": bpp.item()}

        opts, scheds = make_optimizers(cfg, [], model.entropy.network_parameters(), cfg.distill_epochs, steps,
                                       density_params=density)
        run_epochs(cfg, data, fit_step, [model], cfg.distill_epochs, "fit-prior", model.train, opts, scheds)
        for p in model.encoder.parameters():
            p.requires_grad_(True)

    bottleneck = [p for m in (model.encoder, model.decoder) for p in m.parameters()]
    bottleneck += model.entropy.network_parameters()
    tail = list(model.tail.parameters())

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(x)
        ce = F.cross_entropy(out.logits, y, label_smoothing=cfg.label_smoothing)
        bpp = bits_per_pixel(out.likelihoods, pixels)
        loss = ce + cfg.beta * bpp
        logs = {"ce": ce.item(), "bpp": bpp.item()}
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
            kd = F.kl_div(F.log_softmax(out.logits, 1), F.softmax(t_logits, 1), reduction="batchmean")
            loss = loss + kd
            logs["kd"] = kd.item()
        logs["acc"] = (out.logits.argmax(1) == y).float().mean().item()
        return loss, logs

    opts, scheds = make_optimizers(cfg, tail, bottleneck, cfg.epochs, steps, adam_lr=cfg.adam_lr,
                                   density_params=density)
    run_epochs(cfg, data, step, [model], cfg.epochs, "split", model.train, opts, scheds)
    manifest = finalize_split_model(model, cfg, data.classes)
    _cleanup_resume(cfg, ["fit-prior", "split"])
    return manifest
