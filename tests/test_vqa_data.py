"""VLM-stage data: word tokenizer, conversation template, synthetic VQA (answers checked against
metadata and pixels), LLaVA JSON source, VQA datamodule batches and exact resume."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenmill.data.llava import LLaVAFormatError, LLaVAJsonSource
from tokenmill.data.loaders import ResumableDataLoader
from tokenmill.data.text import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    VICUNA_SYSTEM,
    ConversationTemplate,
    ConversationTooLong,
    load_tokenizer,
    split_words,
    word_tokenizer,
)
from tokenmill.data.vqa import (
    NUMBER_WORDS,
    PALETTE,
    QUESTION_TYPES,
    SHAPES,
    SyntheticVQA,
    answer_options,
    cell_name,
    majority_baseline,
    synthetic_vqa_tokenizer,
    vocabulary,
)
from tokenmill.data.vqa_datamodule import CLIP_MEAN, VQADataModule, VQAImageTransform

SIZE = 32


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic_vqa_tokenizer()


@pytest.fixture(scope="module")
def template():
    return ConversationTemplate()


def label_spans(input_ids: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of trained positions, as token id lists."""
    spans, current = [], []
    for token, label in zip(input_ids.tolist(), labels.tolist(), strict=True):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
                current = []
        else:
            assert label == token
            current.append(token)
    if current:
        spans.append(current)
    return spans


def datamodule(tokenizer, num_train=24, seed=0, **kwargs) -> VQADataModule:
    options = dict(image_size=SIZE, batch_size=4, seed=seed)
    options.update(kwargs)
    return VQADataModule(
        SyntheticVQA(num_train, image_size=48, seed=seed),
        SyntheticVQA(8, image_size=48, seed=seed + 1000),
        tokenizer,
        ConversationTemplate(),
        **options,
    )


# ------------------------------------------------------------------------------ tokenizers
def test_word_tokenizer_ids_splitting_and_specials():
    tok = word_tokenizer(["How", "many", "shapes", "?", "many", "ARE"])
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        "how",
        "many",
        "shapes",
        "?",
        "are",
    ]
    assert tok.tokenize("How many shapes?") == ["how", "many", "shapes", "?"]
    assert tok("SHAPES?\nare", add_special_tokens=False)["input_ids"] == [6, 7, 8]
    assert tok("many cats", add_special_tokens=False)["input_ids"] == [5, tok.unk_token_id]
    assert split_words("the human's questions.") == ["the", "human", "'", "s", "questions", "."]
    with pytest.raises(ValueError, match="split"):
        word_tokenizer(["shapes?"])


