"""Long-context evaluations of the seed papers (YaRN, LongRoPE, Giraffe): perplexity at a length and passkey retrieval.

    from scaled_rope.evaluate import perplexity, passkey_accuracy, ByteTokenizer
    ppl = perplexity(model, tokens, length=8192)                       # sliding windows of 8192 tokens
    acc = passkey_accuracy(model, length=8192, trials=20, seed=0, tokenizer=ByteTokenizer())

Both take any causal LM whose forward returns an object with `.logits` (a transformers model, patched by
`scaled_rope.integrations.transformers.patch_model` with any rope, or not), in eval mode; they run under
`torch.no_grad()`.

perplexity: the standard transformers sliding-window recipe. Each document is cut into windows of `length` tokens
starting every `stride` tokens (default: `length`, non-overlapping); a window scores only the tokens that no
earlier window scored, with all the tokens before them in the window as context. A token with no context in its
window is not scored: the first token of a document, and with stride == length the first token of every window.
Windows of equal length are batched. Returns exp(total NLL / scored tokens).

passkey: the prompt of the landmark-attention / YaRN / LongRoPE evaluations. An optional task sentence, then filler
("The grass is green. The sky is blue. ...") repeated, with "The pass key is 68235. Remember it. 68235 is the pass
key." inserted at a random depth, and "What is the pass key? The pass key is" at the end; the prompt is exactly
`length` tokens (the end of one filler repetition, cut to fit, comes first). The model decodes greedily; a trial
counts when the first number it writes is the key, digit for digit (one extra token is decoded, so "682351" is
wrong).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
QUESTION = "What is the pass key? The pass key is"


def info_line(key: int | str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


# ---- tokenizer ----------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is the end-of-document token (the training script puts
    it between files). `vocab_size` = 257; a model may have a larger embedding (unused ids)."""

    vocab_size = 257
    eos_token_id = 256
    bos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (HF tokenizers add BOS by default)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(text)
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [int(i) for i in ids]


def _decode(tokenizer, ids: Sequence[int]) -> str:
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(list(ids))


