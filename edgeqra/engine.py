"""The fast tuning engine: one LoRA model and one captured training step reused by every evaluation.

Why it exists (issue 16): an eager PEFT step of SmolLM2-135M at batch 4 × 256 costs ~220 ms
on an H200 while its arithmetic needs ~2 ms; the step is bound by Python and by ~3,000
kernel launches (210 LoRA modules, AdamW over 420 small tensors). Measured there, only CUDA
graphs reach the target, and graphs need static shapes and static addresses, so this engine
makes everything static for a whole search:

* **Ranks padded to one width.** Every targeted linear gets one LoRA of rank ``max_rank``
  (PEFT, attached once). A unit of rank r uses the first r rows of A and columns of B; the
  rest are zero, and they stay exactly zero: their gradients are B_padᵀ·g·xᵀ = 0 and
  g·(A_pad·x)ᵀ = 0, AdamW turns a zero gradient into a zero update, weight decay keeps zero
  at zero. Rank 0 is all zeros. Because ``lora_alpha = alpha_ratio · r`` the scale α/r is the
  same for every rank, so one padded module computes exactly the unpadded one's output.
  The first r rows of A are drawn as PEFT would draw them (:func:`peft_lora_init`), so a run
  here follows the eager reference (:func:`edgeqra.tune.tune`) step for step.
* **Base weights swapped in place.** ``Bank.assemble`` copies each config's dequantized
  weights into the same dense tensors, so bit-widths change no address either.
* **Training rows on the device once**, trimmed to the longest row (right padding and causal
  attention: the padding columns after every row's last token change no real token's
  logits, so dropping them, and the attention mask, is exact).
* **One CUDA graph** of forward, loss, backward, clipping (foreach) and AdamW
  (``capturable``, learning rate as a device tensor for the warmup) per (batch, length),
  captured at the first evaluation and replayed by every later one. The loss is kept on the
  device; the host reads it every ``check_every`` steps for the non-finite-loss stop.

Trade-off, stated: capture costs a few eager warm-up steps plus the capture itself, once per
search (seconds), against ~200 ms saved per step; padding to the largest rank costs LoRA
FLOPs a 135M model does not notice on a GPU (launch-bound) but a CPU would, so on CPU the
engine runs the same padded step eagerly (for the tests) and the pipeline keeps the eager
reference there. Dropout > 0 and activation checkpointing are not captured: those runs use
the reference path.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeqra.errors import ConfigError
from edgeqra.gptq import import_gptqmodel
from edgeqra.models import Unit
from edgeqra.space import Config
from edgeqra.tune import (
    TARGETS,
    TrainBatches,
    TrainLog,
    TuneSettings,
    _completion_loss,
    _learning_rate,
    _row_order,
    _seeded,
    lora_config,
)

__all__ = ["EngineSettings", "GraphLoRA", "engine_supports", "peft_lora_init"]

log = logging.getLogger(__name__)

_ADAPTER = "default"


@dataclass(frozen=True)
class EngineSettings:
    """How the fast engine runs; none of these changes the numbers beyond float rounding."""

    max_rank: int = 32  # every adapter is padded to this rank (the space's largest)
    graphs: bool = True  # capture the step in a CUDA graph (CUDA only; eager otherwise)
    check_every: int = 16  # steps between host reads of the loss (non-finite stop)
    warmup_steps: int = 3  # eager steps before capture (cuBLAS / autograd lazy init)
    compile: bool = False  # torch.compile the training forward + loss (fuses small kernels)

    def __post_init__(self) -> None:
        for name in ("max_rank", "check_every", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"`{name}` must be an integer >= 1, got {value!r}")


def engine_supports(settings: TuneSettings) -> bool:
    """Whether the captured engine can run these settings (no dropout, no checkpointing)."""
    return settings.dropout == 0 and not settings.gradient_checkpointing


def peft_lora_init(
    linears: Sequence[tuple[str, int, int]], ranks: dict[str, int], seed: int
) -> dict[str, torch.Tensor]:
    """Each module's LoRA A as PEFT draws it under ``seed``: name -> (r, d_in) float32.

    PEFT (0.21, ``LoraLayer.update_layer``) builds ``nn.Linear(d_in, r)`` (kaiming-uniform
    init of A), then ``nn.Linear(r, d_out)`` (init of B), then ``reset_lora_parameters``
    draws A again and zeroes B, module by module in ``named_modules`` order, from the CPU
    generator that :func:`edgeqra.tune.attach_lora` seeds. Replaying those draws gives PEFT's
    A without building PEFT modules; ``tests/test_engine.py`` checks it against PEFT itself.

    Args:
        linears: (full name, d_in, d_out) of every targeted linear, in module order.
        ranks: full name -> rank; names with rank 0 (or absent) get no draws, as in PEFT.
        seed: ``TuneSettings.seed``.
    """
    out: dict[str, torch.Tensor] = {}
    with _seeded(torch.device("cpu"), seed):
        for name, d_in, d_out in linears:
            r = ranks.get(name, 0)
            if r <= 0:
                continue
            a = torch.empty(r, d_in)  # (r, d_in), nn.Linear(d_in, r).weight
            b = torch.empty(d_out, r)  # (d_out, r), nn.Linear(r, d_out).weight
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # reset_lora_parameters
            out[name] = a
    return out


class GraphLoRA:
    """A model with padded-rank LoRA on every target and a (captured) step, reused per config.

    Lifecycle: ``GraphLoRA(model, units, alpha_ratio)`` attaches PEFT once; each evaluation
    calls :meth:`train` (which resets the adapters and optimizer for the config, then runs
    N steps), scores :attr:`model`, and may :meth:`save_adapter`; :meth:`close` unloads PEFT.
    """

    def __init__(
        self,
        model: nn.Module,
        units: Sequence[Unit],
        alpha_ratio: float,
        settings: EngineSettings = EngineSettings(),
    ) -> None:
        import_gptqmodel()
        from peft import LoraConfig, get_peft_model

        self.units = tuple(units)
        self.settings = settings
        self.alpha_ratio = alpha_ratio
        self._linears: list[tuple[str, int, int]] = []
        self._unit_of: dict[str, int] = {}
        target_names = []
        for unit in self.units:
            for lin in unit.linears:
                if lin.name.rsplit(".", 1)[-1] in TARGETS:
                    target_names.append(lin.name)
                    self._unit_of[lin.name] = unit.index
        if not target_names:
            raise ConfigError(f"no linear named one of {list(TARGETS)}: nothing to attach LoRA to")
        wanted = set(target_names)
        # named_modules order = the order PEFT creates (and draws) adapters in.
        for name, module in model.named_modules():
            if name in wanted:
                self._linears.append((name, module.in_features, module.out_features))
        r = settings.max_rank
        config = LoraConfig(
            r=r,
            lora_alpha=alpha_ratio * r,
            lora_dropout=0.0,
            target_modules=target_names,
            bias="none",
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings():
            # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`.
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            self.model = get_peft_model(model, config, autocast_adapter_dtype=True)
        base = self.model.get_base_model()
        self._a: dict[str, torch.Tensor] = {}
        self._b: dict[str, torch.Tensor] = {}
        for name, _, _ in self._linears:
            layer = base.get_submodule(name)
            self._a[name] = layer.lora_A[_ADAPTER].weight  # (max_rank, d_in)
            self._b[name] = layer.lora_B[_ADAPTER].weight  # (d_out, max_rank)
            if layer.scaling[_ADAPTER] != alpha_ratio:
                raise ConfigError(f"PEFT scaled `{name}` by {layer.scaling[_ADAPTER]}")
        self.params = [t for name, _, _ in self._linears for t in (self._a[name], self._b[name])]
        self.device = self.params[0].device
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key: tuple[object, ...] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._opt_key: float | None = None
        self._data_key: int | None = None
        self._static_ids: torch.Tensor | None = None
        self._static_labels: torch.Tensor | None = None
        self.capture_seconds = 0.0  # time spent warming up and capturing, summed
        # Static shapes only (dynamic=False): one compile per (batch, width), done in warm-up.
        self._loss_fn = torch.compile(self._loss, dynamic=False) if settings.compile else self._loss

    # ------------------------------------------------------------ per-config state

    def ranks(self, config: Config) -> dict[str, int]:
        """Full linear name -> the config's rank for its unit (0 = no adapter)."""
        if len(config) != len(self.units):
            raise ConfigError(
                f"config has {len(config)} units but the model has {len(self.units)}; "
                f"give one `bits/rank` per decoder layer ({len(self.units)} items)"
            )
        out = {}
        for name, _, _ in self._linears:
            rank = config[self._unit_of[name]].rank
            if rank > self.settings.max_rank:
                raise ConfigError(
                    f"rank {rank} is above the engine's `max_rank`={self.settings.max_rank}"
                )
            out[name] = rank
        return out

    @torch.no_grad()
    def reset(self, config: Config, seed: int) -> None:
        """Write the config's initial adapters (PEFT's draws, zero padding) into the padded ones."""
        ranks = self.ranks(config)
        init = peft_lora_init(self._linears, ranks, seed)
        for name, _, _ in self._linears:
            a, b = self._a[name], self._b[name]
            full = torch.zeros(a.shape, dtype=a.dtype)  # (max_rank, d_in)
            if name in init:
                full[: ranks[name]] = init[name]
            a.copy_(full, non_blocking=True)
            b.zero_()

    # ------------------------------------------------------------ the step

    def _make_optimizer(self, settings: TuneSettings) -> torch.optim.Optimizer:
        """AdamW over the padded adapters; capturable with a tensor lr on CUDA (graph-safe)."""
        cuda = self.device.type == "cuda"
        kwargs: dict[str, object] = {"betas": (0.9, 0.999), "weight_decay": settings.weight_decay}
        if cuda:
            kwargs.update(
                lr=torch.tensor(settings.lr, device=self.device), capturable=True, fused=True
            )
        else:
            kwargs.update(lr=settings.lr)
        return torch.optim.AdamW(self.params, **kwargs)

    def _reset_optimizer(self, settings: TuneSettings) -> torch.optim.Optimizer:
        """The optimizer with fresh state (same tensors when it already exists: graph-safe)."""
        key = settings.weight_decay  # the only optimizer setting a search may vary
        if self._optimizer is None or self._opt_key != key:
            self._optimizer = self._make_optimizer(settings)
            self._opt_key = key
            self._graph = None  # a graph holds the old optimizer's tensors
        opt = self._optimizer
        for state in opt.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()
        return opt

    def _set_lr(self, opt: torch.optim.Optimizer, lr: float) -> None:
        """Set the learning rate in place (a device tensor under a graph)."""
        for group in opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def _load_rows(self, batches: TrainBatches) -> None:
        """Training rows on the device, trimmed to the longest real row (exact: see module doc)."""
        if self._data_key == id(batches):
            return
        width = int(batches.attention_mask.sum(dim=1).max())
        width = min(batches.input_ids.shape[1], max(2, -(-width // 8) * 8))  # multiple of 8
        self._ids = batches.input_ids[:, :width].to(self.device)  # (n, width)
        self._labels = batches.labels[:, :width].to(self.device)  # (n, width)
        self._data_key = id(batches)
        self._graph = None  # shapes changed

    def _loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch (what ``compile`` compiles; scoring stays eager)."""
        logits = self.model(input_ids=input_ids, use_cache=False).logits  # (bs, width, vocab)
        return _completion_loss(logits, labels)

    def _step(self, opt: torch.optim.Optimizer, max_grad_norm: float) -> torch.Tensor:
        """Forward, loss, backward, clip, AdamW on the static batch; returns the loss tensor."""
        loss = self._loss_fn(self._static_ids, self._static_labels)
        loss.backward()
        if math.isfinite(max_grad_norm):
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm, foreach=True)
        opt.step()
        return loss.detach()

    def _capture(self, opt: torch.optim.Optimizer, settings: TuneSettings) -> None:
        """Warm up on a side stream, then capture one step (its state is reset afterwards)."""
        start = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.settings.warmup_steps):
                opt.zero_grad(set_to_none=True)
                self._step(opt, settings.max_grad_norm)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # grads are then allocated inside the graph's pool
        with torch.cuda.graph(graph):
            self._static_loss = self._step(opt, settings.max_grad_norm)
        torch.cuda.synchronize(self.device)
        self._graph = graph
        self._graph_key = (tuple(self._static_ids.shape), settings.max_grad_norm)
        self.capture_seconds += time.perf_counter() - start
        log.info("captured the LoRA step in %.2fs", time.perf_counter() - start)

    def train(self, config: Config, batches: TrainBatches, settings: TuneSettings) -> TrainLog:
        """Reset the adapters for ``config`` and train ``settings.steps`` steps; eval mode after.

        Same data order, learning rates and initial adapters as :func:`edgeqra.tune.tune`.
        A non-finite loss stops training within ``check_every`` steps; the log ends at it.
        """
        if not engine_supports(settings):
            raise ConfigError(
                "the fast engine runs no dropout and no gradient checkpointing; use the eager "
                "path (`edgeqra.tune.tune`) for these settings"
            )
        self.reset(config, settings.seed)
        ranks = self.ranks(config)
        trained = sum(ranks[name] * (d_in + d_out) for name, d_in, d_out in self._linears)
        if settings.steps == 0 or trained == 0:
            self.model.eval()
            return TrainLog((), 0.0, trained)
        self._load_rows(batches)
        bs = settings.batch_size
        order = _row_order(len(batches), settings.steps * bs, settings.seed)
        order = order.view(settings.steps, bs).to(self.device)  # (steps, bs)
        shape = (bs, self._ids.shape[1])
        if self._static_ids is None or tuple(self._static_ids.shape) != shape:
            self._static_ids = self._ids[:bs].clone()  # (bs, width): the graph's input
            self._static_labels = self._labels[:bs].clone()  # (bs, width)
            self._graph = None
        use_graph = self.settings.graphs and self.device.type == "cuda"
        opt = self._reset_optimizer(settings)
        self.model.train()
        if use_graph and (
            self._graph is None
            or self._graph_key != (tuple(self._static_ids.shape), settings.max_grad_norm)
        ):
            self._capture(opt, settings)
            self.reset(config, settings.seed)  # the warm-up steps moved the adapters
            opt = self._reset_optimizer(settings)
        losses = torch.full((settings.steps,), float("nan"), device=self.device)
        done = settings.steps
        start = time.perf_counter()
        try:
            for step in range(settings.steps):
                torch.index_select(self._ids, 0, order[step], out=self._static_ids)
                torch.index_select(self._labels, 0, order[step], out=self._static_labels)
                self._set_lr(opt, _learning_rate(step, settings))
                if use_graph:
                    self._graph.replay()
                    losses[step].copy_(self._static_loss)
                else:
                    opt.zero_grad(set_to_none=True)
                    losses[step].copy_(self._step(opt, settings.max_grad_norm))
                last = step + 1 == settings.steps
                if (step + 1) % self.settings.check_every == 0 or last:
                    seen = losses[: step + 1]
                    if not bool(torch.isfinite(seen).all()):
                        done = int((~torch.isfinite(seen)).nonzero()[0]) + 1
                        log.warning(
                            "LoRA loss is %s at step %d of %d: stopping; the quantized base may "
                            "be broken at this bit-width, or lower `lr`",
                            float(seen[done - 1]),
                            done - 1,
                            settings.steps,
                        )
                        break
            values = losses[:done].tolist()  # the one sync of the run
        finally:
            seconds = time.perf_counter() - start
            if not use_graph and self._optimizer is not None:
                self._optimizer.zero_grad(set_to_none=True)
            self.model.eval()
        return TrainLog(tuple(values), seconds, trained)

    # ------------------------------------------------------------ outputs

    @torch.no_grad()
    def save_adapter(self, config: Config, settings: TuneSettings, out: Path) -> None:
        """Write the trained adapters at the config's own ranks as a PEFT adapter folder.

        The keys are PEFT's own (``get_peft_model_state_dict`` of the padded model), sliced to
        each module's rank; the config is :func:`edgeqra.tune.lora_config`'s, so the folder is
        what the eager path would save and ``PeftModel.from_pretrained`` loads it.
        """
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        peft_config = lora_config(self.units, config, settings)
        if peft_config is None:
            return
        ranks = self.ranks(config)
        state = get_peft_model_state_dict(self.model)
        sliced = {}
        for key, tensor in state.items():
            module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            r = ranks.get(module, 0)
            if r == 0:
                continue
            part = tensor[:r] if ".lora_A." in key else tensor[:, :r]  # A (r, d_in), B (d_out, r)
            sliced[key] = part.detach().to("cpu").contiguous()
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        peft_config.base_model_name_or_path = getattr(
            self.model.peft_config[_ADAPTER], "base_model_name_or_path", None
        )
        peft_config.save_pretrained(str(out))
        save_file(sliced, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})

    def close(self) -> nn.Module:
        """Remove the adapters (no merge) and give the base model back, in eval mode."""
        self._graph = None
        self._optimizer = None
        base = self.model.unload()
        return base.eval()
