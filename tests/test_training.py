"""Tests for gradad.engine (training): the split of the training images, the recipe, feature caching,
checkpoints (content, atomic writes), resume and multi-process training.

Everything runs on tiny synthetic MVTec-layout data with a randomly initialised Lite0 backbone
at a 32-pixel input (4×4 features), so one training takes a fraction of a second.
"""

import dataclasses
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import gradad.engine.training as training
import gradad.io_utils
from gradad.backbones import FeatureExtractor, build_backbone
from gradad.checkpoint import CHECKPOINT_NAME, read_checkpoint
from gradad.config import Config, DataConfig, ModelConfig, SplitConfig, TrainConfig, config_to_dict
from gradad.datasets import ImageRecord, list_mvtec, split_training_records
from gradad.engine import train
from gradad.evaluation import postprocess
from tests.synthetic import make_mvtec

N_TRAIN = 6  # per class


def tiny_config(root, **train_values) -> Config:
    """A config that trains in well under a second per epoch."""
    train_cfg = dict(epochs=2, batch_size=4, num_workers=0, device="cpu", lr_step=40)
    train_cfg.update(train_values)
    return Config(
        model=ModelConfig(backbone="efficientnet_lite0", backbone_weights="random", input_size=32,
                          fusion="crad-s", num_blocks=1),
        train=TrainConfig(**train_cfg),
        split=SplitConfig(val_fraction=1 / 3),
        data=DataConfig(dataset="mvtec", root=str(root)),
    )


def with_split(cfg: Config, **values) -> Config:
    """``cfg`` with other split options."""
    return dataclasses.replace(cfg, split=dataclasses.replace(cfg.split, **values))


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("data") / "mvtec", classes=("a", "b"), n_train=N_TRAIN,
                      n_test_good=2, n_test_bad=2, size=40)


def _records(n_per_class, classes=("a", "b")):
    return [ImageRecord(f"/{c}/{i}.png", 0, None, c, "good", "train") for c in classes for i in range(n_per_class)]


# ------------------------------------------------------------------------------ split


def test_split_holds_out_the_fraction_of_each_class_disjointly():
    records = _records(10) + _records(20, classes=("c",))
    train_part, validation = split_training_records(records, None, 0.2, seed=3)
    for name, count in (("a", 10), ("b", 10), ("c", 20)):
        held = [r for r in validation if r.class_name == name]
        kept = [r for r in train_part if r.class_name == name]
        assert len(held) == round(0.2 * count)
        assert len(kept) == count - len(held)
    assert not set(train_part) & set(validation)
    assert set(train_part) | set(validation) == set(records)


def test_split_is_seeded():
    records = _records(30)
    first = split_training_records(records, None, 0.3, seed=1)
    again = split_training_records(records, None, 0.3, seed=1)
    other = split_training_records(records, None, 0.3, seed=2)
    assert first == again
    assert first[1] != other[1]


def test_split_caps_the_training_images_per_class_share():
    records = _records(25, classes=("a",)) + _records(15, classes=("b",))
    train_part, validation = split_training_records(
        records, 10, 0.0, seed=0)
    assert validation == []
    counts = {name: sum(r.class_name == name for r in train_part) for name in ("a", "b")}
    # shares 6.25 and 3.75 of the cap 10; the one image left over goes to the larger remainder
    assert counts == {"a": 6, "b": 4}
    assert set(train_part) <= set(records)
    with pytest.raises(ValueError, match="max_train_images"):
        split_training_records(records, 1, 0.1, seed=0)


def test_split_rejects_anomalous_training_images_and_empty_classes():
    bad = [ImageRecord("/x/bad.png", 1, None, "x", "crack", "train")]
    with pytest.raises(ValueError, match="bad.png"):
        split_training_records(bad, None, 0.1, seed=0)
    with pytest.raises(ValueError, match="class 'a'"):
        split_training_records(_records(1, classes=("a",)), None, 0.9, seed=0)


def test_training_split_checks_its_values():
    with pytest.raises(ValueError, match="split.val_fraction"):
        SplitConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="split.threshold_quantile"):
        SplitConfig(threshold_quantile=1.5)
    with pytest.raises(ValueError, match="split.max_train_images"):
        SplitConfig(max_train_images=0)


# ------------------------------------------------------------------------------ recipe and checkpoint


