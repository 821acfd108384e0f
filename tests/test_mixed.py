"""Mixed-modal generation: modality masks (property test), CFG against separate full forwards, Lumina layout,
event order, deterministic documents.

References: transformers' ChameleonForConditionalGeneration builds the model (our forward is checked against it in
test_runtime); guidance is checked against the formulas applied to separate no-cache forwards of each context;
the layout checks read token names from the vocabulary, independently of the code under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

import fuselm
from fuselm import FuselmError
from fuselm.generation.decoder import SequenceState
from fuselm.generation.document import write_document
from fuselm.generation.mixed import generate_mixed
from fuselm.generation.processors import ModalityMachine, TokenRoles, lumina_size_token
from fuselm.generation.sampling import GREEDY
from fuselm.generation.stream import Done, ImageDone, ImageProgress, ImageStart, TextDelta
from fuselm.vision import VQGAN, ImageTokenizer, ImageVocab, VQGANConfig

CODES = 16  # codebook entries = image tokens
VOCAB = 160
MAX_GRIDS = 8


def _img_name(i: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z"


def vocabulary_map() -> dict[str, int]:
    """Chameleon-style names: specials, IMGIMG*Z image tokens, boi/eoi/eot, Lumina row-end and size tokens."""
    names = ["<s>", "<pad>", "</s>", "<unk>", *(_img_name(i) for i in range(CODES)), "<eoss>", "<racm3:break>",
             "<image>", "<reserved08706>", "<reserved08799>", *(lumina_size_token(n) for n in range(1, MAX_GRIDS + 1))]
    names += [f"t{i}" for i in range(len(names), VOCAB)]
    return {n: i for i, n in enumerate(names)}


VOCAB_MAP = vocabulary_map()
BOI, EOI, EOT, NEWLINE = (VOCAB_MAP[n] for n in ("<racm3:break>", "<eoss>", "<reserved08706>", "<reserved08799>"))
IMAGE_IDS = {VOCAB_MAP[_img_name(i)] for i in range(CODES)}
SIZE_IDS = {VOCAB_MAP[lumina_size_token(n)]: n for n in range(1, MAX_GRIDS + 1)}
TEXT_IDS = {i for n, i in VOCAB_MAP.items() if n.startswith("t")}


def make_model_dir(tmp, seed: int = 0):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(seed)
    cfg = ChameleonConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          vocabulary_map=VOCAB_MAP, bos_token_id=0, eos_token_id=2,
                          vq_config={"embed_dim": 8, "num_embeddings": CODES, "base_channels": 32,
                                     "channel_multiplier": [1, 1], "resolution": 8, "latent_channels": 8,
                                     "num_res_blocks": 1, "attn_resolutions": []})
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # sharper random logits, so sampling is not uniform noise
        model.lm_head.weight.mul_(8)
    model.save_pretrained(tmp)
    tok = Tokenizer(models.WordLevel(VOCAB_MAP, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "add_bos_token": True}))
    return tmp


def attach_decoder(model, seed: int = 0):
    """Our loader gives HF dirs an encoder-only VQGAN; attach a random one with a decoder (8x8 px -> 4x4)."""
    torch.manual_seed(seed)
    config = VQGANConfig(embed_dim=8, num_embeddings=CODES, latent_channels=8, base_channels=32,
                         channel_multiplier=(1, 2, 2), resolution=16, num_res_blocks=1)
    model.image_tokenizer = ImageTokenizer(VQGAN(config))
    return model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return attach_decoder(fuselm.load(make_model_dir(tmp_path_factory.mktemp("mixed"))))


def picture(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread avoids spin-waiting against other processes on a shared 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def image_ids_of(model, pic: Image.Image) -> list[int]:
    """Independent placement: the tokenizer's codes, mapped to ids through the vocabulary names."""
    codes = model.image_tokenizer.encode([pic])[0].tolist()
    return [VOCAB_MAP[_img_name(c)] for c in codes]