def test_load_tokenizer_roundtrip_sets_pad_and_names_missing_path(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "words")
    loaded = load_tokenizer(str(tmp_path / "words"))
    text = "how many shapes are there?"
    assert (
        loaded(text, add_special_tokens=False)["input_ids"]
        == tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    assert loaded.pad_token_id == 0
    # A tokenizer without a pad token gets unk as pad (LLaVA's choice for Vicuna).
    loaded.pad_token = None
    loaded.save_pretrained(tmp_path / "nopad")
    assert load_tokenizer(str(tmp_path / "nopad")).pad_token == "<unk>"
    missing = str(tmp_path / "no" / "such" / "tokenizer")
    with pytest.raises(OSError, match="no/such/tokenizer"):
        load_tokenizer(missing)


# ------------------------------------------------------------------------------ template
CONVERSATION = [
    {"from": "human", "value": "<image>\nwhat color is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "how many shapes are there?"},
    {"from": "gpt", "value": "two"},
]


def test_template_renders_vicuna_v1():
    text = ConversationTemplate(system="SYS").render(CONVERSATION)
    assert text == (
        "SYS USER: <image>\nwhat color is the circle? ASSISTANT: red</s>"
        "USER: how many shapes are there? ASSISTANT: two</s>"
    )


def test_template_tokenize_labels_decode_to_answers(tokenizer, template):
    input_ids, labels = template.tokenize(CONVERSATION, tokenizer)
    assert input_ids.dtype == labels.dtype == torch.long and input_ids.shape == labels.shape
    assert input_ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert int((input_ids == IMAGE_TOKEN_INDEX).sum()) == 1
    image_position = int((input_ids == IMAGE_TOKEN_INDEX).nonzero())
    assert labels[image_position] == IGNORE_INDEX
    system_length = len(tokenizer(VICUNA_SYSTEM + " USER:", add_special_tokens=False)["input_ids"])
    assert image_position == 1 + system_length  # bos, system, "user :", then the image
    spans = label_spans(input_ids, labels)
    assert [tokenizer.decode(span) for span in spans] == ["red </s>", "two </s>"]
    assert all(span[-1] == tokenizer.eos_token_id for span in spans)
    trained = labels != IGNORE_INDEX
    assert int(trained.sum()) == 4  # two one-word answers + two eos
    # The prompt, decoded, is the rendered template up to the first answer (lower-cased, word-split).
    prompt = input_ids[1:image_position].tolist()
    assert tokenizer.decode(prompt) == " ".join(split_words(VICUNA_SYSTEM + " USER:"))


def test_template_generation_prompt_and_validation(tokenizer, template):
    prompt = template.prompt_ids(CONVERSATION[:2], tokenizer)
    full, _ = template.tokenize(CONVERSATION[:2], tokenizer)
    assert torch.equal(prompt, full[: len(prompt)]) and len(full) == len(prompt) + 2
    assert tokenizer.convert_ids_to_tokens(prompt[-2:].tolist()) == ["assistant", ":"]
    with pytest.raises(ValueError, match="alternate"):
        template.tokenize([{"from": "gpt", "value": "red"}], tokenizer)
    with pytest.raises(ValueError, match="placeholders"):
        template.tokenize(
            [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}], tokenizer
        )


def test_template_truncation_keeps_prefix_and_never_cuts_image(tokenizer, template):
    full_ids, full_labels = template.tokenize(CONVERSATION, tokenizer)
    cut_ids, cut_labels = template.tokenize(CONVERSATION, tokenizer, max_length=len(full_ids) - 3)
    assert torch.equal(cut_ids, full_ids[:-3]) and torch.equal(cut_labels, full_labels[:-3])
    image_position = int((full_ids == IMAGE_TOKEN_INDEX).nonzero())
    ids, _ = template.tokenize(CONVERSATION, tokenizer, max_length=image_position + 1)
    assert ids[-1] == IMAGE_TOKEN_INDEX
    with pytest.raises(ConversationTooLong, match="max_length"):
        template.tokenize(CONVERSATION, tokenizer, max_length=image_position)


# ------------------------------------------------------------------------------ synthetic VQA
def test_synthetic_vqa_is_a_pure_function_of_seed_and_index():
    first, again = SyntheticVQA(50, seed=3), SyntheticVQA(50, seed=3)
    for index in (0, 7, 49):
        a, b = first[index], again[index]
        assert a["image"].tobytes() == b["image"].tobytes()
        assert a["conversation"] == b["conversation"] and a["key"] == b["key"]
    assert first[7]["image"].mode == "RGB" and first[7]["image"].size == (64, 64)
    other = SyntheticVQA(50, seed=4)
    assert sum(first[i]["image"].tobytes() == other[i]["image"].tobytes() for i in range(20)) == 0
    assert sum(first[i]["conversation"] == other[i]["conversation"] for i in range(20)) < 10
    assert first[0]["key"] != other[0]["key"]
    assert len({first[i]["image"].tobytes() for i in range(20)}) == 20
    with pytest.raises(IndexError):
        first[50]


def find_cell(question: str, grid: int) -> tuple[int, int]:
    names = sorted(
        ((cell_name(r, c, grid), (r, c)) for r in range(grid) for c in range(grid)), key=lambda x: -len(x[0])
    )
    return next(cell for name, cell in names if f"the {name}" in question)


def expected_answer(item: dict, grid: int) -> str:
    question = item["conversation"][0]["value"]
    shapes = item["shapes"]
    kind = item["question_type"]
    if kind == "count":
        return NUMBER_WORDS[len(shapes)]
    if kind == "color":
        (shape,) = [s for s in SHAPES if f"the {s}" in question]
        matching = [s for s in shapes if s["shape"] == shape]
        assert len(matching) == 1, "color questions must name a shape that occurs exactly once"
        return matching[0]["color"]
    if kind in ("shape_at", "color_at"):
        cell = find_cell(question, grid)
        at = [s for s in shapes if (s["row"], s["column"]) == cell]
        return "nothing" if not at else at[0]["shape" if kind == "shape_at" else "color"]
    (color,) = [c for c in PALETTE if f" {c} " in question]
    (shape,) = [s for s in SHAPES if f" {s}" in question]
    return "yes" if any(s["color"] == color and s["shape"] == shape for s in shapes) else "no"


@pytest.mark.parametrize("grid, max_shapes", [(2, 3), (3, 5)])
def test_synthetic_answers_match_metadata(grid, max_shapes):
    dataset = SyntheticVQA(240, image_size=48 if grid == 2 else 72, grid=grid, max_shapes=max_shapes, seed=11)
    seen = Counter()
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["conversation"][0]["value"].startswith("<image>\n")
        assert item["conversation"][1] == {"from": "gpt", "value": item["answer"]}
        assert item["answer"] == expected_answer(item, grid), item
        assert item["answer"] in dataset.answer_options(item["question_type"])
        cells = [(s["row"], s["column"]) for s in item["shapes"]]
        assert len(set(cells)) == len(cells) and 1 <= len(cells) <= max_shapes
        seen[item["question_type"]] += 1
    assert set(seen) == set(QUESTION_TYPES)


def nearest_color(rgb: np.ndarray) -> str:
    return min(PALETTE, key=lambda name: float(np.abs(np.asarray(PALETTE[name]) - rgb).sum()))


def test_synthetic_answers_match_pixels():
    """Count and colour-at answers recovered from the pixels alone (no metadata)."""
    dataset = SyntheticVQA(300, image_size=64, grid=2, seed=5, question_types=["count", "color_at", "exists"])
    checked = Counter()
    for index in range(len(dataset)):
        item = dataset[index]
        pixels = np.asarray(item["image"]).astype(np.int64)
        cell = 32
        occupied = {}
        for row in range(2):
            for column in range(2):
                block = pixels[row * cell : (row + 1) * cell, column * cell : (column + 1) * cell].reshape(
                    -1, 3
                )
                bright = block[block.max(axis=1) > 120]
                if len(bright) > 10:
                    occupied[(row, column)] = nearest_color(np.median(bright, axis=0))
        # The centre pixel of every shape has the shape's colour (within noise).
        for shape in item["shapes"]:
            x, y = (int(round(v)) for v in shape["center"])
            assert np.abs(pixels[y, x] - np.asarray(PALETTE[shape["color"]])).max() < 40
        question = item["conversation"][0]["value"]
        if item["question_type"] == "count":
            assert NUMBER_WORDS[len(occupied)] == item["answer"]
        elif item["question_type"] == "color_at":
            assert occupied.get(find_cell(question, 2), "nothing") == item["answer"]
        checked[item["question_type"]] += 1
    assert checked["count"] > 50 and checked["color_at"] > 50


def test_question_types_balance_and_baselines():
    dataset = SyntheticVQA(1000, seed=2)
    scenes = [dataset.describe(index) for index in range(len(dataset))]
    types = Counter(scene.question_type for scene in scenes)
    assert set(types) == set(QUESTION_TYPES) and min(types.values()) > 140  # uniform: ~200 each
    exists = [scene.answer for scene in scenes if scene.question_type == "exists"]
    assert 0.4 <= exists.count("yes") / len(exists) <= 0.6
    only_exists = SyntheticVQA(1000, seed=9, question_types=["exists"])
    answers = [only_exists.describe(index).answer for index in range(1000)]
    assert 0.4 <= answers.count("yes") / 1000 <= 0.6
    baseline = majority_baseline(dataset)
    assert set(baseline) == set(QUESTION_TYPES)
    for kind, stats in baseline.items():
        answers = Counter(scene.answer for scene in scenes if scene.question_type == kind)
        assert stats["num_samples"] == types[kind]
        assert stats["majority_rate"] == pytest.approx(max(answers.values()) / types[kind])
        assert stats["majority_answer"] == answers.most_common(1)[0][0]
        assert set(answers) <= set(answer_options(kind, max_shapes=3))
        assert stats["uniform_chance"] == pytest.approx(1 / len(dataset.answer_options(kind)))
        assert stats["majority_rate"] < 0.62  # no type is solvable by always giving one answer
    assert answer_options("count", max_shapes=3) == ["one", "two", "three"]
    # The generic path (plain items) agrees with the metadata path on the same samples.
    small = SyntheticVQA(40, seed=2)
    generic = majority_baseline([small[index] for index in range(20)])
    fast = majority_baseline(small, limit=20)
    assert {kind: {name: fast[kind][name] for name in generic[kind]} for kind in fast} == generic


def test_vocabulary_covers_every_sample(tokenizer, template):
    words = vocabulary()
    assert len(words) == len(set(words)) and len(tokenizer) == len(words) + 4
    unk = tokenizer.unk_token_id
    for dataset, count in (
        (SyntheticVQA(2000, seed=1), 2000),
        (SyntheticVQA(500, grid=3, max_shapes=9, colors=list(PALETTE), seed=2), 500),
    ):
        for index in range(count):
            input_ids, _ = template.tokenize(dataset.describe(index).conversation, tokenizer)
            assert unk not in input_ids.tolist(), dataset.describe(index).conversation


# ------------------------------------------------------------------------------ LLaVA source
def write_llava(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True)
    Image.new("RGB", (40, 20), (200, 30, 30)).save(images / "coco" / "red.png")
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (30, 30, 200)).save(buffer, format="JPEG")
    (images / "coco" / "blue.jpg").write_bytes(buffer.getvalue())
    (images / "coco" / "broken.jpg").write_bytes(buffer.getvalue()[:60])
    entries = [
        {
            "id": "red",
            "image": "coco/red.png",
            "conversations": [
                {"from": "human", "value": "what color is the square?\n<image>"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "is there a circle?"},
                {"from": "gpt", "value": "no"},
            ],
        },
        {"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]},
        {
            "id": "broken",
            "image": "coco/broken.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat shape is there?"},
                {"from": "gpt", "value": "circle"},
            ],
        },
        {
            "id": "blue",
            "image": "coco/blue.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the square?"},
                {"from": "gpt", "value": "blue"},
            ],
        },
        {
            "id": "gone",
            "image": "coco/missing.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat color?"},
                {"from": "gpt", "value": "green"},
            ],
        },
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(entries))
    return path


