"""Register tokens: FALCON's readout and cross-crop register attention, PH-Reg's denoised
targets and self-distillation task (tiny random-init CLIP/SigLIP towers, CPU)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from tokenmill.compressors.base import VisionFeatures
from tokenmill.compressors.registers import (
    RegisterReadout,
    align_features,
    augment_images,
    denoised_dense_targets,
)
from tokenmill.compressors.vision import HFVisionEncoder
from tokenmill.export import build_model, from_pretrained, model_config
from tokenmill.trainers.optim import warmup_cosine_scheduler
from tokenmill.trainers.register_task import RegisterDistillation
from tokenmill.trainers.run import train

from .conftest import compose_config

# the same tiny shape for both families: CLIP has a class token, SigLIP none
TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=32, patch_size=8)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and much faster when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tower(model_type="clip_vision_model", attn="sdpa", layers=2, **kwargs) -> HFVisionEncoder:
    config = {
        "model_type": model_type,
        **TINY,
        "num_hidden_layers": layers,
        "attn_implementation": attn,
    }
    return HFVisionEncoder(config=config, model_type=model_type, **kwargs).eval()


def images(*shape, seed=0) -> torch.Tensor:
    return torch.rand(*shape, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def adamw(lr=1e-2):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


# ------------------------------------------------------------------------------ FALCON: readout


def test_register_readout_emits_the_registers():
    enc = tower(num_registers=4)
    readout = RegisterReadout(in_dim=32, num_registers=4)
    assert readout.supported_num_tokens == [4] and readout.out_dim == 32
    with torch.no_grad():
        features = enc(images(2))
        out = readout(features)
    assert out.tokens.shape == (2, 4, 32) and torch.equal(out.tokens, features.registers)
    with pytest.raises(ValueError, match="cannot produce num_tokens=3"):
        readout(features, num_tokens=3)
    # multi-crop: the registers of every crop, crop by crop
    enc.cross_crop_registers = True
    with torch.no_grad():
        crops = enc(images(2, 3))
    out = RegisterReadout(in_dim=32, num_registers=4, num_crops=3)(crops)
    assert out.tokens.shape == (2, 12, 32)


def test_register_readout_refuses_a_tower_without_registers():
    with torch.no_grad():
        features = tower()(images(2))
    assert features.registers is None
    with pytest.raises(ValueError, match="set num_registers > 0 on the vision encoder"):
        RegisterReadout(in_dim=32, num_registers=4)(features)
    wrong = VisionFeatures(patches=features.patches, grid=(4, 4), registers=torch.zeros(2, 8, 32))
    with pytest.raises(ValueError, match="expects 4 register outputs"):
        RegisterReadout(in_dim=32, num_registers=4)(wrong)


# ------------------------------------------------------------------- FALCON: cross-crop registers


def test_cross_crop_mask_lets_only_registers_cross_crops():
    enc = tower(num_registers=2, cross_crop_registers=True)
    length = 1 + 16 + 2  # class token, 4x4 patches, registers
    mask = enc.cross_crop_attention_mask(3)[0, 0]
    assert mask.shape == (3 * length, 3 * length)
    allowed = mask == 0
    crop = torch.arange(3 * length) // length
    register = torch.arange(3 * length) % length >= length - 2
    same = crop[:, None] == crop[None, :]
    assert allowed[same].all()
    assert torch.equal(allowed[~same], (register[:, None] & register[None, :])[~same])
    assert (mask[~allowed] == torch.finfo(torch.float32).min).all()
    with pytest.raises(ValueError, match="needs register tokens"):
        tower(cross_crop_registers=True)


def test_crops_without_cross_attention_are_encoded_independently():
    enc = tower(num_registers=2, with_cls_attention=True, extra_layers=[1])
    crops = images(2, 3)
    with torch.no_grad():
        joint = enc(crops)
        alone = [enc(crops[:, c]) for c in range(3)]
    assert joint.grid == (12, 4) and joint.patches.shape == (2, 48, 32)
    assert joint.registers.shape == (2, 6, 32) and joint.cls.shape == (2, 3, 32)
    for c, single in enumerate(alone):
        torch.testing.assert_close(joint.patches[:, 16 * c : 16 * (c + 1)], single.patches)
        torch.testing.assert_close(joint.registers[:, 2 * c : 2 * (c + 1)], single.registers)
        torch.testing.assert_close(joint.cls[:, c], single.cls)
        torch.testing.assert_close(joint.cls_attention[:, 16 * c : 16 * (c + 1)], single.cls_attention)
        torch.testing.assert_close(joint.layers[1][:, 16 * c : 16 * (c + 1)], single.layers[1])


@pytest.mark.parametrize("model_type", ["clip_vision_model", "siglip_vision_model"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cross_crop_information_reaches_other_crops_only_through_registers(model_type, attn):
    """Layer by layer, with crop 1's pixels changed and crop 0's kept. Every crop's registers
    enter layer 1 as the same learned vectors, so nothing about crop 1's pixels can cross at
    layer 1; crop 1's registers carry it after layer 1, crop 0's registers read it in layer 2,
    and crop 0's patches read it from their own registers in layer 3. Patches never attend to
    another crop directly."""
    enc = tower(
        model_type,
        attn,
        layers=3,
        num_registers=2,
        cross_crop_registers=True,
        select_layer=3,
        extra_layers=[1, 2],
    )
    a = images(1, 2, seed=1)
    b = a.clone()
    b[:, 1] = images(1, seed=2)[0]  # only crop 1 changes
    p, n, r = enc.num_prefix_tokens, 16, 2
    length = p + n + r

    def states(x, cross):  # crop-by-crop hidden states [C, L, D] after layers 0..3
        enc.cross_crop_registers = cross
        crops = x.flatten(0, 1)
        tokens = enc.embed(crops)
        mask = enc.cross_crop_attention_mask(2) if cross else None
        with torch.no_grad():
            hidden = enc.run_layers(tokens.reshape(1, 2 * length, -1) if cross else tokens, 3, mask)
        return [h.reshape(2, length, -1) for h in hidden]

    def differs(x, y):
        return (x - y).abs().max().item() > 1e-4

    on_a, on_b = states(a, True), states(b, True)
    patches, registers = slice(p, p + n), slice(p + n, length)
    assert differs(on_a[1][1, registers], on_b[1][1, registers])  # crop 1's registers carry its pixels
    same = dict(rtol=0, atol=1e-6)
    torch.testing.assert_close(on_a[1][0], on_b[1][0], **same)  # layer 1: crop 0 unaffected
    torch.testing.assert_close(on_a[2][0, patches], on_b[2][0, patches], **same)  # layer 2: patches still not
    assert differs(on_a[2][0, registers], on_b[2][0, registers])  # ... but crop 0's registers are
    assert differs(on_a[3][0, patches], on_b[3][0, patches])  # layer 3: reaches crop 0's patches
    # the registers do see each other in layer 1 (one more key set), patches do not
    off_a = states(a, False)
    assert differs(on_a[1][0, registers], off_a[1][0, registers])
    torch.testing.assert_close(on_a[1][0, patches], off_a[1][0, patches], rtol=1e-5, atol=1e-5)
    # without cross-crop attention crop 0 never changes
    off_b = states(b, False)
    for x, y in zip(off_a, off_b, strict=True):
        torch.testing.assert_close(x[0], y[0], **same)
    # forward() folds the same computation: crop 0's part of the output is crop 0's layer-3 state
    enc.cross_crop_registers = True
    with torch.no_grad():
        out = enc(b)
    torch.testing.assert_close(out.patches[:, :n], on_b[3][:1, patches], rtol=0, atol=0)
    torch.testing.assert_close(out.registers[:, r:], on_b[3][1:, registers], rtol=0, atol=0)
    torch.testing.assert_close(out.layers[2][:, n:], on_b[2][1:, patches], rtol=0, atol=0)


def test_cross_crop_registers_do_not_depend_on_the_attention_kernel():
    torch.manual_seed(0)
    sdpa = tower(num_registers=3, cross_crop_registers=True, select_layer=-1)
    eager = copy.deepcopy(sdpa)
    eager.model.set_attn_implementation("eager")
    assert eager.model.config._attn_implementation == "eager" != sdpa.model.config._attn_implementation
    crops = images(2, 3)
    with torch.no_grad():
        x, y = sdpa(crops), eager(crops)
    torch.testing.assert_close(x.patches, y.patches, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.registers, y.registers, rtol=1e-5, atol=1e-5)
    # one crop per image: the mask allows everything, so it is the single-image path
    with torch.no_grad():
        one = sdpa(crops[:, :1])
        plain = sdpa(crops[:, 0])
    torch.testing.assert_close(one.patches, plain.patches)


def test_towers_run_without_their_registers_on_request():
    enc = tower(num_registers=4, select_layer=-1)
    bare = copy.deepcopy(enc)
    bare.registers, bare.num_registers = None, 0
    x = images(2)
    with torch.no_grad():
        without = enc(x, use_registers=False)
        reference = bare(x)
        with_registers = enc(x)
    assert without.registers is None
    torch.testing.assert_close(without.patches, reference.patches, rtol=0, atol=0)
    assert (with_registers.patches - without.patches).abs().max() > 1e-4


# ------------------------------------------------------------------------- PH-Reg: targets


def equivariant_tower(symmetric=True) -> HFVisionEncoder:
    """Embedding-only tower (select_layer 0) without position embeddings: each patch's feature
    depends on that patch's pixels only, so shifting the image by whole patches shifts the grid;
    with a left-right symmetric patch kernel a horizontal flip mirrors the grid too."""
    enc = tower(select_layer=0)
    with torch.no_grad():
        enc.model.embeddings.position_embedding.weight.zero_()
        weight = enc.model.embeddings.patch_embedding.weight
        if symmetric:
            weight.copy_((weight + weight.flip(-1)) / 2)
    return enc


def test_zero_shift_without_flip_is_the_plain_teacher_output():
    teacher = tower(select_layer=-1)
    x = images(3)
    with torch.no_grad():
        plain = teacher(x).patches
    targets = denoised_dense_targets(
        teacher, x, num_augmentations=3, max_shift=0, flip=False, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(targets, plain, rtol=1e-6, atol=1e-6)
    assert torch.equal(denoised_dense_targets(teacher, x, 0, 16, True), plain)  # no views: the plain output


def test_undoing_shifts_and_flips_realigns_the_feature_grid():
    x = images(4)
    generator = torch.Generator().manual_seed(0)
    teacher = equivariant_tower(symmetric=True)
    with torch.no_grad():
        plain = teacher(x).patches
    # shifts of up to 2 patches and flips: every view maps back exactly onto the plain grid, and
    # the cells that were padding (no valid content) are left out of the average
    targets = denoised_dense_targets(
        teacher, x, num_augmentations=8, max_shift=16, flip=True, generator=generator
    )
    torch.testing.assert_close(targets, plain, rtol=1e-5, atol=1e-5)
    # an asymmetric kernel is not flip-equivariant: the flipped views really were flipped ...
    asymmetric = equivariant_tower(symmetric=False)
    with torch.no_grad():
        plain = asymmetric(x).patches
    flipped = denoised_dense_targets(asymmetric, x, 8, 0, True, torch.Generator().manual_seed(0))
    assert (flipped - plain).abs().max() > 1e-3
    # ... while shifts alone still realign exactly
    shifted = denoised_dense_targets(asymmetric, x, 8, 16, False, torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, plain, rtol=1e-5, atol=1e-5)


def test_augment_and_align_are_inverse_on_patch_grids():
    # a "feature" per cell = the cell's index, painted into each 8x8 patch of a 32x32 image
    cells = torch.arange(16.0).view(1, 1, 4, 4)
    image = cells.repeat_interleave(8, 2).repeat_interleave(8, 3).expand(2, 3, 32, 32)
    shifts = torch.tensor([[1, -2], [-1, 1]])
    flips = torch.tensor([True, False])
    view = augment_images(image, shifts * 8, flips, torch.full((1, 3, 1, 1), -1.0))
    view_cells = view[:, :1, ::8, ::8].reshape(2, 16, 1)
    aligned, valid = align_features(view_cells, (4, 4), shifts, flips)
    expected = cells.reshape(1, 16, 1).expand(2, 16, 1)
    assert torch.equal(aligned[valid], expected[valid])
    assert valid.sum(1).tolist() == [3 * 2, 3 * 3]  # rows x columns still inside the frame
    assert (view_cells == -1).sum().item() == 2 * 16 - valid.sum().item()  # the rest is padding


def test_targets_refuse_a_shift_off_the_patch_grid():
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        denoised_dense_targets(tower(), images(1), 2, 12, True)


# ---------------------------------------------------------------------------- PH-Reg: task


def task_for(enc, trainable, **kwargs) -> RegisterDistillation:
    return RegisterDistillation(
        enc, optimizer=adamw(), trainable=trainable, num_augmentations=2, max_shift=8, **kwargs
    )


def test_task_refuses_a_student_without_registers_and_unknown_patterns():
    with pytest.raises(ValueError, match="needs a student with registers: set num_registers > 0"):
        task_for(tower(), ["registers"])
    with pytest.raises(
        ValueError, match=re.escape(r"trainable pattern(s) 'model\.encoder\.blocks' match no parameter")
    ):
        task_for(tower(num_registers=2), ["registers", r"model\.encoder\.blocks"])
    with pytest.raises(ValueError, match="max_shift must be a non-negative multiple of the patch size 8"):
        RegisterDistillation(tower(num_registers=2), optimizer=adamw(), max_shift=4)


def test_only_registers_and_chosen_weights_train():
    enc = tower(num_registers=4, select_layer=-1)
    patterns = ["registers", r"model\.encoder\.layers\.\d+\.mlp\.", "model.embeddings.position_embedding"]
    task = task_for(enc, patterns, scheduler=lambda opt: warmup_cosine_scheduler(opt, 2, 10))
    trainable = {n for n, p in task.net.named_parameters() if p.requires_grad}
    assert "registers" in trainable and "model.embeddings.position_embedding.weight" in trainable
    assert trainable == set(task.trainable_names)
    assert all(
        re.match(patterns[1], n) or n in ("registers", "model.embeddings.position_embedding.weight")
        for n in trainable
    )
    # the teacher is the tower before training, without registers
    x = images(4)
    with torch.no_grad():
        torch.testing.assert_close(
            task.teacher(x).patches, enc(x, use_registers=False).patches, rtol=0, atol=0
        )
    assert task.teacher.registers is None and not any(p.requires_grad for p in task.teacher.parameters())

    before = {k: v.clone() for k, v in task.state_dict().items()}
    setup = task.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    generator = torch.Generator().manual_seed(0)
    task.train()
    for _ in range(3):
        loss, _ = task._step({"image": x * 2 - 1}, generator)
        optimizer.zero_grad()
        loss.backward()
        for name, param in task.net.named_parameters():
            assert (param.grad is not None) == (name in trainable), name
        optimizer.step()
        scheduler.step()
    assert not task.teacher.training
    after = task.state_dict()
    for key, value in before.items():
        name = key.removeprefix("net.")
        if key.startswith("net.") and name in trainable:
            assert not torch.equal(value, after[key]), f"{key} did not train"
        else:
            assert torch.equal(value, after[key]), f"{key} changed"


def test_distillation_loss_goes_down():
    enc = tower(num_registers=4, select_layer=-1)
    task = task_for(
        enc, ["registers", r"model\.encoder\.layers\.\d+\.mlp\.", "model.embeddings.position_embedding"]
    )
    x = images(4)
    targets = task.targets(x, torch.Generator().manual_seed(0))  # fixed images and views
    optimizer = task.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(30):
        loss, logs = task.distillation_loss(task.net(x).patches, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(logs) == {"loss", "cos", "mse"}
    assert losses[-1] < 0.5 * losses[0], losses


def test_tiny_experiment_trains_and_exports(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=registers_phreg_tiny",
        "data.batch_size=4",
        "data.source.num_train_samples=24",
        "data.source.num_val_samples=4",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "callbacks.model_checkpoint.every_n_train_steps=3",
    ]
    cfg = compose_config(overrides, run_dir)
    metrics = train(cfg)
    assert {"val/loss", "val/cos", "val/mse"} <= set(metrics)
    logged = (run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in logged and "val/loss" in logged

    exported = from_pretrained(run_dir / "export")
    assert isinstance(exported, HFVisionEncoder) and exported.num_registers == 4
    # the export is the trained student: the same weights as the checkpoint's `net.*`
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    student = build_model(cfg.model.net)
    student.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    teacher = {k.removeprefix("teacher."): v for k, v in state.items() if k.startswith("teacher.")}
    assert "registers" not in teacher
    assert not torch.equal(
        teacher["model.embeddings.position_embedding.weight"],
        state["net.model.embeddings.position_embedding.weight"],
    )  # it trained
    assert torch.equal(
        teacher["model.encoder.layers.0.self_attn.q_proj.weight"],
        state["net.model.encoder.layers.0.self_attn.q_proj.weight"],
    )  # frozen
    x = images(2)
    with torch.no_grad():
        a, b = exported(x), student.eval()(x)
    assert torch.equal(a.patches, b.patches) and torch.equal(a.registers, b.registers)


def test_export_of_a_student_loaded_from_a_checkpoint_is_self_contained(tmp_path):
    # a "pretrained" tower in a local Hugging Face directory stands in for a hub checkpoint
    hf_dir = tmp_path / "hf"
    tower().model.save_pretrained(hf_dir)
    node = {
        "_target_": "tokenmill.compressors.vision.HFVisionEncoder",
        "name_or_path": str(hf_dir),
        "select_layer": -1,
        "num_registers": 2,
    }
    student = build_model(node)
    task = task_for(student, ["registers"])
    task.export(tmp_path / "export", metrics={"val/loss": 0.5})
    assert model_config(student)["name_or_path"] == str(hf_dir)  # the run's own record is untouched
    for file in hf_dir.iterdir():
        file.unlink()
    hf_dir.rmdir()
    saved = json.loads((tmp_path / "export" / "config.json").read_text())["model"]
    assert saved["name_or_path"] is None and saved["config"]["hidden_size"] == 32
    reloaded = from_pretrained(tmp_path / "export")
    x = images(2)
    with torch.no_grad():
        a, b = reloaded(x), student.eval()(x)
    assert torch.equal(a.patches, b.patches) and torch.equal(a.registers, b.registers)