def test_checkpoint_holds_model_config_versions_and_backbone_id(mvtec, tmp_path):
    cfg = tiny_config(mvtec)
    result = train(cfg, tmp_path, progress=False)
    assert result.checkpoints == [str(tmp_path / CHECKPOINT_NAME)]
    stored = read_checkpoint(tmp_path)
    assert stored["complete"] and stored["epoch"] == 2
    assert stored["config"] == config_to_dict(cfg)
    assert stored["backbone"]["weights_id"] == build_backbone("efficientnet_lite0", "random").weights_id
    assert set(stored["versions"]) >= {"gradad", "grad_ext", "torch"}
    assert stored["versions"]["torch"] == str(torch.__version__)
    # only GRAD's own weights: nothing of the backbone (whose keys start with conv_stem/blocks/bn1)
    assert not any(k.startswith(("conv_stem", "blocks.", "bn1", "features.")) for k in stored["model"])
    assert {"local_grid", "global_grid"} <= set(stored["model"])
    assert len(stored["epoch_losses"]) == 2 and all(np.isfinite(stored["epoch_losses"]))


def test_recipe_param_groups_weight_decay_and_step_schedule(mvtec, tmp_path):
    cfg = tiny_config(mvtec, epochs=3, lr_step=2, lr_gamma=0.5, lr=2e-3, lr_grid=0.2, weight_decay=0.05)
    train(cfg, tmp_path, progress=False)
    groups = {g["name"]: g for g in read_checkpoint(tmp_path)["optimizer"]["param_groups"]}
    # StepLR: lr_0 · γ^⌊epochs / step⌋ after 3 epochs with step 2
    assert groups["grids"]["lr"] == pytest.approx(0.2 * 0.5)
    assert groups["networks"]["lr"] == pytest.approx(2e-3 * 0.5)
    assert groups["grids"]["weight_decay"] == groups["networks"]["weight_decay"] == 0.05


def test_default_recipe_is_the_reference_code():
    cfg = TrainConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.lr_grid, cfg.lr, cfg.weight_decay, cfg.grad_clip,
            cfg.lr_step, cfg.lr_gamma) == (50, 64, 0.1, 1e-3, 0.01, 0.1, 40, 0.1)


def test_gradients_are_clipped_before_each_step(mvtec, tmp_path, monkeypatch):
    norms = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train(tiny_config(mvtec, grad_clip=0.01), tmp_path, progress=False)
    assert len(norms) == 2 * 2  # 2 epochs × ceil(8 training images / batch 4)
    assert max(norms) <= 0.01 * (1 + 1e-4)


def test_validation_threshold_is_the_quantile_of_heldout_normal_scores(mvtec, tmp_path):
    cfg = tiny_config(mvtec)
    train(with_split(cfg, threshold_quantile=0.75), tmp_path, progress=False)
    stored = read_checkpoint(tmp_path)
    validation = stored["validation"]
    _, held = split_training_records(list_mvtec(mvtec, "train"), None, cfg.split.val_fraction, cfg.train.seed)
    assert validation["paths"] == [r.path for r in held] and len(held) == 4
    assert validation["threshold"] == pytest.approx(np.quantile(validation["scores"], 0.75))
    # the scores again, from the stored weights: backbone → GRAD forward → map ×8 → strict score
    from gradad.datasets import AnomalyDataset
    from gradad.models.grad import GRAD

    backbone = build_backbone("efficientnet_lite0", "random")
    model = GRAD(cfg.model, backbone.out_channels, 4)
    model.load_state_dict(stored["model"])
    model.eval()
    data = AnomalyDataset(held, 32, backbone.mean, backbone.std, progress=False)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        maps = torch.nn.functional.interpolate(model(backbone(images)).anomaly_map[:, None], size=(32, 32),
                                               mode="bilinear", align_corners=True)[:, 0]
    _, expected = postprocess(maps, "strict", [(40, 40)] * len(held))
    np.testing.assert_allclose(validation["scores"], expected, rtol=1e-5)


def test_loss_goes_down(mvtec, tmp_path):
    result = train(tiny_config(mvtec, epochs=6), tmp_path, progress=False)
    losses = result.epoch_losses[0]
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast_trains(mvtec, tmp_path):
    result = train(tiny_config(mvtec, amp_bf16=True, epochs=1), tmp_path, progress=False)
    assert np.isfinite(result.epoch_losses[0]).all()


def test_one_model_per_class_when_not_unified(mvtec, tmp_path):
    cfg = tiny_config(mvtec, epochs=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, unified=False))
    result = train(cfg, tmp_path, progress=False)
    assert result.checkpoints == [str(tmp_path / "a" / CHECKPOINT_NAME), str(tmp_path / "b" / CHECKPOINT_NAME)]
    for name in ("a", "b"):
        stored = read_checkpoint(tmp_path / name)
        assert stored["config"]["data"]["classes"] == [name]
        assert all(f"/{name}/" in p for p in stored["validation"]["paths"])


# ------------------------------------------------------------------------------ feature caching


