"""``hebtron data prepare|pack`` and ``hebtron tokenizer train|report``.

``hebtron data demo`` joins the ``data`` group from :mod:`hebtron.demo.commands` (demo code
sits above this layer).

Handlers import their heavy modules (datasets, tokenizers, megatron.core) lazily so that
``hebtron --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build corpora and tokenized (Megatron indexed) datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    prep = data_sub.add_parser("prepare", help="tokenize JSONL/Parquet/HF dataset into PREFIX.bin/.idx (+ .lang.npy)")
    prep.add_argument("--input", nargs="+", required=True, metavar="FILE",
                      help=".jsonl (fields text, lang), .parquet, or a save_to_disk directory; concatenated in order")
    prep.add_argument("--tokenizer", required=True, help="tokenizer directory, or 'tekken'")
    prep.add_argument("--out", required=True, metavar="PREFIX",
                      help="output prefix: PREFIX.bin, .idx, .lang.npy, .meta.json")
    prep.add_argument("--workers", type=int, default=1, help="tokenizer processes (datasets.map num_proc)")
    prep.add_argument("--append-eos", action=argparse.BooleanOptionalAction, default=True,
                      help="end every document with </s> (default: on; Nemotron CPT needs it)")
    prep.add_argument("--eos-token", default="</s>", help="the document terminator token (default </s>)")
    prep.add_argument("--skip-empty", action="store_true", help="drop and count empty documents instead of failing")
    prep.add_argument("--lang", default=None, help="language code for records without a 'lang' field")
    prep.set_defaults(func=_prepare)

    pack = data_sub.add_parser("pack", help="SFT: encode chat data and pack it into rows (Parquet) for reuse")
    pack.add_argument("--input", nargs="+", required=True, metavar="FILE",
                      help="chat data: .jsonl / .parquet with 'messages' (and optional 'lang'), or a save_to_disk "
                           "directory; concatenated in order")
    pack.add_argument("--tokenizer", required=True, type=Path, help="tokenizer directory")
    pack.add_argument("--seq-len", type=int, required=True, help="tokens per row (the recipe's data.seq_len)")
    pack.add_argument("--out", required=True, type=Path, metavar="FILE.parquet", help="output Parquet file")
    pack.add_argument("--template", default="auto",
                      help="auto (the tokenizer's, else ChatML), tokenizer, chatml, or a .jinja file")
    pack.add_argument("--train-on", choices=["all", "last"], default="all", help="assistant turns that carry loss")
    pack.add_argument("--overlong", choices=["drop", "truncate"], default="drop",
                      help="conversations longer than --seq-len: drop, or truncate keeping the final assistant turn")
    pack.add_argument("--strict", action="store_true", help="stop at the first bad conversation")
    pack.add_argument("--pad-to-multiple-of", type=int, default=1, metavar="M",
                      help="pad each conversation to a multiple of M tokens (tensor / context parallelism)")
    pack.add_argument("--buffer", type=int, default=20_000, help="conversations packed together (bounds memory)")
    pack.add_argument("--lang", default=None, help="language code for records without a 'lang' field")
    pack.set_defaults(func=_pack)

    # corpus tools: dedup and cluster (data layer); mix-search trains, so its code sits in launch
    from hebtron.data.corpus_cli import register as register_corpus_tools
    from hebtron.launch.mix.cli import register as register_mix_search

    register_corpus_tools(data_sub)
    register_mix_search(data_sub)

    tok = sub.add_parser("tokenizer", help="train tokenizers and compare their compression")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)
    train = tok_sub.add_parser("train", help="train a byte-level BPE (transformers-loadable directory)")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".jsonl (field text) or text files")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", type=Path, required=True, help="output directory")
    train.add_argument("--min-frequency", type=int, default=2)
    train.set_defaults(func=_train)

    report = tok_sub.add_parser("report", help="tokens per word and chars per token, side by side")
    report.add_argument("--text", action="append", required=True, metavar="FILE",
                        help=".jsonl (field text) or text file; repeat for several")
    report.add_argument("tokenizers", nargs="+", metavar="TOKENIZER", help="tokenizer directories and/or 'tekken'")
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report.set_defaults(func=_report)


def _prepare(args: argparse.Namespace) -> int:
    from hebtron.data.indexed import prepare

    meta = prepare(args.input, args.tokenizer, args.out, workers=args.workers, append_eos=args.append_eos,
                   skip_empty=args.skip_empty, default_lang=args.lang, eos_token=args.eos_token)
    langs = ", ".join(f"{k} {v:,}" for k, v in meta["docs_per_lang"].items())
    print(f"{args.out}: {meta['documents']:,} documents, {meta['tokens']:,} tokens ({meta['dtype']}), "
          f"languages: {langs}")
    if meta["skipped_empty"]:
        print(f"  skipped {meta['skipped_empty']:,} empty documents")
    if meta["unknown_lang"]:
        print(f"  language codes not in hebtron.lang (stored as -1): {meta['unknown_lang']}")
    return 0


def _pack(args: argparse.Namespace) -> int:
    import hashlib

    from hebtron.data.chat import ChatReader, ChatTemplate, read_template_file
    from hebtron.lang import UNKNOWN_LANG, lang_id
    from hebtron.data.packing import PackingReport, PackStats, pack_stream, write_packed_parquet
    from hebtron.data.sft import pad_id_of
    from hebtron.errors import UserError
    from hebtron.data.tokenizer import load_hf_tokenizer

    if args.seq_len < 1 or args.pad_to_multiple_of < 1 or args.seq_len % args.pad_to_multiple_of:
        raise UserError(f"--seq-len {args.seq_len} must be a positive multiple of --pad-to-multiple-of "
                        f"{args.pad_to_multiple_of}")
    if args.buffer < 1:
        raise UserError(f"--buffer must be positive, got {args.buffer}")
    if args.out.suffix != ".parquet":
        raise UserError(f"--out {args.out}: expected a .parquet file name")
    tokenizer = load_hf_tokenizer(args.tokenizer)
    source = args.template
    if Path(source).suffix in (".jinja", ".j2") or Path(source).is_file():
        source = read_template_file(source)
    template = ChatTemplate(tokenizer, source, args.train_on)
    reader = ChatReader(template, args.seq_len, args.overlong, args.strict, args.pad_to_multiple_of)
    default_lang = lang_id(args.lang) if args.lang else UNKNOWN_LANG
    stats = PackStats()

    def examples():
        for path in args.input:
            yield from reader.read(path, default_lang)

    def meta() -> dict:
        return {
            "tokenizer": str(args.tokenizer.resolve()), "vocab_size": len(tokenizer),
            "template_sha256": hashlib.sha256(template.source.encode()).hexdigest(), "train_on": args.train_on,
            "overlong": args.overlong, "pad_to_multiple_of": args.pad_to_multiple_of, "pad_id": pad_id_of(tokenizer),
            "inputs": [str(Path(p).resolve()) for p in args.input], "chat": reader.stats.as_dict(), **stats.as_dict(),
        }

    rows = pack_stream(examples(), args.seq_len, pad_id_of(tokenizer), args.pad_to_multiple_of, args.buffer, stats)
    write_packed_parquet(rows, args.out, args.seq_len, meta)
    for line in PackingReport(str(args.out), reader.stats, stats).lines():
        print(line)
    return 0


def _train(args: argparse.Namespace) -> int:
    from hebtron.data.tokenizer import TextStats, train_tokenizer

    stats = TextStats()
    tok = train_tokenizer(args.input, args.vocab_size, args.out, min_frequency=args.min_frequency, stats=stats)
    print(f"{args.out}: byte-level BPE, {len(tok):,} tokens, trained on {stats.texts:,} texts; "
          f"bos={tok.bos_token_id} eos={tok.eos_token_id} pad={tok.pad_token_id} unk={tok.unk_token_id}")
    if stats.skipped:
        print(f"  {stats.summary()}")
    return 0


def _report(args: argparse.Namespace) -> int:
    import sys

    from hebtron.data.tokenizer import TextStats, tokenizer_report

    stats = TextStats()
    rows = tokenizer_report(args.text, args.tokenizers, stats)
    if args.json:  # stdout stays one JSON document; what was skipped goes beside it
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        if stats.skipped:
            print(f"note: {stats.summary()}", file=sys.stderr)
        return 0
    from rich.console import Console
    from rich.table import Table

    first = rows[0]
    table = Table(title=f"{', '.join(args.text)}: {first['docs']:,} docs, {first['words']:,} words, "
                        f"{first['chars']:,} chars")
    for col in ("tokenizer", "vocab", "tokens", "tokens/word", "chars/token", "bytes/token"):
        table.add_column(col, justify="left" if col == "tokenizer" else "right")
    for r in rows:
        table.add_row(r["tokenizer"], f"{r['vocab_size']:,}", f"{r['tokens']:,}", f"{r['tokens_per_word']:.2f}",
                      f"{r['chars_per_token']:.2f}", f"{r['bytes_per_token']:.2f}")
    Console().print(table)
    if stats.skipped:
        print(stats.summary())
    return 0