class Spy:
    """A user processor: records the logits it is given (after our guidance and masks) and the state."""

    def __init__(self, boost_boi_after: int | None = None, block_eos: bool = False):
        self.steps: list[tuple[int, torch.Tensor]] = []
        self.state = None
        self.boost_boi_after, self.block_eos = boost_boi_after, block_eos

    def __call__(self, state, logits):
        self.state = state
        self.steps.append((len(state.generated), logits.clone()))
        logits = logits.clone()
        allowed = set(torch.isfinite(logits[0]).nonzero().flatten().tolist())
        in_text = not allowed & (IMAGE_IDS | {EOI, NEWLINE} | set(SIZE_IDS))
        if in_text and self.block_eos:
            logits[:, [2, EOT]] = -math.inf
        if in_text and self.boost_boi_after is not None and len(state.generated) >= self.boost_boi_after \
                and BOI not in state.generated:
            logits[:, BOI] += 1000.0  # stays -inf where the mask forbids boi
        return logits


def full_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]))[0, -1]


# ---- the state machine, on random logits ---------------------------------------------------------------


def roles() -> TokenRoles:
    return TokenRoles.from_vocab(VOCAB_MAP, VOCAB, ImageVocab(VOCAB_MAP, num_embeddings=CODES), bos=0)


def check_sequence(seq: list[int], *, start: int, capacity: int, images: str, lumina: bool, grid, max_area: int):
    """Independent parser of a generated stream: text outside images, exact image structure inside."""
    i = 0
    while i < len(seq):
        t = seq[i]
        if t != BOI:
            assert t in TEXT_IDS or t in (2, EOT), f"step {i}: token {t} is not allowed in text mode"
            i += 1
            continue
        assert images == "on", "begin-of-image while images are not enabled"
        j = i + 1
        if lumina:
            h, w = SIZE_IDS[seq[j]], SIZE_IDS[seq[j + 1]]  # KeyError: not a size token
            if grid is not None:
                assert (2 * h, 2 * w) == tuple(grid)
            else:
                assert h * w <= max_area and max(h, w) <= 4 * min(h, w)
            rows, cols = 2 * h, 2 * w
            j += 2
            for _ in range(rows):
                assert all(t in IMAGE_IDS for t in seq[j:j + cols]), "only image tokens inside a row"
                assert seq[j + cols] == NEWLINE, "each row ends with <reserved08799>"
                j += cols + 1
        else:
            n = grid[0] * grid[1]
            assert all(t in IMAGE_IDS for t in seq[j:j + n]), "only image tokens inside an image"
            j += n
        assert j < len(seq), f"the image started at step {i} did not fit before the capacity {capacity}"
        assert seq[j] == EOI, "end-of-image exactly after the image's token count"
        i = j + 1


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), layout=st.sampled_from(["chameleon", "lumina", "lumina-free"]),
       images=st.sampled_from(["on", "off"]), rows=st.integers(1, 3), cols=st.integers(1, 3),
       capacity=st.integers(8, 120), max_area=st.integers(1, 6))
def test_masks_hold_on_random_logits(seed, layout, images, rows, cols, capacity, max_area):
    lumina = layout != "chameleon"
    grid = None if layout == "lumina-free" else ((2 * rows, 2 * cols) if lumina else (rows, cols))
    machine = ModalityMachine(roles(), images=images, lumina=lumina, grid=grid, max_area=max_area,
                              stop_ids=[2, EOT])
    prompt = [0, 40, 41]
    machine.start(prompt)
    state = SequenceState(prompt_len=len(prompt), capacity=len(prompt) + capacity)
    g = torch.Generator().manual_seed(seed)
    boost = torch.zeros(VOCAB)
    boost[[BOI, EOI, NEWLINE, *SIZE_IDS]] = 4.0  # make the structure tokens likely, so the masks are what stop them
    while state.remaining > 0:
        logits = (torch.randn(1, VOCAB, generator=g) * 3 + boost)
        masked = machine(state, logits)
        finite = torch.isfinite(masked[0])
        assert finite.any()
        token = int(torch.multinomial(masked[0].softmax(-1), 1, generator=g))
        assert finite[token]
        state.generated.append(token)
    check_sequence(state.generated, start=len(prompt), capacity=capacity, images=images, lumina=lumina, grid=grid,
                   max_area=max_area)


