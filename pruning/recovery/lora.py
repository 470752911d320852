"""LoRA recovery after pruning (LLM-Pruner's post_training.py recipe, METHODS.md §3.1), merged back into the weights.

Why merged: the pruned model must stay one plain (heterogeneous) checkpoint that ``save_pruned`` writes and
``from_pretrained`` reloads without peft; ``merge_and_unload`` folds W + (α/r)·B·A into each projection and puts
the original ``nn.Linear`` modules back, so the model keeps its class, its adapter and its parameter count.

Recipe (defaults = LLM-Pruner's README/script): r 8, α 16, dropout 0.05 on q/k/v/o/gate/down/up, AdamW lr 1e-4
(β 0.9/0.999, ε 1e-8, no weight decay, grad-norm clip 1.0 as HF Trainer), linear schedule with 100 warmup steps,
2 epochs, batch 64 = micro-batch 4 × 16 accumulation, cutoff 256 tokens, Alpaca template with the prompt masked
(``train_on_inputs`` False), no EOS appended. Deliberate differences:
- the loss of one optimizer step is the mean over the *target tokens* of all its micro-batches (what HF Trainer
  does since 4.46 via ``num_items_in_batch``; the 4.28-era Trainer LLM-Pruner ran averaged per micro-batch);
- right padding (LLM-Pruner pads left; RoPE attention is relative, and right padding keeps real tokens at
  positions 0..n-1, so each sample's loss equals its unpadded loss);
- no best-checkpoint selection by validation loss (``val_size`` > 0 reports held-out loss before and after);
- float32 on CPU (LLM-Pruner's fp16=True fails there).
The record lists them (``differs_from_llm_pruner``).
Plain-text recovery (``data: c4``) trains on every token of each document, truncated to ``max_len``.
Evaluated text (WikiText-2, PTB) is refused by ``pruning.data``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from experiments.fileio import sha256_file
from pruning import data
from pruning.errors import PruningError
from pruning.models.adapter import adapter_for
from pruning.utils import eval_mode, input_device

IGNORE = -100  # label of tokens that carry no loss (masked prompt, padding)
DEVIATIONS = [
    "loss averaged over the target tokens of the whole accumulated batch",
    "right padding",
    "final adapter, no best-checkpoint selection",
    "float32 (no fp16)",
]  # see the module docstring
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # adapter getter names


@dataclass(frozen=True)
class LoRARecovery:
    """One validated recovery config; field defaults are LLM-Pruner's recipe (conf/recovery/lora_paper.yaml)."""

    name: str = "lora"
    data: str = "alpaca"  # alpaca | a .json/.jsonl of Alpaca records (instruction) | c4 (plain text)
    train_on_inputs: bool = False  # False: the Alpaca prompt carries no loss
    add_eos_token: bool = False
    max_samples: int | None = None  # first N records/documents of the file (None: all)
    val_size: int = 0  # held out (seeded) for a before/after validation loss
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 2
    max_steps: int | None = None  # optimizer steps; overrides epochs when set (cycles the data)
    micro_batch_size: int = 4
    grad_accum: int = 16
    max_len: int = 256
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    seed: int = 42

    @classmethod
    def from_cfg(cls, cfg) -> LoRARecovery:
        """Validate a Hydra node or dict: unknown keys and bad values fail here, before any training."""
        if cfg is None:
            raise PruningError("recovery config is missing")
        if not isinstance(cfg, dict):
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise PruningError(f"unknown recovery.lora keys {unknown}; choices: {', '.join(sorted(names))}")
        kw = dict(cfg)
        try:
            for key in ("r", "epochs", "micro_batch_size", "grad_accum", "max_len", "warmup_steps", "seed", "val_size"):
                if key in kw:
                    kw[key] = _as_int(kw[key], key)
            for key in ("max_steps", "max_samples"):
                if kw.get(key) is not None:
                    kw[key] = _as_int(kw[key], key)
            for key in ("alpha", "dropout", "lr", "weight_decay", "max_grad_norm"):
                if key in kw:
                    kw[key] = float(kw[key])
        except (TypeError, ValueError) as e:
            raise PruningError(f"recovery: {e}") from None
        if "target_modules" in kw:
            tm = kw["target_modules"]
            kw["target_modules"] = (tm,) if isinstance(tm, str) else tuple(tm)
        c = cls(**kw)
        c.check()
        return c

    def check(self) -> None:
        bad = [
            f"{k}={getattr(self, k)!r} (must be {rule})"
            for k, ok, rule in (
                ("name", self.name == "lora", "lora"),
                ("r", self.r >= 1, ">= 1"),
                ("alpha", self.alpha > 0, "> 0"),
                ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
                ("lr", self.lr > 0, "> 0"),
                ("weight_decay", self.weight_decay >= 0, ">= 0"),
                ("epochs", self.epochs >= 0, ">= 0"),
                ("max_steps", self.max_steps is None or self.max_steps >= 0, "null or >= 0"),
                ("max_samples", self.max_samples is None or self.max_samples >= 1, "null or >= 1"),
                ("val_size", self.val_size >= 0, ">= 0"),
                ("micro_batch_size", self.micro_batch_size >= 1, ">= 1"),
                ("grad_accum", self.grad_accum >= 1, ">= 1"),
                ("max_len", self.max_len >= 2, ">= 2"),
                ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                ("max_grad_norm", self.max_grad_norm >= 0, ">= 0 (0 = no clipping)"),
                (
                    "target_modules",
                    bool(self.target_modules) and set(self.target_modules) <= set(ROLES),
                    f"a non-empty subset of {', '.join(ROLES)}",
                ),
            )
            if not ok
        ]
        if bad:
            raise PruningError("recovery: " + "; ".join(bad))

    @property
    def instruction(self) -> bool:
        """Alpaca records (prompt/response apart) vs plain documents."""
        return self.data == "alpaca" or Path(self.data).suffix in (".json", ".jsonl")

    def source(self) -> Path:
        """The file the data comes from; raises (missing file, evaluated text) before the model is touched."""
        return data.instruction_records(self.data)[1] if self.instruction else data.calibration_source(self.data)


