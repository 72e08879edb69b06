"""Reasoning data: problems with a ground-truth trace of intermediate steps and a ground-truth response.

A `TraceExample` is (query, trace, response): the trace a tuple of steps (one line each). Sources:

    addition:D                 D-digit + D-digit addition, the trace one column a step, right to left: digit, digit,
                               carry in, their sum ("7+5+1=13"), as in Lee et al.'s scratchpad
    multiplication:AxB         an A-digit times a B-digit number, the trace one partial product a step, then the sum
    reasoning_gym:NAME         a reasoning-gym generator (pip install reasoning-gym==0.1.25): gsm_symbolic's worked
                               solution (metadata answer_cot) split into lines, its final answer after "####"
    FILE.jsonl                 one {"query", "trace", "response"} object a line; the trace a list of steps or text

`trace_splits` draws the test problems first, then validation, then training, all distinct queries, from one seeded
stream, so the test set is the same whatever the training size and a smaller training set is a prefix of a larger one.

Scoring a generation (`score_generation`) reads the model's text back in the layout of `completion_text`: trace steps
a line each, then "#### " and the response. The answer counts only when a "####" line is there (a model that writes a
trace and never an answer scores 0, and is counted); the trace is scored by the fraction of the true trace's numbers
found at the same place in the generated trace, and by difflib's sequence similarity of the two texts.
"""

from __future__ import annotations

import difflib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError

ANSWER_MARK = "####"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class TraceExample:
    query: str
    trace: tuple[str, ...]  # the intermediate steps, one line each; () when the source has none
    response: str  # the final answer


def completion_text(ex: TraceExample, with_trace: bool) -> tuple[str, str]:
    """(trace text, response text) the model is trained to write after the query: the steps a line each, then the
    answer line. Without the trace (answer-only training) the first is empty."""
    trace = "".join(step + "\n" for step in ex.trace) if with_trace else ""
    return trace, f"{ANSWER_MARK} {ex.response}"


# ---- built-in generators ---------------------------------------------------------------------------------------
def _addition(digits: int, rng: random.Random) -> TraceExample:
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    steps, carry = [], 0
    for x, y in zip(reversed(f"{a:0{digits}d}"), reversed(f"{b:0{digits}d}")):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={total}")  # the digit written is total % 10, the carry total // 10
        carry = total // 10
    return TraceExample(f"{a}+{b}=", tuple(steps), str(a + b))


def _multiplication(digits_a: int, digits_b: int, rng: random.Random) -> TraceExample:
    a = rng.randint(10 ** (digits_a - 1), 10**digits_a - 1)
    b = rng.randint(10 ** (digits_b - 1), 10**digits_b - 1)
    steps, total = [], 0
    for place, d in enumerate(reversed(str(b))):
        part = a * int(d) * 10**place
        total += part
        steps.append(f"{a}*{d}{'0' * place}={part}, sum {total}")
    return TraceExample(f"{a}*{b}=", tuple(steps), str(a * b))


def _generator(spec: str):
    """A function rng -> TraceExample for a built-in spec, or None if the spec names none."""
    name, _, arg = spec.partition(":")
    try:
        if name == "addition":
            digits = int(arg)
            if 1 <= digits <= 30:
                return lambda rng: _addition(digits, rng)
        elif name == "multiplication":
            da, db = (int(x) for x in arg.split("x"))
            if 1 <= da <= 12 and 1 <= db <= 12:
                return lambda rng: _multiplication(da, db, rng)
        else:
            return None
    except ValueError:
        pass
    raise UserError(f"trace data {spec!r}: use addition:D (1 <= D <= 30) or multiplication:AxB (1..12 digits each)")


def _reasoning_gym(name: str, size: int, seed: int) -> list[TraceExample]:
    try:
        import reasoning_gym
    except ImportError:
        raise UserError("trace data reasoning_gym:* needs reasoning-gym: pip install reasoning-gym==0.1.25") from None
    try:
        ds = reasoning_gym.create_dataset(name, size=size, seed=seed)
    except Exception as e:  # an unknown name or bad size: reasoning-gym raises plain errors
        raise UserError(f"reasoning-gym cannot make {name!r}: {e}") from None
    out = []
    for entry in ds:
        meta = entry.get("metadata", {})
        cot = meta.get("answer_cot", "")
        steps = [line.strip() for line in cot.split(ANSWER_MARK)[0].splitlines() if line.strip()]
        out.append(TraceExample(entry["question"].strip(), tuple(steps), str(entry["answer"]).strip()))
    return out


