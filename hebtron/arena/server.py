"""``hebtron arena serve``: the voting web app (Starlette, server-rendered Jinja2, no build step).

A voter sees one prompt and two anonymized answers side by side (right-to-left where the text
is Hebrew) and clicks A better, B better, tie or both bad. Pairs come from
:func:`hebtron.arena.pairing.choose_battle`. A vote is one transaction in the arena database
(:func:`hebtron.eval.arena_store.record_vote`) with the voter id from a cookie and the time; the
database refuses a second vote by the same voter on the same pair. ``/results`` shows the
standings.

Safety, since it may run on a cluster's login node: it binds to 127.0.0.1 unless told otherwise,
and ``--token`` asks for a shared secret before anything is shown. Templates autoescape every
value. Forms carry a CSRF token (an HMAC of the voter id under a per-process key) and cross-site
posts are refused; the battle a vote is about is signed the same way, so a vote names only a pair
the server showed that voter. Bodies over 16 KiB get 413, malformed requests 400/403/404/409,
and an unexpected error a plain 500 page, never a traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import re
import secrets
from contextlib import closing
from pathlib import Path
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from hebtron.arena.pairing import choose_battle
from hebtron.eval import arena_store

TEMPLATES = Path(__file__).with_name("templates")
VOTER_COOKIE, AUTH_COOKIE = "arena_voter", "arena_auth"
VOTER_RE = re.compile(r"^[0-9a-f]{32}$")
BATTLE_RE = re.compile(r"^([0-9]{1,9})\.([0-9]{1,9})\.([0-9]{1,9})\.([0-9a-f]{32})$")
MAX_BODY = 16 * 1024
LABELS = {"a": "A better", "b": "B better", "tie": "Tie", "both_bad": "Both bad"}
HEBREW = re.compile(r"[\u0590-\u05FF\uFB1D-\uFB4F]")
LATIN = re.compile(r"[A-Za-z\u00C0-\u024F]")
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def same(given: str, expected: str) -> bool:
    """Constant-time comparison of any two strings (hmac.compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(given.encode("utf-8", "backslashreplace"), expected.encode("utf-8", "backslashreplace"))


def text_direction(text: str) -> str:
    """``rtl`` when Hebrew letters are at least as many as Latin ones (and there are some)."""
    hebrew = len(HEBREW.findall(text))
    return "rtl" if hebrew and hebrew >= len(LATIN.findall(text)) else "ltr"


class GuardMiddleware:
    """Pure ASGI: refuses bodies over ``limit`` bytes (by Content-Length, and while streaming) and
    adds the security headers to every response."""

    def __init__(self, app: Any, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in have]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            status = 413 if length.isdigit() else 400
            await HTMLResponse(_plain_page(status, "Request body too large." if status == 413 else "Bad request."),
                               status_code=status)(scope, receive, send_with_headers)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, "Request body too large.")
            return message

        await self.app(scope, limited_receive, send_with_headers)


def _plain_page(status: int, message: str) -> str:
    from html import escape

    return (f"<!doctype html><html lang=en><meta charset=utf-8><title>{status}</title>"
            f"<body><h1>{status}</h1><p>{escape(message)}</p><p><a href=\"/\">Back to voting</a></p></body></html>")