def test_boi_allowed_exactly_when_an_image_fits():
    machine = ModalityMachine(roles(), images="on", grid=(2, 3), stop_ids=[2])
    machine.start([0])
    need = 2 * 3 + 2  # boi + 6 image tokens + eoss
    assert bool(machine.allowed(need)[BOI]) and not bool(machine.allowed(need - 1)[BOI])
    assert not bool(ModalityMachine(roles(), images="off", grid=(2, 3)).allowed(1000)[BOI])
    text = machine.allowed(need)
    assert {int(i) for i in text.nonzero().flatten()} == TEXT_IDS | {2, BOI}


# ---- classifier-free guidance vs separate forwards -------------------------------------------------------


def test_meta_cfg_equals_separate_forwards(model):
    pic = picture(1)
    spy = Spy(boost_boi_after=2, block_eos=True)
    events = list(generate_mixed(model, ["t40 t41", pic, "t42"], images="on", max_tokens=30, seed=3,
                                 cfg_text=2.5, cfg_image=1.7, processors=[spy]))
    prompt = [0, 40, 41, BOI, *image_ids_of(model, pic), EOI, 42]
    seq = prompt + spy.state.generated
    assert spy.state.prompt_len == len(prompt)
    boi = seq.index(BOI, len(prompt))
    assert sum(isinstance(e, ImageDone) for e in events) == 1
    image_only = [t for t in seq[:boi] if t in IMAGE_IDS | {0, BOI, EOI}]
    checked = 0
    for k, logits in spy.steps:
        pos = len(prompt) + k
        if pos == boi + CODES + 1:  # end-of-image, forced
            assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [EOI]
        elif boi < pos <= boi + CODES:  # inside the image: guided
            gen = seq[boi + 1:pos]
            fc = full_logits(model, seq[:pos])
            ic = full_logits(model, image_only + [BOI] + gen)
            u = full_logits(model, [0, BOI] + gen)
            want = u + 1.7 * (ic - u) + 2.5 * (fc - ic)
            ids = sorted(IMAGE_IDS)
            assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == ids
            torch.testing.assert_close(logits[0, ids], want[ids], rtol=1e-4, atol=1e-3)
        if not boi < pos <= boi + CODES + 1:  # text before and after the image: the conditional row alone
            want = full_logits(model, seq[:pos])  # (after the image, through the copied-back cache)
            keep = torch.isfinite(logits[0])
            torch.testing.assert_close(logits[0, keep], want[keep], rtol=1e-4, atol=1e-3)
            assert not keep[sorted(IMAGE_IDS)].any()
        checked += pos > boi + CODES + 1
    assert checked > 3, "text after the image must be checked too"


def test_lumina_cfg_equals_separate_forwards(model):
    pic = picture(2)
    spy = Spy()
    list(generate_mixed(model, ["t50", pic, "t51"], images="only", layout="lumina", image_size=(16, 24),
                        cfg_scale=2.0, seed=4, processors=[spy]))
    codes = image_ids_of(model, pic)
    s2 = VOCAB_MAP[lumina_size_token(2)]
    prompt = [0, 50, BOI, s2, s2, *codes[0:4], NEWLINE, *codes[4:8], NEWLINE, *codes[8:12], NEWLINE,
              *codes[12:16], NEWLINE, EOI, 51, BOI]
    seq = prompt + spy.state.generated
    assert spy.state.prompt_len == len(prompt)
    for k, logits in spy.steps:
        finite = torch.isfinite(logits[0]).nonzero().flatten().tolist()
        if k >= 2 and len(finite) > 1:  # after the size tokens, at image-token positions
            gen = seq[len(prompt):len(prompt) + k]
            c = full_logits(model, seq[:len(prompt) + k])
            u = full_logits(model, [BOI] + gen)  # Lumina's unconditional context starts at boi
            want = u + 2.0 * (c - u)
            ids = sorted(IMAGE_IDS)
            assert finite == ids
            torch.testing.assert_close(logits[0, ids], want[ids], rtol=1e-4, atol=1e-3)


