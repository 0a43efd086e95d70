"""The VLM stage: assembly, stage rules, hand-off between stages, export, budget evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from tokenmill.compressors.vlm import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VisionLanguageModel
from tokenmill.compressors.voco import IMAGE, TEXT_AFTER, TEXT_BEFORE, VOCO
from tokenmill.evaluation.budget_accuracy import evaluate_budgets, plot, write_csv
from tokenmill.export import from_pretrained
from tokenmill.export.connector import MM_PROJECTOR_NAME, load_mm_projector
from tokenmill.trainers.run import build_task, train

from .conftest import compose_config

# Small enough for CPU tests: 32 px images (4x4 = 16 patches), width 32, one or two layers.
TINY_VLM = [
    "data.image_size=32",
    "data.batch_size=8",
    "data.val_batch_size=8",
    "data.train_source.num_samples=64",
    "data.val_source.num_samples=16",
    "vlm.vision_width=32",
    "vlm.llm_width=32",
    "vlm.grid_size=4",
    "model.net.vision.config.num_hidden_layers=2",
    "model.net.language_model.config.num_hidden_layers=2",
    "model.scheduler.warmup_steps=1",
    "model.val_budgets=[16]",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "trainer.num_sanity_val_steps=0",
]


def tiny_cfg(tmp_path, experiment="vqa_tiny", extra=()):
    return compose_config([f"experiment={experiment}", *TINY_VLM, *extra], tmp_path)


def first_batch(cfg, split="train"):
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    return next(iter(loader))


def parameters(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


# --------------------------------------------------------------------------- assembly
def test_placeholder_expands_to_the_compressor_output_and_labels_skip_image(tmp_path):
    cfg = tiny_cfg(tmp_path, "vqa_mqt_tiny", ["model.net.connector.compressor.num_queries=16", "model.val_budgets=[1,16]"])
    net = build_task(cfg).net
    batch = first_batch(cfg)
    for m in (1, 5, 16):
        embeds, _ = net.encode_images(batch["pixel_values"], num_tokens=m)
        inputs = net.build_inputs(batch["input_ids"], batch["labels"], batch["attention_mask"], embeds)
        text_lengths = batch["attention_mask"].sum(1) - 1  # the placeholder becomes m tokens
        assert inputs.padding_mask.sum(1).tolist() == (text_lengths + m).tolist()
        assert ((inputs.segments == IMAGE) & inputs.padding_mask).sum(1).tolist() == [m] * len(text_lengths)
        assert (inputs.labels[inputs.segments == IMAGE] == IGNORE_INDEX).all()
        for b in range(len(text_lengths)):
            # answers keep their label ids, in order, after the image
            original = batch["labels"][b][batch["labels"][b] != IGNORE_INDEX]
            assert torch.equal(inputs.labels[b][inputs.labels[b] != IGNORE_INDEX], original)
            p = int((batch["input_ids"][b] == IMAGE_TOKEN_INDEX).nonzero())
            assert torch.equal(inputs.inputs_embeds[b, p : p + m], embeds[b])
            assert (inputs.segments[b, :p] == TEXT_BEFORE).all()
        assert torch.equal(inputs.position_ids[0, : int(inputs.padding_mask[0].sum())],
                           torch.arange(int(inputs.padding_mask[0].sum())))


def test_a_row_without_exactly_one_image_placeholder_is_refused(tmp_path):
    cfg = tiny_cfg(tmp_path)
    net = build_task(cfg).net
    batch = first_batch(cfg)
    ids = batch["input_ids"].clone()
    ids[0][ids[0] == IMAGE_TOKEN_INDEX] = 5
    embeds, _ = net.encode_images(batch["pixel_values"])
    with pytest.raises(ValueError, match="sample 0 has 0 image placeholders"):
        net.build_inputs(ids, batch["labels"], batch["attention_mask"], embeds)


def test_widths_are_checked_when_the_model_is_assembled(tmp_path):
    cfg = tiny_cfg(tmp_path, extra=["model.net.connector.projector.out_dim=48"])
    # Hydra wraps the ValueError raised while building; the message is the model's own.
    with pytest.raises(InstantiationException, match="projector output width 48 != language model hidden size 32"):
        build_task(cfg)


def test_voco_sequence_and_mask(tmp_path):
    cfg = tiny_cfg(tmp_path, extra=["model.net.voco={_target_: tokenmill.compressors.VoCo, num_tokens: 2}"])
    net = build_task(cfg).net
    batch = first_batch(cfg)
    embeds, _ = net.encode_images(batch["pixel_values"])
    inputs = net.build_inputs(batch["input_ids"], batch["labels"], batch["attention_mask"], embeds)
    assert ((inputs.segments == VOCO) & inputs.padding_mask).sum(1).tolist() == [2] * embeds.shape[0]
    mask = inputs.attention_mask[0, 0]  # additive [L, L]
    after = (inputs.segments[0] == TEXT_AFTER) & inputs.padding_mask[0]
    image = inputs.segments[0] == IMAGE
    assert (mask[after][:, image] < -1e30).all()  # answers never see the image ...
    voco = inputs.segments[0] == VOCO
    assert (mask[after][:, voco] == 0).all()  # ... only the VoCo tokens
    assert len(net.language_model.tokenizer) == net.language_model.model.get_input_embeddings().num_embeddings


def test_voco_vlm_answers_from_the_compressed_cache_exactly_as_from_the_full_sequence(tmp_path):
    """Inference keeps only [text before, VoCo] key/values; the answer logits do not change."""
    from tokenmill.compressors.voco import continue_from_cache, voco_prefill

    cfg = tiny_cfg(tmp_path, extra=["model.net.voco={_target_: tokenmill.compressors.VoCo, num_tokens: 2}"])
    net = build_task(cfg).net.eval()
    batch = {k: v[:1] if hasattr(v, "shape") and v.ndim else v for k, v in first_batch(cfg, "val").items()}
    with torch.no_grad():
        embeds, _ = net.encode_images(batch["pixel_values"])
        inputs = net.build_inputs(batch["input_ids"], batch["labels"], batch["attention_mask"], embeds)
        full = net.language_model(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids).logits
        split = int((inputs.segments[0] != TEXT_AFTER).sum())
        llm = net.language_model.model
        state = voco_prefill(llm, inputs.inputs_embeds[:, :split], inputs.segments[:, :split])
        assert state.cache.get_seq_length() == split - embeds.shape[1]  # image key/values dropped
        cached = continue_from_cache(llm, state, inputs_embeds=inputs.inputs_embeds[:, split:])
    assert torch.allclose(cached, full[:, split:], atol=1e-5)


# --------------------------------------------------------------------------- stage rules
def test_stage_one_trains_only_the_connector(tmp_path):
    cfg = tiny_cfg(tmp_path, extra=["model.trainable=[connector\\.]", "trainer.max_steps=3", "export.enabled=false"])
    task = build_task(cfg)
    before = parameters(task.net)
    import lightning as L

    L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              num_sanity_val_steps=0, limit_val_batches=0).fit(task, datamodule=instantiate(cfg.data))
    after = parameters(task.net)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("connector.") for k in changed)
    assert any(k.startswith("connector.projector") for k in changed)


def test_lora_stage_trains_adapters_and_the_export_merges_them(tmp_path):
    cfg = tiny_cfg(tmp_path, extra=[
        "model.trainable=[connector\\.]",
        "model.lora={target_modules: 'layers\\.\\d+\\.self_attn\\.(q|v)_proj$', rank: 4, alpha: 8}",
        "trainer.max_steps=3", "trainer.val_check_interval=3",
    ])
    train(cfg)
    export = tmp_path / "export"
    model = from_pretrained(export)
    assert not any("lora" in k for k in model.state_dict())
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    lora_b = [v for k, v in ckpt.items() if k.endswith("lora_b")]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # adapters moved from their zero init
    base = {k: v for k, v in ckpt.items() if ".base." in k}
    assert base and all("language_model" in k for k in base)
    # The merged export computes what the adapted model computed.
    task = build_task(cfg)  # the same config wraps the same layers
    task.net.load_state_dict({k[len("net."):]: v for k, v in ckpt.items()})
    batch = first_batch(cfg, "val")
    task.net.eval()
    with torch.no_grad():
        assert torch.allclose(model(batch).logits, task.net(batch).logits, atol=1e-5)


def test_a_non_finite_loss_skips_the_step_and_keeps_the_weights(tmp_path, caplog):
    import lightning as L

    cfg = tiny_cfg(tmp_path)
    task = build_task(cfg)
    with torch.no_grad():
        task.net.connector.projector[0].weight[0, 0] = float("nan")  # every loss becomes NaN
    before = parameters(task.net)
    L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              num_sanity_val_steps=0, limit_val_batches=0).fit(task, datamodule=instantiate(cfg.data))
    after = parameters(task.net)
    assert all(torch.equal(before[k], after[k]) for k in before if not before[k].isnan().any())
    assert "non-finite loss" in caplog.text


# --------------------------------------------------------------------------- hand-off
@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """A finished stage-1 run (connector only) of the tiny M3 VLM."""
    run_dir = tmp_path_factory.mktemp("stage1")
    cfg = tiny_cfg(run_dir, "vqa_m3_tiny", [
        "model.trainable=[connector\\.]", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "model.net.connector.compressor.scales=[16,4,1]", "model.val_budgets=[16,1]",
    ])
    metrics = train(cfg)
    return run_dir, metrics


def test_stage_one_exports_a_connector_and_a_llava_mm_projector(stage_one):
    run_dir, metrics = stage_one
    connector_dir = run_dir / "export" / "connector"
    config = json.loads((connector_dir / "config.json").read_text())["model"]
    assert config["_target_"] == "tokenmill.compressors.VisualConnector"
    assert config["compressor"]["_target_"] == "tokenmill.compressors.MatryoshkaPooling"
    state = torch.load(connector_dir / MM_PROJECTOR_NAME, weights_only=True)
    assert sorted(state) == [f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    assert state["model.mm_projector.2.weight"].shape == (32, 32)
    assert set(load_mm_projector(connector_dir / MM_PROJECTOR_NAME)) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert "val/acc@16" in metrics and "val/acc@1" in metrics


def handoff_path(run_dir, source):
    """The stage-1 connector directory, or the LLaVA mm_projector.bin inside it."""
    path = run_dir / "export" / "connector"
    return path / MM_PROJECTOR_NAME if source == "mm_projector" else path


@pytest.mark.parametrize("source", ["connector", "mm_projector"])
def test_stage_two_loads_the_stage_one_connector_strictly(stage_one, tmp_path, source):
    run_dir, _ = stage_one
    path = handoff_path(run_dir, source)
    cfg = tiny_cfg(tmp_path, "vqa_m3_tiny", [
        "model.net.connector.compressor.scales=[16,4,1]", "model.val_budgets=[16]",
        "model.trainable=[connector\\.,language_model\\.]", f"model.init_connector={path}",
    ])
    task = build_task(cfg)
    stage_one_net = from_pretrained(run_dir / "export")
    for key, value in stage_one_net.connector.projector.state_dict().items():
        assert torch.equal(task.net.connector.projector.state_dict()[key], value)
    trainable = set(task.trainable_names)
    assert any(k.startswith("language_model.") for k in trainable) and not any(k.startswith("vision.") for k in trainable)


@pytest.mark.parametrize("source", ["connector", "mm_projector"])
def test_a_connector_of_the_wrong_width_is_refused_before_the_first_step(stage_one, tmp_path, source):
    run_dir, _ = stage_one
    path = handoff_path(run_dir, source)
    cfg = tiny_cfg(tmp_path, "vqa_m3_tiny", [
        "vlm.llm_width=48", "model.net.connector.compressor.scales=[16,4,1]", "model.val_budgets=[16]",
        f"model.init_connector={path}",
    ])
    with pytest.raises(InstantiationException, match=r"hidden size: checkpoint 32 vs model 48"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()  # refused before anything trained


def test_init_weights_starts_from_a_whole_vlm_export_and_refuses_another_architecture(stage_one, tmp_path):
    run_dir, _ = stage_one
    common = ["model.net.connector.compressor.scales=[16,4,1]", "model.val_budgets=[16]"]
    cfg = tiny_cfg(tmp_path, "vqa_m3_tiny", [*common, f"model.init_weights={run_dir / 'export'}"])
    task = build_task(cfg)
    exported = from_pretrained(run_dir / "export").state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in task.net.state_dict().items())
    cfg = tiny_cfg(tmp_path, "vqa_m3_tiny", [*common, "model.net.language_model.config.num_hidden_layers=3",
                                              f"model.init_weights={run_dir / 'export'}"])
    with pytest.raises(InstantiationException, match="missing .* tensors .*layers.2"):
        build_task(cfg)


# --------------------------------------------------------------------------- export and evaluation
def test_export_reloads_with_identical_outputs_and_budget_evaluation_writes_csv_and_plot(stage_one, tmp_path):
    run_dir, _ = stage_one
    model = from_pretrained(run_dir / "export", expected_class=VisionLanguageModel)
    cfg = tiny_cfg(tmp_path, "vqa_m3_tiny", ["model.net.connector.compressor.scales=[16,4,1]"])
    batch = first_batch(cfg, "val")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    task = build_task(cfg)
    task.net.load_state_dict({k[len("net."):]: v for k, v in ckpt.items()})
    task.net.eval()
    with torch.no_grad():
        assert torch.equal(model(batch, num_tokens=4).logits, task.net(batch, num_tokens=4).logits)

    rows = evaluate_budgets(model, [batch], budgets=[1, 4, 16], baselines=["avgpool", "cls_topk", "divprune"])
    methods = {(r["method"], r["num_tokens"]) for r in rows}
    assert {("MatryoshkaPooling", k) for k in (1, 4, 16)} <= methods
    assert {("divprune", k) for k in (1, 4, 16)} <= methods and ("cls_topk", 4) in methods
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["num_samples"] == batch["input_ids"].shape[0]
    # M3 at 16 tokens is average pooling at 16 tokens: same features, same model, same answers.
    m3 = {r["num_tokens"]: r["accuracy"] for r in rows if r["method"] == "MatryoshkaPooling"}
    pool = {r["num_tokens"]: r["accuracy"] for r in rows if r["method"] == "avgpool"}
    assert m3[4] == pool[4] and m3[1] == pool[1]
    csv_path = write_csv(rows, tmp_path / "acc.csv")
    assert csv_path.read_text().splitlines()[0] == "method,num_tokens,accuracy,num_samples,per_type"
    assert plot(rows, tmp_path / "acc.png", chance=0.3).stat().st_size > 1000


# --------------------------------------------------------------------------- paper-scale configs
# The real experiments name hub models (CLIP ViT-L/14-336, Vicuna-7B) that cannot be downloaded
# here; their architectures, from the public configs, stand in so the whole VLM builds on the
# meta device at paper size.
CLIP_L_336 = ("{model_type: clip_vision_model, hidden_size: 1024, intermediate_size: 4096, num_hidden_layers: 24,"
              " num_attention_heads: 16, image_size: 336, patch_size: 14}")
VICUNA_7B = ("{model_type: llama, hidden_size: 4096, intermediate_size: 11008, num_hidden_layers: 32,"
             " num_attention_heads: 32, num_key_value_heads: 32, vocab_size: 80, max_position_embeddings: 4096}")
OFFLINE_PAPER_MODELS = [
    "model.net.vision.name_or_path=null", f"model.net.vision.config={CLIP_L_336}",
    "model.net.language_model.name_or_path=null", f"model.net.language_model.config={VICUNA_7B}",
    "model.net.language_model.torch_dtype=null",
    "~model.net.language_model.tokenizer",  # replace the node: Vicuna's tokenizer is a download too
    "+model.net.language_model.tokenizer={_target_: tokenmill.data.vqa.synthetic_vqa_tokenizer}",
    "model.init_connector=null",
]
# experiment -> (compressor class, tokens at the default budget, stage)
PAPER_VLMS = {
    "mqt_llava": ("MatryoshkaQueryTransformer", 256, "pretrain"),
    "m3_llava": ("MatryoshkaPooling", 576, "finetune"),
    "voco_llava": ("IdentityCompressor", 576, "finetune"),
    "tokenpacker_llava": ("TokenPacker", 144, "pretrain"),
    "registers_falcon": ("RegisterReadout", 64, "pretrain"),
}


@pytest.mark.parametrize("name", sorted(PAPER_VLMS))
def test_paper_vlm_experiments_compose_and_build_at_paper_size(name, tmp_path):
    compressor_class, tokens, stage = PAPER_VLMS[name]
    cfg = compose_config([f"experiment={name}"], tmp_path)
    assert cfg.model.net.vision.name_or_path == "openai/clip-vit-large-patch14-336"
    assert cfg.model.net.language_model.name_or_path == "lmsys/vicuna-7b-v1.5"
    assert cfg.data.train_source._target_ == "tokenmill.data.llava.LLaVAJsonSource"
    expected_trainable = ["connector\\."] if stage == "pretrain" else ["connector\\.", "language_model\\."]
    assert list(cfg.model.trainable) == expected_trainable

    cfg = compose_config([f"experiment={name}", *OFFLINE_PAPER_MODELS], tmp_path)
    with torch.device("meta"):
        net = build_task(cfg).net
    assert type(net.compressor).__name__ == compressor_class
    vision_m = sum(p.numel() for p in net.vision.model.parameters()) / 1e6
    llm_b = sum(p.numel() for p in net.language_model.parameters()) / 1e9
    assert 300 < vision_m < 306 and 6.4 < llm_b < 6.8  # CLIP ViT-L/14-336 (303M), Llama-7B (6.5B at vocab 80)
    features = net.vision(torch.zeros(1, 3, 336, 336, device="meta"))
    assert features.patches.shape == (1, 576, 1024)
    embeds, _ = net.encode_images(torch.zeros(1, 3, 336, 336, device="meta"))
    assert embeds.shape == (1, tokens, 4096)
    if name == "voco_llava":
        assert net.voco.num_tokens == 1 and len(net.voco.token_ids) == 1


def test_phreg_experiment_builds_at_paper_size(tmp_path):
    clip_b16 = ("{model_type: clip_vision_model, hidden_size: 768, intermediate_size: 3072, num_hidden_layers: 12,"
                " num_attention_heads: 12, image_size: 224, patch_size: 16}")
    cfg = compose_config(["experiment=registers_phreg"], tmp_path)
    assert cfg.model.net.name_or_path == "openai/clip-vit-base-patch16" and cfg.model.net.num_registers == 16
    cfg = compose_config(["experiment=registers_phreg", "model.net.name_or_path=null",
                          f"model.net.config={clip_b16}"], tmp_path)
    with torch.device("meta"):
        task = build_task(cfg)
    features = task.net(torch.zeros(2, 3, 224, 224, device="meta"))
    assert features.patches.shape == (2, 196, 768) and features.registers.shape == (2, 16, 768)
    assert not any(p.requires_grad for p in task.teacher.parameters())


def test_a_tokenmill_tokenizer_encoder_serves_as_the_vision_tower(tmp_path):
    import shutil

    from tokenmill.export import build_model

    from .conftest import tiny_autoencoder_config

    tokenizer = build_model(tiny_autoencoder_config(image_size=32, patch_size=8, width=32))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    tower = f"{{_target_: tokenmill.compressors.TokenizerVisionEncoder, pretrained_path: {tmp_path / 'tokenizer'}}}"
    cfg = tiny_cfg(tmp_path / "run", extra=["~model.net.vision", f"+model.net.vision={tower}",
                                            "trainer.max_steps=2", "trainer.val_check_interval=2"])
    metrics = train(cfg)
    assert "val/acc@16" in metrics
    shutil.rmtree(tmp_path / "tokenizer")  # the export must not need the tokenizer directory
    model = from_pretrained(tmp_path / "run" / "export")
    batch = first_batch(cfg, "val")
    features = model.vision(batch["pixel_values"])
    assert features.patches.shape == (batch["pixel_values"].shape[0], 16, 32) and features.grid == (4, 4)


@pytest.mark.parametrize(("experiment", "extra"), [
    ("vqa_mqt_tiny", ["model.net.connector.compressor.num_queries=16", "model.val_budgets=[2,16]"]),
    ("vqa_voco_tiny", []),
    ("vqa_tokenpacker_tiny", ["model.net.vision.extra_layers=[1]", "model.val_budgets=[4]"]),
])
def test_tiny_vlm_experiments_train_and_their_exports_reload_exactly(experiment, extra, tmp_path):
    cfg = tiny_cfg(tmp_path, experiment, [*extra, "trainer.max_steps=2", "trainer.val_check_interval=2"])
    metrics = train(cfg)
    assert all(f"val/acc@{k}" in metrics for k in cfg.model.val_budgets)
    model = from_pretrained(tmp_path / "export")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    task = build_task(cfg)
    task.net.load_state_dict({k[len("net."):]: v for k, v in ckpt.items()})
    batch = first_batch(cfg, "val")
    with torch.no_grad():
        k = min(cfg.model.val_budgets)
        assert torch.equal(model(batch, num_tokens=k).logits, task.net.eval()(batch, num_tokens=k).logits)


def test_evaluate_vlm_script_writes_budget_accuracy_for_a_run(stage_one, tmp_path):
    import importlib.util

    from .conftest import ROOT

    spec = importlib.util.spec_from_file_location("evaluate_vlm_cli", ROOT / "scripts" / "evaluate_vlm.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    run_dir, _ = stage_one
    assert cli.main([str(run_dir), "--budgets", "1", "16", "--baselines", "avgpool", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "budget_accuracy.json").read_text())
    rows = {(r["method"], r["num_tokens"]) for r in summary["rows"]}
    assert rows == {("MatryoshkaPooling", 1), ("MatryoshkaPooling", 16), ("avgpool", 1), ("avgpool", 16)}
    assert 0.0 < summary["chance_majority"] <= 1.0 and (tmp_path / "budget_accuracy.png").is_file()
