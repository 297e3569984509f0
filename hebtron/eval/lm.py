"""The ``hebtron`` model for lm-eval: a :class:`HybridModel` scored without converting it.

``lm_eval.simple_evaluate(model="hebtron", model_args={"pretrained": CKPT})`` evaluates a training
checkpoint of either backend (a Megatron one through its cached HF conversion, see
:mod:`hebtron.eval.source`) or any HF NemotronH directory with hebtron's own decoder, which is exact on
padded batches: generation left-pads and marks the padding as its own document (``seq_idx``),
so Mamba state and attention never see it. Tokenization, truncation, stop sequences and
post-processing mirror lm-eval's ``hf`` model, so both give the same scores on the same
weights (tested). Decoding is greedy and re-runs the forward for every new token: exact and
simple, fine for evaluation suites at toy scale; on a cluster use the ``hf`` or ``vllm``
model on an export for long generations.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from tqdm import tqdm

from hebtron.errors import UserError
from hebtron.eval.source import resolve_source

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _pick_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"hebtron lm: dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


@register_model("hebtron")
class HebtronLM(TemplateLM):
    """lm-eval model over hebtron's native decoder (see module doc)."""

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        batch_size: int | str | None = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from hebtron.model.hf import load_hf
        from hebtron.data.tokenizer import load_hf_tokenizer

        if kwargs:
            log.warning("hebtron lm: ignoring unsupported model_args %s", sorted(kwargs))
        source = resolve_source(pretrained, tokenizer)
        self.source = source
        self._device = _pick_device(device)
        self.model = load_hf(source.model_dir, dtype=_pick_dtype(dtype, self._device)).to(self._device).eval()
        self.tokenizer = load_hf_tokenizer(source.tokenizer_dir)
        if len(self.tokenizer) > self.model.config.vocab_size:
            raise UserError(
                f"{source.tokenizer_dir}: tokenizer has {len(self.tokenizer)} tokens, "
                f"the model's vocab_size is {self.model.config.vocab_size}"
            )
        self.batch_size = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        if max_batch_size:
            self.batch_size = min(self.batch_size, int(max_batch_size))
        self._max_length = int(max_length) if max_length else resolve_max_length(self.model.config, self.tokenizer)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        stop_ids = {self.tokenizer.eos_token_id, self.model.config.eos_token_id}
        self.stop_token_ids = {i for i in stop_ids if i is not None}

    # ------------------------------------------------------------------ lm-eval plumbing
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.source.tokenizer_dir).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    @torch.inference_mode()
    def _logits(self, rows: list[list[int]], left_pad: bool = False) -> torch.Tensor:
        """Logits (b, T, V) fp32 for token rows padded to one length.

        Right padding cannot affect earlier positions of a causal model. Left padding is
        marked as a separate document so neither attention nor Mamba state crosses it.
        """
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        seq_idx = torch.ones((len(rows), width), dtype=torch.long)
        padded = False
        for i, row in enumerate(rows):
            pad = width - len(row)
            padded |= pad > 0
            if left_pad:
                ids[i, pad:] = torch.tensor(row)
                seq_idx[i, :pad] = 0
            else:
                ids[i, : len(row)] = torch.tensor(row)
        ids = ids.to(self._device)
        seq = seq_idx.to(self._device) if (left_pad and padded) else None
        return self.model(ids, seq_idx=seq).logits

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        def sort_key(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        ordered = Collator(requests, sort_fn=sort_key)
        results: list[tuple[float, bool]] = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="hebtron loglikelihood")
        for chunk in ordered.get_batched(n=override_bs or self.batch_size):
            rows, spans = [], []
            for _, context_enc, continuation_enc in chunk:
                if not context_enc or not continuation_enc:
                    raise ValueError("hebtron lm: empty context or continuation after tokenization")
                row = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]
                rows.append(row)
                spans.append((len(row), continuation_enc))
            logprobs = F.log_softmax(self._logits(rows), dim=-1)
            for (request_str, _, _), lp, (inplen, cont) in zip(chunk, logprobs, spans, strict=True):
                lp = lp[inplen - len(cont): inplen]
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                greedy = bool((lp.argmax(dim=-1) == target).all())
                answer = (float(lp.gather(1, target[:, None]).sum()), greedy)
                results.append(answer)
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
                pbar.update(1)
        pbar.close()
        return ordered.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="hebtron rolling"):
            windows = [
                (None, *lm_utils.make_disjoint_window(w))
                for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
            total = sum(s for s, _ in scores)
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        ordered = Collator(
            [r.args for r in requests],
            sort_fn=lambda req: (-len(self.tok_encode(req[0])), req[0]),
            group_by="gen_kwargs", group_fn=lambda req: req[1],
        )
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results: list[str] = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="hebtron generate_until")
        for chunk in ordered.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            if kwargs.get("do_sample"):
                raise ValueError("hebtron lm decodes greedily; this task asks for sampling (do_sample=True)")
            max_ctx_len = self.max_length - max_gen_toks
            if max_ctx_len <= 0:
                raise ValueError(f"hebtron lm: max_gen_toks {max_gen_toks} leaves no room in max_length {self.max_length}")
            prompts = [self.tok_encode(c, left_truncate_len=max_ctx_len) for c in contexts]
            for context, text in zip(contexts, self._greedy(prompts, until, max_gen_toks), strict=True):
                text = postprocess_generated_text(text, until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                pbar.update(1)
        pbar.close()
        return ordered.get_original(results)

    def _greedy(self, prompts: list[list[int]], until: list[str], max_gen_toks: int) -> list[str]:
        """Greedy continuations (decoded, special tokens skipped) until a stop string, EOS or the budget."""
        generated: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        for _ in range(max_gen_toks):
            if not active:
                break
            logits = self._logits([prompts[i] + generated[i] for i in active], left_pad=True)
            next_ids = logits[:, -1].argmax(dim=-1).tolist()
            still = []
            for i, tok in zip(active, next_ids, strict=True):
                if tok in self.stop_token_ids:
                    continue
                generated[i].append(tok)
                text = self.tok_decode(generated[i], skip_special_tokens=False)
                if not any(stop and stop in text for stop in until):
                    still.append(i)
            active = still
        return [self.tok_decode(g) for g in generated]
