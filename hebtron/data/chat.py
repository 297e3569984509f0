"""Chat conversations -> token ids and an assistant mask, the mask computed on the token ids.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``
messages, rendered by a Jinja chat template: the tokenizer's own when it has one, else
hebtron's ChatML default (``<|im_start|>role\\n...<|im_end|>\\n``, the specials of hebtron's
tokenizers and of Nemotron 3).

Which tokens carry loss is decided on token ids, never on character offsets: for each
assistant turn ``i`` the conversation is rendered up to the turn's generation prompt
(``messages[:i]`` with ``add_generation_prompt``) and up to the end of the turn
(``messages[:i + 1]``). Both renderings are tokenized; when they are token prefixes of the
whole conversation's ids (the usual case: turns meet at special tokens), the ids between the
two prefixes are the assistant's turn. When a token would merge across a turn boundary
(Llama 3's ``<|end_header_id|>\n\n`` before the content, say), each piece is tokenized on
its own instead (prompt, then answer: what a server feeds and the model generates), so the
boundary is exact either way. Loss covers the turn's ids up to and including the first
special token after the content (the end-of-turn token, e.g. ``<|im_end|>``); template glue
after it (ChatML's newline) is never generated, so it carries no loss. A template that renders earlier turns
differently once later ones are added (some drop past reasoning) has no such boundaries;
those conversations are reported as template errors, never silently mis-masked.

Bad conversations raise :class:`BadExample` with a ``reason`` key; :class:`ChatReader`
counts them (or stops at the first in strict mode) and applies the over-long policy.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hebtron.lang import UNKNOWN_LANG, lang_id
from hebtron.errors import UserError
from hebtron.jsonio import BadJSONLine, loads_line

ROLES = ("system", "user", "assistant")
TrainOn = Literal["all", "last"]
Overlong = Literal["drop", "truncate"]

# ChatML, as in Nemotron 3 and hebtron's tokenizers (<|im_start|> = 4, <|im_end|> = 5).
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATE_NAMES = ("auto", "tokenizer", "chatml")

# Why an example was dropped; the keys of ChatStats.dropped, in report order.
REASONS = {
    "bad_record": "not a conversation",
    "unknown_role": "unknown role",
    "empty_content": "empty content",
    "no_assistant": "no assistant turn",
    "special_token": "special token in content",
    "template_error": "template failed",
    "too_long": "longer than seq_len",
}


class BadExample(ValueError):
    """A conversation that cannot be trained on; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def resolve_template(tokenizer: Any, template: str | None = None) -> str:
    """The Jinja source to render with: ``None``/``"auto"`` (the tokenizer's template, else
    hebtron's ChatML), ``"tokenizer"`` (must exist), ``"chatml"``, or Jinja source itself."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if template in (None, "auto"):
        return own or DEFAULT_TEMPLATE
    if template == "tokenizer":
        if not own:
            raise UserError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: has no chat template "
                            "(use template 'auto' or 'chatml', or give a template file)")
        return own
    if template == "chatml":
        return DEFAULT_TEMPLATE
    if "{{" in template or "{%" in template:
        return template
    raise UserError(f"chat template {template!r}: expected one of {', '.join(TEMPLATE_NAMES)} or Jinja source")


def read_template_file(path: str | Path) -> str:
    """A Jinja chat template from a file (``.jinja``), read as UTF-8."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read chat template ({err})") from None
    if "{{" not in text and "{%" not in text:
        raise UserError(f"{path}: not a Jinja template (no '{{{{' or '{{%')")
    return text


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate a conversation; returns it without trailing turns after the last assistant
    turn (they would carry no loss). Raises :class:`BadExample`."""
    if not isinstance(messages, list) or not messages:
        raise BadExample("bad_record", "field 'messages' must be a non-empty list of {role, content} objects")
    last_assistant = -1
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadExample("bad_record", f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadExample("unknown_role", f"messages[{i}].role: unknown role {role!r}; expected {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadExample("bad_record", f"messages[{i}].content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise BadExample("empty_content", f"messages[{i}].content is empty")
        if role == "assistant":
            last_assistant = i
    if last_assistant < 0:
        raise BadExample("no_assistant", "no assistant turn (nothing to train on)")
    return messages[: last_assistant + 1]


class ChatTemplate:
    """One tokenizer + one template: renders conversations and computes assistant masks."""

    def __init__(self, tokenizer: Any, template: str | None = None, train_on: TrainOn = "all") -> None:
        if train_on not in ("all", "last"):
            raise UserError(f"train_on: expected 'all' or 'last', got {train_on!r}")
        self.tokenizer = tokenizer
        self.source = resolve_template(tokenizer, template)
        self.train_on = train_on
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}
        special |= {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
        self.special_ids = np.array(sorted(special), dtype=np.int64)
        strings = sorted({tokenizer.convert_ids_to_tokens(i) for i in special} - {None, ""}, key=len, reverse=True)
        # one regex: scans only where a special token's first character occurs
        self._special_re = re.compile("|".join(map(re.escape, strings))) if strings else None

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                list(messages), chat_template=self.source, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as err:  # jinja2 errors, raise_exception() in the template, bad fields
            why = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BadExample("template_error", f"chat template failed: {why}") from None

    def encode(self, messages: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids int32, assistant_mask bool)`` of a checked conversation."""
        for i, m in enumerate(messages):
            found = self._special_re.search(m["content"]) if self._special_re else None
            if found:
                raise BadExample("special_token", f"messages[{i}].content contains the special token {found.group()!r}")
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        trained = set(turns[-1:] if self.train_on == "last" else turns)
        # Renderings up to each turn's generation prompt and each turn's end, then the whole.
        bounds: list[str] = []
        for i in turns:
            bounds += [self.render(messages[:i], add_generation_prompt=True), self.render(messages[: i + 1])]
        full = self.render(messages)
        previous = ""
        for k, text in enumerate([*bounds, full]):
            if not text.startswith(previous):
                where = f"messages[{turns[min(k, len(bounds) - 1) // 2]}]"
                raise BadExample("template_error", f"{where}: the template renders earlier turns differently once "
                                 "later ones are added; the assistant tokens cannot be located")
            previous = text
        encoded = self.tokenizer([full, *bounds], add_special_tokens=False)["input_ids"]
        ids, cuts = list(encoded[0]), [len(x) for x in encoded[1:]]
        if any(ids[: len(x)] != list(x) for x in encoded[1:]):
            # A token merges across a turn boundary (e.g. '\n\n' + content): tokenize each piece
            # alone, which is also what a server does with the prompt it renders.
            pieces = [b[len(a) :] for a, b in zip(["", *bounds], [*bounds, full], strict=True)]
            parts = self.tokenizer(pieces, add_special_tokens=False)["input_ids"]
            ids = [t for part in parts for t in part]
            cuts = np.cumsum([len(part) for part in parts])[:-1].tolist()
        ids_np = np.asarray(ids, dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for k, i in enumerate(turns):
            start, end = cuts[2 * k], cuts[2 * k + 1]
            if end <= start:
                raise BadExample("template_error", f"messages[{i}]: the template renders no tokens for this turn")
            if i not in trained:
                continue
            # up to the first special token after the content (leading specials: a template
            # without a generation prompt renders the header inside the turn; it is generated too)
            special = np.isin(ids_np[start:end], self.special_ids)
            first = int(np.argmin(special))
            closing = np.flatnonzero(special[first:])
            mask[start : start + first + int(closing[0]) + 1 if closing.size else end] = True
        return ids_np.astype(np.int32), mask

    def generation_prompt_len(self, messages: Sequence[dict[str, Any]]) -> int:
        """Tokens the generation prompt (the assistant header) adds after ``messages``."""
        with_prompt, without = self.render(messages, add_generation_prompt=True), self.render(messages)
        if not with_prompt.startswith(without):
            return 0
        return len(self.tokenizer(with_prompt[len(without) :], add_special_tokens=False)["input_ids"])


def encode_chat(
    messages: list[dict[str, Any]], tokenizer: Any, template: str | None = None, train_on: TrainOn = "all"
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) and assistant mask (bool, True where a token carries loss: assistant
    content and its end-of-turn token) of one conversation. Raises :class:`BadExample`."""
    return ChatTemplate(tokenizer, template, train_on).encode(check_messages(messages))


# ------------------------------------------------------------------------ reading files
@dataclass
class ChatStats:
    """What reading did with each conversation; reported at the end of packing."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    dropped: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)  # reason -> first "FILE:LINE: message"

    def drop(self, err: BadExample, where: str) -> None:
        self.dropped[err.reason] += 1
        self.first.setdefault(err.reason, f"{where}: {err}")

    def merge(self, other: ChatStats) -> None:
        self.read += other.read
        self.kept += other.kept
        self.truncated += other.truncated
        self.tokens += other.tokens
        self.loss_tokens += other.loss_tokens
        self.dropped.update(other.dropped)
        for k, v in other.first.items():
            self.first.setdefault(k, v)

    def as_dict(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "truncated": self.truncated, "tokens": self.tokens,
                "loss_tokens": self.loss_tokens, "dropped": dict(self.dropped), "first": dict(self.first)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChatStats:
        ints = {k: int(d.get(k, 0)) for k in ("read", "kept", "truncated", "tokens", "loss_tokens")}
        return cls(**ints, dropped=Counter(d.get("dropped", {})), first=dict(d.get("first", {})))


def _jsonl_records(path: Path) -> Iterator[tuple[Any, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                record = loads_line(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                record = BadExample("bad_record", f"not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})")
            except BadJSONLine as err:
                record = BadExample("bad_record", str(err))
            yield record, where


def _parquet_records(path: Path) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    names = pf.schema_arrow.names
    if "messages" not in names:
        raise UserError(f"{path}: no 'messages' column (columns: {', '.join(names)})")
    _check_messages_type(path, pf.schema_arrow.field("messages").type)
    columns = ["messages"] + (["lang"] if "lang" in names else [])
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield rec, f"{path}:row {row}"


def _check_messages_type(path: Path, kind: Any) -> None:
    """A 'messages' column must hold lists of structs (role, content); a column of another type
    would have every row dropped one by one, so it is refused up front, naming the type."""
    import pyarrow as pa

    expected = "expected a list of {role: string, content: string} structs"
    if not ((pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_struct(kind.value_type)):
        raise UserError(f"{path}: column 'messages' has type {kind}; {expected}")
    struct = kind.value_type
    for name in ("role", "content"):
        index = struct.get_field_index(name)
        if index < 0:
            raise UserError(f"{path}: column 'messages' has no field {name!r} ({struct}); {expected}")
        field_type = struct.field(index).type
        if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type) or pa.types.is_null(field_type)):
            raise UserError(f"{path}: column 'messages': field {name!r} has type {field_type}; {expected}")


def _dataset_records(path: Path) -> Iterator[tuple[Any, str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"{path}: not a dataset saved with save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise UserError(f"{path}: holds several splits; pass one of them: {', '.join(f'{path}/{s}' for s in ds)}")
    if "messages" not in ds.column_names:
        raise UserError(f"{path}: no 'messages' column (columns: {', '.join(ds.column_names)})")
    columns = ["messages"] + (["lang"] if "lang" in ds.column_names else [])
    for row, rec in enumerate(ds.select_columns(columns), 1):
        yield rec, f"{path}:row {row}"


def iter_chat_records(path: str | Path) -> Iterator[tuple[Any, str]]:
    """``(record, "FILE:LINE")`` for each conversation in a JSONL file, a Parquet file or a
    ``save_to_disk`` directory (records have ``messages`` and optionally ``lang``). Lines that
    are not JSON come back as a :class:`BadExample` in place of the record."""
    path = Path(path)
    if path.is_dir():
        return _dataset_records(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file or directory")
    if path.suffix == ".jsonl":
        return _jsonl_records(path)
    if path.suffix == ".parquet":
        return _parquet_records(path)
    raise UserError(f"{path}: unsupported chat data; expected .jsonl, .parquet or a save_to_disk directory")


@dataclass(frozen=True)
class Encoded:
    """One conversation ready to pack."""

    input_ids: np.ndarray  # int32
    assistant_mask: np.ndarray  # bool
    lang: int = UNKNOWN_LANG


class ChatReader:
    """Reads conversations, encodes them and applies the over-long policy.

    ``overlong="drop"`` drops (and counts) conversations longer than ``seq_len``;
    ``"truncate"`` first drops the oldest turns (keeping a leading system message) and, if the
    final user + assistant exchange is still too long, keeps the last ``seq_len`` tokens as
    long as the final assistant turn and its header (generation prompt) fit in them. ``strict`` turns the first dropped
    conversation into a :class:`UserError` naming its file and line.
    """

    def __init__(self, template: ChatTemplate, seq_len: int, overlong: Overlong = "drop", strict: bool = False,
                 pad_to_multiple_of: int = 1) -> None:
        if overlong not in ("drop", "truncate"):
            raise UserError(f"overlong: expected 'drop' or 'truncate', got {overlong!r}")
        self.template, self.seq_len, self.overlong, self.strict = template, seq_len, overlong, strict
        self.multiple = pad_to_multiple_of
        self.stats = ChatStats()

    def _fits(self, n: int) -> bool:
        return -(-n // self.multiple) * self.multiple <= self.seq_len

    def fit(self, messages: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, bool]:
        """``(ids, mask, truncated)`` of a checked conversation within ``seq_len``."""
        ids, mask = self.template.encode(messages)
        if self._fits(len(ids)):
            return ids, mask, False
        too_long = BadExample("too_long", f"{len(ids):,} tokens, longer than seq_len {self.seq_len:,}")
        if self.overlong == "drop":
            raise too_long
        head = messages[:1] if messages[0]["role"] == "system" else []
        body = messages[len(head):]
        for j in range(1, len(body)):
            if body[j]["role"] != "user":
                continue
            try:
                ids, mask = self.template.encode(head + body[j:])
            except BadExample:
                continue  # e.g. a template that insists on a particular first turn
            if self._fits(len(ids)):
                return ids, mask, True
        keep = self.seq_len - self.seq_len % self.multiple
        runs = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8)])) == 1)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        header = self.template.generation_prompt_len(messages[:last])
        if runs.size and len(ids) - int(runs[-1]) + header <= keep:  # the final answer and its header fit
            return ids[-keep:], mask[-keep:], True
        raise too_long

    def example(self, record: Any, where: str, default_lang: int = UNKNOWN_LANG) -> Encoded | None:
        """Encode one record, or count it as dropped (``None``); strict mode raises instead."""
        self.stats.read += 1
        try:
            if isinstance(record, BadExample):
                raise record
            if not isinstance(record, dict):
                got = type(record).__name__
                raise BadExample("bad_record", f"expected an object with a 'messages' field, got {got}")
            if "messages" not in record:
                raise BadExample("bad_record", "field 'messages' is missing")
            messages = check_messages(record["messages"])
            ids, mask, truncated = self.fit(messages)
        except BadExample as err:
            if self.strict:
                hint = " (overlong: truncate keeps the final assistant turn)" if err.reason == "too_long" else ""
                raise UserError(f"{where}: {err}{hint}") from None
            self.stats.drop(err, where)
            return None
        lang = record.get("lang")
        lid = lang_id(lang) if isinstance(lang, str) and lang else default_lang
        self.stats.kept += 1
        self.stats.truncated += int(truncated)
        self.stats.tokens += len(ids)
        self.stats.loss_tokens += int(mask.sum())
        return Encoded(ids, mask, lid)

    def read(self, path: str | Path, default_lang: int = UNKNOWN_LANG) -> Iterator[Encoded]:
        """The usable conversations of one file or dataset directory, in file order."""
        for record, where in iter_chat_records(path):
            ex = self.example(record, where, default_lang)
            if ex is not None:
                yield ex
