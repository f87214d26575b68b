"""The perplexity probe: window arithmetic, and token / word-level perplexity against transformers.

The reference runs transformers' PyTorch model on the windows from the same `windows` function, one
unpadded window at a time, and sums float64 log-softmax NLLs of the scored tokens; ours runs padded,
batched, chunked-vocabulary windows under jit. Tolerance: 1e-5 relative on each window's NLL and on both
perplexities (on perplexity that is 1e-5 nats of mean NLL per token), for the tiny random models and the
real SmolLM2 alike. Measured on SmolLM2 (600 tokens, 5 windows): 3e-7 per window, 5e-9 nats per token;
per-logit differences (up to ~1.5e-4, test_decoder_parity.py) largely cancel in a log-softmax over
hundreds of tokens. A wrong shift, mask or BOS moves the NLL by O(1) nats per token.
"""

from __future__ import annotations

import math
import pathlib

import jax
import numpy as np
import pytest

from sft_jax.data.sources import DataError
from sft_jax.evaluate.perplexity import (
    Window,
    perplexity,
    read_wikitext,
    tokenize_text,
    wikitext2_perplexity,
    window_arrays,
    window_nll,
    windows,
)

WIKITEXT = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2_raw"
# Used when ../shared/data is absent (a fresh clone), so the parity tests still run on real-looking text.
BUNDLED_TEXT = (
    " = Valkyria Chronicles III = \n"
    " Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 , lit . Valkyria of the "
    "Battlefield 3 ) , commonly referred to as Valkyria Chronicles III outside Japan , is a tactical role @-@ "
    "playing video game developed by Sega and Media.Vision for the PlayStation Portable . Released in January "
    "2011 in Japan , it is the third game in the Valkyria series . Employing the same fusion of tactical and "
    "real @-@ time gameplay as its predecessors , the story runs parallel to the first game and follows the "
    '" Nameless " , a penal military unit serving the nation of Gallia during the Second Europan War who '
    "perform secret black operations and are pitted against the Imperial unit \" Calamaty Raven \" . \n"
    " The game began development in 2010 , carrying over a large portion of the work done on Valkyria "
    "Chronicles II . While it retained the standard features of the series , it also underwent multiple "
    "adjustments , such as making the game more forgiving for series newcomers . Character designer Raita "
    "Honjou and composer Hitoshi Sakimoto both returned from previous entries , along with Valkyria "
    "Chronicles II director Takeshi Ozawa . A large team of writers handled the script . \n"
)


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def text() -> str:
    """A few thousand characters of WikiText-2 test (whole lines), or the bundled text without ../shared."""
    if not WIKITEXT.is_dir():
        return BUNDLED_TEXT
    lines = read_wikitext(WIKITEXT).splitlines(keepends=True)
    out = ""
    for line in lines:
        if len(out) > 3000:
            break
        out += line
    return out


# ---------------------------------------------------------------------------------------------------- windows


def _scored_counts(num_tokens: int, wins: list[Window]) -> np.ndarray:
    counts = np.zeros(num_tokens, int)
    for w in wins:
        counts[w.score_begin:w.end] += 1
    return counts


# (max_length, stride, score_first): stride <= max_length with BOS, < max_length without (see the next test).
_LAYOUTS = [(16, 16, True), (16, 15, False), (16, 15, True), (16, 8, False), (16, 5, True), (16, 1, False),
            (2, 1, False), (1, 1, True), (50, 49, False), (50, 50, True)]


@pytest.mark.parametrize("num_tokens", [1, 2, 7, 64, 100, 101, 1000])
@pytest.mark.parametrize("max_length, stride, score_first", _LAYOUTS)
def test_every_token_scored_exactly_once(num_tokens, max_length, stride, score_first):
    wins = windows(num_tokens, max_length, stride, score_first=score_first)
    counts = _scored_counts(num_tokens, wins)
    first = 0 if score_first else 1
    np.testing.assert_array_equal(counts[first:], 1)
    assert counts[:first].sum() == 0
    for prev, w in zip([None, *wins], wins):
        assert 0 <= w.begin <= w.score_begin < w.end <= num_tokens
        assert score_first or w.score_begin > w.begin  # without BOS, something precedes every scored token
        assert w.end - w.begin <= max_length
        assert w.begin % stride == 0
        if prev is not None:
            assert w.score_begin == prev.end  # scores exactly what the previous window did not
    if wins:
        assert wins[-1].end == num_tokens


