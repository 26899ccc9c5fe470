"""Hook capture of FFN inputs equals what output_hidden_states implies, in Llama and GPT-2."""

import pytest
import torch

from mlpmemory.capture import capture_inputs, resolve_site, run_captured
from mlpmemory.errors import MLPMemError

FFN_NORM = {"llama": "post_attention_layernorm", "gpt2": "ln_2"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_capture_matches_output_hidden_states(family, tiny_llama, tiny_gpt2):
    lm = tiny_llama if family == "llama" else tiny_gpt2
    model = lm.model
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    n_layers = resolve_site(model, "last").n_layers
    sites = [resolve_site(model, i) for i in range(n_layers)]
    with torch.no_grad(), capture_inputs(model, sites) as cap:
        hs = model(ids, output_hidden_states=True).hidden_states
    layers = [s.module_path.rsplit(".", 1)[0] for s in sites]
    for i in range(n_layers - 1):  # hs[i+1] is layer i's output (the last one is after the final norm)
        x = cap[sites[i].module_path]
        layer = model.get_submodule(layers[i])
        with torch.no_grad():
            h_mid = hs[i + 1] - layer.mlp(x)  # residual stream before the FFN
            expected = getattr(layer, FFN_NORM[family])(h_mid)
        torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stop_early_captures_the_same_states(family, tiny_llama, tiny_gpt2):
    model = (tiny_llama if family == "llama" else tiny_gpt2).model
    ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(1))
    sites = [resolve_site(model, "last"), resolve_site(model, "0.5")]
    with torch.no_grad(), capture_inputs(model, sites) as full:
        model(ids)
    with torch.no_grad(), capture_inputs(model, sites, stop_early=True) as early:
        assert run_captured(model.base_model, input_ids=ids) is None
    for s in sites:
        torch.testing.assert_close(full[s.module_path], early[s.module_path])


def test_site_specs(tiny_llama):
    model = tiny_llama.model  # 3 layers
    assert resolve_site(model, "last").layer == 2
    assert resolve_site(model, -1).layer == 2
    assert resolve_site(model, "0.7").layer == 2  # int(0.7 * 3)
    assert resolve_site(model, "0.5").layer == 1
    assert resolve_site(model, "0").layer == 0
    assert resolve_site(model, "1.0").layer == 2
    assert resolve_site(model, "model.layers.1.mlp").module_path == "model.layers.1.mlp"
    assert resolve_site(model, 1).module_path == "model.layers.1.mlp"
    with pytest.raises(MLPMemError, match="out of range"):
        resolve_site(model, 5)
    with pytest.raises(MLPMemError, match="within"):
        resolve_site(model, "1.5")
    with pytest.raises(MLPMemError, match="no module"):
        resolve_site(model, "model.nope.mlp")
    with pytest.raises(MLPMemError, match="no module"):
        resolve_site(model, "model.layers.9.mlp")


def test_unknown_architecture_says_how_to_name_the_module():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(MLPMemError, match="--key-site"):
        resolve_site(Odd(), "last")
    assert resolve_site(Odd(), "blocks.0").module_path == "blocks.0"
