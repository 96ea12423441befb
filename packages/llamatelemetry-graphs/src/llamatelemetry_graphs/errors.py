"""The errors of CUDA graph capture and replay, and the rules a capture must follow.

A CUDA graph records GPU work issued on one stream and replays it later without the host. Anything that needs
the host in the middle of that work, or that escapes the capturing stream, cannot be recorded: CUDA then fails
with a terse ``cudaErrorStreamCapture*`` message. :func:`explain_capture_error` turns those messages into a
:class:`GraphCaptureError` that names the broken rule and what to do instead.

The rule table follows the CUDA runtime's stream-capture errors (``cudaErrorStreamCaptureUnsupported`` ...
``cudaErrorStreamCaptureWrongThread``, ``cudaErrorCapturedEvent``) and the constraints listed in PyTorch's
"CUDA Graphs" notes.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamatelemetry_core.errors import ConfigurationError, LlamaTelemetryError

__all__ = [
    "CAPTURE_RULES",
    "CaptureRule",
    "GraphCaptureError",
    "GraphInputError",
    "GraphStateError",
    "explain_capture_error",
    "rule_by_name",
]


class GraphCaptureError(LlamaTelemetryError, RuntimeError):
    """Work inside a CUDA graph capture broke a rule of capture.

    ``rule`` names the broken :class:`CaptureRule` (``"host-sync"``, ``"cpu-tensor"``, ...). The capture was
    ended and its allocator bookkeeping undone before this was raised, so the process can capture again.
    """

    def __init__(self, message: str, *, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


class GraphStateError(LlamaTelemetryError, RuntimeError):
    """A graph was used out of order: replayed before a capture, captured twice, captured inside a capture."""


class GraphInputError(ConfigurationError):
    """New inputs handed to a replay do not match the graph's static inputs (count, shape, dtype or device)."""


@dataclass(frozen=True)
class CaptureRule:
    """One rule of CUDA graph capture.

    ``markers`` are lower-case fragments of the error messages (CUDA's and PyTorch's) that mean this rule was
    broken; ``explanation`` says what the rule is and ``fix`` what to do about it.
    """

    name: str
    markers: tuple[str, ...]
    explanation: str
    fix: str


