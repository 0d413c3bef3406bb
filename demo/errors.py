"""Every failed API request gets a readable message, never `{"error": null}` or an HTTP 500.

The demo launches with show_error=False, so that an unexpected exception's text (which may
name server paths) is never sent; Gradio then answers `{"error": null}` for anything that is
not a `gr.Error`. `ReadableBlocks` turns what a client can cause into a `gr.Error` with a
message: too few data items (the endpoint's parameters are named), a value of the wrong kind
for a component (a number where the image goes), and, as a last resort, any other failure
(its type only; the traceback goes to the server log). A file path Gradio itself refuses gets
the same message as one the demo refuses (demo/files.py). `exception_handlers()` turns an
unknown API name into HTTP 404 naming the endpoints, for `launch(app_kwargs=...)`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import gradio as gr
import pydantic
from fastapi import Request
from fastapi.responses import JSONResponse
from gradio.exceptions import InvalidPathError
from gradio.route_utils import FnIndexInferError

from demo.components import user_error
from demo.files import REFUSED_PATH

log = logging.getLogger("cola.demo")


def parameter_names(block_fn) -> list[str]:
    """The API parameter names of an event (its handler's parameters, as /info lists them)."""
    try:
        params = [p for p in inspect.signature(block_fn.fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params][: len(block_fn.inputs)]
    return names if len(names) == len(block_fn.inputs) else \
        [getattr(b, "label", None) or f"value {i + 1}" for i, b in enumerate(block_fn.inputs)]


def describe_validation(e: pydantic.ValidationError) -> str:
    """A component's payload of the wrong kind, in one line."""
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()))
    msg = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid")
    if e.title in ("ImageData", "FileData"):  # the demo's only file parameter is the image
        return ('the image must be an uploaded file ({"path": ..., "meta": {"_type": '
                '"gradio.FileData"}}) or {"url": "data:image/png;base64,..."}; got a value of '
                f"the wrong kind ({msg})")
    return f"a value of the wrong kind for {e.title} ({msg})"


class ReadableBlocks(gr.Blocks):
    """gr.Blocks whose failed requests always carry a message (see the module docstring)."""

    def validate_inputs(self, block_fn, inputs: list[Any]) -> None:
        need = len(block_fn.inputs)
        if len(inputs) < need:
            names = parameter_names(block_fn)
            raise user_error(f"/{block_fn.api_name or block_fn.name} takes {need} values "
                             f"({', '.join(names)}), got {len(inputs)}")
        super().validate_inputs(block_fn, inputs)

    async def process_api(self, *args, **kwargs):
        try:
            return await super().process_api(*args, **kwargs)
        except gr.Error:
            raise
        except pydantic.ValidationError as e:
            raise user_error(describe_validation(e)) from None
        except InvalidPathError:  # Gradio's own check of a file sent with `meta`
            raise user_error(REFUSED_PATH) from None
        except Exception as e:  # a failure the checks did not foresee: its type only
            log.exception("request failed")
            raise user_error(f"the request could not be processed ({type(e).__name__}); "
                             "the server keeps serving") from None


def _unknown_api(request: Request, exc: FnIndexInferError) -> JSONResponse:
    blocks = getattr(request.app, "get_blocks", lambda: None)()
    names = sorted(f"/{fn.api_name}" for fn in (blocks.fns.values() if blocks else [])
                   if fn.api_name and getattr(fn, "api_visibility", "public") == "public")
    name = request.path_params.get("api_name", "?")
    return JSONResponse(status_code=404, content={
        "error": f"no API endpoint named /{name}" + (f"; the endpoints are {', '.join(names)}"
                                                      if names else "")})


def exception_handlers() -> dict:
    """FastAPI exception handlers for `launch(app_kwargs={"exception_handlers": ...})`."""
    return {FnIndexInferError: _unknown_api}