# ---- Lumina layout --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 24), (24, 8)])
def test_lumina_layout_non_square(model, size):
    spy = Spy()
    events = list(generate_mixed(model, "t60 t61", images="only", layout="lumina", image_size=size, seed=1,
                                 progress_every=1, processors=[spy]))
    rows, cols = size[0] // 4, size[1] // 4
    gen = spy.state.generated
    want_len = 2 + rows * (cols + 1) + 1
    assert len(gen) == want_len and gen[-1] == EOI
    assert gen[0] == VOCAB_MAP[lumina_size_token(rows // 2)] and gen[1] == VOCAB_MAP[lumina_size_token(cols // 2)]
    body = gen[2:-1]
    for r in range(rows):
        row = body[r * (cols + 1):(r + 1) * (cols + 1)]
        assert all(t in IMAGE_IDS for t in row[:-1]) and row[-1] == NEWLINE
    start = [e for e in events if isinstance(e, ImageStart)]
    assert [(e.height, e.width) for e in start] == [(rows, cols)]
    done = [e for e in events if isinstance(e, ImageDone)][0]
    assert done.image.size == (size[1], size[0])
    names = {i: n for n, i in VOCAB_MAP.items()}
    pixels = [t for t in body if t != NEWLINE]
    assert done.codes.tolist() == [int(names[t][6:-1].translate(str.maketrans("ABCDEFGHIJ", "0123456789")))
                                   for t in pixels]
    progress = [e for e in events if isinstance(e, ImageProgress)]
    assert [e.rows_done for e in progress] == list(range(1, rows + 1))
    assert all(e.partial.size == done.image.size for e in progress[:-1]) and progress[-1].partial is None
    assert isinstance(events[-1], Done) and events[-1].generated_tokens == want_len


def test_lumina_model_chooses_size_within_limits(model):
    for seed in range(4):
        spy = Spy()
        events = list(generate_mixed(model, "t62", images="only", layout="lumina", seed=seed, processors=[spy]))
        gen = spy.state.generated
        h, w = SIZE_IDS[gen[0]], SIZE_IDS[gen[1]]
        assert h * w <= 4 and max(h, w) <= 4 * min(h, w)  # the tokenizer's 4x4 latent grid is 2x2 grids
        assert len(gen) == 2 + 2 * h * (2 * w + 1) + 1 and gen[-1] == EOI
        done = next(e for e in events if isinstance(e, ImageDone))
        assert done.image.size == (8 * w, 8 * h)


# ---- events and documents -------------------------------------------------------------------------------


def interleaved(model, seed: int, spy=None):
    spy = spy or Spy(boost_boi_after=3, block_eos=True)
    return list(generate_mixed(model, "t70 t71 t72", images="on", max_tokens=40, seed=seed, progress_every=2,
                               processors=[spy])), spy


def test_event_order_interleaved(model):
    events, spy = interleaved(model, seed=7)
    kinds = "".join({TextDelta: "t", ImageStart: "S", ImageProgress: "p", ImageDone: "D", Done: "E"}[type(e)]
                    for e in events)
    assert kinds.startswith("ttt")
    assert kinds.count("S") == 1 and kinds.endswith("E")
    i = kinds.index("S")
    start = events[i]
    assert kinds[i:i + 6] == "SppppD" and set(kinds[i + 6:-1]) == {"t"}
    progress = [e for e in events if isinstance(e, ImageProgress)]
    assert [e.rows_done for e in progress] == [1, 2, 3, 4] and all(e.rows_total == 4 for e in progress)
    assert [e.partial is not None for e in progress] == [False, True, False, False]
    assert progress[1].partial.size == (16, 16)
    done = next(e for e in events if isinstance(e, ImageDone))
    assert done.image.size == (16, 16) and done.codes.shape == (16,)
    gen = spy.state.generated
    boi = gen.index(BOI)
    before = "".join(e.text for e in events[:events.index(start)] if isinstance(e, TextDelta))
    after = "".join(e.text for e in events[events.index(start):] if isinstance(e, TextDelta))
    assert before == " ".join(f"t{t}" for t in gen[:boi])  # the WordLevel tokenizer joins with spaces
    assert after == " ".join(f"t{t}" for t in gen[boi + 18:])
    end = events[-1]
    assert end.reason == "length" and end.generated_tokens == 40 == len(gen)
    assert end.timings["image_tokens"] == 17 and end.timings["text_tokens"] == 23


def test_fixed_seed_gives_identical_document(model, tmp_path):
    written = []
    for run, seed in (("a", 11), ("b", 11), ("c", 12)):
        (tmp_path / run).mkdir()
        events, _ = interleaved(model, seed)
        written.append(write_document(events, tmp_path / run / "story.html", prompt=["t70 t71 t72", picture(3)]))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["story-1.png", "story-prompt-1.png", "story.html", "story.md"]
    same = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files]
    assert all(same)
    assert (tmp_path / "a" / "story.html").read_bytes() != (tmp_path / "c" / "story.html").read_bytes()
    html = written[0].read_text().split("<body>")[1]
    assert html.index("t70") < html.index('src="story-prompt-1.png"') < html.index("<article>") \
        < html.index('src="story-1.png"')
    md = (tmp_path / "a" / "story.md").read_text()
    assert "![story-1.png](<story-1.png>)" in md
    assert Image.open(tmp_path / "a" / "story-1.png").size == (16, 16)


def test_document_without_decoder_and_atomicity(tmp_path):
    path = write_document(["hello <b>", ImageDone(None, torch.zeros(4)), " world"], tmp_path / "x.html")
    html = path.read_text()
    assert "hello &lt;b&gt;" in html and "no VQGAN decoder" in html
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.html", "x.md"]  # no temporary files left
    with pytest.raises(FuselmError, match="must end in .html"):
        write_document(["a"], tmp_path / "x.txt")
    nested = write_document(["a"], tmp_path / "new" / "dir" / "y.html")  # missing folders are made
    assert nested.read_text().count("<article>") == 1 and (tmp_path / "new" / "dir" / "y.md").is_file()


# ---- options and bad input ------------------------------------------------------------------------------


def test_greedy_images_and_public_api(model):
    a = list(fuselm.generate(model, ["t80", picture(4)], images="only", image_sampling=GREEDY, seed=1))
    b = list(fuselm.generate(model, ["t80", picture(4)], images="only", image_sampling=GREEDY, seed=2))
    da, db = (next(e for e in ev if isinstance(e, ImageDone)) for ev in (a, b))
    assert torch.equal(da.codes, db.codes)  # greedy images do not depend on the seed


def test_bad_options(model):
    with pytest.raises(FuselmError, match="images must be one of"):
        list(generate_mixed(model, "t1", images="sometimes"))
    with pytest.raises(FuselmError, match="unknown generation option"):
        list(generate_mixed(model, "t1", imagez="on"))
    with pytest.raises(FuselmError, match="cfg must be one of"):
        list(generate_mixed(model, "t1", images="only", cfg="both"))
    with pytest.raises(FuselmError, match="image_size"):
        list(generate_mixed(model, "t1", images="only", image_size=(16,)))
    with pytest.raises(FuselmError, match="do not fit"):
        list(generate_mixed(model, "t1 " * 250, images="only"))
    with pytest.raises(FuselmError, match="prompt part 1"):
        list(generate_mixed(model, ["t1", 3.5]))
