"""Matched baselines for Cola DLM (issue 6): an autoregressive LM and a masked diffusion LM.

Both share with Cola the tokenizer (vaes/tokenizer.py), the data pipeline (packed prose rows
from unified/data/streams.py) and the trainer (unified/training/trainer.py, `model.kind = "ar" | "mdlm"`, one
stage). The network is a transformers `LlamaForCausalLM` (RMSNorm, RoPE, SwiGLU, SDPA) sized by
`[model]` to Cola's parameter count (within 10%, `matched_depth`); packed samples are kept apart
by a 4-D boolean attention mask built from the rows' sample ids, exactly as in the VAE.

- `ARModel`: next-token cross-entropy on packed rows; decoding with transformers' KV-cached
  `generate`. It is also the *judge* of generative perplexity (`nll`).
- `MDLMModel` (MDLM, Sahoo et al. 2024; LLaDA, Nie et al. 2025): an absorbing-state discrete
  diffusion. Training draws t ~ U(eps, 1] per sample (stratified over the batch), replaces each
  token by <mask> with probability t and minimizes the ELBO
      L = E_t [ 1/t * sum_{masked i} -log p(x_i | x_t) ] / (valid tokens),
  with bidirectional attention inside each sample. Sampling is LLaDA's block-wise
  semi-autoregressive scheme: the answer is a canvas of <mask> tokens; each block of
  `block_size` is denoised in `steps` forward passes, each committing the most confident
  predictions of its still-masked tokens ("low-confidence remasking"); earlier blocks stay
  fixed. No KV cache: every step re-runs the whole canvas (its attention is bidirectional).

A saved baseline is a folder: baseline.json (its kind), net/ (the transformers model:
config.json + model.safetensors) and tokenizer/. `load_model` opens a Cola or baseline folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from unified.layout import per_sample_table
from vaes.text_vae import causal_mask
from vaes.tokenizer import load_tokenizer

BASELINE_FILE = "baseline.json"
KINDS = ("ar", "mdlm")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """[bos] + the prompt's ids, tokenized as Cola's engine and training documents are."""
    body = tokenizer.encode(prompt, add_special_tokens=False, split_special_tokens=True) \
        if prompt.strip() else []
    return [tokenizer.bos_token_id, *body]


def bidirectional_mask(sample_ids: torch.Tensor) -> torch.Tensor:
    """[B, L, L]: same (non-padding) sample; padding rows attend everywhere (no NaN)."""
    m = (sample_ids[:, :, None] == sample_ids[:, None, :]) & (sample_ids[:, None, :] >= 0)
    return m | ~m.any(-1, keepdim=True)


def llama_params(vocab: int, width: int, depth: int, intermediate: int) -> int:
    """Parameters of an untied LlamaForCausalLM (embeddings, attention, SwiGLU, RMSNorms, head)."""
    per_layer = 4 * width * width + 3 * width * intermediate + 2 * width
    return 2 * vocab * width + width + depth * per_layer


def matched_depth(target: int, vocab: int, width: int, intermediate: int) -> int:
    """Depth whose parameter count is closest to `target` (e.g. Cola's VAE + prior)."""
    per_layer = llama_params(vocab, width, 1, intermediate) - llama_params(vocab, width, 0,
                                                                            intermediate)
    return max(1, round((target - llama_params(vocab, width, 0, intermediate)) / per_layer))


def llama_config(vocab: int, width: int, depth: int, heads: int, intermediate: int, tokenizer=None,
                 max_len: int = 4096):
    from transformers import LlamaConfig

    special = {} if tokenizer is None else dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    return LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate,
                       num_hidden_layers=depth, num_attention_heads=heads,
                       num_key_value_heads=heads, max_position_embeddings=max_len,
                       tie_word_embeddings=False, attn_implementation="sdpa", **special)


