"""``hebtron arena generate``: every model's answers to the arena's prompts, into its database.

A checkpoint is anything ``hebtron eval run`` accepts (:func:`hebtron.eval.source.resolve_source`:
a ``step_N`` of either backend, a checkpoints directory, an HF NemotronH directory), loaded into
hebtron's own decoder. Each prompt is rendered with the model's chat template (the tokenizer's,
else hebtron's ChatML, as SFT trained it) and answered by sampling with recorded settings.

Seeded per answer: the seed of an answer is derived from the run's seed and the prompt, and each
row of a batch draws from its own generator, so an answer does not depend on which prompts share
its batch (batches are left-padded, the padding marked as its own document, so neither attention
nor Mamba state sees it). Decoding re-runs the forward for every new token: exact and simple,
right for arenas of a few hundred prompts; it is not a serving engine.

Answers are appended, never replaced: a model name already in the database must come with the
same checkpoint and settings, and then only its missing answers are generated (a resumed run).
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hebtron.arena.prompts import ArenaPrompt, read_prompts
from hebtron.errors import UserError
from hebtron.eval import arena_store

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn; stored with every model so a rating can be traced to its settings."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0  # 0: off
    max_new_tokens: int = 128
    seed: int = 0

    def check(self) -> Sampling:
        if not self.temperature >= 0:
            raise UserError(f"--temperature: expected >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p: expected a number in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"--top-k: expected >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens: expected >= 1, got {self.max_new_tokens}")
        return self


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    """``NAME=CHECKPOINT`` arguments -> (name, checkpoint), names unique and URL/HTML-safe."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, ckpt = spec.partition("=")
        if not sep or not ckpt:
            raise UserError(f"--models {spec!r}: expected NAME=CHECKPOINT")
        if not NAME_RE.fullmatch(name):
            raise UserError(f"--models {spec!r}: NAME must be 1-64 letters, digits, '.', '_' or '-'")
        if any(name == n for n, _ in out):
            raise UserError(f"--models: {name!r} given twice")
        out.append((name, ckpt))
    if not out:
        raise UserError("--models: give at least one NAME=CHECKPOINT")
    return out


