"""Train a Hebrew byte-level BPE, load tokenizers by name, and measure their compression.

Two loaders: :func:`load_tokenizer` gives the fast encoder data preparation needs (a local
directory or ``"tekken"``); :func:`load_hf_tokenizer` gives the full transformers tokenizer that
training, evaluation and the chat template use, and also accepts a checkpoint that names its
tokenizer.

Special tokens sit at fixed ids so CPT data matches Nemotron's convention (documents end
with ``</s>`` = id 2): ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, ``<|im_start|>`` 4,
``<|im_end|>`` 5. Compression is what decides CPT cost (tokens per Hebrew word), so
``tokenizer_report`` puts any number of tokenizers side by side on the same text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hebtron.checkpoints import tokenizer_dir
from hebtron.errors import UserError
from hebtron.jsonio import BadJSONLine, loads_line, utf8_lines

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
UNK, BOS, EOS, PAD, IM_START, IM_END = SPECIAL_TOKENS
TEKKEN = "tekken"


@dataclass
class TextStats:
    """What :func:`iter_texts` read, and the JSONL records it skipped for want of a usable
    ``text`` (missing, not a string, empty): counted and reported, never dropped silently."""

    texts: int = 0
    skipped: int = 0
    first_skipped: str = ""  # "FILE:LINE: why" of the first one

    def skip(self, where: str, why: str) -> None:
        self.skipped += 1
        self.first_skipped = self.first_skipped or f"{where}: {why}"

    def summary(self) -> str | None:
        """One line for the report, or None when nothing was skipped."""
        if not self.skipped:
            return None
        return (f"skipped {self.skipped:,} of {self.texts + self.skipped:,} records without a usable 'text' "
                f"(first: {self.first_skipped})")


def _record_text(rec: Any, where: str, stats: TextStats) -> str | None:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object with a 'text' field, got {type(rec).__name__}")
    text = rec.get("text")
    if text is None:
        stats.skip(where, "field 'text' is missing")
    elif not isinstance(text, str):
        stats.skip(where, f"field 'text' must be a string, got {type(text).__name__}")
    elif not text:
        stats.skip(where, "field 'text' is empty")
    else:
        return text
    return None


def iter_texts(paths: Sequence[str | Path], stats: TextStats | None = None) -> Iterator[str]:
    """Texts of ``.jsonl`` files (field ``text``) or plain-text files (one text per line).

    A JSONL record without a usable ``text`` is skipped and counted in ``stats``; a line that is
    not UTF-8 or not a JSON object stops the run with one line naming the file and line."""
    stats = TextStats() if stats is None else stats
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        for where, line in utf8_lines(path):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    text = _record_text(loads_line(line), where, stats)
                except BadJSONLine as err:
                    raise UserError(f"{where}: {err}") from None
                if text is None:
                    continue
            else:
                text = line.rstrip("\r\n")
            stats.texts += 1
            yield text


def train_tokenizer(
    inputs: Sequence[str | Path], vocab_size: int, out: str | Path, min_frequency: int = 2,
    stats: TextStats | None = None,
) -> Any:
    """Train a byte-level BPE on ``inputs`` and save it as a transformers tokenizer dir.

    NFC normalization is part of the tokenizer, digits are split one per token (numbers
    tokenize consistently), and all 256 bytes are in the vocabulary, so nothing maps to
    ``<unk>``. Returns the ``PreTrainedTokenizerFast``. ``stats`` counts the records read and
    skipped (:class:`TextStats`), for the caller to report.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= minimum:
        raise UserError(f"--vocab-size {vocab_size}: must be more than {minimum} (256 bytes + specials)")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stats = TextStats() if stats is None else stats
    texts = list(iter_texts(inputs, stats))
    if not texts:
        skipped = f"; {stats.summary()}" if stats.skipped else ""
        raise UserError(f"no text found in {', '.join(map(str, inputs))}{skipped}")
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} landed on {tok.token_to_id(name)}"
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=[IM_START, IM_END], model_max_length=1 << 20,
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    # transformers 5 writes its internal class name; the classic name loads in 4.x too
    # (vLLM, lm-eval pinned environments) and is an alias of the same class in 5.x.
    config_path = Path(out) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    return hf


class TextTokenizer(Protocol):
    """What data preparation and the report need from any tokenizer."""

    name: str
    vocab_size: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def token_id(self, token: str) -> int | None: ...


@dataclass
class HFTokenizer:
    """A transformers tokenizer saved in a local directory (never remote code)."""

    name: str
    tok: Any

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def token_id(self, token: str) -> int | None:
        idx = self.tok.convert_tokens_to_ids(token)
        return None if idx is None or (idx == self.tok.unk_token_id and token != self.tok.unk_token) else int(idx)