class _Baseline(nn.Module):
    """A transformers Llama and the shared tokenizer; save/load as safetensors + JSON."""

    kind = ""

    def __init__(self, net, tokenizer):
        super().__init__()
        self.net, self.tokenizer = net, tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def logits(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        """Logits [B, L, V] of ids [B, L] under a boolean mask [B, L, L] (True = may attend)."""
        return self.net(input_ids=ids, attention_mask=mask[:, None], position_ids=positions,
                        use_cache=False).logits

    def save_pretrained(self, folder: str | Path, weights: bool = True) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if weights:
            self.net.save_pretrained(folder / "net")
        else:
            self.net.config.save_pretrained(folder / "net")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        (folder / BASELINE_FILE).write_text(json.dumps({"kind": self.kind}, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu"):
        from transformers import LlamaForCausalLM

        folder = Path(folder)
        net = LlamaForCausalLM.from_pretrained(folder / "net", attn_implementation="sdpa")
        return cls(net, load_tokenizer(folder / "tokenizer")).to(device=device,
                                                                  dtype=torch.float32).eval()


class ARModel(_Baseline):
    """Autoregressive transformer LM (causal attention within each packed sample)."""

    kind = "ar"

    def forward(self, batch: dict, stage: int, w=None, generator=None):
        """(mean next-token cross-entropy over the rows' valid pairs, logs)."""
        rows = batch["text"]
        ids, s, pos = rows["input_ids"], rows["sample_ids"], rows["positions"]
        logits = self.logits(ids, causal_mask(s, pos, s, pos), pos)  # [B, L, V]
        target, ok = ids[:, 1:], (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)  # same sample
        ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(),
                             reduction="none").view_as(target)
        n = ok.sum().clamp_min(1)
        loss = (ce * ok).sum() / n
        acc = ((logits[:, :-1].argmax(-1) == target) & ok).sum() / n
        return loss, {"ce": loss.detach(), "acc": acc.detach()}

    def _left_padded(self, prompts: list[list[int]]):
        b, lmax = len(prompts), max(map(len, prompts))
        ids = torch.full((b, lmax), self.tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros(b, lmax, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, lmax - len(p):], att[r, lmax - len(p):] = torch.tensor(p), 1
        return ids.to(self.device), att.to(self.device)

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, *,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                     ignore_eos: bool = False) -> list[list[int]]:
        """New token ids per prompt (KV-cached decoding, transformers `generate`), cut at EOS.
        `ignore_eos` generates exactly `max_new_tokens` (benchmarks)."""
        from transformers import GenerationConfig

        ids, att = self._left_padded(prompts)
        eos = self.tokenizer.eos_token_id
        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or None,
                        top_p=top_p) if temperature > 0 else dict(do_sample=False)
        cfg = GenerationConfig(max_new_tokens=max_new_tokens,
                               min_new_tokens=max_new_tokens if ignore_eos else 0,
                               pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos,
                               bos_token_id=self.tokenizer.bos_token_id, **sampling)
        with torch.random.fork_rng(devices=[]):  # transformers samples from the global RNG
            torch.manual_seed(seed)
            out = self.net.generate(ids, attention_mask=att, generation_config=cfg)
        new = out[:, ids.shape[1]:].tolist()
        return [r if ignore_eos or eos not in r else r[: r.index(eos)] for r in new]

    def generate(self, prompts: list[str], max_new_tokens: int = 64, **kw) -> list[str]:
        new = self.generate_ids([prompt_ids(self.tokenizer, p) for p in prompts], max_new_tokens,
                                **kw)
        return [self.tokenizer.decode(r, skip_special_tokens=True) for r in new]

    @torch.no_grad()
    def nll(self, contexts: list[list[int]], continuations: list[list[int]],
            batch_size: int = 16) -> list[torch.Tensor]:
        """Per-token negative log-likelihood [len(cont)] of each continuation after its context
        (the judge of generative perplexity)."""
        out = []
        for i in range(0, len(contexts), batch_size):
            rows = [c + x for c, x in zip(contexts[i:i + batch_size], continuations[i:i + batch_size])]
            b, lmax = len(rows), max(map(len, rows))
            ids = torch.full((b, lmax), self.tokenizer.pad_token_id, dtype=torch.long)
            s = torch.full((b, lmax), -1, dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, : len(row)], s[r, : len(row)] = torch.tensor(row), 0
            ids, s = ids.to(self.device), s.to(self.device)
            pos = torch.arange(lmax, device=self.device).expand(b, lmax)
            logp = self.logits(ids, causal_mask(s, pos, s, pos), pos).float().log_softmax(-1)
            tok = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, L - 1]
            for r, (c, x) in enumerate(zip(contexts[i:i + batch_size], continuations[i:i + batch_size])):
                out.append(tok[r, len(c) - 1: len(c) - 1 + len(x)].cpu())
        return out


