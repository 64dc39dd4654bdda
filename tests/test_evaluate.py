"""scaled_rope.evaluate: sliding-window perplexity, greedy decoding and the passkey test (CPU, tiny random models)."""
import math
import re
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from scaled_rope import RopeScaling  # noqa: E402
from scaled_rope.evaluate import (FILLER, QUESTION, TASK, ByteTokenizer, greedy_generate, info_line,  # noqa: E402
                                  negative_log_likelihood, passkey_accuracy, passkey_prompt, passkey_trials,
                                  perplexity, score_answer)
from scaled_rope.integrations.transformers import patch_model, unpatch_model  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB = 64


def tiny_model(seed=0, vocab=VOCAB, max_position=16):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=max_position, initializer_range=0.2, bos_token_id=None,
                         eos_token_id=None, pad_token_id=None, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def random_ids(n, seed=1, vocab=VOCAB):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: threads only add overhead (and a lot of it when the machine is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
@pytest.fixture(scope="module")
def model():
    return tiny_model()


# ---- perplexity ------------------------------------------------------------------------------------------------
def test_one_window_is_exp_of_the_model_loss(model):
    ids = random_ids(37)
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss
    assert perplexity(model, ids, length=37) == pytest.approx(math.exp(loss.item()), rel=1e-5)
    # a document shorter than the window is one window too; the same tokens as a list or a 2-D tensor agree
    assert perplexity(model, ids.tolist(), length=64) == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert perplexity(model, ids[None], length=37) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def _hf_recipe(model, ids, length, stride):
    """The transformers documentation's sliding-window recipe, written independently: labels -100 outside the
    window's new tokens, the model's mean loss times the tokens it counted."""
    n, nll, counted, previous_end = ids.numel(), 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + length, n)
        target_len = end - previous_end
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, :-target_len] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        k = int((labels[:, 1:] != -100).sum())
        nll += loss.item() * k
        counted += k
        previous_end = end
        if end == n:
            break
    return nll, counted


@pytest.mark.parametrize("n,length,stride", [(45, 16, 8), (45, 16, 16), (97, 17, 5), (16, 16, 4)])
def test_sliding_window_matches_the_transformers_recipe(model, n, length, stride):
    ids = random_ids(n, seed=n)
    total, count = negative_log_likelihood(model, ids, length=length, stride=stride, batch_size=3)
    ref_total, ref_count = _hf_recipe(model, ids, length, stride)
    assert count == ref_count
    # overlapping windows score every token but the first exactly once; non-overlapping ones cannot score the
    # first token of each window (it has no context in it)
    assert count == (n - 1 if stride < length else n - math.ceil(n / length))
    assert total == pytest.approx(ref_total, rel=1e-5)
    assert perplexity(model, ids, length=length, stride=stride) == pytest.approx(math.exp(ref_total / ref_count),
                                                                                 rel=1e-5)


def test_documents_are_scored_separately(model):
    a, b = random_ids(30, seed=2), random_ids(21, seed=3)
    ta, ca = negative_log_likelihood(model, a, length=16, stride=8)
    tb, cb = negative_log_likelihood(model, b, length=16, stride=8)
    total, count = negative_log_likelihood(model, [a, b], length=16, stride=8, batch_size=4)
    assert count == ca + cb and total == pytest.approx(ta + tb, rel=1e-6)


def test_perplexity_on_a_patched_model_matches_stock(model):
    ids = random_ids(48, seed=4)
    stock = perplexity(model, ids, length=48)
    patch_model(model, backend="reference")
    try:
        assert perplexity(model, ids, length=48) == pytest.approx(stock, rel=1e-5)
        patch_model(model, rope=RopeScaling.linear(16, 4.0), backend="reference")
        assert perplexity(model, ids, length=48) != pytest.approx(stock, rel=1e-5)  # the rope is really used
    finally:
        unpatch_model(model)


@pytest.mark.parametrize("kwargs,name", [(dict(length=1), "length"), (dict(length=8, stride=9), "stride"),
                                         (dict(length=8, stride=0), "stride"),
                                         (dict(length=8, batch_size=0), "batch_size")])
def test_perplexity_rejects_bad_arguments(model, kwargs, name):
    with pytest.raises(ValueError, match=name):
        perplexity(model, random_ids(20), **kwargs)


def test_perplexity_rejects_bad_tokens(model):
    with pytest.raises(ValueError, match="tokens"):
        perplexity(model, [], length=8)
    with pytest.raises(ValueError, match="tokens"):
        perplexity(model, torch.rand(10), length=8)


# ---- greedy decoding ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patched", [False, True])
def test_greedy_generate_matches_transformers_generate(patched):
    model = tiny_model(seed=5, max_position=64)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(6))
    if patched:
        patch_model(model, rope=RopeScaling.linear(16, 2.0), backend="reference")
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=7, do_sample=False, min_new_tokens=7)[:, ids.shape[1]:]
    assert torch.equal(greedy_generate(model, ids, 7), want)


