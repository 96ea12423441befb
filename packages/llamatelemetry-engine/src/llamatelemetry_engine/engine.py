"""The engine: a model, its weights, the optimization flags, and generation (batched, streamed, chat).

:class:`LLM` loads weights (:func:`~llamatelemetry_engine.loader.load_model`), resolves the flags for the
device, builds the model and the runner (paged cache and CUDA graphs when on), and serves requests with the
continuous-batching scheduler of ``llamatelemetry-batch`` or, with ``continuous_batching`` off, static batches.
"""

from __future__ import annotations

import operator
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import check_non_negative_int, check_positive_int
from llamatelemetry_engine.config import ModelConfig
from llamatelemetry_engine.continuous import ContinuousServer
from llamatelemetry_engine.flags import EngineFlags, ResolvedFlags, resolve_flags
from llamatelemetry_engine.loader import LoadedModel, load_model
from llamatelemetry_engine.models import LlamaForCausalLM
from llamatelemetry_engine.runner import ModelRunner
from llamatelemetry_engine.sampling import SamplingParams
from llamatelemetry_engine.static_batching import Request, StaticBatchEngine
from llamatelemetry_flashattn import paged_attention
from llamatelemetry_kvcache import KVCacheConfig, PagedKVCache

__all__ = ["LLM", "Completion", "build_model"]


@dataclass(frozen=True)
class Completion:
    """A finished request: its tokens, text (with a tokenizer), why it stopped, or the error that stopped it."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    error: Exception | None = None
    ttft_s: float | None = None
    token_times: tuple[float, ...] = ()


def build_model(loaded: LoadedModel, flags: ResolvedFlags, max_positions: int) -> LlamaForCausalLM:
    """The module for ``loaded`` on ``flags``' device and dtype (rotary tables in fp32), weights in place."""
    with torch.device("meta"):
        model = LlamaForCausalLM(
            loaded.config, max_positions, fused=flags.active("triton_kernels"), flash=flags.active("flash_attention")
        )
    model.to_empty(device=flags.device)
    state = {k: v.to(flags.device, flags.dtype) for k, v in loaded.state_dict.items()}
    missing, _ = model.load_state_dict(state, strict=False, assign=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and loaded.config.tie_word_embeddings)]
    if missing:
        raise ConfigurationError(f"weights missing for {missing[:3]} (and {max(len(missing) - 3, 0)} more)")
    model.to(flags.dtype)
    if loaded.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset_tables()
    if flags.active("tensor_cores"):
        model.merge_projections()
    return model.eval()


def _make_paged(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    *,
    max_model_len: int,
    max_batch_size: int,
    page_size: int,
    num_blocks: int | None,
    prefix_caching: bool,
) -> PagedKVCache:
    """The paged cache: ``num_blocks`` blocks, by default enough for a full batch at ``max_model_len``."""
    kv_config = KVCacheConfig(
        max_batch_size=max_batch_size, max_seq_length=max_model_len, num_layers=config.num_layers,
        num_heads=config.num_heads, head_dim=config.head_dim, dtype=dtype, num_kv_heads=config.num_kv_heads,
        device=device,
    )  # fmt: skip
    return PagedKVCache(kv_config, page_size, num_blocks=num_blocks, enable_prefix_caching=prefix_caching)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(
            f"expected device to be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}"
        ) from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigurationError(f"expected a cpu or cuda device, got {resolved}")
    return resolved