def test_disjoint_windows_when_stride_equals_max_length():
    # With BOS every token is scored; the last window is partial.
    assert windows(10, 4, 4, score_first=True) == [Window(0, 4, 0), Window(4, 8, 4), Window(8, 10, 8)]
    # Without BOS a window's first token has nothing before it: Hugging Face's loop skips it too (its guide
    # subtracts one token per window from the count). The probe uses stride < max_length instead.
    wins = windows(10, 4, 4)
    assert wins == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    np.testing.assert_array_equal(np.flatnonzero(_scored_counts(10, wins) == 0), [0, 4, 8])
    # Stride max_length - 1 without BOS: windows share one token, the context of the next one's first.
    assert windows(10, 4, 3) == [Window(0, 4, 1), Window(3, 7, 4), Window(6, 10, 7)]


def test_overlapping_windows_score_only_new_tokens():
    # Hugging Face's loop: begin 0, 2, 4, 6; each later window scores its last `stride` tokens.
    assert windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    wins = windows(1000, 256, 128)
    assert all(w.num_scored == 128 for w in wins[1:-1])
    assert all(w.score_begin - w.begin == 128 for w in wins[1:])  # 128 tokens of context before the first scored
    # The last window ends at the text's end; a stride-aligned start past it never happens.
    assert wins[-1] == Window(768, 1000, 896) and len(wins) == 7


def test_degenerate_texts_and_bad_strides():
    assert windows(0, 8, 4) == []
    assert windows(1, 8, 4) == []  # one token without BOS: nothing to predict it from
    assert windows(1, 8, 4, score_first=True) == [Window(0, 1, 0)]
    for stride in (0, 9):
        with pytest.raises(ValueError, match="stride"):
            windows(100, 8, stride)


def test_probe_rejects_a_stride_that_would_skip_tokens(tiny_llama_dir):
    model_def, params, tokenizer = _load(tiny_llama_dir)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model_def, params, tokenizer, BUNDLED_TEXT, max_length=32, stride=32, progress=False)


def test_window_arrays_place_bos_and_scored_positions():
    ids = np.arange(100, 110)
    wins = windows(10, 3, 3, score_first=True)  # 4 model positions with BOS
    input_ids, mask, scored = window_arrays(ids, wins, 4, bos_id=2)
    np.testing.assert_array_equal(input_ids[0], [2, 100, 101, 102])
    np.testing.assert_array_equal(scored[0], [False, True, True, True])
    np.testing.assert_array_equal(input_ids[-1], [2, 109, 0, 0])  # the last window is padded and masked
    np.testing.assert_array_equal(mask[-1], [1, 1, 0, 0])
    np.testing.assert_array_equal(scored[-1], [False, True, False, False])
    input_ids, mask, scored = window_arrays(ids, windows(10, 4, 2), 4, bos_id=None)
    np.testing.assert_array_equal(input_ids[1], [102, 103, 104, 105])
    np.testing.assert_array_equal(scored[1], [False, False, True, True])


# ------------------------------------------------------------------------------------------------ reading


def test_read_wikitext_file_or_folder_and_line_endings(tmp_path):
    (tmp_path / "wiki.test.raw").write_bytes(b" = Title = \r\n Some text . \r\n")
    assert read_wikitext(tmp_path) == read_wikitext(tmp_path / "wiki.test.raw") == " = Title = \n Some text . \n"
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing / "wiki.test.raw")):
        read_wikitext(missing / "wiki.test.raw")
    with pytest.raises(DataError, match="nowhere"):
        read_wikitext(missing)


@pytest.mark.skipif(not WIKITEXT.is_dir(), reason="../shared/data/wikitext2_raw is absent")
def test_real_wikitext_reads():
    text = read_wikitext(WIKITEXT)
    assert text.startswith(" = Robert Boulter = \n") and "\r" not in text
    assert len(text.split()) == 241211


# ------------------------------------------------------------------------------------ against transformers