def read_jsonl(path: Path) -> list[TraceExample]:
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                query, trace, response = row["query"], row.get("trace", []), row["response"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                what = f"{type(e).__name__}: {e}"
                raise UserError(f"{path}:{n}: not a {{query, trace, response}} object ({what})") from None
            if isinstance(trace, str):
                trace = [s for s in trace.splitlines() if s.strip()]
            if not isinstance(query, str) or not isinstance(response, str) or not isinstance(trace, list):
                raise UserError(f"{path}:{n}: query and response must be text, trace a list of steps or text")
            out.append(TraceExample(query, tuple(str(s) for s in trace), response))
    if not out:
        raise UserError(f"{path} holds no examples")
    return out


def trace_splits(source: str, sizes: dict[str, int], seed: int) -> dict[str, list[TraceExample]]:
    """{"train", "validation", "test"}: `sizes[split]` examples each, distinct queries, disjoint splits (see the
    module doc for the order they are drawn in). A file is shuffled with `seed` and cut in the same order."""
    want = sizes["test"] + sizes["validation"] + sizes["train"]
    gen = _generator(source)
    if gen is not None:
        rng, seen, pool = random.Random(seed), set(), []
        for _ in range(50 * want + 1000):  # the space may be too small for `want` distinct queries
            ex = gen(rng)
            if ex.query not in seen:
                seen.add(ex.query)
                pool.append(ex)
                if len(pool) == want:
                    break
    else:
        if source.startswith("reasoning_gym:"):
            raw = _reasoning_gym(source.split(":", 1)[1], want + want // 10 + 10, seed)
        elif Path(source).is_file():
            raw = read_jsonl(Path(source))
            random.Random(seed).shuffle(raw)
        else:
            raise UserError(f"trace data {source!r} is neither a built-in generator nor a file")
        pool, seen = [], set()
        for ex in raw:
            if ex.query not in seen:
                seen.add(ex.query)
                pool.append(ex)
    if len(pool) < want:
        raise UserError(f"trace data {source!r} has {len(pool)} distinct problems; the splits ask for {want}")
    test, rest = pool[: sizes["test"]], pool[sizes["test"] :]
    return {"test": test, "validation": rest[: sizes["validation"]], "train": rest[sizes["validation"] : want]}


# ---- scoring -----------------------------------------------------------------------------------------------------
def normalise_answer(text: str) -> str:
    """Whitespace and thousands separators dropped; a number written as a whole float ("12.0") read as "12"."""
    text = text.strip().replace(",", "").rstrip(".")
    try:
        value = float(text)
        return str(int(value)) if value.is_integer() else str(value)
    except ValueError:
        return " ".join(text.split())


def parse_generation(text: str) -> tuple[list[str], str | None]:
    """(trace steps, answer or None) of a generated completion in the completion_text layout."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith(ANSWER_MARK):
            return [s for s in lines[:i] if s.strip()], line[len(ANSWER_MARK) :].strip()
    return [s for s in lines if s.strip()], None


def score_generation(ex: TraceExample, text: str) -> dict[str, float]:
    """answer (1.0 if the answer matches), answered (1.0 if there is an answer line), trace_values (the fraction of
    the true trace's numbers that the generated trace has at the same index; 1.0 for an empty true trace) and
    trace_similarity (difflib ratio of the trace texts)."""
    steps, answer = parse_generation(text)
    right = answer is not None and normalise_answer(answer) == normalise_answer(ex.response)
    true_values = [v for step in ex.trace for v in NUMBER.findall(step)]
    got_values = [v for step in steps for v in NUMBER.findall(step)]
    hits = sum(t == g for t, g in zip(true_values, got_values))
    similarity = difflib.SequenceMatcher(None, "\n".join(ex.trace), "\n".join(steps), autojunk=False).ratio()
    return {
        "answer": float(right),
        "answered": float(answer is not None),
        "trace_values": hits / len(true_values) if true_values else 1.0,
        "trace_similarity": similarity if ex.trace else 1.0,
    }