def _as_int(v, key: str) -> int:
    if isinstance(v, bool) or not float(v).is_integer():
        raise ValueError(f"{key} must be an integer, got {v!r}")
    return int(v)


def check_recovery(cfg) -> LoRARecovery:
    """Everything that can be checked without the model: config values, the data file and its size."""
    c = LoRARecovery.from_cfg(cfg)
    path = c.source()
    n = len(data.instruction_records(c.data)[0] if c.instruction else data.calibration_texts(c.data))
    n = min(n, c.max_samples or n)
    if c.val_size >= n:
        raise PruningError(
            f"recovery val_size={c.val_size} leaves no training examples: {path} gives {n} "
            f"records; lower recovery.val_size or supply more data (recovery.data=<file>)"
        )
    return c


# --------------------------------------------------------------------------------------------------- data


def tokenize_instruction(
    tokenizer, rec: dict, max_len: int, train_on_inputs: bool = False, add_eos_token: bool = False
) -> dict:
    """alpaca-lora's generate_and_tokenize_prompt: tokenise prompt+response (tokenizer defaults, so BOS; cut at
    max_len); without train_on_inputs the first len(tokenise(prompt)) labels are IGNORE."""
    ids = _tokenize(tokenizer, data.alpaca_prompt(rec), max_len, add_eos_token)
    labels = list(ids)
    if not train_on_inputs:
        n_prompt = len(_tokenize(tokenizer, data.alpaca_prompt(rec, response=False), max_len, False))
        labels = [IGNORE] * n_prompt + labels[n_prompt:]
    return {"input_ids": ids, "labels": labels[: len(ids)]}


def tokenize_text(tokenizer, text: str, max_len: int, add_eos_token: bool = False) -> dict:
    ids = _tokenize(tokenizer, text, max_len, add_eos_token)
    return {"input_ids": ids, "labels": list(ids)}


def _tokenize(tokenizer, text: str, max_len: int, add_eos: bool) -> list[int]:
    ids = tokenizer(text, truncation=True, max_length=max_len).input_ids
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and len(ids) < max_len and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


def _n_targets(ex: dict) -> int:
    # the label at position 0 is never predicted (labels are shifted by one)
    return sum(lab != IGNORE for lab in ex["labels"][1:])


