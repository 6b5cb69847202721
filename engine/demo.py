"""Offline demo: answer a few chat prompts with the embedded model, streamed to the terminal.

All prompts run together in one continuously batched engine; the terminal shows one
answer at a time, live, while the others' text is buffered until their turn.

    python -m engine.demo [--model smollm2-135m] [--max-tokens 96] [--temperature 0]
"""

from __future__ import annotations

import argparse
import sys
import time

from engine import LLM, SamplingParams

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for writing readable Python code.",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    llm = LLM(model=args.model, num_threads=args.threads)
    print(f"loaded {args.model} in {time.monotonic() - t0:.1f}s\n", flush=True)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    prompts = [llm.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]

    buffered = [""] * len(prompts)
    done = [False] * len(prompts)
    current = 0
    n_tokens = 0
    t0 = time.monotonic()
    print(f"### {PROMPTS[0]}\n", flush=True)
    for i, p in enumerate(prompts):
        llm.engine.add_request(p, params, request_id=str(i))
    outputs = (out for _ in iter(llm.engine.has_unfinished, False) for out in llm.engine.step())
    for out in outputs:
        i = int(out.request_id)
        n_tokens += len(out.new_token_ids)
        if i == current:
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
        else:
            buffered[i] += out.delta_text
        done[i] = out.finished
        while current < len(prompts) and done[current]:
            current += 1
            if current < len(prompts):
                print(f"\n\n### {PROMPTS[current]}\n\n{buffered[current]}", end="", flush=True)
    dt = time.monotonic() - t0
    print(f"\n\n{len(prompts)} answers, {n_tokens} tokens in {dt:.1f}s "
          f"({n_tokens / dt:.1f} tokens/s, batched)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
