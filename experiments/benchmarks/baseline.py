"""The PyTorch + transformers side of the benchmark: the same model, weights, batch, strategy and AdamW
(weight decay 0.01, gradient clipping at 1.0), eager or under `torch.compile` (default or max-autotune), in
float32 or bfloat16 autocast. Imports no JAX (a memory-measuring process holds only its own framework)."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from torch import nn

from experiments.benchmarks.cases import COMPILERS, FROZEN_LAYERS, variant_name

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraLinear(nn.Module):
    """base(x) + (alpha / r) * B(A(x)) with A random and B zero, as sft_jax.models.lora initialises them."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_a = nn.Parameter(torch.randn(base.in_features, rank) / rank)
        self.lora_b = nn.Parameter(torch.zeros(rank, base.out_features))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a @ self.lora_b) * self.scale


class MeanPoolClassifier(nn.Module):
    """BertModel -> masked mean over tokens -> dropout 0.1 -> linear, like sft_jax's EncoderClassifier."""

    def __init__(self, encoder, num_labels: int = 2):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head(self.dropout(pooled))


def smollm2_hf_dir(cache: str) -> str:
    """SmolLM2 exported once by sft_jax.export_hf from the same GGUF the JAX side loads (identical weights)."""
    path = os.path.join(cache, "smollm2_hf")
    if not os.path.exists(os.path.join(path, "config.json")):
        from sft_jax.models.loading.lm import export_hf, load_decoder

        lm, _ = load_decoder("smollm2-135m-instruct")
        export_hf(lm, path)
    return path


def _freeze(model: nn.Module, trainable) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))


class TorchStep:
    """One PyTorch train step per `step()`; `autocast` runs it in bfloat16 autocast (float32 master weights).
    `model_dir`: the same architecture from another directory (a tiny one in the smoke test)."""

    def __init__(self, model: str, strategy: str, batch: dict[str, np.ndarray], device: str, cache: str,
                 model_dir: str | None = None):
        import transformers

        self.device, self.kind = device, model
        if model == "minilm":
            from sft_jax.models.registry import resolve_model_dir

            encoder = transformers.BertModel.from_pretrained(model_dir or str(resolve_model_dir("minilm-l6")),
                                                             add_pooling_layer=False, attn_implementation="sdpa")
            net = MeanPoolClassifier(encoder)
            frozen_below = FROZEN_LAYERS["minilm"]
            rules = {"full": lambda n: True, "head": lambda n: n.startswith("head."),
                     "partial": lambda n: not n.startswith("encoder.embeddings.") and not any(
                         n.startswith(f"encoder.encoder.layer.{i}.") for i in range(frozen_below))}
        else:
            net = transformers.LlamaForCausalLM.from_pretrained(model_dir or smollm2_hf_dir(cache), dtype=torch.float32,
                                                                attn_implementation="sdpa")
            frozen_below = FROZEN_LAYERS["smollm2"]
            if strategy == "head":  # untied, as sft_jax's build_lm does: the LM head learns on its own copy
                head = nn.Linear(net.config.hidden_size, net.config.vocab_size, bias=False)
                head.weight = nn.Parameter(net.model.embed_tokens.weight.detach().clone())
                net.lm_head = head
                net.config.tie_word_embeddings = False
            if strategy == "lora":
                for layer in net.model.layers:
                    for parent in (layer.self_attn, layer.mlp):
                        for name in LORA_TARGETS:
                            if hasattr(parent, name):
                                setattr(parent, name, LoraLinear(getattr(parent, name)))
            rules = {"full": lambda n: True, "head": lambda n: n.startswith(("lm_head.", "model.norm.")),
                     "lora": lambda n: "lora_" in n,
                     "partial": lambda n: not n.startswith("model.embed_tokens.") and not any(
                         n.startswith(f"model.layers.{i}.") for i in range(frozen_below))}
        _freeze(net, rules[strategy])
        self.net = net.to(device).train()
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
        self.batch = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}
        self.autocast = False

    def _loss(self, net):
        b = self.batch
        if self.kind == "minilm":
            logits = net(b["input_ids"].long(), b["attention_mask"].long())
            return nn.functional.cross_entropy(logits.float(), b["labels"].long())
        logits = net(input_ids=b["input_ids"].long()).logits
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), b["targets"].long().flatten())

    def step(self, net: nn.Module | None = None, autocast: bool | None = None) -> float:
        """One step through `net` (default: the eager model; a `torch.compile` wrapper of it shares its
        parameters) in bfloat16 autocast if `autocast` (default: the attribute)."""
        autocast = self.autocast if autocast is None else autocast
        ctx = (torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16) if autocast
               else contextlib.nullcontext())
        self.opt.zero_grad(set_to_none=True)
        with ctx:
            loss = self._loss(self.net if net is None else net)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        value = float(loss.detach())  # waits for the step (synchronises on GPU)
        return value


class TorchVariant:
    """One way of running a TorchStep: `compiler` (a COMPILERS key) in `dtype` (float32, or bfloat16 autocast
    over float32 weights). The variants of one TorchStep share its weights and optimizer state: a step's time
    does not depend on their values, and the model is held once."""

    def __init__(self, torch_step: TorchStep, compiler: str, dtype: str):
        self.torch_step, self.compiler, self.dtype = torch_step, compiler, dtype
        mode = COMPILERS[compiler]
        # Compilation is lazy: a compiler that fails on this CPU fails in the first step()
        self.net = torch_step.net if mode is None else torch.compile(torch_step.net, mode=mode)

    @property
    def name(self) -> str:
        return variant_name(self.compiler, self.dtype)

    def step(self) -> float:
        return self.torch_step.step(self.net, autocast=self.dtype == "bfloat16")


def torch_matmul_peak(dtype: str, n: int, device: str, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n torch matmul (for reference next to the JAX-measured peak)."""
    import time

    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    a, b = torch.randn(n, n, dtype=dt, device=device), torch.randn(n, n, dtype=dt, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best