def build_examples(tokenizer, c: LoRARecovery) -> tuple[list[dict], list[dict], dict]:
    """(train, val, data description for the record)."""
    path = c.source()
    if c.instruction:
        recs = data.instruction_records(c.data)[0]
        n_file = len(recs)
        recs = recs[: c.max_samples] if c.max_samples else recs
        examples = [tokenize_instruction(tokenizer, r, c.max_len, c.train_on_inputs, c.add_eos_token) for r in recs]
    else:
        texts = data.calibration_texts(c.data)
        n_file = len(texts)
        texts = texts[: c.max_samples] if c.max_samples else texts
        examples = [tokenize_text(tokenizer, t, c.max_len, c.add_eos_token) for t in texts]
    n_used = len(examples)
    n_truncated = sum(len(e["input_ids"]) >= c.max_len for e in examples)
    kept = [e for e in examples if _n_targets(e) > 0]  # a prompt that fills max_len leaves nothing to learn
    if not kept:
        raise PruningError(
            f"recovery: none of the {n_used} examples has a target token within max_len={c.max_len} "
            f"(the Alpaca prompt alone fills it); raise recovery.max_len"
        )
    if c.val_size >= len(kept):
        raise PruningError(
            f"recovery val_size={c.val_size} leaves no training examples ({len(kept)} usable in "
            f"{path}); lower recovery.val_size or supply more data (recovery.data=<file>)"
        )
    g = torch.Generator().manual_seed(c.seed)
    order = torch.randperm(len(kept), generator=g).tolist()
    val = [kept[i] for i in sorted(order[: c.val_size])]
    train = [kept[i] for i in sorted(order[c.val_size :])]
    info = {
        "dataset": c.data,
        "format": "instruction" if c.instruction else "text",
        "prompt_masked": bool(c.instruction and not c.train_on_inputs),
        "file": str(path),
        "sha256": sha256_file(path),
        "records_in_file": n_file,
        "records_used": n_used,
        "dropped_no_target": n_used - len(kept),
        "truncated": n_truncated,
        "n_train": len(train),
        "n_val": len(val),
        "train_tokens": sum(len(e["input_ids"]) for e in train),
        "train_target_tokens": sum(_n_targets(e) for e in train),
    }
    return train, val, info


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding: real tokens keep positions 0..n-1; padded positions get attention 0 and label IGNORE."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over target tokens, and their count (callers normalise over a whole step)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:].to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


# --------------------------------------------------------------------------------------------------- training


def target_module_names(model: nn.Module, roles) -> list[str]:
    """Fully qualified names of the projections the adapter reports, so no module path is hard-coded here."""
    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in adapter.layers:
        for role in roles:
            mod = getattr(adapter, role)(layer)
            if not isinstance(mod, nn.Linear) or id(mod) not in names:
                raise PruningError(
                    f"recovery: {role} of {type(layer).__name__} is {type(mod).__name__}, "
                    f"not an nn.Linear LoRA can wrap"
                )
            out.append(names[id(mod)])
    return out


def _steps_per_epoch(n_train: int, c: LoRARecovery) -> int:
    return math.ceil(math.ceil(n_train / c.micro_batch_size) / c.grad_accum)


def _optimizer_steps(train: list[dict], c: LoRARecovery, total: int):
    """Yield each optimizer step's micro-batches: a seeded reshuffle per epoch, the last step of an epoch may
    hold fewer micro-batches (as HF Trainer); cycles epochs until ``total`` steps."""
    g = torch.Generator().manual_seed(c.seed)
    done = 0
    while done < total:
        order = torch.randperm(len(train), generator=g).tolist()
        micro = [
            [train[i] for i in order[j : j + c.micro_batch_size]] for j in range(0, len(order), c.micro_batch_size)
        ]
        for j in range(0, len(micro), c.grad_accum):
            yield micro[j : j + c.grad_accum]
            done += 1
            if done == total:
                return


@torch.no_grad()
def mean_loss(model: nn.Module, examples: list[dict], c: LoRARecovery, pad_id: int, device) -> float | None:
    if not examples:
        return None
    total, n = 0.0, 0
    with eval_mode(model):
        for j in range(0, len(examples), c.micro_batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[j : j + c.micro_batch_size], pad_id).items()}
            s, k = token_loss_sum(model, batch)
            total, n = total + float(s), n + k  # no_grad: s has no graph
    return total / n


