"""The voting app in process (Starlette's TestClient): the access token, escaping on the results
page, balanced pair sampling and the text direction rule."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from starlette.testclient import TestClient

from hebtron.arena.commands import _is_loopback
from hebtron.arena.pairing import choose_battle
from hebtron.arena.server import build_app, text_direction
from hebtron.errors import UserError
from hebtron.eval import arena_store
from tests.arena_fixtures import cast, make_arena

FIELD = re.compile(r'name="(csrf|battle)" value="([^"]*)"')


def test_token_guards_every_page_and_the_vote(tmp_path):
    root = make_arena(tmp_path / "arena", ["cpt", "sft"], ["שאלה אחת", "שאלה שתיים"])
    client = TestClient(build_app(root, token="s3cret"), base_url="http://127.0.0.1:8088")
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/results", follow_redirects=False).status_code == 303
    login = dict(FIELD.findall(client.get("/login").text))
    assert client.post("/login", data={"csrf": login["csrf"], "token": "wrong"}).status_code == 403
    assert client.post("/login", data={"csrf": "0" * 40, "token": "s3cret"}).status_code == 403  # CSRF
    assert client.post("/login", data={"csrf": login["csrf"], "token": "ש"}).status_code == 403  # non-ASCII
    assert client.post("/vote", data={"csrf": login["csrf"], "battle": "1.1.2." + "0" * 32,
                                      "outcome": "a"}).status_code == 403
    r = client.post("/login", data={"csrf": login["csrf"], "token": "s3cret"}, follow_redirects=False)
    assert r.status_code == 303 and "arena_auth" in r.cookies
    fields = dict(FIELD.findall(client.get("/").text))
    assert client.post("/vote", data=fields | {"outcome": "tie"}, follow_redirects=False).status_code == 303
    with arena_store.opened(root) as conn:
        assert [v.outcome for v in arena_store.votes(conn)] == ["tie"]
    # the auth cookie is bound to its voter: another voter's browser cannot reuse it
    other = TestClient(build_app(root, token="s3cret"), base_url="http://127.0.0.1:8088")
    other.cookies.set("arena_auth", client.cookies["arena_auth"])
    assert other.get("/", follow_redirects=False).status_code == 303


def test_results_page_escapes_names_and_a_bad_directory_is_a_user_error(tmp_path):
    root = make_arena(tmp_path / "arena", ["<script>alert(1)</script>", "ok"], ["p"],
                      answer=lambda m, p: "<iframe src=javascript:alert(1)>")
    cast(root, [("ok", "<script>alert(1)</script>", "a")])
    client = TestClient(build_app(root), base_url="http://127.0.0.1:8088")
    page = client.get("/results").text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    battle = client.get("/").text
    assert "<iframe" not in battle and "&lt;iframe src=javascript:alert(1)&gt;" in battle
    with pytest.raises(UserError, match="no arena database"):
        build_app(tmp_path / "nothing")


def test_pairs_are_balanced_and_sides_random():
    """Ten voters, five models (10 pairs), one model answering only half the prompts: every pair
    ends within one vote of the others, each voter sees each (pair, prompt) at most once."""
    rng = random.Random(0)
    answered = {m: set(range(40)) for m in range(1, 5)} | {5: set(range(20))}
    counts: Counter = Counter()
    mine: dict[str, set] = {f"v{i}": set() for i in range(10)}
    left = Counter()
    for step in range(300):
        voter = f"v{step % 10}"
        prompt, a, b = choose_battle(answered, counts, mine[voter], rng)
        key = (min(a, b), max(a, b), prompt)
        assert key not in mine[voter] and prompt in answered[a] & answered[b]
        mine[voter].add(key)
        counts[key] += 1
        left[a < b] += 1
    per_pair = Counter()
    for (lo, hi, _), n in counts.items():
        per_pair[(lo, hi)] += n
    assert len(per_pair) == 10 and max(per_pair.values()) - min(per_pair.values()) <= 1
    assert 120 <= left[True] <= 180  # sides: about half each way
    assert choose_battle({1: {1}, 2: {1}}, {}, {(1, 2, 1)}, rng) is None  # nothing left


def test_direction_follows_the_script_and_loopback_is_recognized():
    assert text_direction("שמירת הקובץ נכשלה") == "rtl"
    assert text_direction("Cannot Save") == "ltr"
    assert text_direction("שמור את File") == "rtl"
    assert text_direction("Save the file now שמור") == "ltr"
    assert text_direction("123 !?") == "ltr"
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("login01")