def test_llava_source_items_and_skips(tmp_path):
    source = LLaVAJsonSource(write_llava(tmp_path), tmp_path / "images")
    assert len(source) == 4 and source.num_text_only == 1
    red = source[0]
    assert red["key"] == "red" and red["question_type"] == "llava" and red["answer"] == "red"
    assert red["image"].size == (40, 20) and red["image"].mode == "RGB" and red["error"] is None
    # The placeholder is moved to the start of the first question, as LLaVA does.
    assert red["conversation"][0]["value"] == "<image>\nwhat color is the square?"
    assert len(red["conversation"]) == 4
    broken, missing = source[1], source[3]
    assert broken["image"] is None and "broken.jpg" in broken["error"]
    assert missing["image"] is None and "missing.png" in missing["error"]
    assert source[2]["image"].getpixel((12, 12))[2] > 150


def test_llava_source_through_datamodule_counts_skips(tmp_path, tokenizer, caplog):
    source = LLaVAJsonSource(write_llava(tmp_path), tmp_path / "images")
    module = VQADataModule(source, source, tokenizer, ConversationTemplate(), image_size=SIZE, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="tokenmill.data"):
        batches = list(module.val_dataloader())
    assert len(batches) == 1
    batch = batches[0]
    assert batch["key"] == ["red", "blue"] and int(batch["num_skipped"]) == 2
    assert batch["answer"] == ["red", "blue"]
    assert set(module.skipped_keys) == {"broken", "gone"} and module.num_skipped == 2
    assert "broken.jpg" in caplog.text and "missing.png" in caplog.text
    # Non-square image padded with the CLIP mean: the top rows of the red 40x20 image are padding.
    red = batch["pixel_values"][0]
    assert torch.allclose(red[:, 0, SIZE // 2], torch.tensor(CLIP_MEAN), atol=0.02)
    assert red[0, SIZE // 2, SIZE // 2] > 0.7 and red[2, SIZE // 2, SIZE // 2] < 0.2
    labels = batch["labels"][0]
    spans = label_spans(batch["input_ids"][0], labels)
    assert [tokenizer.decode(span) for span in spans] == ["red </s>", "no </s>"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"id": "a", "image": "x.png", "conversations": []}', "invalid JSON at line 1"),
        ('{"id": "a"}', "expected a JSON list"),
        (
            '[{"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "q"},'
            ' {"from": "gpt", "value": "a"}]}, {"id": "b", "image": "y.png"}]',
            r"entry 1 \(id='b'\) is missing key 'conversations'",
        ),
        (
            '[{"id": "a", "image": "x.png", "conversations": [{"from": "human"}]}]',
            r"entry 0 \(id='a'\): conversations\[0\] is missing key 'value'",
        ),
        ('[{"id": "a", "conversations": [{"from": "robot", "value": "q"}]}]', "from='robot'"),
    ],
)
def test_llava_source_malformed_json_names_file_and_entry(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(LLaVAFormatError, match=message) as error:
        LLaVAJsonSource(path, tmp_path)
    assert "bad.json" in str(error.value)


# ------------------------------------------------------------------------------ datamodule
def test_batch_contract_padding_and_labels(tokenizer):
    module = datamodule(tokenizer)
    batch = next(iter(module.train_dataloader()))
    assert set(batch) == {
        "pixel_values",
        "input_ids",
        "labels",
        "attention_mask",
        "question_type",
        "answer",
        "key",
        "num_skipped",
    }
    pixels = batch["pixel_values"]
    assert pixels.dtype == torch.float32 and pixels.shape == (4, 3, SIZE, SIZE)
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.max() > 0.6
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.dtype == labels.dtype == mask.dtype == torch.long and ids.shape == labels.shape == mask.shape
    assert ((ids == IMAGE_TOKEN_INDEX).sum(dim=1) == 1).all()
    lengths = mask.sum(dim=1)
    assert lengths.max() == ids.shape[1] and lengths.min() < ids.shape[1]  # question lengths differ
    for row in range(4):
        n = int(lengths[row])
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == tokenizer.pad_token_id).all() and (labels[row, n:] == IGNORE_INDEX).all()
        assert tokenizer.pad_token_id not in ids[row, :n].tolist()
        spans = label_spans(ids[row], labels[row])
        assert [tokenizer.decode(span) for span in spans] == [f"{batch['answer'][row]} </s>"]
        assert labels[row, n - 1] == tokenizer.eos_token_id  # the last real token is the trained eos
    assert batch["num_skipped"].dtype == torch.long and int(batch["num_skipped"]) == 0
    assert all(kind in QUESTION_TYPES for kind in batch["question_type"])


def test_max_length_that_would_cut_the_image_skips_and_counts(tokenizer):
    module = datamodule(tokenizer, max_length=8)
    batch = next(iter(module.val_dataloader()))
    assert batch["pixel_values"].shape == (0, 3, SIZE, SIZE) and batch["input_ids"].shape == (0, 0)
    assert int(batch["num_skipped"]) == 4 and module.num_skipped == 4
    assert "max_length=8" in next(iter(module.skipped_keys.values()))


def test_validation_is_ordered_and_training_shuffles_by_seed(tokenizer):
    module = datamodule(tokenizer)
    keys = [key for batch in module.val_dataloader() for key in batch["key"]]
    assert keys == [module.val_source[index]["key"] for index in range(8)]
    train = [key for batch in module.train_dataloader() for key in batch["key"]]
    assert sorted(train) == sorted(
        module.train_source.describe(i).key for i in range(24)
    ) and train != sorted(train)
    again = [key for batch in datamodule(tokenizer).train_dataloader() for key in batch["key"]]
    reseeded = [key for batch in datamodule(tokenizer, seed=1).train_dataloader() for key in batch["key"]]
    assert again == train and reseeded != train


def assert_same_batch(a: dict, b: dict) -> None:
    assert a["key"] == b["key"] and a["answer"] == b["answer"]
    for name in ("pixel_values", "input_ids", "labels", "attention_mask", "num_skipped"):
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("epoch", [0, 1])
def test_datamodule_resumes_mid_epoch_exactly(tokenizer, epoch):
    loader = datamodule(tokenizer).train_dataloader()
    assert isinstance(loader, ResumableDataLoader)
    for _ in range(epoch):
        list(loader)
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
    state = loader.state_dict()
    assert state["epoch"] == epoch and state["samples_yielded"] == 8
    expected_rest = list(iterator)
    resumed = datamodule(tokenizer).train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(expected_rest) == 4
    for a, b in zip(rest, expected_rest, strict=True):
        assert_same_batch(a, b)


def test_workers_give_the_same_batches(tokenizer):
    single = list(datamodule(tokenizer, num_train=16).train_dataloader())
    workers = list(datamodule(tokenizer, num_train=16, num_workers=2).train_dataloader())
    for a, b in zip(single, workers, strict=True):
        assert_same_batch(a, b)


def test_image_transform_pad_and_crop():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    padded = VQAImageTransform(20)(image)
    assert padded.shape == (3, 20, 20) and padded.dtype == torch.float32
    assert torch.allclose(padded[:, 0, 10], torch.tensor(CLIP_MEAN), atol=0.01)  # top band is padding
    assert torch.allclose(padded[:, 10, 10], torch.tensor([1.0, 0.0, 0.0]), atol=0.01)
    own_mean = VQAImageTransform(20, pad_color="image")(image)
    assert torch.allclose(own_mean[:, 0, 10], torch.tensor([1.0, 0.0, 0.0]), atol=0.01)
    cropped = VQAImageTransform(20, pad_to_square=False)(image)
    assert torch.allclose(cropped, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 20, 20), atol=0.01)
    with pytest.raises(ValueError, match="pad_color"):
        VQAImageTransform(20, pad_color="mean")