# ---- passkey ----------------------------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "The pass key is 68235. — déjà vu"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text) + [256]) == text  # the end-of-document id decodes to nothing


@pytest.mark.parametrize("length", [260, 300, 777, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_is_well_formed(length, depth):
    tok = ByteTokenizer()
    p = passkey_prompt(tok, length, 68235, depth)
    text = tok.decode(p.ids)
    assert len(p.ids) == length
    assert text.startswith(TASK + " ") and text.endswith(QUESTION)
    assert text.count(info_line(68235)) == 1 and text.count("68235") == 2  # the key nowhere else
    assert tok.decode(p.ids[p.key_offset:]).startswith(info_line(68235))
    assert not re.search(r"\d", text.replace(info_line(68235), ""))
    assert set(text.replace(info_line(68235), "")[len(TASK):-len(QUESTION)].split()) <= set(FILLER.split()) | {
        w for part in FILLER.split() for w in (part[i:] for i in range(len(part)))}  # only (cut) filler words
    # depth: the fraction of the filler in front of the key line, to within one filler sentence group
    before = p.key_offset - len(tok.encode(TASK + " "))
    unit = len(tok.encode(FILLER + " "))
    assert abs(before - depth * p.filler_tokens) <= unit


def test_passkey_prompt_with_another_tokenizer():
    class Words:  # word-level tokenizer with a BOS token
        bos_token_id = 0

        def __init__(self):
            self.vocab = {}

        def encode(self, text):
            return [self.vocab.setdefault(w, len(self.vocab) + 1) for w in re.findall(r"\S+|\s+", text)]

        def decode(self, ids):
            inverse = {v: k for k, v in self.vocab.items()}
            return "".join(inverse.get(i, "") for i in ids)

    tok = Words()
    p = passkey_prompt(tok, 150, 4242, 0.5, task=None)
    assert len(p.ids) == 150 and p.ids[0] == 0
    text = tok.decode(p.ids)
    assert text.count(info_line(4242)) == 1 and text.endswith(QUESTION)


def test_passkey_prompt_rejects_bad_arguments():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="length"):
        passkey_prompt(tok, 100, 12345, 0.5)  # task + key line + question do not fit
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tok, 400, 12345, 1.5)
    with pytest.raises(ValueError, match="key"):
        passkey_prompt(tok, 400, "12a45", 0.5)


class _Oracle(torch.nn.Module):
    """A fake byte model that reads the key from the prompt and writes `answer(key)` after the question."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.tok = ByteTokenizer()

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(*input_ids.shape, 257)
        for row, ids in enumerate(input_ids):
            text = self.tok.decode(ids)
            key = re.search(r"The pass key is (\d+)\.", text).group(1)
            written = text[text.rindex(QUESTION) + len(QUESTION):]
            target = self.answer(key) + "...."
            logits[row, -1, ord(target[len(written)])] = 1.0
        return SimpleNamespace(logits=logits)  # no cache: greedy_generate re-runs the whole sequence


@pytest.mark.parametrize("answer,expected", [(lambda k: " " + k, 1.0), (lambda k: " " + k[:-1] + "0"
                                                                        if k[-1] != "0" else " " + k[:-1] + "1", 0.0),
                                             (lambda k: " " + k + "7", 0.0), (lambda k: " " + k[:-1], 0.0),
                                             (lambda k: "\n" + k + " is", 1.0)])
def test_passkey_scoring_is_exact(answer, expected):
    acc = passkey_accuracy(_Oracle(answer), length=300, trials=4, seed=3, batch_size=3)
    assert acc == expected


def test_passkey_trials_are_seeded():
    a = passkey_trials(_Oracle(lambda k: " " + k), length=280, trials=3, seed=7)
    b = passkey_trials(_Oracle(lambda k: " " + k), length=280, trials=3, seed=7)
    c = passkey_trials(_Oracle(lambda k: " " + k), length=280, trials=3, seed=8)
    assert [(r["key"], r["depth"]) for r in a] == [(r["key"], r["depth"]) for r in b]
    assert [r["key"] for r in a] != [r["key"] for r in c]
    assert all(len(r["key"]) == 5 for r in a)


def test_score_answer():
    assert score_answer(" 68235.", "68235") and score_answer("\n 68235 is", "68235")
    assert not score_answer(" 682350", "68235") and not score_answer(" 6823", "68235")
    assert not score_answer(" x68235", "68235") and not score_answer("", "68235")


def test_passkey_on_a_patched_model_runs():
    model = tiny_model(seed=8, vocab=257, max_position=64)
    patch_model(model, rope=RopeScaling.yarn(16, 4.0, 64), backend="reference")
    results = passkey_trials(model, length=200, trials=2, seed=0, task=None)
    assert len(results) == 2 and all(isinstance(r["correct"], bool) for r in results)
