"""The reader study's web app: FastAPI with Jinja2 templates (``templates/``).

A reader gives their name (and, when the app is reachable beyond this machine, the study's
access code), then reads one image at a time in their own shuffled order: real or
synthetic, realism 1-5, the class they see. Every answer is stored at once, so closing the
browser loses nothing; giving the same name again resumes. Keyboard: R / S, 1-5, the class
letters shown on the page, Enter to go on.
"""

from __future__ import annotations

import hmac
import math
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from fastapi import Cookie, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from fedtwin.review.guards import MAX_BODY, AllowedHosts, Attempts, BodyLimit, SameOrigin
from fedtwin.review.store import Study, StudyFull

COOKIE = "fedtwin_review"
LOCAL_HOSTS = ("127.0.0.1", "localhost")
TEMPLATES = Jinja2Templates(directory=Path(__file__).with_name("templates"))
# class keys: letters, leaving R and S (real / synthetic) to their answers
CLASS_KEYS = [c for c in string.ascii_lowercase if c not in "rs"]
HEADERS = {
    "Cache-Control": "no-store",  # real images are not left in a browser's cache
    # no URL to other sites; a form post keeps its Origin (under no-referrer it is "null")
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}


def make_app(
    study: Study,
    access_code: str | None = None,
    secure_cookie: bool = False,
    allowed_hosts: Sequence[str] = LOCAL_HOSTS,
    max_body: int = MAX_BODY,
) -> FastAPI:
    """The app for ``study``; with ``access_code`` a reader must give it to log in.
    Requests for another host name than ``allowed_hosts`` are refused: a web page the
    reader has open elsewhere cannot reach the app through a domain that resolves to
    127.0.0.1 (DNS rebinding), and so is a form post from another site (``SameOrigin``). A
    request body over ``max_body`` bytes is refused (413) before it is read. A client that
    gave ``MAX_CODE_TRIES`` wrong access codes in a minute is answered 429 until then."""
    app = FastAPI(title="fedtwin reader study", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SameOrigin)
    app.add_middleware(AllowedHosts, hosts=list(allowed_hosts))  # outside: runs first
    attempts = Attempts()
    names = study.class_names
    classes = [
        (i, name, CLASS_KEYS[i] if i < len(CLASS_KEYS) else "") for i, name in enumerate(names)
    ]

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(HEADERS)
        return response

    app.add_middleware(BodyLimit, limit=max_body)  # added last: the outermost, first to run

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, name, context, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def start(request: Request, session: Annotated[str | None, Cookie(alias=COOKIE)] = None):
        return page(
            request, "start.html", reader=study.reader_of(session), need_code=bool(access_code)
        )

    @app.post("/login")
    def login(
        request: Request,
        name: Annotated[str, Form()] = "",
        code: Annotated[str, Form()] = "",
    ):
        def refused(status: int, error: str) -> HTMLResponse:
            return page(
                request, "start.html", status, reader=None, need_code=bool(access_code),
                error=error,
            )  # fmt: skip

        if access_code:
            address = request.client.host if request.client else ""
            wait = attempts.wait_s(address)
            if wait > 0:
                response = refused(429, f"Too many wrong codes: try again in {math.ceil(wait)} s.")
                response.headers["Retry-After"] = str(math.ceil(wait))
                return response
            if not hmac.compare_digest(code.encode(), access_code.encode()):
                attempts.failed(address)
                return refused(403, "That access code is not this study's.")
        try:
            token = study.login(name)
        except StudyFull as e:
            return refused(403, str(e))
        except ValueError as e:
            return refused(400, str(e))
        response = RedirectResponse("/read", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=secure_cookie)
        return response

    @app.get("/logout")
    def logout(session: Annotated[str | None, Cookie(alias=COOKIE)] = None):
        study.logout(session)  # the session ends here, not only in this browser
        response = RedirectResponse("/?stopped=1", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    def read_page(request: Request, reader: str, status: int = 200, error: str = ""):
        item, done, total = study.next_item(reader)
        if item is None:
            return page(request, "done.html", reader=reader, total=total)
        return page(
            request, "read.html", status, reader=reader, token=item.token, done=done,
            total=total, classes=classes, error=error,
        )  # fmt: skip

    @app.get("/read", response_class=HTMLResponse)
    def read(request: Request, session: Annotated[str | None, Cookie(alias=COOKIE)] = None):
        reader = study.reader_of(session)
        if reader is None:
            return RedirectResponse("/", status_code=303)
        return read_page(request, reader)

    @app.post("/answer")
    def answer(
        request: Request,
        session: Annotated[str | None, Cookie(alias=COOKIE)] = None,
        token: Annotated[str, Form()] = "",
        said: Annotated[str, Form()] = "",
        realism: Annotated[str, Form()] = "",
        label: Annotated[str, Form()] = "",
    ):
        reader = study.reader_of(session)
        if reader is None:
            return RedirectResponse("/", status_code=303)
        missing = [
            what
            for what, ok in (
                ("real or synthetic", said in ("real", "synthetic")),
                ("realism 1-5", realism in {"1", "2", "3", "4", "5"}),
                ("the class", bool(re.fullmatch(r"[0-9]{1,4}", label)) and int(label) < len(names)),
            )
            if not ok
        ]
        if missing:
            return read_page(request, reader, 400, f"Choose {', '.join(missing)}.")
        try:
            study.record(reader, token, said == "real", int(realism), int(label))
        except ValueError as e:
            return read_page(request, reader, 400, str(e))
        return RedirectResponse("/read", status_code=303)

    @app.get("/image/{token}")
    def image(token: str, session: Annotated[str | None, Cookie(alias=COOKIE)] = None):
        if study.reader_of(session) is None:
            raise HTTPException(status_code=403, detail="log in first")
        data = study.image(token)
        if data is None:
            raise HTTPException(status_code=404, detail="no such image")
        return Response(data, media_type="image/png")

    return app
