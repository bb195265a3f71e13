"""A new market joins from the global encoder: mapping, zero-shot, PEFT freeze, curves, the
join.json document, saved heads, recommend (known and cold users), adversarial and Reptile."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from storefed.server.rounds import reptile_step
from storefed.shared.checkpoint import load_encoder, save_encoder
from storefed.shared.config import RunConfig
from storefed.shared.data import Catalog, load_market
from storefed.shared.encoder_map import (
    PUSH_DIMS_GRID,
    initial_item_rows,
    load_join_encoder,
    map_encoder,
    remove_push,
    untrained_rows,
)
from storefed.shared.errors import CheckpointError, ConfigError, DataError
from storefed.shared.metrics import ndcg_hr_at_k
from storefed.shared.model import ITEM_EMB_KEY, encoder_state
from storefed.shared.node import MarketNode, initial_encoder, model_config
from storefed.shared.policy import load_policy
from storefed.shared.ranker import (
    RANKER_FILE,
    MarketStats,
    fit_ranker,
    load_ranker,
    save_ranker,
    version_of,
)
from storefed.shared.transfer import (
    TEMPERATURE_GRID,
    JoinOutcome,
    JoinSettings,
    Phase,
    join_market,
    join_model,
    run_curve,
    split_evaluator,
    zero_shot_model,
)
from storefed.shared.transfer_study import (
    Adversary,
    DomainDiscriminator,
    grad_reverse,
    steps_to_target,
)
from storefed.shared.wire import apply_summed_update, sum_updates
from storefed.simulations import join as join_cmd
from storefed.simulations import recommend as rec_cmd
from storefed.simulations.experiments.join_experiment import summarize

CPU = torch.device("cpu")
SOURCES = ("m0", "m1", "m2")
NEW = "m3"


def _cfg() -> RunConfig:
    return RunConfig(dataset="synthetic", markets=",".join(SOURCES), local_epochs=2,
                     embedding_dim=32, batch_size=128, lr=0.01, device="cpu")


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small global encoder federated (FedAvg on the wire format, no Flower) over m0..m2;
    m3 never takes part."""
    torch.set_num_threads(1)
    cfg = _cfg()
    nodes = [MarketNode(cfg, m) for m in SOURCES]
    catalog = nodes[0].catalog
    state = initial_encoder(cfg, catalog)
    for rnd in range(1, 5):
        updates = [n.train_round(state, rnd)[0] for n in nodes]
        state = apply_summed_update(state, sum_updates(updates))
    path = tmp_path_factory.mktemp("fed") / "encoder.pt"
    save_encoder(path, state, model_config(cfg, catalog), catalog.item_ids, catalog.categories,
                 catalog.item_category.tolist(), catalog.fingerprint(), 4,
                 meta={"config": cfg.to_mapping()})
    return path


def _market(name: str = NEW) -> tuple[Catalog, object]:
    return load_market("synthetic", None, name)


def _random_ndcg(candidates: np.ndarray) -> float:
    scores = torch.rand(candidates.shape, generator=torch.Generator().manual_seed(0))
    return float(ndcg_hr_at_k(scores, 10)[0].mean())


# --------------------------------------------------------------------------- mapping
def test_map_encoder_copies_known_rows_and_fills_fresh_ones_with_category_means(encoder_path):
    catalog, _ = _market()
    ck = load_encoder(encoder_path)
    # a catalog with the items reversed plus two items the checkpoint never saw
    ids = tuple(reversed(ck.item_ids)) + ("new-a", "new-b")
    cats = np.concatenate([np.asarray(ck.item_category)[::-1], [0, 1]]).astype(np.int64)
    other = Catalog(item_ids=ids, item_category=cats, categories=tuple(ck.categories))
    state, mcfg, mapping = map_encoder(ck, other)
    w, w_src = state["encoder.item_emb.weight"], ck.state["encoder.item_emb.weight"]
    assert mcfg.n_items == len(ids) and w.shape == (len(ids) + 1, ck.model.dim)
    assert mapping.missing == 2 and not mapping.same_catalog
    known = mapping.known
    j = int(np.flatnonzero(known[:-2])[0])  # a trained row: copied by id
    assert torch.equal(w[j], w_src[ck.model.n_items - 1 - j])
    for row, cat in ((len(ids) - 2, 0), (len(ids) - 1, 1)):
        members = np.flatnonzero(known & (cats == cat))
        assert torch.allclose(w[row], w[torch.from_numpy(members)].mean(0), atol=1e-6)
    assert torch.count_nonzero(w[len(ids)]) == 0  # padding row
    for k, v in ck.state.items():  # everything but the item table is taken over unchanged
        if k != "encoder.item_emb.weight":
            assert torch.equal(state[k], v)


def test_untrained_rows_are_the_items_no_source_market_holds(encoder_path):
    ck = load_encoder(encoder_path)
    untrained = untrained_rows(ck)
    held = np.zeros(ck.model.n_items, dtype=bool)
    for m in SOURCES:
        held[_market(m)[1].train_items] = True  # rowwise FedAvg: rows with train counts
    assert untrained.any()
    assert np.array_equal(untrained, ~held)
    _, _, mapping = map_encoder(ck, _market()[0])
    assert mapping.same_catalog and mapping.missing == 0
    assert mapping.untrained == int(untrained.sum())


def _pushed_checkpoint(encoder_path: Path, tmp_path: Path, with_config: bool = True,
                       ) -> tuple[Path, np.ndarray, torch.Tensor, torch.Tensor]:
    """An encoder whose item rows moved the way secure aggregation with catalog negatives moves
    them: every row along one shared direction (the push, 1-2x a row's norm), and the rows the
    source markets held also by their own update. Returns the path, the held mask, the held
    rows' own updates (n x D, zero elsewhere) and the push direction."""
    ck = load_encoder(encoder_path)
    w0 = initial_item_rows(ck)
    assert w0 is not None
    n, dim = ck.model.n_items, ck.model.dim
    gen = torch.Generator().manual_seed(1)
    held = np.ones(n, dtype=bool)
    held[::5] = False  # every fifth item: no source market sold it
    own = torch.randn(n, dim, generator=gen) * 0.1
    own[torch.from_numpy(~held)] = 0.0
    push = torch.randn(dim, generator=gen)
    push /= push.norm()
    strength = 0.5 + torch.rand(n, 1, generator=gen)
    w = ck.state[ITEM_EMB_KEY].clone()
    w[:n] = w0 + own + strength * push
    path = tmp_path / "pushed.pt"
    save_encoder(path, {**ck.state, ITEM_EMB_KEY: w}, ck.model, ck.item_ids, ck.categories,
                 list(ck.item_category), ck.catalog_fingerprint, ck.round,
                 meta=ck.meta if with_config else {})
    return path, held, own, push