def _count_backbone_images(monkeypatch):
    seen = []
    original = FeatureExtractor.forward

    def counting(self, images):
        seen.append(len(images))
        return original(self, images)

    monkeypatch.setattr(FeatureExtractor, "forward", counting)
    return seen


@pytest.mark.parametrize("cache, expected", [("memory", 8 + 4), ("none", 3 * 8 + 4)])
def test_backbone_runs_once_per_image_with_a_cache(mvtec, tmp_path, monkeypatch, cache, expected):
    seen = _count_backbone_images(monkeypatch)
    cfg = tiny_config(mvtec, epochs=3)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache=cache))
    train(cfg, tmp_path, progress=False)
    assert sum(seen) == expected  # 8 training + 4 validation images


def test_disk_cache_is_reused_by_the_next_run(mvtec, tmp_path, monkeypatch):
    cfg = tiny_config(mvtec, epochs=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache="disk",
                                                            cache_dir=str(tmp_path / "cache")))
    train(cfg, tmp_path / "first", progress=False)
    seen = _count_backbone_images(monkeypatch)
    train(cfg, tmp_path / "second", progress=False)
    assert seen == []
    first, second = read_checkpoint(tmp_path / "first"), read_checkpoint(tmp_path / "second")
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])


# ------------------------------------------------------------------------------ interruption and resume


class Interrupt(KeyboardInterrupt):
    pass


def _interrupt_epoch(monkeypatch, at_epoch):
    """Interrupt a run that starts at epoch 0 when it begins epoch ``at_epoch`` (0-based)."""
    original = training.run_epoch
    started = []

    def run_epoch(*args, **kwargs):
        if len(started) == at_epoch:
            raise Interrupt()
        started.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "run_epoch", run_epoch)


def test_resume_equals_an_uninterrupted_run(mvtec, tmp_path, monkeypatch):
    cfg = tiny_config(mvtec, epochs=3, lr_step=2, lr_gamma=0.5)
    train(cfg, tmp_path / "straight", progress=False)

    with monkeypatch.context() as patch:
        _interrupt_epoch(patch, at_epoch=2)
        with pytest.raises(Interrupt):
            train(cfg, tmp_path / "resumed", progress=False)
    partial = read_checkpoint(tmp_path / "resumed")
    assert partial["epoch"] == 2 and not partial["complete"]
    result = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert len(result.epoch_losses[0]) == 1  # only the third epoch was run

    straight, resumed = read_checkpoint(tmp_path / "straight"), read_checkpoint(tmp_path / "resumed")
    assert straight["model"].keys() == resumed["model"].keys()
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key
    assert straight["epoch_losses"] == resumed["epoch_losses"]
    assert straight["validation"]["scores"] == resumed["validation"]["scores"]
    assert straight["optimizer"]["param_groups"] == resumed["optimizer"]["param_groups"]


def test_resume_refuses_a_different_config(mvtec, tmp_path, monkeypatch):
    cfg = tiny_config(mvtec, epochs=2)
    with monkeypatch.context() as patch:
        _interrupt_epoch(patch, at_epoch=1)
        with pytest.raises(Interrupt):
            train(cfg, tmp_path, progress=False)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_blocks=2))
    with pytest.raises(ValueError, match=r"model\.num_blocks"):
        train(other, tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="split"):
        train(with_split(cfg, val_fraction=0.5), tmp_path, resume=True, progress=False)
    # more epochs than before is allowed
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
    assert train(longer, tmp_path, resume=True, progress=False).epochs == 3
    assert read_checkpoint(tmp_path)["epoch"] == 3


def test_interrupted_checkpoint_write_leaves_no_partial_file(mvtec, tmp_path, monkeypatch):
    cfg = tiny_config(mvtec, epochs=3)
    calls = []
    original_fsync = os.fsync

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the second checkpoint write: after its bytes went to the temp file
            raise Interrupt()
        return original_fsync(fd)

    monkeypatch.setattr(gradad.io_utils.os, "fsync", failing_fsync)
    with pytest.raises(Interrupt):
        train(cfg, tmp_path, progress=False)
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT_NAME]  # no temp file left behind
    assert read_checkpoint(tmp_path)["epoch"] == 1  # the last complete write is intact


def test_read_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        read_checkpoint(tmp_path / "nothing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        read_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a gradad"):
        read_checkpoint(foreign)