def _reference(model_dir_or_gguf, ids: np.ndarray, wins: list[Window], bos_id: int | None) -> list[float]:
    """Per-window NLL (nats) of the scored tokens, by transformers' PyTorch model, one window at a time."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = pathlib.Path(model_dir_or_gguf)
    if path.suffix == ".gguf":
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32)
    else:
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    ref.eval()
    out = []
    for w in wins:
        window = ids[w.begin:w.end].tolist()
        prefix = [] if bos_id is None else [bos_id]
        inputs = torch.tensor([prefix + window])
        with torch.no_grad():
            logp = torch.log_softmax(ref(input_ids=inputs).logits[0].double(), dim=-1)
        # Text token j of the window sits at input position j + len(prefix), predicted one position earlier.
        first = w.score_begin - w.begin + len(prefix)
        targets = inputs[0, first:]
        out.append(-float(logp[first - 1:-1].gather(1, targets[:, None]).sum()))
    return out


def _load(model_path):
    from sft_jax.models.loading.lm import load_decoder, load_lm_tokenizer
    from sft_jax.state import ModelDef

    model_def, params = ModelDef.split(load_decoder(str(model_path))[0])
    return model_def, params, load_lm_tokenizer(str(model_path))


def _ours(model_path, text, **kwargs):
    model_def, params, tokenizer = _load(model_path)
    return tokenizer, perplexity(model_def, params, tokenizer, text, progress=False, **kwargs)


def _assert_matches_reference(ours, ref_nll, num_words, rtol):
    total = math.fsum(ref_nll)
    np.testing.assert_allclose(ours["window_nll"], ref_nll, rtol=rtol)
    ref_token_ppl = math.exp(total / ours["scored_tokens"])
    ref_word_ppl = math.exp(total / num_words)
    assert ours["num_words"] == num_words
    assert abs(ours["token_perplexity"] / ref_token_ppl - 1) < rtol, (ours["token_perplexity"], ref_token_ppl)
    assert abs(ours["word_perplexity"] / ref_word_ppl - 1) < rtol, (ours["word_perplexity"], ref_word_ppl)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tiny_models_match_transformers(family, text, tiny_llama_dir, tiny_gemma3_dir):
    model_dir = tiny_llama_dir if family == "llama" else tiny_gemma3_dir
    # 64-token windows every 24 tokens: overlapping windows across Gemma's sliding window of 4; batch 3
    # leaves padding rows in the last batch.
    tokenizer, ours = _ours(model_dir, text, max_length=64, stride=24, batch_size=3)
    bos = family == "gemma3"  # Gemma's tokenizer adds BOS by default, SmolLM2's does not
    assert ours["bos"] is bos
    ids, _ = tokenize_text(tokenizer, text)
    wins = windows(len(ids), 64 - bos, 24, score_first=bos)
    assert ours["windows"] == [[w.begin, w.end, w.score_begin] for w in wins]
    assert ours["num_tokens"] == len(ids) and len(wins) >= 8  # several batches of 3
    assert ours["scored_tokens"] == len(ids) - (not bos)  # a full pass scores every token (but the first)
    ref = _reference(model_dir, ids, wins, tokenizer.bos_token_id if bos else None)
    _assert_matches_reference(ours, ref, len(text.split()), rtol=1e-5)


def test_max_tokens_and_compiles_once(text, tiny_llama_dir):
    model_def, params, tokenizer = _load(tiny_llama_dir)
    kwargs = dict(max_length=32, stride=31, batch_size=2, progress=False)
    full = perplexity(model_def, params, tokenizer, text, **kwargs)
    size = window_nll._cache_size()
    prefix = perplexity(model_def, params, tokenizer, text, max_tokens=100, **kwargs)
    assert window_nll._cache_size() == size  # same model and window shape: no recompilation
    assert prefix["num_tokens"] == 100 and prefix["scored_tokens"] == 99
    assert prefix["windows"] == [[0, 32, 1], [31, 63, 32], [62, 94, 63], [93, 100, 94]]
    # The windows of a prefix are the first windows of the full pass (the last one cut short).
    np.testing.assert_allclose(prefix["window_nll"][:3], full["window_nll"][:3], rtol=1e-6)
    assert 0 < prefix["num_words"] < full["num_words"]
    covered = tokenizer.decode(tokenize_text(tokenizer, text)[0][:100])
    assert abs(prefix["num_words"] - len(covered.split())) <= 1


def test_real_smollm2_prefix_matches_transformers(text):
    from sft_jax.models.registry import resolve_checkpoint

    try:
        checkpoint = resolve_checkpoint("smollm2-135m-instruct")
    except ValueError as e:
        pytest.skip(str(e))
    if WIKITEXT.is_dir():
        text = read_wikitext(WIKITEXT)[:20000]  # more than 600 tokens of real text
    tokenizer, ours = _ours(checkpoint.path, text, max_length=256, stride=128, batch_size=2, max_tokens=600)
    ids, num_words = tokenize_text(tokenizer, text, max_tokens=600)
    wins = windows(len(ids), 256, 128)
    assert ours["windows"] == [[w.begin, w.end, w.score_begin] for w in wins] and not ours["bos"]
    ref = _reference(checkpoint.path, ids, wins, None)
    _assert_matches_reference(ours, ref, num_words, rtol=1e-5)
    assert 5 < ours["token_perplexity"] < 100  # a trained model, not a random one (ln vocab = 10.8 nats)


def test_wikitext2_entry_point_reads_the_folder(tmp_path, tiny_llama_dir):
    (tmp_path / "wiki.test.raw").write_text(BUNDLED_TEXT)
    model_def, params, tokenizer = _load(tiny_llama_dir)
    result = wikitext2_perplexity(model_def, params, tokenizer, tmp_path, max_length=32, stride=16,
                                  max_tokens=64, progress=False)
    assert result["num_tokens"] == 64 and math.isfinite(result["token_perplexity"])
    with pytest.raises(DataError, match="nowhere"):
        wikitext2_perplexity(model_def, params, tokenizer, tmp_path / "nowhere", progress=False)