def test_the_push_is_taken_out_of_the_rows_a_joining_market_inherits(encoder_path, tmp_path):
    """As federated, a pushed row carries the push: no row counts as untrained (items no source
    market sold included) and the held rows point along the push, not their own update. With
    the push removed, each held row's update is its own (less its tiny share along the push),
    and exactly the rows that only the push moved count as untrained."""
    path, held, own, push = _pushed_checkpoint(encoder_path, tmp_path)
    ck = load_encoder(path)
    w0 = initial_item_rows(ck)
    assert w0 is not None
    catalog, _ = _market()
    h = torch.from_numpy(held)
    as_federated, _, plain = map_encoder(ck, catalog)
    assert plain.untrained == 0 and plain.push_dims == 0
    cos_before = torch.nn.functional.cosine_similarity(
        as_federated[ITEM_EMB_KEY][:ck.model.n_items][h] - w0[h], own[h], dim=1)
    assert float(cos_before.mean()) < 0.7

    removed = remove_push(ck, 1)
    assert removed is not None
    rows, pushed_only = removed
    assert np.array_equal(pushed_only, ~held)
    cos_after = torch.nn.functional.cosine_similarity(rows[h] - w0[h], own[h], dim=1)
    assert float(cos_after.mean()) > 0.95
    own_off_push = own[h] - (own[h] @ push)[:, None] * push  # what is left to recover
    assert float(torch.nn.functional.cosine_similarity(
        rows[h] - w0[h], own_off_push, dim=1).min()) > 0.99
    state, _, mapping = map_encoder(ck, catalog, push_dims=1)
    assert mapping.push_dims == 1 and mapping.untrained == int((~held).sum())
    assert np.array_equal(mapping.known, held)
    torch.testing.assert_close(state[ITEM_EMB_KEY][:ck.model.n_items][h], rows[h])
    cats = np.asarray(catalog.item_category)
    j = int(np.flatnonzero(~held)[0])  # an item only the push moved: its category's mean
    members = torch.from_numpy(np.flatnonzero(held & (cats == cats[j])))
    torch.testing.assert_close(state[ITEM_EMB_KEY][j], rows[members].mean(0))


def test_without_the_run_config_the_rows_stay_as_federated(encoder_path, tmp_path):
    """The push is measured against the initial rows rebuilt from the checkpoint's run config;
    a checkpoint without one is mapped as federated, and says so."""
    path, _, _, _ = _pushed_checkpoint(encoder_path, tmp_path, with_config=False)
    ck = load_encoder(path)
    assert remove_push(ck, 2) is None
    state, _, mapping = map_encoder(ck, _market()[0], push_dims=2)
    assert mapping.push_dims == 0 and mapping.untrained == 0
    torch.testing.assert_close(state[ITEM_EMB_KEY], ck.state[ITEM_EMB_KEY])


def test_zero_shot_keeps_the_push_directions_best_on_valid(encoder_path, tmp_path):
    """``push_dims`` None tries each of PUSH_DIMS_GRID and keeps the zero-shot model best on the
    valid split (ties: fewer directions); a fixed number is used as given. join_details.json
    records what was tried."""
    path, _, _, _ = _pushed_checkpoint(encoder_path, tmp_path)
    ck = load_encoder(path)
    catalog, split = _market()
    auto = zero_shot_model(ck, catalog, split, JoinSettings(), CPU)
    assert sorted(auto.push_valid) == list(PUSH_DIMS_GRID)
    best = max(auto.push_valid.values())
    assert auto.mapping.push_dims == min(k for k, v in auto.push_valid.items() if v == best)
    assert auto.head_scales is not None and auto.head_scales["valid_ndcg@10"] == best
    fixed = zero_shot_model(ck, catalog, split, JoinSettings(push_dims=2), CPU)
    assert list(fixed.push_valid) == [2] and fixed.mapping.push_dims == 2
    assert fixed.push_valid[2] == pytest.approx(auto.push_valid[2], abs=1e-12)
    out = join_market(path, catalog, split,
                      JoinSettings(encoder_steps=2, scratch_steps=2, eval_every=2,
                                   eval_split="valid", ranker=False), CPU, with_scratch=False)
    assert out.details["mapping"]["push_dims"] == auto.mapping.push_dims
    assert out.details["push_dims_valid_ndcg@10"] == {
        str(k): v for k, v in auto.push_valid.items()}
    assert out.doc["zero_shot"]["ndcg@10"] == pytest.approx(best, abs=1e-9)
    with pytest.raises(ConfigError, match="push-dims"):
        JoinSettings(push_dims=9)
    assert join_cmd.push_dims("auto") is None and join_cmd.push_dims("3") == 3