# ------------------------------------------------------------------------------ multi-process (DDP)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank, world_size, port, cfg, out_dir):
    os.environ.update({"WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        train(cfg, out_dir, progress=False)
        import torch.distributed as dist

        model_state = read_checkpoint(out_dir)["model"]
        torch.save(model_state, os.path.join(os.path.dirname(out_dir), f"rank{rank}.pt"))
        dist.destroy_process_group()
    finally:
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)


def test_two_process_ddp_equals_one_process_with_the_same_total_batch(mvtec, tmp_path):
    # Without BatchNorm (no fusion blocks) and without jitter, DDP's averaged gradients of two
    # half-batches equal the gradient of the whole batch, and DistributedSampler's shards of a
    # (seed, epoch) permutation make up the single process's batches.
    cfg = tiny_config(mvtec, epochs=2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_blocks=0, jitter_prob=0.0))
    train(cfg, tmp_path / "single", progress=False)
    port = _free_port()
    mp.spawn(_ddp_worker, args=(2, port, cfg, str(tmp_path / "ddp" / "run")), nprocs=2, join=True)
    assert sorted(os.listdir(tmp_path / "ddp" / "run")) == [CHECKPOINT_NAME]
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    single = read_checkpoint(tmp_path / "single")["model"]
    for key in single:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------ Bi-Grid GRAD


def bigrid_config(root, abnormal_epochs=2, normal_epochs=1, **train_values) -> Config:
    cfg = tiny_config(root, **train_values)
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, architecture="bigrid"),
        bigrid=dataclasses.replace(cfg.bigrid, abnormal_epochs=abnormal_epochs, normal_epochs=normal_epochs))


def test_bigrid_trains_the_stages_of_its_schedule(mvtec, tmp_path, monkeypatch):
    from gradad.inference import load_model
    from gradad.models.bigrid import BiGridGRAD

    cfg = bigrid_config(mvtec, abnormal_epochs=2, normal_epochs=1, epochs=7)  # train.epochs is not used
    stages, states = [], []
    original = training.run_epoch

    def run_epoch(objective, *args, **kwargs):
        stages.append(args[6])  # the stage argument
        states.append({k: v.clone() for k, v in objective.model.state_dict().items()})
        return original(objective, *args, **kwargs)

    monkeypatch.setattr(training, "run_epoch", run_epoch)
    result = train(cfg, tmp_path, progress=False)
    assert stages == ["abnormal", "abnormal", "normal"] and result.epochs == 3
    stored = read_checkpoint(tmp_path)
    assert stored["epoch"] == 3 and stored["complete"] and len(stored["epoch_losses"]) == 3
    final = stored["model"]
    # stage 1 leaves the normal grids as initialised, stage 2 the abnormal grids as stage 1 left them
    normal_names = [k for k in final if not k.startswith("abnormal.") and k.endswith("grid")]
    abnormal_names = [k for k in final if k.startswith("abnormal.") and k.endswith("grid")]
    assert normal_names and abnormal_names
    for k in normal_names:
        assert torch.equal(states[0][k], states[2][k]) and not torch.equal(states[2][k], final[k]), k
    for k in abnormal_names:
        assert not torch.equal(states[0][k], states[2][k]) and torch.equal(states[2][k], final[k]), k
    loaded = load_model(tmp_path, device="cpu")
    assert isinstance(loaded.model, BiGridGRAD) and loaded.model.has_abnormal_branch


def test_bigrid_resume_across_the_stages_equals_an_uninterrupted_run(mvtec, tmp_path, monkeypatch):
    cfg = bigrid_config(mvtec, abnormal_epochs=2, normal_epochs=2)
    train(cfg, tmp_path / "straight", progress=False)
    with monkeypatch.context() as patch:
        _interrupt_epoch(patch, at_epoch=3)  # stops inside stage 2
        with pytest.raises(Interrupt):
            train(cfg, tmp_path / "resumed", progress=False)
    assert read_checkpoint(tmp_path / "resumed")["epoch"] == 3
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    straight, resumed = read_checkpoint(tmp_path / "straight"), read_checkpoint(tmp_path / "resumed")
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key
    assert straight["epoch_losses"] == resumed["epoch_losses"]


def test_bigrid_without_abnormal_branch_refuses_abnormal_epochs(mvtec, tmp_path):
    cfg = bigrid_config(mvtec)
    cfg = dataclasses.replace(cfg, bigrid=dataclasses.replace(cfg.bigrid, abnormal_branch=False))
    with pytest.raises(ValueError, match="abnormal_epochs"):
        train(cfg, tmp_path, progress=False)


def test_two_process_ddp_trains_bigrid_in_step(mvtec, tmp_path):
    # FBP draws differ per shard, so DDP is not compared with one process here; the two
    # processes must end with identical weights (gradients synchronised in both stages).
    cfg = bigrid_config(mvtec, abnormal_epochs=1, normal_epochs=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_blocks=0, jitter_prob=0.0))
    port = _free_port()
    mp.spawn(_ddp_worker, args=(2, port, cfg, str(tmp_path / "ddp" / "run")), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    assert any(k.startswith("abnormal.") for k in rank0)
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