@dataclass
class TekkenTokenizer:
    """Mistral Tekken through mistral-common (its tekken.json ships in the package data)."""

    name: str
    tok: Any

    @property
    def vocab_size(self) -> int:
        return int(self.tok.n_words)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tok.encode(t, bos=False, eos=False) for t in texts]

    def token_id(self, token: str) -> int | None:
        try:
            return int(self.tok.get_special_token(token))
        except Exception:  # not a special token of this vocabulary
            return None


def tekken_file() -> Path:
    """The newest ``tekken_*.json`` inside mistral-common's package data."""
    try:
        import mistral_common
    except ImportError:
        raise UserError("tokenizer 'tekken' needs mistral-common (pip install 'hebtron[tekken]')") from None
    files = sorted((Path(mistral_common.__file__).parent / "data").glob("tekken*.json"))
    if not files:
        raise UserError("mistral-common is installed but ships no tekken*.json")
    return files[-1]


_CACHE: dict[str, TextTokenizer] = {}


def check_tokenizer_spec(spec: str | Path) -> str:
    """Fail early (before hours of work) on a tokenizer that cannot be loaded; return its key."""
    key = str(spec)
    if key == TEKKEN:
        tekken_file()
    elif not (Path(key) / "tokenizer.json").is_file() and not (Path(key) / "tokenizer_config.json").is_file():
        raise UserError(f"tokenizer {key}: not a tokenizer directory (expected tokenizer.json) or 'tekken'")
    return key


def load_tokenizer(spec: str | Path) -> TextTokenizer:
    """``"tekken"`` or a local directory written by ``save_pretrained`` (cached per process)."""
    key = check_tokenizer_spec(spec)
    if key in _CACHE:
        return _CACHE[key]
    if key == TEKKEN:
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        path = tekken_file()
        result: TextTokenizer = TekkenTokenizer(path.stem, Tekkenizer.from_file(path))
    else:
        path = Path(key)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        result = HFTokenizer(path.name or key, _auto_tokenizer(path, path))
    _CACHE[key] = result
    return result


# Whether a tokenizer directory's own Python code (an ``auto_map`` in tokenizer_config.json) may
# run: off unless the command line says ``--trust-remote-code`` (hebtron.cli). Passed to
# transformers as an explicit False, so it never asks "Do you wish to run the custom code?".
_remote_code_allowed = False


def allow_remote_code(allowed: bool) -> None:
    """``--trust-remote-code``: let tokenizer and model directories run their own code (this process)."""
    global _remote_code_allowed
    _remote_code_allowed = allowed


def remote_code_allowed() -> bool:
    return _remote_code_allowed


def _auto_tokenizer(directory: Path, named: Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` on a local directory: never the hub, remote code only when allowed; a
    directory it cannot load (or whose custom code it refuses) is one line naming ``named``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                             trust_remote_code=_remote_code_allowed)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        if "trust_remote_code" in reason or "custom code" in reason:
            reason = (f"{directory} asks to run its own Python code (auto_map in its config), which hebtron "
                      "does not do unless the command line says --trust-remote-code")
        raise UserError(f"{named}: cannot load tokenizer ({reason})") from None


def load_hf_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A local tokenizer directory, a file in one, or a checkpoint / checkpoints directory (the
    tokenizer its run recorded); never the hub, never remote code unless ``--trust-remote-code``."""
    path = Path(path)
    return _auto_tokenizer(tokenizer_dir(path), path)


@dataclass(frozen=True)
class Compression:
    """How well one tokenizer compresses one text: the cost of CPT per word."""

    tokenizer: str
    vocab_size: int
    docs: int
    words: int
    chars: int
    tokens: int
    tokens_per_word: float
    chars_per_token: float
    bytes_per_token: float


def measure(tok: TextTokenizer, texts: Sequence[str], batch: int = 256) -> Compression:
    """Token, word (whitespace-separated) and character counts of ``texts`` under ``tok``."""
    tokens = 0
    for start in range(0, len(texts), batch):
        tokens += sum(len(ids) for ids in tok.encode_batch(list(texts[start : start + batch])))
    words = sum(len(t.split()) for t in texts)
    chars = sum(len(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return Compression(
        tokenizer=tok.name, vocab_size=tok.vocab_size, docs=len(texts), words=words, chars=chars,
        tokens=tokens, tokens_per_word=round(tokens / max(words, 1), 3),
        chars_per_token=round(chars / max(tokens, 1), 3), bytes_per_token=round(nbytes / max(tokens, 1), 3),
    )


def tokenizer_report(text_files: Sequence[str | Path], tokenizers: Iterable[str],
                     stats: TextStats | None = None) -> list[dict[str, Any]]:
    """One :class:`Compression` row (as a dict) per tokenizer, on the same texts; ``stats``
    counts the records read and skipped."""
    stats = TextStats() if stats is None else stats
    texts = list(iter_texts(text_files, stats))
    if not texts:
        skipped = f"; {stats.summary()}" if stats.skipped else ""
        raise UserError(f"no text found in {', '.join(map(str, text_files))}{skipped}")
    return [asdict(measure(load_tokenizer(spec), texts)) for spec in tokenizers]