CAPTURE_RULES: tuple[CaptureRule, ...] = (
    CaptureRule(
        "host-sync",
        ("operation not permitted when stream is capturing", "cudaerrorstreamcaptureunsupported"),
        "the captured code made the host wait for the GPU or called a CUDA function that capture forbids: "
        "a graph records GPU work only, so nothing inside it may read a result on the host (.item(), .tolist(), "
        ".cpu(), print(tensor), `if tensor:`, nonzero(), boolean-mask indexing, torch.cuda.synchronize()); with "
        "capture_error_mode='global' the same error comes from any other thread that allocates or synchronizes "
        "while the capture is underway",
        "keep the value on the GPU (torch.where instead of `if t.item()`, fixed-size results instead of "
        "nonzero()), compute host-side values before capturing, or leave that step out of the graph; if another "
        "thread caused it, pause that thread or use GraphCaptureConfig(capture_error_mode='thread_local')",
    ),
    CaptureRule(
        "legacy-stream",
        ("operation would make the legacy stream depend on a capturing blocking stream", "capturestreamimplicit"),
        "work was issued on the legacy default stream while capturing (torch.cuda.default_stream(), a library "
        "that launches on stream 0, or a synchronous cudaMemcpy); only the capturing stream is recorded",
        "issue every operation on the current stream inside the capture and do not switch to "
        "torch.cuda.default_stream() there",
    ),
    CaptureRule(
        "unjoined-stream",
        ("capturing stream has unjoined work", "cudaerrorstreamcaptureunjoined"),
        "work was forked to another stream during the capture and never joined back to the capturing stream",
        "before the captured function returns, make the capturing stream wait on every side stream it forked "
        "to: torch.cuda.current_stream().wait_stream(side_stream)",
    ),
    CaptureRule(
        "foreign-stream",
        (
            "dependency created on uncaptured work in another stream",
            "cudaerrorstreamcaptureisolation",
            "operation would result in a merge of separate capture sequences",
            "cudaerrorstreamcapturemerge",
        ),
        "the capture waited on work that is not part of it (an event recorded on a stream outside the capture, "
        "or a stream that belongs to another capture)",
        "record events and fork streams only from inside the capture, or synchronize before capturing",
    ),
    CaptureRule(
        "captured-event",
        ("operation not permitted on an event last recorded in a capturing stream", "cudaerrorcapturedevent"),
        "the code queried or waited on an event recorded inside the capture (event.query(), event.synchronize(), "
        "elapsed_time()); such events only exist when the graph replays",
        "time or synchronize on the graph from outside the capture, around replay()",
    ),
    CaptureRule(
        "wrong-thread",
        ("attempt to terminate a thread-local capture sequence from another thread", "capturewrongthread"),
        "a capture begun with capture_error_mode='thread_local' was ended from another thread",
        "begin and end each capture on one thread (CUDAGraph.capture does), and do not hand a capture to "
        "another thread halfway",
    ),
    CaptureRule(
        "default-stream",
        ("cuda graphs must be captured on a non-default stream",),
        "a CUDA graph cannot be captured on the default stream",
        "leave GraphCaptureConfig(stream=None) to capture on a side stream, or pass a torch.cuda.Stream() you created",
    ),
    CaptureRule(
        "invalidated",
        ("operation failed due to a previous error during capture", "cudaerrorstreamcaptureinvalidated"),
        "an earlier operation inside the capture broke the capture, so every later CUDA call in it failed",
        "look for the first failing operation inside the captured function (run it once eagerly with "
        "CUDA_LAUNCH_BLOCKING=1), and fix it according to the rule it breaks",
    ),
    CaptureRule(
        "forbidden-call",
        ("during cuda graph capture", "while capturing", "during capture"),
        "PyTorch refused a call that cannot be recorded into a graph (the message below names it)",
        "move that call before the capture (for example seed generators or query state beforehand), or leave "
        "that step out of the graph",
    ),
    # Not recognised from a message: raised by CUDAGraph itself after checking inputs and outputs.
    CaptureRule(
        "cpu-tensor",
        (),
        "a CUDA graph records only work on CUDA tensors: CPU work inside the capture runs once, at capture "
        "time, and a replay would silently skip it",
        "move the model and every input to the GPU (.to('cuda')) before capturing, or run CPU work eagerly",
    ),
    CaptureRule(
        "dynamic-output",
        (),
        "a graph has one fixed set of output tensors, but this function returned outputs of another number, "
        "shape, dtype or device when called again on same-shaped inputs (data-dependent shapes, or state read "
        "from outside the inputs)",
        "make every output shape depend only on the input shapes (pad to a fixed maximum), or run it eagerly",
    ),
    CaptureRule(
        "nested-capture",
        (),
        "a capture was started while another capture was underway in this thread; captures cannot nest",
        "capture the inner work as its own graph before or after the outer capture, or call it eagerly",
    ),
)

_RULES_BY_NAME = {rule.name: rule for rule in CAPTURE_RULES}


def rule_by_name(name: str) -> CaptureRule:
    """The rule called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _RULES_BY_NAME[name]
    except KeyError:
        raise KeyError(f"no capture rule {name!r}; known rules: {', '.join(_RULES_BY_NAME)}") from None


def capture_error(rule_name: str, detail: str = "") -> GraphCaptureError:
    """A :class:`GraphCaptureError` for ``rule_name``: the rule, the fix, and ``detail`` (what was seen)."""
    rule = rule_by_name(rule_name)
    seen = f" ({detail})" if detail else ""
    return GraphCaptureError(
        f"CUDA graph capture failed [{rule.name}]: {rule.explanation}{seen}. What to do: {rule.fix}.",
        rule=rule.name,
    )


def explain_capture_error(exc: BaseException) -> GraphCaptureError | None:
    """The :class:`GraphCaptureError` explaining ``exc`` raised inside a capture, or ``None`` if no rule fits.

    ``None`` means ``exc`` is an ordinary error of the captured code (a shape mismatch, a typo) that should be
    re-raised unchanged. The first line of PyTorch's message is kept in the explanation.
    """
    if isinstance(exc, GraphCaptureError):
        return exc
    message = str(exc)
    lowered = message.lower()
    for rule in CAPTURE_RULES:
        if any(marker in lowered for marker in rule.markers):
            first_line = next((line.strip() for line in message.splitlines() if line.strip()), "")
            return capture_error(rule.name, f"PyTorch said: {first_line}")
    return None
