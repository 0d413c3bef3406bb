"""Input components that refuse bad API input with a readable message.

Gradio's own preprocessing turns a missing or non-numeric slider value, or an upload that is not
an image, into a generic "the upstream app has raised an exception" error. These subclasses
check first and raise `gr.Error` naming the field, which the browser shows as a toast and a
`gradio_client` caller receives as an exception carrying the message. They render as the
stock components (same front-end block). Subclasses rather than wrapped instances: Gradio
rebuilds a component from its class when an event updates its properties.
(Importing this module makes Gradio write a type stub, demo/components.pyi; it is git-ignored.)
"""

from __future__ import annotations

import html
import math
from typing import Any

import gradio as gr
from PIL import Image

from demo.files import confined_path, input_folders
from unified.apps import inputs
from unified.apps.inputs import image_from_data_url


def user_error(message: str) -> gr.Error:
    """A gr.Error for a user's mistake: the message is shown as text, no server traceback."""
    return gr.Error(html.escape(message, quote=False), print_exception=False)


def check_number(name: str, value: Any, lo: float | None, hi: float | None, *,
                 whole: bool = False) -> int | float:
    """A finite real number (a whole one with `whole`) in [lo, hi], checked by
    unified.apps.inputs (the pipeline's and the command line's messages), or a gr.Error
    that names the field."""
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    try:
        if whole:
            return inputs.whole(name, value, lo, hi)
        return inputs.real(name, value, lo, hi)
    except ValueError as e:
        raise user_error(str(e)) from None


class Knob(gr.Slider):
    """A slider whose value is checked (present, finite, in range; a whole number for a
    slider of precision 0, a fractional step count is refused, not rounded) before Gradio's
    own preprocessing; the message names the knob by its label."""

    def get_block_name(self) -> str:
        return "slider"

    def preprocess(self, payload: Any) -> float:
        return super().preprocess(check_number(self.label or "value", payload, self.minimum,
                                               self.maximum, whole=self.precision == 0))


class WholeNumber(gr.Number):
    """A number field for whole numbers (a seed), checked like `Knob`."""

    def get_block_name(self) -> str:
        return "number"

    def preprocess(self, payload: Any) -> int:
        return check_number(self.label or "value", payload, self.minimum, self.maximum,
                            whole=True)


class ImageUpload(gr.Image):
    """An image input that passes a file path (or the image of a data: URL) on, refusing with
    a readable error:
    - a path outside the upload folder and the example folder (demo/files.py: a payload sent
      without Gradio's `meta` field is not checked by Gradio), with one message that does not
      tell whether the path exists;
    - a `data:` URL image too large to decode (its size is read from the header first;
      Gradio's own preprocessing would decode it whole).
    An uploaded file's pixels are decoded, and their size checked first, by the pipeline.
    Build it with type="filepath", image_mode=None. (No __init__ of its own: Gradio reads a
    component's properties from its __init__ signature.)"""

    def get_block_name(self) -> str:
        return "image"

    def preprocess(self, payload: Any) -> str | Image.Image | None:
        if payload is None:
            return None
        url = getattr(payload, "url", None) or ""
        try:
            if url.startswith("data:"):
                return image_from_data_url(url)
            return confined_path(getattr(payload, "path", None), input_folders())
        except ValueError as e:
            raise user_error(str(e)) from None