def test_corrupted_or_mismatched_checkpoint_is_a_checkpoint_error(encoder_path, tmp_path):
    catalog, _ = _market()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(encoder_path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_join_encoder(bad, catalog)
    ck = load_encoder(encoder_path)
    foreign = Catalog(item_ids=tuple(f"x{i}" for i in range(5)),
                      item_category=np.zeros(5, dtype=np.int64), categories=("c0",))
    with pytest.raises(CheckpointError, match="shares no item"):
        load_join_encoder(encoder_path, foreign)
    state = dict(ck.state)
    key = next(k for k in state if k.startswith("encoder.experts"))
    state[key] = torch.zeros(3, 3)
    broken = tmp_path / "shape.pt"
    save_encoder(broken, state, ck.model, ck.item_ids, ck.categories, list(ck.item_category),
                 ck.catalog_fingerprint, ck.round, meta=ck.meta)
    with pytest.raises(CheckpointError, match="shape.pt"):
        load_join_encoder(broken, catalog)


# --------------------------------------------------------------------------- training
def test_heads_only_phase_leaves_the_encoder_untouched(encoder_path):
    catalog, split = _market()
    state, mcfg, _, _ = load_join_encoder(encoder_path, catalog)
    model = join_model(state, mcfg, catalog, split)
    enc0 = encoder_state(model)
    heads0 = {k: v.clone() for k, v in model.heads.state_dict().items()}
    curve = run_curve(model, split, [Phase(5, encoder_trainable=False)], JoinSettings(),
                      CPU, lambda m: 0.0)
    assert [s for s, _ in curve] == [0, 5]
    for k, v in encoder_state(model).items():
        assert torch.equal(v, enc0[k]), k
    moved = [k for k, v in model.heads.state_dict().items() if not torch.equal(v, heads0[k])]
    assert "proj" in moved and "item_bias" in moved
    # the second phase does move the encoder
    run_curve(model, split, [Phase(3, encoder_trainable=True, encoder_lr_scale=0.1)],
              JoinSettings(), CPU, lambda m: 0.0)
    assert not torch.equal(encoder_state(model)["encoder.item_emb.weight"],
                           enc0["encoder.item_emb.weight"])
    assert all(p.requires_grad for p in model.encoder.parameters())  # unfrozen again


def test_valid_selection_keeps_the_best_checkpoint_and_reports_its_value(encoder_path):
    """With a selector, each curve point is the evaluator's value of the checkpoint that the
    selector liked best so far, and the model ends as that checkpoint."""
    catalog, split = _market()
    state, mcfg, _, _ = load_join_encoder(encoder_path, catalog)
    model = join_model(state, mcfg, catalog, split)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    picks = iter([0.5, 0.9, 0.1, 0.2])  # the selector prefers the checkpoint at step 2
    reports = iter([0.30, 0.40, 0.70, 0.60])
    raw: list[list[float]] = []
    settings = JoinSettings(eval_every=2, batch_size=32)
    curve = run_curve(model, split, [Phase(6, encoder_trainable=True)], settings, CPU,
                      lambda m: next(reports), selector=lambda m: next(picks), raw=raw)
    assert curve == [[0, 0.30], [2, 0.40], [4, 0.40], [6, 0.40]]
    assert raw == [[0, 0.30], [2, 0.40], [4, 0.70], [6, 0.60]]
    kept = model.state_dict()
    assert any(not torch.equal(kept[k], start[k]) for k in start)  # trained, not the start
    # ... and it is the step-2 checkpoint: replaying the first two steps gives the same weights
    replay = join_model(state, mcfg, catalog, split)
    run_curve(replay, split, [Phase(2, encoder_trainable=True)], settings, CPU, lambda m: 0.0)
    for k, v in replay.state_dict().items():
        torch.testing.assert_close(v, kept[k], msg=k)


def test_zero_shot_beats_random_and_the_encoder_alone_carries_signal(encoder_path):
    catalog, split = _market()
    state, mcfg, _, _ = load_join_encoder(encoder_path, catalog)
    model = join_model(state, mcfg, catalog, split)
    ev = split_evaluator(split, catalog, "test", CPU)
    rand = _random_ndcg(split.test.candidates)
    zero = float(ev(model)["ndcg@10"])
    assert zero > rand + 0.05
    # and beats the same fresh heads on an untrained encoder (popularity prior only)
    pop_only = join_model(initial_encoder(_cfg(), catalog), mcfg, catalog, split)
    assert zero > float(ev(pop_only)["ndcg@10"]) + 0.03
    with torch.no_grad():  # no popularity prior: the transferred encoder on its own
        model.heads.item_bias.zero_()
    assert float(ev(model)["ndcg@10"]) > rand + 0.03


def test_join_market_document_and_curves(encoder_path):
    catalog, split = _market()
    settings = JoinSettings(head_steps=6, encoder_steps=6, scratch_steps=0, eval_every=4,
                            batch_size=64)
    out = join_market(encoder_path, catalog, split, settings, CPU)
    doc = out.doc
    assert set(doc) == {"zero_shot", "transfer", "scratch", "best", "steps_to_target", "ranked"}
    assert doc["transfer"][0] == [0, doc["zero_shot"]["ndcg@10"]]
    assert [s for s, _ in doc["transfer"]] == [0, 4, 8, 12]
    assert [s for s, _ in doc["scratch"]] == [0, 4, 8, 12]
    best_s = max(v for _, v in doc["scratch"])
    assert doc["best"] == {"transfer": max(v for _, v in doc["transfer"]), "scratch": best_s,
                           "ranked": doc["ranked"]["ndcg@10" if out.ranker is not None
                                                   else "model_ndcg@10"]}
    assert (out.ranker is not None) == doc["ranked"]["kept"] == (
        doc["ranked"]["cv_valid_ndcg@10"] > doc["ranked"]["model_valid_ndcg@10"])
    assert doc["steps_to_target"]["scratch"] == steps_to_target(doc["scratch"], best_s)
    assert doc["steps_to_target"]["transfer"] == steps_to_target(doc["transfer"], best_s)
    json.dumps(doc)


def test_scratch_loss_auto_keeps_the_loss_better_on_valid(encoder_path, monkeypatch):
    """scratch-loss auto trains the scratch model once per candidate loss and reports the one
    whose kept model scores higher on valid, whichever order they are tried in; a fixed
    scratch-loss trains that one only."""
    import storefed.shared.transfer as tr
    catalog, split = _market()
    base = dict(head_steps=0, encoder_steps=2, scratch_steps=6, eval_every=2, batch_size=64)
    picks = []
    for order in (("bce", "full-softmax"), ("full-softmax", "bce")):
        monkeypatch.setattr(tr, "SCRATCH_AUTO_LOSSES", order)
        out = join_market(encoder_path, catalog, split, JoinSettings(**base), CPU)
        tried = out.details["scratch_by_loss"]
        assert list(tried) == list(order)
        valid = {k: v["valid_ndcg@10"] for k, v in tried.items()}
        assert valid["bce"] != valid["full-softmax"]  # else the order decides
        picked = out.details["scratch_loss"]
        assert picked == max(valid, key=valid.__getitem__)
        assert out.doc["scratch"] == tried[picked]["curve"]
        assert out.doc["best"]["scratch"] == tried[picked]["best"]
        picks.append(picked)
    assert picks[0] == picks[1]
    fixed = join_market(encoder_path, catalog, split,
                        JoinSettings(**base, scratch_loss="bpr"), CPU)
    assert list(fixed.details["scratch_by_loss"]) == ["bpr"]
    assert fixed.details["scratch_loss"] == "bpr"


def test_join_settings_reject_unknown_losses():
    from storefed.shared.errors import ConfigError

    with pytest.raises(ConfigError, match="loss"):
        JoinSettings(loss="hinge")
    with pytest.raises(ConfigError, match="scratch-loss"):
        JoinSettings(scratch_loss="softmx")
    with pytest.raises(ConfigError, match="head-temperature"):
        JoinSettings(head_temperature="smallest")
    with pytest.raises(ConfigError, match="kNN grid"):
        JoinSettings(knn_grid=())
    assert JoinSettings().loss == RunConfig().loss  # fine-tune with the federation's loss


def test_fine_tuning_batches_follow_the_federations_history_recipe(encoder_path):
    """run_curve builds batches with train_local's helpers: the default input history is the
    run config's (causal), and it changes what the model is trained on."""
    from storefed.shared.errors import ConfigError

    assert JoinSettings().history == RunConfig().train_history == "causal"
    with pytest.raises(ConfigError, match="history"):
        JoinSettings(history="future")
    catalog, split = _market()
    state, mcfg, _, _ = load_join_encoder(encoder_path, catalog)
    ends = {}
    for mode in ("causal", "bag"):
        model = join_model(state, mcfg, catalog, split)
        st = JoinSettings(head_steps=0, encoder_steps=6, eval_every=6, history=mode)
        run_curve(model, split, [Phase(6, True)], st, CPU, lambda m: 0.0)
        ends[mode] = model.encoder.item_emb.weight.detach().clone()
    assert not torch.equal(ends["causal"], ends["bag"])


def test_steps_to_target():
    curve = [[0, 0.1], [10, 0.3], [20, 0.25], [30, 0.4]]
    assert steps_to_target(curve, 0.3) == 10
    assert steps_to_target(curve, 0.4) == 30
    assert steps_to_target(curve, 0.5) is None


@pytest.mark.parametrize(("reach", "met", "ratio"), [
    ((30, 90), True, 1 / 3), ((40, 90), False, 40 / 90), ((None, 90), False, None),
    ((0, 0), True, None),  # scratch's best is its untrained step 0: transfer at 0 meets it
    ((10, 0), False, None)])
def test_experiment_summary_judges_the_steps_target_as_stated(reach, met, ratio):
    doc = {"zero_shot": {"ndcg@10": 0.4, "hr@10": 0.5}, "best": {"transfer": 0.5, "scratch": 0.45},
           "steps_to_target": {"transfer": reach[0], "scratch": reach[1]}}
    details = {k: None for k in ("transfer_minus_scratch_ndcg@10", "head_scales", "mapping",
                                 "seconds")}
    s = summarize(JoinOutcome(doc=doc, details=details, model=None, mapping=None))
    assert s["targets"]["steps_ratio<=1/3"] is met
    assert s["steps_ratio"] == (pytest.approx(ratio) if ratio is not None else None)
    assert s["zero_shot_over_scratch_best"] == pytest.approx(0.4 / 0.45)


def test_gradient_reversal_and_adversarial_variant(encoder_path):
    x = torch.ones(3, requires_grad=True)
    (grad_reverse(x, 0.5) * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), -1.0))
    catalog, split = _market()
    state, mcfg, mapping, _ = load_join_encoder(encoder_path, catalog)
    model = join_model(state, mcfg, catalog, split)
    disc = DomainDiscriminator(mcfg.dim)
    d0 = [p.clone() for p in disc.parameters()]
    adv = Adversary(disc, torch.from_numpy(np.flatnonzero(mapping.known)), 1.0)
    run_curve(model, split, [Phase(3, True)], JoinSettings(variant="adversarial"), CPU,
              lambda m: 0.0, adv)
    assert any(not torch.equal(a, b) for a, b in zip(d0, disc.parameters(), strict=True))