# ---- model helpers ------------------------------------------------------------------------------------------
def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _logits(model, input_ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, Any]:
    out = model(input_ids=input_ids, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits, getattr(out, "past_key_values", None)


def _check_length(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


# ---- perplexity -----------------------------------------------------------------------------------------------
def _documents(tokens) -> list[torch.Tensor]:
    """tokens: a 1-D tensor or list of ints (one document), a 2-D tensor (one document per row) or a list of
    1-D tensors / lists (documents)."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() == 1:
            docs = [tokens]
        elif tokens.dim() == 2:
            docs = list(tokens)
        else:
            raise ValueError(f"tokens must be 1-D or 2-D, got shape {tuple(tokens.shape)}")
    elif isinstance(tokens, (list, tuple)):
        if len(tokens) and all(isinstance(t, int) for t in tokens):
            docs = [torch.tensor(tokens)]
        else:
            docs = [t if isinstance(t, torch.Tensor) else torch.tensor(list(t)) for t in tokens]
    else:
        raise ValueError(f"tokens must be a tensor or a list of token ids / documents, got {type(tokens).__name__}")
    for d in docs:
        if d.dim() != 1 or d.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise ValueError("every document in tokens must be a 1-D sequence of integer token ids")
    docs = [d.long() for d in docs if d.numel() >= 2]
    if not docs:
        raise ValueError("tokens must hold at least one document of >= 2 tokens")
    return docs


def sliding_windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) windows over a document of n tokens, as the transformers recipe makes them: the
    window [begin, end) scores its last `scored` tokens (the first window also its first token's successors)."""
    windows, previous_end, begin = [], 0, 0
    while True:
        end = min(begin + length, n)
        windows.append((begin, end, end - previous_end))
        previous_end = end
        if end == n:
            return windows
        begin += stride


@torch.no_grad()
def negative_log_likelihood(model, tokens, *, length: int, stride: int | None = None,
                            batch_size: int = 1) -> tuple[float, int]:
    """(sum of the NLL in nats, number of scored tokens) of `perplexity`."""
    _check_length("length", length, 2)
    stride = length if stride is None else stride
    _check_length("stride", stride)
    if stride > length:
        raise ValueError(f"stride ({stride}) must be <= length ({length}): tokens between windows would be skipped")
    _check_length("batch_size", batch_size)
    docs = _documents(tokens)
    device = _device(model)
    groups: dict[int, list[tuple[torch.Tensor, int]]] = {}  # window length -> (window tokens, scored count)
    for doc in docs:
        for begin, end, scored in sliding_windows(doc.numel(), length, stride):
            groups.setdefault(end - begin, []).append((doc[begin:end], scored))
    total, count = 0.0, 0
    for size in sorted(groups, reverse=True):
        items = groups[size]
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            ids = torch.stack([w for w, _ in chunk]).to(device)
            logits, _ = _logits(model, ids, use_cache=False)
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, size-1): token j+1 given tokens <= j
            for row, (_, scored) in enumerate(chunk):
                scored = min(scored, size - 1)  # a document's first token is never scored
                total += float(nll[row, size - 1 - scored:].double().sum())
                count += scored
    return total, count


def perplexity(model, tokens, *, length: int, stride: int | None = None, batch_size: int = 1) -> float:
    """Sliding-window perplexity of `tokens` (one document or a list of documents) with windows of `length` tokens
    advancing by `stride` (default `length`). One window over a whole document equals exp(model loss)."""
    total, count = negative_log_likelihood(model, tokens, length=length, stride=stride, batch_size=batch_size)
    if count == 0:
        raise ValueError("no token was scored")
    value = total / count
    return math.exp(value) if value < 700 else math.inf


# ---- greedy decoding ------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation (B, max_new_tokens) of input_ids (B, N). Uses the model's KV cache when its forward
    returns one (`past_key_values`), else runs the whole sequence again at every step."""
    _check_length("max_new_tokens", max_new_tokens)
    ids = input_ids.to(_device(model))
    logits, cache = _logits(model, ids, use_cache=True)
    out = []
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        out.append(token)
        if step + 1 == max_new_tokens:
            break
        ids = torch.cat([ids, token], dim=1)
        if cache is not None:
            logits, cache = _logits(model, token, past_key_values=cache, use_cache=True)
        else:
            logits, _ = _logits(model, ids, use_cache=True)
    return torch.cat(out, dim=1)


# ---- passkey ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]         # exactly `length` token ids
    key: str               # the digits
    depth: float           # requested depth in [0, 1]: fraction of the filler before the key line
    key_offset: int        # index in ids where the key line starts
    filler_tokens: int     # filler tokens in the prompt (before + after the key line)


def passkey_prompt(tokenizer, length: int, key: int | str, depth: float, *, task: str | None = TASK) -> PasskeyPrompt:
    """A prompt of exactly `length` tokens hiding `key` at `depth` (0 = right after the task sentence, 1 = right
    before the question). Filler is whole repetitions of the filler text, preceded by the end of one
    repetition to make the length exact; the key line goes between two repetitions, at the boundary nearest to
    the depth. A tokenizer with a
    `bos_token_id` gets it first."""
    _check_length("length", length)
    key = str(key)
    if not key.isdigit():
        raise ValueError(f"key must be a non-negative integer, got {key!r}")
    if not (isinstance(depth, (int, float)) and 0.0 <= depth <= 1.0):
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    bos = getattr(tokenizer, "bos_token_id", None)
    head = ([bos] if bos is not None else []) + (_encode(tokenizer, task + " ") if task else [])
    unit = _encode(tokenizer, FILLER + " ")
    line = _encode(tokenizer, info_line(key) + " ")
    question = _encode(tokenizer, QUESTION)
    room = length - len(head) - len(line) - len(question)
    if room < 0:
        raise ValueError(f"length ({length}) is too short for a passkey prompt: the task, key line and question "
                         f"take {length - room} tokens")
    whole, rest = divmod(room, len(unit))
    tail = unit[len(unit) - rest:] if rest else []  # the end of one filler repetition fills the remainder
    before_units = min(max(int(round((depth * room - rest) / len(unit))), 0), whole)  # nearest boundary to depth
    ids = head + tail + unit * before_units + line + unit * (whole - before_units) + question
    assert len(ids) == length
    return PasskeyPrompt(ids, key, float(depth), len(head) + len(tail) + before_units * len(unit), room)


def score_answer(text: str, key: str) -> bool:
    """True when the first thing in `text` (after spaces) is a number equal to key, digit for digit."""
    match = re.match(r"\s*(\d+)", text)
    return match is not None and match.group(1) == str(key)


@torch.no_grad()
def passkey_trials(model, *, length: int, trials: int, seed: int = 0, tokenizer=None, task: str | None = TASK,
                   batch_size: int = 8, digits: int = 5) -> list[dict]:
    """One dict per trial: key, depth, generated text, correct. Keys are random `digits`-digit numbers, depths
    uniform in [0, 1], both from `seed`."""
    _check_length("trials", trials)
    _check_length("batch_size", batch_size)
    _check_length("digits", digits)
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    rng = random.Random(seed)
    prompts = [passkey_prompt(tokenizer, length, rng.randrange(10 ** (digits - 1), 10 ** digits), rng.random(),
                              task=task) for _ in range(trials)]
    results = []
    for start in range(0, trials, batch_size):
        chunk = prompts[start:start + batch_size]
        answer_tokens = max(len(_encode(tokenizer, " " + p.key)) for p in chunk) + 1
        ids = torch.tensor([p.ids for p in chunk], dtype=torch.long)
        generated = greedy_generate(model, ids, answer_tokens).cpu()
        for p, row in zip(chunk, generated):
            text = _decode(tokenizer, row.tolist())
            results.append({"key": p.key, "depth": p.depth, "generated": text, "correct": score_answer(text, p.key)})
    return results


def passkey_accuracy(model, *, length: int, trials: int, seed: int = 0, tokenizer=None, task: str | None = TASK,
                     batch_size: int = 8) -> float:
    """Fraction of `trials` passkey prompts of `length` tokens whose key the model retrieves exactly by greedy
    decoding. tokenizer: anything with encode/decode (default: ByteTokenizer)."""
    results = passkey_trials(model, length=length, trials=trials, seed=seed, tokenizer=tokenizer, task=task,
                             batch_size=batch_size)
    return sum(r["correct"] for r in results) / len(results)