class MDLMModel(_Baseline):
    """Masked (absorbing-state) discrete diffusion LM with bidirectional attention."""

    kind = "mdlm"
    t_min = 1e-3  # t ~ U(t_min, 1]: bounds the 1/t weight

    @property
    def mask_id(self) -> int:
        return self.tokenizer.mask_token_id

    def forward(self, batch: dict, stage: int, w=None, generator=None):
        """(the ELBO's 1/t-weighted masked cross-entropy per valid token, logs)."""
        rows = batch["text"]
        ids, s, pos = rows["input_ids"], rows["sample_ids"], rows["positions"]
        b, n = ids.shape
        dev, valid = ids.device, s >= 0
        # one t per sample, stratified over the batch's samples (MDLM's low-discrepancy
        # sampler): the k samples get (u + perm(k) / k) mod 1
        starts = valid & (pos == 0)  # the first token of every sample
        k = int(starts.sum())
        u = torch.rand((), device=dev, generator=generator)
        strata = (u + torch.randperm(k, device=dev, generator=generator) / max(k, 1)) % 1.0
        table = torch.zeros(b, n, device=dev)
        table[starts.nonzero()[:, 0], s[starts]] = strata
        t = self.t_min + (1 - self.t_min) * per_sample_table(s, table)  # [B, L]
        masked = (torch.rand(b, n, device=dev, generator=generator) < t) & valid
        logits = self.logits(ids.masked_fill(masked, self.mask_id), bidirectional_mask(s), pos)
        ce = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(),
                             reduction="none").view_as(ids)
        loss = (ce * masked / t).sum() / valid.sum().clamp_min(1)
        n_masked = masked.sum().clamp_min(1)
        acc = ((logits.argmax(-1) == ids) & masked).sum() / n_masked
        return loss, {"masked_ce": ((ce * masked).sum() / n_masked).detach(), "acc": acc.detach()}

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, *, block_size: int = 16,
                     steps: int = 8, temperature: float = 0.0, seed: int = 0,
                     ignore_eos: bool = False) -> list[list[int]]:
        """LLaDA semi-autoregressive sampling (module docstring): per block, `steps` passes
        over the whole canvas, each unmasking its share of the block's most confident tokens."""
        if steps < 1 or block_size < 1:
            raise ValueError("steps and block_size must be >= 1")
        dev, mask_id, eos = self.device, self.mask_id, self.tokenizer.eos_token_id
        b = len(prompts)
        n_gen = -(-max_new_tokens // block_size) * block_size
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        total = int(lens.max()) + n_gen
        canvas = torch.full((b, total), self.tokenizer.pad_token_id, dtype=torch.long, device=dev)
        ar = torch.arange(total, device=dev)
        inside = ar[None] < (lens + n_gen)[:, None]
        canvas[inside] = mask_id
        for r, p in enumerate(prompts):
            canvas[r, : len(p)] = torch.tensor(p, device=dev)
        sample = torch.where(inside, 0, -1)
        attn, pos = bidirectional_mask(sample), ar.expand(b, total) * inside
        gen_cols = lens[:, None] + torch.arange(n_gen, device=dev)  # [B, n_gen]
        g = torch.Generator(device=dev).manual_seed(seed)
        per_step = [block_size // steps + (i < block_size % steps) for i in range(steps)]
        for start in range(0, n_gen, block_size):
            cols = gen_cols[:, start:start + block_size]  # [B, bs]
            for k in per_step:
                if k == 0:
                    continue
                logits = self.logits(canvas, attn, pos).float()
                logits = logits.gather(1, cols[..., None].expand(-1, -1, logits.shape[-1]))
                logits[..., mask_id] = float("-inf")
                if ignore_eos:
                    logits[..., eos] = float("-inf")
                probs = logits.softmax(-1)  # [B, bs, V]
                if temperature > 0:
                    x0 = torch.multinomial((logits / temperature).softmax(-1).flatten(0, 1), 1,
                                           generator=g).view(b, -1)
                else:
                    x0 = probs.argmax(-1)
                conf = probs.gather(-1, x0[..., None]).squeeze(-1)  # [B, bs]
                current = canvas.gather(1, cols)
                conf = conf.masked_fill(current != mask_id, float("-inf"))
                pick = torch.zeros_like(current, dtype=torch.bool).scatter_(
                    1, conf.topk(k, dim=1).indices, True) & (current == mask_id)
                canvas.scatter_(1, cols, torch.where(pick, x0, current))
        new = canvas.gather(1, gen_cols)[:, :max_new_tokens].tolist()
        return [r if ignore_eos or eos not in r else r[: r.index(eos)] for r in new]

    def generate(self, prompts: list[str], max_new_tokens: int = 64, **kw) -> list[str]:
        new = self.generate_ids([prompt_ids(self.tokenizer, p) for p in prompts], max_new_tokens,
                                **kw)
        return [self.tokenizer.decode(r, skip_special_tokens=True) for r in new]


BASELINES = {"ar": ARModel, "mdlm": MDLMModel}


def build_baseline(cfg, tokenizer) -> ARModel | MDLMModel:
    """The baseline named by `cfg.model.kind`, sized by `cfg.model` (random weights)."""
    from transformers import LlamaForCausalLM

    m = cfg.model
    if m.kind not in BASELINES:
        raise ValueError(f"unknown baseline kind {m.kind!r}; choose one of {KINDS} (or 'cola')")
    net = LlamaForCausalLM(llama_config(len(tokenizer), m.width, m.depth, m.heads, m.intermediate,
                                        tokenizer, max_len=max(4096, cfg.data.seq_len)))
    return BASELINES[m.kind](net, tokenizer)


def is_baseline(folder: str | Path) -> bool:
    return (Path(folder) / BASELINE_FILE).is_file()


def load_model(folder: str | Path, device: str | torch.device = "cpu"):
    """A saved model folder: a baseline (baseline.json) or a Cola model (model_index.json)."""
    folder = Path(folder)
    if is_baseline(folder):
        kind = json.loads((folder / BASELINE_FILE).read_text())["kind"]
        return BASELINES[kind].from_pretrained(folder, device)
    from unified.model import ColaModel

    return ColaModel.from_pretrained(folder, device)
