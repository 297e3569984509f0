"""``hebtron arena serve`` as a real process: a real browser votes, hostile requests are refused,
eight voters post at once for 20 s. One server for the module.

The browser is Debian's chromium driven by Playwright (``make test`` installs chromium with
tests/install-browser.sh; Playwright never downloads a browser here). Set
HEBTRON_ARENA_SCREENSHOT=PATH to keep the voting page's screenshot.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from hebtron.eval import arena_store
from tests.arena_fixtures import hebrew_answer, make_arena

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODELS = ["alpha", "beta", "gamma", "delta"]
HOSTILE_PROMPT = 'תרגם: <script>window.pwned = 1</script> "quoted" & <b>bold</b>'
HOSTILE_ANSWER = ('<img src=x onerror="window.pwned=2"></div><script>window.pwned=3</script> '
                  'שמירת הקובץ נכשלה, לא ניתן לשמור את המסמך הזה כעת. נסו שוב מאוחר יותר או פנו למנהל המערכת')
FORM_FIELD = re.compile(r'name="(csrf|battle)" value="([^"]*)"')


def prompts() -> list[str]:
    english = ["Cannot Save", "Open File", "Download as an Archive", "About the Kernel", "Remove all breakpoints?",
               "Advanced Settings", "Contributor List", "Close Tab"]
    out = [f"Translate this user-interface string from English to Hebrew. Reply with the translation only.\n\n"
           f"{english[i % len(english)]} ({i})" for i in range(149)]
    return [*out, HOSTILE_PROMPT]


def answer(model: int, prompt: int) -> str:
    return HOSTILE_ANSWER if prompt == 149 else hebrew_answer(model, prompt)


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = make_arena(tmp_path_factory.mktemp("arena-web") / "arena", MODELS, prompts(), answer)
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "hebtron.cli", "arena", "serve", str(root), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).text == "ok":
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"arena serve did not start: {(root / 'server.log').read_text()}")
        time.sleep(0.1)
    yield {"url": url, "db": root / arena_store.DB_NAME, "root": root, "proc": proc}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    assert "Traceback" not in (root / "server.log").read_text()


def db_rows(db: Path, sql: str, *args) -> list[tuple]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


def model_ids(db: Path) -> dict[str, int]:
    return dict(db_rows(db, "SELECT name, id FROM models"))


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} missing: run tests/install-browser.sh (make test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def battle_of(page) -> tuple[int, int, int]:
    token = page.get_attribute('input[name="battle"]', "value")
    prompt, a, b, _ = token.split(".")
    return int(prompt), int(a), int(b)


def test_browser_votes_land_in_sqlite_double_vote_is_refused_and_results_show(server, browser, tmp_path):
    context = browser.new_context(viewport={"width": 1200, "height": 720}, locale="he-IL")
    page = context.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(server["url"] + "/")
    voter = next(c["value"] for c in context.cookies() if c["name"] == "arena_voter")
    # the voting page: two Hebrew answers, right to left, side by side
    for label in "AB":
        text = page.locator(f"#answer-{label} .text")
        assert text.get_attribute("dir") == "rtl" and text.get_attribute("lang") == "he"
        assert text.evaluate("e => getComputedStyle(e).direction") == "rtl"
        assert text.evaluate("e => getComputedStyle(e).textAlign") in ("right", "start")
    box_a, box_b = page.locator("#answer-A").bounding_box(), page.locator("#answer-B").bounding_box()
    assert box_a["x"] + box_a["width"] <= box_b["x"] and abs(box_a["y"] - box_b["y"]) < 2
    # the Hebrew text hugs the right edge of its box (measured on the rendered glyphs)
    ink = page.locator("#answer-A .text").evaluate(
        "e => { const r = document.createRange(); r.selectNodeContents(e); const t = r.getBoundingClientRect();"
        " const b = e.getBoundingClientRect(); return [b.right - t.right, t.left - b.left]; }")
    assert ink[0] < 2 and ink[1] > 20
    shot = tmp_path / "arena-vote.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("HEBTRON_ARENA_SCREENSHOT"):
        shutil.copy(shot, os.environ["HEBTRON_ARENA_SCREENSHOT"])

    cast = []
    for outcome in ("a", "b", "tie", "both_bad"):
        battle = battle_of(page)
        fields = dict(FORM_FIELD.findall(page.content()))
        page.click(f"#vote-{outcome}")
        page.wait_for_selector(".flash")
        assert "Vote recorded" in page.inner_text(".flash")
        cast.append((battle, outcome, fields))
    rows = db_rows(server["db"], "SELECT prompt_id, model_a, model_b, outcome, created FROM votes WHERE voter = ? "
                                 "ORDER BY id", voter)
    assert [((p, a, b), o) for p, a, b, o, _ in rows] == [(battle, outcome) for battle, outcome, _ in cast]
    assert all(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", created) for *_, created in rows)
    # the same form submitted again from the browser (a second tab, a double click): refused, not stored
    battle, _, fields = cast[0]
    with page.expect_navigation():  # wait for the post's page, not for the one already loaded
        page.evaluate("""f => { const form = document.createElement('form'); form.method = 'post'; form.action = '/vote';
            for (const [k, v] of Object.entries(f)) { const i = document.createElement('input'); i.type = 'hidden';
            i.name = k; i.value = v; form.appendChild(i); } document.body.appendChild(form); form.submit(); }""",
                      fields | {"outcome": "b"})
    assert "already voted on this pair" in page.inner_text("body")
    assert len(db_rows(server["db"], "SELECT id FROM votes WHERE voter = ?", voter)) == 4
    # the results page shows the standings
    page.goto(server["url"] + "/results")
    standings = page.locator("#standings tbody tr")
    assert standings.count() == len(MODELS)
    shown = {standings.nth(i).locator(".model").inner_text() for i in range(len(MODELS))}
    assert shown == set(MODELS)
    total = len(db_rows(server["db"], "SELECT id FROM votes"))
    assert f"{total} vote" in page.inner_text("main")
    assert not dialogs
    context.close()


def test_hostile_text_is_shown_escaped_and_never_runs(server, browser):
    """A voter who voted on everything but the one hostile battle is shown that battle."""
    ids = model_ids(server["db"])
    hostile = db_rows(server["db"], "SELECT id FROM prompts ORDER BY id")[-1][0]
    voter = "0123456789abcdef" * 2
    with closing(arena_store.connect(server["root"])) as conn:
        for i, a in enumerate(MODELS):
            for b in MODELS[i + 1:]:
                for (p,) in conn.execute("SELECT id FROM prompts").fetchall():
                    if (p, a, b) != (hostile, "alpha", "beta"):
                        arena_store.record_vote(conn, p, ids[a], ids[b], "tie", voter)
    context = browser.new_context()
    context.add_cookies([{"name": "arena_voter", "value": voter, "url": server["url"]}])
    page = context.new_page()
    dialogs, errors = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(server["url"] + "/")
    assert battle_of(page)[0] == hostile
    assert page.inner_text(".prompt .turn") == HOSTILE_PROMPT
    assert page.inner_text("#answer-A .text") == HOSTILE_ANSWER == page.inner_text("#answer-B .text")
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.locator("main script, main img, main b").count() == 0
    assert "&lt;script&gt;window.pwned" in page.content()
    page.click("#vote-both_bad")
    page.wait_for_selector(".flash")
    assert "every pair" in page.inner_text("main")  # nothing left for this voter
    assert not dialogs
    context.close()


def test_bad_requests_get_4xx_never_a_traceback(server):
    url = server["url"]
    with httpx.Client(base_url=url, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert "default-src 'none'" in page.headers["content-security-policy"]
        fields = dict(FORM_FIELD.findall(page.text))
        ok_form = fields | {"outcome": "a"}

        def post(data=None, status=None, **kw):
            r = client.post("/vote", data=data, follow_redirects=False, **kw)
            assert "Traceback" not in r.text and "File \"" not in r.text
            if status is not None:
                assert r.status_code in (status if isinstance(status, tuple) else (status,)), (data, r.status_code, r.text)
            return r

        post(fields | {"outcome": "a", "battle": "1.2.3.zz"}, 400)
        post(fields | {"outcome": "a", "battle": "99999999999.1.2." + "0" * 32}, 400)
        post(fields | {"outcome": "a", "battle": "../../etc/passwd"}, 400)
        prompt, a, b, sig = fields["battle"].split(".")
        post(fields | {"outcome": "a", "battle": f"{prompt}.{a}.{int(b) % 4 + 1}.{sig}"}, 400)  # forged pair
        post(fields | {"outcome": "a", "battle": f"{prompt}.{b}.{a}.{sig}"}, 400)
        post(fields | {"outcome": "<script>"}, 400)
        post({"battle": fields["battle"], "outcome": "a"}, 400)  # no csrf field
        post(ok_form | {"csrf": "0" * 40}, 403)
        post(ok_form, 403, headers={"origin": "http://evil.example"})
        post(ok_form, 403, headers={"sec-fetch-site": "cross-site"})
        post(None, 415, content=b'{"outcome": "a"}', headers={"content-type": "application/json"})
        post(None, 413, content=b"outcome=a&x=" + b"A" * 200_000,
             headers={"content-type": "application/x-www-form-urlencoded"})
        chunks = (b"outcome=a&x=" + b"B" * 8192 for _ in range(8))  # no Content-Length: counted while streaming
        post(None, 413, content=chunks, headers={"content-type": "application/x-www-form-urlencoded"})
        post(None, (400, 403), content=b"csrf=\xff\xfe&battle=%zz&outcome=a",
             headers={"content-type": "application/x-www-form-urlencoded"})
        assert client.get("/vote").status_code == 405
        assert client.get("/no/such/page").status_code == 404
        assert client.get("/?voted=<script>").status_code == 200
        assert "<script>" not in client.get("/?voted=<script>").text
        assert post(ok_form, 303).headers["location"] == "/?voted=1"  # the same form, intact, still votes
        assert post(ok_form, 409).status_code == 409
    with httpx.Client(base_url=url, timeout=30) as stranger:  # no voter cookie at all
        assert stranger.post("/vote", data=ok_form).status_code == 403
    with httpx.Client(base_url=url, timeout=30, cookies={"arena_voter": "'; DROP TABLE votes; --"}) as odd:
        page = odd.get("/")
        assert page.status_code == 200 and re.match(r"^[0-9a-f]{32}$", page.cookies["arena_voter"])
    assert server["proc"].poll() is None
    assert db_rows(server["db"], "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.slow
def test_eight_voters_posting_at_once_for_20_seconds(server):
    """No vote lost (every 303 is a row), none duplicated (every 409 was a real repeat, and 8
    simultaneous posts of one battle store one vote), the database consistent."""
    url, db = server["url"], server["db"]
    before = len(db_rows(db, "SELECT id FROM votes"))
    stop_at = time.monotonic() + 20.0
    accepted: dict[str, list[tuple[str, str]]] = {}
    problems: list[str] = []
    start = threading.Barrier(8)

    def voter(n: int) -> None:
        outcomes = ("a", "b", "tie", "both_bad")
        with httpx.Client(base_url=url, timeout=30) as client:
            client.get("/")
            me = client.cookies["arena_voter"]
            mine = accepted.setdefault(me, [])
            start.wait()
            i = 0
            while time.monotonic() < stop_at:
                page = client.get("/")
                fields = dict(FORM_FIELD.findall(page.text))
                if "battle" not in fields:
                    break  # voted on everything
                r = client.post("/vote", data=fields | {"outcome": outcomes[(n + i) % 4]}, follow_redirects=False)
                if r.status_code == 303:
                    mine.append((fields["battle"], outcomes[(n + i) % 4]))
                else:
                    problems.append(f"voter {n}: {r.status_code} {r.text[:200]}")
                if i % 7 == 0:  # a repeat of the vote just cast is refused
                    again = client.post("/vote", data=fields | {"outcome": "a"}, follow_redirects=False)
                    if again.status_code != 409:
                        problems.append(f"voter {n}: repeat got {again.status_code}")
                i += 1

    threads = [threading.Thread(target=voter, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not problems, problems[:5]
    total = sum(len(v) for v in accepted.values())
    print(f"8 voters, 20 s: {total} votes accepted ({total / 20:.0f}/s)")
    assert total > 200
    for voter_id, mine in accepted.items():
        rows = db_rows(db, "SELECT prompt_id, model_a, model_b, outcome FROM votes WHERE voter = ? ORDER BY id", voter_id)
        expected = [(*map(int, battle.split(".")[:3]), outcome) for battle, outcome in mine]
        assert rows == expected  # nothing lost, nothing extra, in the order cast
    assert len(db_rows(db, "SELECT id FROM votes")) == before + total
    # eight posts of one battle at the same instant: one vote
    with httpx.Client(base_url=url, timeout=30) as client:
        fields = dict(FORM_FIELD.findall(client.get("/").text))
        gate = threading.Barrier(8)
        codes: list[int] = []

        def racer() -> None:
            gate.wait()
            codes.append(client.post("/vote", data=fields | {"outcome": "a"}, follow_redirects=False).status_code)

        racers = [threading.Thread(target=racer) for _ in range(8)]
        for t in racers:
            t.start()
        for t in racers:
            t.join()
        assert sorted(codes) == [303] + [409] * 7
        assert len(db_rows(db, "SELECT id FROM votes WHERE voter = ?", client.cookies["arena_voter"])) == 1
    assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert db_rows(db, "PRAGMA foreign_key_check") == []
    assert db_rows(db, "SELECT voter, prompt_id, pair_lo, pair_hi, COUNT(*) FROM votes "
                       "GROUP BY voter, prompt_id, pair_lo, pair_hi HAVING COUNT(*) > 1") == []
    assert db_rows(db, "SELECT COUNT(*) FROM votes v LEFT JOIN answers x ON x.prompt_id = v.prompt_id AND "
                       "x.model_id = v.model_a LEFT JOIN answers y ON y.prompt_id = v.prompt_id AND "
                       "y.model_id = v.model_b WHERE x.id IS NULL OR y.id IS NULL") == [(0,)]