class LLM:
    """A Llama-family model ready to generate.

    Args:
        model: what :func:`~llamatelemetry_engine.loader.load_model` accepts (default: the embedded SmolLM2).
        flags: the optimizations to use (default: all on; :meth:`EngineFlags.all_off` is plain PyTorch).
        device: default the GPU when there is one, else the CPU.
        dtype: compute dtype (default fp16 with Tensor Cores, else fp32).
        max_model_len: longest sequence (default: min(model context, 4096)).
        max_batch_size: most sequences per step, and the largest CUDA-graph decode batch.
        page_size: tokens per block of the paged cache.
        num_blocks: blocks of the paged cache (default: enough for a full batch at ``max_model_len``).
        max_num_batched_tokens: the continuous-batching token budget of a step (long prompts are chunked).
        admission_batch: continuous batching admits waiting requests only when this many can start together (or
            all waiting ones can, or nothing runs). Default: ``max_batch_size // 8`` with CUDA graphs on (a step
            carrying prompts costs several graphed decode steps, replayed or not: one such step for several
            prompts instead of one each), else 1.
        step_graphs: with CUDA graphs on, also replay steps that carry prompt tokens beside decodes from graphs
            bucketed by token count (up to ``max_num_batched_tokens``), instead of running them eagerly (an
            eager step of a 1B model costs about 20 ms of host time on an H200, a replayed one about 1.5 ms).
            Default: on wherever CUDA graphs are (``None``); ``False`` keeps those steps eager. If capturing
            them fails, the engine warns once (``BackendFallbackWarning``) and runs them eagerly.
        overlap: continuous batching plans and launches each step before the previous step's tokens are read
            back, so that the host's work per step (scheduling, metadata, streaming) runs while the device
            computes (``llamatelemetry-batch``'s ``overlap``). Default: on for a CUDA device, off on a CPU (whose
            steps compute while they are launched: nothing to hide).
        warmup: run :meth:`warm_up` at the end of construction, so that kernels compile and CUDA graphs are
            captured before the first request instead of during it. Default: on for a CUDA device.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        flags: EngineFlags | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_model_len: int | None = None,
        max_batch_size: int = 64,
        page_size: int = 16,
        num_blocks: int | None = None,
        max_num_batched_tokens: int = 2048,
        admission_batch: int | None = None,
        step_graphs: bool | None = None,
        overlap: bool | None = None,
        warmup: bool | None = None,
        seed: int = 0,
    ) -> None:
        # Every argument is checked before the weights are loaded: a typo costs no load.
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("page_size", page_size),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            check_positive_int(value, name)
        for name, optional in (
            ("max_model_len", max_model_len),
            ("num_blocks", num_blocks),
            ("admission_batch", admission_batch),
        ):
            if optional is not None:
                check_positive_int(optional, name)
        check_non_negative_int(seed, "seed")
        if step_graphs is not None and not isinstance(step_graphs, bool):
            raise ConfigurationError(f"expected step_graphs to be True, False or None (automatic), got {step_graphs!r}")
        for name, switch in (("overlap", overlap), ("warmup", warmup)):
            if switch is not None and not isinstance(switch, bool):
                raise ConfigurationError(f"expected {name} to be True, False or None (automatic), got {switch!r}")
        if admission_batch is not None and admission_batch > max_batch_size:
            raise ConfigurationError(
                f"expected admission_batch <= max_batch_size ({max_batch_size}), got {admission_batch}"
            )
        if flags is not None and not isinstance(flags, EngineFlags):
            raise TypeError(f"expected flags to be an EngineFlags or None, got {type(flags).__name__}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise ConfigurationError(f"expected dtype to be a torch.dtype (float16, bfloat16, float32), got {dtype!r}")
        self.loaded = load_model(model, seed=seed)
        self.config = self.loaded.config
        dev = _resolve_device(device)
        self.flags = resolve_flags(flags or EngineFlags(), dev, dtype)
        self.max_model_len = min(self.config.max_position_embeddings, max_model_len or 4096)
        self.max_batch_size = max_batch_size
        self.model = build_model(self.loaded, self.flags, self.max_model_len)
        cache: PagedKVCache | None = None
        attention = None
        if self.flags.active("paged_kv"):
            attention = paged_attention
            cache = _make_paged(
                self.config, self.flags.dtype, dev, max_model_len=self.max_model_len, max_batch_size=max_batch_size,
                page_size=page_size, num_blocks=num_blocks, prefix_caching=self.flags.active("prefix_caching"),
            )  # fmt: skip
        self.runner = ModelRunner(
            self.model, self.flags, max_model_len=self.max_model_len, paged_cache=cache, paged_attention=attention,
            max_batch_size=max_batch_size, step_graph_tokens=None if step_graphs is False else max_num_batched_tokens,
        )  # fmt: skip
        self.tokenizer = self.loaded.tokenizer
        self.max_num_batched_tokens = max_num_batched_tokens
        if admission_batch is None:
            admission_batch = max(1, max_batch_size // 8) if self.flags.active("cuda_graphs") else 1
        self.admission_batch = admission_batch
        self.overlap = dev.type == "cuda" if overlap is None else overlap
        eos = set(self.config.eos_token_ids)
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_token_ids = tuple(sorted(eos))
        self._next_id = 0
        self._continuous: ContinuousServer | None = None
        self.warmup_seconds = self.warm_up() if (dev.type == "cuda" if warmup is None else warmup) else 0.0

    def warm_up(self) -> float:
        """Run a few synthetic requests through the engine; returns the seconds it took.

        What a fresh engine's first requests would otherwise pay: Triton compiles a kernel the first time a
        launch configuration appears (about a second each), and the CUDA graphs are captured at the first decode.
        The prompts (one token, a few dozen, just over the step's token budget, and up to the longest context
        the cache holds for one request) are chunked beside each other's decodes, so prefills, prompt chunks at
        growing contexts (with and without split-KV), prefix reuse and decodes all run; each generates two
        tokens. Raises ``RuntimeError`` if a warm-up request fails (then this engine would fail requests too).
        """
        start = time.perf_counter()
        longest = self.max_model_len - 2
        manager = self.runner.block_manager
        if manager is not None:
            longest = min(longest, (manager.num_blocks - 1) * manager.page_size - 2)
        budget = self.max_num_batched_tokens
        lengths = sorted({n for n in (1, 37, budget + 5, longest // 2, longest) if 1 <= n <= longest})
        vocab = self.config.vocab_size
        prompts = [[(7 * i + 3) % vocab for i in range(n)] for n in lengths]
        for n, completion in zip(
            lengths, self.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True)), strict=True
        ):
            if completion.error is not None:
                raise RuntimeError(
                    f"the warm-up request of {n} prompt tokens failed: {completion.error}"
                ) from completion.error
        return time.perf_counter() - start

    # --- prompts ----------------------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of ``prompt`` (a string needs a tokenizer; ids pass through: ints, or integer scalars such as
        NumPy's; a float or a bool raises instead of becoming another token)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigurationError(f"{self.loaded.source} has no tokenizer; pass token ids instead of text")
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        given: object = prompt
        if isinstance(given, bytes) or not isinstance(given, Iterable):
            raise TypeError(f"expected a prompt to be a string or a sequence of token ids, got {type(given).__name__}")
        ids = []
        for t in given:
            try:
                if isinstance(t, bool):
                    raise TypeError
                ids.append(operator.index(t))
            except TypeError:
                raise ConfigurationError(f"expected a prompt's token ids to be ints, got {t!r}") from None
        return ids

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` formatted by the model's chat template, ready for the assistant's turn."""
        if self.tokenizer is None or getattr(self.tokenizer, "chat_template", None) is None:
            raise ConfigurationError(f"{self.loaded.source} has no chat template; use plain prompts")
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def decode(self, ids: Sequence[int]) -> str | None:
        """Text of ``ids`` (``None`` without a tokenizer)."""
        return None if self.tokenizer is None else str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # --- generation -------------------------------------------------------------------------------------------

    def _requests(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Request]:
        given: object = prompts
        if isinstance(given, str | bytes) or not isinstance(given, Sequence):
            raise TypeError(
                f"expected prompts to be a list of prompts (strings or token ids), got {type(given).__name__}"
            )
        given_params: object = params
        if isinstance(given_params, SamplingParams):
            each = [given_params] * len(prompts)
        elif isinstance(given_params, Sequence) and all(isinstance(p, SamplingParams) for p in given_params):
            each = list(given_params)
        else:
            raise TypeError(f"expected params to be a SamplingParams or one per prompt, got {params!r:.80}")
        if len(each) != len(prompts):
            raise ConfigurationError(f"expected one SamplingParams per prompt ({len(prompts)}), got {len(each)}")
        reqs = []
        for p, sp in zip(prompts, each, strict=True):
            reqs.append(Request(self._next_id, self.encode(p), sp, arrival_time=time.perf_counter()))
            self._next_id += 1
        return reqs

    def continuous_server(self) -> ContinuousServer:
        """The continuous-batching server over this engine's runner (created once; its ``engine`` attribute is
        ``llamatelemetry-batch``'s ``ContinuousBatchingEngine``, for online serving: ``submit``, ``start``).

        Raises :class:`ConfigurationError` when ``continuous_batching`` is not in effect.
        """
        if not self.flags.active("continuous_batching"):
            state = self.flags.states["continuous_batching"]
            raise ConfigurationError(f"continuous batching is off here ({state.reason or 'switched off'})")
        if self._continuous is None:
            self._continuous = ContinuousServer(
                self.runner, max_num_seqs=self.max_batch_size, max_num_batched_tokens=self.max_num_batched_tokens,
                prefix_reuse=self.flags.active("prefix_caching"), eos_token_ids=self.eos_token_ids,
                admission_batch=self.admission_batch, overlap=self.overlap,
            )  # fmt: skip
        return self._continuous

    def _serve(self, requests: list[Request], on_token: Any = None) -> list[Request]:
        if self.flags.active("continuous_batching"):
            return self.continuous_server().run(requests, on_token)
        engine = StaticBatchEngine(self.runner, max_batch_size=self.max_batch_size, eos_token_ids=self.eos_token_ids)
        return engine.run(requests, on_token)

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Complete every prompt (``params`` for all, or one per prompt); one :class:`Completion` each, in order.

        A request that cannot run carries its error in :attr:`Completion.error` while the others complete.
        """
        params = params if params is not None else SamplingParams()
        done = self._serve(self._requests(prompts, params))
        out = []
        for r in done:
            ttft = r.token_times[0] - r.arrival_time if r.token_times else None
            out.append(
                Completion(r.prompt_ids, r.output_ids, self.decode(r.output_ids), r.finish_reason or "error", r.error,
                           ttft, tuple(r.token_times))
            )  # fmt: skip
        return out

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[int]:
        """Token ids of one completion as they are generated (raises the request's error, if any).

        The request runs in a worker thread that hands each token over as soon as it is sampled.
        """
        params = params if params is not None else SamplingParams()
        req = self._requests([prompt], params)[0]
        engine = StaticBatchEngine(self.runner, max_batch_size=1, eos_token_ids=self.eos_token_ids)
        channel: queue.Queue[int | Exception | None] = queue.Queue()

        def work() -> None:
            try:
                engine.run([req], lambda _, token: channel.put(token))
                channel.put(req.error)
            except Exception as exc:  # handed to the consumer, which raises it
                channel.put(exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (item := channel.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            thread.join()