def recover(model: nn.Module, tokenizer, cfg, device=None, progress: bool = True, run_dir=None) -> dict:
    """LoRA-train the (pruned) model in place, merge, and return the record's ``recovery`` block.

    ``device`` is accepted for the cell's interface; the model is already placed, so inputs follow its embedding.
    """
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    c = check_recovery(cfg)
    adapter = adapter_for(model)
    params_before, cls_before = adapter.num_params(), type(model)
    train, val, info = build_examples(tokenizer, c)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = input_device(model)  # where inputs go, also under a multi-GPU device_map
    steps_per_epoch = _steps_per_epoch(len(train), c)
    total = c.max_steps if c.max_steps is not None else c.epochs * steps_per_epoch
    targets = target_module_names(model, c.target_modules)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    torch.manual_seed(c.seed)  # LoRA A init and dropout
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=c.r,
                lora_alpha=c.alpha,  # type: ignore[arg-type]  # peft annotates int; the scaling alpha / r takes a float
                lora_dropout=c.dropout,
                target_modules=targets,
                bias="none",
                task_type="CAUSAL_LM",
            ),
        )
    n_lora = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))
    if n_lora != len(targets):
        raise RuntimeError(f"peft wrapped {n_lora} modules, expected {len(targets)}")
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    losses: list[float] = []
    ok = False
    try:
        val_before = mean_loss(peft_model, val, c, pad_id, device)
        if total > 0:
            opt = torch.optim.AdamW(trainable, lr=c.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=c.weight_decay)
            sched = get_linear_schedule_with_warmup(opt, c.warmup_steps, total)
            peft_model.train()
            with tqdm(total=total, desc="recovery lora", unit="step", disable=not progress) as bar:
                for group in _optimizer_steps(train, c, total):
                    batches = [collate(mb, pad_id) for mb in group]
                    n_tok = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
                    step_loss = 0.0
                    for b in batches:
                        s, _ = token_loss_sum(peft_model, {k: v.to(device) for k, v in b.items()})
                        (s / n_tok).backward()
                        step_loss += float(s.detach()) / n_tok
                    if c.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(trainable, c.max_grad_norm)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(step_loss)
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
                    bar.update(1)
        val_after = mean_loss(peft_model, val, c, pad_id, device)
        ok = True
    finally:  # on error or interrupt the adapters are discarded, not merged: never leave lora modules behind
        merged = peft_model.merge_and_unload(safe_merge=True) if ok else peft_model.unload()
        for n, p in merged.named_parameters():
            p.requires_grad_(requires_grad.get(n, p.requires_grad))
        merged.eval()
    train_time = time.perf_counter() - t0

    if merged is not model or type(model) is not cls_before:
        raise RuntimeError("merge_and_unload did not return the model it was given")
    leftover = [n for n, _ in model.named_modules() if "lora_" in n] + [k for k in model.state_dict() if "lora_" in k]
    if leftover:
        raise RuntimeError(f"LoRA modules left after merging: {leftover[:3]}")
    params_after = adapter_for(model).num_params()
    if params_after != params_before:
        raise RuntimeError(f"parameter count changed by merging: {params_before} -> {params_after}")

    out = {
        "name": "lora",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(c).items()},
        "data": info,
        "steps": len(losses),
        "steps_per_epoch": steps_per_epoch,
        "epochs_done": round(len(losses) / steps_per_epoch, 4),
        "target_modules": len(targets),
        "trainable_params": n_trainable,
        "params": params_after,
        # single steps are noisy at small batches: the first/last epoch means are the comparable numbers
        "loss": {
            "initial": losses[0] if losses else None,
            "final": losses[-1] if losses else None,
            "first_epoch_mean": _mean(losses[:steps_per_epoch]),
            "last_epoch_mean": _mean(losses[-steps_per_epoch:]),
            "per_step": losses,
        },
        "val_loss": {"before": val_before, "after": val_after},
        "merged": True,
        "differs_from_llm_pruner": DEVIATIONS,
        "time_s": round(train_time, 3),
        "loss_curve": None,
    }
    if run_dir is not None and losses:
        out["loss_curve"] = plot_losses(losses, Path(run_dir) / "recovery_loss.png", val_before, val_after, info)
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def plot_losses(losses: list[float], path: Path, val_before=None, val_after=None, info=None) -> str | None:
    """Per-step training loss (Figure without pyplot: no global backend switch inside a library call)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:  # matplotlib is the optional "report" extra
        return None
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35 if len(losses) > 20 else 1.0, label="train (per step)")
    k = max(1, len(losses) // 10)
    if k > 1:
        windows = (losses[max(0, i - k + 1) : i + 1] for i in range(len(losses)))
        avg = [sum(w) / len(w) for w in windows]  # every window holds at least one loss
        ax.plot(steps, avg, color="tab:blue", label=f"train ({k}-step running mean)")
    if val_before is not None and val_after is not None:
        ax.plot([0, len(losses)], [val_before, val_after], "s--", color="tab:orange", label="validation (before/after)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / target token)")
    title = "LoRA recovery"
    if info:
        title += f": {info['dataset']} ({info['n_train']} examples)"
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return str(path)