class Arena:
    """The app's state: database path, per-process secret, optional shared token."""

    def __init__(self, arena: str | Path, token: str | None = None, secret: bytes | None = None,
                 rounds: int = 300) -> None:
        self.db = arena_store.db_path(Path(arena))
        with closing(arena_store.connect(self.db)):  # fails now (exit 2) when it is not an arena database
            pass
        self.token = token or None
        self.secret = secret or secrets.token_bytes(32)
        self.rounds = rounds
        self.rng = random.Random(secrets.randbits(64))
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                 undefined=jinja2.StrictUndefined)
        self.templates = Jinja2Templates(env=env)

    # --------------------------------------------------------------- signing
    def _sign(self, purpose: str, value: str, n: int = 32) -> str:
        return hmac.new(self.secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()[:n]

    def csrf(self, voter: str) -> str:
        return self._sign("csrf", voter, 40)

    def auth_cookie(self, voter: str) -> str:
        """Proof that this voter gave the token (bound to the voter: not transferable)."""
        return self._sign("auth", voter, 40)

    def battle_token(self, voter: str, battle: tuple[int, int, int]) -> str:
        payload = ".".join(map(str, battle))
        return f"{payload}.{self._sign('battle:' + voter, payload)}"

    def parse_battle(self, voter: str, token: str) -> tuple[int, int, int]:
        match = BATTLE_RE.fullmatch(token)
        if not match:
            raise HTTPException(400, "Malformed battle id.")
        battle = (int(match[1]), int(match[2]), int(match[3]))
        if not same(match[4], self._sign("battle:" + voter, ".".join(map(str, battle)))):
            raise HTTPException(400, "Unknown battle id (not one this server showed you).")
        return battle

    # --------------------------------------------------------------- request helpers
    @staticmethod
    def voter_of(request: Request) -> tuple[str, bool]:
        """(voter id, whether it is new and must be set as a cookie)."""
        voter = request.cookies.get(VOTER_COOKIE, "")
        return (voter, False) if VOTER_RE.fullmatch(voter) else (secrets.token_hex(16), True)

    def authorized(self, request: Request, voter: str) -> bool:
        return self.token is None or same(request.cookies.get(AUTH_COOKIE, ""), self.auth_cookie(voter))

    def render(self, request: Request, name: str, voter: str, new_voter: bool, status: int = 200,
               **context: Any) -> Response:
        response = self.templates.TemplateResponse(
            request, name, {"csrf": self.csrf(voter), "token_required": self.token is not None, **context},
            status_code=status)
        if new_voter:
            set_cookie(response, VOTER_COOKIE, voter)
        return response

    @staticmethod
    def check_origin(request: Request) -> None:
        """Refuse cross-site posts (the browser says where a form came from)."""
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise HTTPException(403, "Cross-site form posts are refused.")
        origin = request.headers.get("origin")
        if origin and origin != "null" and origin.rstrip("/") != f"{request.url.scheme}://{request.url.netloc}":
            raise HTTPException(403, "Cross-site form posts are refused.")

    async def form(self, request: Request, voter: str, fields: tuple[str, ...]) -> dict[str, str]:
        self.check_origin(request)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            raise HTTPException(415, "Expected a form post (application/x-www-form-urlencoded).")
        await request.body()  # whole first (at most MAX_BODY, else 413), so a big body is 413 however it arrives
        try:
            form = await request.form(max_files=0, max_fields=8, max_part_size=4096)
        except HTTPException:
            raise
        except Exception:  # noqa: BLE001 - any malformed body is the client's mistake
            raise HTTPException(400, "Malformed form.") from None
        values = {}
        for name in fields:
            value = form.get(name)
            if not isinstance(value, str):
                raise HTTPException(400, f"Missing form field {name!r}.")
            values[name] = value
        if not same(values["csrf"], self.csrf(voter)):
            raise HTTPException(403, "This form has expired or did not come from this page; reload and try again.")
        return values

    # --------------------------------------------------------------- database work (threads)
    def next_battle(self, voter: str) -> dict[str, Any] | None:
        with arena_store.opened(self.db) as conn:
            battle = choose_battle(arena_store.answers_by_model(conn), arena_store.pair_prompt_counts(conn),
                                   arena_store.voted_by(conn, voter), self.rng)
            if battle is None:
                return None
            prompt_id, a, b = battle
            prompt = arena_store.prompt(conn, prompt_id)
            answers = [arena_store.answer(conn, m, prompt_id) for m in (a, b)]
            mine = len(arena_store.voted_by(conn, voter))
        turns = [{"role": m["role"], "text": m["content"], "dir": text_direction(m["content"])}
                 for m in prompt.messages if m["role"] != "system"]
        return {"battle": self.battle_token(voter, battle), "turns": turns, "mine": mine,
                "answers": [{"label": label, "text": text, "dir": text_direction(text)}
                            for label, text in zip("AB", answers, strict=True)]}

    def vote(self, voter: str, battle: tuple[int, int, int], outcome: str) -> bool:
        prompt_id, a, b = battle
        with arena_store.opened(self.db) as conn:
            try:
                return arena_store.record_vote(conn, prompt_id, a, b, outcome, voter)
            except ValueError:
                raise HTTPException(404, "No such pair of answers.") from None

    def standings(self) -> dict[str, Any]:
        with arena_store.opened(self.db) as conn:
            table = arena_store.read_standings(conn, rounds=self.rounds)
        return {"table": table}


def set_cookie(response: Response, name: str, value: str) -> None:
    response.set_cookie(name, value, max_age=365 * 24 * 3600, httponly=True, samesite="strict", path="/")


def build_app(arena: str | Path, token: str | None = None, secret: bytes | None = None, rounds: int = 300,
              max_body: int = MAX_BODY) -> Starlette:
    """The ASGI app over an arena directory (or its arena.sqlite)."""
    state = Arena(arena, token, secret, rounds)

    async def index(request: Request) -> Response:
        voter, new = state.voter_of(request)
        if not state.authorized(request, voter):
            return RedirectResponse("/login", status_code=303)
        battle = await run_in_threadpool(state.next_battle, voter)
        if battle is None:
            return state.render(request, "done.html", voter, new)
        return state.render(request, "battle.html", voter, new, voted=request.query_params.get("voted") == "1",
                            labels=LABELS, **battle)

    async def vote(request: Request) -> Response:
        voter, new = state.voter_of(request)
        if new:
            raise HTTPException(403, "No voter cookie: open the voting page first (cookies must be on).")
        values = await state.form(request, voter, ("csrf", "battle", "outcome"))
        if not state.authorized(request, voter):
            raise HTTPException(403, "This arena needs its access token: log in first.")
        if values["outcome"] not in LABELS:
            raise HTTPException(400, "Unknown outcome.")
        battle = state.parse_battle(voter, values["battle"])
        if not await run_in_threadpool(state.vote, voter, battle, values["outcome"]):
            raise HTTPException(409, "You already voted on this pair.")
        return RedirectResponse("/?voted=1", status_code=303)

    async def results(request: Request) -> Response:
        voter, new = state.voter_of(request)
        if not state.authorized(request, voter):
            return RedirectResponse("/login", status_code=303)
        return state.render(request, "results.html", voter, new, **await run_in_threadpool(state.standings))

    async def login(request: Request) -> Response:
        voter, new = state.voter_of(request)
        if request.method == "GET":
            return state.render(request, "login.html", voter, new, failed=False)
        if new:
            raise HTTPException(403, "No voter cookie: open the login page first (cookies must be on).")
        values = await state.form(request, voter, ("csrf", "token"))
        if state.token is None:
            return RedirectResponse("/", status_code=303)
        if not same(values["token"], state.token):
            return state.render(request, "login.html", voter, False, status=403, failed=True)
        response = RedirectResponse("/", status_code=303)
        set_cookie(response, AUTH_COOKIE, state.auth_cookie(voter))
        return response

    async def stylesheet(request: Request) -> Response:
        return Response((TEMPLATES / "arena.css").read_text(encoding="utf-8"), media_type="text/css")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) and status != 500 else "Something went wrong."
        if status == 404 and detail == "Not Found":
            detail = "No such page."
        headers = getattr(exc, "headers", None) or {}
        return HTMLResponse(_plain_page(status, str(detail)), status_code=status, headers=headers)

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/vote", vote, methods=["POST"]),
        Route("/results", results, methods=["GET"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/arena.css", stylesheet, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    return Starlette(debug=False, routes=routes, middleware=[Middleware(GuardMiddleware, limit=max_body)],
                     exception_handlers={HTTPException: http_error, Exception: http_error})


def serve(arena: str | Path, host: str = "127.0.0.1", port: int = 8088, token: str | None = None) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    app = build_app(arena, token)
    print(f"arena: serving {arena_store.db_path(Path(arena))} at http://{host}:{port}/ "
          f"(results at /results{', token required' if token else ''}); Ctrl-C stops", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False,
                h11_max_incomplete_event_size=MAX_BODY)
