"""The interface every registered MIL model shares (``mmil.models.base``): features, head,
instance scores, the per-bag inputs a model declares, and ``init_kwargs`` that rebuild it."""
from __future__ import annotations

import inspect

import pytest
import torch

from mmil.models import BAG_INPUTS, MILOutput, create_model, list_models, model_inputs
from mmil_toys import TOY

IN_DIM, N_CLASSES = 6, 3
MODELS = [name for name in list_models() if name != TOY]  # the toy may be registered by another test module
SMALL = {
    "transmil": {"embed_dim": 16, "heads": 2, "num_landmarks": 4},
    "mmil": {"embed_dim": 16, "heads": 2, "head_dim": 8, "num_subbags": 3},
}


def build(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {**SMALL.get(name, {"embed_dim": 16}), **extra}
    return create_model(name, in_dim=IN_DIM, n_classes=N_CLASSES, **kwargs).double().eval()


def batch() -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, IN_DIM, generator=g, dtype=torch.float64)
    mask = torch.arange(9).view(1, -1) < torch.tensor([9, 5]).view(-1, 1)
    held = {"coords": torch.rand(2, 9, 2, generator=g) * 100, "groups": torch.randint(0, 3, (2, 9), generator=g), "seed": 4}
    return x, mask, held


@pytest.mark.parametrize("name", MODELS)
def test_forward_is_features_then_head_and_scores_come_alone(name):
    model = build(name)
    x, mask, held = batch()
    inputs = model_inputs(model, **held)
    assert set(inputs) == set(model.inputs) <= set(BAG_INPUTS)
    with torch.no_grad():
        out = model(x, mask, return_scores=True, **inputs)
        h = model.forward_features(x, mask)
        split = model.forward_head(h, mask, return_scores=True, **inputs)
        scores = model.instance_scores(x, mask, **inputs)
    assert isinstance(out, MILOutput) and type(split) is type(out)
    assert h.shape[:2] == x.shape[:2] and bool((h[~mask] == 0).all())
    torch.testing.assert_close(split.logits, out.logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(split.instance_scores, out.instance_scores, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scores, out.instance_scores, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_forward_takes_only_the_inputs_it_declares(name):
    model = build(name)
    x, mask, held = batch()
    accepted = set(inspect.signature(model.forward).parameters) & set(BAG_INPUTS)
    # MMIL's signature is the same for every grouping; it declares what its grouping reads.
    assert set(model.inputs) <= accepted if name == "mmil" else set(model.inputs) == accepted
    for unused in set(BAG_INPUTS) - accepted:
        with pytest.raises(TypeError):
            model(x, mask, **{unused: held[unused]})


def test_mmil_declares_the_input_of_its_grouping():
    expected = {"random": ("seed",), "sequential": ("seed",), "embedding": ("seed",), "coords": ("seed", "coords"), "index": ("seed", "groups")}
    for grouping, inputs in expected.items():
        assert build("mmil", grouping=grouping).inputs == inputs


@pytest.mark.parametrize("name", MODELS)
def test_init_kwargs_rebuild_the_model_through_the_registry(name):
    model = build(name, dropout=0.0)
    kwargs = dict(model.init_kwargs)
    assert (kwargs["in_dim"], kwargs["n_classes"]) == (IN_DIM, N_CLASSES)
    again = create_model(name, **kwargs).double().eval()
    assert again.init_kwargs == kwargs
    again.load_state_dict(model.state_dict(), strict=True)
    x, mask, held = batch()
    inputs = model_inputs(model, **held)
    with torch.no_grad():
        assert torch.equal(again(x, mask, **inputs).logits, model(x, mask, **inputs).logits)


@pytest.mark.parametrize("name", MODELS)
def test_inference_leaves_the_global_rng_alone(name):
    model = build(name)
    x, mask, held = batch()
    state = torch.get_rng_state()
    with torch.no_grad():
        model(x, mask, return_scores=True, **model_inputs(model, **held))
    assert torch.equal(torch.get_rng_state(), state)