def test_reptile_step():
    before = {"encoder.w": torch.zeros(2)}
    after = {"encoder.w": torch.tensor([1.0, -2.0])}
    assert torch.equal(reptile_step(before, after, 1.0)["encoder.w"], after["encoder.w"])
    assert torch.equal(reptile_step(before, after, 0.5)["encoder.w"], torch.tensor([0.5, -1.0]))


# --------------------------------------------------------------------------- CLI: join, recommend
def _run(module: object, argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    _, run = module.register(sub)  # type: ignore[attr-defined]
    return int(run(p.parse_args(argv)))


@pytest.fixture(scope="module")
def joined(encoder_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("join")
    policy = out / "policy-in.toml"
    policy.write_text("min-markets = 4\n")
    rc = _run(join_cmd, ["join", "--encoder", str(encoder_path), "--dataset", "synthetic",
                         "--market", NEW, "--out", str(out), "--head-steps", "8",
                         "--encoder-steps", "8", "--scratch-steps", "16", "--eval-every", "4",
                         "--device", "cpu", "--policy", str(policy)])
    assert rc == 0
    return out


def test_join_cli_writes_the_issue_shape_and_federation_ready_heads(joined):
    doc = json.loads((joined / "join.json").read_text())
    assert set(doc) == {"zero_shot", "transfer", "scratch", "best", "steps_to_target", "ranked"}
    assert set(doc["zero_shot"]) == {"ndcg@10", "hr@10"}
    assert set(doc["steps_to_target"]) == {"transfer", "scratch"}
    assert set(doc["best"]) == {"transfer", "scratch", "ranked"}
    # the market keeps its private ranker only where it beats its model on valid (on this small
    # market it may not), and then it lives with its heads, fitted to the saved model
    ranked, path = doc["ranked"], joined / "state" / NEW / RANKER_FILE
    assert ranked["kept"] == (ranked["cv_valid_ndcg@10"] > ranked["model_valid_ndcg@10"])
    assert path.is_file() == ranked["kept"]
    assert doc["best"]["ranked"] == ranked["ndcg@10" if ranked["kept"] else "model_ndcg@10"]
    assert len(ranked["fold_rounds"]) == 5 and min(ranked["fold_rounds"]) >= 1
    if ranked["kept"]:
        assert load_ranker(path, NEW).model_version == version_of(
            rec_cmd.load_state(joined, NEW).model)
    for curve in (doc["transfer"], doc["scratch"]):
        assert all(len(p) == 2 and isinstance(p[0], int) and 0 <= p[1] <= 1 for p in curve)
        assert [p[0] for p in curve] == sorted(p[0] for p in curve)
    for v in doc["steps_to_target"].values():
        assert v is None or isinstance(v, int)
    # unset fine-tuning knobs follow the federation's run config, read from the checkpoint
    settings = json.loads((joined / "join_details.json").read_text())["settings"]
    assert settings["batch_size"] == _cfg().batch_size == 128 != JoinSettings.batch_size
    # the node of this market, started with state-dir=OUT/state, restores the saved heads
    node = MarketNode(RunConfig(dataset="synthetic", markets=NEW, embedding_dim=32,
                                device="cpu"), NEW, joined / "state")
    assert node.restore(None) == "disk"
    # the market's policy and its identity key live with its heads (enrollment at join)
    assert load_policy({}, joined / "state" / NEW).min_markets == 4
    assert (joined / "state" / NEW / "identity.key").stat().st_mode & 0o077 == 0
    ck = load_encoder(joined / "encoder.pt")
    assert ck.catalog_fingerprint == node.catalog.fingerprint()


def test_join_cli_fine_tunes_with_the_loss_and_temperature_asked(encoder_path, tmp_path):
    ck = load_encoder(encoder_path)
    cfg = {**ck.meta["config"], "loss": "bpr"}  # a federation that trained with BPR
    path = tmp_path / "encoder.pt"
    save_encoder(path, ck.state, ck.model, ck.item_ids, ck.categories,
                 list(ck.item_category), ck.catalog_fingerprint, ck.round, meta={"config": cfg})
    argv = ["join", "--encoder", str(path), "--dataset", "synthetic", "--market", NEW,
            "--encoder-steps", "2", "--eval-every", "2", "--no-scratch", "--device", "cpu"]
    assert _run(join_cmd, [*argv, "--out", str(tmp_path / "a")]) == 0
    assert _run(join_cmd, [*argv, "--out", str(tmp_path / "b"), "--loss", "bce",
                           "--head-temperature", "valid-loss"]) == 0
    details = {d: json.loads((tmp_path / d / "join_details.json").read_text())
               for d in ("a", "b")}
    settings = {d: v["settings"] for d, v in details.items()}
    assert settings["a"]["loss"] == "bpr" and settings["b"]["loss"] == "bce"
    # the calibrated heads' temperature: as the grid picked it unless asked
    assert settings["a"]["head_temperature"] == "grid"
    assert "temperature" not in details["a"]["head_scales"]
    assert settings["b"]["head_temperature"] == "valid-loss"
    assert details["b"]["head_scales"]["temperature"] in TEMPERATURE_GRID


def test_join_cli_rejects_a_corrupted_encoder(tmp_path):
    bad = tmp_path / "encoder.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="encoder.pt"):
        _run(join_cmd, ["join", "--encoder", str(bad), "--dataset", "synthetic", "--market",
                        NEW, "--out", str(tmp_path / "o")])
    with pytest.raises(DataError, match="unknown market"):
        _run(join_cmd, ["join", "--encoder", str(bad), "--dataset", "synthetic", "--market",
                        "zz", "--out", str(tmp_path / "o")])


def test_recommend_excludes_the_users_items(joined, capsys):
    _, split = _market()
    user = split.user_ids[int(split.test.users[0])]
    state = rec_cmd.load_state(joined, NEW)
    assert rec_cmd.use_knn(state, split)  # the join calibrated a nonzero item-kNN weight
    # the market's ranker, fitted to this model and kept with its heads, ranks for it
    path = joined / "state" / NEW / RANKER_FILE
    if not path.is_file():  # the join did not keep one on this small market: fit one
        stats = MarketStats.from_split(split, state.catalog.n_items)
        save_ranker(path, fit_ranker(state.model, split, stats, torch.device("cpu"), seed=0,
                                     max_rounds=40), NEW)
    assert rec_cmd.use_ranker(state, joined, NEW, split)
    have = rec_cmd.user_items(split, user)
    assert len(have) >= 3
    top = rec_cmd.recommend(state, have, split.items, 10)
    ids = [i for i, _ in top]
    assert len(ids) == 10 and len(set(ids)) == 10
    assert not set(ids) & {state.catalog.item_ids[i] for i in have}
    assert set(ids) <= {state.catalog.item_ids[i] for i in split.items}
    scores = [s for _, s in top]
    assert scores == sorted(scores, reverse=True)
    assert _run(rec_cmd, ["recommend", "--state", str(joined), "--market", NEW, "--user", user,
                          "-k", "5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [x["item"] for x in printed["items"]] == ids[:5]


def test_recommend_cold_user_from_history(joined, capsys):
    catalog, split = _market()
    history = [catalog.item_ids[i] for i in split.items[:3]]
    assert _run(rec_cmd, ["recommend", "--state", str(joined), "--market", NEW, "--history",
                          ",".join(history), "-k", "7", "--json"]) == 0
    items = [x["item"] for x in json.loads(capsys.readouterr().out)["items"]]
    assert len(items) == 7 and not set(items) & set(history)
    # the history changes the ranking (no per-user parameters: history is all there is)
    other = [catalog.item_ids[i] for i in split.items[-3:]]
    _run(rec_cmd, ["recommend", "--state", str(joined), "--market", NEW, "--history",
                   ",".join(other), "-k", "7", "--json"])
    assert [x["item"] for x in json.loads(capsys.readouterr().out)["items"]] != items
    with pytest.raises(DataError, match="nope"):
        _run(rec_cmd, ["recommend", "--state", str(joined), "--market", NEW, "--history",
                       "nope", "-k", "3"])
    with pytest.raises(CheckpointError):
        _run(rec_cmd, ["recommend", "--state", str(joined), "--market", "m0", "--history",
                       history[0]])



# --------------------------------------------------------------------------- private item-kNN
def test_join_adds_the_markets_item_knn_picked_on_valid(encoder_path):
    """With item-knn on (the federation's default) both curves' models carry the market's
    private item-kNN, its weight re-picked on valid at each evaluation: on the valid split the
    zero-shot score can then only match or beat the neural score alone (weight 0 is in the grid)."""
    catalog, split = _market()
    base = dict(head_steps=0, encoder_steps=4, scratch_steps=4, eval_every=4, batch_size=64,
                eval_split="valid")
    on = join_market(encoder_path, catalog, split, JoinSettings(**base, item_knn=True), CPU)
    off = join_market(encoder_path, catalog, split, JoinSettings(**base, item_knn=False), CPU)
    assert on.model.item_sim is not None and off.model.item_sim is None
    assert float(off.model.heads.knn_weight.abs().max()) == 0.0
    w = float(on.model.heads.knn_weight[0])
    assert w > 0  # the synthetic market's co-occurrence carries signal
    assert on.doc["zero_shot"]["ndcg@10"] > off.doc["zero_shot"]["ndcg@10"]


def test_recommend_scores_with_the_saved_knn_weight(joined):
    """recommend rebuilds the market's item-kNN from its own data and mixes it in with the
    weight saved in the heads, exactly like the node's evaluation; weight 0 leaves it off."""
    from storefed.shared.data import pad_histories
    from storefed.shared.itemsim import ItemSimilarity

    catalog, split = _market()
    user = split.user_ids[int(split.test.users[0])]
    have = rec_cmd.user_items(split, user)
    state = rec_cmd.load_state(joined, NEW)
    with torch.no_grad():
        state.model.heads.knn_weight.fill_(3.0)
    assert rec_cmd.use_knn(state, split)
    top = rec_cmd.recommend(state, have, split.items, 10)
    pool = np.setdiff1d(split.items, have)
    hist = torch.as_tensor(pad_histories([have], 50, catalog.pad_index))
    cand = torch.as_tensor(pool).unsqueeze(0)
    neural = rec_cmd.load_state(joined, NEW)  # fresh copy: no kNN attached
    with torch.no_grad():
        neural.model.heads.knn_weight.zero_()
    expect = neural.model(hist, cand)[0] + 3.0 * ItemSimilarity.from_split(
        split, catalog.n_items).scores(hist, cand)[0]
    want = [catalog.item_ids[int(pool[i])] for i in torch.topk(expect, 10).indices]
    assert [i for i, _ in top] == want
    assert not rec_cmd.use_knn(neural, split)
    assert neural.model.item_sim is None


def test_calibrated_heads_score_as_picked_and_never_below_the_unscaled_heads(encoder_path):
    """``calibrate_heads`` folds the picked dot-product and popularity scales (and kNN weight)
    into the heads: the model then scores valid exactly at the value it reports, which is at
    least the unscaled heads' value (scale 1, 1 is in the grid), and a scale that was picked
    is what the heads now hold."""
    from storefed.shared.node import KnnScores, attach_knn, calibrate_knn, evaluate_split
    from storefed.shared.transfer import DOT_SCALE_GRID, POP_SCALE_GRID, calibrate_heads

    catalog, split = _market()
    state, mcfg, _, _ = load_join_encoder(encoder_path, catalog)
    model = join_model(state, mcfg, catalog, split)
    attach_knn(model, split, catalog.n_items)
    assert model.item_sim is not None
    knn = KnnScores(model.item_sim, split, CPU)
    calibrate_knn(model, split, CPU, knn)
    before = float(evaluate_split(model, split, catalog, "valid", CPU, knn=knn)["ndcg@10"])
    proj, bias = model.heads.proj.detach().clone(), model.heads.item_bias.detach().clone()
    picked = calibrate_heads(model, split, CPU, knn)
    after = float(evaluate_split(model, split, catalog, "valid", CPU, knn=knn)["ndcg@10"])
    assert after == pytest.approx(picked["valid_ndcg@10"], abs=1e-9)
    assert after >= before - 1e-12
    assert picked["dot_scale"] in DOT_SCALE_GRID and picked["pop_scale"] in POP_SCALE_GRID
    torch.testing.assert_close(model.heads.proj, proj * picked["dot_scale"])
    torch.testing.assert_close(model.heads.item_bias, bias * picked["pop_scale"])
    assert float(model.heads.knn_weight[0]) == picked["knn_weight"]


def _valid_softmax_loss(model, split) -> float:
    """The full-softmax loss of the valid positives over the market's items, computed user by
    user from ``score_items`` (each user's own positive is among the items once)."""
    import torch.nn.functional as F

    pool = torch.as_tensor(split.items)
    total = 0.0
    with torch.no_grad():
        for hist, cand in zip(split.valid.histories, split.valid.candidates, strict=True):
            logits = model.score_items(torch.as_tensor(hist).unsqueeze(0), pool)[0]
            target = torch.tensor([int((pool == int(cand[0])).nonzero()[0, 0])])
            total += float(F.cross_entropy(logits.unsqueeze(0).double(), target))
    return total


def test_temperature_scaling_fits_the_softmax_and_keeps_the_ranking(encoder_path):
    """``head_temperature = "valid-loss"``: heads made ten times too flat get the grid's
    scale whose full softmax fits the valid positives best (checked against each scale,
    loss computed independently), and the ranking (valid nDCG@10) is the grid's pick's."""
    from storefed.shared.node import evaluate_split
    from storefed.shared.transfer import (
        JOIN_KNN_GRID,
        TEMPERATURE_GRID,
        calibrate_heads,
        valid_temperature,
    )

    catalog, split = _market()
    state, mcfg, _, _ = load_join_encoder(encoder_path, catalog)
    models = []
    for temperature in (False, True):
        model = join_model(state, mcfg, catalog, split).eval()
        with torch.no_grad():
            for p in (model.heads.proj, model.heads.item_bias, model.heads.cat_bias):
                p.mul_(0.1)
        models.append((model, calibrate_heads(model, split, CPU, None, temperature)))
    (plain, p0), (tempered, p1) = models
    assert "temperature" not in p0 and p1["temperature"] > 1.0
    assert evaluate_split(tempered, split, catalog, "valid", CPU)["ndcg@10"] == pytest.approx(
        evaluate_split(plain, split, catalog, "valid", CPU)["ndcg@10"], abs=1e-9)
    c = p1["temperature"]
    torch.testing.assert_close(tempered.heads.proj, plain.heads.proj * c)
    losses = {}
    for t in TEMPERATURE_GRID:
        with torch.no_grad():
            for p in (plain.heads.proj, plain.heads.item_bias, plain.heads.cat_bias):
                p.mul_(t)
        losses[t] = _valid_softmax_loss(plain, split)
        with torch.no_grad():
            for p in (plain.heads.proj, plain.heads.item_bias, plain.heads.cat_bias):
                p.div_(t)
    assert min(losses, key=losses.__getitem__) == c
    assert losses[c] < losses[1.0]
    # with a kNN weight of 96 only 0.5 and 1 keep c x 96 on the join's kNN grid
    restricted = valid_temperature(plain, split, CPU, 96.0)
    assert restricted in (0.5, 1.0) and 96.0 * restricted in JOIN_KNN_GRID


def test_temperature_scales_the_knn_weight_with_the_heads(encoder_path):
    """With the market's item-kNN, the temperature scales its weight alike and stays where the
    join's kNN grid holds ``c x w``, so the calibrated ranking (valid nDCG@10, kNN re-picked as
    every join evaluation re-picks it) is the one without the temperature."""
    from storefed.shared.node import KnnScores, attach_knn, calibrate_knn, evaluate_split
    from storefed.shared.transfer import JOIN_KNN_GRID, calibrate_heads

    catalog, split = _market()
    state, mcfg, _, _ = load_join_encoder(encoder_path, catalog)
    scores = []
    for temperature in (False, True):
        model = join_model(state, mcfg, catalog, split)
        with torch.no_grad():
            for p in (model.heads.proj, model.heads.item_bias, model.heads.cat_bias):
                p.mul_(0.1)
        attach_knn(model, split, catalog.n_items)
        assert model.item_sim is not None
        knn = KnnScores(model.item_sim, split, CPU)
        picked = calibrate_heads(model, split, CPU, knn, temperature)
        assert float(model.heads.knn_weight[0]) == picked["knn_weight"]
        assert picked["knn_weight"] in JOIN_KNN_GRID
        calibrate_knn(model, split, CPU, knn, JOIN_KNN_GRID)
        scores.append(float(evaluate_split(model, split, catalog, "valid", CPU,
                                           knn=knn)["ndcg@10"]))
    assert picked["knn_weight"] > 0 and picked["temperature"] > 1.0
    assert scores[1] == pytest.approx(scores[0], abs=1e-9)


def test_join_calibrates_the_transfer_heads_and_reports_the_scales(encoder_path):
    """head-init calibrated (the default) starts the transfer curve from calibrated heads and
    records the scales; its zero-shot on valid is at least the popularity-initialised heads'.
    The scratch curve is the same either way (its heads stay popularity-initialised)."""
    catalog, split = _market()
    base = dict(head_steps=0, encoder_steps=2, scratch_steps=2, eval_every=2, batch_size=64,
                eval_split="valid")
    cal = join_market(encoder_path, catalog, split, JoinSettings(**base), CPU)
    pop = join_market(encoder_path, catalog, split,
                      JoinSettings(**base, head_init="popularity"), CPU)
    assert pop.details["head_scales"] is None
    assert cal.doc["zero_shot"]["ndcg@10"] >= pop.doc["zero_shot"]["ndcg@10"] - 1e-12
    assert cal.doc["zero_shot"]["ndcg@10"] == pytest.approx(
        cal.details["head_scales"]["valid_ndcg@10"], abs=1e-9)
    assert cal.doc["scratch"] == pop.doc["scratch"]


def test_paired_difference_of_the_kept_models_matches_the_curves(encoder_path):
    """details["transfer_minus_scratch_ndcg@10"] compares the two kept models user by user:
    its mean is the difference of the curves' last points (each curve ends on its kept model),
    and its interval contains the mean."""
    catalog, split = _market()
    for select in ("valid", "none"):
        out = join_market(encoder_path, catalog, split,
                          JoinSettings(head_steps=0, encoder_steps=4, scratch_steps=4,
                                       eval_every=2, batch_size=64, select=select), CPU)
        diff = out.details["transfer_minus_scratch_ndcg@10"]
        expect = out.doc["transfer"][-1][1] - out.doc["scratch"][-1][1]
        assert diff["mean"] == pytest.approx(expect, abs=1e-9)
        assert diff["ci95_low"] <= diff["mean"] <= diff["ci95_high"]
        assert diff["users"] == len(split.test.users)
        per_user = out.details["per_user_ndcg@10"]  # what join_seeds pools over seeds
        assert per_user["users"] == [split.user_ids[u] for u in split.test.users]
        assert np.mean(np.subtract(per_user["transfer"], per_user["scratch"])) == \
            pytest.approx(diff["mean"], abs=1e-12)
        # the ranker's own per-user figures (kept or not), for the comparison with references
        assert np.mean(per_user["ranked"]) == pytest.approx(out.doc["ranked"]["ndcg@10"],
                                                            abs=1e-9)


def test_pooled_references_score_the_joined_markets_users():
    """join_seeds --references-data-dir: the pooled references score the same users as a join
    of that market with that seed, one figure per user; the references carry signal."""
    from storefed.simulations.experiments.join_seeds import REFERENCES, reference_per_user

    _, split = _market()
    refs = reference_per_user("synthetic", "", 0, [NEW])[NEW]
    assert refs["users"] == [split.user_ids[u] for u in split.test.users]
    for name in REFERENCES:
        assert len(refs[name]) == len(refs["users"])
        assert refs[name].mean() > _random_ndcg(split.test.candidates) + 0.05


def test_join_seeds_compares_what_the_market_serves_with_the_references():
    """The joined side is the ranker's per-user figures where it was kept, else the model's;
    runs that score other users, or a kept ranker without its figures, are refused."""
    from storefed.simulations.experiments.join_seeds import REFERENCES, against_references

    users = ["u1", "u2"]
    kept = {"run": "a", "seed": 0, "ranked_kept": True,
            "per_user": {"users": users, "transfer": [0.0, 0.0], "ranked": [1.0, 0.5]}}
    dropped = {"run": "b", "seed": 1, "ranked_kept": False,
               "per_user": {"users": users, "transfer": [0.5, 0.5], "ranked": [1.0, 1.0]}}
    ref = {"users": users, "ease_lambda": 500.0,
           **{n: np.asarray([0.5, 0.0]) for n in REFERENCES}}
    cmp = against_references([kept, dropped], [ref, ref], "m")
    assert [e["joined"] for e in cmp["per_run"]] == pytest.approx([0.75, 0.5])
    assert cmp["per_run"][0]["joined_minus_ease-pooled"]["mean"] == pytest.approx(0.5)
    assert cmp["per_run"][1]["joined_minus_ease-pooled"]["mean"] == pytest.approx(0.25)
    # pooled: per user the mean over runs, u1 (1 + 0.5) / 2 - 0.5, u2 (0.5 + 0.5) / 2 - 0
    assert cmp["pooled"]["joined_minus_itemknn-pooled"]["mean"] == pytest.approx(0.375)
    with pytest.raises(DataError, match="other users"):
        against_references([kept], [{**ref, "users": ["u1", "x"]}], "m")
    no_figures = {**kept, "per_user": {"users": users, "transfer": [0.0, 0.0]}}
    with pytest.raises(DataError, match="rerun the join"):
        against_references([no_figures], [ref], "m")


def test_paired_bootstrap():
    from storefed.shared.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    b = rng.random(500)
    shifted = paired_bootstrap(b + 0.1, b)
    assert shifted["mean"] == pytest.approx(0.1)
    assert shifted["ci95_high"] - shifted["ci95_low"] < 1e-9
    noise = paired_bootstrap(b, rng.permutation(b))
    assert noise["ci95_low"] < 0 < noise["ci95_high"]
    # cross-check the interval against scipy's percentile bootstrap of the mean difference
    stats = pytest.importorskip("scipy.stats")
    a = b + rng.normal(0.02, 0.2, size=b.size)
    ours = paired_bootstrap(a, b, n_boot=20000)
    ref = stats.bootstrap((a - b,), np.mean, n_resamples=20000, method="percentile",
                          random_state=1).confidence_interval
    assert ours["ci95_low"] == pytest.approx(ref.low, abs=2e-3)
    assert ours["ci95_high"] == pytest.approx(ref.high, abs=2e-3)
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap(np.zeros(3), np.zeros(4))


def _fake_run(root: Path, seed: int, transfer: list[float], scratch: list[float],
              per_user: dict[str, list], other_scratch: list[float] | None = None) -> Path:
    """A join_experiment --out with one market, "m", written as the experiment writes it."""
    run = root / f"seed{seed}"
    curves = {k: [[10 * i, v] for i, v in enumerate(c)]
              for k, c in (("transfer", transfer), ("scratch", scratch))}
    best = {k: max(v for _, v in c) for k, c in curves.items()}
    doc = {"zero_shot": {"ndcg@10": transfer[0], "hr@10": 0.5}, **curves, "best": best,
           "steps_to_target": {k: steps_to_target(c, best["scratch"]) for k, c in curves.items()}}
    diff = {"mean": float(np.mean(np.subtract(per_user["transfer"], per_user["scratch"]))),
            "ci95_low": -1.0, "ci95_high": 1.0, "users": len(per_user["users"])}
    details = {"settings": {"seed": seed}, "per_user_ndcg@10": per_user,
               "transfer_minus_scratch_ndcg@10": diff, "head_scales": None, "mapping": None,
               "seconds": None}
    if other_scratch is not None:  # scratch-loss auto: "bce" kept, "full-softmax" also tried
        other = [[10 * i, v] for i, v in enumerate(other_scratch)]
        details["scratch_loss"] = "bce"
        details["scratch_by_loss"] = {
            "bce": {"curve": curves["scratch"], "best": best["scratch"],
                    "steps_to_best": steps_to_target(curves["scratch"], best["scratch"])},
            "full-softmax": {"curve": other, "best": max(other_scratch),
                             "steps_to_best": steps_to_target(other, max(other_scratch))}}
    (run / "m").mkdir(parents=True)
    (run / "m" / "join.json").write_text(json.dumps(doc))
    (run / "m" / "join_details.json").write_text(json.dumps(details))
    summary = summarize(JoinOutcome(doc=doc, details=details, model=None, mapping=None))
    (run / "summary.json").write_text(json.dumps({"markets": {"m": {"plain": summary}}}))
    return run


def test_join_seeds_pools_runs_into_counts_mean_curves_and_a_per_user_interval(tmp_path):
    from storefed.simulations.experiments import join_seeds

    users = ["u1", "u2", "u3", "u4"]
    a = _fake_run(tmp_path, 0, [0.50, 0.50, 0.51, 0.51], [0.40, 0.45, 0.49, 0.52],
                  {"users": users, "transfer": [1.0, 0.5, 0.0, 0.2],
                   "scratch": [0.5, 0.5, 0.0, 0.2]})
    b = _fake_run(tmp_path, 1, [0.46, 0.48, 0.50, 0.50], [0.40, 0.47, 0.47, 0.47],
                  {"users": users, "transfer": [0.0, 0.5, 1.0, 0.2],
                   "scratch": [0.5, 0.5, 0.0, 0.2]})
    out = tmp_path / "pooled.json"
    assert join_seeds.main([str(a), str(b), "--out", str(out)]) == 0
    pooled = json.loads(out.read_text())["markets"]["m"]
    # run a: transfer never reaches 0.52 (miss); run b: 0.47 reached at step 20 vs 10 (miss)
    assert pooled["targets_met"] == {"steps_ratio<=1/3": 0, "zero_shot>=0.8x": 2}
    assert [v for _, v in pooled["mean_curves"]["transfer"]] == pytest.approx(
        [0.48, 0.49, 0.505, 0.505])
    assert pooled["mean_curves_best"]["scratch"] == pytest.approx(0.495)  # (0.52 + 0.47) / 2
    # mean transfer reaches 0.495 at step 20, mean scratch only at its best (step 30)
    assert pooled["mean_curves_steps_to_target"] == {"transfer": 20, "scratch": 30}
    assert pooled["mean_curves_steps_target_met"] is False
    p = pooled["pooled_transfer_minus_scratch_ndcg@10"]
    # per user, mean over runs: u1 (0.5 + -0.5)/2 = 0, u2 0, u3 (0 + 1)/2 = 0.5, u4 0
    assert p["mean"] == pytest.approx(0.125)
    assert p["users"] == 4
    assert pooled["steps_target_met_vs_every_scratch_loss"] is None  # runs tried one loss


def test_join_seeds_counts_the_steps_target_against_every_scratch_loss_tried(tmp_path):
    from storefed.simulations.experiments import join_seeds

    pu = {"users": ["u1"], "transfer": [0.5], "scratch": [0.4]}
    # both runs meet the target against the kept scratch (0.45, reached at step 0 vs 30); run b
    # also tried a scratch loss that peaked higher (0.52 at step 30), which its transfer misses
    a = _fake_run(tmp_path, 0, [0.50, 0.50, 0.50, 0.50], [0.40, 0.42, 0.44, 0.45], pu,
                  other_scratch=[0.40, 0.41, 0.42, 0.43])
    b = _fake_run(tmp_path, 1, [0.50, 0.50, 0.50, 0.50], [0.40, 0.42, 0.44, 0.45], pu,
                  other_scratch=[0.40, 0.45, 0.50, 0.52])
    out = tmp_path / "pooled.json"
    assert join_seeds.main([str(a), str(b), "--out", str(out)]) == 0
    pooled = json.loads(out.read_text())["markets"]["m"]
    assert pooled["targets_met"]["steps_ratio<=1/3"] == 2
    assert pooled["steps_target_met_vs_every_scratch_loss"] == 1
    assert [r["steps_target_by_scratch_loss"] for r in pooled["rows"]] == [
        {"bce": True, "full-softmax": True}, {"bce": True, "full-softmax": False}]


def test_join_seeds_refuses_runs_it_cannot_pool(tmp_path, capsys):
    from storefed.simulations.experiments import join_seeds

    good = {"users": ["u1", "u2"], "transfer": [1.0, 0.0], "scratch": [0.0, 0.0]}
    a = _fake_run(tmp_path, 0, [0.5, 0.5], [0.4, 0.5], good)
    other_users = _fake_run(tmp_path, 1, [0.5, 0.5], [0.4, 0.5], {**good, "users": ["u1", "x"]})
    assert join_seeds.main([str(a), str(other_users)]) == 2
    assert "other users" in capsys.readouterr().err
    other_steps = _fake_run(tmp_path, 2, [0.5, 0.5, 0.5], [0.4, 0.5, 0.5], good)
    assert join_seeds.main([str(a), str(other_steps)]) == 2
    assert "different steps" in capsys.readouterr().err
    details = other_steps / "m" / "join_details.json"
    details.write_text(json.dumps({"settings": {"seed": 2}}))
    assert join_seeds.main([str(a), str(other_steps)]) == 2
    assert f"{details}: no per_user_ndcg@10" in capsys.readouterr().err
    assert join_seeds.main([str(a), str(tmp_path / "nowhere")]) == 2
    assert "summary.json: missing" in capsys.readouterr().err


def test_steps_noise_resamples_users_and_recounts_the_target():
    """``join_steps_noise.steps_resampled``: the steps as measured from the kept per-user
    figures, and the share of user resamples meeting the target. Every user ahead at step 10:
    met on every resample; one user carrying the whole edge: met only on resamples holding it."""
    from storefed.simulations.experiments.join_steps_noise import N_BOOT, steps_resampled

    steps_t, steps_s = [0, 10, 20], [0, 10, 20, 30, 40]
    scratch = np.array([[0.1] * 4, [0.2] * 4, [0.3] * 4, [0.4] * 4, [0.5] * 4])
    ahead = np.array([[0.4] * 4, [0.6] * 4, [0.6] * 4])
    doc = steps_resampled({"transfer": (steps_t, ahead), "scratch": (steps_s, scratch)},
                          np.random.default_rng(0))
    assert (doc["transfer"], doc["scratch"], doc["met"]) == (10, 40, True)
    assert doc["met_share"] == 1.0 and doc["best"]["scratch"] == pytest.approx(0.5)
    # one user of four carries the edge: 10 vs 40 as measured, missed without that user
    one = np.array([[0.4] * 4, [2.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    doc = steps_resampled({"transfer": (steps_t, one), "scratch": (steps_s, scratch)},
                          np.random.default_rng(0))
    assert doc["met"] and doc["transfer"] == 10
    # met exactly when user 0 is drawn at least once: 1 - (3/4)^4 of the resamples
    assert doc["met_share"] == pytest.approx(1 - 0.75 ** 4, abs=0.04) and N_BOOT >= 1000


def test_steps_noise_runs_the_join_as_join_market_does(encoder_path):
    """``join_steps_noise.one_seed`` rebuilds ``join_market``'s two curves to keep per-user
    figures: its measured steps, bests and zero-shot are join_market's (guards the copy)."""
    from storefed.simulations.experiments.join_steps_noise import one_seed

    catalog, split = _market()
    settings = JoinSettings(encoder_steps=6, scratch_steps=6, eval_every=2, batch_size=64,
                            ranker=False)
    doc = join_market(encoder_path, catalog, split, settings, CPU).doc
    row = one_seed(encoder_path, split, catalog, settings, CPU)
    assert (row["transfer"], row["scratch"]) == (doc["steps_to_target"]["transfer"],
                                                 doc["steps_to_target"]["scratch"])
    assert row["best"]["transfer"] == pytest.approx(doc["best"]["transfer"], abs=1e-9)
    assert row["best"]["scratch"] == pytest.approx(doc["best"]["scratch"], abs=1e-9)
    assert row["zero_shot"] == pytest.approx(doc["zero_shot"]["ndcg@10"], abs=1e-9)