def answer_seed(seed: int, prompt: ArenaPrompt) -> int:
    digest = hashlib.sha256(f"{seed}:{arena_store.prompt_key(prompt.messages)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class Generator:
    """One loaded model with its tokenizer and template: prompts -> sampled answers."""

    def __init__(self, checkpoint: str, device: str = "auto", dtype: str = "auto", template: str | None = None):
        import torch

        from hebtron.data.chat import ChatTemplate
        from hebtron.data.tokenizer import IM_END, load_hf_tokenizer
        from hebtron.eval.source import resolve_source
        from hebtron.model.hf import load_hf

        if dtype not in DTYPES:
            raise UserError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else "cpu" if device == "auto" else device)
        torch_dtype = (torch.bfloat16 if self.device.type == "cuda" else torch.float32) if dtype == "auto" \
            else getattr(torch, dtype)
        self.source = resolve_source(checkpoint)
        self.model = load_hf(self.source.model_dir, dtype=torch_dtype).to(self.device).eval()
        self.tokenizer = load_hf_tokenizer(self.source.tokenizer_dir)
        if len(self.tokenizer) > self.model.config.vocab_size:
            raise UserError(f"{self.source.tokenizer_dir}: tokenizer has {len(self.tokenizer)} tokens, "
                            f"the model's vocab_size is {self.model.config.vocab_size}")
        self.chat = ChatTemplate(self.tokenizer, template)
        stops = {self.tokenizer.eos_token_id, self.model.config.eos_token_id,
                 self.tokenizer.convert_tokens_to_ids(IM_END) if IM_END in self.tokenizer.get_vocab() else None}
        self.stop_ids = {int(i) for i in stops if i is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.dtype = str(torch_dtype).removeprefix("torch.")

    def info(self, sampling: Sampling) -> dict[str, Any]:
        """What the database records with the model (compared on resume)."""
        return {
            "checkpoint": str(self.source.checkpoint), "weights": str(self.source.model_dir),
            "tokenizer": str(self.source.tokenizer_dir), "step": self.source.step, "dtype": self.dtype,
            "sampling": asdict(sampling), "stop_ids": sorted(self.stop_ids),
            "chat_template_sha256": hashlib.sha256(self.chat.source.encode()).hexdigest(),
        }

    def encode(self, prompt: ArenaPrompt) -> list[int]:
        text = self.chat.render(prompt.messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _last_logits(self, rows: list[list[int]]):
        """Logits of each row's last position; rows left-padded, the padding its own document."""
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        seq_idx = torch.ones((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row)
            seq_idx[i, : width - len(row)] = 0
        padded = any(len(r) < width for r in rows)
        out = self.model(ids.to(self.device), seq_idx=seq_idx.to(self.device) if padded else None)
        return out.logits[:, -1].float().cpu()

    def sample(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling) -> list[tuple[list[int], str]]:
        """(answer ids, 'stop' | 'length') per prompt."""
        import torch
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        warpers = []
        if sampling.temperature > 0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k:
                warpers.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1:
                warpers.append(TopPLogitsWarper(sampling.top_p))
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        generated: list[list[int]] = [[] for _ in prompts]
        finish = ["length"] * len(prompts)
        active = list(range(len(prompts)))
        with torch.inference_mode():
            for _ in range(sampling.max_new_tokens):
                if not active:
                    break
                scores = self._last_logits([prompts[i] + generated[i] for i in active])
                for warp in warpers:
                    scores = warp(None, scores)
                probs = torch.softmax(scores, dim=-1) if warpers else None
                still = []
                for row, i in enumerate(active):
                    token = int(scores[row].argmax()) if probs is None else \
                        int(torch.multinomial(probs[row], 1, generator=generators[i]))
                    if token in self.stop_ids:
                        finish[i] = "stop"
                        continue
                    generated[i].append(token)
                    still.append(i)
                active = still
        return list(zip(generated, finish, strict=True))

    def close(self) -> None:
        import torch

        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def generate_arena(models: list[tuple[str, str]], prompts_path: str | Path, out: str | Path,
                   sampling: Sampling = Sampling(), batch_size: int = 8, device: str = "auto", dtype: str = "auto",
                   template: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Answer every prompt with every model (missing answers only); returns a summary."""
    from tqdm import tqdm

    sampling.check()
    if batch_size < 1:
        raise UserError(f"--batch-size: expected >= 1, got {batch_size}")
    prompts = read_prompts(prompts_path)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: not a directory")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"db": str(arena_store.db_path(out)), "prompts": len(prompts),
                               "sampling": asdict(sampling), "models": {}}
    with closing(arena_store.connect(out, create=True)) as conn:
        prompt_ids = arena_store.add_prompts(conn, [(p.messages, p.lang, p.label) for p in prompts])
        for name, checkpoint in models:
            started = time.perf_counter()
            gen = Generator(checkpoint, device, dtype, template)
            try:
                model_id = arena_store.add_model(conn, name, checkpoint, gen.info(sampling))
                done = arena_store.answered_prompts(conn, model_id)
                todo = [(pid, p) for pid, p in zip(prompt_ids, prompts, strict=True) if pid not in done]
                encoded = [(pid, gen.encode(p), answer_seed(sampling.seed, p)) for pid, p in todo]
                encoded.sort(key=lambda e: -len(e[1]))  # similar lengths share a batch: less padding
                tokens = 0
                bar = tqdm(total=len(encoded), desc=f"arena {name}", unit="answer", disable=not progress,
                           file=sys.stderr, leave=False)
                for start in range(0, len(encoded), batch_size):
                    batch = encoded[start: start + batch_size]
                    answers = gen.sample([e[1] for e in batch], [e[2] for e in batch], sampling)
                    rows = [(pid, gen.tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids), finish, seed)
                            for (pid, _, seed), (ids, finish) in zip(batch, answers, strict=True)]
                    arena_store.add_answers(conn, model_id, rows)
                    tokens += sum(len(ids) for ids, _ in answers)
                    bar.update(len(batch))
                bar.close()
            finally:
                gen.close()
            summary["models"][name] = {"checkpoint": checkpoint, "resolved": str(gen.source.checkpoint),
                                       "new_answers": len(encoded), "already_there": len(done),
                                       "tokens": tokens, "seconds": round(time.perf_counter() - started, 2)}
    return summary
